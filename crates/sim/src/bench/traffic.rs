//! The message-flow scenarios (fan-in, fan-out, pairs): connection setup, paced publishers,
//! counting subscribers, the measurement window, drain and the per-run report.
//!
//! Every connection is one tokio task owning its socket and its read/write buffers. Publishers
//! wake on a pacing tick and append, in one go, every message that is due (a pre-encoded PUBLISH
//! copied into the write buffer with its stamp patched in); the task then writes the whole batch.
//! Subscribers decode whatever one read returned, answer PUBACK for QoS 1 deliveries in one write,
//! and record latencies into their own histogram, merged when the run ends.
//!
//! The measurement window is defined on the send timestamps carried by the payloads: a message
//! belongs to the window if it was sent in `[window_start, window_end)`, whenever it is delivered
//! (deliveries that arrive during the drain still count). Publishing stops at `window_end`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ferrohub_proto::mqtt::{self, Disconnect, Packet, PubResponse};
use ferrohub_types::QoS;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::payload::Stamp;
use super::stats::Latency;
use super::sys;
use super::wire::{
    ClientOpts, ConnError, Creds, IdPool, MAX_INBOUND_PACKET, PublishTemplate, Session,
};

/// One publisher of a run.
#[derive(Debug, Clone)]
pub struct PubSpec {
    /// Client identifier.
    pub client_id: String,
    /// Topic it publishes to.
    pub topic: String,
    /// Its own credentials (else the run's).
    pub creds: Option<Creds>,
}

/// One subscriber of a run.
#[derive(Debug, Clone)]
pub struct SubSpec {
    /// Client identifier.
    pub client_id: String,
    /// Filter it subscribes to.
    pub filter: String,
    /// First publisher index whose messages it receives.
    pub pub_base: u32,
    /// How many consecutive publishers it receives from (for ordering checks).
    pub pub_count: u32,
    /// Its own credentials (else the run's).
    pub creds: Option<Creds>,
}

/// Who publishes and who subscribes.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Publishers, indexed by position.
    pub publishers: Vec<PubSpec>,
    /// Subscribers.
    pub subscribers: Vec<SubSpec>,
    /// Deliveries each published message should cause.
    pub fanout: u64,
}

/// How to drive one run.
#[derive(Debug, Clone)]
pub struct RunParams {
    /// Connection settings.
    pub opts: Arc<ClientOpts>,
    /// QoS of publications and subscriptions.
    pub qos: QoS,
    /// Payload size in bytes.
    pub payload: usize,
    /// Offered publish rate, messages/s over all publishers; 0 = as fast as possible.
    pub rate: u64,
    /// Warm-up before the measurement window.
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
    /// Longest wait for in-flight deliveries after publishing stops.
    pub drain: Duration,
    /// QoS 1 in-flight window per publisher.
    pub inflight: u16,
    /// Pacing tick; `None` picks one from the per-publisher rate.
    pub tick: Option<Duration>,
    /// Largest number of messages that publishers sharing a tick phase send together.
    pub burst: usize,
    /// Connection handshakes in flight at once during setup.
    pub connect_concurrency: usize,
    /// Broker process to sample.
    pub broker_pid: Option<u32>,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// Scenario name for progress lines.
    pub name: &'static str,
}

