//! Claim-based fleet provisioning over MQTT.
//!
//! A device leaves the factory with a shared *claim* credential: a registered claim device whose
//! policy allows only the provisioning topics of one template. It connects with it and publishes
//! a request on `$provisioning/{template}/request/{client_id}`:
//!
//! ```json
//! {"device_id": "sensor-0042", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----…"}
//! ```
//!
//! (without `csr_pem` the hub generates the key pair). The hub optionally asks the template's
//! approval webhook, registers the device from the template (type, tags, groups, policy), issues
//! a certificate from the tenant's built-in CA, pins it to the device and answers on
//! `$provisioning/{template}/response/{client_id}` with `{"status":"accepted", "device_id",
//! "certificate_pem", "private_key_pem"?, "ca_pem"}` or `{"status":"rejected","error"}`. The
//! device then reconnects over mTLS with its own certificate.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{RegistryError, Result};
use crate::model::{ProvisioningTemplate, validate_id};
use crate::service::Registry;
use crate::store::{DocKind, RegistryStore};

/// The filter the provisioning service listens on.
pub const REQUEST_FILTER: &str = "$provisioning/+/request/+";

/// A provisioning request from a device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningRequest {
    /// The identity the device asks for (e.g. its serial number).
    pub device_id: String,
    /// A PEM CSR when the device keeps its own key.
    #[serde(default)]
    pub csr_pem: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ProvisioningResponse {
    /// Registered; here is the certificate.
    Accepted {
        /// The registered device id.
        device_id: String,
        /// The device certificate (PEM).
        certificate_pem: String,
        /// The generated private key (PEM) when the request had no CSR.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        private_key_pem: Option<String>,
        /// The CA that signed it (to trust in future handshakes of the device's own clients).
        ca_pem: String,
    },
    /// Refused.
    Rejected {
        /// Why.
        error: String,
    },
}

/// What the approval webhook receives.
#[derive(Debug, Clone, Serialize)]
struct ApprovalRequest<'a> {
    tenant: &'a str,
    template: &'a str,
    device_id: &'a str,
    client_id: &'a str,
}

/// Parses a request topic into `(template, client_id)`.
pub fn parse_request_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("$provisioning/")?;
    let (template, rest) = rest.split_once('/')?;
    let client_id = rest.strip_prefix("request/")?;
    (!template.is_empty() && !client_id.is_empty() && !client_id.contains('/'))
        .then_some((template, client_id))
}

/// The topic the answer to `client_id` goes to.
pub fn response_topic(template: &str, client_id: &str) -> String {
    format!("$provisioning/{template}/response/{client_id}")
}

fn webhook_client() -> Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Crypto(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| RegistryError::Crypto(e.to_string()))
}

impl Registry {
    /// Handles one provisioning request published in `tenant`; returns the response topic and
    /// the answer. Every outcome is audited.
    pub async fn handle_provisioning(
        &self,
        tenant: &str,
        topic: &str,
        payload: &[u8],
    ) -> Option<(String, ProvisioningResponse)> {
        let (template, client_id) = parse_request_topic(topic)?;
        // A QoS 1 request redelivered while the first copy is being handled is dropped: one
        // request, one answer.
        let _in_flight = self.begin_provisioning(tenant, template, client_id)?;
        let answer = match self.provision(tenant, template, client_id, payload).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(tenant, template, client_id, error = %e, "provisioning refused");
                ProvisioningResponse::Rejected {
                    error: e.to_string(),
                }
            }
        };
        Some((response_topic(template, client_id), answer))
    }

    /// Webhooks are https (the hub must not be a probe into plain-HTTP services near it),
    /// unless `registry.allow_http_webhooks` says otherwise (development, tests).
    pub(crate) fn check_webhook_url(&self, url: &str) -> Result<()> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://")
            || (self.config().allow_http_webhooks && lower.starts_with("http://"))
        {
            Ok(())
        } else {
            Err(RegistryError::Invalid(
                "approval webhooks must be https:// URLs (set registry.allow_http_webhooks for plain HTTP)".into(),
            ))
        }
    }

    async fn provision(
        &self,
        tenant: &str,
        template_name: &str,
        client_id: &str,
        payload: &[u8],
    ) -> Result<ProvisioningResponse> {
        let request: ProvisioningRequest = serde_json::from_slice(payload).map_err(|e| {
            RegistryError::Invalid(format!(
                "provisioning request is not valid JSON {{\"device_id\", \"csr_pem\"?}}: {e}"
            ))
        })?;
        validate_id("device", &request.device_id)?;
        let template: ProvisioningTemplate = self
            .store()
            .doc(tenant, DocKind::Template, template_name)
            .await?
            .ok_or_else(|| {
                RegistryError::NotFound(format!("provisioning template {template_name}"))
            })?;
        if let Some(url) = &template.approval_webhook {
            self.check_webhook_url(url)?;
            let body = ApprovalRequest {
                tenant,
                template: template_name,
                device_id: &request.device_id,
                client_id,
            };
            let answer = webhook_client()?.post(url).json(&body).send().await;
            match answer {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    // The status stays in the hub's log: the device learns nothing about the
                    // network behind the webhook.
                    tracing::info!(
                        url,
                        status = r.status().as_u16(),
                        "approval webhook refused"
                    );
                    return Err(RegistryError::Forbidden(
                        "the approval webhook refused the device".into(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(url, error = %e, "approval webhook unreachable");
                    return Err(RegistryError::Forbidden(
                        "the approval webhook could not be reached; try again later".into(),
                    ));
                }
            }
        }
        let device = self
            .register_from_template(
                tenant,
                &request.device_id,
                Some(template_name),
                &format!("mqtt client {client_id}"),
            )
            .await?;
        let issued = match self
            .issue_provisioned_certificate(
                tenant,
                &device.id,
                request.csr_pem,
                template.cert_validity_days,
            )
            .await
        {
            Ok(i) => i,
            Err(e) => {
                // No half-provisioned device: a bad CSR leaves nothing behind.
                let _ = self.store().delete_device(tenant, &device.id).await;
                return Err(e);
            }
        };
        Ok(ProvisioningResponse::Accepted {
            device_id: device.id,
            certificate_pem: issued.0.cert_pem,
            private_key_pem: issued.0.key_pem,
            ca_pem: issued.1,
        })
    }
}
