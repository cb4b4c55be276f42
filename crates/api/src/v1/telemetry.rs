//! `/tenants/{tenant}/devices/{device}/telemetry…` and `/tenants/{tenant}/telemetry/…`: device
//! telemetry over HTTP — writes of device payloads, a device's series, raw points, bucketed
//! aggregates, fleet snapshots of latest values, fleet aggregates (whole selection, per device or
//! per tag value), and the tenant's telemetry settings (retention, topics, payload format).
//!
//! Nothing that scans runs on the async runtime: queries read part files and walk the engine's
//! catalog (series listings, fleet snapshots), so they run on blocking threads
//! (`tokio::task::spawn_blocking`), and so does decoding a write body larger than
//! [`INLINE_DECODE_BYTES`]. Times in query strings are RFC 3339 (UTC), milliseconds since
//! the Unix epoch, `now`, or a time ago such as `-15m`; bucket widths are durations (`30s`, `15m`,
//! `1h`, `1d`) or milliseconds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use ferrohub_registry::model::{Device, DeviceListing, DeviceQuery, Role, SortKey};
use ferrohub_telemetry::decode::PayloadFormat;
use ferrohub_telemetry::export::{ExportFormat, ExportRequest};
use ferrohub_telemetry::service::{Telemetry, TelemetryError, TenantSettings, WriteReport};
use ferrohub_tsdb::query::{MAX_BUCKETS, MAX_RAW_LIMIT};
use ferrohub_tsdb::{Agg, AggFn, AggregateQuery, RawQuery, SeriesGroup, TsdbError};
use ferrohub_types::TenantId;
use ferrohub_types::id::{ID_RULE, is_valid_id};
use ferrohub_types::telemetry::{Value as TsValue, ValueKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Body, Caller};

/// Largest device payload accepted by `POST …/devices/{device}/telemetry`.
pub const WRITE_BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Write bodies up to this size are decoded on the request's task; larger ones (and gzip bodies)
/// on a blocking thread, so that a large write never holds up the runtime's other requests.
pub const INLINE_DECODE_BYTES: usize = 64 * 1024;
/// Default page size of raw points.
pub const DEFAULT_RAW_LIMIT: usize = 1000;
/// Default page size of a fleet snapshot.
pub const DEFAULT_FLEET_LIMIT: usize = 1000;
/// Largest page size of a fleet snapshot.
pub const MAX_FLEET_LIMIT: usize = 10_000;
/// Most devices a fleet selection may hold.
pub const MAX_SELECTION: usize = 100_000;
/// Longest retention a tenant may set, in days (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;
/// The default query window: the last 24 hours.
const DEFAULT_WINDOW_MS: i64 = 24 * 3_600_000;
const DAY_MS: i64 = 86_400_000;

// ---- errors and helpers --------------------------------------------------------------------

impl From<TsdbError> for ApiError {
    fn from(e: TsdbError) -> ApiError {
        match e {
            TsdbError::BadQuery(m) => ApiError::invalid(m),
            TsdbError::KindConflict { .. } => ApiError::invalid(e.to_string()),
            TsdbError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the telemetry engine is shutting down; retry once the hub is back",
            ),
            other => ApiError::internal(&other),
        }
    }
}

impl From<TelemetryError> for ApiError {
    fn from(e: TelemetryError) -> ApiError {
        match e {
            TelemetryError::BadRequest(m) => ApiError::invalid(m),
            TelemetryError::Engine(e) => e.into(),
            other => ApiError::internal(&other),
        }
    }
}

/// 503 `unavailable`: telemetry is disabled on this hub.
pub fn telemetry_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "telemetry is disabled on this hub: set `[telemetry] enabled = true` in the hub's \
         configuration and restart it",
    )
}

pub(crate) fn telemetry_of(state: &ApiState) -> Result<Arc<Telemetry>, ApiError> {
    state.telemetry.clone().ok_or_else(telemetry_unavailable)
}

/// Runs a blocking engine call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TsdbError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(ApiError::from)
}

/// Runs the CPU work of decoding a write body of `len` bytes: on the request's task when the body
/// is small (at most [`INLINE_DECODE_BYTES`]: cheaper than a thread hand-off), else on a blocking
/// thread.
pub(crate) async fn decode_work<T: Send + 'static>(
    len: usize,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    if len <= INLINE_DECODE_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(&e))?
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ts: i64) -> String {
    let t = if ts >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(ts.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(ts.unsigned_abs()))
    };
    match t {
        Some(t) => humantime::format_rfc3339_millis(t).to_string(),
        None => ts.to_string(),
    }
}

/// A time of a query string: RFC 3339 (`2026-01-31T08:00:00Z`), milliseconds since the epoch,
/// `now`, or a time ago (`-15m`, `-1h`, `-7d`).
pub fn parse_time(name: &str, v: &str, now: i64) -> Result<i64, ApiError> {
    let v = v.trim();
    if v == "now" {
        return Ok(now);
    }
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(ago) = v.strip_prefix('-')
        && let Ok(d) = humantime::parse_duration(ago)
    {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now.saturating_sub(ms));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        let ms = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        return Ok(ms);
    }
    Err(ApiError::invalid(format!(
        "{name}={v:?} is not a time: give an RFC 3339 UTC time (2026-01-31T08:00:00Z), \
         milliseconds since the epoch, `now`, or a time ago such as -15m, -1h or -7d"
    )))
}

/// A bucket width: a duration (`30s`, `15m`, `1h`, `1d`) or milliseconds.
pub fn parse_bucket(v: &str) -> Result<i64, ApiError> {
    let v = v.trim();
    let ms = match v.parse::<i64>() {
        Ok(ms) => Some(ms),
        Err(_) => humantime::parse_duration(v)
            .ok()
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    };
    match ms {
        Some(ms) if ms >= 1 => Ok(ms),
        _ => Err(ApiError::invalid(format!(
            "bucket={v:?} is not a bucket width: give a duration of at least 1 ms such as 30s, \
             15m, 1h or 1d (or milliseconds)"
        ))),
    }
}

/// `fn=avg,max` (default, empty or `all`: every function), in API order without repeats.
pub fn parse_fns(v: Option<&str>) -> Result<Vec<AggFn>, ApiError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty() && *v != "all") else {
        return Ok(AggFn::ALL.to_vec());
    };
    let mut wanted = BTreeSet::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let f: AggFn = name.parse().map_err(|e: TsdbError| {
            ApiError::invalid(format!("fn={v:?}: {e} (separated by commas)"))
        })?;
        wanted.insert(f.as_str());
    }
    Ok(AggFn::ALL
        .into_iter()
        .filter(|f| wanted.contains(f.as_str()))
        .collect())
}

