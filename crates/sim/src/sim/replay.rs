//! `ferrohub sim replay`: recorded telemetry published again, one MQTT connection per recorded
//! device, at the recorded pace (or faster).
//!
//! The recording ([`super::recording`]) is read twice: a first pass checks it, lists its devices
//! and indexes it; then every device connects (before the clock starts, so that connecting does
//! not distort the timing), and a blocking thread merges the recording into messages, one per
//! (device, timestamp), in time order. The scheduler holds each message until its time —
//! `start + (ts - first_ts) / speed`, or at once with `--speed max` — and hands it to its device's
//! task through a bounded queue; a device whose queue is full (its in-flight window is full)
//! holds the scheduler up, so memory stays bounded and `--speed max` goes as fast as the
//! acknowledgements allow. A lost connection is re-established and the QoS 1 messages it left
//! unacknowledged are sent again before anything new (the hub replaces a point written twice).
//! Counters, the progress line and the summary are `sim run`'s.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{self, Disconnect, Packet, ProtocolVersion, Publish, PublishProperties};
use ferrohub_types::QoS;
use parking_lot::Mutex;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::behave::Behaviour;
use super::chaos::Chaos;
use super::generate::Value;
use super::profile::Format;
use super::recording::{Message, Recording, RecordingError, ScanOptions};
use super::report::{Progress, ProgressMode, Summary};
use super::run::{RunConfig, RunError, STRIPES, Shared, pause_or_stop};
use super::{ReplayArgs, TopicTemplate};
use crate::bench::fleet;
use crate::bench::stats::Latency;
use crate::bench::wire::{
    ConnError, ConnectRequest, Creds, Session, WindowSlot, spawn_packet_reader, take_window_slot,
};

/// Messages queued per device between the scheduler and the device's connection.
const DEVICE_QUEUE: usize = 16;
/// Messages queued between the reading thread and the scheduler.
const READ_AHEAD: usize = 1024;
/// Bad rows printed on stderr (the rest are counted).
const BAD_ROWS_SHOWN: u64 = 20;
/// Keys the hub's decoder reads as a sample's timestamp rather than as metrics.
const TIMESTAMP_KEYS: [&str; 3] = ["ts", "timestamp", "time"];
/// The hub's default skew window (`[telemetry] future_skew_secs`, `max_backfill_days`).
const HUB_FUTURE_SKEW_MS: i64 = 300_000;
const HUB_BACKFILL_MS: i64 = 30 * 86_400_000;

/// Replay pace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as the acknowledgements allow.
    Max,
    /// This many times the recorded pace.
    Factor(f64),
}

impl std::fmt::Display for Speed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Speed::Max => f.write_str("max"),
            Speed::Factor(x) => write!(f, "{x}x"),
        }
    }
}

/// `max`, or a factor above zero (`1`, `10`, `0.5`).
pub fn parse_speed(s: &str) -> Result<Speed, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("max") {
        return Ok(Speed::Max);
    }
    match s.trim_end_matches(['x', 'X']).parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(Speed::Factor(x)),
        _ => Err(format!(
            "{s:?}: expected `max` or a factor above 0 such as 1, 10 or 0.5"
        )),
    }
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Connections, QoS, in-flight window, timeouts, reconnects (the generator fields are unused).
    pub run: RunConfig,
    /// Pace.
    pub speed: Speed,
    /// Move the recording so that its first record is at the start of the replay.
    pub shift_to_now: bool,
    /// Times the recording is played (each loop continues the timeline of the previous one).
    pub loops: u32,
    /// Payload format.
    pub format: Format,
}

/// One recorded device: its connection identity and topic.
#[derive(Debug, Clone)]
pub struct ReplayDevice {
    /// Device id: the MQTT client id.
    pub id: Arc<str>,
    /// Its credentials (`None`: the connection options').
    pub creds: Option<Creds>,
    /// The topic it publishes on.
    pub topic: Arc<str>,
    /// Local address it connects from (`--source-address`, in turn by device).
    pub source: Option<std::net::IpAddr>,
}

/// Why a replay failed.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// Reading the recording failed.
    #[error(transparent)]
    Recording(#[from] RecordingError),
    /// The counters could not be set up.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The device list does not match the recording.
    #[error("{0} devices given for a recording of {1} devices")]
    Devices(usize, usize),
    /// The reading thread died.
    #[error("the thread reading the recording failed: {0}")]
    Reader(String),
}

/// What a replay did beyond `sim run`'s counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayStats {
    /// The files, as given.
    pub files: Vec<String>,
    /// Their layouts (`export`, `wide`).
    pub layouts: Vec<String>,
    /// Usable rows.
    pub rows: u64,
    /// Rows skipped as bad (reported on stderr with file:line).
    pub bad_rows: u64,
    /// Runs of increasing time merged (1: sorted by time; an export: one per series).
    pub runs: u64,
    /// First recorded timestamp (ms).
    pub first_ts: i64,
    /// Last recorded timestamp (ms).
    pub last_ts: i64,
    /// `max` or the factor (`10x`).
    pub speed: String,
    /// Added to every recorded timestamp (`--shift-to-now`), ms.
    pub shift_ms: i64,
    /// Loops played (completely or not).
    pub loops: u32,
    /// Messages not sent because their device could not connect (or reconnect).
    pub messages_dropped: u64,
}

