//! Certificate authorities, provisioning templates, certificate revocation and tenant token keys.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use ferrohub_registry::model::{CaRecord, ProvisioningTemplate};
use ferrohub_registry::service::TokenKeyDoc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, Body, Caller};
use crate::v1::catalog::{find, named_body};

/// The tenant's certificate authorities: `builtin` (the hub's own, created on first use) and the
/// external CAs registered by operators.
#[utoipa::path(get, path = "/tenants/{tenant}/cas", tag = "pki",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The CAs", body = Vec<CaRecord>), CommonErrors))]
pub async fn list_cas(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<CaRecord>>> {
    Ok(Json(c.registry.cas(&c.actor, &tenant).await?))
}

/// The certificate of the tenant's built-in CA (PEM), for devices to trust; created on first use.
#[utoipa::path(get, path = "/tenants/{tenant}/cas/builtin/certificate", tag = "pki",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The CA certificate", body = String, content_type = "application/x-pem-file"), CommonErrors))]
pub async fn builtin_ca_certificate(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let pem = builtin_ca_pem(&c, &tenant).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem))
}

/// The certificate of the tenant's built-in CA: the stored one, else a new one. (Reading the
/// stored record first makes sure the answer is the CA that signed the certificates issued so
/// far.)
pub async fn builtin_ca_pem(c: &Caller, tenant: &str) -> ApiResult<String> {
    let stored = c
        .registry
        .cas(&c.actor, tenant)
        .await?
        .into_iter()
        .find(|ca| ca.builtin && ca.id == "builtin");
    match stored {
        Some(ca) => Ok(ca.cert_pem),
        None => Ok(c.registry.builtin_ca_pem(&c.actor, tenant).await?),
    }
}

/// An external CA to trust.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaRegistration {
    /// The CA certificate (PEM).
    pub certificate_pem: String,
    /// Just-in-time registration: unknown devices with a valid certificate from this CA are
    /// registered on first connect.
    #[serde(default)]
    pub jitr: bool,
    /// The provisioning template applied on just-in-time registration.
    #[serde(default)]
    pub jitr_template: Option<String>,
}

/// Registers or replaces an external CA whose device certificates the tenant trusts (admin).
/// The id `builtin` is reserved.
#[utoipa::path(put, path = "/tenants/{tenant}/cas/{id}", tag = "pki", request_body = CaRegistration,
    params(("tenant" = String, Path, description = "Tenant id"), ("id" = String, Path, description = "CA id")),
    responses((status = 200, description = "The CA as stored", body = CaRecord), CommonErrors))]
pub async fn put_ca(
    c: Caller,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    ApiJson(ca): ApiJson<CaRegistration>,
) -> ApiResult<Json<CaRecord>> {
    Ok(Json(
        c.registry
            .register_ca(
                &c.actor,
                &tenant,
                &id,
                &ca.certificate_pem,
                ca.jitr,
                ca.jitr_template,
            )
            .await?,
    ))
}

/// Removes a CA (admin): its certificates are refused from the next TLS handshake on.
#[utoipa::path(delete, path = "/tenants/{tenant}/cas/{id}", tag = "pki",
    params(("tenant" = String, Path, description = "Tenant id"), ("id" = String, Path, description = "CA id")),
    responses((status = 204, description = "The CA was removed"), CommonErrors))]
pub async fn delete_ca(
    c: Caller,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    c.registry.delete_ca(&c.actor, &tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tenant's provisioning templates.
#[utoipa::path(get, path = "/tenants/{tenant}/provisioning-templates", tag = "pki",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The templates", body = Vec<ProvisioningTemplate>), CommonErrors))]
pub async fn list_templates(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<ProvisioningTemplate>>> {
    Ok(Json(c.registry.templates(&c.actor, &tenant).await?))
}

/// A provisioning template.
#[utoipa::path(get, path = "/tenants/{tenant}/provisioning-templates/{name}", tag = "pki",
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Template name")),
    responses((status = 200, description = "The template", body = ProvisioningTemplate), CommonErrors))]
pub async fn get_template(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<ProvisioningTemplate>> {
    let templates = c.registry.templates(&c.actor, &tenant).await?;
    Ok(Json(find(
        templates,
        "provisioning template",
        &name,
        |t| &t.name,
    )?))
}

/// Creates or replaces a provisioning template (admin): what a device registered just in time
/// (or by claim) becomes. `name` may be left out of the body.
#[utoipa::path(put, path = "/tenants/{tenant}/provisioning-templates/{name}", tag = "pki",
    request_body = ProvisioningTemplate,
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Template name")),
    responses((status = 200, description = "The template as stored", body = ProvisioningTemplate), CommonErrors))]
pub async fn put_template(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<ProvisioningTemplate>> {
    let t: ProvisioningTemplate = named_body(&body, &name)?;
    Ok(Json(c.registry.put_template(&c.actor, &tenant, t).await?))
}

/// A certificate to refuse.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateRevocation {
    /// SHA-256 fingerprint of the certificate (64 hex digits; `:` separators allowed).
    pub fingerprint: String,
    /// Why (kept in the revocation list and the audit log).
    #[serde(default)]
    pub reason: String,
}

/// Revokes a certificate by fingerprint (operator), e.g. one registered just in time: it is
/// refused for every device of the tenant from now on, and the connections that presented it
/// are closed.
#[utoipa::path(post, path = "/tenants/{tenant}/revoked-certificates", tag = "pki",
    request_body = CertificateRevocation,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 201, description = "The certificate is revoked (fingerprint normalised)", body = CertificateRevocation), CommonErrors))]
pub async fn revoke_certificate(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(r): ApiJson<CertificateRevocation>,
) -> ApiResult<impl IntoResponse> {
    c.registry
        .revoke_certificate(&c.actor, &tenant, &r.fingerprint, &r.reason)
        .await?;
    let fingerprint = r.fingerprint.to_ascii_lowercase().replace(':', "");
    Ok((
        StatusCode::CREATED,
        Json(CertificateRevocation {
            fingerprint,
            reason: r.reason,
        }),
    ))
}

/// A named tenant-wide token verification key, as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenKey {
    /// Name.
    pub name: String,
    /// The PEM public key, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
    /// The JWK set, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
}

/// A verification key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyBody {
    /// A PEM public key.
    #[serde(default)]
    pub pem: Option<String>,
    /// A JWK set (JSON text).
    #[serde(default)]
    pub jwks: Option<String>,
}

/// Registers or replaces a tenant-wide key (admin) that verifies JWTs devices of the tenant
/// present as MQTT passwords (e.g. signed by the operator's own backend).
#[utoipa::path(put, path = "/tenants/{tenant}/token-keys/{name}", tag = "pki", request_body = TokenKeyBody,
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Key name")),
    responses((status = 200, description = "The key as stored", body = TokenKey), CommonErrors))]
pub async fn put_token_key(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
    ApiJson(k): ApiJson<TokenKeyBody>,
) -> ApiResult<Json<TokenKey>> {
    let doc = TokenKeyDoc {
        pem: k.pem,
        jwks: k.jwks,
    };
    c.registry
        .put_tenant_token_key(&c.actor, &tenant, &name, doc.clone())
        .await?;
    Ok(Json(TokenKey {
        name,
        pem: doc.pem,
        jwks: doc.jwks,
    }))
}
