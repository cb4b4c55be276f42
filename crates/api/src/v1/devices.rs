//! `/tenants/{tenant}/devices`: the device registry.

use axum::Json;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use ferrohub_registry::model::{
    ConnectivityHistory, Device, DeviceListing, DevicePatch, DeviceSpec, DeviceStatus, Page,
    SortKey, TelemetryOnDecommission,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};

/// Default page size of a device listing.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size of a device listing.
pub const MAX_LIMIT: u32 = 1000;

/// The query string of a device listing, parsed by hand: `tag` repeats.
pub struct DeviceListQuery(pub DeviceListing);

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::invalid(format!(
            "{name}={v:?}: use true or false"
        ))),
    }
}

/// Parses `tag=key:value&type=..&status=..&name_prefix=..&id_prefix=..&online=..&group=..&sort=..&order=..
/// &limit=..&cursor=..`.
pub fn parse_listing(pairs: Vec<(String, String)>) -> Result<DeviceListing, ApiError> {
    let mut l = DeviceListing {
        limit: DEFAULT_LIMIT,
        ..DeviceListing::default()
    };
    for (k, v) in pairs {
        match k.as_str() {
            "tag" => {
                let (key, value) = v.split_once(':').ok_or_else(|| {
                    ApiError::invalid(format!("tag={v:?}: write the tag filter as key:value"))
                })?;
                if l.query.tags.get(key).is_some_and(|x| x != value) {
                    return Err(ApiError::invalid(format!(
                        "tag {key} is filtered on twice with different values; no device can match"
                    )));
                }
                l.query.tags.insert(key.to_string(), value.to_string());
            }
            "type" => l.query.device_type = Some(v),
            "status" => {
                l.query.status = Some(match v.as_str() {
                    "enabled" => DeviceStatus::Enabled,
                    "disabled" => DeviceStatus::Disabled,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "status={v:?}: use enabled or disabled"
                        )));
                    }
                })
            }
            "name_prefix" => l.query.name_prefix = Some(v),
            "id_prefix" => l.query.id_prefix = Some(v),
            "online" => l.query.online = Some(parse_bool("online", &v)?),
            "group" => l.group = Some(v),
            "sort" => {
                l.sort = match v.as_str() {
                    "id" => SortKey::Id,
                    "name" => SortKey::Name,
                    "created_at" => SortKey::CreatedAt,
                    "last_seen" => SortKey::LastSeen,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "sort={v:?}: sort by id, name, created_at or last_seen"
                        )));
                    }
                }
            }
            "order" => {
                l.descending = match v.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(ApiError::invalid(format!("order={v:?}: use asc or desc"))),
                }
            }
            "limit" => {
                l.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "limit={v:?}: give a page size from 1 to {MAX_LIMIT}"
                        ))
                    })?
            }
            "cursor" => l.cursor = Some(v).filter(|c| !c.is_empty()),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?}: the filters are tag, type, status, \
                     name_prefix, id_prefix, online, group, sort, order, limit and cursor"
                )));
            }
        }
    }
    Ok(l)
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for DeviceListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| {
                ApiError::invalid(format!("the query string is not valid: {}", e.body_text()))
            })?;
        parse_listing(pairs.0).map(DeviceListQuery)
    }
}

/// Lists a page of devices, filtered and sorted. Pass `next_cursor` back as `cursor` (with the
/// same filters and sort) for the next page; it is absent on the last page.
#[utoipa::path(get, path = "/tenants/{tenant}/devices", tag = "devices",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("tag" = Option<Vec<String>>, Query, style = Form, explode,
            description = "Tag filter `key:value` (split at the first `:`); repeat it for several tags, all must match"),
        ("type" = Option<String>, Query, description = "Device type"),
        ("status" = Option<DeviceStatus>, Query, description = "enabled or disabled"),
        ("name_prefix" = Option<String>, Query, description = "Names starting with this"),
        ("id_prefix" = Option<String>, Query, description = "Ids starting with this"),
        ("online" = Option<bool>, Query, description = "Connected now (as last flushed, at most a second behind)"),
        ("group" = Option<String>, Query, description = "Members of this static or dynamic group"),
        ("sort" = Option<SortKey>, Query, description = "id (default), name, created_at or last_seen"),
        ("order" = Option<String>, Query, description = "asc (default) or desc"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses((status = 200, description = "A page of devices", body = Page<Device>), CommonErrors))]
pub async fn list_devices(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
    DeviceListQuery(listing): DeviceListQuery,
) -> ApiResult<Json<Page<Device>>> {
    Ok(Json(
        c.registry.list_devices(&c.actor, &tenant, listing).await?,
    ))
}

