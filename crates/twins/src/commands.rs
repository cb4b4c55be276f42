//! Commands: requests to a device, in two modes.
//!
//! * **Direct**: the caller waits (1–300 s) for the device's answer. An offline device is refused
//!   at once; no answer in time is a timeout. Nothing is stored.
//! * **Queued**: the command is stored durably (committed before the caller is answered) in a
//!   bounded per-device queue with a time to live, and sent when the device is online. States:
//!   `queued → sent → delivered → succeeded | failed`, or `expired` when its TTL passes first, or
//!   `cancelled` by an operator. `sent` means published to the device's session; `delivered`
//!   means the device acknowledged the MQTT message (PUBACK); the device's response decides
//!   `succeeded` (status 2xx) or `failed`. A command still `sent` when the device reconnects
//!   with a fresh session is sent again; `attempts` counts every send, and a command sent
//!   `max_attempts` times without an answer fails.
//!
//! On the wire both modes are the same: a QoS 1 PUBLISH on
//! `$devices/{device}/commands/req/{command}/{requestId}` (MQTT 5: with Response Topic
//! `$devices/{device}/commands/res/{requestId}` and the request id as Correlation Data), answered
//! by the device on `$devices/{device}/commands/res/{requestId}[/{status}]` (status from the
//! topic, else from a `status` user property, else 200).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_types::{MessageProperties, UserProperty};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use rusqlite::{OptionalExtension, params};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::TwinError;
use crate::link::DeviceLink;
use crate::service::now_millis;
use crate::store::{SqliteTwinStore, StoreError, reply_after_commit};
use crate::topics;

/// Settings of the command service (`[commands]` in the hub's configuration).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Open (not finished) queued commands per device.
    pub max_queued_per_device: usize,
    /// Time to live of a queued command when the caller gives none (seconds).
    pub default_ttl_secs: u64,
    /// Longest time to live accepted (seconds).
    pub max_ttl_secs: u64,
    /// Sends of a queued command before it fails for want of an answer.
    pub max_attempts: u32,
    /// How long finished commands are kept (seconds).
    pub retention_secs: u64,
    /// Direct commands waiting for answers, hub-wide.
    pub max_direct_in_flight: usize,
    /// Largest request or response payload (bytes).
    pub max_payload_bytes: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            max_queued_per_device: 100,
            default_ttl_secs: 86_400,
            max_ttl_secs: 7 * 86_400,
            max_attempts: 5,
            retention_secs: 7 * 86_400,
            max_direct_in_flight: 10_000,
            max_payload_bytes: 64 * 1024,
        }
    }
}

/// A device's answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResponse {
    /// The device's status (HTTP-like: 2xx success).
    pub status: u16,
    /// Its payload.
    pub payload: Bytes,
}

/// The states of a queued command.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    /// Stored, not sent yet.
    Queued,
    /// Published to the device's session.
    Sent,
    /// The device acknowledged the MQTT message.
    Delivered,
    /// The device answered with a 2xx status.
    Succeeded,
    /// The device answered with another status, or never answered after `max_attempts` sends.
    Failed,
    /// Its time to live passed before it finished.
    Expired,
    /// An operator cancelled it.
    Cancelled,
}

impl CommandState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Delivered => "delivered",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// Parses [`CommandState::as_str`].
    pub fn parse(s: &str) -> Option<CommandState> {
        Some(match s {
            "queued" => CommandState::Queued,
            "sent" => CommandState::Sent,
            "delivered" => CommandState::Delivered,
            "succeeded" => CommandState::Succeeded,
            "failed" => CommandState::Failed,
            "expired" => CommandState::Expired,
            "cancelled" => CommandState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the command is finished.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded
                | CommandState::Failed
                | CommandState::Expired
                | CommandState::Cancelled
        )
    }
}

