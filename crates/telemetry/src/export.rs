//! Export jobs: a time range of a tenant's telemetry (optionally some devices and metrics) written
//! to Parquet or CSV in the hub's export folder or an S3-compatible store, in the background, with
//! progress.
//!
//! The engine is scanned series by series, a day at a time, on a blocking thread; rows go in
//! batches through a bounded channel to the exporter, so memory stays bounded whatever the range.
//! Local destinations are confined to the export folder (`data_dir/exports`): the API must not let
//! an operator write anywhere the hub's user can.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use ferrohub_export::ExportFormat;
use ferrohub_export::{Destination, ExportOptions, Exporter, RowBatch};
use ferrohub_tsdb::Engine;
use ferrohub_tsdb::column::Values;
use ferrohub_types::TenantId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::service::TelemetryError;

/// Rows per batch handed to the exporter.
const BATCH_ROWS: usize = 65_536;
/// Finished jobs remembered (per hub).
const KEEP_JOBS: usize = 100;

/// What to export and where, with the time range resolved to milliseconds. (The HTTP API's body,
/// `ferrohub_api::v1::telemetry::ExportBody`, also takes times as RFC 3339, `now` or `-1d`, and
/// resolves them to this.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// `s3://bucket/prefix` (credentials and endpoint from the hub's `AWS_*` environment), or a
    /// relative folder inside the hub's export folder (`data_dir/exports`).
    pub destination: String,
    /// `parquet` (default) or `csv`.
    #[serde(default)]
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
    /// Start, ms since the epoch (inclusive).
    pub from: i64,
    /// End, ms since the epoch (exclusive).
    pub to: i64,
}

/// State of an export job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportState {
    /// Writing.
    Running,
    /// Done: the files are complete.
    Succeeded,
    /// Stopped by an error; no partial file is left under a final name.
    Failed,
}

/// An export job as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExportJob {
    /// Job id.
    pub id: u64,
    /// Tenant.
    pub tenant: String,
    /// State.
    pub state: ExportState,
    /// Where it writes.
    pub destination: String,
    /// `parquet` or `csv`.
    pub format: String,
    /// Rows written so far.
    pub rows: u64,
    /// Series finished so far.
    pub series_done: u64,
    /// Series to export.
    pub series_total: u64,
    /// Files written (paths or `s3://` URLs), when finished.
    pub files: Vec<String>,
    /// Bytes written, when finished.
    pub bytes: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Start time, ms since the epoch.
    pub started_at: i64,
    /// End time, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
}

struct Job {
    view: Mutex<ExportJob>,
    rows: Arc<AtomicU64>,
    series_done: AtomicU64,
}

impl Job {
    fn snapshot(&self) -> ExportJob {
        let mut v = self.view.lock().clone();
        if v.state == ExportState::Running {
            v.rows = self.rows.load(Ordering::Relaxed);
            v.series_done = self.series_done.load(Ordering::Relaxed);
        }
        v
    }
}

/// The export jobs of a hub.
pub struct Exports {
    dir: PathBuf,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").field("dir", &self.dir).finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A local destination confined to `root`: relative, no `..`.
fn local_under(root: &Path, rel: &str) -> Result<PathBuf, TelemetryError> {
    let rel = rel.strip_prefix("file://").unwrap_or(rel);
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) || rel.is_empty() {
        return Err(TelemetryError::BadRequest(format!(
            "local export destination {rel:?} must be a relative folder name inside the hub's export folder ({}), without `..`; use s3://bucket/prefix for object storage",
            root.display()
        )));
    }
    Ok(root.join(p))
}

impl Exports {
    /// Export jobs writing local files under `dir`.
    pub fn new(dir: PathBuf) -> Exports {
        Exports {
            dir,
            jobs: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The export folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a job; returns it as first seen (state `running`).
    pub fn start(
        &self,
        engine: &Engine,
        tenant: &TenantId,
        req: ExportRequest,
    ) -> Result<ExportJob, TelemetryError> {
        if req.from >= req.to {
            return Err(TelemetryError::BadRequest(
                "empty time range: `from` must be before `to`".into(),
            ));
        }
        let destination = if req.destination.starts_with("s3://") {
            Destination::parse(&req.destination)
                .map_err(|e| TelemetryError::BadRequest(e.to_string()))?
        } else {
            Destination::Local(local_under(&self.dir, &req.destination)?)
        };
        let format = req.format.unwrap_or(ExportFormat::Parquet);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stem = req
            .name
            .clone()
            .unwrap_or_else(|| format!("telemetry-{id}"));
        ferrohub_export::check_stem(&stem)
            .map_err(|e| TelemetryError::BadRequest(format!("`name`: {e}")))?;
        let series_total = engine
            .list_series(tenant, None)
            .iter()
            .filter(|s| {
                req.devices.as_ref().is_none_or(|d| d.contains(&s.device))
                    && req.metrics.as_ref().is_none_or(|m| m.contains(&s.metric))
            })
            .count() as u64;
        let job = Arc::new(Job {
            view: Mutex::new(ExportJob {
                id,
                tenant: tenant.as_str().to_owned(),
                state: ExportState::Running,
                destination: destination.url(),
                format: format.to_string(),
                rows: 0,
                series_done: 0,
                series_total,
                files: Vec::new(),
                bytes: 0,
                error: None,
                started_at: now_ms(),
                finished_at: None,
            }),
            rows: Arc::new(AtomicU64::new(0)),
            series_done: AtomicU64::new(0),
        });
        {
            let mut jobs = self.jobs.lock();
            jobs.push_back(job.clone());
            while jobs.len() > KEEP_JOBS {
                match jobs
                    .iter()
                    .position(|j| j.view.lock().state != ExportState::Running)
                {
                    Some(i) => {
                        jobs.remove(i);
                    }
                    None => break,
                }
            }
        }
        let first = job.snapshot();
        let engine = engine.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            let result = run(&engine, &tenant, &req, destination, format, &stem, &job).await;
            let mut v = job.view.lock();
            v.rows = job.rows.load(Ordering::Relaxed);
            v.series_done = job.series_done.load(Ordering::Relaxed);
            v.finished_at = Some(now_ms());
            match result {
                Ok(summary) => {
                    v.state = ExportState::Succeeded;
                    v.rows = summary.rows;
                    v.files = summary.files;
                    v.bytes = summary.bytes;
                }
                Err(e) => {
                    tracing::warn!(job = v.id, error = %e, "telemetry export failed");
                    v.state = ExportState::Failed;
                    v.error = Some(e);
                }
            }
        });
        Ok(first)
    }

