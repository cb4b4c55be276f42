//! The engine: write path (WAL group commit → head), flush (head → parts), open and recovery.
//!
//! Threads: one **writer** owns the WAL; it takes write jobs in groups, appends them, syncs once per
//! group, applies the points to the head in WAL order and only then answers (so whatever is
//! acknowledged is durable and visible). When the head holds `head_max_points` or is
//! `flush_interval` old, the writer starts a new WAL segment and freezes the head; the **flusher**
//! seals the frozen head into one part per (tenant, UTC day), swaps the parts in and deletes the WAL
//! segments they cover. The **maintainer** applies retention and compacts parts. Queries read
//! immutable parts and copy head series under short locks, so they never wait for the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Point, Value, ValueKind};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::bin_io::{PutBytes, Reader};
use crate::catalog::{Catalog, SeriesId};
use crate::column::Values;
use crate::error::TsdbError;
use crate::head::Head;
use crate::part::{self, ChunkRef, HourlyBlock, PartFile, PartWriter, SeriesData};
use crate::wal::{self, REC_POINTS, REC_SERIES, WalDamage, WalWriter};

/// One UTC day in milliseconds: the partition width.
pub const DAY_MS: i64 = 86_400_000;
/// Latest timestamp accepted (end of year 9999), so day directories stay four-digit years.
pub const MAX_TS: i64 = 253_402_300_799_999;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the WAL and the parts (created if missing).
    pub dir: PathBuf,
    /// Sync the WAL before acknowledging (and parts before deleting WAL segments).
    pub fsync: bool,
    /// Seal the head at least this often.
    pub flush_interval: Duration,
    /// Seal the head when it holds this many points (~16–24 bytes a point). While the previous
    /// head is still being sealed the head may grow to 1.5 × this before writes wait, so memory
    /// holds at most three heads of that size (active, sealing, queued).
    pub head_max_points: usize,
    /// Keep data this many days unless a tenant says otherwise (`None`: forever).
    pub default_retention_days: Option<u32>,
    /// How often the maintainer checks retention and compaction.
    pub maintenance_interval: Duration,
    /// Bound of the write queue, in write calls.
    pub queue_depth: usize,
    /// Threads compressing series when a head is sealed.
    pub seal_threads: usize,
}

impl EngineConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            dir: dir.into(),
            fsync: true,
            flush_interval: Duration::from_secs(600),
            head_max_points: 8_000_000,
            default_retention_days: Some(30),
            maintenance_interval: Duration::from_secs(60),
            queue_depth: 1024,
            seal_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// A sealed, immutable part as the engine holds it.
#[derive(Debug)]
pub struct Part {
    /// Precedence: a later part's point wins over an earlier part's point at the same timestamp.
    pub seq: u64,
    /// Tenant.
    pub tenant: TenantId,
    /// UTC day number (days since the Unix epoch).
    pub day: i64,
    /// The file.
    pub file: PartFile,
    /// Series in the part, sorted by id.
    pub series: Vec<(SeriesId, PartSeriesMeta)>,
    /// The 1-hour rollup table.
    pub hourly: Vec<HourlyBlock>,
    /// Points in the part.
    pub points: u64,
}

/// One series in a part.
#[derive(Debug, Clone)]
pub struct PartSeriesMeta {
    /// Position in the part (the `series` of its rollup rows).
    pub pos: u32,
    /// Earliest timestamp.
    pub min_ts: i64,
    /// Latest timestamp.
    pub max_ts: i64,
    /// Number of points.
    pub count: u64,
    /// Kind.
    pub kind: ValueKind,
    /// Chunks in time order.
    pub chunks: Vec<ChunkRef>,
    /// 1-minute rollups.
    pub minute: Option<part::BlockRef>,
}

impl Part {
    /// The series' entry, if the part has it.
    pub fn find(&self, id: SeriesId) -> Option<&PartSeriesMeta> {
        self.series
            .binary_search_by_key(&id, |(s, _)| *s)
            .ok()
            .map(|i| &self.series[i].1)
    }
}

/// Parts per tenant per day, each day's parts ordered by `seq`.
pub(crate) type PartSet = HashMap<TenantId, BTreeMap<i64, Vec<Arc<Part>>>>;

/// The active head and the frozen ones being sealed (oldest first).
pub(crate) struct HeadSet {
    pub(crate) active: Arc<Head>,
    pub(crate) frozen: Vec<Arc<Head>>,
}

/// Counters (monotonic) kept by the engine.
#[derive(Debug, Default)]
pub struct Stats {
    /// Points acknowledged.
    pub points_written: AtomicU64,
    /// Points refused (kind conflict, timestamp out of range).
    pub points_rejected: AtomicU64,
    /// WAL group commits.
    pub wal_commits: AtomicU64,
    /// WAL bytes written.
    pub wal_bytes: AtomicU64,
    /// Head flushes.
    pub flushes: AtomicU64,
    /// Time spent flushing, in milliseconds.
    pub flush_millis: AtomicU64,
    /// Heads whose due flush waited for the previous seal (ingest outpaced sealing for a while).
    pub flushes_deferred: AtomicU64,
    /// Parts written by flushes and compactions.
    pub parts_written: AtomicU64,
    /// Compactions run.
    pub compactions: AtomicU64,
    /// Day partitions deleted by retention.
    pub retention_partitions_deleted: AtomicU64,
    /// Bytes freed by retention.
    pub retention_bytes_freed: AtomicU64,
    /// Device purges finished (their points deleted from disk).
    pub device_purges: AtomicU64,
    /// Bytes of parts freed by device purges.
    pub purge_bytes_freed: AtomicU64,
    /// Background errors (flush, compaction, retention), also logged.
    pub background_errors: AtomicU64,
}