/// A queued command as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueuedCommand {
    /// Request id (also in the request topic).
    pub id: String,
    /// Device.
    pub device_id: String,
    /// Command name.
    pub name: String,
    /// The request payload (JSON when it is JSON, else text).
    pub payload: Value,
    /// State.
    pub state: CommandState,
    /// Sends so far.
    pub attempts: u32,
    /// Sends allowed.
    pub max_attempts: u32,
    /// Created (ms).
    pub created_at: u64,
    /// Last change (ms).
    pub updated_at: u64,
    /// Expires (ms).
    pub expires_at: u64,
    /// The device's status, once answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The device's answer (JSON when it is JSON, else text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Why it failed, expired or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who queued it.
    pub actor: String,
}

/// Removes a direct command's waiter when the command ends, however it ends.
struct WaiterGuard<'a> {
    waiters: &'a Mutex<HashMap<String, Waiter>>,
    rid: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.lock().remove(self.rid);
    }
}

struct Waiter {
    tenant: Arc<str>,
    device: Arc<str>,
    tx: oneshot::Sender<CommandResponse>,
}

/// The command service.
pub struct Commands {
    store: Arc<SqliteTwinStore>,
    config: CommandsConfig,
    link: RwLock<Option<Arc<dyn DeviceLink>>>,
    waiters: Mutex<HashMap<String, Waiter>>,
    next_seq: AtomicU64,
    /// Counters: direct commands answered, timed out; queued commands sent.
    pub metrics: CommandMetrics,
}

/// Counters of the command service.
#[derive(Debug, Default)]
pub struct CommandMetrics {
    /// Direct commands answered by the device.
    pub direct_answered: AtomicU64,
    /// Direct commands that timed out.
    pub direct_timeouts: AtomicU64,
    /// Queued-command sends (first sends and resends).
    pub queued_sends: AtomicU64,
}