/// The outcome of `ferrohub sim replay`: `sim run`'s summary (`samples_sent` counts values)
/// and the replay's own numbers under `replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplaySummary {
    /// Connections and messages, as `sim run` reports them.
    #[serde(flatten)]
    pub run: Summary,
    /// The recording and the replay.
    pub replay: ReplayStats,
}

impl ReplaySummary {
    /// `sim run`'s table followed by the replay's rows.
    pub fn table(&self) -> String {
        let mut out = self.run.table();
        // Align with the run's table: its values start after the widest key and two spaces.
        let width = out
            .lines()
            .next()
            .and_then(|l| {
                l.find("  ")
                    .map(|i| i + l[i..].len() - l[i..].trim_start().len())
            })
            .unwrap_or(17)
            .saturating_sub(2);
        let r = &self.replay;
        let rows = [
            (
                "files",
                format!("{} ({})", r.files.join(", "), r.layouts.join(", ")),
            ),
            (
                "rows",
                format!(
                    "{} ({} bad, skipped; {} runs merged)",
                    r.rows, r.bad_rows, r.runs
                ),
            ),
            (
                "recording",
                format!(
                    "{} .. {} ({:.3} s)",
                    rfc3339(r.first_ts),
                    rfc3339(r.last_ts),
                    (r.last_ts - r.first_ts) as f64 / 1000.0
                ),
            ),
            (
                "replay",
                format!(
                    "speed {}, {} loop(s), timestamps {}",
                    r.speed,
                    r.loops,
                    if r.shift_ms == 0 {
                        "as recorded".to_string()
                    } else {
                        format!("shifted by {:+.3} s", r.shift_ms as f64 / 1000.0)
                    }
                ),
            ),
            ("dropped", r.messages_dropped.to_string()),
        ];
        for (k, v) in rows {
            out.push_str(&format!("{k:<width$}  {v}\n"));
        }
        out
    }
}

