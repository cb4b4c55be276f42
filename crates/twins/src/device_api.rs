//! What devices publish on the reserved twin and command topics, and what the services do when a
//! device connects or subscribes (see [`crate::topics`] and `docs/device-api.md`).
//!
//! Updates from one device are queued to the store in the order they arrive and answered when
//! durable (`…/update/accepted`) or refused (`…/update/rejected`, with a code, a message and the
//! `clientToken`). A device that connects with its session, or subscribes to its delta topic,
//! receives its current delta without asking; one that subscribes to its command topic receives
//! its open queued commands.

use std::sync::Arc;

use bytes::Bytes;
use ferrohub_types::{MessageProperties, filter_matches};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use crate::commands::{CommandResponse, Commands, response_status};
use crate::document::Section;
use crate::service::{TwinWrite, Twins, now_millis};
use crate::store::TwinKey;
use crate::topics::{self, DeviceTopic, TwinOp};
use crate::{TwinError, link::DeviceLink};

/// A message a device published on a reserved topic.
#[derive(Debug, Clone)]
pub struct DeviceMessage {
    /// Tenant.
    pub tenant: Arc<str>,
    /// The registered device that published it; `None` for anonymous clients and static users
    /// (their policy decides which devices they act for).
    pub origin_device: Option<Arc<str>>,
    /// The MQTT client id of the publisher (recorded as the actor when `origin_device` is
    /// `None`).
    pub origin_client: Option<Arc<str>>,
    /// The topic.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// Its MQTT 5 properties.
    pub properties: Option<Arc<MessageProperties>>,
}

/// The device-facing side of twins and commands.
pub struct DeviceApi {
    twins: Arc<Twins>,
    commands: Arc<Commands>,
    link: Arc<dyn DeviceLink>,
    // Bounds the answers in flight (each holds a pending store write).
    in_flight: Arc<Semaphore>,
    dropped: std::sync::atomic::AtomicU64,
    // Devices whose current session is fresh (clean start, or not resumed) and that have not yet
    // subscribed to their commands: they get commands sent to earlier sessions again. Bounded:
    // cleared when it grows past 100,000 (a device then misses one resend, not a command).
    fresh_sessions: parking_lot::Mutex<hashbrown::HashSet<(Arc<str>, Arc<str>)>>,
}

impl DeviceApi {
    /// The device API over the services, answering through `link`.
    pub fn new(
        twins: Arc<Twins>,
        commands: Arc<Commands>,
        link: Arc<dyn DeviceLink>,
    ) -> Arc<DeviceApi> {
        Arc::new(DeviceApi {
            twins,
            commands,
            link,
            in_flight: Arc::new(Semaphore::new(16_384)),
            dropped: std::sync::atomic::AtomicU64::new(0),
            fresh_sessions: parking_lot::Mutex::new(hashbrown::HashSet::new()),
        })
    }