/// What opening the engine found.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Parts loaded.
    pub parts: usize,
    /// WAL segments replayed.
    pub wal_segments: usize,
    /// Points replayed from the WAL into the head.
    pub wal_points: u64,
    /// Damaged WAL tails, skipped.
    pub wal_damage: Vec<WalDamage>,
    /// Part files that could not be read, renamed to `*.corrupt` and skipped.
    pub corrupt_parts: Vec<String>,
}

/// Result of a write call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteSummary {
    /// Points stored (durable when the call returns).
    pub accepted: usize,
    /// Points refused: their position in the call and why.
    pub rejected: Vec<(usize, String)>,
}

struct WriteJob {
    payload: Vec<u8>,
    ids: Vec<SeriesId>,
    ts: Vec<i64>,
    values: Vec<Value>,
    done: Option<oneshot::Sender<Result<(), TsdbError>>>,
}

enum Job {
    Write(WriteJob),
    Flush(oneshot::Sender<Result<(), TsdbError>>),
    Tick,
    Shutdown,
}

struct FlushJob {
    head: Arc<Head>,
    wal_below: u64,
    done: Vec<oneshot::Sender<Result<(), TsdbError>>>,
}

pub(crate) struct Inner {
    pub(crate) cfg: EngineConfig,
    pub(crate) catalog: Catalog,
    pub(crate) heads: RwLock<HeadSet>,
    pub(crate) parts: RwLock<PartSet>,
    pub(crate) stats: Stats,
    pub(crate) retention: Mutex<BTreeMap<String, u32>>,
    pub(crate) part_seq: AtomicU64,
    pub(crate) shutdown: AtomicBool,
    /// Serialises compaction and retention against each other (both replace parts).
    pub(crate) maintenance: Mutex<()>,
    /// Frozen heads handed to the flusher and not sealed yet.
    pub(crate) flush_pending: AtomicUsize,
    /// Purges recorded and not finished (`purges.json`).
    pub(crate) purges: Mutex<Vec<crate::purge::PendingPurge>>,
    /// Serialises passes over the pending device purges.
    pub(crate) purge_pass: Mutex<()>,
}