fn rfc3339(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs `ferrohub sim replay` and prints its summary; fails if nothing could be sent.
pub async fn cli(a: &ReplayArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let s = replay_args(a, shutdown).await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&s).context("rendering the summary")?
        );
    } else {
        print!("{}", s.table());
    }
    if s.run.messages_sent == 0 {
        bail!(
            "nothing could be sent to {}{}",
            s.run.broker,
            s.run
                .first_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Checks the arguments, reads the recording and replays it.
pub async fn replay_args(
    a: &ReplayArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ReplaySummary> {
    if a.loops == 0 {
        bail!("--loop must be at least 1");
    }
    let topic = TopicTemplate::parse(&a.topic)?;
    let files = a.files.clone();
    let opts = ScanOptions {
        strict: a.strict,
        max_runs: a.max_runs,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    if !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("[sim] checking {} file(s)…", files.len());
    }
    let scan = tokio::task::spawn_blocking(move || {
        let mut shown = 0u64;
        let r = Recording::scan(&files, opts, &mut |bad| {
            shown += 1;
            if shown <= BAD_ROWS_SHOWN {
                eprintln!("[sim] skipping {bad}");
            }
        });
        if shown > BAD_ROWS_SHOWN {
            eprintln!("[sim] ... {} more bad rows skipped", shown - BAD_ROWS_SHOWN);
        }
        r
    });
    let rec = tokio::select! {
        r = scan => r.context("reading the recording")??,
        _ = &mut shutdown => bail!("interrupted while reading the recording"),
    };
    if rec.rows == 0 {
        bail!(
            "no usable rows in {}",
            a.files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let setup = super::transport::setup(&a.broker)?;
    let devices = replay_devices(a, &rec, &topic, setup.tls.as_ref())?;
    let fd_limit = crate::bench::sys::raise_fd_limit();
    let usable = fd_limit.saturating_sub(64);
    if devices.len() as u64 > usable {
        bail!(
            "the recording has {} devices, which need as many sockets, but this process may \
             open about {usable} (`ulimit -n` is {fd_limit})",
            devices.len()
        );
    }
    let span = rec.last_ts - rec.first_ts;
    warn_skew(a, &rec, span);
    let cfg = ReplayConfig {
        run: RunConfig {
            opts: a.broker.client_opts(setup.transport, setup.port).await?,
            broker: setup.broker,
            qos: a.broker.qos(),
            seed: 0,
            connect_rate: 0.0,
            connect_concurrency: a.delivery.connect_concurrency as usize,
            duration: None,
            messages_per_device: None,
            inflight: a.delivery.inflight,
            ack_timeout: a.delivery.ack_timeout,
            drain: a.delivery.drain,
            progress: if a.no_progress {
                ProgressMode::Off
            } else {
                ProgressMode::Terminal
            },
            reconnect: a.delivery.reconnect(),
            chaos: Chaos::default(),
            // Replayed devices send their recording and nothing else, over clean sessions.
            behaviour: Behaviour::off(),
            session_expiry: 0,
            sources: a.broker.source_addresses.clone(),
        },
        speed: a.speed,
        shift_to_now: a.shift_to_now,
        loops: a.loops,
        format: a.format,
    };
    if !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!(
            "[sim] replaying {} rows of {} devices ({:.1} s recorded) → {} (MQTT {}, QoS {}), speed {}",
            rec.rows,
            devices.len(),
            span as f64 / 1000.0,
            cfg.run.broker,
            a.broker.protocol.label(),
            a.broker.qos,
            a.speed
        );
    }
    let mut s = replay(cfg, Arc::new(rec), devices, &mut shutdown).await?;
    s.replay.files = a.files.iter().map(|p| p.display().to_string()).collect();
    Ok(s)
}

/// Warns when the hub would replace the replayed timestamps (its default skew window).
fn warn_skew(a: &ReplayArgs, rec: &Recording, span: i64) {
    let now = now_ms();
    if a.shift_to_now {
        if let Speed::Factor(x) = a.speed
            && x <= 1.0
        {
            return;
        }
        let ahead = match a.speed {
            Speed::Max => span,
            Speed::Factor(x) => (span as f64 * (1.0 - 1.0 / x)) as i64,
        };
        if ahead > HUB_FUTURE_SKEW_MS {
            eprintln!(
                "[sim] warning: at speed {}, shifted timestamps run up to {:.0} s ahead of the \
                 clock; Ferrohub replaces device timestamps more than future_skew_secs (300 s by \
                 default) ahead with the receive time",
                a.speed,
                ahead as f64 / 1000.0
            );
        }
        return;
    }
    if now - rec.first_ts > HUB_BACKFILL_MS {
        eprintln!(
            "[sim] warning: the recording starts more than 30 days ago; Ferrohub replaces device \
             timestamps older than max_backfill_days (30 by default) with the receive time \
             (--shift-to-now moves the recording to now)"
        );
    } else if rec.last_ts - now > HUB_FUTURE_SKEW_MS {
        eprintln!(
            "[sim] warning: the recording ends more than 300 s in the future; Ferrohub replaces \
             such device timestamps with the receive time"
        );
    }
}

/// The recording's devices with their credentials and topics: a fleet file's entries by
/// client id (every device must be in it), else `--username` (`{device}` replaced; default the
/// device id) and `--password`.
fn replay_devices(
    a: &ReplayArgs,
    rec: &Recording,
    topic: &TopicTemplate,
    tls: Option<&crate::bench::transport::TlsSettings>,
) -> anyhow::Result<Vec<ReplayDevice>> {
    let fleet = match &a.fleet {
        Some(path) => {
            let entries = fleet::devices(&fleet::read(path)?, 0);
            Some((
                path,
                entries
                    .into_iter()
                    .map(|e| (e.client_id.clone(), e))
                    .collect::<std::collections::HashMap<_, _>>(),
            ))
        }
        None => None,
    };
    let mut out = Vec::with_capacity(rec.devices.names().len());
    for (index, id) in rec.devices.names().iter().enumerate() {
        let creds = match &fleet {
            Some((path, entries)) => {
                let Some(e) = entries.get(&**id) else {
                    bail!(
                        "device {id:?} of the recording is not in the fleet file {}",
                        path.display()
                    );
                };
                super::fleet_creds(e, tls)?
            }
            None => a.broker.shared_creds(id),
        };
        let sources = &a.broker.source_addresses;
        out.push(ReplayDevice {
            id: id.clone(),
            creds,
            source: (!sources.is_empty()).then(|| sources[index % sources.len()]),
            topic: Arc::from(topic.render(id, index as u64, "replay").as_str()),
        });
    }
    Ok(out)
}

/// A message for a device, its timestamp already shifted.
struct Out {
    ts: i64,
    values: Vec<(Arc<str>, Value)>,
}

/// The payload of one message: `{"ts": …, "metric": value, …}`, or the hub's
/// `{"ts": …, "values": {…}}` shape when a metric is named like a timestamp key (`time`).
struct Payload<'a> {
    ts: i64,
    values: &'a [(Arc<str>, Value)],
}

struct Values<'a>(&'a [(Arc<str>, Value)]);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(&**k, v)?;
        }
        map.end()
    }
}

impl Serialize for Payload<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self
            .values
            .iter()
            .any(|(k, _)| TIMESTAMP_KEYS.contains(&&**k))
        {
            let mut map = s.serialize_map(Some(2))?;
            map.serialize_entry("ts", &self.ts)?;
            map.serialize_entry("values", &Values(self.values))?;
            return map.end();
        }
        let mut map = s.serialize_map(Some(self.values.len() + 1))?;
        map.serialize_entry("ts", &self.ts)?;
        for (k, v) in self.values {
            map.serialize_entry(&**k, v)?;
        }
        map.end()
    }
}

/// A payload could not be encoded (not expected: every value is a plain scalar).
#[derive(Debug, Error)]
#[error("encoding a {format} payload: {message}")]
pub struct PayloadError {
    format: &'static str,
    message: String,
}

/// Encodes one message's payload.
pub fn encode_payload(
    format: Format,
    ts: i64,
    values: &[(Arc<str>, Value)],
    out: &mut Vec<u8>,
) -> Result<(), PayloadError> {
    let p = Payload { ts, values };
    let fail = |message: String| PayloadError {
        format: format.name(),
        message,
    };
    match format {
        Format::Json => serde_json::to_writer(&mut *out, &p).map_err(|e| fail(e.to_string())),
        Format::Cbor => ciborium::into_writer(&p, &mut *out).map_err(|e| fail(e.to_string())),
        Format::Msgpack => rmp_serde::encode::write(&mut *out, &p).map_err(|e| fail(e.to_string())),
    }
}

