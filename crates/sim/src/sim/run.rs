//! Running a fleet: one task and one TCP connection per device, publishing its profile's samples
//! on its own clock.
//!
//! Devices are started at `connect_rate` per second (at most `connect_concurrency` handshakes at
//! once). A connected device takes its first sample at a seed-chosen phase within its interval
//! (so a fleet spreads its messages instead of sending in lockstep), then one every interval, and
//! publishes a message each `batch` samples, at the time of the message's last sample. At QoS 1
//! at most `inflight` messages per connection await their PUBACK (fewer if the broker's MQTT 5
//! Receive Maximum says so); PUBACK latency is measured from the write to the acknowledgement.
//! When the run stops (its duration is over, every device sent `messages_per_device`, or the
//! caller's shutdown future resolved) each device waits up to `drain` for its outstanding
//! PUBACKs, sends DISCONNECT and closes.
//!
//! Besides telemetry a device subscribes to its twin delta and command requests (unless turned
//! off) and handles what arrives between two messages: its packet reader queues incoming PUBLISH
//! packets in a small bounded inbox (overflow is dropped and counted, never waited for). Its
//! session outlives a lost connection (Clean Start = 0 and a Session Expiry on reconnects), and
//! the QoS 1 messages unacknowledged when a connection ends are resent on the next one: with
//! DUP = 1 and their packet ids when the broker resumed the session, as new ones otherwise.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{
    self, Disconnect, DisconnectProperties, Packet, PubResponse, Publish, PublishProperties,
    Subscribe, SubscribeFilter, SubscriptionOptions,
};
use ferrohub_types::QoS;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::behave::{self, Behaviour, Effect, Facts, Settings};
use super::chaos::{self, Action, Chaos, Misbehaviour, Reconnect};
use super::encode::encode;
use super::generate::{self, DeviceSim, Sample};
use super::profile::Profile;
use super::report::{Progress, ProgressMode, Summary};
use crate::bench::stats::Latency;
use crate::bench::wire::{
    ClientOpts, ConnError, ConnectRequest, Creds, Session, WindowSlot, spawn_packet_reader,
    take_window_slot,
};

/// One simulated device of this process.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Its index in the fleet (decides its values, with the seed).
    pub index: u64,
    /// Device id: MQTT client id and `{device}` of the topic.
    pub id: String,
    /// Its own credentials (`None`: the connection options').
    pub creds: Option<Creds>,
    /// Its profile.
    pub profile: Arc<Profile>,
    /// The topic it publishes on.
    pub topic: Arc<str>,
}

/// How a fleet runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Broker address, protocol version, keep-alive, handshake timeout.
    pub opts: ClientOpts,
    /// Broker as the user named it (for the summary).
    pub broker: String,
    /// QoS of the publications (0 or 1).
    pub qos: QoS,
    /// Seed of every generator.
    pub seed: u64,
    /// Devices started per second (0: as fast as `connect_concurrency` allows).
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    /// Stop after this long (from the start of the run).
    pub duration: Option<Duration>,
    /// Stop each device after this many messages.
    pub messages_per_device: Option<u64>,
    /// QoS 1 messages awaiting PUBACK per connection.
    pub inflight: u16,
    /// A connection whose window stays full this long without a PUBACK counts as failed.
    pub ack_timeout: Duration,
    /// After the stop, how long a device waits for its outstanding PUBACKs.
    pub drain: Duration,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// How devices reconnect.
    pub reconnect: Reconnect,
    /// Chaos (all off by default).
    pub chaos: Chaos,
    /// Twins and commands (on by default).
    pub behaviour: Behaviour,
    /// Session Expiry Interval asked for, seconds: the broker keeps a device's session (its
    /// subscriptions and the messages queued for it) this long after a lost connection. 0: clean
    /// sessions (3.1.1: Clean Session = 1), unacknowledged messages are resent as new ones.
    pub session_expiry: u32,
    /// Local addresses devices connect from, by device index round-robin (empty: the system's
    /// choice).
    pub sources: Vec<std::net::IpAddr>,
}

/// Size of an oversized payload (above Ferrohub's default maximum packet size of 1 MiB).
pub const OVERSIZE_BYTES: usize = 2 * 1024 * 1024;

/// Why a run could not start.
#[derive(Debug, Error)]
pub enum RunError {
    /// Nothing to simulate.
    #[error("no devices to simulate")]
    NoDevices,
    /// A latency histogram could not be created (never expected).
    #[error("latency histogram: {0}")]
    Histogram(String),
}

/// Histogram stripes: PUBACKs of different devices record into different locks.
pub(crate) const STRIPES: usize = 16;

/// Counters of a run, shared by every device task.
pub(crate) struct Shared {
    pub devices: u64,
    pub connected: AtomicU64,
    pub online: AtomicU64,
    pub failed_connects: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub samples: AtomicU64,
    pub refused: AtomicU64,
    pub lost: AtomicU64,
    pub unacked: AtomicU64,
    pub reconnects: AtomicU64,
    pub reconnect_failures: AtomicU64,
    pub resent: AtomicU64,
    pub twin_reports: AtomicU64,
    pub desired_applied: AtomicU64,
    pub desired_rejected: AtomicU64,
    pub commands_answered: AtomicU64,
    pub reboots: AtomicU64,
    pub incoming_dropped: AtomicU64,
    pub chaos: [AtomicU64; Action::ALL.len()],
    pub answers: Mutex<BTreeMap<String, u64>>,
    pub first_error: Mutex<Option<String>>,
    pub latency: Vec<Mutex<Latency>>,
}

impl Shared {
    /// Counts the PUBACK of a regular message written at `at`: acknowledged (with its latency,
    /// in latency stripe `stripe`) or refused (the first refusal is the run's first error).
    pub(crate) fn count_puback(
        &self,
        ack: &mqtt::PubResponse,
        at: Instant,
        stripe: usize,
        device: &str,
    ) {
        if ack.code < 0x80 {
            self.acked.fetch_add(1, Relaxed);
            if let Some(l) = self.latency.get(stripe) {
                l.lock().record_ns(at.elapsed().as_nanos() as u64);
            }
            return;
        }
        self.refused.fetch_add(1, Relaxed);
        self.note_error(|| {
            format!(
                "{device}: PUBACK {:#04x} ({}){}",
                ack.code,
                mqtt::reason::name(ack.code),
                ack.properties
                    .reason_string
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )
        });
    }

    /// Counters at zero for `devices` devices.
    pub(crate) fn new(devices: u64, latency: Vec<Mutex<Latency>>) -> Shared {
        Shared {
            devices,
            connected: AtomicU64::new(0),
            online: AtomicU64::new(0),
            failed_connects: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            unacked: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnect_failures: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            twin_reports: AtomicU64::new(0),
            desired_applied: AtomicU64::new(0),
            desired_rejected: AtomicU64::new(0),
            commands_answered: AtomicU64::new(0),
            reboots: AtomicU64::new(0),
            incoming_dropped: AtomicU64::new(0),
            chaos: Default::default(),
            answers: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
            latency,
        }
    }

