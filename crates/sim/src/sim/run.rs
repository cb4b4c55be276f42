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

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{self, Disconnect, Packet, Publish, PublishProperties};
use ferrohub_types::QoS;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::chaos::{self, Action, Chaos, Misbehaviour, Reconnect};
use super::encode::encode;
use super::generate::{self, DeviceSim, Sample};
use super::profile::Profile;
use super::report::{Progress, Summary};
use crate::bench::stats::Latency;
use crate::bench::wire::{
    ClientOpts, ConnError, Creds, Session, WindowSlot, spawn_packet_reader, take_window_slot,
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
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// How devices reconnect.
    pub reconnect: Reconnect,
    /// Chaos (all off by default).
    pub chaos: Chaos,
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
    pub chaos: [AtomicU64; Action::ALL.len()],
    pub answers: Mutex<BTreeMap<String, u64>>,
    pub first_error: Mutex<Option<String>>,
    pub latency: Vec<Mutex<Latency>>,
}

impl Shared {
    /// Zeroed counters for `devices` devices (`sim replay` counts with them too).
    pub(crate) fn new(devices: u64) -> Result<Shared, RunError> {
        let latency = (0..STRIPES)
            .map(|_| Latency::new(2).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RunError::Histogram(e.to_string()))?;
        Ok(Shared {
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
            chaos: Default::default(),
            answers: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
            latency,
        })
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
    let shared = Arc::new(Shared::new(devices.len() as u64)?);
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
            _ = ticker.tick() => progress.update(&shared, started.elapsed()),
            _ = sleep_until_opt(deadline), if stopped_at.is_none() => {
                let _ = stop_tx.send(true);
                stopped_at = Some(tokio::time::Instant::now());
            }
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
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
    let elapsed = started.elapsed();
    progress.finish(&shared, elapsed);
    Ok(Summary::new(
        &cfg,
        &shared,
        elapsed,
        first_index,
        profiles,
        interrupted,
    ))
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

/// Packet ids in flight on one connection: send times indexed by id, and the free ids.
/// Packet ids in flight on one connection: send times indexed by id (and whether the message was
/// a deliberate misbehaviour, whose answer is counted apart), and the free ids.
struct InFlight {
    sent: Vec<Option<(Instant, bool)>>,
    free: Vec<u16>,
}

impl InFlight {
    fn new(window: usize) -> InFlight {
        InFlight {
            sent: vec![None; window + 1],
            free: (1..=window as u16).rev().collect(),
        }
    }

    /// Regular messages awaiting their PUBACK.
    fn outstanding(&self) -> u64 {
        self.sent
            .iter()
            .filter(|s| matches!(s, Some((_, false))))
            .count() as u64
    }
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
}

/// What a connection's end means for the device.
enum Outcome {
    /// The device is done (with the error it met, if any).
    Finished(Result<(), String>),
    /// The connection was lost: reconnect after a back-off.
    Lost(String),
    /// The device dropped its connection on purpose: reconnect after a pause.
    Chaos,
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
    /// Time of the first sample.
    first: tokio::time::Instant,
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
        DevState {
            sim: DeviceSim::new(profile, cfg.seed, spec.index, start_ms),
            samples: vec![Sample::default(); batch],
            pending: false,
            first,
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
        }
    }
}

/// Sleeps `d` unless the run stops first (then false).
async fn pause_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
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
    mut stop: watch::Receiver<bool>,
) {
    let mut permit = Some(permit);
    let mut state: Option<DevState> = None;
    // Consecutive failed attempts, and every attempt (the key of the back-off draws).
    let mut attempt: u32 = 0;
    let mut tries: u64 = 0;
    loop {
        let connect =
            Session::connect_as(&cfg.opts, spec.id.clone(), spec.creds.as_ref(), 8 * 1024);
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
        let st = match &mut state {
            Some(st) => {
                shared.reconnects.fetch_add(1, Relaxed);
                st
            }
            None => {
                shared.connected.fetch_add(1, Relaxed);
                state.insert(DevState::new(&cfg, &spec))
            }
        };
        shared.online.fetch_add(1, Relaxed);
        let outcome = publish_loop(&cfg, &shared, &spec, session, st, &mut stop).await;
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
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    wbuf: &mut BytesMut,
    inflight: &Mutex<InFlight>,
    stop: &mut watch::Receiver<bool>,
    reader: &mut JoinHandle<()>,
    server_said: &Mutex<Option<String>>,
    bad: bool,
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
        *slot = Some((Instant::now(), bad));
    }
    Ok(id)
}