/// The measured figures of one run (the JSON line adds labels around them).
#[derive(Debug, Clone, Serialize)]
pub struct TrafficStats {
    /// Publisher connections.
    pub publishers: usize,
    /// Subscriber connections.
    pub subscribers: usize,
    /// Messages published inside the window.
    pub sent: u64,
    /// Messages published in total (warm-up included).
    pub sent_total: u64,
    /// `sent` / window seconds.
    pub send_rate: f64,
    /// PUBACKs received by publishers (QoS 1), whole run.
    pub acked: u64,
    /// Deliveries of in-window messages.
    pub received: u64,
    /// Deliveries in total (warm-up included).
    pub received_total: u64,
    /// Deliveries the in-window messages should cause.
    pub expected: u64,
    /// `1 - received/expected`, floored at 0.
    pub loss: f64,
    /// In-window deliveries per second of window.
    pub throughput: f64,
    /// Median end-to-end latency (ms).
    pub latency_p50_ms: f64,
    /// 90th percentile (ms).
    pub latency_p90_ms: f64,
    /// 99th percentile (ms).
    pub latency_p99_ms: f64,
    /// 99.9th percentile (ms).
    pub latency_p999_ms: f64,
    /// Largest latency (ms).
    pub latency_max_ms: f64,
    /// Mean latency (ms).
    pub latency_mean_ms: f64,
    /// Deliveries whose sequence number was not newer than the last one seen from the same
    /// publisher (duplicates or reordering).
    pub reordered: u64,
    /// Deliveries that did not carry one of our stamps or came from an unexpected publisher.
    pub foreign: u64,
    /// PUBACKs for packet identifiers that were not in flight.
    pub unexpected_acks: u64,
    /// Connections that failed during the run.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// Seconds spent connecting and subscribing.
    pub setup_s: f64,
    /// Seconds waited after publishing stopped.
    pub drain_s: f64,
    /// Harness CPU (user + sys) during the window, seconds.
    pub harness_cpu_s: f64,
    /// Harness CPU during the window, percent of one core.
    pub harness_cpu_pct: f64,
    /// Broker CPU during the window, percent of one core.
    pub broker_cpu_pct: Option<f64>,
    /// Broker RSS at the end of the window, bytes.
    pub broker_rss_bytes: Option<u64>,
}

/// Clock and counters shared by every task of a run.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    start: Instant,
    window_end: Instant,
    window_start_ns: u64,
    window_end_ns: u64,
    sent_in_window: AtomicU64,
    delivered_in_window: AtomicU64,
    publishers_done: AtomicUsize,
}

impl Shared {
    #[inline]
    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    #[inline]
    fn in_window(&self, sent_ns: u64) -> bool {
        sent_ns >= self.window_start_ns && sent_ns < self.window_end_ns
    }
}

