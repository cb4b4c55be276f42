//! `ferrohub ctl telemetry`: a device's series, raw points, aggregates, fleet snapshots and fleet
//! aggregates, writes of device payloads, the tenant's telemetry settings
//! (`/tenants/{t}/devices/{d}/telemetry…`, `/tenants/{t}/telemetry/…`; see `docs/telemetry.md`),
//! and export jobs (in `export.rs`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{Value, json};

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, emit, emit_json, key_values, list, text};

/// The aggregate functions, in the API's order, with their column titles.
const FNS: [(&str, &str); 7] = [
    ("avg", "AVG"),
    ("min", "MIN"),
    ("max", "MAX"),
    ("sum", "SUM"),
    ("count", "COUNT"),
    ("first", "FIRST"),
    ("last", "LAST"),
];

#[derive(Subcommand, Debug)]
pub(super) enum TelemetryCmd {
    /// Lists a device's series: metric, kind of values, latest point.
    #[command(after_help = "Example:\n  ferrohub ctl telemetry series boiler-17")]
    Series {
        /// Device id.
        device: String,
    },
    /// Prints raw points of one series, oldest first (newest first with --desc).
    #[command(
        after_help = "Examples:\n  ferrohub ctl telemetry get boiler-17 temp --from 1h\n  \
        ferrohub ctl telemetry get boiler-17 temp --from 2026-01-31T00:00:00Z --to 2026-02-01T00:00:00Z --all -o json\n  \
        ferrohub ctl telemetry get web1 'cpu.usage_user{cpu=cpu0}' --desc --limit 10"
    )]
    Get {
        /// Device id.
        device: String,
        /// Metric name.
        metric: String,
        #[command(flatten)]
        range: RangeArgs,
        /// Points per page, 1 to 100000 (default 1000; 10000 with --all).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: Option<u32>,
        /// Newest first.
        #[arg(long)]
        desc: bool,
        /// Fetch every page of the range (follows the cursors).
        #[arg(long)]
        all: bool,
        /// Start at this page (the cursor printed after the previous one).
        #[arg(long, conflicts_with = "all", value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Prints bucketed aggregates of one series.
    #[command(
        after_help = "Examples:\n  ferrohub ctl telemetry agg boiler-17 temp --bucket 1h\n  \
        ferrohub ctl telemetry agg boiler-17 temp --bucket 15m --fn avg,max --from 6h"
    )]
    Agg {
        /// Device id.
        device: String,
        /// Metric name.
        metric: String,
        /// Bucket width: 30s, 15m, 1h, 1d (aligned to UTC).
        #[arg(long, value_name = "DURATION")]
        bucket: String,
        /// Functions, separated by commas: avg, min, max, sum, count, first, last (default: all).
        #[arg(long = "fn", value_name = "FNS")]
        fns: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Prints the latest value of a metric for every device of a selection (default: every
    /// device that has the metric).
    #[command(after_help = "Examples:\n  ferrohub ctl telemetry latest temp\n  \
        ferrohub ctl telemetry latest temp --tag site=plant-a --all\n  \
        ferrohub ctl telemetry latest temp --group wave-1\n  \
        ferrohub ctl telemetry latest temp --devices boiler-1,boiler-2")]
    Latest {
        /// Metric name.
        metric: String,
        #[command(flatten)]
        selection: SelectionArgs,
        /// Devices per page, 1 to 10000 (default 1000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
        /// Fetch every page (follows the cursors).
        #[arg(long)]
        all: bool,
        /// Start at this page (the cursor printed after the previous one).
        #[arg(long, conflicts_with = "all", value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Prints bucketed aggregates of a metric over a selection of devices: one group for all,
    /// one per device, or one per value of a registry tag.
    #[command(
        name = "fleet-agg",
        after_help = "Examples:\n  ferrohub ctl telemetry fleet-agg temp --bucket 1h --by tag:site\n  \
        ferrohub ctl telemetry fleet-agg temp --bucket 1d --from 7d --fn avg,max --group wave-1\n  \
        ferrohub ctl telemetry fleet-agg temp --bucket 15m --by device --tag site=plant-a"
    )]
    FleetAgg {
        /// Metric name.
        metric: String,
        /// Bucket width: 30s, 15m, 1h, 1d (aligned to UTC).
        #[arg(long, value_name = "DURATION")]
        bucket: String,
        /// Functions, separated by commas: avg, min, max, sum, count, first, last (default: all).
        #[arg(long = "fn", value_name = "FNS")]
        fns: Option<String>,
        /// Groups: `device`, or `tag:<key>` (a registry tag, e.g. tag:site); default one group.
        #[arg(long, value_name = "device|tag:KEY")]
        by: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Writes a device payload as telemetry (the same formats and shapes as over MQTT) and
    /// prints how many points were stored; exits with status 1 if points were refused.
    #[command(
        after_help = "Examples:\n  ferrohub ctl telemetry write boiler-17 '{\"temp\": 21.5, \"hum\": 40}'\n  \
        ferrohub ctl telemetry write boiler-17 --file backlog.json\n  \
        ferrohub ctl telemetry write boiler-17 --file reading.cbor --format cbor"
    )]
    Write {
        /// Device id.
        device: String,
        /// The payload (JSON), or `-` for standard input.
        #[arg(
            value_name = "PAYLOAD",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        payload: Option<String>,
        /// Read the payload from this file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Format of the payload (default: from the file's extension .cbor/.msgpack, else JSON).
        #[arg(long, value_enum)]
        format: Option<PayloadFormat>,
    },
    /// Shows the tenant's telemetry settings, or changes them (admin): retention, telemetry topic
    /// filters, default payload format.
    #[command(after_help = "Examples:\n  ferrohub ctl telemetry settings\n  \
        ferrohub ctl telemetry settings --retention-days 90\n  \
        ferrohub ctl telemetry settings --retention-forever\n  \
        ferrohub ctl telemetry settings --topics 'plant/+/sensors/#,devices/+/telemetry/#' --format json\n  \
        ferrohub ctl telemetry settings --retention-default --topics-default --format-default")]
    Settings(SettingsArgs),
    /// Exports a time range of the tenant's telemetry to Parquet or CSV files, written by the hub
    /// in its export folder or an S3-compatible store; waits for the job under a progress bar and
    /// prints the files, rows and bytes (exit status 1 if the job fails).
    #[command(
        after_help = "Examples:\n  ferrohub ctl telemetry export --destination 2026-q1 --format csv --from 2026-01-01T00:00:00Z --to 2026-04-01T00:00:00Z\n  \
        ferrohub ctl telemetry export -d s3://archive/ferrohub --from 7d --devices boiler-1,boiler-2 --metrics temp\n  \
        ferrohub ctl telemetry export -d nightly --from 1d --no-wait -o json | jq .id\n\n\
        A local destination is a relative folder inside the hub's export folder \
        (data_dir/telemetry/exports/) on the hub's machine;\ns3:// destinations use the hub's \
        AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN."
    )]
    Export(super::export::ExportArgs),
    /// Lists the tenant's export jobs, newest first (the hub keeps the last 100 since it started).
    #[command(after_help = "Example:\n  ferrohub ctl telemetry exports")]
    Exports,
    /// Shows an export job: state, progress, and when finished its files and bytes or its error
    /// (exit status 1 if it failed); --wait follows a running job to its end.
    #[command(
        name = "export-status",
        after_help = "Examples:\n  ferrohub ctl telemetry export-status 3\n  \
        ferrohub ctl telemetry export-status 3 --wait"
    )]
    ExportStatus {
        /// Job id (printed by `export`, listed by `exports`).
        id: u64,
        /// Wait for a running job to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
}