async fn publish_loop(
    cfg: &RunConfig,
    shared: &Arc<Shared>,
    spec: &DeviceSpec,
    session: Session,
    st: &mut DevState,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let version = session.version;
    let qos1 = cfg.qos != QoS::AtMostOnce;
    let window_size = usize::from(cfg.inflight.min(session.server_receive_max).max(1));
    let (rd, mut wr) = session.stream.into_split();
    let inflight = Arc::new(Mutex::new(InFlight::new(window_size)));
    let window = Arc::new(Semaphore::new(window_size));
    let server_said: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut reader = AbortOnDrop({
        let (inflight, window, shared, server_said) = (
            inflight.clone(),
            window.clone(),
            shared.clone(),
            server_said.clone(),
        );
        let stripe = (spec.index as usize) % STRIPES;
        let id = spec.id.clone();
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
                let Some((at, bad)) = at else { return };
                window.add_permits(1);
                if ack.code >= 0x80 {
                    shared.answer("PUBACK", ack.code);
                }
                if bad {
                    return;
                }
                if ack.code < 0x80 {
                    shared.acked.fetch_add(1, Relaxed);
                    if let Some(l) = shared.latency.get(stripe) {
                        l.lock().record_ns(at.elapsed().as_nanos() as u64);
                    }
                } else {
                    shared.refused.fetch_add(1, Relaxed);
                    shared.note_error(|| {
                        format!(
                            "{id}: PUBACK {:#04x} ({}){}",
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
    let interval = profile.interval;
    let batch = u64::from(profile.batch.max(1));
    let chaos = &cfg.chaos;
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
    st.conn += 1;
    let end = 'run: loop {
        if cfg.messages_per_device.is_some_and(|limit| st.m >= limit) {
            break End::Done;
        }
        let now = tokio::time::Instant::now();
        if disconnect_at.is_some_and(|t| now >= t) {
            break End::Chaos;
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
        let due = if st.burst_left > 0 {
            now
        } else {
            st.first + times(interval, st.m * batch + batch - 1)
        };
        let event = [disconnect_at, st.next_burst].into_iter().flatten().min();
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
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break 'run End::Stopped,
                _ = &mut reader.0 => {
                    break 'run lost(&server_said, "the broker closed the connection".into())
                }
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
            payload: Bytes::copy_from_slice(&payload),
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
    };

    let outcome = match end {
        End::Done | End::Stopped | End::Chaos => {
            let chaos_end = matches!(end, End::Chaos);
            let mut lost_during_drain = None;
            if qos1 {
                let all = u32::try_from(window_size).unwrap_or(u32::MAX);
                let wait = if chaos_end {
                    cfg.ack_timeout
                } else {
                    cfg.drain
                };
                tokio::select! {
                    r = tokio::time::timeout(wait, window.acquire_many(all)) => {
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
            let missing = inflight.lock().outstanding();
            shared.unacked.fetch_add(missing, Relaxed);
            if let Some(why) = lost_during_drain {
                shared.lost.fetch_add(1, Relaxed);
                if chaos_end {
                    Outcome::Lost(why)
                } else {
                    Outcome::Finished(Err(why))
                }
            } else if chaos_end {
                // Dropped without a DISCONNECT, as a network failure would.
                shared.chaos(Action::Disconnect);
                Outcome::Chaos
            } else {
                let _ = mqtt::encode(
                    &Packet::Disconnect(Disconnect::default()),
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
        End::Lost(why) => {
            reader.stop().await;
            shared.lost.fetch_add(1, Relaxed);
            shared
                .unacked
                .fetch_add(inflight.lock().outstanding(), Relaxed);
            Outcome::Lost(why)
        }
        End::AckTimeout => {
            reader.stop().await;
            shared.lost.fetch_add(1, Relaxed);
            shared
                .unacked
                .fetch_add(inflight.lock().outstanding(), Relaxed);
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
