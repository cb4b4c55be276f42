//! The telemetry service: takes device publications on telemetry topics, decodes them into points
//! and stores them in the time-series engine; also the HTTP write paths (InfluxDB line protocol,
//! device payloads) and per-tenant settings.
//!
//! MQTT ingest runs on the publisher's path: [`Telemetry::offer`] matches the topic and decodes the
//! payload on the publisher's own task (so decoding scales with connections), then queues the
//! points (bounded) to one batching task that writes them to the engine, several batches in
//! flight. The publisher's QoS 1/2 acknowledgement waits for the engine's WAL commit; a full queue
//! refuses the message (MQTT 5 0x97) instead of dropping it after acknowledging.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrohub_tsdb::{Engine, TsdbError, WriteSummary};
use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Point, Sample};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::decode::{self, DecodeLimits, PayloadFormat};
use crate::export::{ExportJob, ExportRequest, Exports};
use crate::lineproto::{self, MappingError, Precision};

/// Default telemetry topic filter: the device is the `+` level.
pub const DEFAULT_TOPIC: &str = "devices/+/telemetry/#";

/// How telemetry runs (`[telemetry]` in the hub's configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Store telemetry (when false, telemetry topics are ordinary topics).
    pub enabled: bool,
    /// Topic filters whose publications are telemetry (tenants may override). The device is the
    /// level of the filter's first `+`; levels matched by a trailing `#` prefix the metric names.
    pub topics: Vec<String>,
    /// Payload format when the publication does not say (MQTT 5 content type):
    /// `auto`, `json`, `cbor` or `msgpack`.
    pub format: PayloadFormat,
    /// Device timestamps further in the future than this many seconds are replaced by the
    /// receive time.
    pub future_skew_secs: u64,
    /// Device timestamps older than this many days are replaced by the receive time (the
    /// backfill window).
    pub max_backfill_days: u64,
    /// Line-protocol tags naming the device, in order of preference.
    pub device_tags: Vec<String>,
    /// Keep points this many days unless a tenant says otherwise (0: forever).
    pub retention_days: u32,
    /// Seal the in-memory head into compressed parts at least this often (seconds).
    pub flush_interval_secs: u64,
    /// Seal the head when it holds this many points (head memory is about 20 bytes a point).
    pub head_max_points: usize,
    /// Bound of the ingest queue, in publications (a full queue refuses QoS 1/2 publications).
    pub queue_depth: usize,
    /// Decoder limits.
    pub limits: DecodeLimits,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            topics: vec![DEFAULT_TOPIC.to_string()],
            format: PayloadFormat::Auto,
            future_skew_secs: 300,
            max_backfill_days: 30,
            device_tags: vec!["device".into(), "host".into()],
            retention_days: 30,
            flush_interval_secs: 600,
            head_max_points: 8_000_000,
            queue_depth: 65_536,
            limits: DecodeLimits::default(),
        }
    }
}

/// A tenant's telemetry settings (overrides of the hub's defaults; `None` keeps the default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantSettings {
    /// Topic filters whose publications are telemetry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
    /// Payload format when a publication does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub format: Option<PayloadFormat>,
}

/// Errors of the telemetry service.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The request's data could not be used; nothing was written.
    #[error("{0}")]
    BadRequest(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] TsdbError),
    /// Settings could not be saved.
    #[error("saving telemetry settings: {0}")]
    Settings(String),
}

/// What an offered publication became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Its points are durable.
    Stored,
    /// The payload could not be used (with the reason for the publisher).
    Invalid(String),
    /// The ingest queue is full.
    Busy,
    /// The engine failed.
    Failed(String),
}

/// The answer to [`Telemetry::offer`].
#[derive(Debug)]
pub enum Offer {
    /// Known at once.
    Ready(IngestOutcome),
    /// Resolves when the points are durable.
    Pending(oneshot::Receiver<IngestOutcome>),
}

