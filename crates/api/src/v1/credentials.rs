//! `/tenants/{tenant}/devices/{device}/credentials` and device tokens.

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ferrohub_registry::model::Credential;
use ferrohub_registry::service::TokenKeyDoc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, Caller};

/// A credential to add to a device, by `kind`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NewCredential {
    /// A password (argon2id-hashed). Without `secret` one is generated.
    Password {
        /// The password (8 to 1024 bytes); generated when absent.
        #[serde(default)]
        secret: Option<String>,
        /// Rotation: the device's other passwords stop working after this many seconds.
        #[serde(default)]
        rotate_overlap_secs: Option<u64>,
    },
    /// A certificate: issued by the tenant's built-in CA (with a generated key, or signing
    /// `csr_pem`), or, with `certificate_pem`, an externally issued certificate pinned to the
    /// device (from then on only pinned certificates are accepted for it).
    Certificate {
        /// A PKCS#10 certificate signing request (PEM); the device keeps its key.
        #[serde(default)]
        csr_pem: Option<String>,
        /// An external certificate (PEM) to pin instead of issuing one.
        #[serde(default)]
        certificate_pem: Option<String>,
        /// Rotation: the device's other certificates stop working after this many seconds
        /// (issued certificates only).
        #[serde(default)]
        rotate_overlap_secs: Option<u64>,
    },
    /// A public key (PEM) or JWK set that verifies JWTs the device signs itself.
    JwtKey {
        /// A PEM public key.
        #[serde(default)]
        pem: Option<String>,
        /// A JWK set (JSON text).
        #[serde(default)]
        jwks: Option<String>,
    },
}

/// A credential just created, with what is shown only once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedCredential {
    /// The credential as listed from now on.
    pub credential: Credential,
    /// The password (kind `password`). Shown once: it is stored only as a hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The issued or pinned certificate (kind `certificate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// The generated private key (PKCS#8 PEM) when no CSR was given. Shown once, never stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// The tenant's built-in CA certificate, for the device's trust store (issued certificates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

fn created(credential: Credential) -> CreatedCredential {
    CreatedCredential {
        credential,
        secret: None,
        certificate_pem: None,
        private_key_pem: None,
        ca_pem: None,
    }
}

/// A device's credentials; secrets are never returned.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/credentials", tag = "credentials",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "The credentials", body = Vec<Credential>), CommonErrors))]
pub async fn list_credentials(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
) -> ApiResult<Json<Vec<Credential>>> {
    Ok(Json(
        c.registry.credentials(&c.actor, &tenant, &device).await?,
    ))
}

/// Adds a credential to a device (operator). Secrets and private keys are in this answer only.
#[utoipa::path(post, path = "/tenants/{tenant}/devices/{device}/credentials", tag = "credentials",
    request_body = NewCredential,
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 201, description = "The credential was created", body = CreatedCredential), CommonErrors))]
pub async fn create_credential(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiJson(new): ApiJson<NewCredential>,
) -> ApiResult<impl IntoResponse> {
    let r = &c.registry;
    let out = match new {
        NewCredential::Password {
            secret,
            rotate_overlap_secs,
        } => {
            let (cred, secret) = r
                .add_password(&c.actor, &tenant, &device, secret, rotate_overlap_secs)
                .await?;
            CreatedCredential {
                secret: Some(secret),
                ..created(cred)
            }
        }
        NewCredential::Certificate {
            csr_pem: Some(_),
            certificate_pem: Some(_),
            ..
        } => {
            return Err(ApiError::invalid(
                "give either csr_pem (the hub issues a certificate) or certificate_pem (pin an \
                 external certificate), not both",
            ));
        }
        NewCredential::Certificate {
            certificate_pem: Some(pem),
            rotate_overlap_secs,
            ..
        } => {
            if rotate_overlap_secs.is_some() {
                return Err(ApiError::invalid(
                    "rotate_overlap_secs applies to certificates the hub issues; to retire a \
                     pinned certificate, revoke its credential",
                ));
            }
            let cred = r
                .pin_external_certificate(&c.actor, &tenant, &device, &pem)
                .await?;
            CreatedCredential {
                certificate_pem: Some(pem),
                ..created(cred)
            }
        }
        NewCredential::Certificate {
            csr_pem,
            rotate_overlap_secs,
            ..
        } => {
            let (cred, issued) = r
                .issue_certificate(&c.actor, &tenant, &device, csr_pem, rotate_overlap_secs)
                .await?;
            let ca_pem = crate::v1::pki::builtin_ca_pem(&c, &tenant).await?;
            CreatedCredential {
                certificate_pem: Some(issued.cert_pem),
                private_key_pem: issued.key_pem,
                ca_pem: Some(ca_pem),
                ..created(cred)
            }
        }
        NewCredential::JwtKey { pem, jwks } => {
            let cred = r
                .add_jwt_key(&c.actor, &tenant, &device, TokenKeyDoc { pem, jwks })
                .await?;
            created(cred)
        }
    };
    Ok((StatusCode::CREATED, Json(out)))
}

/// Revokes a credential (operator); the device's connections are closed. A revoked certificate
/// is refused for every device of the tenant.
#[utoipa::path(delete, path = "/tenants/{tenant}/devices/{device}/credentials/{id}", tag = "credentials",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("device" = String, Path, description = "Device id"),
        ("id" = String, Path, description = "Credential id"),
    ),
    responses((status = 204, description = "The credential was revoked"), CommonErrors))]
pub async fn revoke_credential(
    c: Caller,
    ApiPath((tenant, device, id)): ApiPath<(String, String, String)>,
) -> ApiResult<StatusCode> {
    c.registry
        .revoke_credential(&c.actor, &tenant, &device, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A request for a device token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceTokenRequest {
    /// Validity in seconds (60 s to 30 days; clamped). Default one day.
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
}

fn default_ttl() -> u64 {
    86_400
}

/// A device token.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceToken {
    /// A hub-signed JWT (EdDSA) for the device: its MQTT password, with user name `tenant/device`.
    pub token: String,
}

/// Issues a hub-signed JWT for a device (operator); the device uses it as its MQTT password.
#[utoipa::path(post, path = "/tenants/{tenant}/devices/{device}/token", tag = "credentials",
    request_body = DeviceTokenRequest,
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "The token (not stored; it expires)", body = DeviceToken), CommonErrors))]
pub async fn device_token(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<DeviceTokenRequest>,
) -> ApiResult<Json<DeviceToken>> {
    let token = c
        .registry
        .issue_device_token(&c.actor, &tenant, &device, req.ttl_secs)
        .await?;
    Ok(Json(DeviceToken { token }))
}
