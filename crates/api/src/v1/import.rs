//! `POST /tenants/{tenant}/devices/import`: bulk registration from JSON or CSV.

use std::collections::BTreeMap;

use axum::Json;
use axum::http::{HeaderMap, header};
use ferrohub_registry::model::{DeviceSpec, DeviceStatus};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, Body, Caller, parse_json};

/// Largest import body.
pub const IMPORT_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The CSV columns, in their documented order; only `id` is required.
pub const CSV_COLUMNS: [&str; 7] = ["id", "name", "type", "tags", "status", "policy", "groups"];

/// What an import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportReport {
    /// Data rows (CSV) or array elements (JSON) received.
    pub total: usize,
    /// Devices registered.
    pub imported: usize,
    /// Rows that were not registered, in input order.
    pub rejected: Vec<RejectedRow>,
}

/// A row that was not registered.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectedRow {
    /// Data row (CSV, not counting the header) or array element (JSON), from 1.
    pub row: usize,
    /// The device id on that row, if it could be read.
    pub id: String,
    /// Why it was refused.
    pub error: String,
}

/// One input row: its specification, or why it could not be read.
type Row = (String, Result<DeviceSpec, String>);

fn json_rows(body: &[u8]) -> Result<Vec<Row>, ApiError> {
    let items: Vec<serde_json::Value> = parse_json(body).map_err(|e| {
        ApiError::invalid(format!(
            "{}; send a JSON array of device specifications",
            e.message
        ))
    })?;
    Ok(items
        .into_iter()
        .map(|v| {
            let id = v
                .get("id")
                .and_then(|i| i.as_str())
                .unwrap_or_default()
                .to_string();
            let spec = serde_json::from_value::<DeviceSpec>(v).map_err(|e| e.to_string());
            (id, spec)
        })
        .collect())
}

fn csv_row(cols: &[usize], record: &csv::StringRecord) -> Row {
    let mut spec = DeviceSpec::default();
    let cell = |i: usize| record.get(i).map(str::trim).unwrap_or_default();
    let id = cell(cols[0]).to_string();
    spec.id = id.clone();
    let optional = |pos: usize| -> Option<String> {
        (cols[pos] != usize::MAX)
            .then(|| cell(cols[pos]))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    spec.name = optional(1);
    spec.device_type = optional(2);
    if let Some(tags) = optional(3) {
        let mut map = BTreeMap::new();
        for pair in tags.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return (
                    id,
                    Err(format!("tags: {pair:?} is not key=value (write k=v;k2=v2)")),
                );
            };
            map.insert(k.trim().to_string(), v.trim().to_string());
        }
        spec.tags = map;
    }
    if let Some(status) = optional(4) {
        spec.status = Some(match status.as_str() {
            "enabled" => DeviceStatus::Enabled,
            "disabled" => DeviceStatus::Disabled,
            _ => {
                return (
                    id,
                    Err(format!("status {status:?}: use enabled or disabled")),
                );
            }
        });
    }
    spec.policy = optional(5);
    if let Some(groups) = optional(6) {
        spec.groups = groups
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
    }
    (id, Ok(spec))
}

