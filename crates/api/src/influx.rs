//! `POST /api/v2/write`: the InfluxDB v2 write API, so that Telegraf's `outputs.influxdb_v2`,
//! Node-RED and other agents that speak it write telemetry unchanged.
//!
//! - Authentication: an operator (or admin) API token as `Authorization: Token <secret>`
//!   (InfluxDB's scheme) or `Bearer <secret>`.
//! - Tenant: the token's tenant; a platform-wide token names it with `org` (required then). A
//!   tenant-scoped token with another `org` is answered 404, like any tenant outside its scope.
//!   `orgID` is accepted as a synonym of `org`; `bucket` is accepted and ignored.
//! - Body: line protocol (see `ferrohub_telemetry::lineproto`), at most 32 MiB, optionally
//!   `Content-Encoding: gzip` (at most 32 MiB once decompressed). Gzip bodies and bodies over
//!   [`crate::v1::telemetry::INLINE_DECODE_BYTES`] are decompressed and parsed on a blocking
//!   thread.
//! - `precision`: `ns` (default), `us`, `ms` or `s` (also `n`, `u`).
//! - Answers as InfluxDB 2 does: `204 No Content` once the points are durable; errors as
//!   `{"code": "...", "message": "..."}` with InfluxDB's codes (`invalid` 400 — a bad line writes
//!   nothing —, `unauthorized` 401, `forbidden` 403, `not found` 404, `request too large` 413,
//!   `unsupported media type` 415, `unprocessable entity` 422 — a partial write: points whose
//!   series holds another kind of value, and points whose device id is not a valid id (1-128
//!   characters of `A-Z a-z 0-9 . _ : -`, as in the registry), were dropped, the others stored —,
//!   `internal error` 500, `unavailable` 503).

use std::io::Read;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ferrohub_registry::model::Role;
use ferrohub_telemetry::lineproto::Precision;
use ferrohub_telemetry::service::WriteReport;
use ferrohub_types::TenantId;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Caller;
use crate::v1::telemetry::{decode_work, telemetry_of};

/// Largest request body, compressed or not.
pub const BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Largest body once decompressed.
pub const DECOMPRESSED_LIMIT: usize = 32 * 1024 * 1024;
/// The path of the route.
pub const WRITE_PATH: &str = "/api/v2/write";

/// The query string of a write.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default)]
#[into_params(parameter_in = Query)]
pub struct WriteParams {
    /// The tenant. Required with a platform-wide token; with a tenant-scoped token it may be
    /// absent or must name the token's tenant.
    pub org: Option<String>,
    /// A synonym of `org` (InfluxDB clients that address organizations by id).
    #[serde(rename = "orgID")]
    #[param(rename = "orgID")]
    pub org_id: Option<String>,
    /// Accepted and ignored: a tenant's telemetry is one store.
    pub bucket: Option<String>,
    /// Unit of the timestamps: `ns` (default), `us`, `ms` or `s`.
    pub precision: Option<String>,
}

/// The same error with InfluxDB's code for its status.
fn influx(e: ApiError) -> ApiError {
    let code = match e.status.as_u16() {
        400 => "invalid",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        409 => "conflict",
        413 => "request too large",
        415 => "unsupported media type",
        422 => "unprocessable entity",
        429 => "too many requests",
        503 => "unavailable",
        _ => "internal error",
    };
    ApiError { code, ..e }
}