/// Counters of the ingest.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Publications taken as telemetry.
    pub messages: AtomicU64,
    /// Points stored (all paths).
    pub points: AtomicU64,
    /// Publications whose payload could not be used.
    pub invalid: AtomicU64,
    /// Publications refused because the queue was full.
    pub busy: AtomicU64,
    /// Device timestamps outside the accepted window, replaced by the receive time.
    pub timestamps_replaced: AtomicU64,
    /// Points refused by the engine (kind conflicts, out-of-range timestamps).
    pub points_rejected: AtomicU64,
    /// Line-protocol writes.
    pub line_protocol_writes: AtomicU64,
}

struct IngestJob {
    tenant: TenantId,
    points: Vec<Point>,
    done: Option<oneshot::Sender<IngestOutcome>>,
}

/// Most reasons listed in [`WriteReport::rejected`] and [`LineProtocolPoints::rejected`].
pub const MAX_REJECTED_LISTED: usize = 100;

/// Result of an HTTP write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WriteReport {
    /// Points stored.
    pub points: usize,
    /// Points refused, with why (first 100).
    pub rejected: Vec<String>,
    /// How many points were refused in all (`rejected` lists the first 100). Not serialized.
    #[serde(skip)]
    pub rejected_total: usize,
}

/// The points of an InfluxDB line-protocol body ([`Telemetry::line_protocol_points`]), and the
/// points dropped before writing: those whose device id breaks the id rule
/// ([`ferrohub_types::id`]), as InfluxDB drops a bad point and writes the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineProtocolPoints {
    /// The points to write, timestamps final.
    pub points: Vec<Point>,
    /// Why points were dropped, one entry per line, naming it (`line 3: device id "a/b" …`;
    /// the first 100 such lines).
    pub rejected: Vec<String>,
    /// How many points (one per field of a dropped line) were dropped.
    pub dropped: usize,
}