/// The time range of a query: `[from, to)`. Defaults: the last 24 hours, up to the newest
/// timestamp the hub accepts (now plus `future_skew_secs`).
fn range(tm: &Telemetry, from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), ApiError> {
    let now = now_ms();
    let skew = i64::try_from(tm.config().future_skew_secs.saturating_mul(1000)).unwrap_or(0);
    let to = match to {
        Some(v) => parse_time("to", v, now)?,
        None => now.saturating_add(skew).saturating_add(1),
    };
    let from = match from {
        Some(v) => parse_time("from", v, now)?,
        None => now.saturating_sub(DEFAULT_WINDOW_MS),
    };
    if from >= to {
        return Err(ApiError::invalid(format!(
            "the time range is empty: from ({}) must be before to ({}); `to` is exclusive",
            rfc3339(from),
            rfc3339(to)
        )));
    }
    Ok((from, to))
}

fn json_value(v: &TsValue) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

// ---- response shapes -----------------------------------------------------------------------

/// One of a device's series.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesView {
    /// Metric name.
    pub metric: String,
    /// Kind of its values: `numeric`, `bool` or `string`.
    pub kind: String,
    /// Timestamp of the latest point, ms since the epoch.
    pub latest_ts: Option<i64>,
    /// The same as RFC 3339.
    pub latest_time: Option<String>,
    /// Value of the latest point.
    #[schema(value_type = Object)]
    pub latest: Value,
}

/// One raw point.
#[derive(Debug, Serialize, ToSchema)]
pub struct PointView {
    /// Timestamp, ms since the epoch.
    pub ts: i64,
    /// The same as RFC 3339 (UTC, milliseconds).
    pub time: String,
    /// The value: a number, a boolean or a string.
    #[schema(value_type = Object)]
    pub value: Value,
}

/// A page of raw points.
#[derive(Debug, Serialize, ToSchema)]
pub struct PointsPage {
    /// Points in the requested order.
    pub points: Vec<PointView>,
    /// Pass as `cursor` (with the same parameters) for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// One bucket of an aggregate; only the requested functions are present.
#[derive(Debug, Serialize, ToSchema)]
pub struct BucketView {
    /// Start of the bucket, ms since the epoch (buckets are aligned to the epoch).
    pub start: i64,
    /// The same as RFC 3339.
    pub time: String,
    /// Mean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<f64>,
    /// Minimum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Sum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
    /// Number of points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Value of the earliest point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<f64>,
    /// Value of the latest point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<f64>,
}

impl BucketView {
    fn new(start: i64, a: &Agg, fns: &[AggFn]) -> BucketView {
        let mut b = BucketView {
            start,
            time: rfc3339(start),
            avg: None,
            min: None,
            max: None,
            sum: None,
            count: None,
            first: None,
            last: None,
        };
        for f in fns {
            let v = Some(a.get(*f));
            match f {
                AggFn::Avg => b.avg = v,
                AggFn::Min => b.min = v,
                AggFn::Max => b.max = v,
                AggFn::Sum => b.sum = v,
                AggFn::Count => b.count = Some(a.count),
                AggFn::First => b.first = v,
                AggFn::Last => b.last = v,
            }
        }
        b
    }
}

/// A device's bucketed aggregate.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateView {
    /// Bucket width, ms.
    pub bucket_ms: i64,
    /// Start of the range (inclusive), ms.
    pub from: i64,
    /// End of the range (exclusive), ms.
    pub to: i64,
    /// Non-empty buckets, oldest first.
    pub buckets: Vec<BucketView>,
}

/// The latest point of one device in a fleet snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct LatestView {
    /// Device id.
    pub device: String,
    /// Timestamp, ms (null: the device has no such series).
    pub ts: Option<i64>,
    /// The same as RFC 3339.
    pub time: Option<String>,
    /// The value (null: no such series).
    #[schema(value_type = Object)]
    pub value: Value,
}

/// A page of a fleet snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct LatestPage {
    /// The metric.
    pub metric: String,
    /// Devices sorted by id.
    pub items: Vec<LatestView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// One group of a fleet aggregate.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupView {
    /// `all`, the device id (`by=device`) or the tag value (`by=tag:<key>`; null for devices
    /// without the tag).
    pub group: Option<String>,
    /// Series aggregated in the group (devices that have the metric with numeric or boolean
    /// values).
    pub series: usize,
    /// Non-empty buckets, oldest first.
    pub buckets: Vec<BucketView>,
}

/// A fleet aggregate.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetAggregateView {
    /// The metric.
    pub metric: String,
    /// Bucket width, ms.
    pub bucket_ms: i64,
    /// Start of the range (inclusive), ms.
    pub from: i64,
    /// End of the range (exclusive), ms.
    pub to: i64,
    /// The groups.
    pub groups: Vec<GroupView>,
}

// ---- writes --------------------------------------------------------------------------------

/// Writes a device payload as telemetry (operator), with the same formats and rules as MQTT:
/// JSON, CBOR or MessagePack by `Content-Type` (`application/json`, `application/cbor`,
/// `application/msgpack`; otherwise the tenant's `format`, by default detected), the same
/// payload shapes, and the same timestamp rules. Answers once the points are durable; a payload
/// that cannot be used writes nothing (400). Points of a kind their series does not hold are
/// refused one by one (listed in `rejected`). At most 4 MiB (decoded on a blocking thread beyond
/// 64 KiB). The device must be registered; an id that breaks the registry's rule (1-128
/// characters of `A-Z a-z 0-9 . _ : -`) is refused (400) before the registry is asked. Devices
/// that are not in the registry (e.g. Telegraf hosts) write with `POST /api/v2/write`.
#[utoipa::path(post, path = "/tenants/{tenant}/devices/{device}/telemetry", tag = "telemetry",
    request_body(content = Value, description = "A device payload, e.g. {\"temp\": 21.5, \"ts\": 1767225600000}",
        content_type = "application/json"),
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "Points stored", body = WriteReport),
        (status = 413, description = "The body is over 4 MiB", body = crate::error::ErrorBody), CommonErrors))]
pub async fn write_device(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    headers: HeaderMap,
    Body(payload): Body,
) -> ApiResult<Json<WriteReport>> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    if !is_valid_id(&device) {
        return Err(ApiError::invalid(format!(
            "device id {device:?} is not valid: device ids are {ID_RULE}"
        )));
    }
    c.registry.device(&c.actor, &tenant, &device).await?;
    let tm = telemetry_of(&state)?;
    let tid = TenantId::new(&tenant);
    let format = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(PayloadFormat::from_content_type)
        .or(tm.settings(&tid).format)
        .unwrap_or(tm.config().format);
    let decoder = tm.clone();
    let points = decode_work(payload.len(), move || {
        decoder
            .payload_points(&device, &payload, format)
            .map_err(ApiError::from)
    })
    .await?;
    Ok(Json(tm.write_points(&tid, points).await?))
}

