//! `/tenants/{tenant}/alarms` and `/tenants/{tenant}/alarm-channels`: alarms (raise,
//! acknowledge, clear, query, history, counts, a Server-Sent Events stream) and their
//! notification channels (`docs/alarms.md`).
//!
//! Roles: viewers read alarms and channel deliveries, operators raise, acknowledge and clear,
//! admins read and manage channels (their URLs and headers often carry secrets).
//! The stream is bounded like the overview's: at most [`MAX_ALARM_STREAMS`] open in the process
//! (more: 429), each over a bounded per-tenant buffer (a reader that falls behind gets a
//! `lagged` event, raisers never wait), and all end when the server shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferrohub_alarms::{
    AlarmError, AlarmQuery, AlarmService, ChannelSpec, RaiseAlarm, Severity, StateFilter,
    StreamItem,
};
use ferrohub_registry::RegistryError;
use ferrohub_registry::model::Role;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use crate::error::{ApiError, CommonErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller, parse_json};
use crate::{ApiState, Closing};

/// How many alarm streams may be open at once in the process.
pub const MAX_ALARM_STREAMS: usize = 256;

static OPEN_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// An error of an alarms route: the API's usual ones, and a channel template that does not
/// parse (400 `invalid_template` with `field` and `line` next to `code` and `message`).
#[derive(Debug)]
pub enum AlarmsApiError {
    /// Any other API error.
    Api(ApiError),
    /// From the alarms service.
    Alarms(AlarmError),
}

impl From<ApiError> for AlarmsApiError {
    fn from(e: ApiError) -> Self {
        AlarmsApiError::Api(e)
    }
}

impl From<RegistryError> for AlarmsApiError {
    fn from(e: RegistryError) -> Self {
        AlarmsApiError::Api(e.into())
    }
}

impl From<AlarmError> for AlarmsApiError {
    fn from(e: AlarmError) -> Self {
        AlarmsApiError::Alarms(e)
    }
}

impl IntoResponse for AlarmsApiError {
    fn into_response(self) -> Response {
        let e = match self {
            AlarmsApiError::Api(e) => return e.into_response(),
            AlarmsApiError::Alarms(e) => e,
        };
        let api = match &e {
            AlarmError::Template { field, line, .. } => {
                let body = json!({
                    "code": "invalid_template", "message": e.to_string(),
                    "field": field, "line": line,
                });
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
            AlarmError::NotFound(_) => ApiError::not_found(e.to_string()),
            AlarmError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            AlarmError::Invalid(_) => ApiError::invalid(e.to_string()),
            AlarmError::Storage(_) => ApiError::internal(&e),
        };
        api.into_response()
    }
}

type AlarmsResult<T> = Result<T, AlarmsApiError>;

fn alarms_of(state: &ApiState) -> Result<Arc<AlarmService>, ApiError> {
    state.alarms.clone().ok_or_else(ApiError::unavailable)
}

/// Query of the alarm list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `active`, `acknowledged`, `cleared` or `open` (active or acknowledged).
    pub state: Option<String>,
    /// `critical`, `major`, `minor`, `warning` or `info`.
    pub severity: Option<String>,
    /// Device id.
    pub device: Option<String>,
    /// Dedup key.
    pub key: Option<String>,
    /// Created at or after: RFC 3339, Unix ms, `now` or a time ago (`-1h`).
    pub since: Option<String>,
    /// Created before (same forms as `since`).
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// A previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// Lists the tenant's alarms, newest first, with filters and cursor paging:
/// `{items, next_cursor?}`.
#[utoipa::path(get, path = "/tenants/{tenant}/alarms", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ListParams),
    responses((status = 200, description = "`{items, next_cursor?}`", body = serde_json::Value), CommonErrors))]
pub async fn list_alarms(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let now = now_ms();
    let time = |name: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| super::telemetry::parse_time(name, v, now))
            .transpose()
    };
    if p.limit.is_some_and(|l| !(1..=1000).contains(&l)) {
        return Err(ApiError::invalid("limit: 1 to 1000").into());
    }
    let query = AlarmQuery {
        state: p.state.as_deref().map(StateFilter::parse).transpose()?,
        severity: p.severity.as_deref().map(Severity::parse).transpose()?,
        device: p.device,
        key: p.key,
        since_ms: time("since", &p.since)?,
        until_ms: time("until", &p.until)?,
        limit: p.limit,
        cursor: p.cursor,
    };
    Ok(Json(alarms_of(&state)?.list(&tenant, &query).await?).into_response())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An alarm raised through the API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAlarm {
    /// Dedup key (1 to 256 characters).
    pub key: String,
    /// Severity.
    pub severity: Severity,
    /// The device concerned.
    #[serde(default)]
    pub device: Option<String>,
    /// What happened (at most 4 KiB).
    #[serde(default)]
    pub message: String,
    /// Free details (at most 16 KiB of JSON).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// Raises an alarm `{key, severity, device?, message?, details?}`: 201 with a new alarm, or 200
/// when it folded into the open alarm with the same key (`count` + 1, severity raised if
/// higher, message and details replaced). Answered after the commit.
#[utoipa::path(post, path = "/tenants/{tenant}/alarms", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id")),
    request_body(content = serde_json::Value, description = "`{key, severity, device?, message?, details?}`", content_type = "application/json"),
    responses(
        (status = 201, description = "A new alarm", body = serde_json::Value),
        (status = 200, description = "Folded into the open alarm with the same key", body = serde_json::Value),
        CommonErrors))]