/// Writes InfluxDB line protocol (operator). Compatible with InfluxDB v2's `/api/v2/write`:
/// authenticate with `Authorization: Token <secret>` or `Bearer <secret>`; the tenant is the
/// token's, or `org` for a platform-wide token; `bucket` is ignored; the body may be gzip
/// (`Content-Encoding: gzip`), 32 MiB at most (also decompressed). The device of a point is its
/// `device` tag, else its `host` tag; each field is the metric `measurement.field`, with the other
/// tags appended sorted (`cpu.usage_user{cpu=cpu0}`). Device ids follow the registry's rule
/// (1-128 characters of `A-Z a-z 0-9 . _ : -`, not `.` or `..`): a point whose device is not a valid id is
/// dropped and the others are written (422, naming its line). A bad line rejects the whole
/// request (400, nothing written); success is 204 once the points are durable. Errors use
/// InfluxDB's codes.
#[utoipa::path(post, path = "/api/v2/write", tag = "telemetry",
    request_body(content = String, description = "InfluxDB line protocol, e.g. `cpu,host=web1 usage=3.5 1767225600000000000`",
        content_type = "text/plain"),
    params(WriteParams),
    responses(
        (status = 204, description = "The points are stored"),
        (status = 400, description = "A line is bad (`invalid`: `unable to parse '<line>': <reason>`); nothing was written", body = ErrorBody),
        (status = 401, description = "No token, or an unknown, expired or revoked one (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "The token cannot write (`forbidden`: viewer tokens)", body = ErrorBody),
        (status = 404, description = "The tenant does not exist or is outside the token's scope (`not found`)", body = ErrorBody),
        (status = 413, description = "The body is over 32 MiB, compressed or not (`request too large`)", body = ErrorBody),
        (status = 415, description = "A Content-Encoding other than gzip or identity", body = ErrorBody),
        (status = 422, description = "Partial write: points of another kind than their series, and points whose device id is not valid, were dropped; the others are stored (`unprocessable entity`)", body = ErrorBody),
        (status = 500, description = "The hub failed (`internal error`)", body = ErrorBody),
        (status = 503, description = "Telemetry or the registry is not available on this hub", body = ErrorBody),
    ))]
pub async fn write_v2(
    caller: Result<Caller, ApiError>,
    State(state): State<ApiState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match write(caller, state, uri, headers, body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => influx(e).into_response(),
    }
}

async fn write(
    caller: Result<Caller, ApiError>,
    state: ApiState,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(), ApiError> {
    let c = caller?;
    let p = axum::extract::Query::<WriteParams>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| {
            ApiError::invalid(format!("the query string is not valid: {}", e.body_text()))
        })?;
    let org = match (
        p.org.filter(|o| !o.is_empty()),
        p.org_id.filter(|o| !o.is_empty()),
    ) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "org and orgID name different tenants: send one of them",
            ));
        }
        (a, b) => a.or(b),
    };
    let tenant = match (&c.actor.tenant, org) {
        (Some(mine), Some(org)) if *mine != org => {
            return Err(ApiError::not_found(format!("tenant {org} not found")));
        }
        (Some(mine), _) => mine.clone(),
        (None, Some(org)) => org,
        (None, None) => {
            return Err(ApiError::invalid(
                "org is required with a platform-wide token: name the tenant with ?org=<tenant> \
                 (Telegraf: `organization = \"<tenant>\"`), or use a token scoped to the tenant",
            ));
        }
    };
    c.registry.tenant(&c.actor, &tenant).await?;
    c.actor.require(Role::Operator, Some(&tenant))?;
    let tm = telemetry_of(&state)?;
    let precision = match p.precision.as_deref().filter(|p| !p.is_empty()) {
        None => Precision::Ns,
        Some(v) => Precision::from_query(v).ok_or_else(|| {
            ApiError::invalid(format!(
                "precision={v:?} is not supported: use ns (default), us, ms or s"
            ))
        })?,
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" => true,
        Some(e) => {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Encoding {e:?} is not supported: send the body as is or gzip-compressed \
                 (Content-Encoding: gzip)"
            )));
        }
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large("the request body is over 32 MiB")
        } else {
            ApiError::invalid(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))
        }
    })?;
    // Decompressing and parsing are CPU work: a gzip body (whatever its compressed size) or a
    // large plain one is handled on a blocking thread, so that it never holds up other requests.
    let work = if gzip { usize::MAX } else { body.len() };
    let parser = tm.clone();
    let points = decode_work(work, move || {
        let points = if gzip {
            parser.line_protocol_points(&gunzip(&body)?, precision)
        } else {
            let text = std::str::from_utf8(&body).map_err(|_| not_utf8())?;
            parser.line_protocol_points(text, precision)
        };
        points.map_err(ApiError::from)
    })
    .await?;
    let bad_devices = points.dropped;
    let report = tm
        .write_line_protocol_points(&TenantId::new(&tenant), points)
        .await?;
    if report.rejected_total > 0 {
        return Err(partial_write(&report, bad_devices));
    }
    Ok(())
}