// ---- a device's series ---------------------------------------------------------------------

/// A device's series: metric, kind, and latest point (from memory). A device that was
/// decommissioned with `telemetry_on_decommission = keep`, or that writes through
/// `/api/v2/write` without being registered, is listed too.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/telemetry", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "Series sorted by metric", body = Vec<SeriesView>), CommonErrors))]
pub async fn list_device_series(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
) -> ApiResult<Json<Vec<SeriesView>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let engine = tm.engine().clone();
    let tid = TenantId::new(&tenant);
    let series = blocking(move || Ok(engine.list_series(&tid, Some(&device)))).await?;
    Ok(Json(
        series
            .into_iter()
            .map(|s| SeriesView {
                metric: s.metric,
                kind: s.kind.as_str().into(),
                latest_time: s.latest_ts.map(rfc3339),
                latest_ts: s.latest_ts,
                latest: s.latest.as_ref().map_or(Value::Null, json_value),
            })
            .collect(),
    ))
}

/// A page of raw points.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RawParams {
    /// Start (inclusive): RFC 3339, ms since the epoch, `now`, or a time ago (`-15m`).
    /// Default: 24 hours ago.
    pub from: Option<String>,
    /// End (exclusive), same forms. Default: now (plus the accepted clock skew of devices).
    pub to: Option<String>,
    /// Page size, 1 to 100000 (default 1000).
    pub limit: Option<usize>,
    /// `asc` (default: oldest first) or `desc` (newest first).
    pub order: Option<String>,
    /// `next_cursor` of the previous page (with the same other parameters).
    pub cursor: Option<String>,
}

/// Raw points of one series, a page at a time. Metric names may contain dots, braces and other
/// characters: percent-encode the path segment (`cpu.usage%7Bcpu%3Dcpu0%7D`).
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/telemetry/{metric}", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("metric" = String, Path, description = "Metric name (percent-encoded)"), RawParams),
    responses((status = 200, description = "A page of points", body = PointsPage), CommonErrors))]
pub async fn raw_points(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, metric)): ApiPath<(String, String, String)>,
    ApiQuery(p): ApiQuery<RawParams>,
) -> ApiResult<Json<PointsPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let (mut from, mut to) = range(&tm, p.from.as_deref(), p.to.as_deref())?;
    let limit = p.limit.unwrap_or(DEFAULT_RAW_LIMIT);
    if !(1..=MAX_RAW_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit={limit}: give a page size from 1 to {MAX_RAW_LIMIT}"
        )));
    }
    let descending = match p.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(ApiError::invalid(format!("order={o:?}: use asc or desc"))),
    };
    if let Some(cur) = p.cursor.as_deref().filter(|c| !c.is_empty()) {
        let at: i64 = cur.parse().map_err(|_| {
            ApiError::invalid(format!(
                "cursor={cur:?} is not a cursor of this route: pass the next_cursor of the \
                 previous page"
            ))
        })?;
        if descending {
            to = to.min(at);
        } else {
            from = from.max(at);
        }
        if from >= to {
            return Ok(Json(PointsPage {
                points: Vec::new(),
                next_cursor: None,
            }));
        }
    }
    let engine = tm.engine().clone();
    let q = RawQuery {
        device,
        metric,
        from,
        to,
        limit,
        descending,
    };
    let tid = TenantId::new(&tenant);
    let page = blocking(move || engine.raw(&tid, &q)).await?;
    Ok(Json(PointsPage {
        points: page
            .points
            .iter()
            .map(|(ts, v)| PointView {
                ts: *ts,
                time: rfc3339(*ts),
                value: json_value(v),
            })
            .collect(),
        next_cursor: page.next.map(|n| n.to_string()),
    }))
}

/// A bucketed aggregate.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AggregateParams {
    /// Start (inclusive): RFC 3339, ms since the epoch, `now`, or a time ago (`-7d`). Default:
    /// 24 hours ago.
    pub from: Option<String>,
    /// End (exclusive), same forms. Default: now.
    pub to: Option<String>,
    /// Bucket width (required): a duration such as `30s`, `15m`, `1h`, `1d`, or milliseconds.
    /// Buckets are aligned to the Unix epoch (UTC).
    pub bucket: Option<String>,
    /// Functions, separated by commas, from avg, min, max, sum, count, first, last (default:
    /// all).
    #[serde(rename = "fn")]
    #[param(rename = "fn")]
    pub fns: Option<String>,
}

/// Bucketed aggregates of one series (booleans count as 0 and 1; string series cannot be
/// aggregated). Buckets whose width is a multiple of a minute or an hour are served from
/// precomputed rollups; results always equal the aggregate of the raw points. At most 1,000,000
/// buckets.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/telemetry/{metric}/aggregate", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("metric" = String, Path, description = "Metric name (percent-encoded)"), AggregateParams),
    responses((status = 200, description = "Non-empty buckets", body = AggregateView), CommonErrors))]
pub async fn aggregate_points(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, metric)): ApiPath<(String, String, String)>,
    ApiQuery(p): ApiQuery<AggregateParams>,
) -> ApiResult<Json<AggregateView>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let (from, to) = range(&tm, p.from.as_deref(), p.to.as_deref())?;
    let bucket_ms = parse_bucket(p.bucket.as_deref().ok_or_else(|| {
        ApiError::invalid("bucket is required: the bucket width, e.g. bucket=1h (or 15m, 1d)")
    })?)?;
    let fns = parse_fns(p.fns.as_deref())?;
    let tid = TenantId::new(&tenant);
    let engine = tm.engine().clone();
    let strings = format!(
        "metric {metric:?} of device {device} holds strings, which cannot be aggregated: read \
         its points instead (GET …/telemetry/{{metric}})"
    );
    let series_device = device.clone();
    let q = AggregateQuery {
        metric,
        groups: vec![SeriesGroup {
            name: device.clone(),
            devices: vec![device],
        }],
        from,
        to,
        bucket_ms,
        fns: fns.clone(),
    };
    let groups = blocking(move || {
        if engine
            .list_series(&tid, Some(&series_device))
            .iter()
            .any(|s| s.metric == q.metric && s.kind == ValueKind::Str)
        {
            return Err(TsdbError::BadQuery(strings));
        }
        engine.aggregate(&tid, &q)
    })
    .await?;
    let buckets = groups
        .into_iter()
        .next()
        .map(|g| g.buckets)
        .unwrap_or_default();
    Ok(Json(AggregateView {
        bucket_ms,
        from,
        to,
        buckets: buckets
            .iter()
            .map(|(start, a)| BucketView::new(*start, a, &fns))
            .collect(),
    }))
}