/// A time range.
#[derive(clap::Args, Debug, Default)]
pub(super) struct RangeArgs {
    /// From this time: RFC 3339 (2026-01-31T08:00:00Z), a duration ago (15m, 1h, 7d),
    /// milliseconds since the epoch, or `now` [default: 24 hours ago].
    #[arg(long, value_name = "TIME", value_parser = parse_when, allow_hyphen_values = true)]
    from: Option<String>,
    /// Until this time, exclusive (same forms) [default: now].
    #[arg(long, value_name = "TIME", value_parser = parse_when, allow_hyphen_values = true)]
    to: Option<String>,
}

impl RangeArgs {
    fn push(&self, q: &mut Vec<(&'static str, String)>) {
        if let Some(f) = &self.from {
            q.push(("from", f.clone()));
        }
        if let Some(t) = &self.to {
            q.push(("to", t.clone()));
        }
    }
}

/// Which devices a fleet command covers (all given filters must match).
#[derive(clap::Args, Debug, Default)]
pub(super) struct SelectionArgs {
    /// Members of this static or dynamic group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Devices with this registry tag; repeat for several (all must match).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Devices of this type.
    #[arg(long = "type", value_name = "TYPE")]
    device_type: Option<String>,
    /// These devices (ids separated by commas).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    devices: Vec<String>,
}

impl SelectionArgs {
    fn push(&self, q: &mut Vec<(&'static str, String)>) {
        if let Some(g) = &self.group {
            q.push(("group", g.clone()));
        }
        for (k, v) in &self.tags {
            q.push(("tag", format!("{k}:{v}")));
        }
        if let Some(t) = &self.device_type {
            q.push(("type", t.clone()));
        }
        if !self.devices.is_empty() {
            q.push(("devices", self.devices.join(",")));
        }
    }
}

/// Format of a device payload.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PayloadFormat {
    /// Detect it (JSON, else CBOR, else MessagePack).
    Auto,
    /// JSON.
    Json,
    /// CBOR.
    Cbor,
    /// MessagePack.
    Msgpack,
}

impl PayloadFormat {
    fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Auto => "auto",
            PayloadFormat::Json => "json",
            PayloadFormat::Cbor => "cbor",
            PayloadFormat::Msgpack => "msgpack",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            PayloadFormat::Auto => "application/octet-stream",
            PayloadFormat::Json => "application/json",
            PayloadFormat::Cbor => "application/cbor",
            PayloadFormat::Msgpack => "application/msgpack",
        }
    }
}