/// Runs one measurement: connect, warm up, measure, drain, tear down.
pub async fn run(topo: &Topology, p: &RunParams) -> anyhow::Result<TrafficStats> {
    let setup_started = Instant::now();
    let n_pub = topo.publishers.len();
    let n_sub = topo.subscribers.len();
    // Few busy connections get big buffers; many light ones small buffers.
    let sub_buf = if n_sub <= 16 { 256 * 1024 } else { 16 * 1024 };
    let pub_buf = if n_pub <= 16 { 256 * 1024 } else { 16 * 1024 };
    let subs = connect_all(
        &p.opts,
        topo.subscribers
            .iter()
            .map(|s| (s.client_id.clone(), Some(s.filter.clone()), s.creds.clone()))
            .collect(),
        p.qos,
        p.connect_concurrency,
        sub_buf,
    )
    .await
    .map_err(|e| anyhow::anyhow!("setting up subscribers: {e}"))?;
    let pubs = connect_all(
        &p.opts,
        topo.publishers
            .iter()
            .map(|s| (s.client_id.clone(), None, s.creds.clone()))
            .collect(),
        p.qos,
        p.connect_concurrency,
        4096,
    )
    .await
    .map_err(|e| anyhow::anyhow!("setting up publishers: {e}"))?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    let epoch = Instant::now();
    let start = epoch + Duration::from_millis(50);
    let window_start = start + p.warmup;
    let window_end = window_start + p.duration;
    let sh = Arc::new(Shared {
        epoch,
        start,
        window_end,
        window_start_ns: dur_ns(window_start - epoch),
        window_end_ns: dur_ns(window_end - epoch),
        sent_in_window: AtomicU64::new(0),
        delivered_in_window: AtomicU64::new(0),
        publishers_done: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let ping_every = p.opts.ping_every();

    let sigfig = if n_sub <= 100 { 3 } else { 2 };
    let mut sub_tasks = JoinSet::new();
    for (s, spec) in subs.into_iter().zip(topo.subscribers.iter()) {
        let task = SubTask {
            pub_base: spec.pub_base,
            pub_count: spec.pub_count,
            hist: Latency::new(sigfig)?,
            ping_every,
        };
        sub_tasks.spawn(subscriber(s, task, sh.clone(), stop_rx.clone()));
    }

    let per_pub_rate = if p.rate == 0 {
        0.0
    } else {
        p.rate as f64 / n_pub.max(1) as f64
    };
    let tick = p.tick.unwrap_or_else(|| auto_tick(per_pub_rate));
    let groups = tick_groups(n_pub, per_pub_rate, tick, p.burst);
    let qos1 = p.qos != QoS::AtMostOnce;
    let mut pub_tasks = JoinSet::new();
    for (i, (s, spec)) in pubs.into_iter().zip(topo.publishers.iter()).enumerate() {
        let template = PublishTemplate::new(&spec.topic, p.qos, p.payload, p.opts.version)?;
        let window = usize::from(p.inflight.min(s.server_receive_max).max(1));
        let task = PubTask {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            offset: i as f64 / n_pub.max(1) as f64,
            high_water: pub_buf.max(template.len() * 4),
            template,
            rate: per_pub_rate,
            tick,
            // Stagger the ticks so that many publishers do not burst in lockstep.
            phase: tick.mul_f64((i % groups) as f64 / groups as f64),
            qos1,
            window,
            ping_every,
        };
        pub_tasks.spawn(publisher(s, task, sh.clone(), stop_rx.clone()));
    }

    // Measurement window: sample CPU at both ends.
    tokio::time::sleep_until(window_start).await;
    let cpu0 = sys::self_cpu();
    let broker0 = p.broker_pid.and_then(sys::sample_process);
    let mut next_progress = window_start + Duration::from_secs(1);
    while next_progress < window_end {
        tokio::time::sleep_until(next_progress).await;
        if p.progress {
            eprintln!(
                "[{}] {:>5.1}s sent={} delivered={}",
                p.name,
                (next_progress - window_start).as_secs_f64(),
                sh.sent_in_window.load(Ordering::Relaxed),
                sh.delivered_in_window.load(Ordering::Relaxed),
            );
        }
        next_progress += Duration::from_secs(1);
    }
    tokio::time::sleep_until(window_end).await;
    let cpu1 = sys::self_cpu();
    let broker1 = p.broker_pid.and_then(sys::sample_process);

    // Publishers notice the window end on their own; wait for all of them to have counted.
    let done_deadline = window_end + Duration::from_secs(5);
    while sh.publishers_done.load(Ordering::Acquire) < n_pub && Instant::now() < done_deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sent = sh.sent_in_window.load(Ordering::Acquire);
    let expected = sent.saturating_mul(topo.fanout);
    let drain_started = Instant::now();
    while sh.delivered_in_window.load(Ordering::Acquire) < expected
        && drain_started.elapsed() < p.drain
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);

    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let mut note = |e: Option<String>| {
        if let Some(e) = e {
            errors += 1;
            first_error.get_or_insert(e);
        }
    };
    let mut hist = Latency::new(sigfig)?;
    let (mut received, mut received_total, mut reordered, mut foreign) = (0, 0, 0, 0);
    for r in join_all(sub_tasks).await {
        match r {
            Ok(s) => {
                hist.merge(&s.hist);
                received += s.received_in_window;
                received_total += s.received_total;
                reordered += s.reordered;
                foreign += s.foreign;
                note(s.error);
            }
            Err(e) => note(Some(e)),
        }
    }
    let (mut sent_total, mut acked, mut unexpected_acks) = (0, 0, 0);
    for r in join_all(pub_tasks).await {
        match r {
            Ok(s) => {
                sent_total += s.sent_total;
                acked += s.acked;
                unexpected_acks += s.unexpected_acks;
                note(s.error);
            }
            Err(e) => note(Some(e)),
        }
    }

    let secs = p.duration.as_secs_f64();
    let harness_cpu = cpu1.saturating_sub(cpu0).as_secs_f64();
    let (broker_cpu_pct, broker_rss_bytes) = match (broker0, broker1) {
        (Some(a), Some(b)) => (
            Some(b.cpu.saturating_sub(a.cpu).as_secs_f64() / secs * 100.0),
            Some(b.rss_bytes),
        ),
        _ => (None, None),
    };
    Ok(TrafficStats {
        publishers: n_pub,
        subscribers: n_sub,
        sent,
        sent_total,
        send_rate: sent as f64 / secs,
        acked,
        received,
        received_total,
        expected,
        loss: loss_ratio(received, expected),
        throughput: received as f64 / secs,
        latency_p50_ms: hist.quantile_ms(0.5),
        latency_p90_ms: hist.quantile_ms(0.9),
        latency_p99_ms: hist.quantile_ms(0.99),
        latency_p999_ms: hist.quantile_ms(0.999),
        latency_max_ms: hist.max_ms(),
        latency_mean_ms: hist.mean_ms(),
        reordered,
        foreign,
        unexpected_acks,
        errors,
        first_error,
        setup_s,
        drain_s,
        harness_cpu_s: harness_cpu,
        harness_cpu_pct: harness_cpu / secs * 100.0,
        broker_cpu_pct,
        broker_rss_bytes,
    })
}

/// `1 - received/expected`, never negative (duplicates can over-deliver); 0 when nothing was
/// expected.
pub fn loss_ratio(received: u64, expected: u64) -> f64 {
    if expected == 0 {
        return 0.0;
    }
    (1.0 - received as f64 / expected as f64).max(0.0)
}

/// A pacing tick for one publisher's rate. Fast publishers send batches of about 32 messages per
/// tick (1 to 5 ms) to keep wake-ups and writes few; slow ones about one message per tick
/// (up to 50 ms), so that a thousand light publishers do not wake for nothing. Payloads are stamped
/// when their batch is written, so the tick never inflates measured latency.
pub fn auto_tick(per_pub_rate: f64) -> Duration {
    if per_pub_rate <= 0.0 {
        return Duration::from_millis(1);
    }
    let batched = (32.0 / per_pub_rate).min(0.005);
    let single = 1.0 / per_pub_rate;
    Duration::from_secs_f64(batched.max(single).clamp(0.001, 0.050))
}

/// Into how many phase groups the publishers' ticks are spread. Publishers of one group wake
/// together (one thread wake-up serves them all, and the broker sees one burst that it reads and
/// forwards in large chunks, which keeps the harness cheap); groups are added until a group's
/// burst is at most `burst` messages, but never more than one group per millisecond of tick
/// (the timer's resolution).
pub fn tick_groups(n_pub: usize, per_pub_rate: f64, tick: Duration, burst: usize) -> usize {
    if per_pub_rate <= 0.0 || n_pub == 0 {
        return n_pub.max(1);
    }
    let per_tick = per_pub_rate * tick.as_secs_f64() * n_pub as f64;
    let wanted = (per_tick / burst.max(1) as f64).ceil() as usize;
    let slots = (tick.as_secs_f64() * 1000.0).floor().max(1.0) as usize;
    wanted.clamp(1, slots.min(n_pub))
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<Result<T, String>> {
    let mut out = Vec::with_capacity(set.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(r)) => out.push(r.map_err(|e| format!("task failed: {e}"))),
            Ok(None) => break,
            Err(_) => {
                let n = set.len();
                set.abort_all();
                out.extend((0..n).map(|_| Err("task did not stop in time".to_string())));
                break;
            }
        }
    }
    out
}