// ---- fleet ---------------------------------------------------------------------------------

/// Which devices a fleet query covers.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Selection {
    /// Members of this static or dynamic group.
    pub group: Option<String>,
    /// Devices with all these tags.
    pub tags: BTreeMap<String, String>,
    /// Devices of this type.
    pub device_type: Option<String>,
    /// Only these devices.
    pub devices: Option<BTreeSet<String>>,
}

impl Selection {
    fn uses_registry(&self) -> bool {
        self.group.is_some() || !self.tags.is_empty() || self.device_type.is_some()
    }
}

/// The query string of a fleet route, parsed by hand (`tag` repeats).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FleetParams {
    /// The metric (required).
    pub metric: String,
    /// The devices.
    pub selection: Selection,
    /// Other parameters by name.
    pub rest: BTreeMap<String, String>,
}

/// Parses `metric=…&group=…&tag=k:v&type=…&devices=a,b` and the route's own `extra` parameters.
pub fn parse_fleet(pairs: Vec<(String, String)>, extra: &[&str]) -> Result<FleetParams, ApiError> {
    let mut p = FleetParams::default();
    let mut metric = None;
    for (k, v) in pairs {
        match k.as_str() {
            "metric" => metric = Some(v),
            "group" => p.selection.group = Some(v).filter(|g| !g.is_empty()),
            "type" => p.selection.device_type = Some(v).filter(|t| !t.is_empty()),
            "tag" => {
                let (key, value) = v.split_once(':').ok_or_else(|| {
                    ApiError::invalid(format!("tag={v:?}: write the tag filter as key:value"))
                })?;
                if p.selection.tags.get(key).is_some_and(|x| x != value) {
                    return Err(ApiError::invalid(format!(
                        "tag {key} is filtered on twice with different values; no device can match"
                    )));
                }
                p.selection.tags.insert(key.into(), value.into());
            }
            "devices" => {
                let set = p.selection.devices.get_or_insert_with(BTreeSet::new);
                set.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|d| !d.is_empty())
                        .map(String::from),
                );
            }
            other if extra.contains(&other) => {
                p.rest.insert(k, v);
            }
            other => {
                let mut known = vec!["metric", "group", "tag", "type", "devices"];
                known.extend_from_slice(extra);
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?}: the parameters are {}",
                    known.join(", ")
                )));
            }
        }
    }
    p.metric = metric
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("metric is required: ?metric=<name> (percent-encoded)"))?;
    Ok(p)
}

fn query_pairs(parts: &Parts) -> Result<Vec<(String, String)>, ApiError> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::invalid(format!("the query string is not valid: {}", e.body_text())))
}

/// The query string of `GET /tenants/{tenant}/telemetry/latest`.
pub struct LatestQuery(pub FleetParams);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LatestQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parse_fleet(query_pairs(parts)?, &["limit", "cursor"]).map(LatestQuery)
    }
}

/// The query string of `GET /tenants/{tenant}/telemetry/aggregate`.
pub struct FleetAggregateQuery(pub FleetParams);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for FleetAggregateQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parse_fleet(query_pairs(parts)?, &["from", "to", "bucket", "fn", "by"])
            .map(FleetAggregateQuery)
    }
}

/// Registry devices per page of a listing.
const REGISTRY_PAGE: u32 = 1000;

fn selection_too_large() -> ApiError {
    ApiError::invalid(format!(
        "the selection holds more than {MAX_SELECTION} devices: narrow it with group, tag, type \
         or devices"
    ))
}