/// Reads CSV rows; a bad header refuses the whole file, a bad row only that row.
pub fn csv_rows(body: &[u8]) -> Result<Vec<Row>, ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(body);
    let header = reader
        .headers()
        .map_err(|e| ApiError::invalid(format!("the CSV header could not be read: {e}")))?
        .clone();
    // Column index of each known column, usize::MAX when absent.
    let mut cols = [usize::MAX; CSV_COLUMNS.len()];
    let mut unknown = Vec::new();
    for (i, name) in header.iter().enumerate() {
        let name = name.trim().trim_start_matches('\u{feff}');
        match CSV_COLUMNS.iter().position(|c| *c == name) {
            Some(p) if cols[p] != usize::MAX => {
                return Err(ApiError::invalid(format!(
                    "the CSV column {name} appears twice"
                )));
            }
            Some(p) => cols[p] = i,
            None => unknown.push(format!("{name:?}")),
        }
    }
    if !unknown.is_empty() {
        return Err(ApiError::invalid(format!(
            "unknown CSV column(s) {}: the columns are {} (only id is required)",
            unknown.join(", "),
            CSV_COLUMNS.join(",")
        )));
    }
    if cols[0] == usize::MAX {
        return Err(ApiError::invalid(format!(
            "the CSV header has no id column: the first line names the columns, from {}",
            CSV_COLUMNS.join(",")
        )));
    }
    let width = header.len();
    let mut rows = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) if r.len() != width => {
                let id = r.get(cols[0]).unwrap_or_default().trim().to_string();
                rows.push((
                    id,
                    Err(format!(
                        "the row has {} fields, the header has {width}",
                        r.len()
                    )),
                ));
            }
            Ok(r) => rows.push(csv_row(&cols, &r)),
            Err(e) => rows.push((String::new(), Err(format!("the row is not valid CSV: {e}")))),
        }
    }
    Ok(rows)
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Registers many devices at once (operator). The body is either a JSON array of device
/// specifications (`Content-Type: application/json`) or CSV (`Content-Type: text/csv`) whose
/// header names columns from `id,name,type,tags,status,policy,groups` (`tags` as `k=v;k2=v2`,
/// `groups` as `g1;g2`). Each row is validated on its own: the answer lists the rows that were
/// refused and why; the others are registered. Up to 64 MiB.
#[utoipa::path(post, path = "/tenants/{tenant}/devices/import", tag = "devices",
    params(("tenant" = String, Path, description = "Tenant id")),
    request_body(
        description = "A JSON array of DeviceSpec, or CSV with a header line",
        content(
            (Vec<DeviceSpec> = "application/json"),
            (String = "text/csv", example = "id,name,type,tags,status,policy,groups\nsensor-1,Boiler sensor,thermo,site=plant-a;floor=2,enabled,,boilers\n"),
        ),
    ),
    responses(
        (status = 200, description = "The import report", body = ImportReport),
        (status = 413, description = "The body is over 64 MiB (`payload_too_large`)", body = crate::error::ErrorBody),
        (status = 415, description = "Neither JSON nor CSV (`unsupported_media_type`)", body = crate::error::ErrorBody),
        CommonErrors,
    ))]
pub async fn import_devices(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Json<ImportReport>> {
    let mt = media_type(&headers);
    let rows = if mt == "application/json" || mt.ends_with("+json") {
        json_rows(&body)?
    } else if mt == "text/csv" || mt == "application/csv" {
        csv_rows(&body)?
    } else {
        return Err(ApiError::unsupported_media_type(format!(
            "the Content-Type is {:?}: send application/json (an array of device \
             specifications) or text/csv",
            if mt.is_empty() {
                "missing"
            } else {
                mt.as_str()
            }
        )));
    };
    let total = rows.len();
    let mut rejected = Vec::new();
    let mut specs = Vec::with_capacity(total);
    let mut spec_rows = Vec::with_capacity(total);
    let mut ids = Vec::with_capacity(total);
    for (i, (id, spec)) in rows.into_iter().enumerate() {
        match spec {
            Ok(s) => {
                specs.push(s);
                spec_rows.push(i);
            }
            Err(error) => rejected.push(RejectedRow {
                row: i + 1,
                id: id.clone(),
                error,
            }),
        }
        ids.push(id);
    }
    let report = c.registry.import_devices(&c.actor, &tenant, specs).await?;
    for (row, error) in spec_rows.into_iter().zip(report) {
        if let Some(error) = error {
            rejected.push(RejectedRow {
                row: row + 1,
                id: ids[row].clone(),
                error,
            });
        }
    }
    rejected.sort_by_key(|r| r.row);
    Ok(Json(ImportReport {
        total,
        imported: total - rejected.len(),
        rejected,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn csv_quoting_bom_and_empty_cells() {
        let body = "\u{feff}id,name,tags,groups,status\n\
                    a,\"Hall, left\",k=v; k2 = v2 ,g1;;g2 ,\n\
                    b,,,,disabled\n";
        let rows = csv_rows(body.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        let a = rows[0].1.as_ref().unwrap();
        assert_eq!(a.id, "a");
        assert_eq!(a.name.as_deref(), Some("Hall, left"));
        assert_eq!(a.tags.get("k2").map(String::as_str), Some("v2"));
        assert_eq!(a.groups, vec!["g1", "g2"]);
        assert_eq!(a.status, None);
        let b = rows[1].1.as_ref().unwrap();
        assert_eq!(b.name, None);
        assert!(b.tags.is_empty() && b.groups.is_empty());
        assert_eq!(b.status, Some(DeviceStatus::Disabled));
    }

    #[test]
    fn csv_header_errors_refuse_the_file() {
        let e = csv_rows(b"id,colour\n").err().unwrap();
        assert!(e.message.contains("\"colour\""), "{}", e.message);
        assert!(csv_rows(b"id,id\n").is_err());
        assert!(csv_rows(b"name\n").is_err());
        assert!(csv_rows(b"id\n").unwrap().is_empty());
    }
}
