//! `/tokens` (operator API tokens) and `/audit` (the audit log).

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ferrohub_registry::RegistryStore as _;
use ferrohub_registry::model::{ApiToken, AuditEvent, AuditQuery, AuditResult, Millis, Role};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};

/// A new API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who or what uses it.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// Tenant it is confined to; absent for a platform-wide token (admin role only).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Validity in seconds; absent for no expiry.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A token just created, with its secret (shown once: only a hash is stored).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token as listed from now on.
    pub token: ApiToken,
    /// The bearer secret: `Authorization: Bearer <secret>`.
    pub secret: String,
}

/// The API tokens in the caller's scope (admin).
#[utoipa::path(get, path = "/tokens", tag = "tokens",
    responses((status = 200, description = "The tokens (no secrets)", body = Vec<ApiToken>), CommonErrors))]
pub async fn list_tokens(c: Caller) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(c.registry.list_tokens(&c.actor).await?))
}

/// Creates an API token (admin; a tenant admin creates tokens of its own tenant only).
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, description = "The token and its secret", body = CreatedToken), CommonErrors))]
pub async fn create_token(
    c: Caller,
    ApiJson(t): ApiJson<NewToken>,
) -> ApiResult<impl IntoResponse> {
    let (token, secret) = c
        .registry
        .create_token(&c.actor, &t.name, t.role, t.tenant.as_deref(), t.ttl_secs)
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { token, secret })))
}

/// Revokes an API token (admin); it stops working at once.
#[utoipa::path(delete, path = "/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "Token id (not the secret)")),
    responses((status = 204, description = "The token was revoked"), CommonErrors))]
pub async fn revoke_token(c: Caller, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
    c.registry.revoke_token(&c.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters of an audit query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Tenant (a tenant-scoped token always sees its own tenant only).
    pub tenant: Option<String>,
    /// Action prefix: `device.` matches every device action.
    pub action: Option<String>,
    /// Actor: `token:<id>`, `device:<tenant>/<id>` or `system`.
    pub actor: Option<String>,
    /// Target (device id, token id, ...).
    pub target: Option<String>,
    /// `success` or `failure`.
    pub result: Option<AuditResult>,
    /// From this time (inclusive, ms since the epoch).
    pub since: Option<Millis>,
    /// Until this time (exclusive, ms since the epoch).
    pub until: Option<Millis>,
    /// Events older than this sequence number (pass `next_before_seq` for the next page).
    pub before_seq: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

/// A page of audit events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// The events.
    pub items: Vec<AuditEvent>,
    /// Pass as `before_seq` for the next (older) page; absent when this page is the last.
    pub next_before_seq: Option<i64>,
}

/// The audit log, newest first: every operator action and security event.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditParams),
    responses((status = 200, description = "A page of events", body = AuditPage), CommonErrors))]
pub async fn query_audit(
    c: Caller,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit={limit}: give a page size from 1 to 1000"
        )));
    }
    let q = AuditQuery {
        tenant: p.tenant,
        action: p.action,
        actor: p.actor,
        target: p.target,
        result: p.result,
        since: p.since,
        until: p.until,
        before_seq: p.before_seq,
        limit: Some(limit),
    };
    let items = c.registry.query_audit(&c.actor, q).await?;
    let next_before_seq = if items.len() == limit as usize {
        items.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Json(AuditPage {
        items,
        next_before_seq,
    }))
}

/// Who the caller is: the token's identity, role and tenant scope.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    /// The actor as the audit log names it (`token:<id>`).
    pub actor: String,
    /// The token's id.
    pub token_id: Option<String>,
    /// The token's name.
    pub name: Option<String>,
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// The tenant the token is confined to; absent for a platform-wide token.
    pub tenant: Option<String>,
    /// When the token expires (ms since the epoch); absent for no expiry.
    pub expires_at: Option<Millis>,
}

/// The calling token: its name, role and tenant scope (any role; the console uses it to show
/// only the actions the token may take).
#[utoipa::path(get, path = "/me", tag = "tokens",
    responses((status = 200, description = "The caller", body = Me), CommonErrors))]
pub async fn me(c: Caller) -> ApiResult<Json<Me>> {
    let token_id = c.actor.name.strip_prefix("token:").map(str::to_string);
    let token = match &token_id {
        Some(id) => c
            .registry
            .store()
            .token(id)
            .await
            .map_err(|e| ApiError::internal(&e))?,
        None => None,
    };
    Ok(Json(Me {
        actor: c.actor.name.clone(),
        token_id,
        name: token.as_ref().map(|t| t.name.clone()),
        role: c.actor.role,
        tenant: c.actor.tenant.clone(),
        expires_at: token.and_then(|t| t.expires_at),
    }))
}