/// Walks a registry listing in id order, a page at a time, handing each device to `visit`
/// (which keeps what it needs: only one page of devices is in memory) until it breaks or the
/// listing ends.
async fn each_registry_device(
    c: &Caller,
    tenant: &str,
    query: DeviceQuery,
    group: Option<String>,
    mut visit: impl FnMut(Device) -> ApiResult<ControlFlow<()>>,
) -> ApiResult<()> {
    let mut cursor = None;
    loop {
        let page = c
            .registry
            .list_devices(
                &c.actor,
                tenant,
                DeviceListing {
                    query: query.clone(),
                    group: group.clone(),
                    sort: SortKey::Id,
                    descending: false,
                    limit: REGISTRY_PAGE,
                    cursor,
                },
            )
            .await?;
        for d in page.items {
            if visit(d)?.is_break() {
                return Ok(());
            }
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// A device of a selection, with the value of the grouping tag.
struct Member {
    device: String,
    tag: Option<String>,
}

/// The devices of a selection, sorted by id: the registry's devices matching group/tag/type
/// (intersected with `devices` when given), else the `devices` list, else every device that has
/// `metric`. With `tag_key`, each device's value of that registry tag.
///
/// Memory is bounded by the selection ([`MAX_SELECTION`] members at most: beyond, 400), never by
/// the size of the registry: registry listings are walked a page at a time, keeping only the id
/// and the grouping tag of the devices that belong to the selection.
async fn resolve(
    c: &Caller,
    tm: &Telemetry,
    tenant: &str,
    sel: &Selection,
    metric: &str,
    tag_key: Option<&str>,
) -> ApiResult<Vec<Member>> {
    if sel.uses_registry() {
        let query = DeviceQuery {
            tags: sel.tags.clone(),
            device_type: sel.device_type.clone(),
            ..DeviceQuery::default()
        };
        // With a device list, the listing (in id order) can stop after its largest id.
        let last = sel.devices.as_ref().and_then(|only| only.last());
        let mut members: Vec<Member> = Vec::new();
        each_registry_device(c, tenant, query, sel.group.clone(), |d| {
            if last.is_some_and(|last| d.id.as_str() > last.as_str()) {
                return Ok(ControlFlow::Break(()));
            }
            if sel.devices.as_ref().is_none_or(|only| only.contains(&d.id)) {
                if members.len() >= MAX_SELECTION {
                    return Err(selection_too_large());
                }
                members.push(Member {
                    tag: tag_key.and_then(|k| d.tags.get(k).cloned()),
                    device: d.id,
                });
            }
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        members.sort_by(|a, b| a.device.cmp(&b.device));
        return Ok(members);
    }
    let ids: BTreeSet<String> = match &sel.devices {
        Some(only) => only.clone(),
        None => {
            let engine = tm.engine().clone();
            let (tid, metric) = (TenantId::new(tenant), metric.to_owned());
            blocking(move || {
                Ok(engine
                    .list_series(&tid, None)
                    .into_iter()
                    .filter(|s| s.metric == metric)
                    .map(|s| s.device)
                    .collect())
            })
            .await?
        }
    };
    if ids.len() > MAX_SELECTION {
        return Err(selection_too_large());
    }
    // The grouping tag of the selected devices that are in the registry (a device written over
    // line protocol may not be): the registry is walked in id order up to the largest selected
    // id, keeping only the selected devices that have the tag.
    let mut tags: BTreeMap<String, String> = BTreeMap::new();
    if let (Some(key), Some(last)) = (tag_key, ids.last()) {
        each_registry_device(c, tenant, DeviceQuery::default(), None, |mut d| {
            if d.id.as_str() > last.as_str() {
                return Ok(ControlFlow::Break(()));
            }
            if ids.contains(&d.id)
                && let Some(v) = d.tags.remove(key)
            {
                tags.insert(d.id, v);
            }
            Ok(ControlFlow::Continue(()))
        })
        .await?;
    }
    Ok(ids
        .into_iter()
        .map(|device| Member {
            tag: tags.remove(&device),
            device,
        })
        .collect())
}

/// A fleet snapshot: the latest value of `metric` for every device of a selection, sorted by
/// device id, a page at a time (from memory: cheap). Selection (combinable; all must match):
/// `group` (a static or dynamic registry group), `tag=key:value` (repeatable), `type` (device
/// type), `devices=a,b,c`. Without group, tag or type, `devices` lists the devices; without any
/// selection, every device that has the metric. Devices of the selection without the metric
/// are listed with `ts`, `time` and `value` null.
#[utoipa::path(get, path = "/tenants/{tenant}/telemetry/latest", tag = "telemetry",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("metric" = String, Query, description = "The metric (required)"),
        ("group" = Option<String>, Query, description = "Members of this static or dynamic group"),
        ("tag" = Option<Vec<String>>, Query, style = Form, explode,
            description = "Registry tag filter `key:value`; repeat it for several (all must match)"),
        ("type" = Option<String>, Query, description = "Device type"),
        ("devices" = Option<String>, Query, description = "Device ids separated by commas"),
        ("limit" = Option<usize>, Query, description = "Page size, 1 to 10000 (default 1000)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page (a device id)"),
    ),
    responses((status = 200, description = "A page of latest points", body = LatestPage), CommonErrors))]
pub async fn fleet_latest(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    LatestQuery(p): LatestQuery,
) -> ApiResult<Json<LatestPage>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let limit = match p.rest.get("limit") {
        None => DEFAULT_FLEET_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_FLEET_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "limit={v:?}: give a page size from 1 to {MAX_FLEET_LIMIT}"
                ))
            })?,
    };
    let cursor = p.rest.get("cursor").filter(|c| !c.is_empty());
    let members = resolve(&c, &tm, &tenant, &p.selection, &p.metric, None).await?;
    let mut page: Vec<String> = members
        .into_iter()
        .map(|m| m.device)
        .filter(|d| cursor.is_none_or(|c| d.as_str() > c.as_str()))
        .take(limit + 1)
        .collect();
    let next_cursor = if page.len() > limit {
        page.truncate(limit);
        page.last().cloned()
    } else {
        None
    };
    let engine = tm.engine().clone();
    let (tid, metric) = (TenantId::new(&tenant), p.metric.clone());
    let latest = blocking(move || Ok(engine.latest(&tid, &page, &metric))).await?;
    Ok(Json(LatestPage {
        metric: p.metric,
        items: latest
            .into_iter()
            .map(|l| LatestView {
                device: l.device,
                time: l.ts.map(rfc3339),
                ts: l.ts,
                value: l.value.as_ref().map_or(Value::Null, json_value),
            })
            .collect(),
        next_cursor,
    }))
}

/// How a fleet aggregate groups devices.
#[derive(Debug, Clone, PartialEq, Eq)]
enum By {
    All,
    Device,
    Tag(String),
}

fn parse_by(v: Option<&String>) -> Result<By, ApiError> {
    match v.map(|s| s.trim()) {
        None | Some("") | Some("all") => Ok(By::All),
        Some("device") => Ok(By::Device),
        Some(t) => match t.strip_prefix("tag:") {
            Some(key) if !key.is_empty() => Ok(By::Tag(key.into())),
            _ => Err(ApiError::invalid(format!(
                "by={t:?}: group by `device`, by `tag:<key>` (a registry tag, e.g. tag:site), or \
                 leave it out for one group `all`"
            ))),
        },
    }
}

/// Bucketed aggregates of `metric` over a selection of devices (the same selection as
/// `…/telemetry/latest`): one group `all` (default), one per device (`by=device`, devices that
/// have the metric), or one per value of a registry tag (`by=tag:<key>`; devices without the tag
/// form the group null). At most 1,000,000 buckets over all groups (400 beyond: widen the bucket
/// or narrow the range).
#[utoipa::path(get, path = "/tenants/{tenant}/telemetry/aggregate", tag = "telemetry",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("metric" = String, Query, description = "The metric (required)"),
        ("bucket" = String, Query, description = "Bucket width (required): 30s, 15m, 1h, 1d, or milliseconds"),
        ("from" = Option<String>, Query, description = "Start (inclusive): RFC 3339, ms, `now` or a time ago (-7d); default 24 hours ago"),
        ("to" = Option<String>, Query, description = "End (exclusive), same forms; default now"),
        ("fn" = Option<String>, Query, description = "Functions separated by commas: avg, min, max, sum, count, first, last (default all)"),
        ("by" = Option<String>, Query, description = "`device`, `tag:<key>`, or absent for one group `all`"),
        ("group" = Option<String>, Query, description = "Members of this static or dynamic group"),
        ("tag" = Option<Vec<String>>, Query, style = Form, explode,
            description = "Registry tag filter `key:value`; repeat it for several (all must match)"),
        ("type" = Option<String>, Query, description = "Device type"),
        ("devices" = Option<String>, Query, description = "Device ids separated by commas"),
    ),
    responses((status = 200, description = "Buckets per group", body = FleetAggregateView), CommonErrors))]