pub async fn raise_alarm(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(new): ApiJson<NewAlarm>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let alarm = alarms_of(&state)?
        .raise(
            &tenant,
            RaiseAlarm {
                key: new.key,
                severity: new.severity,
                device: new.device,
                message: new.message,
                details: new.details,
                source: "api".into(),
            },
        )
        .await?;
    let status = if alarm.count == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(alarm)).into_response())
}

/// One alarm.
#[utoipa::path(get, path = "/tenants/{tenant}/alarms/{alarm}", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("alarm" = String, Path, description = "Alarm id")),
    responses((status = 200, description = "The alarm", body = serde_json::Value), CommonErrors))]
pub async fn get_alarm(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.get(&tenant, &id).await?).into_response())
}

/// Body of acknowledge and clear (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    /// Recorded in the history (at most 4 KiB).
    #[serde(default)]
    pub note: Option<String>,
}

fn step_body(body: &Bytes) -> Result<StepBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(StepBody::default())
    } else {
        parse_json(body)
    }
}

/// Acknowledges an active alarm (body `{note?}` optional). 409 when it is acknowledged or
/// cleared already; the message says by whom and when.
#[utoipa::path(post, path = "/tenants/{tenant}/alarms/{alarm}/acknowledge", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("alarm" = String, Path, description = "Alarm id")),
    request_body(content = serde_json::Value, description = "`{note?}` (optional)", content_type = "application/json"),
    responses((status = 200, description = "The acknowledged alarm", body = serde_json::Value), CommonErrors))]
pub async fn acknowledge_alarm(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    body: Bytes,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let b = step_body(&body)?;
    let alarm = alarms_of(&state)?
        .acknowledge(&tenant, &id, &c.actor.name, b.note)
        .await?;
    Ok(Json(alarm).into_response())
}

/// Clears an alarm (body `{note?}` optional). 409 when it is cleared already. Raising its key
/// again afterwards opens a new alarm.
#[utoipa::path(post, path = "/tenants/{tenant}/alarms/{alarm}/clear", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("alarm" = String, Path, description = "Alarm id")),
    request_body(content = serde_json::Value, description = "`{note?}` (optional)", content_type = "application/json"),
    responses((status = 200, description = "The cleared alarm", body = serde_json::Value), CommonErrors))]
pub async fn clear_alarm(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    body: Bytes,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let b = step_body(&body)?;
    let alarm = alarms_of(&state)?
        .clear(&tenant, &id, &c.actor.name, b.note)
        .await?;
    Ok(Json(alarm).into_response())
}

/// An alarm's history, oldest first: `raised`, `updated` (re-raised), `acknowledged`,
/// `cleared`, each with the alarm as it was right after, who and when (the last
/// `alarms.history_per_alarm` are kept).
#[utoipa::path(get, path = "/tenants/{tenant}/alarms/{alarm}/history", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("alarm" = String, Path, description = "Alarm id")),
    responses((status = 200, description = "The events", body = Vec<serde_json::Value>), CommonErrors))]
pub async fn alarm_history(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.history(&tenant, &id).await?).into_response())
}

/// Open (not cleared) alarms by severity: `{critical, major, minor, warning, info, total,
/// unacknowledged}`.
#[utoipa::path(get, path = "/tenants/{tenant}/alarms/counts", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The counts", body = serde_json::Value), CommonErrors))]
pub async fn alarm_counts(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.counts(&tenant).await?).into_response())
}

/// Decrements the open-stream count when a stream ends (client gone, or shutdown).
struct StreamSlot;

impl StreamSlot {
    fn claim() -> Option<StreamSlot> {
        OPEN_STREAMS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_ALARM_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tenant's alarm events as Server-Sent Events, from now on: events named `raised`,
/// `updated`, `acknowledged` and `cleared` (data: the history row, alarm included), and
/// `lagged` (data `{"skipped": n}`) when this reader fell behind the bounded buffer — reload
/// the list then. It ends when the hub shuts down. At most 256 streams are open at once (429
/// `too_many_streams`).
#[utoipa::path(get, path = "/tenants/{tenant}/alarms/stream", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "`text/event-stream` of alarm events", content_type = "text/event-stream", body = String),
        (status = 429, description = "Too many open alarm streams", body = crate::error::ErrorBody),
        CommonErrors))]
