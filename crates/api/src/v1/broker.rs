//! `/tenants/{tenant}/broker/…` and `/broker/sys`: the MQTT broker as operators see it —
//! sessions (kick, discard), subscriptions, retained messages (view, delete), per-tenant figures
//! with top talkers, and the hub-wide `$SYS` figures. Viewers read; operators kick, discard and
//! delete (each audited). Client ids and topics are single path segments: percent-encode their
//! `/` as `%2F` (`encodeURIComponent`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use ferrohub_registry::model::{AuditResult, Role};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::broker::{
    BrokerStats, BrokerViewRef, RetainedEntry, SessionDetail, SessionRow, SubscriptionRow,
    SysFigures,
};
use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, ApiQuery, Caller};

/// Rows per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 50;
/// Largest `limit`.
const MAX_LIMIT: usize = 1000;
/// Payload bytes a retained listing shows of each message.
pub const PREVIEW_BYTES: usize = 256;

fn view_of(state: &ApiState) -> Result<BrokerViewRef, ApiError> {
    state.broker_view.clone().ok_or_else(ApiError::unavailable)
}

fn limit_of(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::invalid(format!(
            "limit={n}: give 1 to {MAX_LIMIT} rows per page"
        ))),
    }
}

/// Paging and search of the session listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// Only client ids starting with this.
    pub prefix: Option<String>,
    /// Cursor: the `next` of the previous page.
    pub after: Option<String>,
    /// Rows per page, 1 to 1000 (default 50).
    pub limit: Option<usize>,
}

/// A page of sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionPage {
    /// Sessions by client id.
    pub items: Vec<SessionRow>,
    /// Cursor of the next page (pass as `after`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Lists the tenant's MQTT sessions (online and offline) by client id.
#[utoipa::path(get, path = "/tenants/{tenant}/broker/sessions", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"), SessionQuery),
    responses((status = 200, description = "A page of sessions", body = SessionPage), CommonErrors))]
pub async fn list_sessions(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<SessionQuery>,
) -> ApiResult<Json<SessionPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let limit = limit_of(q.limit)?;
    let page = view_of(&state)?.sessions(
        &tenant,
        q.prefix.as_deref().unwrap_or(""),
        q.after.as_deref(),
        limit,
    );
    Ok(Json(SessionPage {
        items: page.items,
        next: page.next,
    }))
}

/// A session with its subscriptions.
#[utoipa::path(get, path = "/tenants/{tenant}/broker/sessions/{client_id}", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"),
        ("client_id" = String, Path, description = "MQTT client id (percent-encoded)")),
    responses((status = 200, description = "The session", body = SessionDetail), CommonErrors))]
pub async fn get_session(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, client_id)): ApiPath<(String, String)>,
) -> ApiResult<Json<SessionDetail>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    view_of(&state)?
        .session(&tenant, &client_id)
        .map(Json)
        .ok_or_else(|| no_session(&client_id))
}

fn no_session(client_id: &str) -> ApiError {
    ApiError::not_found(format!("there is no session of client {client_id:?}"))
}

/// What `DELETE …/sessions/{client_id}` does.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EndSessionQuery {
    /// `true`: also delete the session (subscriptions, queued and in-flight messages); default
    /// `false`: only disconnect the client (v5: DISCONNECT 0x98), keeping a persistent session.
    pub discard: Option<bool>,
}

/// Kicks a client (disconnects it, keeping its session), or with `?discard=true` discards its
/// session (disconnects it and deletes the session). Kicking a client that is not connected is
/// 409 `not_connected`.
#[utoipa::path(delete, path = "/tenants/{tenant}/broker/sessions/{client_id}", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"),
        ("client_id" = String, Path, description = "MQTT client id (percent-encoded)"), EndSessionQuery),
    responses((status = 204, description = "Kicked, or discarded"),
        (status = 409, description = "Not connected (kick)", body = crate::error::ErrorBody), CommonErrors))]