/// Registers a device (operator).
#[utoipa::path(post, path = "/tenants/{tenant}/devices", tag = "devices", request_body = DeviceSpec,
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 201, description = "The device was registered", body = Device), CommonErrors))]
pub async fn create_device(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(spec): ApiJson<DeviceSpec>,
) -> ApiResult<impl IntoResponse> {
    let d = c.registry.create_device(&c.actor, &tenant, spec).await?;
    Ok((StatusCode::CREATED, Json(d)))
}

/// A device, with its live connectivity.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}", tag = "devices",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "The device", body = Device), CommonErrors))]
pub async fn get_device(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
) -> ApiResult<Json<Device>> {
    Ok(Json(c.registry.device(&c.actor, &tenant, &device).await?))
}

/// Changes a device (operator). Absent fields are unchanged; a tag set to `null` is removed.
/// Disabling a device closes its connections at once; other changes apply to connected
/// sessions immediately.
#[utoipa::path(patch, path = "/tenants/{tenant}/devices/{device}", tag = "devices", request_body = DevicePatch,
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "The changed device", body = Device), CommonErrors))]
pub async fn update_device(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> ApiResult<Json<Device>> {
    Ok(Json(
        c.registry
            .update_device(&c.actor, &tenant, &device, patch)
            .await?,
    ))
}

/// The result of a decommission.
#[derive(Debug, Serialize, ToSchema)]
pub struct Decommissioned {
    /// The device that was decommissioned.
    pub id: String,
    /// What happens to its telemetry, by the tenant's setting `telemetry_on_decommission`:
    /// `keep` (stays queryable under the device id) or `purge` (deleted with the device).
    pub telemetry: TelemetryOnDecommission,
}

/// Decommissions a device (operator): its credentials, group memberships and record are deleted
/// and its connections closed. The answer says what happens to its telemetry.
#[utoipa::path(delete, path = "/tenants/{tenant}/devices/{device}", tag = "devices",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id")),
    responses((status = 200, description = "The device was decommissioned", body = Decommissioned), CommonErrors))]
pub async fn delete_device(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
) -> ApiResult<Json<Decommissioned>> {
    let telemetry = c.registry.delete_device(&c.actor, &tenant, &device).await?;
    Ok(Json(Decommissioned {
        id: device,
        telemetry,
    }))
}

/// Paging of a device's connectivity history.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConnectivityParams {
    /// Number of events, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// Events older than this sequence number (pass `next` for the next page).
    pub before: Option<i64>,
}

/// A device's connectivity now (live) and its connectivity history, newest first: every
/// connect and disconnect with the reason the connection ended (`client_disconnect`,
/// `connection_lost`, `keep_alive_timeout`, `taken_over`, `kicked`, `not_authorized`,
/// `server_shutdown`, `protocol_error`). Events are written every second, so the newest may
/// appear up to a second after `current` shows them; the hub keeps `registry.connectivity_history`
/// events per device.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/connectivity", tag = "devices",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ConnectivityParams),
    responses((status = 200, description = "Current connectivity and a page of events", body = ConnectivityHistory), CommonErrors))]
pub async fn get_connectivity(
    c: Caller,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiQuery(p): ApiQuery<ConnectivityParams>,
) -> ApiResult<Json<ConnectivityHistory>> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit={limit}: give a page size from 1 to {MAX_LIMIT}"
        )));
    }
    Ok(Json(
        c.registry
            .connectivity_history(&c.actor, &tenant, &device, limit, p.before)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::v1::test_pairs as pairs;

    #[test]
    fn listing_parameters() {
        let l = parse_listing(pairs(&[
            ("tag", "site:a:b"),
            ("tag", "floor:2"),
            ("sort", "last_seen"),
            ("order", "desc"),
            ("limit", "1000"),
            ("online", "true"),
        ]))
        .unwrap();
        assert_eq!(l.query.tags.get("site").map(String::as_str), Some("a:b"));
        assert_eq!(l.query.tags.len(), 2);
        assert_eq!(l.sort, SortKey::LastSeen);
        assert!(l.descending);
        assert_eq!(l.limit, 1000);
        assert_eq!(l.query.online, Some(true));
        assert_eq!(parse_listing(vec![]).unwrap().limit, DEFAULT_LIMIT);
        assert!(parse_listing(pairs(&[("tag", "a:1"), ("tag", "a:2")])).is_err());
        assert!(parse_listing(pairs(&[("limit", "1001")])).is_err());
        assert!(parse_listing(pairs(&[("tags", "a:1")])).is_err());
    }
}