pub async fn fleet_aggregate(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    FleetAggregateQuery(p): FleetAggregateQuery,
) -> ApiResult<Json<FleetAggregateView>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let (from, to) = range(
        &tm,
        p.rest.get("from").map(String::as_str),
        p.rest.get("to").map(String::as_str),
    )?;
    let bucket_ms = parse_bucket(p.rest.get("bucket").ok_or_else(|| {
        ApiError::invalid("bucket is required: the bucket width, e.g. bucket=1h (or 15m, 1d)")
    })?)?;
    let fns = parse_fns(p.rest.get("fn").map(String::as_str))?;
    let by = parse_by(p.rest.get("by"))?;
    let tag_key = match &by {
        By::Tag(k) => Some(k.as_str()),
        _ => None,
    };
    let members = resolve(&c, &tm, &tenant, &p.selection, &p.metric, tag_key).await?;
    let tid = TenantId::new(&tenant);
    // Devices that hold the metric as numbers or booleans: others would be empty groups.
    let with_data: HashSet<String> = {
        let engine = tm.engine().clone();
        let (tid, metric) = (tid.clone(), p.metric.clone());
        blocking(move || {
            Ok(engine
                .list_series(&tid, None)
                .into_iter()
                .filter(|s| s.metric == metric && s.kind != ValueKind::Str)
                .map(|s| s.device)
                .collect())
        })
        .await?
    };
    let mut labels: Vec<Option<String>> = Vec::new();
    let groups: Vec<SeriesGroup> = match by {
        By::All => {
            labels.push(Some("all".into()));
            vec![SeriesGroup {
                name: "all".into(),
                devices: members.into_iter().map(|m| m.device).collect(),
            }]
        }
        By::Device => members
            .into_iter()
            .filter(|m| with_data.contains(&m.device))
            .map(|m| {
                labels.push(Some(m.device.clone()));
                SeriesGroup {
                    name: m.device.clone(),
                    devices: vec![m.device],
                }
            })
            .collect(),
        By::Tag(_) => {
            let mut by_value: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
            for m in members
                .into_iter()
                .filter(|m| with_data.contains(&m.device))
            {
                by_value.entry(m.tag).or_default().push(m.device);
            }
            by_value
                .into_iter()
                .map(|(value, devices)| {
                    labels.push(value.clone());
                    SeriesGroup {
                        name: value.unwrap_or_default(),
                        devices,
                    }
                })
                .collect()
        }
    };
    let q = AggregateQuery {
        metric: p.metric.clone(),
        groups,
        from,
        to,
        bucket_ms,
        fns: fns.clone(),
    };
    let engine = tm.engine().clone();
    let results = if q.groups.is_empty() {
        Vec::new()
    } else {
        let n = u64::try_from((to - 1).div_euclid(bucket_ms) - from.div_euclid(bucket_ms) + 1)
            .unwrap_or(u64::MAX);
        if n.saturating_mul(q.groups.len() as u64) > MAX_BUCKETS as u64 {
            return Err(ApiError::invalid(format!(
                "{n} buckets × {} groups is over {MAX_BUCKETS}: widen the bucket, narrow the \
                 range or the selection",
                q.groups.len()
            )));
        }
        blocking(move || engine.aggregate(&tid, &q)).await?
    };
    Ok(Json(FleetAggregateView {
        metric: p.metric,
        bucket_ms,
        from,
        to,
        groups: results
            .into_iter()
            .zip(labels)
            .map(|(g, label)| GroupView {
                group: label,
                series: g.series,
                buckets: g
                    .buckets
                    .iter()
                    .map(|(start, a)| BucketView::new(*start, a, &fns))
                    .collect(),
            })
            .collect(),
    }))
}

// ---- settings ------------------------------------------------------------------------------

/// What applies to a tenant now, overrides and hub defaults combined (read-only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EffectiveSettings {
    /// Days points are kept (null: forever).
    pub retention_days: Option<u32>,
    /// Whether points are kept forever.
    pub keep_forever: bool,
    /// Topic filters whose publications are telemetry.
    pub topics: Vec<String>,
    /// Payload format when a publication does not say: auto, json, cbor or msgpack.
    pub format: String,
}

/// A tenant's telemetry settings. `PUT` replaces them all: a field that is absent or null
/// takes the hub's default. Retention: `retention_days: N` keeps N days (1 to 36500),
/// `keep_forever: true` keeps points forever, neither (or `retention_days: null`) takes the hub's
/// `[telemetry] retention_days`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Days to keep points, overriding the hub's default (null: the hub's default).
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Keep points forever (then `retention_days` must be null).
    #[serde(default)]
    pub keep_forever: bool,
    /// Topic filters whose publications are telemetry, replacing the hub's (null: the hub's;
    /// the device is the level of the first `+`; filters cannot be `$` topics).
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    /// Payload format when a publication does not say: auto, json, cbor or msgpack (null: the
    /// hub's).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "auto")]
    pub format: Option<PayloadFormat>,
    /// What applies now (returned by GET and PUT; ignored in a PUT body, so a GET body can be
    /// sent back).
    #[serde(default)]
    #[schema(read_only)]
    pub effective: Option<EffectiveSettings>,
}

fn settings_view(tm: &Telemetry, tid: &TenantId) -> TelemetrySettings {
    let over = tm.settings(tid);
    let (days, is_default) = tm.engine().retention(tid);
    let cfg = tm.config();
    TelemetrySettings {
        retention_days: if is_default { None } else { days },
        keep_forever: !is_default && days.is_none(),
        effective: Some(EffectiveSettings {
            retention_days: days,
            keep_forever: days.is_none(),
            topics: over.topics.clone().unwrap_or_else(|| cfg.topics.clone()),
            format: over.format.unwrap_or(cfg.format).as_str().into(),
        }),
        topics: over.topics,
        format: over.format,
    }
}

/// The tenant's telemetry settings: its overrides (null: the hub's default) and what applies.
#[utoipa::path(get, path = "/tenants/{tenant}/telemetry/settings", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The settings", body = TelemetrySettings), CommonErrors))]
pub async fn get_settings(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<TelemetrySettings>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    Ok(Json(settings_view(&tm, &TenantId::new(&tenant))))
}

/// Replaces the tenant's telemetry settings (admin): retention (N days, forever, or the hub's
/// default), topic filters and payload format; absent or null fields take the hub's default.
/// New topic filters apply to the next publication; a shorter retention deletes expired days at
/// the next maintenance pass (within a minute) or at once with `POST …/telemetry/retention/apply`.
#[utoipa::path(put, path = "/tenants/{tenant}/telemetry/settings", tag = "telemetry",
    request_body = TelemetrySettings,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The settings now", body = TelemetrySettings), CommonErrors))]
pub async fn put_settings(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(s): ApiJson<TelemetrySettings>,
) -> ApiResult<Json<TelemetrySettings>> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    match (s.retention_days, s.keep_forever) {
        (Some(_), true) => {
            return Err(ApiError::invalid(
                "give retention_days or keep_forever: true, not both",
            ));
        }
        (Some(d), false) if !(1..=MAX_RETENTION_DAYS).contains(&d) => {
            return Err(ApiError::invalid(format!(
                "retention_days={d}: keep 1 to {MAX_RETENTION_DAYS} days; for no expiry send \
                 keep_forever: true, for the hub's default retention_days: null"
            )));
        }
        _ => {}
    }
    let tid = TenantId::new(&tenant);
    let overrides = TenantSettings {
        topics: s.topics,
        format: s.format,
    };
    let (t2, tid2) = (tm.clone(), tid.clone());
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        t2.set_settings(&tid2, overrides)?;
        let engine = t2.engine();
        match (s.retention_days, s.keep_forever) {
            (Some(d), _) => engine.set_retention(&tid2, Some(d))?,
            (None, true) => engine.set_retention(&tid2, None)?,
            (None, false) => engine.clear_retention(&tid2)?,
        }
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(&e))??;
    Ok(Json(settings_view(&tm, &tid)))
}

