//! How rules reach the rest of the hub: the broker's tap feeding the rules service, and the
//! [`HubLink`] its actions and lookups use (broker, telemetry, twins, commands, alarms, registry).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_adapters::mqtt::Broker;
use ferrohub_alarms::{AlarmError, AlarmService, RaiseAlarm, Severity};
use ferrohub_registry::Registry;
use ferrohub_registry::service::Actor;
use ferrohub_rules_service::{
    ActionError, AlarmRequest, CommandRequest, HubLink, RulesService, TwinSection,
};
use ferrohub_telemetry::decode::PayloadFormat;
use ferrohub_telemetry::service::{Telemetry, TelemetryError};
use ferrohub_twins::TwinError;
use ferrohub_twins::Twins;
use ferrohub_twins::commands::Commands;
use ferrohub_twins::document::Section;
use ferrohub_twins::service::TwinWrite;
use ferrohub_twins::store::TwinKey;
use ferrohub_types::TenantId;
use serde_json::Value as Json;

/// The services rule actions reach. Weak where the service owns the rules service's Arc chain
/// (the broker holds the tap), so shutdown is not held up by a cycle.
pub struct RulesHub {
    /// Republish goes through it.
    pub broker: Weak<Broker>,
    /// Device checks and `device()` lookups.
    pub registry: Arc<Registry>,
    /// Twin writes and `twin()` lookups.
    pub twins: Arc<Twins>,
    /// Commands.
    pub commands: Arc<Commands>,
    /// `store_telemetry` (`None`: telemetry disabled).
    pub telemetry: Option<Arc<Telemetry>>,
    /// Alarm actions.
    pub alarms: Arc<AlarmService>,
}

impl RulesHub {
    /// A device the rule names must be registered: twins and commands are for known devices.
    async fn known_device(&self, tenant: &str, device: &str) -> Result<(), ActionError> {
        match self.registry.device(&Actor::system(), tenant, device).await {
            Ok(_) => Ok(()),
            Err(ferrohub_registry::RegistryError::NotFound(_)) => Err(ActionError::permanent(
                format!("device `{device}` is not registered in tenant `{tenant}`"),
            )),
            Err(e) => Err(ActionError::transient(format!("registry: {e}"))),
        }
    }
}

fn twin_error(e: TwinError) -> ActionError {
    match e {
        TwinError::Conflict { .. } => ActionError::transient(e.to_string()),
        TwinError::Store(_) => ActionError::transient(e.to_string()),
        other => ActionError::permanent(other.to_string()),
    }
}

#[async_trait::async_trait]
impl HubLink for RulesHub {
    /// Publishes as the hub itself (no rule hears it: loop protection); `$` topics refused.
    async fn publish(
        &self,
        tenant: &str,
        topic: &str,
        payload: Bytes,
        qos: u8,
    ) -> Result<(), ActionError> {
        if topic.starts_with('$') {
            return Err(ActionError::permanent(format!(
                "`{topic}` is a reserved topic; rules may not publish there"
            )));
        }
        if let Err(e) =
            ferrohub_types::TopicName::new(topic, &ferrohub_types::TopicLimits::default())
        {
            return Err(ActionError::permanent(format!(
                "`{topic}` is not a valid topic: {e}"
            )));
        }
        let Some(broker) = self.broker.upgrade() else {
            return Err(ActionError::permanent("the hub is shutting down"));
        };
        let qos = if qos == 0 {
            ferrohub_types::QoS::AtMostOnce
        } else {
            ferrohub_types::QoS::AtLeastOnce
        };
        let p = broker
            .publish_from_service_with(&TenantId::new(tenant), topic, payload, qos, None)
            .await;
        if p.refused {
            return Err(ActionError::transient(
                "a subscriber's queue was full or the store refused it",
            ));
        }
        Ok(())
    }

    async fn store_telemetry(
        &self,
        tenant: &str,
        device: &str,
        payload: Json,
    ) -> Result<(), ActionError> {
        let Some(telemetry) = &self.telemetry else {
            return Err(ActionError::permanent(
                "telemetry is disabled in this hub (telemetry.enabled)",
            ));
        };
        let body = serde_json::to_vec(&payload)
            .map_err(|e| ActionError::permanent(format!("encoding the payload: {e}")))?;
        match telemetry
            .write_payload(&TenantId::new(tenant), device, &body, PayloadFormat::Json)
            .await
        {
            Ok(report) if report.points == 0 && report.rejected_total > 0 => Err(
                ActionError::permanent(format!("no point stored: {}", report.rejected.join("; "))),
            ),
            Ok(_) => Ok(()),
            Err(TelemetryError::BadRequest(e)) => Err(ActionError::permanent(e)),
            Err(e) => Err(ActionError::transient(e.to_string())),
        }
    }

