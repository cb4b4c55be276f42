//! `/tenants/{tenant}/devices/{device}/twins/…` and `/tenants/{tenant}/twins…`: device twins
//! (read, patch desired and tags, history, fleet queries, grouped counts, a live change stream).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferrohub_registry::model::Role;
use ferrohub_twins::document::Section;
use ferrohub_twins::service::{GroupCount, QueryPage, TwinChange, TwinWrite, twin_name};
use ferrohub_twins::store::{HistoryEntry, TwinKey};
use ferrohub_twins::{TwinError, Twins};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use crate::ApiState;
use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller, if_match};

impl From<TwinError> for ApiError {
    fn from(e: TwinError) -> ApiError {
        if let TwinError::Store(cause) = &e {
            return ApiError::internal(cause);
        }
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, e.code(), e.to_string())
    }
}

pub(crate) fn twins_of(state: &ApiState) -> Result<Arc<Twins>, ApiError> {
    state.twins.clone().ok_or_else(ApiError::unavailable)
}

fn key(tenant: &str, device: &str, name: &str) -> Result<TwinKey, ApiError> {
    Ok(TwinKey {
        tenant: Arc::from(tenant),
        device: Arc::from(device),
        name: Arc::from(twin_name(name)?),
    })
}

/// Names of a device's twins (`default` first when it exists).
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/twins", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "Twin names", body = Vec<String>), CommonErrors))]
pub async fn list_twins(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    c.registry.device(&c.actor, &tenant, &device).await?;
    let mut names = twins_of(&state)?.names(&tenant, &device).await?;
    names.sort();
    Ok(Json(
        names
            .into_iter()
            .map(|n| if n.is_empty() { "default".into() } else { n })
            .collect(),
    ))
}

/// A twin: desired, reported, tags, delta, per-key acknowledgements, versions and metadata.
/// The default twin is named `default`; it reads as an empty document (version 0) before its
/// first write. The `ETag` header carries the document version for `If-Match`.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/twins/{name}", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("name" = String, Path, description = "Twin name (`default` for the default twin)")),
    responses((status = 200, description = "The twin", body = Value), CommonErrors))]
pub async fn get_twin(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, name)): ApiPath<(String, String, String)>,
) -> ApiResult<Response> {
    c.registry.device(&c.actor, &tenant, &device).await?;
    let view = twins_of(&state)?
        .operator_view(key(&tenant, &device, &name)?)
        .await?;
    Ok(with_etag(view))
}

fn with_etag(view: Value) -> Response {
    let etag = view
        .get("etag")
        .and_then(Value::as_str)
        .and_then(|e| HeaderValue::from_str(e).ok());
    let mut resp = Json(view).into_response();
    if let Some(e) = etag {
        resp.headers_mut().insert(header::ETAG, e);
    }
    resp
}

/// Optimistic concurrency and idempotence of a patch.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PatchParams {
    /// The document version the patch is based on (like `If-Match`); a mismatch answers 409.
    pub version: Option<u64>,
    /// Echoed in the change history.
    pub client_token: Option<String>,
}

async fn patch_section(
    c: Caller,
    state: ApiState,
    headers: HeaderMap,
    (tenant, device, name): (String, String, String),
    params: PatchParams,
    patch: Value,
    section: Section,
) -> ApiResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    c.registry.device(&c.actor, &tenant, &device).await?;
    let expected = match (if_match(&headers, "…/twins/{name}")?, params.version) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "If-Match and ?version= disagree: send one of them",
            ));
        }
        (a, b) => a.or(b),
    };
    let twins = twins_of(&state)?;
    let k = key(&tenant, &device, &name)?;
    twins
        .update(
            k.clone(),
            TwinWrite {
                section,
                patch: Some(patch),
                expected_version: expected,
                client_token: params.client_token.map(|t| t.chars().take(64).collect()),
                actor: format!("operator:{}", c.actor.name),
                rejections: Vec::new(),
                want_documents: false,
            },
        )
        .await?;
    Ok(with_etag(twins.operator_view(k).await?))
}

/// Changes desired state with a JSON Merge Patch (RFC 7396: `null` deletes a key). The device
/// receives the new delta at once if it is connected, else when it next connects; each changed
/// key's acknowledgement becomes `pending` until the device reports the value (`applied`) or
/// rejects it. Send `If-Match` (or `?version=`) to refuse the change if the twin moved on (409).
#[utoipa::path(patch, path = "/tenants/{tenant}/devices/{device}/twins/{name}/desired", tag = "twins",
    request_body(content = Value, description = "A JSON Merge Patch of desired", content_type = "application/json"),
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("name" = String, Path, description = "Twin name (`default` for the default twin)"), PatchParams),
    responses((status = 200, description = "The twin after the change", body = Value), CommonErrors))]
pub async fn patch_desired(
    c: Caller,
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String, String)>,
    ApiQuery(params): ApiQuery<PatchParams>,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<Response> {
    patch_section(c, state, headers, path, params, patch, Section::Desired).await
}

/// Changes the twin's tags (operator-only metadata, never shown to the device) with a JSON Merge
/// Patch.
#[utoipa::path(patch, path = "/tenants/{tenant}/devices/{device}/twins/{name}/tags", tag = "twins",
    request_body(content = Value, description = "A JSON Merge Patch of tags", content_type = "application/json"),
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("name" = String, Path, description = "Twin name (`default` for the default twin)"), PatchParams),
    responses((status = 200, description = "The twin after the change", body = Value), CommonErrors))]