/// What `POST …/telemetry/retention/apply` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetentionApplied {
    /// The tenant's retention in days (null: forever).
    pub retention_days: Option<u32>,
    /// Start of the oldest UTC day the tenant keeps (null: forever).
    pub kept_from: Option<String>,
    /// Day partitions the pass deleted, over the whole hub. Shown to platform-wide tokens only
    /// (null for tenant-scoped tokens: it would tell them about other tenants' data).
    pub partitions_deleted: Option<u64>,
    /// Bytes the pass freed, over the whole hub (platform-wide tokens only, like
    /// `partitions_deleted`).
    pub bytes_freed: Option<u64>,
}

/// Applies retention now (admin): deletes the day partitions older than each tenant's retention,
/// as the hub's maintenance pass does every minute. Points of expired days still in memory are
/// dropped when they are sealed.
#[utoipa::path(post, path = "/tenants/{tenant}/telemetry/retention/apply", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "What was deleted", body = RetentionApplied), CommonErrors))]
pub async fn apply_retention(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<RetentionApplied>> {
    c.actor.require(Role::Admin, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let engine = tm.engine().clone();
    let outcome = blocking(move || engine.enforce_retention()).await?;
    let (days, _) = tm.engine().retention(&TenantId::new(&tenant));
    let platform = c.actor.tenant.is_none();
    Ok(Json(RetentionApplied {
        retention_days: days,
        kept_from: days.map(|d| {
            let first_day = now_ms().div_euclid(DAY_MS) - i64::from(d) + 1;
            rfc3339(first_day.saturating_mul(DAY_MS))
        }),
        partitions_deleted: platform.then_some(outcome.partitions),
        bytes_freed: platform.then_some(outcome.bytes),
    }))
}

// ---- exports ------------------------------------------------------------------------------

/// A time in a JSON body: milliseconds since the Unix epoch (a number), or a string in any of
/// the forms that times in query strings take.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TimeSpec {
    /// Milliseconds since the Unix epoch.
    Millis(i64),
    /// RFC 3339 UTC (`2026-01-31T08:00:00Z`), milliseconds since the epoch, `now`, or a time ago
    /// (`-15m`, `-1h`, `-7d`).
    Text(String),
}

/// A time of a JSON body (field `name`): a number is milliseconds since the epoch, a string is
/// read like a query string's time ([`parse_time`], relative to `now`).
pub fn body_time(name: &str, v: &Value, now: i64) -> Result<i64, ApiError> {
    match v {
        Value::String(s) => parse_time(name, s, now),
        Value::Number(n) => n.as_i64().ok_or_else(|| {
            ApiError::invalid(format!(
                "{name}: {n} is not a time: a number must be whole milliseconds since the epoch \
                 (a signed 64-bit integer); or send a string: an RFC 3339 UTC time \
                 (\"2026-01-31T08:00:00Z\"), \"now\", or a time ago such as \"-1d\""
            ))
        }),
        other => {
            let kind = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "an array",
                _ => "an object",
            };
            Err(ApiError::invalid(format!(
                "{name}: {kind} is not a time: send milliseconds since the epoch (a number) or a \
                 string: an RFC 3339 UTC time (\"2026-01-31T08:00:00Z\"), \"now\", or a time \
                 ago such as \"-1d\""
            )))
        }
    }
}

/// What to export and where: the body of `POST …/telemetry/exports`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ExportRequest)]
pub struct ExportBody {
    /// `s3://bucket/prefix` (credentials and endpoint from the hub's `AWS_*` environment), or a
    /// relative folder inside the hub's export folder (`data_dir/telemetry/exports`).
    pub destination: String,
    /// `parquet` (default) or `csv`.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "parquet")]
    pub format: Option<ExportFormat>,
    /// File name stem (default `telemetry-<job id>`).
    #[serde(default)]
    pub name: Option<String>,
    /// Only these devices (default: all).
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Only these metrics (default: all).
    #[serde(default)]
    pub metrics: Option<Vec<String>>,
    /// Start (inclusive): milliseconds since the epoch (a number), or a string: RFC 3339 UTC
    /// (`2026-01-01T00:00:00Z`), milliseconds, `now`, or a time ago (`-15m`, `-1h`, `-7d`).
    #[schema(value_type = TimeSpec)]
    pub from: Value,
    /// End (exclusive), the same forms. Default (absent or null): now.
    #[serde(default)]
    #[schema(value_type = Option<TimeSpec>)]
    pub to: Option<Value>,
}

impl ExportBody {
    /// The request with its times resolved (relative times against `now`); a bad time is a 400
    /// naming its field.
    pub fn resolve(self, now: i64) -> Result<ExportRequest, ApiError> {
        let from = body_time("from", &self.from, now)?;
        let to = match self.to.as_ref().filter(|v| !v.is_null()) {
            Some(v) => body_time("to", v, now)?,
            None => now,
        };
        if from >= to {
            return Err(ApiError::invalid(format!(
                "the time range is empty: from ({}) must be before to ({}); `to` is exclusive \
                 (default: now)",
                rfc3339(from),
                rfc3339(to)
            )));
        }
        Ok(ExportRequest {
            destination: self.destination,
            format: self.format,
            name: self.name,
            devices: self.devices,
            metrics: self.metrics,
            from,
            to,
        })
    }
}

/// Starts an export of a time range of the tenant's telemetry (operator) to Parquet or CSV, in an
/// S3-compatible store (`s3://bucket/prefix`, configured from the hub's `AWS_*` environment) or a
/// relative folder inside the hub's export folder. `from` and `to` are milliseconds since the
/// epoch or strings as in the query routes (RFC 3339, `now`, `-7d`); `to` defaults to now.
/// Answers 202 with the job; follow its progress with `GET …/telemetry/exports/{id}`.
#[utoipa::path(post, path = "/tenants/{tenant}/telemetry/exports", tag = "telemetry",
    request_body = ExportBody,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 202, description = "The job, running", body = ferrohub_telemetry::export::ExportJob), CommonErrors))]
pub async fn start_export(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<ExportBody>,
) -> ApiResult<(
    axum::http::StatusCode,
    Json<ferrohub_telemetry::export::ExportJob>,
)> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    c.registry.tenant(&c.actor, &tenant).await?;
    let tm = telemetry_of(&state)?;
    let req = body.resolve(now_ms())?;
    let tid = TenantId::new(&tenant);
    let job = tokio::task::spawn_blocking(move || tm.start_export(&tid, req))
        .await
        .map_err(|e| ApiError::internal(&e))??;
    Ok((axum::http::StatusCode::ACCEPTED, Json(job)))
}