pub async fn end_session(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, client_id)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<EndSessionQuery>,
) -> ApiResult<StatusCode> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let view = view_of(&state)?;
    let discard = q.discard.unwrap_or(false);
    let done = if discard {
        view.discard(&tenant, &client_id).await
    } else {
        if view.session(&tenant, &client_id).is_none() {
            return Err(no_session(&client_id));
        }
        view.kick(&tenant, &client_id)
    };
    if !done {
        return Err(if discard {
            no_session(&client_id)
        } else {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_connected",
                format!(
                    "client {client_id:?} is not connected; DELETE with ?discard=true deletes its \
                     session"
                ),
            )
        });
    }
    let action = if discard {
        "broker.session.discard"
    } else {
        "broker.session.kick"
    };
    c.registry
        .audit(
            &c.actor,
            Some(&tenant),
            action,
            &client_id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Paging and search of the subscription listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionQuery {
    /// Only filters starting with this (the filter without any `$share/{group}/`).
    pub filter_prefix: Option<String>,
    /// Cursor: the `next` of the previous page (opaque).
    pub after: Option<String>,
    /// Rows per page, 1 to 1000 (default 50).
    pub limit: Option<usize>,
}

/// A page of subscriptions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionPage {
    /// Subscriptions by filter, then client id.
    pub items: Vec<SubscriptionRow>,
    /// Cursor of the next page (pass as `after`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Lists the tenant's subscriptions by filter, then client id.
#[utoipa::path(get, path = "/tenants/{tenant}/broker/subscriptions", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"), SubscriptionQuery),
    responses((status = 200, description = "A page of subscriptions", body = SubscriptionPage), CommonErrors))]
pub async fn list_subscriptions(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<SubscriptionQuery>,
) -> ApiResult<Json<SubscriptionPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let limit = limit_of(q.limit)?;
    let page = view_of(&state)?.subscriptions(
        &tenant,
        q.filter_prefix.as_deref().unwrap_or(""),
        q.after.as_deref(),
        limit,
    );
    Ok(Json(SubscriptionPage {
        items: page.items,
        next: page.next,
    }))
}

/// A retained message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetainedRow {
    /// Topic.
    pub topic: String,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// The payload (in a listing: its first 256 bytes) as text when it is UTF-8, else base64.
    pub payload: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    /// `payload` is only the start of the payload (listings).
    pub truncated: bool,
    /// QoS it was published with.
    pub qos: u8,
    /// When it was published (ms since the epoch).
    pub stored_at: u64,
    /// MQTT 5 Payload Format Indicator said UTF-8.
    pub payload_format_utf8: bool,
    /// MQTT 5 Content Type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// MQTT 5 Response Topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// MQTT 5 Message Expiry (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// MQTT 5 User Properties, in order, as `[name, value]` pairs.
    pub user_properties: Vec<(String, String)>,
}

/// Renders `payload` (at most `max` bytes of it) as text when it is UTF-8, else base64; the
/// flag says whether it was cut.
fn render_payload(payload: &[u8], max: usize) -> (String, &'static str, bool) {
    let truncated = payload.len() > max;
    let shown = &payload[..payload.len().min(max)];
    match std::str::from_utf8(shown) {
        Ok(text) => (text.to_string(), "utf8", truncated),
        // Cut inside a character: the part before it, if the whole payload is text.
        Err(e) if truncated && e.error_len().is_none() => {
            let text = std::str::from_utf8(&shown[..e.valid_up_to()]).unwrap_or_default();
            (text.to_string(), "utf8", true)
        }
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(shown),
            "base64",
            truncated,
        ),
    }
}

fn retained_row(e: RetainedEntry, max: usize) -> RetainedRow {
    let (payload, encoding, truncated) = render_payload(&e.payload, max);
    RetainedRow {
        topic: e.topic,
        payload_size: e.payload.len() as u64,
        payload,
        payload_encoding: encoding.to_string(),
        truncated,
        qos: e.qos,
        stored_at: e.stored_at,
        payload_format_utf8: e.payload_is_utf8,
        content_type: e.content_type,
        response_topic: e.response_topic,
        expires_at: e.expires_at,
        user_properties: e.user_properties,
    }
}

/// Paging and topic-filter query of the retained listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RetainedQuery {
    /// MQTT topic filter (default `#`: every topic not starting with `$`; `$SYS/#` for those).
    pub filter: Option<String>,
    /// Cursor: the `next` of the previous page (a topic).
    pub after: Option<String>,
    /// Rows per page, 1 to 1000 (default 50).
    pub limit: Option<usize>,
}

/// A page of retained messages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetainedPage {
    /// Retained messages by topic, payloads cut to 256 bytes.
    pub items: Vec<RetainedRow>,
    /// Cursor of the next page (pass as `after`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Lists the tenant's retained messages matching a topic filter, by topic, with a preview of