    fn chaos(&self, a: Action) {
        if let Some(c) = self.chaos.get(a as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn answer(&self, packet: &str, code: u8) {
        *self
            .answers
            .lock()
            .entry(format!("{packet} {code:#04x}"))
            .or_insert(0) += 1;
    }

    /// An answer that is not a packet with a reason code (e.g. `CLOSE`).
    fn answer_named(&self, what: &str) {
        *self.answers.lock().entry(what.to_string()).or_insert(0) += 1;
    }

    pub(crate) fn note_error(&self, e: impl FnOnce() -> String) {
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(e());
        }
    }

    /// Every stripe merged.
    pub fn latency(&self) -> Option<Latency> {
        let mut all = Latency::new(2).ok()?;
        for s in &self.latency {
            all.merge(&s.lock());
        }
        Some(all)
    }
}

/// Aborts the task when dropped (the packet reader of a device that was itself aborted).
struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits (at most a second) until it has stopped, so that it counts no
    /// PUBACK after the device counted its outstanding messages.
    async fn stop(&mut self) {
        self.0.abort();
        for _ in 0..1000 {
            if self.0.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `devices` until the run's bounds or `shutdown`; returns the summary.
pub async fn run(
    cfg: RunConfig,
    devices: Vec<DeviceSpec>,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, RunError> {
    if devices.is_empty() {
        return Err(RunError::NoDevices);
    }
    let latency = (0..STRIPES)
        .map(|_| Latency::new(2).map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Histogram(e.to_string()))?;
    let shared = Arc::new(Shared::new(devices.len() as u64, latency));
    let mut profiles: Vec<(String, u64)> = Vec::new();
    for d in &devices {
        match profiles.iter_mut().find(|(n, _)| *n == d.profile.name) {
            Some((_, c)) => *c += 1,
            None => profiles.push((d.profile.name.clone(), 1)),
        }
    }
    let first_index = devices.iter().map(|d| d.index).min().unwrap_or(0);
    let cfg = Arc::new(cfg);
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let cpu_at_start = crate::bench::sys::self_cpu();
    let mut steady = SteadyWindow::default();
    let mut launcher = tokio::spawn(launch(cfg.clone(), shared.clone(), devices, stop_rx));
    let mut progress = Progress::new(cfg.progress);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let deadline = cfg
        .duration
        .map(|d| tokio::time::Instant::from_std(started + d));
    let mut stopped_at: Option<tokio::time::Instant> = None;
    let mut interrupted = false;
    let mut shutdown = std::pin::pin!(shutdown);
    // A stopped run gets the drain plus a margin for the DISCONNECTs; then tasks are aborted.
    let grace = cfg.drain + Duration::from_secs(3);
    let finished_cleanly = loop {
        let hard_stop = stopped_at.map(|t| t + grace);
        tokio::select! {
            _ = &mut launcher => break true,
            _ = ticker.tick() => {
                progress.update(&shared, started.elapsed());
                steady.tick(&cfg, &shared);
            }
            _ = sleep_until_opt(deadline), if stopped_at.is_none() => {
                steady.stop(&cfg, &shared);
                let _ = stop_tx.send(true);
                stopped_at = Some(tokio::time::Instant::now());
            }
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                steady.stop(&cfg, &shared);
                let _ = stop_tx.send(true);
                stopped_at.get_or_insert_with(tokio::time::Instant::now);
            }
            _ = sleep_until_opt(hard_stop) => {
                launcher.abort();
                break false;
            }
        }
    };
    if !finished_cleanly {
        let _ = launcher.await;
    }
    steady.stop(&cfg, &shared);
    let elapsed = started.elapsed();
    progress.finish(&shared, elapsed);
    let mut summary = Summary::new(&cfg, &shared, elapsed, first_index, profiles, interrupted);
    summary.cpu_s = crate::bench::sys::self_cpu()
        .saturating_sub(cpu_at_start)
        .as_secs_f64();
    summary.steady_s = steady.seconds();
    summary.steady_msgs = steady.messages();
    summary.steady_cpu_s = steady.cpu();
    summary.steady_msgs_per_s = summary.steady_msgs as f64 / summary.steady_s.max(1e-9);
    Ok(summary)
}

/// The steady part of a run: from the first second every device is connected to the stop, so
/// that a rate is not diluted by the ramp-up or the drain.
#[derive(Default)]
struct SteadyWindow {
    /// When it started, the messages counted then, and this process's CPU time then.
    start: Option<(Instant, u64, Duration)>,
    end: Option<(Instant, u64, Duration)>,
}

impl SteadyWindow {
    /// Messages counted by the run's rate: acknowledged at QoS 1, sent at QoS 0.
    fn counted(cfg: &RunConfig, shared: &Shared) -> u64 {
        if cfg.qos == QoS::AtMostOnce {
            shared.sent.load(Relaxed)
        } else {
            shared.acked.load(Relaxed)
        }
    }

    fn tick(&mut self, cfg: &RunConfig, shared: &Shared) {
        if self.start.is_none() && shared.connected.load(Relaxed) >= shared.devices {
            self.start = Some((
                Instant::now(),
                Self::counted(cfg, shared),
                crate::bench::sys::self_cpu(),
            ));
        }
    }

    fn stop(&mut self, cfg: &RunConfig, shared: &Shared) {
        if self.start.is_some() && self.end.is_none() {
            self.end = Some((
                Instant::now(),
                Self::counted(cfg, shared),
                crate::bench::sys::self_cpu(),
            ));
        }
    }

    fn seconds(&self) -> f64 {
        match (self.start, self.end) {
            (Some((a, ..)), Some((b, ..))) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn messages(&self) -> u64 {
        match (self.start, self.end) {
            (Some((_, a, _)), Some((_, b, _))) => b.saturating_sub(a),
            _ => 0,
        }
    }

    /// CPU time this process used in the window.
    fn cpu(&self) -> f64 {
        match (self.start, self.end) {
            (Some((.., a)), Some((.., b))) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the devices at the configured rate, then waits for all of them.
async fn launch(
    cfg: Arc<RunConfig>,
    shared: Arc<Shared>,
    devices: Vec<DeviceSpec>,
    mut stop: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    let t0 = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for (k, dev) in devices.into_iter().enumerate() {
        if cfg.connect_rate > 0.0 {
            let at = t0 + Duration::from_secs_f64(k as f64 / cfg.connect_rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let permit = tokio::select! {
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        // Reap finished devices as we go, so a long ramp-up does not hold every result.
        while set.try_join_next().is_some() {}
        set.spawn(device(
            cfg.clone(),
            shared.clone(),
            dev,
            permit,
            stop.clone(),
        ));
    }
    while set.join_next().await.is_some() {}
}

/// A QoS 1 message awaiting its PUBACK.
#[derive(Clone)]
struct Sent {
    at: Instant,
    /// A deliberate misbehaviour, whose answer is counted apart (and which is never resent).
    bad: bool,
    /// The payload, kept to resend the message after a reconnect (the same `Bytes` the PUBLISH
    /// was built with: no copy).
    payload: Bytes,
}

/// Packet ids in flight on one connection: the messages indexed by id, and the free ids.
struct InFlight {
    sent: Vec<Option<Sent>>,
    free: Vec<u16>,
}

impl InFlight {
    fn new(window: usize) -> InFlight {
        InFlight {
            sent: vec![None; window + 1],
            free: (1..=window as u16).rev().collect(),
        }
    }

    /// Takes the regular messages still awaiting their PUBACK, oldest first, with their ids.
    fn take_outstanding(&mut self) -> Vec<(u16, Bytes)> {
        let mut out: Vec<(Instant, u16, Bytes)> = self
            .sent
            .iter_mut()
            .enumerate()
            .filter_map(|(id, slot)| match slot.take() {
                Some(s) if !s.bad => Some((s.at, u16::try_from(id).ok()?, s.payload)),
                _ => None,
            })
            .collect();
        out.sort_by_key(|(at, ..)| *at);
        out.into_iter().map(|(_, id, p)| (id, p)).collect()
    }

    /// Marks `id` (free) as taken; false if it is not free.
    fn claim(&mut self, id: u16) -> bool {
        match self.free.iter().position(|f| *f == id) {
            Some(k) => {
                self.free.swap_remove(k);
                true
            }
            None => false,
        }
    }
}

/// Incoming messages a device holds at most: more are dropped (and counted), so a broker that
/// floods a device never blocks its packet reader nor grows its memory.
const INBOX_CAPACITY: usize = 16;

/// What the packet reader hands to the device: PUBLISH packets and the QoS 1 ids to acknowledge.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    ready: Notify,
}

#[derive(Default)]
struct InboxState {
    messages: VecDeque<Publish>,
    /// Kept for dropped messages too: every QoS 1 delivery is acknowledged.
    acks: Vec<u16>,
}

/// How a device's publishing loop ended.
enum End {
    /// It sent its messages.
    Done,
    /// The run stopped.
    Stopped,
    /// The broker closed the connection (or writing failed).
    Lost(String),
    /// The window stayed full for the ack timeout.
    AckTimeout,
    /// A chaos disconnect is due.
    Chaos,
    /// A reboot command: reconnect after this pause.
    Reboot(Duration),
}

/// What a connection's end means for the device.
enum Outcome {
    /// The device is done (with the error it met, if any).
    Finished(Result<(), String>),
    /// The connection was lost: reconnect after a back-off.
    Lost(String),
    /// The device dropped its connection on purpose: reconnect after a pause.
    Chaos,
    /// The device rebooted: reconnect after this pause.
    Reboot(Duration),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `d × n`, saturating.
fn times(d: Duration, n: u64) -> Duration {
    let nanos = d.as_nanos().saturating_mul(u128::from(n));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// What a device keeps across its connections: its generator and its place in its schedule.
struct DevState {
    sim: DeviceSim,
    samples: Vec<Sample>,
    /// The samples of message `m` are generated but the message is not sent yet.
    pending: bool,
    /// Messages of the device so far (sent or lost).
    m: u64,
    /// Messages still to send at once (a burst).
    burst_left: u64,
    /// Bursts so far.
    bursts: u64,
    next_burst: Option<tokio::time::Instant>,
    misbehaves: bool,
    /// The misbehaviour of this message was sent already (before a reconnect).
    misbehaved_at: Option<u64>,
    /// Connections so far.
    conn: u64,
    /// Sampling interval and whether telemetry is on (twin and commands change them).
    settings: Settings,
    /// Message `base_msg` starts (its first sample is taken) at `base_at`; later ones follow
    /// at the current interval.
    base_at: tokio::time::Instant,
    base_msg: u64,
    /// When the device (re)booted: its uptime.
    booted: tokio::time::Instant,
    reboots: u64,
    last_reboot_ms: Option<i64>,
    /// Highest twin delta version seen (older copies are ignored).
    delta_version: u64,
    /// Health reports so far.
    health_reports: u64,
    /// Hashes of the last command request ids answered (a queued command sent again is
    /// answered once).
    recent_requests: [u64; 4],
    /// QoS 1 messages sent but not acknowledged when their connection ended: resent after the
    /// reconnect, with their packet ids.
    resend: Vec<(u16, Bytes)>,
}

impl DevState {
    fn new(cfg: &RunConfig, spec: &DeviceSpec) -> DevState {
        let profile = spec.profile.clone();
        let phase = profile
            .interval
            .mul_f64(generate::phase(cfg.seed, spec.index));
        let first = tokio::time::Instant::now() + phase;
        let start_ms = now_ms()
            .saturating_add(i64::try_from(phase.as_millis()).unwrap_or(0))
            .saturating_add(cfg.chaos.skew_ms(cfg.seed, spec.index));
        let batch = profile.batch.max(1) as usize;
        let settings = Settings {
            interval: profile.interval,
            enabled: true,
        };
        DevState {
            sim: DeviceSim::new(profile, cfg.seed, spec.index, start_ms),
            samples: vec![Sample::default(); batch],
            pending: false,
            m: 0,
            burst_left: 0,
            bursts: 0,
            next_burst: cfg
                .chaos
                .burst_after(cfg.seed, spec.index, 0)
                .map(|(_, d)| first + d),
            misbehaves: cfg.chaos.misbehaves(cfg.seed, spec.index),
            misbehaved_at: None,
            conn: 0,
            settings,
            base_at: first,
            base_msg: 0,
            booted: tokio::time::Instant::now(),
            reboots: 0,
            last_reboot_ms: None,
            delta_version: 0,
            health_reports: 0,
            recent_requests: [0; 4],
            resend: Vec::new(),
        }
    }

    /// What the device reports and answers about itself.
    fn facts<'a>(&self, cfg: &'a RunConfig, spec: &'a DeviceSpec) -> Facts<'a> {
        Facts {
            seed: cfg.seed,
            index: spec.index,
            profile: &spec.profile.name,
            firmware: &cfg.behaviour.firmware,
            settings: self.settings,
            uptime_s: self.booted.elapsed().as_secs(),
            reboots: self.reboots,
            report_no: self.health_reports,
        }
    }

    /// Applies new settings: a new interval (or telemetry turned on again) restarts the schedule
    /// one interval from now, in the generator's timestamps too.
    fn apply(&mut self, cfg: &RunConfig, index: u64, s: Settings) {
        let resume = s.enabled && !self.settings.enabled;
        if s.interval != self.settings.interval || resume {
            let now = tokio::time::Instant::now();
            let step_ms = i64::try_from(s.interval.as_millis()).unwrap_or(i64::MAX);
            let next_ms = now_ms()
                .saturating_add(step_ms)
                .saturating_add(cfg.chaos.skew_ms(cfg.seed, index));
            self.sim.set_interval(s.interval, next_ms);
            self.base_at = now + s.interval;
            self.base_msg = self.m;
        }
        self.settings = s;
    }

    /// Whether request `rid` was answered already (and remembers it).
    fn seen_request(&mut self, rid: &str) -> bool {
        let h = super::rng::name_key(rid) | 1;
        if self.recent_requests.contains(&h) {
            return true;
        }
        self.recent_requests.rotate_right(1);
        self.recent_requests[0] = h;
        false
    }
}

/// The session a device asks for: a fresh one at its first connect (3.1.1: the broker's), the
/// same one after a reconnect, so messages queued for it and its subscriptions survive.
fn session_request(cfg: &RunConfig, first: bool, index: u64) -> ConnectRequest {
    let source = match cfg.sources.len() {
        0 => None,
        n => cfg.sources.get((index % n as u64) as usize).copied(),
    };
    if cfg.session_expiry == 0 {
        return ConnectRequest {
            source,
            ..ConnectRequest::CLEAN
        };
    }
    if cfg.opts.version.is_v5() {
        ConnectRequest {
            clean_start: first,
            expiry_secs: Some(cfg.session_expiry),
            source,
        }
    } else {
        ConnectRequest {
            clean_start: false,
            expiry_secs: None,
            source,
        }
    }
}

/// Sleeps `d` unless the run stops first (then false).
pub(crate) async fn pause_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn device(
    cfg: Arc<RunConfig>,
    shared: Arc<Shared>,
    spec: DeviceSpec,
    permit: OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
) {
    let mut state: Option<DevState> = None;
    connections(&cfg, &shared, &spec, permit, stop, &mut state).await;
    // Messages the device kept to resend but never could: they count as unacknowledged once.
    if let Some(st) = state {
        shared.unacked.fetch_add(st.resend.len() as u64, Relaxed);
    }
}

/// A device's connections, until it is done, the run stops or it gives up reconnecting.
async fn connections(
    cfg: &Arc<RunConfig>,
    shared: &Arc<Shared>,
    spec: &DeviceSpec,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    state: &mut Option<DevState>,
) {
    let mut permit = Some(permit);
    // Consecutive failed attempts, and every attempt (the key of the back-off draws).
    let mut attempt: u32 = 0;
    let mut tries: u64 = 0;
    loop {
        // Boxed: TLS and WebSocket handshakes are large futures, and a device task should not
        // carry one for its whole life (20,000 of them share one process).
        let connect = Box::pin(Session::connect_session(
            &cfg.opts,
            spec.id.clone(),
            spec.creds.as_ref(),
            8 * 1024,
            session_request(cfg, state.is_none(), spec.index),
        ));
        let session = tokio::select! {
            r = connect => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        drop(permit.take());
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                if let ConnError::Refused { code, .. } = &e {
                    shared.answer("CONNACK", *code);
                }
                let limit = match state {
                    None => cfg.reconnect.connect_retries,
                    Some(_) => {
                        shared.reconnect_failures.fetch_add(1, Relaxed);
                        cfg.reconnect.attempts
                    }
                };
                if attempt >= limit {
                    if state.is_none() {
                        shared.failed_connects.fetch_add(1, Relaxed);
                    }
                    shared.note_error(|| format!("{}: connect: {e}", spec.id));
                    return;
                }
                let pause = cfg.reconnect.backoff(cfg.seed, spec.index, attempt, tries);
                attempt += 1;
                tries += 1;
                if !pause_or_stop(pause, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        attempt = 0;
        let st = match state {
            Some(st) => {
                shared.reconnects.fetch_add(1, Relaxed);
                st
            }
            None => {
                shared.connected.fetch_add(1, Relaxed);
                state.insert(DevState::new(cfg, spec))
            }
        };
        shared.online.fetch_add(1, Relaxed);
        let outcome = publish_loop(cfg, shared, spec, session, st, &mut stop).await;
        shared.online.fetch_sub(1, Relaxed);
        let pause = match outcome {
            Outcome::Finished(Ok(())) => return,
            Outcome::Finished(Err(e)) => {
                shared.note_error(|| format!("{}: {e}", spec.id));
                return;
            }
            Outcome::Lost(e) => {
                shared.note_error(|| format!("{}: {e}", spec.id));
                if cfg.reconnect.attempts == 0 {
                    return;
                }
                let p = cfg.reconnect.backoff(cfg.seed, spec.index, 0, tries);
                tries += 1;
                p
            }
            Outcome::Chaos => cfg
                .chaos
                .pause(&cfg.reconnect, cfg.seed, spec.index, st.conn),
            Outcome::Reboot(pause) => {
                if !pause_or_stop(pause, &mut stop).await {
                    return;
                }
                st.booted = tokio::time::Instant::now();
                st.reboots += 1;
                st.last_reboot_ms = Some(now_ms());
                continue;
            }
        };
        if !pause_or_stop(pause, &mut stop).await {
            return;
        }
    }
}

/// The reason a connection ended: what the broker said in its DISCONNECT, or `what`.
fn lost(server_said: &Mutex<Option<String>>, what: String) -> End {
    End::Lost(server_said.lock().take().unwrap_or(what))
}

/// Takes a window slot and a packet id for a QoS 1 message.
#[allow(clippy::too_many_arguments)]
async fn take_id(
    cfg: &RunConfig,
    window: &Semaphore,
    wr: &mut crate::bench::transport::MqttWrite,
    wbuf: &mut BytesMut,
    inflight: &Mutex<InFlight>,
    stop: &mut watch::Receiver<bool>,
    reader: &mut JoinHandle<()>,
    server_said: &Mutex<Option<String>>,
    bad: bool,
    payload: Bytes,
) -> Result<u16, End> {
    let slot = tokio::select! {
        r = take_window_slot(window, wr, wbuf, cfg.ack_timeout) => r,
        _ = stop.wait_for(|s| *s) => return Err(End::Stopped),
        _ = reader => return Err(lost(server_said, "the broker closed the connection".into())),
    };
    match slot {
        Ok(WindowSlot::Taken) => {}
        Ok(WindowSlot::Closed) => return Err(End::Stopped),
        Ok(WindowSlot::TimedOut) => return Err(End::AckTimeout),
        Err(e) => return Err(lost(server_said, format!("writing: {e}"))),
    }
    let mut f = inflight.lock();
    let Some(id) = f.free.pop() else {
        // Unreachable: a permit is only returned together with its id.
        return Err(End::Lost(
            "internal error: a window slot without a packet id".into(),
        ));
    };
    if let Some(slot) = f.sent.get_mut(usize::from(id)) {
        *slot = Some(Sent {
            at: Instant::now(),
            bad,
            payload,
        });
    }
    Ok(id)
}

/// Far enough ahead to mean "not while this connection lasts" (a device with telemetry off).
const NEVER: Duration = Duration::from_secs(365 * 86_400);

async fn publish_loop(
    cfg: &RunConfig,
    shared: &Arc<Shared>,
    spec: &DeviceSpec,
    session: Session,
    st: &mut DevState,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let version = session.version;
    let session_present = session.session_present;
    let qos1 = cfg.qos != QoS::AtMostOnce;
    // Ids 1..=window are the publications'; the one above is the SUBSCRIBE's.
    let window_size = usize::from(
        cfg.inflight
            .min(session.server_receive_max)
            .clamp(1, u16::MAX - 1),
    );
    let subscribe_id = u16::try_from(window_size + 1).unwrap_or(u16::MAX);
    let (rd, mut wr) = session.stream.into_split();
    let inflight = Arc::new(Mutex::new(InFlight::new(window_size)));
    let window = Arc::new(Semaphore::new(window_size));
    let server_said: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let inbox = Arc::new(Inbox::default());
    let mut reader = AbortOnDrop({
        let (inflight, window, shared, server_said, inbox) = (
            inflight.clone(),
            window.clone(),
            shared.clone(),
            server_said.clone(),
            inbox.clone(),
        );
        let stripe = (spec.index as usize) % STRIPES;
        let id = spec.id.clone();
        spawn_packet_reader(rd, session.rbuf, version, move |p| match p {
            Packet::PubAck(ack) => {
                let sent = {
                    let mut f = inflight.lock();
                    let sent = f
                        .sent
                        .get_mut(usize::from(ack.packet_id))
                        .and_then(Option::take);
                    if sent.is_some() {
                        f.free.push(ack.packet_id);
                    }
                    sent
                };
                let Some(sent) = sent else { return };
                window.add_permits(1);
                if ack.code >= 0x80 {
                    shared.answer("PUBACK", ack.code);
                }
                if sent.bad {
                    return;
                }
                shared.count_puback(&ack, sent.at, stripe, &id);
            }
            Packet::Publish(p) => {
                {
                    let mut s = inbox.state.lock();
                    if p.qos == QoS::AtLeastOnce {
                        s.acks.push(p.packet_id);
                    }
                    if s.messages.len() < INBOX_CAPACITY {
                        s.messages.push_back(p);
                    } else {
                        shared.incoming_dropped.fetch_add(1, Relaxed);
                    }
                }
                inbox.ready.notify_one();
            }
            Packet::SubAck(ack) => {
                for code in ack.codes.iter().filter(|c| **c >= 0x80) {
                    shared.answer("SUBACK", *code);
                }
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
    });

    let profile = spec.profile.clone();
    let batch = u64::from(profile.batch.max(1));
    let chaos = &cfg.chaos;
    let behaviour = &cfg.behaviour;
    let (seed, index) = (cfg.seed, spec.index);
    let mut payload = Vec::with_capacity(256);
    let mut wbuf = BytesMut::with_capacity(1024);
    let ping_every = cfg.opts.ping_every();
    let mut last_write = tokio::time::Instant::now();
    let properties = if version.is_v5() {
        PublishProperties {
            content_type: Some(Arc::from(profile.format.content_type())),
            ..PublishProperties::default()
        }
    } else {
        PublishProperties::default()
    };
    let disconnect_at = chaos
        .disconnect_after(seed, index, st.conn)
        .map(|d| tokio::time::Instant::now() + d);
    let health_every = behaviour.health_every.filter(|_| behaviour.twin);
    let mut health_at = health_every.map(|d| tokio::time::Instant::now() + d);
    st.conn += 1;

    // First the subscriptions (SUBACK is not awaited: the reader counts refusals), the report of
    // firmware and health, and the messages of the previous connection that were not
    // acknowledged.
    let setup: Option<End> = 'setup: {
        let filters = behaviour.filters(&spec.id);
        if !filters.is_empty() {
            let sub = Subscribe {
                packet_id: subscribe_id,
                subscription_identifier: None,
                user_properties: Vec::new(),
                filters: filters
                    .into_iter()
                    .map(|filter| SubscribeFilter {
                        filter,
                        options: SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            ..SubscriptionOptions::default()
                        },
                    })
                    .collect(),
            };
            if let Err(e) = mqtt::encode(&Packet::Subscribe(sub), version, &mut wbuf) {
                break 'setup Some(End::Lost(format!("encoding SUBSCRIBE: {e}")));
            }
        }
        if behaviour.twin {
            let report = behave::connect_report(&st.facts(cfg, spec), st.last_reboot_ms);
            if let Err(e) = twin_update(shared, spec, version, report, &mut wbuf) {
                break 'setup Some(e);
            }
            st.health_reports += 1;
        }
        let pending = std::mem::take(&mut st.resend);
        for (k, (old_id, body)) in pending.iter().enumerate() {
            // A resumed session knows the packet id: the same id with DUP set. Otherwise (or if
            // the id is out of this connection's window) a new publication.
            let same = session_present && {
                let mut f = inflight.lock();
                usize::from(*old_id) <= window_size && f.claim(*old_id)
            };
            let packet_id = if same {
                match window.try_acquire() {
                    Ok(p) => p.forget(),
                    // Unreachable: every claimed id had a permit.
                    Err(_) => {
                        st.resend.extend_from_slice(&pending[k..]);
                        break 'setup Some(End::Lost(
                            "internal error: an in-flight id without a window slot".into(),
                        ));
                    }
                }
                if let Some(slot) = inflight.lock().sent.get_mut(usize::from(*old_id)) {
                    *slot = Some(Sent {
                        at: Instant::now(),
                        bad: false,
                        payload: body.clone(),
                    });
                }
                *old_id
            } else {
                match take_id(
                    cfg,
                    &window,
                    &mut wr,
                    &mut wbuf,
                    &inflight,
                    stop,
                    &mut reader.0,
                    &server_said,
                    false,
                    body.clone(),
                )
                .await
                {
                    Ok(id) => id,
                    Err(end) => {
                        st.resend.extend_from_slice(&pending[k..]);
                        break 'setup Some(end);
                    }
                }
            };
            let publish = Publish {
                dup: same,
                qos: cfg.qos,
                retain: false,
                topic: spec.topic.clone(),
                packet_id,
                properties: properties.clone(),
                payload: body.clone(),
            };
            if let Err(e) = mqtt::encode(&Packet::Publish(publish), version, &mut wbuf) {
                st.resend.extend_from_slice(&pending[k + 1..]);
                break 'setup Some(End::Lost(format!("encoding PUBLISH: {e}")));
            }
            shared.resent.fetch_add(1, Relaxed);
        }
        if !wbuf.is_empty() {
            if let Err(e) = wr.write_all(&wbuf).await {
                break 'setup Some(lost(&server_said, format!("writing: {e}")));
            }
            wbuf.clear();
            last_write = tokio::time::Instant::now();
        }
        None
    };

    let end = match setup {
        Some(end) => end,
        None => 'run: loop {
            if cfg.messages_per_device.is_some_and(|limit| st.m >= limit) {
                break End::Done;
            }
            let now = tokio::time::Instant::now();
            if disconnect_at.is_some_and(|t| now >= t) {
                break End::Chaos;
            }
            if let Some(at) = health_at.filter(|at| now >= *at) {
                let report = behave::health_report(&st.facts(cfg, spec));
                st.health_reports += 1;
                // Late (a long pause or a slow broker): the next one a period from now.
                health_at = health_every.map(|d| if at + d > now { at + d } else { now + d });
                if let Err(e) = twin_update(shared, spec, version, report, &mut wbuf) {
                    break e;
                }
                if let Err(e) = wr.write_all(&wbuf).await {
                    break lost(&server_said, format!("writing: {e}"));
                }
                wbuf.clear();
                last_write = tokio::time::Instant::now();
            }
            if let Some(at) = st.next_burst.filter(|at| now >= *at) {
                st.bursts += 1;
                match chaos.burst_after(seed, index, st.bursts) {
                    Some((n, d)) => {
                        st.burst_left += u64::from(n);
                        st.next_burst = Some(at + d);
                        shared.chaos(Action::Burst);
                    }
                    None => st.next_burst = None,
                }
            }
            // The message is due when its last sample is taken (in a burst: now).
            let due = if !st.settings.enabled {
                now + NEVER
            } else if st.burst_left > 0 {
                now
            } else {
                let ticks = st.m.saturating_sub(st.base_msg) * batch + batch - 1;
                st.base_at + times(st.settings.interval, ticks)
            };
            // A chaos disconnect strikes just after a message was written (the next check is at
            // the top of this loop, right after the write), so that message is in flight and
            // is resent after the reconnect; it wakes only a device whose telemetry is off.
            let disconnect_wake = disconnect_at.filter(|_| !st.settings.enabled);
            let event = [disconnect_wake, st.next_burst, health_at]
                .into_iter()
                .flatten()
                .min();
            loop {
                let now = tokio::time::Instant::now();
                if now >= due {
                    break;
                }
                if event.is_some_and(|e| now >= e) {
                    continue 'run;
                }
                let mut wake = due.min(last_write + ping_every);
                if let Some(e) = event {
                    wake = wake.min(e);
                }
                let mut incoming = false;
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = stop.wait_for(|s| *s) => break 'run End::Stopped,
                    _ = &mut reader.0 => {
                        break 'run lost(&server_said, "the broker closed the connection".into())
                    }
                    _ = inbox.ready.notified() => incoming = true,
                }
                if incoming {
                    match handle_inbox(cfg, shared, spec, st, &inbox, version, &mut wbuf) {
                        Ok(reboot) => {
                            if !wbuf.is_empty() {
                                if let Err(e) = wr.write_all(&wbuf).await {
                                    break 'run lost(&server_said, format!("writing: {e}"));
                                }
                                wbuf.clear();
                                last_write = tokio::time::Instant::now();
                            }
                            if let Some(pause) = reboot {
                                break 'run End::Reboot(pause);
                            }
                        }
                        Err(end) => break 'run end,
                    }
                    // The settings may have changed: compute the schedule again.
                    continue 'run;
                }
                let now = tokio::time::Instant::now();
                if now >= due {
                    break;
                }
                if now < last_write + ping_every {
                    continue;
                }
                // Nothing to send for a while: keep the connection alive.
                if let Err(e) = mqtt::encode(&Packet::PingReq, version, &mut wbuf) {
                    break 'run End::Lost(format!("encoding PINGREQ: {e}"));
                }
                if let Err(e) = wr.write_all(&wbuf).await {
                    break 'run lost(&server_said, format!("writing: {e}"));
                }
                wbuf.clear();
                last_write = tokio::time::Instant::now();
            }
            let m = st.m;
            if !st.pending {
                for s in &mut st.samples {
                    st.sim.next_into(s);
                }
                st.pending = true;
                if chaos.lost(seed, index, m) {
                    shared.chaos(Action::Loss);
                    st.pending = false;
                    st.m += 1;
                    st.burst_left = st.burst_left.saturating_sub(1);
                    continue;
                }
            }
            payload.clear();
            if let Err(e) = encode(profile.format, &profile, &st.samples, &mut payload) {
                break End::Lost(e.to_string());
            }
            if let Some(d) = chaos.latency(seed, index, m) {
                shared.chaos(Action::Latency);
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.wait_for(|s| *s) => break 'run End::Stopped,
                    _ = &mut reader.0 => {
                        break 'run lost(&server_said, "the broker closed the connection".into())
                    }
                }
            }
            let bad = if st.misbehaves && st.misbehaved_at != Some(m) {
                chaos.misbehaviour(seed, index, m)
            } else {
                None
            };
            if let Some(Misbehaviour::Packet(kind)) = bad {
                st.misbehaved_at = Some(m);
                shared.chaos(kind.action());
                wbuf.extend_from_slice(&kind.bytes(version, &spec.id, &spec.topic));
                if let Err(e) = wr.write_all(&wbuf).await {
                    break lost(&server_said, format!("writing: {e}"));
                }
                wbuf.clear();
                // The broker must close the connection; this message goes after the reconnect.
                let closed = tokio::select! {
                    _ = &mut reader.0 => true,
                    _ = tokio::time::sleep(cfg.opts.timeout) => false,
                    _ = stop.wait_for(|s| *s) => break 'run End::Stopped,
                };
                if !closed {
                    shared.answer_named("NO CLOSE");
                    break End::Lost(format!(
                        "the broker kept the connection open {:?} after a malformed packet ({kind:?})",
                        cfg.opts.timeout
                    ));
                }
                if server_said.lock().is_none() {
                    // MQTT 3.1.1 has no DISCONNECT from the server: closing is the answer.
                    shared.answer_named("CLOSE");
                }
                break lost(
                    &server_said,
                    "the broker closed the connection after a malformed packet".into(),
                );
            }
            if let Some(kind) = bad {
                st.misbehaved_at = Some(m);
                let (copies, qos, bad_payload) = match kind {
                    Misbehaviour::Flood => {
                        shared.chaos(Action::Flood);
                        (
                            chaos::FLOOD_COPIES,
                            QoS::AtMostOnce,
                            Bytes::copy_from_slice(&payload),
                        )
                    }
                    Misbehaviour::Malformed => {
                        shared.chaos(Action::Malformed);
                        let ts = st.samples.first().map_or(0, |s| s.ts_ms);
                        (
                            1,
                            cfg.qos,
                            Bytes::from(format!("{{\"ts\":{ts},\"broken\":")),
                        )
                    }
                    Misbehaviour::Oversized => {
                        shared.chaos(Action::Oversized);
                        (1, cfg.qos, Bytes::from(vec![b' '; OVERSIZE_BYTES]))
                    }
                    // Handled above.
                    Misbehaviour::Packet(_) => (0, QoS::AtMostOnce, Bytes::new()),
                };
                for _ in 0..copies {
                    let packet_id = if qos == QoS::AtMostOnce {
                        0
                    } else {
                        match take_id(
                            cfg,
                            &window,
                            &mut wr,
                            &mut wbuf,
                            &inflight,
                            stop,
                            &mut reader.0,
                            &server_said,
                            true,
                            Bytes::new(),
                        )
                        .await
                        {
                            Ok(id) => id,
                            Err(end) => break 'run end,
                        }
                    };
                    let publish = Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: spec.topic.clone(),
                        packet_id,
                        properties: properties.clone(),
                        payload: bad_payload.clone(),
                    };
                    if let Err(e) = mqtt::encode(&Packet::Publish(publish), version, &mut wbuf) {
                        break 'run End::Lost(format!("encoding PUBLISH: {e}"));
                    }
                }
                if let Err(e) = wr.write_all(&wbuf).await {
                    break lost(&server_said, format!("writing: {e}"));
                }
                wbuf.clear();
            }
            let body = Bytes::copy_from_slice(&payload);
            let packet_id = if qos1 {
                match take_id(
                    cfg,
                    &window,
                    &mut wr,
                    &mut wbuf,
                    &inflight,
                    stop,
                    &mut reader.0,
                    &server_said,
                    false,
                    body.clone(),
                )
                .await
                {
                    Ok(id) => id,
                    Err(end) => break 'run end,
                }
            } else {
                0
            };
            let publish = Publish {
                dup: false,
                qos: cfg.qos,
                retain: false,
                topic: spec.topic.clone(),
                packet_id,
                properties: properties.clone(),
                payload: body,
            };
            if let Err(e) = mqtt::encode(&Packet::Publish(publish), version, &mut wbuf) {
                break End::Lost(format!("encoding PUBLISH: {e}"));
            }
            if let Err(e) = wr.write_all(&wbuf).await {
                // Not sent: not awaited either (it is sent again after a reconnect).
                if qos1 {
                    let mut f = inflight.lock();
                    if let Some(slot) = f.sent.get_mut(usize::from(packet_id)) {
                        *slot = None;
                        f.free.push(packet_id);
                    }
                }
                break lost(&server_said, format!("writing: {e}"));
            }
            wbuf.clear();
            last_write = tokio::time::Instant::now();
            shared.sent.fetch_add(1, Relaxed);
            shared.samples.fetch_add(batch, Relaxed);
            st.pending = false;
            st.m += 1;
            st.burst_left = st.burst_left.saturating_sub(1);
        },
    };

    // Messages awaiting PUBACK when a connection ends are kept to be resent after the reconnect
    // (or, when the device is done, counted as unacknowledged).
    let outcome = match end {
        End::Done | End::Stopped => {
            let done = matches!(end, End::Done);
            let mut lost_during_drain = None;
            if qos1 {
                let all = u32::try_from(window_size).unwrap_or(u32::MAX);
                tokio::select! {
                    r = tokio::time::timeout(cfg.drain, window.acquire_many(all)) => {
                        if let Ok(Ok(p)) = r {
                            p.forget();
                        }
                    }
                    _ = &mut reader.0 => {
                        lost_during_drain = Some(
                            server_said.lock().take()
                                .unwrap_or_else(|| "the broker closed the connection".into()),
                        );
                    }
                }
            }
            reader.stop().await;
            let missing = keep_outstanding(&inflight, st);
            if let Some(why) = lost_during_drain {
                shared.lost.fetch_add(1, Relaxed);
                if done && missing > 0 && !*stop.borrow() {
                    // Its last messages were in flight: reconnect to resend them.
                    Outcome::Lost(why)
                } else {
                    Outcome::Finished(Err(why))
                }
            } else {
                // The run is over: the broker may forget the session.
                let properties = DisconnectProperties {
                    session_expiry_interval: (version.is_v5() && cfg.session_expiry > 0)
                        .then_some(0),
                    ..DisconnectProperties::default()
                };
                let _ = mqtt::encode(
                    &Packet::Disconnect(Disconnect {
                        code: 0,
                        properties,
                    }),
                    version,
                    &mut wbuf,
                );
                let _ = wr.write_all(&wbuf).await;
                let _ = wr.shutdown().await;
                if missing > 0 {
                    Outcome::Finished(Err(format!(
                        "{missing} message(s) still unacknowledged {:?} after the run stopped",
                        cfg.drain
                    )))
                } else {
                    Outcome::Finished(Ok(()))
                }
            }
        }
        End::Chaos => {
            // Dropped at once, without DISCONNECT, as a network failure would.
            reader.stop().await;
            keep_outstanding(&inflight, st);
            shared.chaos(Action::Disconnect);
            Outcome::Chaos
        }
        End::Reboot(pause) => {
            reader.stop().await;
            keep_outstanding(&inflight, st);
            // A clean goodbye that keeps the session (its expiry is the CONNECT's).
            let _ = mqtt::encode(
                &Packet::Disconnect(Disconnect::default()),
                version,
                &mut wbuf,
            );
            let _ = wr.write_all(&wbuf).await;
            let _ = wr.shutdown().await;
            shared.reboots.fetch_add(1, Relaxed);
            Outcome::Reboot(pause)
        }
        End::Lost(why) => {
            reader.stop().await;
            shared.lost.fetch_add(1, Relaxed);
            keep_outstanding(&inflight, st);
            Outcome::Lost(why)
        }
        End::AckTimeout => {
            reader.stop().await;
            shared.lost.fetch_add(1, Relaxed);
            keep_outstanding(&inflight, st);
            let _ = wr.shutdown().await;
            Outcome::Lost(format!(
                "no PUBACK for {:?} with {window_size} message(s) in flight",
                cfg.ack_timeout
            ))
        }
    };
    drop(reader);
    outcome
}

/// Moves the messages still awaiting PUBACK into the device's resend list; returns how many.
fn keep_outstanding(inflight: &Mutex<InFlight>, st: &mut DevState) -> u64 {
    let outstanding = inflight.lock().take_outstanding();
    let n = outstanding.len() as u64;
    st.resend.extend(outstanding);
    n
}

/// Encodes a twin update (QoS 0: the device reports its whole state again at each connect, so a
/// lost report is repaired by the next).
fn twin_update(
    shared: &Shared,
    spec: &DeviceSpec,
    version: mqtt::ProtocolVersion,
    body: Vec<u8>,
    wbuf: &mut BytesMut,
) -> Result<(), End> {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Arc::from(behave::update_topic(&spec.id)),
        packet_id: 0,
        properties: PublishProperties::default(),
        payload: Bytes::from(body),
    };
    mqtt::encode(&Packet::Publish(publish), version, wbuf)
        .map_err(|e| End::Lost(format!("encoding a twin update: {e}")))?;
    shared.twin_reports.fetch_add(1, Relaxed);
    Ok(())
}

/// Handles what the packet reader queued: acknowledges QoS 1 deliveries, applies twin deltas and
/// answers commands, encoding everything into `wbuf`. Returns the pause of a reboot command.
fn handle_inbox(
    cfg: &RunConfig,
    shared: &Shared,
    spec: &DeviceSpec,
    st: &mut DevState,
    inbox: &Inbox,
    version: mqtt::ProtocolVersion,
    wbuf: &mut BytesMut,
) -> Result<Option<Duration>, End> {
    let (acks, messages) = {
        let mut s = inbox.state.lock();
        (std::mem::take(&mut s.acks), std::mem::take(&mut s.messages))
    };
    let encode_err = |e: mqtt::EncodeError| End::Lost(format!("encoding an answer: {e}"));
    for packet_id in acks {
        let ack = PubResponse {
            packet_id,
            ..PubResponse::default()
        };
        mqtt::encode(&Packet::PubAck(ack), version, wbuf).map_err(encode_err)?;
    }
    let behaviour = &cfg.behaviour;
    let mut reboot = None;
    for msg in messages {
        if behaviour.twin && *msg.topic == behave::delta_topic(&spec.id) {
            let Some(o) = behave::apply_delta(&msg.payload, st.settings, &mut st.delta_version)
            else {
                continue;
            };
            st.apply(cfg, spec.index, o.settings);
            shared.desired_applied.fetch_add(o.applied, Relaxed);
            shared.desired_rejected.fetch_add(o.rejected, Relaxed);
            if let Some(update) = o.update {
                twin_update(shared, spec, version, update, wbuf)?;
            }
            continue;
        }
        if !behaviour.commands {
            continue;
        }
        let Some((name, rid)) = behave::command_of(&spec.id, &msg.topic) else {
            continue;
        };
        // A queued command sent again (same request id) is answered once.
        if st.seen_request(rid) {
            continue;
        }
        let answer = behave::command(
            name,
            &msg.payload,
            &st.facts(cfg, spec),
            &spec.topic,
            spec.profile.format.name(),
        );
        let status = answer.status.to_string();
        // MQTT 5: the Response Topic with the Correlation Data and the status as a user
        // property; 3.1.1: the request id and the status in the topic.
        let (topic, properties) = match msg.properties.response_topic.clone() {
            Some(t) if version.is_v5() => (
                t,
                PublishProperties {
                    correlation_data: msg.properties.correlation_data.clone(),
                    user_properties: vec![(Arc::from("status"), Arc::from(status.as_str()))],
                    content_type: Some(Arc::from("application/json")),
                    ..PublishProperties::default()
                },
            ),
            _ => (
                Arc::from(format!("$devices/{}/commands/res/{rid}/{status}", spec.id)),
                PublishProperties::default(),
            ),
        };
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: 0,
            properties,
            payload: Bytes::from(answer.payload),
        };
        mqtt::encode(&Packet::Publish(publish), version, wbuf).map_err(encode_err)?;
        shared.commands_answered.fetch_add(1, Relaxed);
        match answer.effect {
            Effect::None => {}
            Effect::Settings(s) => {
                st.apply(cfg, spec.index, s);
                if behaviour.twin {
                    twin_update(shared, spec, version, behave::settings_report(s), wbuf)?;
                }
            }
            Effect::Reboot(pause) => reboot = Some(pause),
        }
    }
    Ok(reboot)
}

/// The broker's address for a host and port.
pub async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}:{port} resolves to no address"),
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        RunConfig {
            opts: ClientOpts {
                addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                version: mqtt::ProtocolVersion::V5,
                username: None,
                password: None,
                keep_alive: 60,
                timeout: Duration::from_secs(1),
                transport: crate::bench::transport::Transport::Tcp,
            },
            broker: String::new(),
            qos: QoS::AtLeastOnce,
            seed: 0,
            connect_rate: 0.0,
            connect_concurrency: 1,
            duration: None,
            messages_per_device: None,
            inflight: 16,
            ack_timeout: Duration::from_secs(1),
            drain: Duration::from_secs(1),
            progress: ProgressMode::Off,
            reconnect: Reconnect::default(),
            chaos: Chaos::default(),
            behaviour: Behaviour::default(),
            session_expiry: 300,
            sources: Vec::new(),
        }
    }

    /// 20,000 devices must fit in one process: what each holds while idle stays small.
    #[tokio::test]
    async fn a_device_stays_small() {
        let cfg = Arc::new(config());
        let profile = super::super::profile::load("environment", &Default::default()).unwrap();
        let spec = DeviceSpec {
            index: 0,
            id: "sim-0".into(),
            creds: None,
            profile: Arc::new(profile),
            topic: Arc::from("devices/sim-0/telemetry"),
        };
        let st = DevState::new(&cfg, &spec);
        assert!(
            std::mem::size_of_val(&st) <= 512,
            "{}",
            std::mem::size_of_val(&st)
        );
        let (_stop_tx, stop) = watch::channel(false);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let latency = vec![Mutex::new(Latency::new(2).unwrap())];
        let shared = Arc::new(Shared::new(1, latency));
        let task = device(cfg, shared, spec, permit, stop);
        // The task's own state (sockets and buffers come on top: 8 KiB read, 1 KiB write).
        assert!(
            std::mem::size_of_val(&task) <= 4096,
            "{}",
            std::mem::size_of_val(&task)
        );
    }

    #[test]
    fn sessions_asked_for() {
        let mut cfg = config();
        let first = session_request(&cfg, true, 0);
        assert_eq!((first.clean_start, first.expiry_secs), (true, Some(300)));
        assert!(!session_request(&cfg, false, 0).clean_start);
        cfg.opts.version = mqtt::ProtocolVersion::V311;
        assert!(!session_request(&cfg, true, 0).clean_start);
        cfg.session_expiry = 0;
        assert_eq!(session_request(&cfg, false, 0), ConnectRequest::CLEAN);
        // Source addresses go round by device index.
        cfg.sources = vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()];
        for (index, last) in [(0, 2), (1, 3), (2, 2), (7, 3)] {
            assert_eq!(
                session_request(&cfg, true, index).source,
                Some([127, 0, 0, last].into())
            );
        }
    }

    #[test]
    fn outstanding_messages_are_taken_oldest_first_and_ids_claimed() {
        let mut f = InFlight::new(4);
        let t0 = Instant::now();
        for (id, ms, bad) in [(3u16, 2u64, false), (1, 1, false), (2, 0, true)] {
            assert!(f.claim(id));
            f.sent[usize::from(id)] = Some(Sent {
                at: t0 + Duration::from_millis(ms),
                bad,
                payload: Bytes::from(vec![id as u8]),
            });
        }
        assert!(!f.claim(3));
        let out = f.take_outstanding();
        // Deliberate misbehaviour is never resent.
        assert_eq!(
            out,
            vec![(1, Bytes::from_static(&[1])), (3, Bytes::from_static(&[3]))]
        );
        assert!(f.sent.iter().all(Option::is_none));
    }
}