/// Replays `rec` with one connection per device (`devices[i]` is the recording's device `i`).
pub async fn replay(
    cfg: ReplayConfig,
    rec: Arc<Recording>,
    devices: Vec<ReplayDevice>,
    shutdown: impl Future<Output = ()>,
) -> Result<ReplaySummary, ReplayError> {
    if devices.len() != rec.devices.names().len() {
        return Err(ReplayError::Devices(
            devices.len(),
            rec.devices.names().len(),
        ));
    }
    let latency = (0..STRIPES)
        .map(|_| Latency::new(2).map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Histogram(e.to_string()))?;
    let shared = Arc::new(Shared::new(devices.len() as u64, latency));
    let cfg = Arc::new(cfg);
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut interrupted = false;

    let (progress_stop, mut progress_rx) = watch::channel(false);
    let progress = {
        let shared = shared.clone();
        let mut progress = Progress::new(cfg.run.progress);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => progress.update(&shared, started.elapsed()),
                    _ = progress_rx.changed() => break,
                }
            }
            progress
        })
    };

    // Every device connects first: the clock starts when the fleet is online.
    let handshakes = Arc::new(Semaphore::new(cfg.run.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for (i, dev) in devices.iter().enumerate() {
        let (cfg, shared, dev, handshakes, mut stop) = (
            cfg.clone(),
            shared.clone(),
            dev.clone(),
            handshakes.clone(),
            stop_rx.clone(),
        );
        connecting.spawn(async move {
            let Ok(_permit) = handshakes.acquire_owned().await else {
                return (i, None);
            };
            let mut tries = 0;
            let s = connect(&cfg, &shared, &dev, i as u64, false, &mut tries, &mut stop).await;
            match &s {
                Some(_) => shared.connected.fetch_add(1, Relaxed),
                None => shared.failed_connects.fetch_add(1, Relaxed),
            };
            (i, s)
        });
    }
    let mut sessions: Vec<Option<Session>> = (0..devices.len()).map(|_| None).collect();
    loop {
        tokio::select! {
            r = connecting.join_next() => match r {
                Some(Ok((i, s))) => {
                    if let Some(slot) = sessions.get_mut(i) {
                        *slot = s;
                    }
                }
                Some(Err(_)) => {}
                None => break,
            },
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
    }

    let mut senders = Vec::with_capacity(devices.len());
    let mut device_tasks = JoinSet::new();
    for (i, (dev, session)) in devices.into_iter().zip(sessions).enumerate() {
        let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
        senders.push(tx);
        device_tasks.spawn(device_task(
            cfg.clone(),
            shared.clone(),
            dev,
            i as u64,
            session,
            rx,
            stop_rx.clone(),
        ));
    }

    let (msg_tx, mut msg_rx) = mpsc::channel::<(u32, Message)>(READ_AHEAD);
    let loops = cfg.loops;
    let reader: JoinHandle<Result<(), RecordingError>> = {
        let rec = rec.clone();
        tokio::task::spawn_blocking(move || {
            for k in 0..loops {
                for m in rec.messages()? {
                    if msg_tx.blocking_send((k, m?)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    };

    let t0 = rec.first_ts;
    let span = rec.last_ts - rec.first_ts;
    let clock = tokio::time::Instant::now();
    let shift_ms = if cfg.shift_to_now { now_ms() - t0 } else { 0 };
    // A further loop starts one recorded interval (the first one) after the previous loop's end.
    let mut first_gap: Option<i64> = None;
    let mut loops_played = 0;
    let mut dropped = 0u64;
    if !interrupted {
        loop {
            let next = tokio::select! {
                m = msg_rx.recv() => m,
                _ = &mut shutdown => {
                    interrupted = true;
                    None
                }
            };
            let Some((k, m)) = next else { break };
            loops_played = loops_played.max(k + 1);
            if k == 0 && first_gap.is_none() && m.ts > t0 {
                first_gap = Some(m.ts - t0);
            }
            let period = span + first_gap.unwrap_or(1000);
            let offset = i64::from(k).saturating_mul(period);
            if let Speed::Factor(x) = cfg.speed {
                let rel = (m.ts - t0).saturating_add(offset).max(0) as f64 / 1000.0 / x;
                let due = clock + Duration::from_secs_f64(rel.min(1e12));
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = &mut shutdown => {
                        interrupted = true;
                        break;
                    }
                }
            }
            let out = Out {
                ts: m.ts.saturating_add(shift_ms).saturating_add(offset),
                values: m.values,
            };
            let Some(tx) = senders.get(m.device as usize) else {
                continue;
            };
            tokio::select! {
                r = tx.send(out) => if r.is_err() { dropped += 1 },
                _ = &mut shutdown => {
                    interrupted = true;
                    break;
                }
            }
        }
    }
    drop(msg_rx);
    drop(senders);
    if interrupted {
        let _ = stop_tx.send(true);
    }
    // Devices finish their queues, then wait up to the drain for their acknowledgements; a stop
    // bounds what is left.
    let grace = cfg.run.drain + Duration::from_secs(3);
    let mut hard_stop: Option<tokio::time::Instant> =
        interrupted.then(|| tokio::time::Instant::now() + grace);
    loop {
        let deadline = async {
            match hard_stop {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = device_tasks.join_next() => match r {
                Some(Ok(n)) => dropped += n,
                Some(Err(_)) => {}
                None => break,
            },
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                let _ = stop_tx.send(true);
                hard_stop = Some(tokio::time::Instant::now() + grace);
            }
            _ = deadline => {
                device_tasks.abort_all();
                while device_tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    let read = reader.await;
    let _ = progress_stop.send(true);
    let elapsed = started.elapsed();
    if let Ok(mut p) = progress.await {
        p.finish(&shared, elapsed);
    }
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ReplayError::Reader(e.to_string())),
    }
    let summary = Summary::new(
        &cfg.run,
        &shared,
        elapsed,
        0,
        vec![("replay".to_string(), shared.devices)],
        interrupted,
    );
    Ok(ReplaySummary {
        run: summary,
        replay: ReplayStats {
            files: Vec::new(),
            layouts: rec.layouts().into_iter().map(String::from).collect(),
            rows: rec.rows,
            bad_rows: rec.bad_rows,
            runs: rec.runs() as u64,
            first_ts: rec.first_ts,
            last_ts: rec.last_ts,
            speed: cfg.speed.to_string(),
            shift_ms,
            loops: loops_played,
            messages_dropped: dropped,
        },
    })
}

/// Connects `dev`, retrying with back-off (first connect: `connect_retries` times; reconnect:
/// `reconnect_attempts` times, each failure counted).
async fn connect(
    cfg: &ReplayConfig,
    shared: &Shared,
    dev: &ReplayDevice,
    index: u64,
    reconnecting: bool,
    tries: &mut u64,
    stop: &mut watch::Receiver<bool>,
) -> Option<Session> {
    let limit = if reconnecting {
        cfg.run.reconnect.attempts
    } else {
        cfg.run.reconnect.connect_retries
    };
    let mut attempt = 0;
    loop {
        if *stop.borrow() {
            return None;
        }
        let r = tokio::select! {
            r = Box::pin(Session::connect_session(
                &cfg.run.opts,
                dev.id.to_string(),
                dev.creds.as_ref(),
                8 * 1024,
                ConnectRequest { source: dev.source, ..ConnectRequest::CLEAN },
            )) => r,
            _ = stop.wait_for(|s| *s) => return None,
        };
        let e = match r {
            Ok(s) => return Some(s),
            Err(e) => e,
        };
        if let ConnError::Refused { code, .. } = &e {
            shared.answer("CONNACK", *code);
        }
        if reconnecting {
            shared.reconnect_failures.fetch_add(1, Relaxed);
        }
        if attempt >= limit {
            shared.note_error(|| format!("{}: connect: {e}", dev.id));
            return None;
        }
        let pause = cfg.run.reconnect.backoff(0, index, attempt, *tries);
        attempt += 1;
        *tries += 1;
        if !pause_or_stop(pause, stop).await {
            return None;
        }
    }
}

/// Packet ids in flight: send times and payloads by id (to resend them after a lost
/// connection), and the free ids.
struct InFlight {
    sent: Vec<Option<(Instant, Bytes)>>,
    free: Vec<u16>,
}

impl InFlight {
    fn outstanding(&self) -> u64 {
        self.sent.iter().filter(|s| s.is_some()).count() as u64
    }
}

/// Why a connection ended.
enum End {
    Lost(String),
    AckTimeout,
    Stopped,
}

/// One device's live connection.
struct Conn {
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    wbuf: BytesMut,
    reader: JoinHandle<()>,
    reader_done: bool,
    inflight: Arc<Mutex<InFlight>>,
    window: Arc<Semaphore>,
    window_size: usize,
    server_said: Arc<Mutex<Option<String>>>,
    version: ProtocolVersion,
    last_write: tokio::time::Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn start(
        session: Session,
        cfg: &ReplayConfig,
        shared: &Arc<Shared>,
        index: u64,
        device: Arc<str>,
    ) -> Conn {
        let version = session.version;
        let window_size = usize::from(cfg.run.inflight.min(session.server_receive_max).max(1));
        let inflight = Arc::new(Mutex::new(InFlight {
            sent: vec![None; window_size + 1],
            free: (1..=window_size as u16).rev().collect(),
        }));
        let window = Arc::new(Semaphore::new(window_size));
        let server_said: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let (rd, wr) = tokio::io::split(session.stream);
        let reader = {
            let (inflight, window, shared, server_said) = (
                inflight.clone(),
                window.clone(),
                shared.clone(),
                server_said.clone(),
            );
            let stripe = (index as usize) % STRIPES;
            spawn_packet_reader(rd, session.rbuf, version, move |p| match p {
                Packet::PubAck(ack) => {
                    let at = {
                        let mut f = inflight.lock();
                        let at = f
                            .sent
                            .get_mut(usize::from(ack.packet_id))
                            .and_then(Option::take);
                        if at.is_some() {
                            f.free.push(ack.packet_id);
                        }
                        at
                    };
                    let Some((at, _)) = at else { return };
                    window.add_permits(1);
                    if ack.code >= 0x80 {
                        shared.answer("PUBACK", ack.code);
                    }
                    shared.count_puback(&ack, at, stripe, &device);
                }
                Packet::Disconnect(d) => {
                    shared.answer("DISCONNECT", d.code);
                    *server_said.lock() = Some(format!(
                        "the broker sent DISCONNECT {:#04x} ({})",
                        d.code,
                        mqtt::reason::name(d.code)
                    ));
                }
                _ => {}
            })
        };
        shared.online.fetch_add(1, Relaxed);
        Conn {
            wr: Box::new(wr),
            wbuf: BytesMut::with_capacity(1024),
            reader,
            reader_done: false,
            inflight,
            window,
            window_size,
            server_said,
            version,
            last_write: tokio::time::Instant::now(),
        }
    }

    fn lost(&self, what: &str) -> End {
        End::Lost(
            self.server_said
                .lock()
                .take()
                .unwrap_or_else(|| what.to_string()),
        )
    }

    /// Resolves when the broker closed the connection.
    async fn closed(&mut self) {
        if self.reader_done {
            return std::future::pending().await;
        }
        let _ = (&mut self.reader).await;
        self.reader_done = true;
    }

    async fn write(&mut self) -> Result<(), End> {
        if let Err(e) = self.wr.write_all(&self.wbuf).await {
            self.wbuf.clear();
            return Err(self.lost(&format!("writing: {e}")));
        }
        self.wbuf.clear();
        self.last_write = tokio::time::Instant::now();
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), End> {
        mqtt::encode(&Packet::PingReq, self.version, &mut self.wbuf)
            .map_err(|e| End::Lost(format!("encoding PINGREQ: {e}")))?;
        self.write().await
    }

    async fn publish(
        &mut self,
        cfg: &ReplayConfig,
        publish: Publish,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let qos1 = publish.qos != QoS::AtMostOnce;
        let mut publish = publish;
        if qos1 {
            if self.reader_done {
                return Err(self.lost("the broker closed the connection"));
            }
            let slot = tokio::select! {
                r = take_window_slot(&self.window, &mut self.wr, &mut self.wbuf, cfg.run.ack_timeout) => r,
                _ = stop.wait_for(|s| *s) => return Err(End::Stopped),
                _ = &mut self.reader => {
                    self.reader_done = true;
                    return Err(self.lost("the broker closed the connection"));
                }
            };
            match slot {
                Ok(WindowSlot::Taken) => {}
                Ok(WindowSlot::Closed) => return Err(End::Stopped),
                Ok(WindowSlot::TimedOut) => return Err(End::AckTimeout),
                Err(e) => return Err(self.lost(&format!("writing: {e}"))),
            }
            let mut f = self.inflight.lock();
            let Some(id) = f.free.pop() else {
                // Unreachable: a permit is only returned together with its id.
                return Err(End::Lost(
                    "internal error: a window slot without an id".into(),
                ));
            };
            if let Some(slot) = f.sent.get_mut(usize::from(id)) {
                *slot = Some((Instant::now(), publish.payload.clone()));
            }
            publish.packet_id = id;
        }
        let id = publish.packet_id;
        mqtt::encode(&Packet::Publish(publish), self.version, &mut self.wbuf)
            .map_err(|e| End::Lost(format!("encoding PUBLISH: {e}")))?;
        let r = self.write().await;
        if r.is_err() && qos1 {
            // Not sent, so not awaited: it is sent again after the reconnect.
            let mut f = self.inflight.lock();
            if let Some(slot) = f.sent.get_mut(usize::from(id)) {
                *slot = None;
                f.free.push(id);
            }
        }
        r
    }

    /// Stops the packet reader and waits (at most a second) until it has, so that no PUBACK
    /// is counted after the outstanding messages are.
    async fn stop_reader(&mut self) {
        self.reader.abort();
        for _ in 0..1000 {
            if self.reader.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The connection is lost: the payloads it left unacknowledged, oldest first.
    async fn abandon(mut self, shared: &Shared) -> Vec<Bytes> {
        self.stop_reader().await;
        shared.lost.fetch_add(1, Relaxed);
        shared.online.fetch_sub(1, Relaxed);
        let mut left: Vec<(Instant, Bytes)> = self
            .inflight
            .lock()
            .sent
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        left.sort_by_key(|(at, _)| *at);
        left.into_iter().map(|(_, p)| p).collect()
    }

    /// Waits up to the drain for the outstanding acknowledgements, then disconnects.
    async fn finish(mut self, cfg: &ReplayConfig, shared: &Shared) {
        if cfg.run.qos != QoS::AtMostOnce && !self.reader_done {
            let all = u32::try_from(self.window_size).unwrap_or(u32::MAX);
            tokio::select! {
                r = tokio::time::timeout(cfg.run.drain, self.window.acquire_many(all)) => {
                    if let Ok(Ok(p)) = r {
                        p.forget();
                    }
                }
                _ = &mut self.reader => self.reader_done = true,
            }
        }
        self.stop_reader().await;
        let missing = self.inflight.lock().outstanding();
        shared.unacked.fetch_add(missing, Relaxed);
        if missing > 0 {
            shared.note_error(|| {
                format!(
                    "{missing} message(s) still unacknowledged {:?} after the replay",
                    cfg.run.drain
                )
            });
        }
        let _ = mqtt::encode(
            &Packet::Disconnect(Disconnect::default()),
            self.version,
            &mut self.wbuf,
        );
        let _ = self.wr.write_all(&self.wbuf).await;
        let _ = self.wr.shutdown().await;
        shared.online.fetch_sub(1, Relaxed);
    }
}

/// One device across its connections.
struct Device {
    cfg: Arc<ReplayConfig>,
    shared: Arc<Shared>,
    dev: ReplayDevice,
    index: u64,
    conn: Option<Conn>,
    /// Payloads lost connections left unacknowledged, oldest first: resent (as new publications)
    /// after the reconnect, before anything new. The hub replaces a point written twice, so a
    /// resent message never duplicates one.
    resend: VecDeque<Bytes>,
    gave_up: bool,
    tries: u64,
    properties: PublishProperties,
}

impl Device {
    fn publish(&self, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: self.cfg.run.qos,
            retain: false,
            topic: self.dev.topic.clone(),
            packet_id: 0,
            properties: self.properties.clone(),
            payload,
        }
    }

    /// The connection ended with `end`: what it left unacknowledged goes first in line.
    async fn lose(&mut self, end: &End) {
        note_end(&self.shared, &self.dev, end);
        if let Some(c) = self.conn.take() {
            let mut left: VecDeque<Bytes> = c.abandon(&self.shared).await.into();
            left.append(&mut self.resend);
            self.resend = left;
        }
    }

    /// No more connections: what waits to be resent is unacknowledged.
    fn give_up(&mut self) {
        self.gave_up = true;
        self.shared
            .unacked
            .fetch_add(self.resend.len() as u64, Relaxed);
        self.resend.clear();
    }

    /// Connects if needed and resends what lost connections left unacknowledged. False: no
    /// connection (the device gave up, or the replay stopped).
    async fn ready(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            if self.conn.is_none() {
                if self.cfg.run.reconnect.attempts == 0 {
                    return false;
                }
                let Some(s) = connect(
                    &self.cfg,
                    &self.shared,
                    &self.dev,
                    self.index,
                    true,
                    &mut self.tries,
                    stop,
                )
                .await
                else {
                    return false;
                };
                self.shared.reconnects.fetch_add(1, Relaxed);
                self.conn = Some(Conn::start(
                    s,
                    &self.cfg,
                    &self.shared,
                    self.index,
                    self.dev.id.clone(),
                ));
            }
            let mut failed = None;
            while let Some(p) = self.resend.front().cloned() {
                let publish = self.publish(p);
                let Some(c) = self.conn.as_mut() else { break };
                match c.publish(&self.cfg, publish, stop).await {
                    Ok(()) => {
                        self.resend.pop_front();
                        self.shared.resent.fetch_add(1, Relaxed);
                    }
                    Err(End::Stopped) => return false,
                    Err(end) => {
                        failed = Some(end);
                        break;
                    }
                }
            }
            match failed {
                None => return true,
                Some(end) => self.lose(&end).await,
            }
        }
    }
}

/// One device: publishes what the scheduler hands it; a lost connection is re-established and
/// what it left unacknowledged sent again. Returns the messages it had to drop (it could not
/// connect, or the replay stopped).
async fn device_task(
    cfg: Arc<ReplayConfig>,
    shared: Arc<Shared>,
    dev: ReplayDevice,
    index: u64,
    session: Option<Session>,
    mut rx: mpsc::Receiver<Out>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let ping_every = cfg.run.opts.ping_every();
    let properties = if cfg.run.opts.version.is_v5() {
        PublishProperties {
            content_type: Some(Arc::from(cfg.format.content_type())),
            ..PublishProperties::default()
        }
    } else {
        PublishProperties::default()
    };
    let mut d = Device {
        conn: session.map(|s| Conn::start(s, &cfg, &shared, index, dev.id.clone())),
        gave_up: false,
        cfg,
        shared,
        dev,
        index,
        resend: VecDeque::new(),
        tries: 0,
        properties,
    };
    d.gave_up = d.conn.is_none();
    let mut dropped = 0u64;
    let mut payload = Vec::with_capacity(256);
    loop {
        let ping_at = d.conn.as_ref().map(|c| c.last_write + ping_every);
        let closed = async {
            match d.conn.as_mut() {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        enum Next {
            Msg(Out),
            Ping,
            Closed,
            End,
        }
        let next = tokio::select! {
            m = rx.recv() => m.map_or(Next::End, Next::Msg),
            _ = stop.wait_for(|s| *s) => Next::End,
            _ = sleep_until_opt(ping_at) => Next::Ping,
            _ = closed => Next::Closed,
        };
        let msg = match next {
            Next::End => break,
            Next::Msg(m) => m,
            Next::Ping | Next::Closed => {
                let end = match (&mut d.conn, matches!(next, Next::Ping)) {
                    (Some(c), true) => c.ping().await.err(),
                    (Some(c), false) => Some(c.lost("the broker closed the connection")),
                    (None, _) => None,
                };
                if let Some(end) = end {
                    d.lose(&end).await;
                    // What was in flight is resent now, not when the next message is due.
                    if !d.resend.is_empty() && !d.ready(&mut stop).await && !*stop.borrow() {
                        d.give_up();
                    }
                }
                continue;
            }
        };
        if d.gave_up {
            dropped += 1;
            continue;
        }
        payload.clear();
        if let Err(e) = encode_payload(d.cfg.format, msg.ts, &msg.values, &mut payload) {
            d.shared.note_error(|| format!("{}: {e}", d.dev.id));
            dropped += 1;
            continue;
        }
        let payload = Bytes::copy_from_slice(&payload);
        // Until it is written: a lost connection is re-established first.
        loop {
            if !d.ready(&mut stop).await {
                if !*stop.borrow() {
                    d.give_up();
                }
                dropped += 1;
                break;
            }
            let publish = d.publish(payload.clone());
            let Some(c) = d.conn.as_mut() else { continue };
            match c.publish(&d.cfg, publish, &mut stop).await {
                Ok(()) => {
                    d.shared.sent.fetch_add(1, Relaxed);
                    d.shared.samples.fetch_add(msg.values.len() as u64, Relaxed);
                    break;
                }
                Err(End::Stopped) => {
                    dropped += 1;
                    break;
                }
                Err(end) => d.lose(&end).await,
            }
        }
    }
    if !d.resend.is_empty() && !d.gave_up && !*stop.borrow() {
        d.ready(&mut stop).await;
    }
    if let Some(c) = d.conn.take() {
        c.finish(&d.cfg, &d.shared).await;
    }
    d.shared.unacked.fetch_add(d.resend.len() as u64, Relaxed);
    // Whatever is still queued after a stop was not sent.
    rx.close();
    while rx.recv().await.is_some() {
        dropped += 1;
    }
    dropped
}

fn note_end(shared: &Shared, dev: &ReplayDevice, end: &End) {
    match end {
        End::Lost(why) => shared.note_error(|| format!("{}: {why}", dev.id)),
        End::AckTimeout => shared.note_error(|| format!("{}: no PUBACK in time", dev.id)),
        End::Stopped => {}
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn speeds() {
        assert_eq!(parse_speed("max").unwrap(), Speed::Max);
        assert_eq!(parse_speed("10").unwrap(), Speed::Factor(10.0));
        assert_eq!(parse_speed("0.5x").unwrap(), Speed::Factor(0.5));
        for bad in ["0", "-1", "fast", "inf", "NaN"] {
            assert!(parse_speed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            sim: super::super::SimCommand,
        }
        <Cli as clap::CommandFactory>::command().debug_assert();
        let a = ReplayArgs::try_parse_from(["r.csv", "--speed", "max", "--loop", "3"]).unwrap();
        assert_eq!((a.speed, a.loops, a.files.len()), (Speed::Max, 3, 1));
        assert!(ReplayArgs::try_parse_from(["--speed", "2"]).is_err());
    }

    #[test]
    fn devices_take_fleet_or_shared_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let rec_path = dir.path().join("r.csv");
        std::fs::write(&rec_path, "ts,device,v\n1,a,1\n2,b,2\n").unwrap();
        let rec = Recording::scan(
            std::slice::from_ref(&rec_path),
            ScanOptions {
                strict: true,
                max_runs: 10,
            },
            &mut |_| {},
        )
        .unwrap();
        let topic = TopicTemplate::parse("t/{device}/{index}").unwrap();
        let parse = |extra: &[&str]| {
            let mut v = vec![rec_path.to_str().unwrap()];
            v.extend_from_slice(extra);
            ReplayArgs::try_parse_from(v).unwrap()
        };
        let devs = replay_devices(&parse(&["--password", "pw"]), &rec, &topic, None).unwrap();
        assert_eq!((&*devs[1].id, &*devs[1].topic), ("b", "t/b/1"));
        let c = devs[1].creds.as_ref().unwrap();
        assert_eq!(c.username.as_deref(), Some("b"));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        assert!(
            replay_devices(&parse(&[]), &rec, &topic, None).unwrap()[0]
                .creds
                .is_none()
        );

        let fleet = dir.path().join("fleet.jsonl");
        std::fs::write(
            &fleet,
            "{\"role\":\"device\",\"client_id\":\"b\",\"username\":\"ub\",\"password\":\"pb\"}\n\
             {\"role\":\"device\",\"client_id\":\"a\",\"username\":\"ua\",\"password\":\"pa\"}\n",
        )
        .unwrap();
        let f = fleet.to_str().unwrap();
        let devs = replay_devices(&parse(&["--fleet", f]), &rec, &topic, None).unwrap();
        let c = devs[0].creds.as_ref().unwrap();
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("ua"), Some(&b"pa"[..]))
        );
        std::fs::write(
            &fleet,
            "{\"role\":\"device\",\"client_id\":\"a\",\"password\":\"pa\"}\n",
        )
        .unwrap();
        let e = replay_devices(&parse(&["--fleet", f]), &rec, &topic, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("device \"b\" of the recording is not in"),
            "{e}"
        );
    }

    #[test]
    fn payloads_carry_the_recorded_time_and_values() {
        let v = |k: &str, v: Value| (Arc::<str>::from(k), v);
        let mut out = Vec::new();
        let values = [
            v("temp", Value::Float(21.0)),
            v("n", Value::Int(3)),
            v("ok", Value::Bool(false)),
            v("env.state", Value::Str(Arc::from("idle"))),
        ];
        encode_payload(Format::Json, 1_767_225_600_123, &values, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#"{"ts":1767225600123,"temp":21.0,"n":3,"ok":false,"env.state":"idle"}"#
        );
        // A metric named like a timestamp key goes under `values`.
        out.clear();
        encode_payload(Format::Json, 5, &[v("time", Value::Int(1))], &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#"{"ts":5,"values":{"time":1}}"#
        );
        for f in [Format::Cbor, Format::Msgpack] {
            out.clear();
            encode_payload(f, 5, &values, &mut out).unwrap();
            assert!(!out.is_empty());
        }
    }
}