/// Opens connections `(client id, optional filter to subscribe, own credentials)` with at most
/// `concurrency` handshakes in flight; returns the sessions in input order, or the first failure.
pub async fn connect_all(
    opts: &Arc<ClientOpts>,
    specs: Vec<(String, Option<String>, Option<Creds>)>,
    qos: QoS,
    concurrency: usize,
    buf_capacity: usize,
) -> Result<Vec<Session>, ConnError> {
    let n = specs.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, (id, filter, creds)) in specs.into_iter().enumerate() {
        let opts = opts.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut s = Session::connect_as(&opts, id, creds.as_ref(), buf_capacity).await?;
            if let Some(f) = filter {
                s.subscribe(&[f], qos, opts.timeout).await?;
            }
            Ok::<_, ConnError>((i, s))
        });
    }
    let mut out: Vec<Option<Session>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((i, s))) => out[i] = Some(s),
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            Err(e) => {
                set.abort_all();
                return Err(ConnError::Protocol(format!("connect task failed: {e}")));
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

struct PubTask {
    index: u32,
    /// Fraction of a message (0..1) this publisher's schedule is advanced by, so that slow
    /// publishers reach their next message at different times instead of all at once.
    offset: f64,
    template: PublishTemplate,
    rate: f64,
    tick: Duration,
    phase: Duration,
    qos1: bool,
    window: usize,
    high_water: usize,
    ping_every: Duration,
}

#[derive(Debug, Default)]
struct PubStats {
    sent_total: u64,
    acked: u64,
    unexpected_acks: u64,
    error: Option<String>,
}

/// Most messages appended per loop iteration (bounds the time between socket polls).
const MAX_BATCH: u64 = 4096;

async fn publisher(
    s: Session,
    t: PubTask,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> PubStats {
    let mut st = PubStats::default();
    let Session {
        stream,
        mut rbuf,
        mut wbuf,
        version,
        ..
    } = s;
    let (mut rd, mut wr) = stream.into_split();
    let mut ids = IdPool::default();
    let mut tick = tokio::time::interval_at(sh.start + t.phase, t.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ping = tokio::time::interval_at(Instant::now() + t.ping_every, t.ping_every);
    let window_end = tokio::time::sleep_until(sh.window_end);
    tokio::pin!(window_end);
    let mut generated: u64 = 0;
    let mut seq: u32 = 0;
    let mut done = false;
    let msg_len = t.template.len().max(1);
    tokio::select! {
        _ = stop.changed() => {}
        _ = tokio::time::sleep_until(sh.start) => {}
    }
    loop {
        // Take whatever the broker sent (PUBACKs) without waiting for it: a paced publisher
        // waits on its socket only once half its window is in use, so a stream of PUBACKs costs
        // one read per tick instead of one task wake-up each.
        loop {
            match rd.try_read_buf(&mut rbuf) {
                Ok(0) => {
                    st.error = Some("publisher: the broker closed the connection".into());
                    break;
                }
                Ok(_) => {
                    if let Err(e) = publisher_input(&mut rbuf, version, &mut ids, &mut st) {
                        st.error = Some(format!("publisher: {e}"));
                        break;
                    }
                    rbuf.reserve(4096);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    st.error = Some(format!("publisher: reading: {e}"));
                    break;
                }
            }
        }
        if st.error.is_some() {
            break;
        }
        if !done {
            let now = Instant::now();
            if now >= sh.window_end {
                done = true;
                sh.publishers_done.fetch_add(1, Ordering::AcqRel);
            } else if now >= sh.start {
                let due = if t.rate > 0.0 {
                    let target = ((now - sh.start).as_secs_f64() * t.rate + t.offset) as u64;
                    target.saturating_sub(generated)
                } else {
                    u64::MAX
                };
                let room = (t.high_water.saturating_sub(wbuf.len()) / msg_len) as u64;
                let window_room = if t.qos1 {
                    t.window.saturating_sub(ids.in_use()) as u64
                } else {
                    u64::MAX
                };
                let n = due.min(room).min(window_room).min(MAX_BATCH);
                if n > 0 {
                    let sent_ns = sh.ns(now);
                    wbuf.reserve(msg_len * n as usize);
                    for _ in 0..n {
                        let pid = if t.qos1 { ids.alloc().unwrap_or(0) } else { 0 };
                        let stamp = Stamp {
                            sent_ns,
                            publisher: t.index,
                            seq,
                        };
                        t.template.append(&mut wbuf, pid, &stamp);
                        seq = seq.wrapping_add(1);
                    }
                    generated += n;
                    if sh.in_window(sent_ns) {
                        sh.sent_in_window.fetch_add(n, Ordering::AcqRel);
                    }
                }
            }
        }
        // Wait on the socket only when half the window is in use, when unpaced, or once done (to
        // notice a close); otherwise the next tick drains it.
        let must_read = done || t.rate <= 0.0 || (t.qos1 && ids.in_use() * 2 >= t.window);
        // Writes go first: the batch must not wait behind PUBACKs.
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = wr.write(&wbuf), if !wbuf.is_empty() => {
                match r {
                    Ok(n) => wbuf.advance(n),
                    Err(e) => {
                        st.error = Some(format!("publisher: writing: {e}"));
                        break;
                    }
                }
            }
            r = rd.read_buf(&mut rbuf), if must_read => {
                match r {
                    Ok(0) => {
                        st.error = Some("publisher: the broker closed the connection".into());
                        break;
                    }
                    Ok(_) => {
                        if let Err(e) = publisher_input(&mut rbuf, version, &mut ids, &mut st) {
                            st.error = Some(format!("publisher: {e}"));
                            break;
                        }
                        rbuf.reserve(4096);
                    }
                    Err(e) => {
                        st.error = Some(format!("publisher: reading: {e}"));
                        break;
                    }
                }
            }
            _ = tick.tick(), if t.rate > 0.0 && !done => {}
            _ = &mut window_end, if !done => {}
            _ = ping.tick() => {
                let _ = mqtt::encode(&Packet::PingReq, version, &mut wbuf);
            }
        }
    }
    if !done {
        sh.publishers_done.fetch_add(1, Ordering::AcqRel);
    }
    st.sent_total = generated;
    if st.error.is_none() {
        goodbye(&mut wr, &mut wbuf, version).await;
    }
    st
}

/// Handles what a publisher reads: PUBACKs (releasing window slots), PINGRESP, DISCONNECT.
fn publisher_input(
    rbuf: &mut BytesMut,
    version: mqtt::ProtocolVersion,
    ids: &mut IdPool,
    st: &mut PubStats,
) -> Result<(), ConnError> {
    while let Some(p) = mqtt::decode(rbuf, version, MAX_INBOUND_PACKET)? {
        match p {
            Packet::PubAck(a) => {
                if ids.release(a.packet_id) {
                    st.acked += 1;
                } else {
                    st.unexpected_acks += 1;
                }
            }
            Packet::Disconnect(d) => return Err(disconnected(&d)),
            _ => {}
        }
    }
    Ok(())
}

fn disconnected(d: &Disconnect) -> ConnError {
    ConnError::Closed(format!(
        " with DISCONNECT {:#04x} ({})",
        d.code,
        mqtt::reason::name(d.code)
    ))
}

/// Best-effort DISCONNECT: flush what is pending plus the DISCONNECT, for at most 200 ms.
async fn goodbye<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    wbuf: &mut BytesMut,
    version: mqtt::ProtocolVersion,
) {
    if mqtt::encode(&Packet::Disconnect(Disconnect::default()), version, wbuf).is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(200), wr.write_all(wbuf)).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), wr.shutdown()).await;
}