pub async fn patch_tags(
    c: Caller,
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String, String)>,
    ApiQuery(params): ApiQuery<PatchParams>,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<Response> {
    patch_section(c, state, headers, path, params, patch, Section::Tags).await
}

/// A page of history.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// Entries with a version above this (default 0: from the oldest kept).
    pub after: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// The twin's change history in version order: every accepted change (who, when, which section,
/// the patch), not coalesced. The last `twins.history_per_twin` changes are kept (and none older
/// than `twins.history_retention_days`).
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/twins/{name}/history", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("name" = String, Path, description = "Twin name (`default` for the default twin)"), HistoryParams),
    responses((status = 200, description = "Changes, oldest first", body = Vec<HistoryEntry>), CommonErrors))]
pub async fn twin_history(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, name)): ApiPath<(String, String, String)>,
    ApiQuery(p): ApiQuery<HistoryParams>,
) -> ApiResult<Json<Vec<HistoryEntry>>> {
    c.registry.device(&c.actor, &tenant, &device).await?;
    Ok(Json(
        twins_of(&state)?
            .history(
                key(&tenant, &device, &name)?,
                p.after.unwrap_or(0),
                p.limit.unwrap_or(100),
            )
            .await?,
    ))
}

/// A fleet query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueryParams {
    /// The filter, e.g. `reported.firmware != desired.firmware AND tags.site = 'berlin'`
    /// (see docs/twins.md for the language).
    #[serde(rename = "where")]
    #[param(rename = "where")]
    pub filter: Option<String>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// Twins of the tenant matching a filter, ordered by device and twin name, a page at a time.
#[utoipa::path(get, path = "/tenants/{tenant}/twins", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), QueryParams),
    responses((status = 200, description = "A page of twins", body = QueryPage), CommonErrors))]
pub async fn query_twins(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<QueryParams>,
) -> ApiResult<Json<QueryPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(
        twins_of(&state)?
            .query(
                &tenant,
                q.filter.as_deref(),
                q.cursor.as_deref(),
                q.limit.unwrap_or(100),
            )
            .await?,
    ))
}

/// A grouped count.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CountParams {
    /// The field to group by, e.g. `reported.fw_version`.
    pub by: String,
    /// Only twins matching this filter.
    #[serde(rename = "where")]
    #[param(rename = "where")]
    pub filter: Option<String>,
    /// Most groups returned, largest first (default 100).
    pub limit: Option<usize>,
}

/// Counts twins grouped by a field's value (e.g. how many devices run each firmware).
#[utoipa::path(get, path = "/tenants/{tenant}/twins/counts", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), CountParams),
    responses((status = 200, description = "Groups, largest first", body = Vec<GroupCount>), CommonErrors))]
pub async fn count_twins(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(q): ApiQuery<CountParams>,
) -> ApiResult<Json<Vec<GroupCount>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(
        twins_of(&state)?
            .counts(&tenant, &q.by, q.filter.as_deref(), q.limit.unwrap_or(100))
            .await?,
    ))
}

/// What to watch.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchParams {
    /// Only this device's twins.
    pub device: Option<String>,
}

/// A live stream (Server-Sent Events) of the tenant's twin changes: one `change` event per
/// accepted change (the same record as the history, with `deviceId` and `name`). A client that
/// falls behind receives a `lagged` event with how many changes it missed, and catches up from
/// the history.
#[utoipa::path(get, path = "/tenants/{tenant}/twins/watch", tag = "twins",
    params(("tenant" = String, Path, description = "Tenant id"), WatchParams),
    responses((status = 200, description = "text/event-stream of `change` events", body = TwinChange, content_type = "text/event-stream"), CommonErrors))]
pub async fn watch_twins(
    c: Caller,
    State(state): State<ApiState>,
    closing: Option<axum::extract::Extension<crate::Closing>>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(p): ApiQuery<WatchParams>,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let rx = twins_of(&state)?.watch();
    let tenant: Arc<str> = Arc::from(tenant.as_str());
    let device = p.device;
    // Ends when the server shuts down, so that graceful shutdown does not wait for watchers (the
    // console keeps one open per device page).
    let closing: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match closing {
        Some(axum::extract::Extension(c)) => Box::pin(c.wait()),
        None => Box::pin(std::future::pending()),
    };
    let stream = futures_util::stream::unfold((rx, closing), move |(mut rx, mut closing)| {
        let (tenant, device) = (tenant.clone(), device.clone());
        async move {
            loop {
                let received = tokio::select! {
                    () = closing.as_mut() => return None,
                    r = rx.recv() => r,
                };
                match received {
                    Ok(change) => {
                        if change.tenant != tenant
                            || device.as_deref().is_some_and(|d| d != change.device_id)
                        {
                            continue;
                        }
                        let Ok(data) = serde_json::to_string(&change) else {
                            continue;
                        };
                        return Some((
                            Ok(Event::default().event("change").data(data)),
                            (rx, closing),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        return Some((
                            Ok(Event::default().event("lagged").data(n.to_string())),
                            (rx, closing),
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