    /// Handles one message. Returns once the request is queued (so that calling this in arrival
    /// order applies a device's updates in order); the answer is published later.
    pub async fn handle(self: &Arc<Self>, msg: DeviceMessage) {
        let Some(parsed) = topics::parse(&msg.topic) else {
            return;
        };
        let device = match &parsed {
            DeviceTopic::Twin { device, .. } | DeviceTopic::CommandResponse { device, .. } => {
                *device
            }
        };
        if msg.origin_device.as_deref().is_some_and(|o| o != device) {
            // The policy normally prevents this; never act for another device.
            tracing::warn!(origin = ?msg.origin_device, topic = %msg.topic, "device published on another device's topic; ignored");
            return;
        }
        match parsed {
            DeviceTopic::Twin { device, name, op } => {
                self.twin_request(&msg, device, name, op).await;
            }
            DeviceTopic::CommandResponse {
                device,
                request_id,
                status,
            } => {
                let props = msg.properties.as_deref();
                let status =
                    response_status(status, props.map(|p| &p.user_properties[..]).unwrap_or(&[]));
                let response = CommandResponse {
                    status,
                    payload: msg.payload.clone(),
                };
                let (me, t, d, r) = (
                    self.clone(),
                    msg.tenant.clone(),
                    device.to_string(),
                    request_id.to_string(),
                );
                let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                    self.overloaded();
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = me.commands.on_response(&t, &d, &r, response).await {
                        tracing::warn!(error = %e, device = %d, "recording a command response failed");
                    }
                    drop(permit);
                });
            }
        }
    }

    async fn twin_request(
        self: &Arc<Self>,
        msg: &DeviceMessage,
        device: &str,
        name: &str,
        op: TwinOp,
    ) {
        let prefix = topics::twin_prefix(device, name);
        let body: Value = if msg.payload.is_empty() {
            Value::Object(Map::new())
        } else {
            match serde_json::from_slice(&msg.payload) {
                Ok(v) => v,
                Err(e) => {
                    let err = TwinError::Invalid(format!("the payload is not JSON: {e}"));
                    self.spawn_reject(&msg.tenant, prefix, op, err, None);
                    return;
                }
            }
        };
        let client_token = body
            .get("clientToken")
            .and_then(Value::as_str)
            .map(|s| s.chars().take(64).collect::<String>());
        let name = match crate::service::twin_name(name) {
            Ok(n) => n,
            Err(e) => {
                self.spawn_reject(&msg.tenant, prefix, op, e, client_token);
                return;
            }
        };
        let key = TwinKey {
            tenant: msg.tenant.clone(),
            device: Arc::from(device),
            name: Arc::from(name),
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.overloaded();
            return;
        };
        match op {
            TwinOp::Get => {
                let me = self.clone();
                tokio::spawn(async move {
                    match me.twins.device_view(key.clone()).await {
                        Ok(mut view) => {
                            if let (Some(t), Some(o)) = (&client_token, view.as_object_mut()) {
                                o.insert("clientToken".into(), Value::from(t.clone()));
                            }
                            me.link
                                .publish(
                                    &key.tenant,
                                    format!("{prefix}/get/accepted"),
                                    Bytes::from(view.to_string()),
                                    None,
                                )
                                .await;
                        }
                        Err(e) => me.reject(&key.tenant, &prefix, op, &e, client_token).await,
                    }
                    drop(permit);
                });
            }
            TwinOp::Update => {
                let actor = match (&msg.origin_device, &msg.origin_client) {
                    (Some(d), _) => format!("device:{d}"),
                    (None, Some(c)) => format!("client:{c}"),
                    (None, None) => "client".to_string(),
                };
                let write = match update_request(&body, actor, client_token.clone()) {
                    Ok(mut w) => {
                        w.want_documents = self
                            .link
                            .has_subscribers(&msg.tenant, &format!("{prefix}/documents"));
                        w
                    }
                    Err(e) => {
                        self.spawn_reject(&msg.tenant, prefix, op, e, client_token);
                        return;
                    }
                };
                // Queued now, in arrival order; answered when durable.
                let pending = match self.twins.enqueue(key.clone(), write).await {
                    Ok(p) => p,
                    Err(e) => {
                        self.spawn_reject(&msg.tenant, prefix, op, e, client_token);
                        return;
                    }
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let result = match pending.await {
                        Ok(r) => r,
                        Err(_) => Err(TwinError::Busy("the twin store stopped")),
                    };
                    match result {
                        Ok(applied) => {
                            let mut accepted = json!({
                                "version": applied.version,
                                "reported": applied.patch,
                                "timestamp": applied.at,
                            });
                            if let (Some(t), Some(o)) =
                                (&applied.client_token, accepted.as_object_mut())
                            {
                                o.insert("clientToken".into(), Value::from(t.clone()));
                            }
                            me.link
                                .publish(
                                    &key.tenant,
                                    format!("{prefix}/update/accepted"),
                                    Bytes::from(accepted.to_string()),
                                    None,
                                )
                                .await;
                            if let Some((previous, current)) = &applied.documents {
                                let docs = json!({"previous": previous, "current": current, "timestamp": applied.at});
                                me.link
                                    .publish(
                                        &key.tenant,
                                        format!("{prefix}/documents"),
                                        Bytes::from(docs.to_string()),
                                        None,
                                    )
                                    .await;
                            }
                        }
                        Err(e) => me.reject(&key.tenant, &prefix, op, &e, client_token).await,
                    }
                    drop(permit);
                });
            }
        }
    }

    /// Answers `rejected` without holding up the caller (the dispatcher must never wait on a
    /// publication).
    fn spawn_reject(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        prefix: String,
        op: TwinOp,
        err: TwinError,
        client_token: Option<String>,
    ) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.overloaded();
            return;
        };
        let (me, tenant) = (self.clone(), tenant.clone());
        tokio::spawn(async move {
            me.reject(&tenant, &prefix, op, &err, client_token).await;
            drop(permit);
        });
    }

    /// More requests are being answered than the bound allows: this one is dropped (counted);
    /// the device gets no answer and retries after its own timeout.
    fn overloaded(&self) {
        let n = self
            .dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(
                dropped = n + 1,
                "twin/command requests dropped: too many in progress"
            );
        }
    }

    /// Requests dropped because too many were in progress.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn reject(
        &self,
        tenant: &str,
        prefix: &str,
        op: TwinOp,
        err: &TwinError,
        client_token: Option<String>,
    ) {
        let op = match op {
            TwinOp::Get => "get",
            TwinOp::Update => "update",
        };
        let mut body = json!({
            "code": err.status(),
            "error": err.code(),
            "message": err.to_string(),
            "timestamp": now_millis(),
        });
        if let (Some(t), Some(o)) = (client_token, body.as_object_mut()) {
            o.insert("clientToken".into(), Value::from(t));
        }
        self.link
            .publish(
                tenant,
                format!("{prefix}/{op}/rejected"),
                Bytes::from(body.to_string()),
                None,
            )
            .await;
    }

    /// A device's connection was accepted (call in arrival order, before its subscriptions are
    /// handled): remembers whether its session is fresh.
    pub fn session_started(&self, tenant: &str, device: &str, session_present: bool) {
        let key = (Arc::from(tenant), Arc::from(device));
        let mut fresh = self.fresh_sessions.lock();
        if session_present {
            fresh.remove(&key);
        } else {
            if fresh.len() >= 100_000 {
                fresh.clear();
            }
            fresh.insert(key);
        }
    }

    /// A device connected. With a resumed session its subscriptions are in place: it gets its
    /// deltas and its queued commands now (a fresh session gets them when it subscribes).
    pub async fn on_connected(&self, tenant: &str, device: &str, session_present: bool) {
        if !session_present {
            return;
        }
        self.send_deltas(tenant, device, |_| true).await;
        if let Err(e) = self.commands.send_pending(tenant, device, false).await {
            tracing::warn!(error = %e, device, "sending queued commands failed");
        }
    }

    /// A device subscribed to reserved filters: deltas for the delta topics they cover, queued
    /// commands (including ones sent to a previous session) if they cover its command topic.
    pub async fn on_subscribed(&self, tenant: &str, device: &str, filters: &[Arc<str>]) {
        let twin_root = format!("$devices/{device}/twin/");
        if filters
            .iter()
            .any(|f| f.starts_with(twin_root.as_str()) || f.starts_with("$devices/+/"))
        {
            // Only the deltas these filters cover (one twin's delta topic, or a wildcard).
            self.send_deltas(tenant, device, |topic| {
                filters.iter().any(|f| filter_matches(f, topic))
            })
            .await;
        }
        let command_root = format!("$devices/{device}/commands/req/");
        let command_probe = topics::command_request(device, "x", "x");
        let covers_commands = filters
            .iter()
            .any(|f| filter_matches(f, &command_probe) || f.starts_with(command_root.as_str()));
        // Commands already sent are sent again only to a fresh session's first command
        // subscription (a resumed session still holds them; a repeated SUBSCRIBE must not burn
        // attempts).
        let resend = covers_commands
            && self
                .fresh_sessions
                .lock()
                .remove(&(Arc::<str>::from(tenant), Arc::<str>::from(device)));
        if covers_commands && let Err(e) = self.commands.send_pending(tenant, device, resend).await
        {
            tracing::warn!(error = %e, device, "sending queued commands failed");
        }
    }

    async fn send_deltas(&self, tenant: &str, device: &str, wanted: impl Fn(&str) -> bool) {
        let names = match self.twins.names(tenant, device).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, device, "listing twins failed");
                return;
            }
        };
        for name in names {
            if !wanted(&topics::delta(device, &name)) {
                continue;
            }
            let key = TwinKey {
                tenant: Arc::from(tenant),
                device: Arc::from(device),
                name: Arc::from(name.as_str()),
            };
            if let Err(e) = self.twins.send_delta(key).await {
                tracing::warn!(error = %e, device, "reading a delta failed");
            }
        }
    }

    /// The device acknowledged a command request.
    pub async fn on_delivered(&self, tenant: &str, device: &str, topic: &str) {
        self.commands.on_delivered(tenant, device, topic).await;
    }
}