struct SubTask {
    pub_base: u32,
    pub_count: u32,
    hist: Latency,
    ping_every: Duration,
}

struct SubStats {
    received_total: u64,
    received_in_window: u64,
    reordered: u64,
    foreign: u64,
    hist: Latency,
    error: Option<String>,
}

async fn subscriber(
    s: Session,
    t: SubTask,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let SubTask {
        pub_base,
        pub_count,
        hist,
        ping_every,
    } = t;
    let mut st = SubStats {
        received_total: 0,
        received_in_window: 0,
        reordered: 0,
        foreign: 0,
        hist,
        error: None,
    };
    let Session {
        stream,
        mut rbuf,
        mut wbuf,
        version,
        ..
    } = s;
    let read_chunk = rbuf.capacity().clamp(4096, 64 * 1024);
    let (mut rd, mut wr) = stream.into_split();
    let mut last_seq: Vec<Option<u32>> = vec![None; pub_count as usize];
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        // Writes go first: PUBACKs must not wait behind further reads (the broker's window
        // towards this subscriber would stall).
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = wr.write(&wbuf), if !wbuf.is_empty() => {
                match r {
                    Ok(n) => wbuf.advance(n),
                    Err(e) => {
                        st.error = Some(format!("subscriber: writing: {e}"));
                        break;
                    }
                }
            }
            r = rd.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) => {
                        st.error = Some("subscriber: the broker closed the connection".into());
                        break;
                    }
                    Ok(_) => {
                        let now_ns = sh.ns(Instant::now());
                        match subscriber_input(&mut rbuf, &mut wbuf, version, now_ns, &sh, pub_base, &mut last_seq, &mut st) {
                            Ok(in_window) => {
                                if in_window > 0 {
                                    sh.delivered_in_window.fetch_add(in_window, Ordering::AcqRel);
                                }
                            }
                            Err(e) => {
                                st.error = Some(format!("subscriber: {e}"));
                                break;
                            }
                        }
                        rbuf.reserve(read_chunk);
                    }
                    Err(e) => {
                        st.error = Some(format!("subscriber: reading: {e}"));
                        break;
                    }
                }
            }
            _ = ping.tick() => {
                let _ = mqtt::encode(&Packet::PingReq, version, &mut wbuf);
            }
        }
    }
    if st.error.is_none() {
        goodbye(&mut wr, &mut wbuf, version).await;
    }
    st
}