    async fn update_twin(
        &self,
        tenant: &str,
        device: &str,
        section: TwinSection,
        patch: Json,
        actor: &str,
    ) -> Result<(), ActionError> {
        self.known_device(tenant, device).await?;
        let section = match section {
            TwinSection::Desired => Section::Desired,
            TwinSection::Reported => Section::Reported,
            TwinSection::Tags => Section::Tags,
        };
        self.twins
            .update(
                TwinKey {
                    tenant: Arc::from(tenant),
                    device: Arc::from(device),
                    name: Arc::from(""),
                },
                TwinWrite {
                    section,
                    patch: Some(patch),
                    expected_version: None,
                    client_token: None,
                    actor: actor.to_string(),
                    rejections: Vec::new(),
                    want_documents: false,
                },
            )
            .await
            .map(|_| ())
            .map_err(twin_error)
    }

    async fn send_command(
        &self,
        tenant: &str,
        device: &str,
        command: CommandRequest,
        actor: &str,
    ) -> Result<(), ActionError> {
        self.known_device(tenant, device).await?;
        if command.queued {
            self.commands
                .enqueue(
                    tenant,
                    device,
                    &command.name,
                    command.payload,
                    command.ttl_s.map(Duration::from_secs),
                    actor,
                )
                .await
                .map(|_| ())
                .map_err(twin_error)
        } else {
            let timeout = Duration::from_secs(command.ttl_s.unwrap_or(30).min(300));
            let r = self
                .commands
                .direct(tenant, device, &command.name, command.payload, timeout)
                .await
                .map_err(twin_error)?;
            if (200..300).contains(&r.status) {
                Ok(())
            } else {
                Err(ActionError::permanent(format!(
                    "the device answered status {}",
                    r.status
                )))
            }
        }
    }

    async fn alarm(
        &self,
        tenant: &str,
        request: AlarmRequest,
        source: &str,
    ) -> Result<(), ActionError> {
        let result = match request {
            AlarmRequest::Raise {
                key,
                severity,
                device,
                message,
                details,
            } => {
                let severity = Severity::parse(&severity)
                    .map_err(|e| ActionError::permanent(e.to_string()))?;
                self.alarms
                    .raise(
                        tenant,
                        RaiseAlarm {
                            key,
                            severity,
                            device,
                            message,
                            details,
                            source: source.to_string(),
                        },
                    )
                    .await
                    .map(|_| ())
            }
            AlarmRequest::Clear { key } => self
                .alarms
                .clear_by_key(tenant, &key, source, None)
                .await
                .map(|_| ()),
        };
        result.map_err(|e| match e {
            AlarmError::Storage(_) => ActionError::transient(e.to_string()),
            other => ActionError::permanent(other.to_string()),
        })
    }

    async fn twin(&self, tenant: &str, device: &str) -> Option<Json> {
        let key = TwinKey {
            tenant: Arc::from(tenant),
            device: Arc::from(device),
            name: Arc::from(""),
        };
        // Only registered devices have twins (an unknown id reads as not found, not as empty).
        self.registry
            .device(&Actor::system(), tenant, device)
            .await
            .ok()?;
        self.twins.operator_view(key).await.ok()
    }

    async fn device(&self, tenant: &str, device: &str) -> Option<Json> {
        let d = self
            .registry
            .device(&Actor::system(), tenant, device)
            .await
            .ok()?;
        serde_json::to_value(d).ok()
    }
}

/// Shows ordinary client publications to the rules service (never blocks the publisher).
pub struct RulesTap(pub Arc<RulesService>);

impl ferrohub_adapters::mqtt::MessageTap for RulesTap {
    fn observe(
        &self,
        tenant: &TenantId,
        message: &Arc<ferrohub_types::Message>,
        origin: &ferrohub_adapters::mqtt::Origin,
    ) {
        self.0.offer(tenant.as_str(), message.topic.as_str(), || {
            ferrohub_rules_service::Inbound {
                tenant: Arc::from(tenant.as_str()),
                topic: message.topic.as_arc().clone(),
                payload: message.payload.clone(),
                client_id: origin.client_id.clone(),
                device: origin.device_id.clone(),
                timestamp_ms: message.received_at as i64,
            }
        });
    }
}

/// Keeps rules' twin lookups fresh: every committed twin change evicts that device's cached
/// twin. Ends when the twin service's change stream closes.
pub fn forget_changed_twins(
    twins: &Twins,
    rules: Arc<RulesService>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = twins.watch();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(c) => rules.forget_lookup(Some(&c.tenant), Some(&c.device_id)),
                // Missed changes: forget everything cached (the next lookups refetch).
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    rules.forget_lookup(None, None);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}