/// each payload (the first 256 bytes, as text when UTF-8, else base64).
#[utoipa::path(get, path = "/tenants/{tenant}/broker/retained", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"), RetainedQuery),
    responses((status = 200, description = "A page of retained messages", body = RetainedPage), CommonErrors))]
pub async fn list_retained(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<RetainedQuery>,
) -> ApiResult<Json<RetainedPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let limit = limit_of(q.limit)?;
    let page = view_of(&state)?
        .retained(
            &tenant,
            q.filter.as_deref().unwrap_or("#"),
            q.after.as_deref(),
            limit,
        )
        .map_err(ApiError::invalid)?;
    Ok(Json(RetainedPage {
        items: page
            .items
            .into_iter()
            .map(|e| retained_row(e, PREVIEW_BYTES))
            .collect(),
        next: page.next,
    }))
}

/// The retained message of a topic, whole (as text when UTF-8, else base64). The topic is one
/// path segment: percent-encode its `/` (`a%2Fb` for `a/b`).
#[utoipa::path(get, path = "/tenants/{tenant}/broker/retained/{topic}", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"),
        ("topic" = String, Path, description = "Topic, percent-encoded (`/` as `%2F`)")),
    responses((status = 200, description = "The retained message", body = RetainedRow), CommonErrors))]
pub async fn get_retained(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, topic)): ApiPath<(String, String)>,
) -> ApiResult<Json<RetainedRow>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    view_of(&state)?
        .retained_message(&tenant, &topic)
        .map_err(ApiError::invalid)?
        .map(|e| Json(retained_row(e, usize::MAX)))
        .ok_or_else(|| no_retained(&topic))
}

fn no_retained(topic: &str) -> ApiError {
    ApiError::not_found(format!("no message is retained on {topic:?}"))
}

/// Deletes the retained message of a topic, as an empty retained publication would (durable
/// when this answers). The topic is percent-encoded like in `GET`.
#[utoipa::path(delete, path = "/tenants/{tenant}/broker/retained/{topic}", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id"),
        ("topic" = String, Path, description = "Topic, percent-encoded (`/` as `%2F`)")),
    responses((status = 204, description = "Deleted"), CommonErrors))]
pub async fn delete_retained(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, topic)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let deleted = view_of(&state)?
        .delete_retained(&tenant, &topic)
        .await
        .map_err(ApiError::invalid)?;
    if !deleted {
        return Err(no_retained(&topic));
    }
    c.registry
        .audit(
            &c.actor,
            Some(&tenant),
            "broker.retained.delete",
            &topic,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tenant's broker figures: messages in and out (totals and per second), sessions,
/// connections by protocol and transport, subscriptions, retained messages and the top talkers
/// (clients with the most messages in over the last interval; figures are recomputed at most
/// once a second).
#[utoipa::path(get, path = "/tenants/{tenant}/broker/stats", tag = "broker",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The figures", body = BrokerStats), CommonErrors))]
pub async fn broker_stats(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<BrokerStats>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(view_of(&state)?.stats(&tenant)))
}

/// The hub-wide `$SYS` figures (every tenant): platform-wide tokens only.
#[utoipa::path(get, path = "/broker/sys", tag = "broker",
    responses((status = 200, description = "The figures", body = SysFigures), CommonErrors))]
pub async fn broker_sys(c: Caller, State(state): State<ApiState>) -> ApiResult<Json<SysFigures>> {
    if c.actor.tenant.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the $SYS figures span every tenant: they need a platform-wide token",
        ));
    }
    c.actor.require(Role::Viewer, None)?;
    Ok(Json(view_of(&state)?.sys()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_render_as_text_or_base64() {
        assert_eq!(
            render_payload(b"hello", 256),
            ("hello".into(), "utf8", false)
        );
        assert_eq!(render_payload(b"hello", 3), ("hel".into(), "utf8", true));
        // "é" is two bytes: a cut inside it keeps the text before.
        assert_eq!(
            render_payload("aé".as_bytes(), 2),
            ("a".into(), "utf8", true)
        );
        assert_eq!(
            render_payload(&[0xff, 0x00, 0x01], 256),
            ("/wAB".into(), "base64", false)
        );
        assert!(render_payload(&[0xff, 0x00, 0x01], 2).2);
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(limit_of(None).unwrap(), DEFAULT_LIMIT);
        assert!(limit_of(Some(0)).is_err());
        assert!(limit_of(Some(MAX_LIMIT + 1)).is_err());
    }
}
