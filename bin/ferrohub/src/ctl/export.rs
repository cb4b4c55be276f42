//! `ferrohub ctl telemetry export`, `exports` and `export-status`: export jobs of the hub
//! (`POST /tenants/{t}/telemetry/exports`, `GET …/exports`, `GET …/exports/{id}`; see
//! `docs/telemetry.md#export`).
//!
//! `export` starts a job and, unless `--no-wait`, polls it under a progress bar (on stderr, hidden
//! when stderr is not a terminal or with `-o json`) until it ends, then prints the finished job. A
//! failed job is printed too, and the command exits with status 1 and the job's error.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, emit, emit_json, key_values, text, time};

/// First pause between two polls of a running job; it doubles up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(100);
/// Longest pause between two polls.
const POLL_MAX: Duration = Duration::from_secs(1);

/// File format of an export.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExportFormat {
    /// Apache Parquet (columns tenant, device, metric, ts, value_float|int|bool|str).
    Parquet,
    /// CSV: tenant,device,metric,ts,value,type with RFC 3339 times.
    Csv,
}

impl ExportFormat {
    fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Parquet => "parquet",
            ExportFormat::Csv => "csv",
        }
    }
}

/// `telemetry export`.
#[derive(clap::Args, Debug)]
pub(super) struct ExportArgs {
    /// Where the hub writes the files: a relative folder inside the hub's export folder
    /// (`data_dir/telemetry/exports/`), or `s3://bucket/prefix` for an S3-compatible store, whose
    /// endpoint and credentials come from the hub's environment (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    #[arg(long, short = 'd', value_name = "FOLDER|s3://BUCKET/PREFIX")]
    pub(super) destination: String,
    /// File format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Parquet)]
    pub(super) format: ExportFormat,
    /// From this time (inclusive): RFC 3339 (2026-01-31T08:00:00Z), a duration ago (15m, 1h,
    /// 7d), milliseconds since the epoch, or `now` (durations and `now` by the hub's clock).
    #[arg(long, value_name = "TIME", value_parser = parse_when, allow_hyphen_values = true)]
    pub(super) from: Value,
    /// Until this time, exclusive (same forms) [default: now].
    #[arg(long, value_name = "TIME", value_parser = parse_when, allow_hyphen_values = true)]
    pub(super) to: Option<Value>,
    /// Only these devices (ids separated by commas) [default: every device].
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub(super) devices: Vec<String>,
    /// Only these metrics (names separated by commas) [default: every metric].
    #[arg(long, value_name = "METRICS", value_delimiter = ',')]
    pub(super) metrics: Vec<String>,
    /// File name stem [default: telemetry-<job id>].
    #[arg(long, value_name = "STEM")]
    pub(super) name: Option<String>,
    /// Start the job and print it without waiting for it to finish (follow it with
    /// `export-status ID --wait`).
    #[arg(long)]
    pub(super) no_wait: bool,
}

impl ExportArgs {
    /// The API's request body (without `to`, the hub exports up to its now).
    fn request(&self) -> Value {
        let mut body = Map::new();
        body.insert("destination".into(), json!(self.destination));
        body.insert("format".into(), json!(self.format.as_str()));
        body.insert("from".into(), self.from.clone());
        if let Some(to) = &self.to {
            body.insert("to".into(), to.clone());
        }
        if !self.devices.is_empty() {
            body.insert("devices".into(), json!(self.devices));
        }
        if !self.metrics.is_empty() {
            body.insert("metrics".into(), json!(self.metrics));
        }
        if let Some(n) = &self.name {
            body.insert("name".into(), json!(n));
        }
        Value::Object(body)
    }
}

/// A time for the export body, checked here and resolved by the hub (so `now` and durations
/// follow the hub's clock): milliseconds stay a number; `now` and RFC 3339 times are sent as
/// written; a duration ago (`1h` or `-1h`) is sent as `-1h`.
fn parse_when(s: &str) -> Result<Value, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(json!("now"));
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(json!(ms));
    }
    if humantime::parse_rfc3339_weak(s).is_ok() {
        return Ok(json!(s));
    }
    let ago = s.strip_prefix('-').unwrap_or(s);
    if humantime::parse_duration(ago).is_ok() {
        return Ok(json!(format!("-{ago}")));
    }
    Err(format!(
        "{s:?} is not a time: give an RFC 3339 time (2026-01-31T08:00:00Z), a duration ago (15m, \
         1h, 7d), milliseconds since the epoch, or `now`"
    ))
}

/// Bytes for people: `512 B`, `47.1 KiB`, `3.2 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn state(job: &Value) -> &str {
    job.get("state").and_then(Value::as_str).unwrap_or("")
}