/// The time-series engine. Cheap to clone; threads stop when [`Engine::close`] is called or the
/// last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    tx: mpsc::Sender<Job>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    recovery: Arc<RecoveryReport>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.inner.cfg.dir)
            .finish()
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` of a day number (proleptic Gregorian, days since 1970-01-01).
pub fn day_name(day: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", y + i64::from(m <= 2), m, d)
}

fn parse_day_name(s: &str) -> Option<i64> {
    let mut it = s.split('-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if it.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = era * 146_097 + doe - 719_468;
    (day_name(day) == s).then_some(day)
}

/// Directory name of a tenant: safe characters kept, anything else percent-encoded.
pub(crate) fn tenant_dir(t: &TenantId) -> String {
    let mut out = String::new();
    for b in t.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() { "%".into() } else { out }
}

fn tenant_from_dir(s: &str) -> Option<TenantId> {
    if s == "%" {
        return Some(TenantId::new(""));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(|s| TenantId::new(&s))
}

fn part_name(seq: u64) -> String {
    format!("{seq:016x}.part")
}

fn parse_part_name(s: &str) -> Option<u64> {
    let hex = s.strip_suffix(".part")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

impl Inner {
    pub(crate) fn parts_dir(&self) -> PathBuf {
        self.cfg.dir.join("parts")
    }

    fn wal_dir(&self) -> PathBuf {
        self.cfg.dir.join("wal")
    }

    pub(crate) fn partition_dir(&self, tenant: &TenantId, day: i64) -> PathBuf {
        self.parts_dir()
            .join(tenant_dir(tenant))
            .join(day_name(day))
    }

    pub(crate) fn next_part_path(&self, tenant: &TenantId, day: i64) -> (u64, PathBuf) {
        let seq = self.part_seq.fetch_add(1, Ordering::Relaxed);
        (seq, self.partition_dir(tenant, day).join(part_name(seq)))
    }

    /// Opens a part file and maps its series into the catalog. `sealed` holds the ids a flush or
    /// a compaction wrote the series from, in the order it wrote them: those are kept even when
    /// a purge forgot them meanwhile, so a purged series never comes back under a fresh id (and
    /// the purge's rewrite finds it). Without `sealed` (start-up) series are resolved by name.
    pub(crate) fn load_part(
        &self,
        tenant: &TenantId,
        day: i64,
        seq: u64,
        path: &Path,
        sealed: Option<&[SeriesId]>,
    ) -> Result<Part, TsdbError> {
        let (file, index) = PartFile::open(path)?;
        let mut series = Vec::with_capacity(index.series.len());
        let mut points = 0;
        for (pos, s) in index.series.into_iter().enumerate() {
            // Checked by name, so a writer's order that ever differed falls back to resolving.
            let sealed_from = sealed
                .and_then(|ids| ids.get(pos))
                .and_then(|&id| self.catalog.get(id))
                .filter(|info| *info.device == *s.device && *info.metric == *s.metric);
            let (id, kind) = match sealed_from {
                Some(info) => (info.id, info.kind),
                None => self.catalog.resolve(tenant, &s.device, &s.metric, s.kind),
            };
            if kind != s.kind {
                tracing::warn!(
                    part = %path.display(), device = %s.device, metric = %s.metric,
                    "series kind differs from an older part; this part's points are not served"
                );
                continue;
            }
            if let Some(info) = self.catalog.get(id) {
                info.observe(s.max_ts, &s.last);
            }
            points += s.count;
            series.push((
                id,
                PartSeriesMeta {
                    pos: pos as u32,
                    min_ts: s.min_ts,
                    max_ts: s.max_ts,
                    count: s.count,
                    kind: s.kind,
                    chunks: s.chunks,
                    minute: s.minute,
                },
            ));
        }
        series.sort_unstable_by_key(|(id, _)| *id);
        Ok(Part {
            seq,
            tenant: tenant.clone(),
            day,
            file,
            series,
            hourly: index.hourly,
            points,
        })
    }

    /// Retention of a tenant in days (`None`: forever).
    pub(crate) fn retention_days(&self, tenant: &TenantId) -> Option<u32> {
        match self.retention.lock().get(tenant.as_str()) {
            Some(0) => None,
            Some(&d) => Some(d),
            None => self.cfg.default_retention_days,
        }
    }

    /// The first day a tenant still keeps.
    pub(crate) fn first_kept_day(&self, tenant: &TenantId) -> i64 {
        match self.retention_days(tenant) {
            Some(d) => now_ms().div_euclid(DAY_MS) - i64::from(d) + 1,
            None => i64::MIN,
        }
    }

    /// Seals a frozen head into parts and swaps them in.
    fn flush(&self, job: &FlushJob) -> Result<(), TsdbError> {
        let started = Instant::now();
        let mut groups: BTreeMap<(TenantId, i64), Vec<(SeriesId, SeriesData)>> = BTreeMap::new();
        for id in job.head.series_ids() {
            // A purged tenant's points are dropped, not sealed.
            let Some(info) = self.catalog.get(id).filter(|_| self.catalog.is_live(id)) else {
                continue;
            };
            let Some((ts, values)) = job.head.with_series(id, |h| h.snapshot(i64::MIN, i64::MAX))
            else {
                continue;
            };
            let first_kept = self.first_kept_day(&info.tenant);
            let mut start = 0;
            while start < ts.len() {
                let day = ts[start].div_euclid(DAY_MS);
                let end = start + ts[start..].partition_point(|&t| t.div_euclid(DAY_MS) == day);
                if day >= first_kept {
                    groups.entry((info.tenant.clone(), day)).or_default().push((
                        id,
                        SeriesData {
                            device: info.device.clone(),
                            metric: info.metric.clone(),
                            ts: ts[start..end].to_vec(),
                            values: values.slice(start..end),
                        },
                    ));
                }
                start = end;
            }
        }
        let mut new_parts = Vec::new();
        for ((tenant, day), mut group) in groups {
            group.sort_by(|(_, a), (_, b)| (&a.device, &a.metric).cmp(&(&b.device, &b.metric)));
            let (sealed, series): (Vec<SeriesId>, Vec<SeriesData>) = group.into_iter().unzip();
            let (seq, path) = self.next_part_path(&tenant, day);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| TsdbError::io("creating partition", dir, e))?;
            }
            let mut w = PartWriter::create(&path, self.cfg.fsync)?;
            for window in series.chunks(SEAL_WINDOW) {
                for encoded in encode_parallel(window, self.cfg.seal_threads)? {
                    w.add_encoded(encoded)?;
                }
            }
            w.finish()?;
            self.stats.parts_written.fetch_add(1, Ordering::Relaxed);
            new_parts.push(Arc::new(self.load_part(
                &tenant,
                day,
                seq,
                &path,
                Some(&sealed),
            )?));
        }
        {
            let mut parts = self.parts.write();
            let mut heads = self.heads.write();
            for p in new_parts {
                let days = parts.entry(p.tenant.clone()).or_default();
                let list = days.entry(p.day).or_default();
                list.push(p);
                list.sort_by_key(|p| p.seq);
            }
            heads.frozen.retain(|h| !Arc::ptr_eq(h, &job.head));
        }
        wal::delete_below(&self.wal_dir(), job.wal_below)?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .flush_millis
            .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Series encoded together before they are written (bounds the encoded bytes held in memory).
const SEAL_WINDOW: usize = 4096;

/// Compresses `series` on up to `threads` threads (contiguous slices of about equal points),
/// returning them in order.
fn encode_parallel(
    series: &[SeriesData],
    threads: usize,
) -> Result<Vec<part::EncodedSeries>, TsdbError> {
    let total: usize = series.iter().map(|s| s.ts.len()).sum();
    let threads = threads.clamp(1, series.len().max(1));
    if threads == 1 || total < 100_000 {
        return series.iter().map(part::encode_series).collect();
    }
    // Cut points so that each slice holds about total/threads points.
    let mut cuts = vec![0];
    let mut acc = 0;
    for (i, s) in series.iter().enumerate() {
        acc += s.ts.len();
        if acc * threads >= total * cuts.len() && cuts.len() < threads && i + 1 < series.len() {
            cuts.push(i + 1);
        }
    }
    cuts.push(series.len());
    let slices: Vec<&[SeriesData]> = cuts.windows(2).map(|w| &series[w[0]..w[1]]).collect();
    let results: Vec<Result<Vec<part::EncodedSeries>, TsdbError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = slices
            .iter()
            .skip(1)
            .map(|slice| scope.spawn(move || slice.iter().map(part::encode_series).collect()))
            .collect();
        let mut out = vec![slices[0].iter().map(part::encode_series).collect()];
        for h in handles {
            out.push(
                h.join()
                    .unwrap_or_else(|_| Err(TsdbError::Codec("a sealing thread panicked".into()))),
            );
        }
        out
    });
    let mut all = Vec::with_capacity(series.len());
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// Encodes a series definition record.
fn series_record(
    id: SeriesId,
    tenant: &TenantId,
    device: &str,
    metric: &str,
    kind: ValueKind,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + device.len() + metric.len() + tenant.as_str().len());
    b.put_u8(REC_SERIES);
    b.put_varint(u64::from(id));
    b.put_str(tenant.as_str());
    b.put_str(device);
    b.put_str(metric);
    b.put_u8(match kind {
        ValueKind::Numeric => 0,
        ValueKind::Bool => 1,
        ValueKind::Str => 2,
    });
    b
}

struct Writer {
    inner: Arc<Inner>,
    wal: WalWriter,
    /// For each series id, the WAL segment that last defined it.
    defined: Vec<u64>,
    head_started: Instant,
    /// Whether a due cut of the current head was deferred (counted once per head).
    deferred: bool,
    flush_tx: std::sync::mpsc::SyncSender<FlushJob>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut group: Vec<WriteJob> = Vec::new();
        let mut flush_waiters = Vec::new();
        let mut stop = false;
        while let Some(job) = rx.blocking_recv() {
            let mut next = Some(job);
            // Take whatever else is queued, up to a bound, into this group.
            while let Some(job) = next.take() {
                match job {
                    Job::Write(w) => group.push(w),
                    Job::Flush(done) => flush_waiters.push(done),
                    Job::Tick => {}
                    Job::Shutdown => stop = true,
                }
                if group.len() < 4096 {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                let result = self.commit(&mut group);
                for mut job in group.drain(..) {
                    if let Some(done) = job.done.take() {
                        let _ = done.send(result.as_ref().map(|_| ()).map_err(clone_error));
                    }
                }
            }
            let head_points = self.inner.heads.read().active.points();
            let max = self.inner.cfg.head_max_points;
            let due = head_points >= max
                || (head_points > 0
                    && self.head_started.elapsed() >= self.inner.cfg.flush_interval);
            // While the flusher seals the previous head, a due cut waits (the head keeps taking
            // writes) until the head reaches 1.5 × its bound: a cut then would block this thread,
            // and with it every write and its acknowledgement, for as long as a seal takes.
            let sealing = self.inner.flush_pending.load(Ordering::Acquire) > 0;
            let hard = head_points >= max.saturating_add(max / 2);
            if due && sealing && !hard && flush_waiters.is_empty() {
                if !self.deferred {
                    self.deferred = true;
                    self.inner
                        .stats
                        .flushes_deferred
                        .fetch_add(1, Ordering::Relaxed);
                }
            } else if due || !flush_waiters.is_empty() {
                let waiters = std::mem::take(&mut flush_waiters);
                if let Err((e, waiters)) = self.cut(waiters) {
                    tracing::error!(error = %e, "telemetry head could not be frozen for flushing");
                    self.inner
                        .stats
                        .background_errors
                        .fetch_add(1, Ordering::Relaxed);
                    for w in waiters {
                        let _ = w.send(Err(clone_error(&e)));
                    }
                }
            }
            if stop {
                break;
            }
        }
        // Channel closed: make the tail durable and seal what the head holds.
        let _ = self.wal.commit(self.inner.cfg.fsync);
        if self.inner.heads.read().active.points() > 0 {
            let _ = self.cut(Vec::new());
        }
    }

    fn commit(&mut self, group: &mut [WriteJob]) -> Result<(), TsdbError> {
        let seg = self.wal.seq();
        for job in group.iter() {
            for &id in &job.ids {
                let i = id as usize;
                if self.defined.len() <= i {
                    self.defined.resize(i + 1, 0);
                }
                if self.defined[i] != seg {
                    let info = self.inner.catalog.get(id).ok_or(TsdbError::Closed)?;
                    self.wal.append(&series_record(
                        id,
                        &info.tenant,
                        &info.device,
                        &info.metric,
                        info.kind,
                    ));
                    self.defined[i] = seg;
                }
            }
            self.wal.append(&job.payload);
        }
        let before = self.wal.size();
        self.wal.commit(self.inner.cfg.fsync)?;
        let _ = before;
        self.inner.stats.wal_commits.fetch_add(1, Ordering::Relaxed);
        let bytes: usize = group.iter().map(|j| j.payload.len() + 8).sum();
        self.inner
            .stats
            .wal_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let head = self.inner.heads.read().active.clone();
        let mut n = 0;
        for job in group.iter_mut() {
            n += job.ids.len();
            for ((&id, &ts), v) in job.ids.iter().zip(&job.ts).zip(&job.values) {
                if let Some(info) = self.inner.catalog.get(id) {
                    info.observe(ts, v);
                }
            }
            let values = std::mem::take(&mut job.values);
            head.append(&job.ids, &job.ts, values, |id| {
                Values::empty(
                    self.inner
                        .catalog
                        .get(id)
                        .map_or(ValueKind::Numeric, |i| i.kind),
                )
            });
        }
        self.inner
            .stats
            .points_written
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn cut(
        &mut self,
        waiters: Vec<oneshot::Sender<Result<(), TsdbError>>>,
    ) -> Result<(), (TsdbError, Vec<oneshot::Sender<Result<(), TsdbError>>>)> {
        let new_seq = match self.wal.rotate(self.inner.cfg.fsync) {
            Ok(s) => s,
            Err(e) => return Err((e, waiters)),
        };
        let frozen = {
            let mut heads = self.inner.heads.write();
            let old = std::mem::replace(&mut heads.active, Arc::new(Head::default()));
            heads.frozen.push(old.clone());
            old
        };
        self.head_started = Instant::now();
        self.deferred = false;
        // Blocks only when a head is being sealed and another is already queued (the writer
        // defers cuts while sealing, up to the hard bound): backpressure that bounds memory.
        let job = FlushJob {
            head: frozen,
            wal_below: new_seq,
            done: waiters,
        };
        self.inner.flush_pending.fetch_add(1, Ordering::AcqRel);
        if let Err(std::sync::mpsc::SendError(job)) = self.flush_tx.send(job) {
            self.inner.flush_pending.fetch_sub(1, Ordering::AcqRel);
            return Err((TsdbError::Closed, job.done));
        }
        Ok(())
    }
}

fn clone_error(e: &TsdbError) -> TsdbError {
    match e {
        TsdbError::Io { what, path, source } => TsdbError::Io {
            what,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        TsdbError::Corrupt(s) => TsdbError::Corrupt(s.clone()),
        TsdbError::KindConflict {
            device,
            metric,
            expected,
            got,
        } => TsdbError::KindConflict {
            device: device.clone(),
            metric: metric.clone(),
            expected,
            got,
        },
        TsdbError::Closed => TsdbError::Closed,
        TsdbError::BadQuery(s) => TsdbError::BadQuery(s.clone()),
        TsdbError::Codec(s) => TsdbError::Codec(s.clone()),
    }
}

fn flusher(inner: Arc<Inner>, rx: std::sync::mpsc::Receiver<FlushJob>) {
    while let Ok(job) = rx.recv() {
        let result = inner.flush(&job);
        if let Err(e) = &result {
            // The frozen head stays queryable and its WAL segments stay on disk: nothing is lost,
            // the next start replays them.
            tracing::error!(error = %e, "telemetry flush failed; the points stay in the WAL");
            inner
                .stats
                .background_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        inner.flush_pending.fetch_sub(1, Ordering::AcqRel);
        for done in job.done {
            let _ = done.send(result.as_ref().map(|_| ()).map_err(clone_error));
        }
    }
}

/// Asks the writer to seal the head and waits until the parts are in place (blocking).
fn request_flush(tx: &mpsc::Sender<Job>) -> Result<(), TsdbError> {
    let (done, wait) = oneshot::channel();
    tx.blocking_send(Job::Flush(done))
        .map_err(|_| TsdbError::Closed)?;
    wait.blocking_recv().map_err(|_| TsdbError::Closed)?
}

fn maintainer(inner: Arc<Inner>, tx: mpsc::WeakSender<Job>) {
    let mut last = Instant::now();
    let mut purge_failed: Option<Instant> = None;
    while !inner.shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        // The writer checks its flush interval when it wakes; wake it. A weak sender, so that
        // dropping every Engine handle closes the channel and stops the writer.
        match tx.upgrade() {
            Some(tx) => {
                let _ = tx.try_send(Job::Tick);
            }
            None => return,
        }
        let purging = inner.purges.lock().iter().any(|p| p.device.is_some());
        // After a failure, retry at the maintenance cadence rather than every 200 ms.
        let retry_ok = purge_failed.is_none_or(|t| t.elapsed() >= inner.cfg.maintenance_interval);
        if purging && retry_ok {
            let Some(tx) = tx.upgrade() else { return };
            let flush = || request_flush(&tx);
            match crate::purge::finish_device_purges(&inner, flush) {
                Ok(out) => {
                    purge_failed = None;
                    tracing::info!(
                        devices = out.devices,
                        parts = out.parts_rewritten,
                        bytes = out.bytes_freed,
                        "decommissioned devices' telemetry deleted"
                    );
                }
                Err(e) => {
                    purge_failed = Some(Instant::now());
                    tracing::error!(error = %e, "deleting decommissioned devices' telemetry failed");
                    inner
                        .stats
                        .background_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if last.elapsed() < inner.cfg.maintenance_interval {
            continue;
        }
        last = Instant::now();
        if let Err(e) = crate::maintain::enforce_retention(&inner) {
            tracing::error!(error = %e, "telemetry retention failed");
            inner
                .stats
                .background_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = crate::maintain::compact(&inner, false) {
            tracing::error!(error = %e, "telemetry compaction failed");
            inner
                .stats
                .background_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Engine {
    /// Opens (or creates) the engine in `cfg.dir`: loads parts, replays the WAL (reporting and
    /// skipping damaged tails and unreadable parts), and starts the writer, flusher and maintainer.
    pub fn open(cfg: EngineConfig) -> Result<Engine, TsdbError> {
        let inner = Arc::new(Inner {
            catalog: Catalog::default(),
            heads: RwLock::new(HeadSet {
                active: Arc::new(Head::default()),
                frozen: Vec::new(),
            }),
            parts: RwLock::new(PartSet::default()),
            stats: Stats::default(),
            retention: Mutex::new(BTreeMap::new()),
            part_seq: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            maintenance: Mutex::new(()),
            flush_pending: AtomicUsize::new(0),
            purges: Mutex::new(Vec::new()),
            purge_pass: Mutex::new(()),
            cfg,
        });
        let dir = inner.cfg.dir.clone();
        for d in [dir.clone(), inner.parts_dir(), inner.wal_dir()] {
            std::fs::create_dir_all(&d).map_err(|e| TsdbError::io("creating", &d, e))?;
        }
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| TsdbError::io("opening", &lock_path, e))?;
        lock.try_lock().map_err(|_| {
            TsdbError::io(
                "locking",
                &lock_path,
                std::io::Error::other("another ferrohub process uses this telemetry directory"),
            )
        })?;
        crate::maintain::load_retention(&inner)?;
        crate::purge::load(&inner)?;
        let mut report = RecoveryReport::default();
        load_parts(&inner, &mut report)?;
        let last_seq = replay_wal(&inner, &mut report)?;
        let wal = WalWriter::create(&inner.wal_dir(), last_seq + 1)?;

        let (tx, rx) = mpsc::channel(inner.cfg.queue_depth.max(1));
        let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(1);
        let writer = Writer {
            inner: inner.clone(),
            wal,
            defined: Vec::new(),
            head_started: Instant::now(),
            deferred: false,
            flush_tx,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| TsdbError::io("starting thread", &dir, e))
        };
        let mut threads = Vec::new();
        threads.push(spawn(
            "tsdb-writer",
            Box::new(move || {
                let _lock = lock;
                writer.run(rx)
            }),
        )?);
        let i2 = inner.clone();
        threads.push(spawn(
            "tsdb-flusher",
            Box::new(move || flusher(i2, flush_rx)),
        )?);
        let i3 = inner.clone();
        let tx3 = tx.downgrade();
        threads.push(spawn(
            "tsdb-maintainer",
            Box::new(move || maintainer(i3, tx3)),
        )?);
        let engine = Engine {
            inner,
            tx,
            threads: Arc::new(Mutex::new(threads)),
            recovery: Arc::new(report),
        };
        // Before anyone can read: a purge the last run did not finish is finished now, so the
        // points it deleted do not come back from parts or the WAL.
        if let Err(e) = crate::purge::resume(&engine) {
            engine.clone().close();
            return Err(e);
        }
        Ok(engine)
    }

    /// What opening found (replayed points, damaged WAL tails, unreadable parts).
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Prepares a write: checks points, resolves series and encodes the WAL record (on the
    /// caller's thread, so that encoding scales with callers).
    fn prepare(&self, tenant: &TenantId, points: Vec<Point>) -> (WriteJob, WriteSummary) {
        let mut summary = WriteSummary::default();
        let mut payload = Vec::with_capacity(8 + points.len() * 12);
        payload.put_u8(REC_POINTS);
        let mut ids = Vec::with_capacity(points.len());
        let mut ts = Vec::with_capacity(points.len());
        let mut values = Vec::with_capacity(points.len());
        for (i, p) in points.into_iter().enumerate() {
            if !(0..=MAX_TS).contains(&p.ts_ms) {
                summary.rejected.push((
                    i,
                    format!("timestamp {} ms is outside 1970..=9999", p.ts_ms),
                ));
                continue;
            }
            let kind = p.value.kind();
            let (id, series_kind) = self
                .inner
                .catalog
                .resolve(tenant, &p.device, &p.metric, kind);
            if series_kind != kind {
                summary.rejected.push((
                    i,
                    TsdbError::KindConflict {
                        device: p.device,
                        metric: p.metric,
                        expected: series_kind.as_str(),
                        got: kind.as_str(),
                    }
                    .to_string(),
                ));
                continue;
            }
            ids.push(id);
            ts.push(p.ts_ms);
            values.push(p.value);
        }
        payload.put_varint(ids.len() as u64);
        let mut prev = 0i64;
        for ((&id, &t), v) in ids.iter().zip(&ts).zip(&values) {
            payload.put_varint(u64::from(id));
            payload.put_zigzag(t.wrapping_sub(prev));
            prev = t;
            part::put_value(&mut payload, v);
        }
        summary.accepted = ids.len();
        self.inner
            .stats
            .points_rejected
            .fetch_add(summary.rejected.len() as u64, Ordering::Relaxed);
        (
            WriteJob {
                payload,
                ids,
                ts,
                values,
                done: None,
            },
            summary,
        )
    }

    /// The writer's job for `points` and the channel its answer comes on (`None` when every
    /// point was refused), with the summary.
    #[allow(clippy::type_complexity)]
    fn write_job(
        &self,
        tenant: &TenantId,
        points: Vec<Point>,
    ) -> (
        Option<(Job, oneshot::Receiver<Result<(), TsdbError>>)>,
        WriteSummary,
    ) {
        let (mut job, summary) = self.prepare(tenant, points);
        if job.ids.is_empty() {
            return (None, summary);
        }
        let (done, wait) = oneshot::channel();
        job.done = Some(done);
        (Some((Job::Write(job), wait)), summary)
    }

    /// Stores points of one tenant. Returns when they are durable (per `fsync`) and queryable.
    /// Points whose series holds another kind, or whose timestamp is out of range, are refused
    /// individually (listed in the summary); the others are stored.
    pub async fn write(
        &self,
        tenant: &TenantId,
        points: Vec<Point>,
    ) -> Result<WriteSummary, TsdbError> {
        let (job, summary) = self.write_job(tenant, points);
        if let Some((job, wait)) = job {
            self.tx.send(job).await.map_err(|_| TsdbError::Closed)?;
            wait.await.map_err(|_| TsdbError::Closed)??;
        }
        Ok(summary)
    }

    /// [`Engine::write`] for threads outside a tokio runtime (benchmarks, tools).
    pub fn write_blocking(
        &self,
        tenant: &TenantId,
        points: Vec<Point>,
    ) -> Result<WriteSummary, TsdbError> {
        let (job, summary) = self.write_job(tenant, points);
        if let Some((job, wait)) = job {
            self.tx.blocking_send(job).map_err(|_| TsdbError::Closed)?;
            wait.blocking_recv().map_err(|_| TsdbError::Closed)??;
        }
        Ok(summary)
    }

    /// Seals the head into parts now and waits until they are in place.
    pub async fn flush(&self) -> Result<(), TsdbError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Flush(done))
            .await
            .map_err(|_| TsdbError::Closed)?;
        wait.await.map_err(|_| TsdbError::Closed)?
    }

    /// [`Engine::flush`] outside a runtime.
    pub fn flush_blocking(&self) -> Result<(), TsdbError> {
        request_flush(&self.tx)
    }

    /// Stops the threads after sealing the head (so the next start has no WAL to replay). Blocks;
    /// call from a blocking context. Writes after `close` fail with [`TsdbError::Closed`].
    pub fn close(self) {
        self.inner.shutdown.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock());
        let _ = self.tx.blocking_send(Job::Shutdown);
        drop(self);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Number of series.
    pub fn series_count(&self) -> usize {
        self.inner.catalog.len()
    }

    /// Points in the head (active and frozen).
    pub fn head_points(&self) -> usize {
        let h = self.inner.heads.read();
        h.active.points() + h.frozen.iter().map(|f| f.points()).sum::<usize>()
    }

    /// Number of parts and their total size in bytes.
    pub fn parts_summary(&self) -> (usize, u64) {
        let parts = self.inner.parts.read();
        let mut n = 0;
        let mut bytes = 0;
        for days in parts.values() {
            for list in days.values() {
                n += list.len();
                bytes += list.iter().map(|p| p.file.size()).sum::<u64>();
            }
        }
        (n, bytes)
    }

    /// Points held in parts.
    pub fn part_points(&self) -> u64 {
        let parts = self.inner.parts.read();
        parts
            .values()
            .flat_map(|d| d.values())
            .flatten()
            .map(|p| p.points)
            .sum()
    }
}

fn load_parts(inner: &Arc<Inner>, report: &mut RecoveryReport) -> Result<(), TsdbError> {
    let root = inner.parts_dir();
    let mut max_seq = 0;
    let read = |d: &Path| std::fs::read_dir(d).map_err(|e| TsdbError::io("listing", d, e));
    let mut loaded: Vec<Part> = Vec::new();
    for t in read(&root)? {
        let t = t.map_err(|e| TsdbError::io("listing", &root, e))?;
        let Some(tenant) = t.file_name().to_str().and_then(tenant_from_dir) else {
            continue;
        };
        for d in read(&t.path())? {
            let d = d.map_err(|e| TsdbError::io("listing", t.path(), e))?;
            let Some(day) = d.file_name().to_str().and_then(parse_day_name) else {
                continue;
            };
            for f in read(&d.path())? {
                let f = f.map_err(|e| TsdbError::io("listing", d.path(), e))?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.ends_with(".tmp") {
                    // An interrupted flush or compaction; its inputs are still in place.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let Some(seq) = parse_part_name(name) else {
                    continue;
                };
                max_seq = max_seq.max(seq);
                match inner.load_part(&tenant, day, seq, &f.path(), None) {
                    Ok(p) => loaded.push(p),
                    Err(e) => {
                        tracing::error!(part = %f.path().display(), error = %e,
                            "unreadable telemetry part renamed to .corrupt and skipped");
                        let mut bad = f.path().into_os_string();
                        bad.push(".corrupt");
                        let _ = std::fs::rename(f.path(), &bad);
                        report.corrupt_parts.push(f.path().display().to_string());
                    }
                }
            }
        }
    }
    report.parts = loaded.len();
    let mut parts = inner.parts.write();
    for p in loaded {
        parts
            .entry(p.tenant.clone())
            .or_default()
            .entry(p.day)
            .or_default()
            .push(Arc::new(p));
    }
    for days in parts.values_mut() {
        for list in days.values_mut() {
            list.sort_by_key(|p| p.seq);
        }
    }
    inner.part_seq.store(max_seq + 1, Ordering::Relaxed);
    Ok(())
}

/// Replays the WAL into the active head. Returns the last segment's sequence number (0 if none).
fn replay_wal(inner: &Arc<Inner>, report: &mut RecoveryReport) -> Result<u64, TsdbError> {
    // WAL ids are those of the run that wrote them, per segment.
    let mut ids: HashMap<(u64, u64), SeriesId> = HashMap::new();
    let head = inner.heads.read().active.clone();
    let mut points = 0u64;
    let (segments, damage) = wal::replay(&inner.wal_dir(), |seq, payload| {
        let mut r = Reader::new(payload, "WAL record");
        match r.u8()? {
            REC_SERIES => {
                let wal_id = r.varint()?;
                let tenant = TenantId::new(r.str()?);
                let device = r.str()?;
                let metric = r.str()?;
                let kind = match r.u8()? {
                    0 => ValueKind::Numeric,
                    1 => ValueKind::Bool,
                    2 => ValueKind::Str,
                    k => return Err(TsdbError::Corrupt(format!("unknown kind {k}"))),
                };
                let (id, _) = inner.catalog.resolve(&tenant, device, metric, kind);
                ids.insert((seq, wal_id), id);
            }
            REC_POINTS => {
                let n = r.len(wal::MAX_RECORD)?;
                let mut pid = Vec::with_capacity(n);
                let mut pts = Vec::with_capacity(n);
                let mut vals = Vec::with_capacity(n);
                let mut prev = 0i64;
                for _ in 0..n {
                    let wal_id = r.varint()?;
                    let t = prev.wrapping_add(r.zigzag()?);
                    prev = t;
                    let v = part::read_value(&mut r)?;
                    let id = *ids.get(&(seq, wal_id)).ok_or_else(|| {
                        TsdbError::Corrupt(format!("points of undefined series {wal_id}"))
                    })?;
                    let Some(info) = inner.catalog.get(id) else {
                        continue;
                    };
                    if info.kind != v.kind() {
                        continue;
                    }
                    info.observe(t, &v);
                    pid.push(id);
                    pts.push(t);
                    vals.push(v);
                }
                points += pid.len() as u64;
                head.append(&pid, &pts, vals, |id| {
                    Values::empty(inner.catalog.get(id).map_or(ValueKind::Numeric, |i| i.kind))
                });
            }
            t => return Err(TsdbError::Corrupt(format!("unknown WAL record type {t}"))),
        }
        Ok(())
    })?;
    for d in &damage {
        tracing::warn!(segment = %d.segment, offset = d.offset, skipped_bytes = d.skipped_bytes,
            reason = %d.reason, "telemetry WAL damage skipped (an unacknowledged tail after a crash, or corruption)");
    }
    report.wal_segments = segments.len();
    report.wal_points = points;
    report.wal_damage = damage;
    Ok(segments.last().copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_names_round_trip() {
        for day in [-1000, 0, 1, 19_000, 20_454, 2_932_896] {
            assert_eq!(parse_day_name(&day_name(day)), Some(day));
        }
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(20_454), "2026-01-01");
        assert_eq!(parse_day_name("2026-02-30"), None);
        for t in ["default", "a b/c", "", "é"] {
            let t = TenantId::new(t);
            assert_eq!(tenant_from_dir(&tenant_dir(&t)), Some(t));
        }
    }

    #[test]
    fn parallel_sealing_writes_the_same_part_as_one_thread() {
        // Uneven series (1 to ~40,000 points) so the slices differ in series count.
        let series: Vec<SeriesData> = (0..40)
            .map(|i| {
                let n = 1 + (i * i * 25) % 40_000;
                SeriesData {
                    device: format!("d{i}").into(),
                    metric: "m".into(),
                    ts: (0..n as i64).map(|k| k * 1000 + (k * 7) % 13).collect(),
                    values: Values::Float((0..n).map(|k| (k % 977) as f64 * 0.01).collect()),
                }
            })
            .collect();
        assert!(series.iter().map(|s| s.ts.len()).sum::<usize>() > 100_000);
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, threads: usize| {
            let path = dir.path().join(name);
            let mut w = PartWriter::create(&path, false).unwrap();
            for e in encode_parallel(&series, threads).unwrap() {
                w.add_encoded(e).unwrap();
            }
            w.finish().unwrap();
            std::fs::read(path).unwrap()
        };
        let one = write("1.part", 1);
        assert_eq!(write("3.part", 3), one);
        assert_eq!(write("64.part", 64), one);
        let (_, index) = PartFile::open(&dir.path().join("3.part")).unwrap();
        assert_eq!(index.series.len(), 40);
        assert_eq!(index.series[39].device, "d39");
    }
}