/// Decodes every complete packet in `rbuf`; returns how many in-window deliveries it saw.
#[allow(clippy::too_many_arguments)]
fn subscriber_input(
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    version: mqtt::ProtocolVersion,
    now_ns: u64,
    sh: &Shared,
    pub_base: u32,
    last_seq: &mut [Option<u32>],
    st: &mut SubStats,
) -> Result<u64, ConnError> {
    let mut in_window = 0;
    while let Some(p) = mqtt::decode(rbuf, version, MAX_INBOUND_PACKET)? {
        match p {
            Packet::Publish(p) => {
                if p.qos != QoS::AtMostOnce {
                    let ack = PubResponse {
                        packet_id: p.packet_id,
                        ..PubResponse::default()
                    };
                    mqtt::encode(&Packet::PubAck(ack), version, wbuf)?;
                }
                st.received_total += 1;
                let Some(stamp) = Stamp::read(&p.payload) else {
                    st.foreign += 1;
                    continue;
                };
                let slot = stamp
                    .publisher
                    .checked_sub(pub_base)
                    .and_then(|i| last_seq.get_mut(i as usize));
                let Some(slot) = slot else {
                    st.foreign += 1;
                    continue;
                };
                match *slot {
                    // Wrapping comparison: not newer than the last one seen.
                    Some(last) if (stamp.seq.wrapping_sub(last) as i32) <= 0 => st.reordered += 1,
                    _ => *slot = Some(stamp.seq),
                }
                if sh.in_window(stamp.sent_ns) {
                    in_window += 1;
                    st.hist.record_ns(now_ns.saturating_sub(stamp.sent_ns));
                }
            }
            Packet::Disconnect(d) => return Err(disconnected(&d)),
            _ => {}
        }
    }
    st.received_in_window += in_window;
    Ok(in_window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_loss() {
        assert_eq!(auto_tick(0.0), Duration::from_millis(1));
        assert_eq!(auto_tick(40_000.0), Duration::from_millis(1));
        assert_eq!(auto_tick(16_000.0), Duration::from_millis(2));
        assert_eq!(auto_tick(1_000.0), Duration::from_millis(5));
        assert_eq!(auto_tick(100.0), Duration::from_millis(10));
        assert_eq!(auto_tick(1.0), Duration::from_millis(50));
        // 8 publishers at 50k msg/s: 5 ms ticks of ~31 messages, all in one group.
        assert_eq!(tick_groups(8, 6250.0, auto_tick(6250.0), 256), 1);
        // 1000 pairs at 57k msg/s: ~1,000 messages per 17.5 ms tick, in 4 groups of ~250.
        assert_eq!(tick_groups(1000, 57.0, auto_tick(57.0), 256), 4);
        // 1000 pairs at 1k msg/s: 50 messages per 50 ms tick, one group.
        assert_eq!(tick_groups(1000, 1.0, auto_tick(1.0), 256), 1);
        // Never finer than the 1 ms timer, nor more groups than publishers.
        assert_eq!(tick_groups(1000, 57.0, auto_tick(57.0), 1), 17);
        assert_eq!(tick_groups(2, 100.0, auto_tick(100.0), 1), 2);
        assert_eq!(tick_groups(8, 0.0, Duration::from_millis(1), 256), 8);
        assert_eq!(loss_ratio(0, 0), 0.0);
        assert!((loss_ratio(990, 1000) - 0.01).abs() < 1e-12);
        assert_eq!(loss_ratio(1010, 1000), 0.0);
    }
}