/// `telemetry settings`.
#[derive(clap::Args, Debug)]
pub(super) struct SettingsArgs {
    /// Keep points this many days (1 to 36500).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500),
          conflicts_with_all = ["retention_default", "retention_forever"])]
    retention_days: Option<u32>,
    /// Keep points as long as the hub's default (`[telemetry] retention_days`).
    #[arg(long, conflicts_with = "retention_forever")]
    retention_default: bool,
    /// Keep points forever.
    #[arg(long)]
    retention_forever: bool,
    /// Topic filters whose publications are telemetry, separated by commas (the device is the
    /// level of the first `+`).
    #[arg(
        long,
        value_name = "FILTERS",
        value_delimiter = ',',
        conflicts_with = "topics_default"
    )]
    topics: Option<Vec<String>>,
    /// Use the hub's telemetry topic filters.
    #[arg(long)]
    topics_default: bool,
    /// Payload format when a publication does not say.
    #[arg(long, value_enum, conflicts_with = "format_default")]
    format: Option<PayloadFormat>,
    /// Use the hub's payload format.
    #[arg(long)]
    format_default: bool,
}

impl SettingsArgs {
    fn changes_something(&self) -> bool {
        self.retention_days.is_some()
            || self.retention_default
            || self.retention_forever
            || self.topics.is_some()
            || self.topics_default
            || self.format.is_some()
            || self.format_default
    }
}

/// `KEY=VALUE` or `KEY:VALUE` (split at the first `=`, else at the first `:`).
fn parse_tag(s: &str) -> Result<(String, String), String> {
    let split = s.split_once('=').or_else(|| s.split_once(':'));
    match split {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE (e.g. site=plant-a)")),
    }
}

/// A time for the API: `now`, milliseconds, or an RFC 3339 time or a duration ago converted to
/// milliseconds.
fn parse_when(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "now" || s.parse::<i64>().is_ok() {
        return Ok(s.to_string());
    }
    super::parse_time(s.strip_prefix('-').unwrap_or(s)).map(|ms| ms.to_string())
}

/// A point's value as text.
fn value_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The functions asked for, in the API's order (all when `fns` is absent).
fn fn_columns(fns: Option<&str>) -> Vec<(&'static str, &'static str)> {
    let Some(fns) = fns.map(str::trim).filter(|f| !f.is_empty() && *f != "all") else {
        return FNS.to_vec();
    };
    let wanted: Vec<&str> = fns.split(',').map(str::trim).collect();
    FNS.iter()
        .copied()
        .filter(|(name, _)| wanted.contains(name))
        .collect()
}

fn series_table(v: &Value) -> Table {
    let mut t = Table::new(&["METRIC", "KIND", "LATEST", "TIME"]);
    for s in v.as_array().into_iter().flatten() {
        t.row(vec![
            text(s, "metric"),
            text(s, "kind"),
            value_text(s.get("latest")),
            text(s, "latest_time"),
        ]);
    }
    t
}