pub async fn alarm_stream(
    c: Caller,
    State(state): State<ApiState>,
    closing: Option<Extension<Closing>>,
    ApiPath(tenant): ApiPath<String>,
) -> AlarmsResult<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let alarms = alarms_of(&state)?;
    let slot = StreamSlot::claim().ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "{MAX_ALARM_STREAMS} alarm streams are open; close one or poll \
                 GET /api/v1/tenants/{tenant}/alarms instead"
            ),
        )
    })?;
    let sub = alarms.subscribe(&tenant);
    let closing = Box::pin(async move {
        match closing {
            Some(Extension(c)) => c.wait().await,
            None => std::future::pending().await,
        }
    });
    let s = (sub, closing, slot);
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        let (sub, closing, _) = &mut s;
        let item = tokio::select! {
            () = closing.as_mut() => return None,
            item = sub.next() => item?,
        };
        let event = match item {
            StreamItem::Event(e) => serde_json::to_string(&*e)
                .map(|data| Event::default().event(e.kind.as_str()).data(data))
                .unwrap_or_else(|_| Event::default().comment("unserialisable")),
            StreamItem::Lagged(n) => Event::default()
                .event("lagged")
                .data(json!({"skipped": n}).to_string()),
        };
        Some((Ok(event), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The tenant's notification channels, by id (admins only: webhook URLs and headers often
/// carry secrets).
#[utoipa::path(get, path = "/tenants/{tenant}/alarm-channels", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The channels", body = Vec<serde_json::Value>), CommonErrors))]
pub async fn list_channels(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.channels(&tenant)).into_response())
}

/// One channel (admins only, like the list).
#[utoipa::path(get, path = "/tenants/{tenant}/alarm-channels/{channel}", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("channel" = String, Path, description = "Channel id")),
    responses((status = 200, description = "The channel", body = serde_json::Value), CommonErrors))]
pub async fn get_channel(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.channel(&tenant, &id)?).into_response())
}

/// Creates or replaces a channel: `{kind: {webhook: {url, method?, headers?, body?,
/// timeout_ms?, max_attempts?, backoff_ms?}}, min_severity?, events?, rate_limit_s?, enabled?,
/// description?}`. URL, header and body are minijinja templates over `alarm`, `event`,
/// `tenant` and `channel`; one that does not parse answers 400 `invalid_template` with
/// `field` and `line`. 201 when new, 200 when replaced.
#[utoipa::path(put, path = "/tenants/{tenant}/alarm-channels/{channel}", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("channel" = String, Path, description = "Channel id")),
    request_body(content = serde_json::Value, description = "The channel", content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = serde_json::Value),
        (status = 200, description = "Replaced", body = serde_json::Value),
        CommonErrors))]
pub async fn put_channel(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    ApiJson(spec): ApiJson<ChannelSpec>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    let (channel, created) = alarms_of(&state)?.put_channel(&tenant, &id, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(channel)).into_response())
}

/// Deletes a channel with its delivery log.
#[utoipa::path(delete, path = "/tenants/{tenant}/alarm-channels/{channel}", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("channel" = String, Path, description = "Channel id")),
    responses((status = 204, description = "Deleted"), CommonErrors))]
pub async fn delete_channel(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    alarms_of(&state)?.delete_channel(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sends a sample notification (a critical `raised` event of alarm `test`) through the channel
/// now, one attempt, and answers its outcome `{status, attempts, http_status, error, …}` (also
/// recorded in the channel's deliveries). Ignores `enabled`, filters and the rate limit.
#[utoipa::path(post, path = "/tenants/{tenant}/alarm-channels/{channel}/test", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("channel" = String, Path, description = "Channel id")),
    responses((status = 200, description = "The outcome", body = serde_json::Value), CommonErrors))]
pub async fn test_channel(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.test_channel(&tenant, &id).await?).into_response())
}

/// A channel's counters since the hub started and its last deliveries, newest first:
/// `{sent, failed, suppressed, dropped, deliveries: [{at_ms, alarm_id, event, status,
/// attempts, http_status, error, test}]}` (kept in memory, `alarms.deliveries_per_channel`).
#[utoipa::path(get, path = "/tenants/{tenant}/alarm-channels/{channel}/deliveries", tag = "alarms",
    params(("tenant" = String, Path, description = "Tenant id"), ("channel" = String, Path, description = "Channel id")),
    responses((status = 200, description = "Counters and deliveries", body = serde_json::Value), CommonErrors))]
pub async fn channel_deliveries(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> AlarmsResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(alarms_of(&state)?.deliveries(&tenant, &id)?).into_response())
}