/// The tenant's export jobs, newest first (the hub keeps the last 100).
#[utoipa::path(get, path = "/tenants/{tenant}/telemetry/exports", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "Jobs", body = Vec<ferrohub_telemetry::export::ExportJob>), CommonErrors))]
pub async fn list_exports(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<ferrohub_telemetry::export::ExportJob>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    c.registry.tenant(&c.actor, &tenant).await?;
    Ok(Json(
        telemetry_of(&state)?.export_jobs(&TenantId::new(&tenant)),
    ))
}

/// One export job: state (`running`, `succeeded`, `failed`), rows written, series done of total,
/// and, when finished, the files and bytes or the error.
#[utoipa::path(get, path = "/tenants/{tenant}/telemetry/exports/{id}", tag = "telemetry",
    params(("tenant" = String, Path, description = "Tenant id"), ("id" = u64, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = ferrohub_telemetry::export::ExportJob), CommonErrors))]
pub async fn get_export(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, u64)>,
) -> ApiResult<Json<ferrohub_telemetry::export::ExportJob>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    c.registry.tenant(&c.actor, &tenant).await?;
    telemetry_of(&state)?
        .export_job(&TenantId::new(&tenant), id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("export {id} not found")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::v1::test_pairs as pairs;

    #[test]
    fn times() {
        let now = 1_767_225_600_000;
        assert_eq!(parse_time("from", "now", now).unwrap(), now);
        assert_eq!(parse_time("from", "1000", now).unwrap(), 1000);
        assert_eq!(parse_time("from", "-15m", now).unwrap(), now - 900_000);
        assert_eq!(parse_time("from", "-1d", now).unwrap(), now - 86_400_000);
        assert_eq!(
            parse_time("from", "2026-01-01T00:00:00Z", now).unwrap(),
            1_767_225_600_000
        );
        assert_eq!(
            parse_time("from", "2026-01-01T00:00:00.250Z", now).unwrap(),
            1_767_225_600_250
        );
        assert!(parse_time("from", "yesterday", now).is_err());
        assert!(parse_time("from", "15m", now).is_err());
        assert_eq!(rfc3339(1_767_225_600_250), "2026-01-01T00:00:00.250Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn export_body_times() {
        let now = 1_767_225_600_000;
        let resolve = |v: Value| {
            serde_json::from_value::<ExportBody>(v)
                .map_err(|e| ApiError::invalid(e.to_string()))
                .and_then(|b| b.resolve(now))
                .map(|r| (r.from, r.to))
        };
        let body = |from: Value, to: Option<Value>| {
            let mut b = serde_json::json!({"destination": "d", "from": from});
            if let Some(to) = to {
                b["to"] = to;
            }
            b
        };
        assert_eq!(resolve(body(1000.into(), None)).unwrap(), (1000, now));
        assert_eq!(
            resolve(body("-1d".into(), Some("now".into()))).unwrap(),
            (now - 86_400_000, now)
        );
        assert_eq!(
            resolve(body(
                "2025-12-31T00:00:00Z".into(),
                Some("2026-01-01T00:00:00.250Z".into())
            ))
            .unwrap(),
            (now - 86_400_000, now + 250)
        );
        assert_eq!(
            resolve(body("1000".into(), Some(Value::Null))).unwrap(),
            (1000, now)
        );
        for (from, to, field) in [
            (Value::from("soon"), None, "from="),
            (Value::from(1.5), None, "from:"),
            (Value::from(u64::MAX), None, "from:"),
            (Value::Bool(true), None, "from:"),
            (Value::from(0), Some(Value::from("later")), "to="),
            (Value::from(0), Some(serde_json::json!({"ms": 1})), "to:"),
            (Value::from("now"), None, "empty"),
        ] {
            let e = resolve(body(from.clone(), to.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(field), "{from} {to:?}: {}", e.message);
        }
        assert!(resolve(serde_json::json!({"destination": "d"})).is_err());
        assert!(resolve(serde_json::json!({"destination": "d", "from": 0, "until": 1})).is_err());
    }

    #[test]
    fn buckets_and_functions() {
        assert_eq!(parse_bucket("1m").unwrap(), 60_000);
        assert_eq!(parse_bucket("1h").unwrap(), 3_600_000);
        assert_eq!(parse_bucket("1d").unwrap(), 86_400_000);
        assert_eq!(parse_bucket("250").unwrap(), 250);
        assert!(parse_bucket("0").is_err());
        assert!(parse_bucket("1us").is_err());
        assert!(parse_bucket("soon").is_err());
        assert_eq!(parse_fns(None).unwrap(), AggFn::ALL.to_vec());
        assert_eq!(parse_fns(Some("all")).unwrap(), AggFn::ALL.to_vec());
        assert_eq!(
            parse_fns(Some("max, avg,max")).unwrap(),
            vec![AggFn::Avg, AggFn::Max]
        );
        assert!(parse_fns(Some("median")).is_err());
    }

    #[test]
    fn fleet_parameters() {
        let p = parse_fleet(
            pairs(&[
                ("metric", "temp"),
                ("tag", "site:a:b"),
                ("group", "g"),
                ("devices", "d2, d1"),
                ("devices", "d3"),
                ("limit", "5"),
            ]),
            &["limit", "cursor"],
        )
        .unwrap();
        assert_eq!(p.metric, "temp");
        assert_eq!(
            p.selection.tags.get("site").map(String::as_str),
            Some("a:b")
        );
        assert_eq!(p.selection.group.as_deref(), Some("g"));
        assert_eq!(p.selection.devices.as_ref().map(BTreeSet::len), Some(3));
        assert_eq!(p.rest.get("limit").map(String::as_str), Some("5"));
        assert!(parse_fleet(pairs(&[("tag", "a:1")]), &[]).is_err());
        assert!(parse_fleet(pairs(&[("metric", "m"), ("bucket", "1h")]), &["limit"]).is_err());
        assert!(
            parse_fleet(
                pairs(&[("metric", "m"), ("tag", "a:1"), ("tag", "a:2")]),
                &[]
            )
            .is_err()
        );
        assert_eq!(parse_by(None).unwrap(), By::All);
        assert_eq!(parse_by(Some(&"device".into())).unwrap(), By::Device);
        assert_eq!(
            parse_by(Some(&"tag:site".into())).unwrap(),
            By::Tag("site".into())
        );
        assert!(parse_by(Some(&"tag:".into())).is_err());
        assert!(parse_by(Some(&"colour".into())).is_err());
    }
}