fn points_table(points: &[Value]) -> Table {
    let mut t = Table::new(&["TIME", "VALUE"]);
    for p in points {
        t.row(vec![text(p, "time"), value_text(p.get("value"))]);
    }
    t
}

fn bucket_cells(b: &Value, cols: &[(&'static str, &'static str)]) -> Vec<String> {
    let mut row = vec![text(b, "time")];
    row.extend(cols.iter().map(|(name, _)| text(b, name)));
    row
}

fn buckets_table(v: &Value, cols: &[(&'static str, &'static str)]) -> Table {
    let mut header = vec!["TIME"];
    header.extend(cols.iter().map(|(_, title)| *title));
    let mut t = Table::new(&header);
    for b in v
        .get("buckets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        t.row(bucket_cells(b, cols));
    }
    t
}

fn groups_table(v: &Value, cols: &[(&'static str, &'static str)]) -> Table {
    let mut header = vec!["GROUP", "SERIES", "TIME"];
    header.extend(cols.iter().map(|(_, title)| *title));
    let mut t = Table::new(&header);
    for g in v
        .get("groups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = match g.get("group") {
            None | Some(Value::Null) => "(none)".to_string(),
            Some(v) => value_text(Some(v)),
        };
        for b in g
            .get("buckets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut row = vec![name.clone(), text(g, "series")];
            row.extend(bucket_cells(b, cols));
            t.row(row);
        }
    }
    t
}

fn latest_table(items: &[Value]) -> Table {
    let mut t = Table::new(&["DEVICE", "TIME", "VALUE"]);
    for x in items {
        t.row(vec![
            text(x, "device"),
            text(x, "time"),
            value_text(x.get("value")),
        ]);
    }
    t
}

fn show_settings(v: &Value) -> String {
    let eff = v.get("effective").cloned().unwrap_or(Value::Null);
    let retention = match eff.get("retention_days").and_then(Value::as_u64) {
        None => "forever".to_string(),
        Some(d) => format!("{d} days"),
    };
    let default_note = |own: bool| if own { "" } else { " (hub default)" };
    let own_retention = v.get("retention_days").is_some_and(|d| !d.is_null())
        || v.get("keep_forever").and_then(Value::as_bool) == Some(true);
    key_values(&[
        (
            "retention",
            format!("{retention}{}", default_note(own_retention)),
        ),
        (
            "topics",
            format!(
                "{}{}",
                list(eff.get("topics")),
                default_note(v.get("topics").is_some_and(|t| !t.is_null()))
            ),
        ),
        (
            "format",
            format!(
                "{}{}",
                text(&eff, "format"),
                default_note(v.get("format").is_some_and(|f| !f.is_null()))
            ),
        ),
    ])
}

/// Reads a payload: the argument, standard input (`-`) or a file.
fn read_payload(arg: Option<&str>, file: Option<&PathBuf>) -> Result<Vec<u8>> {
    if let Some(path) = file {
        return std::fs::read(path).with_context(|| format!("reading --file {}", path.display()));
    }
    match arg {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from standard input")?;
            Ok(buf)
        }
        Some(p) => Ok(p.as_bytes().to_vec()),
        None => Err(Failure::new(
            "no payload",
            Some(
                "give it as an argument ('{\"temp\": 21.5}'), `-` for standard input, or --file"
                    .into(),
            ),
        )
        .into()),
    }
}

