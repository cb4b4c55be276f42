//! `/tenants`: isolated namespaces of devices, topics and data.

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ferrohub_registry::model::{Tenant, TenantSettings};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::{ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, Caller};

/// A new tenant.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// Identifier: 1-128 characters of `A-Z a-z 0-9 . _ : -` (not `.` or `..`); devices connect as `tenant/device`.
    pub id: String,
    /// Display name (defaults to the id).
    #[serde(default)]
    pub name: Option<String>,
    /// Settings (quotas, certificate identity, telemetry on decommission).
    #[serde(default)]
    pub settings: TenantSettings,
}

/// A change to a tenant (absent fields are unchanged).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    /// New display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Replacement settings (all of them; quotas apply to new rate buckets at once).
    #[serde(default)]
    pub settings: Option<TenantSettings>,
}

/// Lists the tenants in the token's scope (a tenant-scoped token sees its own tenant only).
#[utoipa::path(get, path = "/tenants", tag = "tenants",
    responses((status = 200, description = "The tenants", body = Vec<Tenant>), CommonErrors))]
pub async fn list_tenants(c: Caller) -> ApiResult<Json<Vec<Tenant>>> {
    Ok(Json(c.registry.tenants(&c.actor).await?))
}

/// Creates a tenant (platform-wide admin tokens only).
#[utoipa::path(post, path = "/tenants", tag = "tenants", request_body = NewTenant,
    responses((status = 201, description = "The tenant was created", body = Tenant), CommonErrors))]
pub async fn create_tenant(
    c: Caller,
    ApiJson(t): ApiJson<NewTenant>,
) -> ApiResult<impl IntoResponse> {
    let tenant = c
        .registry
        .create_tenant(&c.actor, &t.id, t.name.as_deref(), t.settings)
        .await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// A tenant.
#[utoipa::path(get, path = "/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The tenant", body = Tenant), CommonErrors))]
pub async fn get_tenant(c: Caller, ApiPath(tenant): ApiPath<String>) -> ApiResult<Json<Tenant>> {
    Ok(Json(c.registry.tenant(&c.actor, &tenant).await?))
}

/// Changes a tenant's name or settings (admin).
#[utoipa::path(patch, path = "/tenants/{tenant}", tag = "tenants", request_body = TenantPatch,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The changed tenant", body = Tenant), CommonErrors))]
pub async fn update_tenant(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(p): ApiJson<TenantPatch>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(
        c.registry
            .update_tenant(&c.actor, &tenant, p.name, p.settings)
            .await?,
    ))
}

/// Deletes a tenant with its devices, credentials and tokens; its devices are disconnected
/// (platform-wide admin tokens only; the default tenant cannot be deleted).
#[utoipa::path(delete, path = "/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 204, description = "The tenant was deleted"), CommonErrors))]
pub async fn delete_tenant(c: Caller, ApiPath(tenant): ApiPath<String>) -> ApiResult<StatusCode> {
    c.registry.delete_tenant(&c.actor, &tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}