    /// A job of a tenant.
    pub fn get(&self, tenant: &TenantId, id: u64) -> Option<ExportJob> {
        self.jobs
            .lock()
            .iter()
            .map(|j| j.snapshot())
            .find(|j| j.id == id && j.tenant == tenant.as_str())
    }

    /// A tenant's jobs, newest first.
    pub fn list(&self, tenant: &TenantId) -> Vec<ExportJob> {
        let mut v: Vec<ExportJob> = self
            .jobs
            .lock()
            .iter()
            .map(|j| j.snapshot())
            .filter(|j| j.tenant == tenant.as_str())
            .collect();
        v.reverse();
        v
    }
}

async fn run(
    engine: &Engine,
    tenant: &TenantId,
    req: &ExportRequest,
    destination: Destination,
    format: ExportFormat,
    stem: &str,
    job: &Arc<Job>,
) -> Result<ferrohub_export::ExportSummary, String> {
    if let Destination::Local(dir) = &destination {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut exporter = Exporter::create(
        destination,
        format,
        stem,
        ExportOptions::new(tenant.as_str()),
    )
    .await
    .map_err(|e| e.to_string())?;
    // The exporter counts rows itself; mirror them into the job.
    let progress = exporter.progress();
    let (tx, mut rx) = mpsc::channel::<RowBatch>(2);
    let (engine2, tenant2, req2, job2) = (engine.clone(), tenant.clone(), req.clone(), job.clone());
    let scan = tokio::task::spawn_blocking(move || {
        let mut batch = RowBatch::with_capacity(BATCH_ROWS);
        let mut last: Option<(String, String)> = None;
        let result = engine2.scan(
            &tenant2,
            req2.devices.as_deref(),
            req2.metrics.as_deref(),
            req2.from,
            req2.to,
            |device, metric, ts: &[i64], values: &Values| {
                let key = (device.to_owned(), metric.to_owned());
                if last.as_ref() != Some(&key) {
                    if last.is_some() {
                        job2.series_done.fetch_add(1, Ordering::Relaxed);
                    }
                    last = Some(key);
                }
                for (i, &t) in ts.iter().enumerate() {
                    batch.push(device, metric, t, &values.get(i));
                    if batch.len() >= BATCH_ROWS {
                        let full =
                            std::mem::replace(&mut batch, RowBatch::with_capacity(BATCH_ROWS));
                        tx.blocking_send(full).map_err(|_| {
                            ferrohub_tsdb::TsdbError::BadQuery("export stopped".into())
                        })?;
                    }
                }
                Ok(())
            },
        );
        // Series without points in the range were never passed to the callback: once the scan
        // is through, every selected series is done.
        if result.is_ok() {
            let total = job2.view.lock().series_total;
            job2.series_done.store(total, Ordering::Relaxed);
        } else if last.is_some() {
            job2.series_done.fetch_add(1, Ordering::Relaxed);
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
        result
    });
    let mut write_error = None;
    while let Some(batch) = rx.recv().await {
        if let Err(e) = exporter.write(&batch).await {
            write_error = Some(e.to_string());
            break;
        }
        job.rows.store(progress.rows(), Ordering::Relaxed);
    }
    drop(rx);
    let scanned = scan.await.map_err(|e| e.to_string())?;
    if let Some(e) = write_error {
        exporter.abort().await;
        return Err(e);
    }
    if let Err(e) = scanned {
        exporter.abort().await;
        return Err(e.to_string());
    }
    exporter.finish().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_destinations_stay_in_the_export_folder() {
        let root = Path::new("/data/exports");
        assert_eq!(local_under(root, "2026/q1").unwrap(), root.join("2026/q1"));
        for bad in ["/etc", "../x", "a/../../b", "", "file:///tmp"] {
            assert!(local_under(root, bad).is_err(), "{bad}");
        }
    }
}