/// Runs a `telemetry` command; returns the exit status.
pub(super) async fn run(ctx: &Ctx, cmd: TelemetryCmd) -> Result<i32> {
    let c = &ctx.client;
    let tenant = ctx.tenant.as_str();
    match cmd {
        TelemetryCmd::Series { device } => {
            let v = c
                .get(&["tenants", tenant, "devices", &device, "telemetry"], &[])
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => series_table(&v).emit(&format!(
                    "device {device} has no telemetry in tenant {tenant}"
                ))?,
            }
        }
        TelemetryCmd::Get {
            device,
            metric,
            range,
            limit,
            desc,
            all,
            cursor,
        } => {
            let mut q = Vec::new();
            range.push(&mut q);
            q.push((
                "limit",
                limit.unwrap_or(if all { 10_000 } else { 1000 }).to_string(),
            ));
            if desc {
                q.push(("order", "desc".into()));
            }
            let path = [
                "tenants",
                tenant,
                "devices",
                device.as_str(),
                "telemetry",
                metric.as_str(),
            ];
            let mut points = Vec::new();
            let mut cursor = cursor;
            let next = loop {
                let mut page_q = q.clone();
                if let Some(cur) = &cursor {
                    page_q.push(("cursor", cur.clone()));
                }
                let page = c.get(&path, &page_q).await?;
                points.extend(
                    page.get("points")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
                let next = page
                    .get("next_cursor")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                match next {
                    Some(n) if all => {
                        if cursor.as_deref() == Some(n.as_str()) {
                            return Err(Failure::new(
                                "the hub returned the same cursor twice",
                                None,
                            )
                            .into());
                        }
                        cursor = Some(n);
                    }
                    next => break next,
                }
            };
            if ctx.output == Output::Json {
                emit_json(&json!({ "points": points, "next_cursor": next }))?;
                return Ok(0);
            }
            points_table(&points).emit(&format!(
                "no points of {metric} for device {device} in the range"
            ))?;
            if let Some(n) = next {
                eprintln!("more points: add --all, or --cursor {n} for the next page");
            }
        }
        TelemetryCmd::Agg {
            device,
            metric,
            bucket,
            fns,
            range,
        } => {
            let mut q = vec![("bucket", bucket)];
            if let Some(f) = &fns {
                q.push(("fn", f.clone()));
            }
            range.push(&mut q);
            let v = c
                .get(
                    &[
                        "tenants",
                        tenant,
                        "devices",
                        &device,
                        "telemetry",
                        &metric,
                        "aggregate",
                    ],
                    &q,
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => buckets_table(&v, &fn_columns(fns.as_deref())).emit(&format!(
                    "no points of {metric} for device {device} in the range"
                ))?,
            }
        }
        TelemetryCmd::Latest {
            metric,
            selection,
            limit,
            all,
            cursor,
        } => {
            let mut q = vec![("metric", metric.clone())];
            selection.push(&mut q);
            q.push((
                "limit",
                limit.unwrap_or(if all { 10_000 } else { 1000 }).to_string(),
            ));
            let (items, next) = c
                .get_pages(
                    &["tenants", tenant, "telemetry", "latest"],
                    &q,
                    cursor,
                    all,
                    "next_cursor",
                )
                .await?;
            if ctx.output == Output::Json {
                emit_json(&json!({ "metric": metric, "items": items, "next_cursor": next }))?;
                return Ok(0);
            }
            latest_table(&items).emit(&format!("no device of the selection has {metric}"))?;
            if let Some(n) = next {
                eprintln!("more devices: add --all, or --cursor {n} for the next page");
            }
        }
        TelemetryCmd::FleetAgg {
            metric,
            bucket,
            fns,
            by,
            range,
            selection,
        } => {
            let mut q = vec![("metric", metric.clone()), ("bucket", bucket)];
            if let Some(f) = &fns {
                q.push(("fn", f.clone()));
            }
            if let Some(b) = by {
                q.push(("by", b));
            }
            range.push(&mut q);
            selection.push(&mut q);
            let v = c
                .get(&["tenants", tenant, "telemetry", "aggregate"], &q)
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => groups_table(&v, &fn_columns(fns.as_deref()))
                    .emit(&format!("no points of {metric} in the range"))?,
            }
        }
        TelemetryCmd::Write {
            device,
            payload,
            file,
            format,
        } => {
            let bytes = read_payload(payload.as_deref(), file.as_ref())?;
            let format = format.unwrap_or_else(|| {
                match file
                    .as_ref()
                    .and_then(|f| f.extension())
                    .and_then(|e| e.to_str())
                {
                    Some("cbor") => PayloadFormat::Cbor,
                    Some("msgpack" | "mp") => PayloadFormat::Msgpack,
                    _ => PayloadFormat::Json,
                }
            });
            let v = c
                .call(
                    Method::POST,
                    &["tenants", tenant, "devices", &device, "telemetry"],
                    &[],
                    Body::Raw(format.content_type(), bytes),
                )
                .await?;
            let rejected: Vec<String> = v
                .get("rejected")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|r| value_text(Some(r)))
                .collect();
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => emit(&format!(
                    "stored {} point(s) for device {device}\n",
                    text(&v, "points")
                ))?,
            }
            if !rejected.is_empty() {
                for r in &rejected {
                    eprintln!("refused: {r}");
                }
                eprintln!(
                    "{} point(s) refused: a series keeps the kind of its first value (number, \
                     boolean or string)",
                    rejected.len()
                );
                return Ok(1);
            }
        }
        TelemetryCmd::Export(a) => return super::export::export(ctx, a).await,
        TelemetryCmd::Exports => return super::export::list(ctx).await,
        TelemetryCmd::ExportStatus { id, wait } => {
            return super::export::status(ctx, id, wait).await;
        }
        TelemetryCmd::Settings(a) => {
            let path = ["tenants", tenant, "telemetry", "settings"];
            let mut v = c.get(&path, &[]).await?;
            if a.changes_something() {
                let mut body = json!({
                    "retention_days": v.get("retention_days").cloned().unwrap_or(Value::Null),
                    "keep_forever": v.get("keep_forever").cloned().unwrap_or(Value::Bool(false)),
                    "topics": v.get("topics").cloned().unwrap_or(Value::Null),
                    "format": v.get("format").cloned().unwrap_or(Value::Null),
                });
                if let Some(d) = a.retention_days {
                    body["retention_days"] = json!(d);
                    body["keep_forever"] = json!(false);
                }
                if a.retention_default {
                    body["retention_days"] = Value::Null;
                    body["keep_forever"] = json!(false);
                }
                if a.retention_forever {
                    body["retention_days"] = Value::Null;
                    body["keep_forever"] = json!(true);
                }
                if let Some(t) = a.topics {
                    body["topics"] = json!(t);
                }
                if a.topics_default {
                    body["topics"] = Value::Null;
                }
                if let Some(f) = a.format {
                    body["format"] = json!(f.as_str());
                }
                if a.format_default {
                    body["format"] = Value::Null;
                }
                v = c.call(Method::PUT, &path, &[], Body::Json(body)).await?;
            }
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => emit(&show_settings(&v))?,
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        assert_eq!(
            parse_tag("site=plant-a"),
            Ok(("site".into(), "plant-a".into()))
        );
        assert_eq!(
            parse_tag("site:plant-a"),
            Ok(("site".into(), "plant-a".into()))
        );
        assert_eq!(
            parse_tag("url=http://x"),
            Ok(("url".into(), "http://x".into()))
        );
        assert!(parse_tag("plant").is_err());
        assert_eq!(parse_when("now"), Ok("now".into()));
        assert_eq!(parse_when("1000"), Ok("1000".into()));
        assert_eq!(parse_when("1970-01-01T00:00:01Z"), Ok("1000".into()));
        let ago: i64 = parse_when("-1h").unwrap_or_default().parse().unwrap_or(0);
        let ago2: i64 = parse_when("1h").unwrap_or_default().parse().unwrap_or(0);
        assert!((ago - ago2).abs() < 5_000 && ago > 0);
        assert!(parse_when("yesterday").is_err());
        assert_eq!(fn_columns(None).len(), 7);
        assert_eq!(
            fn_columns(Some("max,avg")),
            vec![("avg", "AVG"), ("max", "MAX")]
        );
    }

    #[test]
    fn tables() {
        let v = json!({"bucket_ms": 3600000, "buckets": [
            {"start": 0, "time": "1970-01-01T00:00:00.000Z", "avg": 1.5, "max": 2.0}]});
        let r = buckets_table(&v, &fn_columns(Some("avg,max"))).render();
        assert_eq!(
            r,
            "TIME                      AVG  MAX\n1970-01-01T00:00:00.000Z  1.5  2.0\n"
        );
        let g = json!({"groups": [{"group": null, "series": 2, "buckets": [
            {"start": 0, "time": "T", "count": 3}]}]});
        let r = groups_table(&g, &fn_columns(Some("count"))).render();
        assert!(r.contains("(none)  2       T     3"), "{r}");
        let s = show_settings(
            &json!({"retention_days": null, "keep_forever": true, "topics": null,
            "format": "json", "effective": {"retention_days": null, "keep_forever": true,
            "topics": ["devices/+/telemetry/#"], "format": "json"}}),
        );
        assert!(s.contains("forever\n"), "{s}");
        assert!(s.contains("devices/+/telemetry/# (hub default)"), "{s}");
        assert!(s.contains("json\n"), "{s}");
    }
}