fn u64_of(job: &Value, key: &str) -> u64 {
    job.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// One job as key/value lines, a `file:` line per file.
fn job_view(job: &Value) -> String {
    let mut items = vec![
        ("id", text(job, "id")),
        ("state", text(job, "state")),
        ("destination", text(job, "destination")),
        ("format", text(job, "format")),
        ("rows", text(job, "rows")),
        (
            "series",
            format!(
                "{} of {}",
                u64_of(job, "series_done"),
                u64_of(job, "series_total")
            ),
        ),
    ];
    if state(job) == "succeeded" {
        let bytes = u64_of(job, "bytes");
        items.push(("bytes", format!("{bytes} ({})", human_bytes(bytes))));
    }
    items.push(("started", time(job, "started_at")));
    if job.get("finished_at").is_some_and(|f| !f.is_null()) {
        items.push(("finished", time(job, "finished_at")));
    }
    if let Some(e) = job.get("error").filter(|e| !e.is_null()) {
        items.push(("error", value_str(e)));
    }
    for f in job
        .get("files")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        items.push(("file", value_str(f)));
    }
    key_values(&items)
}

fn value_str(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Jobs, newest first, one per line.
fn jobs_table(jobs: &[Value]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "FORMAT",
        "ROWS",
        "SERIES",
        "BYTES",
        "STARTED",
        "DESTINATION",
    ]);
    for j in jobs {
        t.row(vec![
            text(j, "id"),
            text(j, "state"),
            text(j, "format"),
            text(j, "rows"),
            format!("{}/{}", u64_of(j, "series_done"), u64_of(j, "series_total")),
            if state(j) == "succeeded" {
                human_bytes(u64_of(j, "bytes"))
            } else {
                "-".into()
            },
            time(j, "started_at"),
            text(j, "destination"),
        ]);
    }
    t
}

/// The progress bar of a running job: series done of total, rows so far. Hidden when stderr is
/// not a terminal or the output is JSON.
fn progress_bar(ctx: &Ctx, id: u64) -> ProgressBar {
    if ctx.output == Output::Json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} export {id} [{{elapsed_precise}}] [{{bar:40}}] {{pos}}/{{len}} series, {{msg}}"
    ))
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message("0 rows");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show_progress(bar: &ProgressBar, job: &Value) {
    bar.set_length(u64_of(job, "series_total"));
    bar.set_position(u64_of(job, "series_done"));
    bar.set_message(format!("{} rows", u64_of(job, "rows")));
}

/// Polls a job until it is no longer running; returns it as it ended.
async fn wait(ctx: &Ctx, id: u64, first: Value) -> Result<Value> {
    let id_text = id.to_string();
    let path = [
        "tenants",
        ctx.tenant.as_str(),
        "telemetry",
        "exports",
        id_text.as_str(),
    ];
    let bar = progress_bar(ctx, id);
    let mut job = first;
    let mut pause = POLL_MIN;
    while state(&job) == "running" {
        show_progress(&bar, &job);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
        job = match ctx.client.get(&path, &[]).await {
            Ok(j) => j,
            Err(e) => {
                bar.finish_and_clear();
                let what = format!("following export {id} failed");
                let has_hint = e
                    .chain()
                    .filter_map(|c| c.downcast_ref::<Failure>())
                    .any(|f| f.hint.is_some());
                let hint = if e
                    .chain()
                    .any(|c| c.to_string().contains(&format!("export {id} not found")))
                {
                    "the hub keeps export jobs in memory: was it restarted? start the export again"
                        .to_string()
                } else if has_hint {
                    return Err(e.context(what));
                } else {
                    format!(
                        "the export may still be running on the hub: follow it with \
                         `ferrohub ctl telemetry export-status {id} --wait`"
                    )
                };
                return Err(e.context(Failure::new(what, Some(hint))));
            }
        };
    }
    show_progress(&bar, &job);
    bar.finish_and_clear();
    Ok(job)
}

/// Prints a job; a failed one also becomes the command's error (exit status 1).
fn finish(ctx: &Ctx, job: &Value) -> Result<i32> {
    match ctx.output {
        Output::Json => emit_json(job)?,
        Output::Table => emit(&job_view(job))?,
    }
    if state(job) == "failed" {
        let why = job
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return Err(Failure::new(
            format!("export {} failed: {why}", text(job, "id")),
            Some(
                "nothing was left under a final file name; fix the cause (for s3://, the hub's \
                 AWS_* environment) and start the export again"
                    .into(),
            ),
        )
        .into());
    }
    Ok(0)
}