/// The telemetry service.
pub struct Telemetry {
    engine: Engine,
    cfg: TelemetryConfig,
    settings: RwLock<BTreeMap<String, TenantSettings>>,
    settings_path: PathBuf,
    tx: mpsc::Sender<IngestJob>,
    exports: Exports,
    /// Counters.
    pub metrics: Arc<IngestMetrics>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where a topic matches a filter: the device (the level of the filter's first `+`) and the metric
/// prefix (the levels matched by a trailing `#`, joined with `.`).
pub fn match_topic<'t>(filter: &str, topic: &'t str) -> Option<(Option<&'t str>, Option<String>)> {
    let mut device = None;
    let mut f = filter.split('/');
    let mut t = topic.split('/').peekable();
    loop {
        match (f.next(), t.peek()) {
            (Some("#"), _) => {
                let rest: Vec<&str> = t.collect();
                let prefix = (!rest.is_empty() && rest.iter().all(|l| !l.is_empty()))
                    .then(|| rest.join("."));
                return Some((device, prefix));
            }
            (Some("+"), Some(level)) => {
                if device.is_none() {
                    device = Some(*level);
                }
                t.next();
            }
            (Some(lit), Some(level)) if lit == *level => {
                t.next();
            }
            (None, None) => return Some((device, None)),
            _ => return None,
        }
    }
}

impl Telemetry {
    /// Starts the service on an open engine; `settings_path` keeps tenant overrides.
    pub fn start(
        engine: Engine,
        cfg: TelemetryConfig,
        settings_path: PathBuf,
    ) -> Result<Arc<Telemetry>, TelemetryError> {
        let settings = match std::fs::read(&settings_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                TelemetryError::Settings(format!("{}: {e}", settings_path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(TelemetryError::Settings(format!(
                    "{}: {e}",
                    settings_path.display()
                )));
            }
        };
        let (tx, rx) = mpsc::channel(cfg.queue_depth.max(1));
        let exports = Exports::new(
            settings_path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("exports"),
        );
        let t = Arc::new(Telemetry {
            engine,
            cfg,
            settings: RwLock::new(settings),
            exports,
            settings_path,
            tx,
            metrics: Arc::new(IngestMetrics::default()),
        });
        tokio::spawn(batcher(t.engine.clone(), t.metrics.clone(), rx));
        Ok(t)
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Starts an export job (see [`crate::export`]).
    pub fn start_export(
        &self,
        tenant: &TenantId,
        req: ExportRequest,
    ) -> Result<ExportJob, TelemetryError> {
        self.exports.start(&self.engine, tenant, req)
    }

    /// An export job of a tenant.
    pub fn export_job(&self, tenant: &TenantId, id: u64) -> Option<ExportJob> {
        self.exports.get(tenant, id)
    }

    /// A tenant's export jobs, newest first.
    pub fn export_jobs(&self, tenant: &TenantId) -> Vec<ExportJob> {
        self.exports.list(tenant)
    }

    /// Where local exports are written (`<telemetry dir>/exports`).
    pub fn export_dir(&self) -> &std::path::Path {
        self.exports.dir()
    }

    /// The hub-wide configuration.
    pub fn config(&self) -> &TelemetryConfig {
        &self.cfg
    }

    /// A tenant's overrides.
    pub fn settings(&self, tenant: &TenantId) -> TenantSettings {
        self.settings
            .read()
            .get(tenant.as_str())
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces a tenant's overrides (topic filters are validated).
    pub fn set_settings(&self, tenant: &TenantId, s: TenantSettings) -> Result<(), TelemetryError> {
        if let Some(topics) = &s.topics {
            for f in topics {
                ferrohub_types::TopicFilter::new(f, &ferrohub_types::TopicLimits::default())
                    .map_err(|e| TelemetryError::BadRequest(format!("topic filter {f:?}: {e}")))?;
                if f.starts_with('$') {
                    return Err(TelemetryError::BadRequest(format!(
                        "topic filter {f:?}: telemetry topics cannot be reserved ($) topics"
                    )));
                }
            }
        }
        // The file first, then memory: a failed save leaves the old settings in effect.
        let mut all = self.settings.write();
        let mut next = all.clone();
        if s == TenantSettings::default() {
            next.remove(tenant.as_str());
        } else {
            next.insert(tenant.as_str().to_owned(), s);
        }
        self.save(&next)?;
        *all = next;
        Ok(())
    }

    /// Forgets a deleted tenant's settings (a tenant re-created with the same id starts from the
    /// hub's defaults).
    pub fn forget_tenant(&self, tenant: &TenantId) -> Result<(), TelemetryError> {
        let mut all = self.settings.write();
        if !all.contains_key(tenant.as_str()) {
            return Ok(());
        }
        let mut next = all.clone();
        next.remove(tenant.as_str());
        self.save(&next)?;
        *all = next;
        Ok(())
    }

    /// Writes the settings file atomically and durably (temporary file, sync, rename, directory
    /// sync).
    fn save(&self, all: &BTreeMap<String, TenantSettings>) -> Result<(), TelemetryError> {
        let err = |e: std::io::Error| {
            TelemetryError::Settings(format!("{}: {e}", self.settings_path.display()))
        };
        let json =
            serde_json::to_vec_pretty(all).map_err(|e| TelemetryError::Settings(e.to_string()))?;
        let tmp = self.settings_path.with_extension("json.tmp");
        let f = std::fs::File::create(&tmp).map_err(err)?;
        std::io::Write::write_all(&mut &f, &json).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.settings_path).map_err(err)?;
        if let Some(dir) = self.settings_path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    /// Where a publication on `topic` goes, if it is telemetry: (device or `None` if the filter
    /// has no `+`, metric prefix).
    fn route<'t>(
        &self,
        tenant: &TenantId,
        topic: &'t str,
    ) -> Option<(Option<&'t str>, Option<String>, PayloadFormat)> {
        let settings = self.settings.read();
        let over = settings.get(tenant.as_str());
        let format = over.and_then(|s| s.format).unwrap_or(self.cfg.format);
        let topics = over
            .and_then(|s| s.topics.as_ref())
            .unwrap_or(&self.cfg.topics);
        topics
            .iter()
            .find_map(|f| match_topic(f, topic))
            .map(|(d, p)| (d, p, format))
    }

    /// Turns samples into points: device timestamps outside the accepted window become the
    /// receive time.
    fn points(&self, device: &str, samples: Vec<Sample>, received_ms: i64) -> Vec<Point> {
        let newest =
            received_ms.saturating_add(self.cfg.future_skew_secs.saturating_mul(1000) as i64);
        let oldest = received_ms
            .saturating_sub(self.cfg.max_backfill_days.saturating_mul(86_400_000) as i64);
        samples
            .into_iter()
            .map(|s| {
                let ts = match s.ts_ms {
                    Some(t) if (oldest..=newest).contains(&t) => t,
                    Some(_) => {
                        self.metrics
                            .timestamps_replaced
                            .fetch_add(1, Ordering::Relaxed);
                        received_ms
                    }
                    None => received_ms,
                };
                Point {
                    device: device.to_owned(),
                    metric: s.metric,
                    ts_ms: ts,
                    value: s.value,
                }
            })
            .collect()
    }

    /// Offers an MQTT publication. `None` when its topic is not telemetry; otherwise the outcome,
    /// known at once (invalid payload, full queue) or pending until the points are durable.
    /// `fallback_device` names the device when the matching filter has no `+` level.
    pub fn offer(
        &self,
        tenant: &TenantId,
        topic: &str,
        payload: &[u8],
        content_type: Option<&str>,
        fallback_device: Option<&str>,
        received_ms: i64,
    ) -> Option<Offer> {
        let (device, prefix, default_format) = self.route(tenant, topic)?;
        self.metrics.messages.fetch_add(1, Ordering::Relaxed);
        let invalid = |why: String| {
            self.metrics.invalid.fetch_add(1, Ordering::Relaxed);
            Some(Offer::Ready(IngestOutcome::Invalid(why)))
        };
        let Some(device) = device.or(fallback_device).filter(|d| !d.is_empty()) else {
            return invalid("the telemetry topic names no device".into());
        };
        if !ferrohub_types::id::is_valid_id(device) {
            return invalid(format!(
                "the telemetry topic names device {device:?}, which is not a valid device id \
                 ({})",
                ferrohub_types::id::ID_RULE
            ));
        }
        let format = content_type
            .and_then(PayloadFormat::from_content_type)
            .unwrap_or(default_format);
        let samples = match decode::decode(payload, format, prefix.as_deref(), &self.cfg.limits) {
            Ok(s) => s,
            Err(e) => return invalid(e.to_string()),
        };
        if samples.is_empty() {
            return Some(Offer::Ready(IngestOutcome::Stored));
        }
        let points = self.points(
            device,
            samples,
            if received_ms > 0 {
                received_ms
            } else {
                now_ms()
            },
        );
        let (done, wait) = oneshot::channel();
        let job = IngestJob {
            tenant: tenant.clone(),
            points,
            done: Some(done),
        };
        match self.tx.try_send(job) {
            Ok(()) => Some(Offer::Pending(wait)),
            Err(_) => {
                self.metrics.busy.fetch_add(1, Ordering::Relaxed);
                Some(Offer::Ready(IngestOutcome::Busy))
            }
        }
    }

    /// Writes a device payload received over HTTP (same formats and rules as MQTT).
    ///
    /// Decoding runs on the caller's task: for a large payload, call
    /// [`Telemetry::payload_points`] on a blocking thread and then [`Telemetry::write_points`].
    pub async fn write_payload(
        &self,
        tenant: &TenantId,
        device: &str,
        payload: &[u8],
        format: PayloadFormat,
    ) -> Result<WriteReport, TelemetryError> {
        let points = self.payload_points(device, payload, format)?;
        self.write_points(tenant, points).await
    }

    /// Decodes a device payload received over HTTP into points (same formats and rules as MQTT).
    /// CPU work without I/O: a caller with a large payload runs it on a blocking thread.
    pub fn payload_points(
        &self,
        device: &str,
        payload: &[u8],
        format: PayloadFormat,
    ) -> Result<Vec<Point>, TelemetryError> {
        let samples = decode::decode(payload, format, None, &self.cfg.limits)
            .map_err(|e| TelemetryError::BadRequest(e.to_string()))?;
        Ok(self.points(device, samples, now_ms()))
    }

    /// Writes an InfluxDB line-protocol body. Like InfluxDB 2, a body with any bad line writes
    /// nothing and the error names the first bad line; a point whose device id is not valid is
    /// dropped and the others are written (listed first in the report's `rejected`).
    ///
    /// Parsing runs on the caller's task: for a large body, call
    /// [`Telemetry::line_protocol_points`] on a blocking thread and then
    /// [`Telemetry::write_line_protocol_points`].
    pub async fn write_line_protocol(
        &self,
        tenant: &TenantId,
        body: &str,
        precision: Precision,
    ) -> Result<WriteReport, TelemetryError> {
        let points = self.line_protocol_points(body, precision)?;
        self.write_line_protocol_points(tenant, points).await
    }

    /// Writes the points of a line-protocol body: the report's `rejected` lists the lines dropped
    /// for their device ids first, then the points the engine refused; `rejected_total` counts
    /// both.
    pub async fn write_line_protocol_points(
        &self,
        tenant: &TenantId,
        lp: LineProtocolPoints,
    ) -> Result<WriteReport, TelemetryError> {
        let written = if lp.points.is_empty() {
            WriteReport::default()
        } else {
            self.write_points(tenant, lp.points).await?
        };
        let mut rejected = lp.rejected;
        rejected.extend(written.rejected);
        rejected.truncate(MAX_REJECTED_LISTED);
        Ok(WriteReport {
            points: written.points,
            rejected,
            rejected_total: written.rejected_total + lp.dropped,
        })
    }

    /// Parses an InfluxDB line-protocol body into points (counted as a line-protocol write); any
    /// bad line fails the whole body, naming the first one, and so does a point without a device
    /// tag; points whose device id breaks the id rule are dropped (counted as rejected points)
    /// and listed by line. CPU work without I/O: a caller with a large body runs it on a
    /// blocking thread.
    pub fn line_protocol_points(
        &self,
        body: &str,
        precision: Precision,
    ) -> Result<LineProtocolPoints, TelemetryError> {
        self.metrics
            .line_protocol_writes
            .fetch_add(1, Ordering::Relaxed);
        let parsed = lineproto::parse(body, precision);
        if let Some(e) = parsed.errors.first() {
            return Err(TelemetryError::BadRequest(format!(
                "{e}{}",
                if parsed.failed_lines > 1 {
                    format!(" (and {} more bad lines)", parsed.failed_lines - 1)
                } else {
                    String::new()
                }
            )));
        }
        let tags: Vec<&str> = self.cfg.device_tags.iter().map(String::as_str).collect();
        let now = now_ms();
        let mut out = LineProtocolPoints {
            points: Vec::with_capacity(parsed.points.len() * 2),
            ..LineProtocolPoints::default()
        };
        for (i, (p, line)) in parsed.points.into_iter().zip(parsed.lines).enumerate() {
            let (device, samples) = match lineproto::to_samples(p, &tags) {
                Ok(mapped) => mapped,
                Err(e @ MappingError::InvalidDevice { fields, .. }) => {
                    out.dropped += fields;
                    if out.rejected.len() < MAX_REJECTED_LISTED {
                        out.rejected.push(format!("line {line}: {e}"));
                    }
                    continue;
                }
                Err(e) => {
                    return Err(TelemetryError::BadRequest(format!("point {}: {e}", i + 1)));
                }
            };
            for s in samples {
                out.points.push(Point {
                    device: device.clone(),
                    metric: s.metric,
                    ts_ms: s.ts_ms.unwrap_or(now),
                    value: s.value,
                });
            }
        }
        self.metrics
            .points_rejected
            .fetch_add(out.dropped as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Writes points as they are (timestamps already final).
    pub async fn write_points(
        &self,
        tenant: &TenantId,
        points: Vec<Point>,
    ) -> Result<WriteReport, TelemetryError> {
        let summary = self.engine.write(tenant, points).await?;
        Ok(self.report(summary))
    }

    fn report(&self, s: WriteSummary) -> WriteReport {
        self.metrics
            .points
            .fetch_add(s.accepted as u64, Ordering::Relaxed);
        self.metrics
            .points_rejected
            .fetch_add(s.rejected.len() as u64, Ordering::Relaxed);
        WriteReport {
            points: s.accepted,
            rejected_total: s.rejected.len(),
            rejected: s
                .rejected
                .into_iter()
                .take(MAX_REJECTED_LISTED)
                .map(|(_, why)| why)
                .collect(),
        }
    }

    /// Appends Prometheus text for the ingest and the engine.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let m = &self.metrics;
        let st = self.engine.stats();
        let (parts, part_bytes) = self.engine.parts_summary();
        let rows: [(&str, &str, &str, f64); 22] = [
            (
                "ferrohub_telemetry_messages_total",
                "Publications taken as telemetry.",
                "counter",
                g(&m.messages),
            ),
            (
                "ferrohub_telemetry_points_total",
                "Points stored by the ingest (MQTT and HTTP).",
                "counter",
                g(&m.points),
            ),
            (
                "ferrohub_telemetry_invalid_total",
                "Publications whose payload could not be used.",
                "counter",
                g(&m.invalid),
            ),
            (
                "ferrohub_telemetry_busy_total",
                "Publications refused because the ingest queue was full.",
                "counter",
                g(&m.busy),
            ),
            (
                "ferrohub_telemetry_timestamps_replaced_total",
                "Device timestamps outside the accepted window, replaced by the receive time.",
                "counter",
                g(&m.timestamps_replaced),
            ),
            (
                "ferrohub_telemetry_points_rejected_total",
                "Points refused (value kind conflicts, timestamps out of range, line-protocol points with invalid device ids).",
                "counter",
                g(&m.points_rejected),
            ),
            (
                "ferrohub_telemetry_line_protocol_writes_total",
                "InfluxDB line-protocol write requests.",
                "counter",
                g(&m.line_protocol_writes),
            ),
            (
                "ferrohub_tsdb_points_written_total",
                "Points acknowledged by the engine.",
                "counter",
                g(&st.points_written),
            ),
            (
                "ferrohub_tsdb_wal_commits_total",
                "WAL group commits.",
                "counter",
                g(&st.wal_commits),
            ),
            (
                "ferrohub_tsdb_wal_bytes_total",
                "Bytes written to the WAL.",
                "counter",
                g(&st.wal_bytes),
            ),
            (
                "ferrohub_tsdb_flushes_total",
                "Head flushes into parts.",
                "counter",
                g(&st.flushes),
            ),
            (
                "ferrohub_tsdb_flush_seconds_total",
                "Time spent flushing.",
                "counter",
                g(&st.flush_millis) / 1000.0,
            ),
            (
                "ferrohub_tsdb_flushes_deferred_total",
                "Heads whose due flush waited for the previous seal (ingest outpaced sealing).",
                "counter",
                g(&st.flushes_deferred),
            ),
            (
                "ferrohub_tsdb_device_purges_total",
                "Decommissioned devices whose points were deleted from disk.",
                "counter",
                g(&st.device_purges),
            ),
            (
                "ferrohub_tsdb_compactions_total",
                "Part merges.",
                "counter",
                g(&st.compactions),
            ),
            (
                "ferrohub_tsdb_retention_bytes_freed_total",
                "Bytes freed by retention.",
                "counter",
                g(&st.retention_bytes_freed),
            ),
            (
                "ferrohub_tsdb_background_errors_total",
                "Failed flushes, compactions or retention passes (logged).",
                "counter",
                g(&st.background_errors),
            ),
            (
                "ferrohub_tsdb_series",
                "Series known.",
                "gauge",
                self.engine.series_count() as f64,
            ),
            (
                "ferrohub_tsdb_head_points",
                "Points in memory not yet sealed into parts.",
                "gauge",
                self.engine.head_points() as f64,
            ),
            ("ferrohub_tsdb_parts", "Part files.", "gauge", parts as f64),
            (
                "ferrohub_tsdb_part_bytes",
                "Bytes of part files.",
                "gauge",
                part_bytes as f64,
            ),
            (
                "ferrohub_telemetry_queue_free",
                "Free slots of the ingest queue.",
                "gauge",
                self.tx.capacity() as f64,
            ),
        ];
        for (name, help, kind, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// Takes queued publications in groups and writes them, up to 4 groups in flight (the engine
/// commits concurrent writes together), answering each publication when its group is durable.
async fn batcher(engine: Engine, metrics: Arc<IngestMetrics>, mut rx: mpsc::Receiver<IngestJob>) {
    const MAX_GROUP_POINTS: usize = 50_000;
    let in_flight = Arc::new(Semaphore::new(4));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Group by tenant (a write names one tenant).
        let mut by_tenant: BTreeMap<TenantId, (Vec<Point>, Vec<oneshot::Sender<IngestOutcome>>)> =
            BTreeMap::new();
        let mut n = 0;
        let mut add = |job: IngestJob, n: &mut usize| {
            *n += job.points.len();
            let e = by_tenant.entry(job.tenant).or_default();
            e.0.extend(job.points);
            e.1.extend(job.done);
        };
        add(first, &mut n);
        while n < MAX_GROUP_POINTS {
            match rx.try_recv() {
                Ok(job) => add(job, &mut n),
                Err(_) => break,
            }
        }
        let engine = engine.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            for (tenant, (points, done)) in by_tenant {
                let outcome = match engine.write(&tenant, points).await {
                    Ok(s) => {
                        metrics
                            .points
                            .fetch_add(s.accepted as u64, Ordering::Relaxed);
                        metrics
                            .points_rejected
                            .fetch_add(s.rejected.len() as u64, Ordering::Relaxed);
                        IngestOutcome::Stored
                    }
                    Err(e) => IngestOutcome::Failed(e.to_string()),
                };
                for d in done {
                    let _ = d.send(outcome.clone());
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_the_device_and_the_metric_prefix() {
        let f = DEFAULT_TOPIC;
        assert_eq!(
            match_topic(f, "devices/d1/telemetry"),
            Some((Some("d1"), None))
        );
        assert_eq!(
            match_topic(f, "devices/d1/telemetry/env/room1"),
            Some((Some("d1"), Some("env.room1".into())))
        );
        assert_eq!(match_topic(f, "devices/d1/events"), None);
        assert_eq!(match_topic(f, "devices/d1"), None);
        assert_eq!(
            match_topic("plant/+/+/data", "plant/p1/m7/data"),
            Some((Some("p1"), None))
        );
        assert_eq!(
            match_topic("fixed/topic", "fixed/topic"),
            Some((None, None))
        );
        assert_eq!(
            match_topic(f, "devices/d1/telemetry//x"),
            Some((Some("d1"), None))
        );
    }
}