/// 422 for a write that dropped points (`bad_devices` of them for their device ids, listed first
/// in the report; the others refused by the engine for their kind or timestamp), as InfluxDB
/// answers a partial write.
fn partial_write(report: &WriteReport, bad_devices: usize) -> ApiError {
    let shown = report.rejected.len().min(3);
    let mut message = format!(
        "partial write: {} (points stored: {}; dropped={})",
        report.rejected[..shown].join("; "),
        report.points,
        report.rejected_total
    );
    if report.rejected_total > bad_devices {
        message.push_str(
            ": a series keeps the kind of its first value — write these fields under another name",
        );
    }
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable entity",
        message,
    )
}

fn too_large(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request too large",
        format!("{what}: send smaller batches (Telegraf: a smaller metric_batch_size)"),
    )
}

fn not_utf8() -> ApiError {
    ApiError::invalid("the body is not UTF-8 text: send InfluxDB line protocol")
}

/// Decompresses a gzip body (every member), at most [`DECOMPRESSED_LIMIT`] bytes.
fn gunzip(body: &[u8]) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(DECOMPRESSED_LIMIT));
    flate2::read::MultiGzDecoder::new(body)
        .take(DECOMPRESSED_LIMIT as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::invalid(format!(
                "the body is not valid gzip ({e}): compress it with gzip, or drop the \
                 Content-Encoding header"
            ))
        })?;
    if out.len() > DECOMPRESSED_LIMIT {
        return Err(too_large("the decompressed body is over 32 MiB"));
    }
    String::from_utf8(out).map_err(|_| not_utf8())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_bodies() {
        assert_eq!(gunzip(&gz(b"m,device=d v=1")).unwrap(), "m,device=d v=1");
        let mut two = gz(b"a ");
        two.extend(gz(b"b"));
        assert_eq!(gunzip(&two).unwrap(), "a b");
        assert_eq!(gunzip(b"not gzip").unwrap_err().status, 400);
        let bomb = gz(&vec![b'x'; DECOMPRESSED_LIMIT + 1]);
        assert!(bomb.len() < 1_000_000);
        assert_eq!(gunzip(&bomb).unwrap_err().status, 413);
        assert_eq!(gunzip(&gz(&[0xff, 0xfe])).unwrap_err().status, 400);
    }

    #[test]
    fn partial_write_messages() {
        let report = WriteReport {
            points: 4,
            rejected: vec![
                "line 2: device id \"a/b\" (tag `device`) is not valid: device ids are 1-128 \
                 characters from A-Z a-z 0-9 . _ : -"
                    .into(),
                "series k.v of kc holds numeric values".into(),
            ],
            rejected_total: 3,
        };
        let e = partial_write(&report, 2);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            e.message
                .starts_with("partial write: line 2: device id \"a/b\""),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("(points stored: 4; dropped=3)"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("a series keeps the kind"),
            "{}",
            e.message
        );
        // Only bad device ids: no word about kinds.
        let e = partial_write(&report, 3);
        assert!(e.message.ends_with("dropped=3)"), "{}", e.message);
        assert_eq!(influx(e).code, "unprocessable entity");
    }

    #[test]
    fn influx_codes() {
        assert_eq!(influx(ApiError::invalid("x")).code, "invalid");
        assert_eq!(influx(ApiError::unauthenticated("x")).code, "unauthorized");
        assert_eq!(influx(ApiError::not_found("x")).code, "not found");
        assert_eq!(influx(too_large("x")).code, "request too large");
    }
}