/// `telemetry export`.
pub(super) async fn export(ctx: &Ctx, a: ExportArgs) -> Result<i32> {
    let body = a.request();
    let job = ctx
        .client
        .call(
            Method::POST,
            &["tenants", ctx.tenant.as_str(), "telemetry", "exports"],
            &[],
            Body::Json(body),
        )
        .await?;
    let Some(id) = job.get("id").and_then(Value::as_u64) else {
        return Err(Failure::new(
            format!("the hub's answer names no export job: {job}"),
            Some("is the hub older than this ctl?".into()),
        )
        .into());
    };
    if a.no_wait {
        match ctx.output {
            Output::Json => emit_json(&job)?,
            Output::Table => {
                emit(&job_view(&job))?;
                eprintln!(
                    "export {id} started; follow it with: ferrohub ctl telemetry export-status {id} --wait"
                );
            }
        }
        return Ok(0);
    }
    let job = wait(ctx, id, job).await?;
    finish(ctx, &job)
}

/// `telemetry export-status ID [--wait]`.
pub(super) async fn status(ctx: &Ctx, id: u64, wait_for_end: bool) -> Result<i32> {
    let id_text = id.to_string();
    let job = ctx
        .client
        .get(
            &[
                "tenants",
                ctx.tenant.as_str(),
                "telemetry",
                "exports",
                id_text.as_str(),
            ],
            &[],
        )
        .await?;
    let job = if wait_for_end {
        wait(ctx, id, job).await?
    } else {
        job
    };
    finish(ctx, &job)
}

/// `telemetry exports`.
pub(super) async fn list(ctx: &Ctx) -> Result<i32> {
    let v = ctx
        .client
        .get(
            &["tenants", ctx.tenant.as_str(), "telemetry", "exports"],
            &[],
        )
        .await?;
    match ctx.output {
        Output::Json => emit_json(&v)?,
        Output::Table => {
            let jobs: Vec<Value> = v.as_array().cloned().unwrap_or_default();
            jobs_table(&jobs).emit(&format!(
                "no export jobs in tenant {} (the hub keeps the last 100 since it started)",
                ctx.tenant
            ))?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies() {
        let a = ExportArgs {
            destination: "q1".into(),
            format: ExportFormat::Csv,
            from: json!(1000),
            to: None,
            devices: vec!["d1".into(), "d2".into()],
            metrics: vec![],
            name: None,
            no_wait: false,
        };
        assert_eq!(
            a.request(),
            json!({"destination": "q1", "format": "csv", "from": 1000, "devices": ["d1", "d2"]})
        );
        let a = ExportArgs {
            destination: "s3://b/p".into(),
            format: ExportFormat::Parquet,
            from: json!("-7d"),
            to: Some(json!("2026-01-01T00:00:00Z")),
            devices: vec![],
            metrics: vec!["temp".into()],
            name: Some("x".into()),
            no_wait: true,
        };
        assert_eq!(
            a.request(),
            json!({"destination": "s3://b/p", "format": "parquet", "from": "-7d",
                   "to": "2026-01-01T00:00:00Z", "metrics": ["temp"], "name": "x"})
        );
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(parse_when("1000"), Ok(json!(1000)));
        assert_eq!(parse_when(" -5 "), Ok(json!(-5)));
        assert_eq!(
            parse_when("1970-01-01T00:00:01Z"),
            Ok(json!("1970-01-01T00:00:01Z"))
        );
        assert_eq!(parse_when("1h"), Ok(json!("-1h")));
        assert_eq!(parse_when("-1h"), Ok(json!("-1h")));
        assert_eq!(parse_when("7d"), Ok(json!("-7d")));
        assert_eq!(parse_when("now"), Ok(json!("now")));
        assert!(parse_when("yesterday").is_err());
        assert!(parse_when("-").is_err());
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(48_213), "47.1 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn views() {
        let job = json!({"id": 3, "tenant": "t", "state": "succeeded", "destination": "/x/q1",
            "format": "csv", "rows": 24, "series_done": 2, "series_total": 2,
            "files": ["/x/q1/telemetry-3.csv"], "bytes": 2048, "started_at": 1000,
            "finished_at": 2000});
        let v = job_view(&job);
        assert!(v.contains("state:        succeeded\n"), "{v}");
        assert!(v.contains("series:       2 of 2\n"), "{v}");
        assert!(v.contains("bytes:        2048 (2.0 KiB)\n"), "{v}");
        assert!(v.contains("file:         /x/q1/telemetry-3.csv\n"), "{v}");
        assert!(!v.contains("error"), "{v}");
        let failed = json!({"id": 4, "state": "failed", "error": "no\u{1b}[31m", "files": [],
            "series_done": 0, "series_total": 1, "started_at": 1000});
        let v = job_view(&failed);
        assert!(v.contains("error:        no?[31m\n"), "{v}");
        assert!(!v.contains("bytes"), "{v}");
        let t = jobs_table(&[job, failed]).render();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID  STATE"), "{t}");
        assert!(
            lines[1].contains("succeeded  csv") && lines[1].contains("2.0 KiB"),
            "{t}"
        );
        assert!(lines[2].starts_with("4   failed"), "{t}");
    }
}