/// Validates a command name.
pub fn command_name(name: &str) -> Result<&str, TwinError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(TwinError::Invalid(format!(
            "command name {name:?} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(name)
}

fn new_request_id() -> String {
    format!(
        "{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// Shows a payload: JSON when it parses, else text (lossy).
pub fn payload_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

impl Commands {
    /// The service over `store` (shared with the twins).
    pub fn new(store: Arc<SqliteTwinStore>, config: CommandsConfig) -> Arc<Commands> {
        Arc::new(Commands {
            store,
            config,
            link: RwLock::new(None),
            waiters: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(now_millis() * 1000),
            metrics: CommandMetrics::default(),
        })
    }

    /// Connects the service to the devices.
    pub fn set_link(&self, link: Arc<dyn DeviceLink>) {
        *self.link.write() = Some(link);
    }

    fn link(&self) -> Result<Arc<dyn DeviceLink>, TwinError> {
        self.link.read().clone().ok_or(TwinError::Busy(
            "the command service is not connected to the broker yet",
        ))
    }

    /// Appends the command service's Prometheus metrics to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let m = &self.metrics;
        let _ = writeln!(
            out,
            "# HELP ferrohub_commands_direct_total Direct commands by outcome.\n\
             # TYPE ferrohub_commands_direct_total counter\n\
             ferrohub_commands_direct_total{{outcome=\"answered\"}} {}\n\
             ferrohub_commands_direct_total{{outcome=\"timeout\"}} {}\n\
             # HELP ferrohub_commands_direct_waiting Direct commands waiting for an answer.\n\
             # TYPE ferrohub_commands_direct_waiting gauge\n\
             ferrohub_commands_direct_waiting {}\n\
             # HELP ferrohub_commands_queued_sends_total Sends of queued commands (first sends and resends).\n\
             # TYPE ferrohub_commands_queued_sends_total counter\n\
             ferrohub_commands_queued_sends_total {}",
            m.direct_answered.load(Relaxed),
            m.direct_timeouts.load(Relaxed),
            self.waiting(),
            m.queued_sends.load(Relaxed)
        );
    }

    /// Direct commands waiting for an answer now.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().len()
    }

    /// The service's settings.
    pub fn config(&self) -> &CommandsConfig {
        &self.config
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), TwinError> {
        if payload.len() > self.config.max_payload_bytes {
            return Err(TwinError::Invalid(format!(
                "the command payload is {} bytes; the limit is {} bytes (commands.max_payload_bytes)",
                payload.len(),
                self.config.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// Sends a direct command and waits up to `timeout` for the device's answer.
    pub async fn direct(
        &self,
        tenant: &str,
        device: &str,
        name: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<CommandResponse, TwinError> {
        command_name(name)?;
        self.check_payload(&payload)?;
        if !(1..=300).contains(&timeout.as_secs()) {
            return Err(TwinError::Invalid(
                "the timeout must be between 1 and 300 seconds".into(),
            ));
        }
        let link = self.link()?;
        if !link.is_online(tenant, device) {
            return Err(TwinError::Offline(device.to_string()));
        }
        let rid = new_request_id();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock();
            if waiters.len() >= self.config.max_direct_in_flight {
                return Err(TwinError::Busy(
                    "too many direct commands waiting for answers",
                ));
            }
            waiters.insert(
                rid.clone(),
                Waiter {
                    tenant: Arc::from(tenant),
                    device: Arc::from(device),
                    tx,
                },
            );
        }
        // Whatever happens to this future (an answer, a timeout, or the HTTP client going
        // away), the waiter is removed.
        let _guard = WaiterGuard {
            waiters: &self.waiters,
            rid: &rid,
        };
        let delivery = link
            .publish(
                tenant,
                topics::command_request(device, name, &rid),
                payload,
                Some(request_properties(device, &rid)),
            )
            .await;
        if !delivery.matched || delivery.refused {
            return Err(if delivery.refused {
                TwinError::Busy("the device's queue is full")
            } else {
                TwinError::NotListening(device.to_string())
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => {
                self.metrics.direct_answered.fetch_add(1, Relaxed);
                Ok(response)
            }
            _ => {
                self.metrics.direct_timeouts.fetch_add(1, Relaxed);
                Err(TwinError::Timeout {
                    device: device.to_string(),
                    name: name.to_string(),
                    timeout_secs: timeout.as_secs(),
                })
            }
        }
    }

    /// Stores a queued command (durable when this returns) and sends it at once if the device
    /// is online.
    pub async fn enqueue(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        name: &str,
        payload: Bytes,
        ttl: Option<Duration>,
        actor: &str,
    ) -> Result<QueuedCommand, TwinError> {
        command_name(name)?;
        self.check_payload(&payload)?;
        let ttl = ttl.map_or(self.config.default_ttl_secs, |t| t.as_secs());
        if ttl == 0 || ttl > self.config.max_ttl_secs {
            return Err(TwinError::Invalid(format!(
                "the ttl must be between 1 and {} seconds (commands.max_ttl_secs)",
                self.config.max_ttl_secs
            )));
        }
        let now = now_millis();
        let cmd = QueuedCommand {
            id: new_request_id(),
            device_id: device.to_string(),
            name: name.to_string(),
            payload: payload_value(&payload),
            state: CommandState::Queued,
            attempts: 0,
            max_attempts: self.config.max_attempts,
            created_at: now,
            updated_at: now,
            expires_at: now + ttl * 1000,
            status: None,
            response: None,
            error: None,
            actor: actor.to_string(),
        };
        let seq = self.next_seq.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        let (t, limit, c) = (
            tenant.to_string(),
            self.config.max_queued_per_device,
            cmd.clone(),
        );
        self.store
            .submit(Box::new(move |ctx| {
                let result = (|| -> Result<QueuedCommand, TwinError> {
                    let open: i64 = ctx
                        .conn
                        .prepare_cached(
                            "SELECT count(*) FROM commands WHERE tenant = ?1 AND device = ?2 \
                             AND state IN ('queued', 'sent', 'delivered')",
                        )
                        .and_then(|mut s| s.query_row(params![t, c.device_id], |r| r.get(0)))
                        .map_err(StoreError::from)?;
                    if open as usize >= limit {
                        return Err(TwinError::QueueFull {
                            device: c.device_id.clone(),
                            limit,
                        });
                    }
                    ctx.conn
                        .prepare_cached(
                            "INSERT INTO commands (tenant, device, id, seq, name, payload, state, \
                             attempts, max_attempts, created_at, updated_at, expires_at, actor) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', 0, ?7, ?8, ?8, ?9, ?10)",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                t,
                                c.device_id,
                                c.id,
                                seq as i64,
                                c.name,
                                payload.as_ref(),
                                c.max_attempts,
                                c.created_at as i64,
                                c.expires_at as i64,
                                c.actor
                            ])
                        })
                        .map_err(StoreError::from)?;
                    Ok(c)
                })();
                let keep = result.is_ok();
                reply_after_commit(tx, result, keep)
            }))
            .await?;
        // What follows the commit runs in its own task: an operator who goes away after the
        // command was stored must not leave it unsent while its device is online.
        let me = self.clone();
        let (t, d) = (tenant.to_string(), device.to_string());
        let follow = tokio::spawn(async move {
            let cmd = rx.await.map_err(|_| StoreError::Closed)??;
            if me.link().is_ok_and(|l| l.is_online(&t, &d))
                && let Err(e) = me.send_pending(&t, &d, false).await
            {
                tracing::warn!(error = %e, device = %d, "sending queued commands failed");
            }
            Ok::<_, TwinError>(cmd)
        });
        follow
            .await
            .map_err(|_| TwinError::Busy("the command service stopped"))?
    }

    /// Sends a device its open queued commands, oldest first: every `queued` one, and — when
    /// `resend` (the device starts a fresh session, so what was sent before is lost) — every
    /// `sent` one again. Commands out of time expire; commands out of attempts fail.
    pub async fn send_pending(
        &self,
        tenant: &str,
        device: &str,
        resend: bool,
    ) -> Result<usize, TwinError> {
        let link = self.link()?;
        let now = now_millis();
        let max_attempts = self.config.max_attempts;
        let (tx, rx) = oneshot::channel();
        let (t, d) = (tenant.to_string(), device.to_string());
        // Claim the commands to send (state and attempts updated in one transaction), then publish.
        self.store
            .submit(Box::new(move |ctx| {
                let result = (|| -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
                    let states = if resend {
                        "('queued', 'sent')"
                    } else {
                        "('queued')"
                    };
                    let mut st = ctx.conn.prepare_cached(&format!(
                        "SELECT id, name, payload, attempts, expires_at FROM commands \
                         WHERE tenant = ?1 AND device = ?2 AND state IN {states} ORDER BY seq"
                    ))?;
                    let rows: Vec<(String, String, Vec<u8>, u32, i64)> = st
                        .query_map(params![t, d], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })?
                        .collect::<Result<_, _>>()?;
                    let mut out = Vec::new();
                    for (id, name, payload, attempts, expires_at) in rows {
                        let (state, error) = if expires_at as u64 <= now {
                            (
                                "expired",
                                Some("its time to live passed before it finished"),
                            )
                        } else if attempts >= max_attempts {
                            ("failed", Some("no answer after the last attempt"))
                        } else {
                            ("sent", None)
                        };
                        ctx.conn
                            .prepare_cached(
                                "UPDATE commands SET state = ?4, attempts = attempts + ?5, \
                                 updated_at = ?6, error = ?7 \
                                 WHERE tenant = ?1 AND device = ?2 AND id = ?3",
                            )?
                            .execute(params![
                                t,
                                d,
                                id,
                                state,
                                i64::from(state == "sent"),
                                now as i64,
                                error
                            ])?;
                        if state == "sent" {
                            out.push((id, name, payload));
                        }
                    }
                    Ok(out)
                })();
                let keep = result.is_ok();
                reply_after_commit(tx, result.map_err(TwinError::from), keep)
            }))
            .await?;
        let to_send = rx.await.map_err(|_| StoreError::Closed)??;
        let mut sent = 0;
        for (id, name, payload) in to_send {
            self.metrics.queued_sends.fetch_add(1, Relaxed);
            let d = link
                .publish(
                    tenant,
                    topics::command_request(device, &name, &id),
                    Bytes::from(payload),
                    Some(request_properties(device, &id)),
                )
                .await;
            if d.matched && !d.refused {
                sent += 1;
            } else {
                // Nobody took it (not subscribed yet, or its queue is full): it waits for the
                // next chance, and this send does not count as an attempt.
                self.unsend(tenant, device, &id).await;
            }
        }
        Ok(sent)
    }

    /// Runs `f` in the writer's transaction; answers once it is committed.
    async fn write<T, F>(&self, f: F) -> Result<T, TwinError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.store
            .submit(Box::new(move |ctx| {
                let result = f(ctx.conn).map_err(TwinError::from);
                let keep = result.is_ok();
                reply_after_commit(tx, result, keep)
            }))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Moves one command of a device from state `from` to `to` (with `updated_at`); returns
    /// whether it was in `from`.
    async fn transition(
        &self,
        (tenant, device, id): (&str, &str, &str),
        from: &'static str,
        to: &'static str,
        error: Option<&'static str>,
    ) -> Result<bool, TwinError> {
        let (t, d, i) = (tenant.to_string(), device.to_string(), id.to_string());
        let now = now_millis() as i64;
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE commands SET state = ?5, updated_at = ?6, error = coalesce(?7, error), \
                     attempts = CASE WHEN ?5 = 'queued' THEN max(attempts - 1, 0) ELSE attempts END \
                     WHERE tenant = ?1 AND device = ?2 AND id = ?3 \
                     AND (state = ?4 OR (?4 = 'open' AND state IN ('queued', 'sent', 'delivered')))",
                )?
                .execute(params![t, d, i, from, to, now, error])?;
            Ok(n > 0)
        })
        .await
    }

    async fn unsend(&self, tenant: &str, device: &str, id: &str) {
        if let Err(e) = self
            .transition((tenant, device, id), "sent", "queued", None)
            .await
        {
            tracing::warn!(error = %e, "returning an unsent command to the queue failed");
        }
    }

    /// A device answered request `rid`. Returns whether a command was waiting for it.
    pub async fn on_response(
        &self,
        tenant: &str,
        device: &str,
        rid: &str,
        response: CommandResponse,
    ) -> Result<bool, TwinError> {
        let waiter = {
            let mut waiters = self.waiters.lock();
            match waiters.get(rid) {
                Some(w) if &*w.tenant == tenant && &*w.device == device => waiters.remove(rid),
                _ => None,
            }
        };
        if let Some(w) = waiter {
            let _ = w.tx.send(response);
            return Ok(true);
        }
        let state = if (200..300).contains(&response.status) {
            "succeeded"
        } else {
            "failed"
        };
        let mut payload = response.payload.to_vec();
        payload.truncate(self.config.max_payload_bytes);
        let now = now_millis() as i64;
        let (t, d, r) = (tenant.to_string(), device.to_string(), rid.to_string());
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE commands SET state = ?4, status = ?5, response = ?6, updated_at = ?7 \
                     WHERE tenant = ?1 AND device = ?2 AND id = ?3 \
                     AND state IN ('queued', 'sent', 'delivered')",
                )?
                .execute(params![t, d, r, state, response.status, payload, now])?;
            Ok(n > 0)
        })
        .await
    }

    /// The device acknowledged the request published on `topic` (MQTT PUBACK).
    pub async fn on_delivered(&self, tenant: &str, device: &str, topic: &str) {
        let Some(rid) = topic.rsplit('/').next() else {
            return;
        };
        if self.waiters.lock().contains_key(rid) {
            return;
        }
        if let Err(e) = self
            .transition((tenant, device, rid), "sent", "delivered", None)
            .await
        {
            tracing::warn!(error = %e, "recording a command delivery failed");
        }
    }

    /// Expires open commands past their TTL and deletes finished ones past the retention.
    /// Returns (expired, deleted).
    pub async fn sweep(&self) -> Result<(usize, usize), TwinError> {
        let now = now_millis();
        let keep_until = now.saturating_sub(self.config.retention_secs * 1000);
        self.write(move |c| {
            let expired = c.execute(
                "UPDATE commands SET state = 'expired', updated_at = ?1, \
                 error = 'its time to live passed before it finished' \
                 WHERE state IN ('queued', 'sent', 'delivered') AND expires_at <= ?1",
                params![now as i64],
            )?;
            let deleted = c.execute(
                "DELETE FROM commands WHERE state IN \
                 ('succeeded', 'failed', 'expired', 'cancelled') AND updated_at < ?1",
                params![keep_until as i64],
            )?;
            Ok((expired, deleted))
        })
        .await
    }

    /// Cancels an open queued command.
    pub async fn cancel(
        &self,
        tenant: &str,
        device: &str,
        id: &str,
    ) -> Result<QueuedCommand, TwinError> {
        let changed = self
            .transition(
                (tenant, device, id),
                "open",
                "cancelled",
                Some("cancelled by an operator"),
            )
            .await?;
        let cmd = self.get(tenant, device, id).await?;
        if !changed && cmd.state != CommandState::Cancelled {
            return Err(TwinError::Invalid(format!(
                "command {id} is {} already and cannot be cancelled",
                cmd.state.as_str()
            )));
        }
        Ok(cmd)
    }

    /// One queued command.
    pub async fn get(
        &self,
        tenant: &str,
        device: &str,
        id: &str,
    ) -> Result<QueuedCommand, TwinError> {
        let (t, d, i) = (tenant.to_string(), device.to_string(), id.to_string());
        let found = self
            .store
            .read(move |c| {
                Ok(c.prepare_cached(&format!(
                    "{SELECT_COMMAND} WHERE tenant = ?1 AND device = ?2 AND id = ?3"
                ))?
                .query_row(params![t, d, i], command_row)
                .optional()?)
            })
            .await?;
        found.ok_or_else(|| TwinError::NotFound(format!("device {device} has no command {id}")))
    }

    /// A device's queued commands, newest first, optionally only in `state`.
    pub async fn list(
        &self,
        tenant: &str,
        device: &str,
        state: Option<CommandState>,
        limit: usize,
    ) -> Result<Vec<QueuedCommand>, TwinError> {
        let (t, d) = (tenant.to_string(), device.to_string());
        let limit = limit.clamp(1, 1000) as i64;
        Ok(self
            .store
            .read(move |c| {
                let mut st = c.prepare_cached(&format!(
                    "{SELECT_COMMAND} WHERE tenant = ?1 AND device = ?2 \
                     AND (?3 IS NULL OR state = ?3) ORDER BY seq DESC LIMIT ?4"
                ))?;
                let rows = st.query_map(
                    params![t, d, state.map(CommandState::as_str), limit],
                    command_row,
                )?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }
}

const SELECT_COMMAND: &str = "SELECT id, device, name, payload, state, attempts, max_attempts, \
     created_at, updated_at, expires_at, status, response, error, actor FROM commands";

fn command_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedCommand> {
    let payload: Vec<u8> = r.get(3)?;
    let state: String = r.get(4)?;
    let response: Option<Vec<u8>> = r.get(11)?;
    Ok(QueuedCommand {
        id: r.get(0)?,
        device_id: r.get(1)?,
        name: r.get(2)?,
        payload: payload_value(&payload),
        state: CommandState::parse(&state).unwrap_or(CommandState::Failed),
        attempts: r.get(5)?,
        max_attempts: r.get(6)?,
        created_at: r.get::<_, i64>(7)? as u64,
        updated_at: r.get::<_, i64>(8)? as u64,
        expires_at: r.get::<_, i64>(9)? as u64,
        status: r.get(10)?,
        response: response.map(|b| payload_value(&b)),
        error: r.get(12)?,
        actor: r.get(13)?,
    })
}

/// MQTT 5 request properties: where to answer, and the request id as Correlation Data.
fn request_properties(device: &str, rid: &str) -> MessageProperties {
    MessageProperties {
        response_topic: Some(Arc::from(topics::command_response(device, rid).as_str())),
        correlation_data: Some(Bytes::copy_from_slice(rid.as_bytes())),
        ..MessageProperties::default()
    }
}

/// The status of a response: from the topic, else a `status` user property, else 200.
pub fn response_status(topic_status: Option<u16>, user_properties: &[UserProperty]) -> u16 {
    topic_status
        .or_else(|| {
            user_properties
                .iter()
                .find(|(k, _)| &**k == "status")
                .and_then(|(_, v)| v.parse().ok())
        })
        .unwrap_or(200)
}