/// Reads a device's update request: `{"reported": {…}}` or AWS-style `{"state": {"reported":
/// {…}}}`, with optional `version`, `clientToken` and `rejected: {"desired.path": "reason"}`.
fn update_request(
    body: &Value,
    actor: String,
    client_token: Option<String>,
) -> Result<TwinWrite, TwinError> {
    let Some(obj) = body.as_object() else {
        return Err(TwinError::Invalid(
            "the update must be a JSON object such as {\"reported\": {\"fw\": \"1.2\"}}".into(),
        ));
    };
    if ["desired", "tags"]
        .iter()
        .any(|k| obj.contains_key(*k) || obj.get("state").is_some_and(|s| s.get(k).is_some()))
    {
        return Err(TwinError::Invalid(
            "devices write reported only; desired and tags are written by operators and rules"
                .into(),
        ));
    }
    let reported = obj
        .get("reported")
        .or_else(|| obj.get("state").and_then(|s| s.get("reported")))
        .cloned();
    let version =
        match obj.get("version") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                TwinError::Invalid("version must be a non-negative integer".into())
            })?),
        };
    let mut rejections = Vec::new();
    if let Some(r) = obj.get("rejected") {
        let Some(r) = r.as_object() else {
            return Err(TwinError::Invalid(
                "rejected must be an object of desired key paths to reasons, e.g. {\"config.rate\": \"out of range\"}".into(),
            ));
        };
        if r.len() > 100 {
            return Err(TwinError::Invalid(
                "at most 100 rejections per update".into(),
            ));
        }
        for (path, reason) in r {
            if path.len() > 512 {
                return Err(TwinError::Invalid(
                    "a rejected key path is longer than 512 bytes".into(),
                ));
            }
            let reason = reason.as_str().unwrap_or("rejected by the device");
            // The document keeps this much of a reason; so does the history.
            let reason = crate::document::truncate(reason, crate::document::MAX_REASON_BYTES);
            rejections.push((path.clone(), reason.to_string()));
        }
    }
    if reported.is_none() && rejections.is_empty() {
        return Err(TwinError::Invalid(
            "nothing to update: send {\"reported\": {…}} and/or {\"rejected\": {…}}".into(),
        ));
    }
    Ok(TwinWrite {
        section: Section::Reported,
        patch: reported,
        expected_version: version,
        client_token,
        actor,
        rejections,
        want_documents: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update_request_test(
        body: &Value,
        device: &str,
        token: Option<String>,
    ) -> Result<TwinWrite, TwinError> {
        update_request(body, format!("device:{device}"), token)
    }

    #[test]
    fn update_requests() {
        let w = update_request_test(&json!({"reported": {"a": 1}, "version": 3}), "d", None);
        assert!(matches!(
            w,
            Ok(TwinWrite {
                expected_version: Some(3),
                ..
            })
        ));
        let w = update_request_test(&json!({"state": {"reported": {"a": 1}}}), "d", None);
        assert!(w.is_ok_and(|w| w.patch == Some(json!({"a": 1}))));
        assert!(update_request_test(&json!({"desired": {"a": 1}}), "d", None).is_err());
        assert!(update_request_test(&json!({}), "d", None).is_err());
        assert!(update_request_test(&json!([1]), "d", None).is_err());
        assert!(update_request_test(&json!({"reported": {}, "version": -1}), "d", None).is_err());
        let w = update_request_test(&json!({"rejected": {"rate": "too fast"}}), "d", None);
        assert!(
            w.is_ok_and(|w| w.rejections == vec![("rate".to_string(), "too fast".to_string())])
        );
    }
}
