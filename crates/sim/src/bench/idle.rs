//! The idle-connections scenario: open many connections as fast as possible, hold them, then
//! check that every one still answers PINGREQ and that the broker still routes messages.
//!
//! One process may hold at most `max_per_process` sockets; beyond that the harness re-executes
//! itself as `ferrohub bench idle-worker ...` children, one per share, and drives them with a
//! line protocol on stdin/stdout (`go`, `check`, `close`; each answer one JSON object).

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use ferrohub_proto::mqtt::{self, Disconnect, Packet, Publish, PublishProperties};
use ferrohub_types::QoS;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::payload::{self, Stamp};
use super::sys;
use super::wire::{ClientOpts, MAX_INBOUND_PACKET, Session};

/// How to run the idle scenario.
#[derive(Debug, Clone)]
pub struct IdleParams {
    /// Connection settings.
    pub opts: Arc<ClientOpts>,
    /// Connections to open.
    pub connections: usize,
    /// How long to hold them.
    pub hold: Duration,
    /// Handshakes in flight at once (over all processes).
    pub concurrency: usize,
    /// Most connections one process holds.
    pub max_per_process: usize,
    /// Broker process to sample.
    pub broker_pid: Option<u32>,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Client identifier prefix (unique per run).
    pub client_prefix: String,
    /// Arguments that reproduce the connection settings for a worker (`--host ...`).
    pub worker_args: Vec<String>,
    /// Environment for workers (the password travels here, not on the command line).
    pub worker_env: Vec<(String, String)>,
}

/// The measured figures of an idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleStats {
    /// Connections requested.
    pub connections: usize,
    /// Connections that got a CONNACK.
    pub connected: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Worker processes used (0: all in this process).
    pub workers: usize,
    /// Seconds from the first connect to the last CONNACK (or failure).
    pub connect_s: f64,
    /// `connected / connect_s`.
    pub connect_rate: f64,
    /// Seconds the connections were held.
    pub hold_s: f64,
    /// Connections that answered the final PINGREQ.
    pub still_open: usize,
    /// Connections the broker closed, or that did not answer, during the hold.
    pub lost: usize,
    /// Whether a message published through the broker after the hold reached its subscriber.
    pub routing_ok: bool,
    /// Latency of that message (ms).
    pub routing_latency_ms: Option<f64>,
    /// Why routing failed.
    pub routing_error: Option<String>,
    /// Broker RSS before connecting, bytes.
    pub broker_rss_before_bytes: Option<u64>,
    /// Broker RSS at the end of the hold, bytes.
    pub broker_rss_after_bytes: Option<u64>,
    /// `(after - before) / connected`, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// Broker CPU seconds spent accepting the connections.
    pub broker_connect_cpu_s: Option<f64>,
    /// Harness CPU seconds (all processes) for the whole scenario.
    pub harness_cpu_s: f64,
    /// Harness CPU seconds while connecting (this process only when workers are used).
    pub harness_connect_cpu_s: f64,
}

#[derive(Debug, Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    closed: AtomicUsize,
    check_ok: AtomicUsize,
    check_fail: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, e: String) {
        if let Ok(mut g) = self.first_error.lock() {
            g.get_or_insert(e);
        }
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|g| g.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Hold,
    Check,
    Close,
}

/// Connections held by this process.
struct Pool {
    n: usize,
    counters: Arc<Counters>,
    cmd: watch::Sender<Cmd>,
    tasks: JoinSet<()>,
}

/// Outcome of a liveness check.
#[derive(Debug, Clone, Copy, Default)]
struct Check {
    ok: usize,
    lost: usize,
}

impl Pool {
    fn start(opts: &Arc<ClientOpts>, n: usize, prefix: &str, concurrency: usize) -> Pool {
        let counters = Arc::new(Counters::default());
        let (cmd, cmd_rx) = watch::channel(Cmd::Hold);
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            tasks.spawn(idle_conn(
                opts.clone(),
                format!("{prefix}-{i}"),
                sem.clone(),
                counters.clone(),
                cmd_rx.clone(),
            ));
        }
        Pool {
            n,
            counters,
            cmd,
            tasks,
        }
    }

    async fn wait_connected(&self) -> (usize, usize) {
        loop {
            let c = self.counters.connected.load(Ordering::Acquire);
            let f = self.counters.failed.load(Ordering::Acquire);
            if c + f >= self.n {
                return (c, f);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn check(&self) -> Check {
        let connected = self.counters.connected.load(Ordering::Acquire);
        let _ = self.cmd.send(Cmd::Check);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.counters.check_ok.load(Ordering::Acquire);
            let fail = self.counters.check_fail.load(Ordering::Acquire);
            let closed = self.counters.closed.load(Ordering::Acquire);
            if ok + fail + closed >= connected || Instant::now() >= deadline {
                return Check {
                    ok,
                    lost: connected.saturating_sub(ok),
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn close(mut self) {
        let _ = self.cmd.send(Cmd::Close);
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {}
        self.tasks.abort_all();
    }
}

async fn idle_conn(
    opts: Arc<ClientOpts>,
    client_id: String,
    sem: Arc<Semaphore>,
    c: Arc<Counters>,
    mut cmd: watch::Receiver<Cmd>,
) {
    let permit = sem.acquire().await;
    let s = match Session::connect(&opts, client_id, 64).await {
        Ok(s) => s,
        Err(e) => {
            c.failed.fetch_add(1, Ordering::AcqRel);
            c.error(e.to_string());
            return;
        }
    };
    drop(permit);
    c.connected.fetch_add(1, Ordering::AcqRel);
    let Session {
        mut stream,
        mut rbuf,
        mut wbuf,
        version,
        ..
    } = s;
    let ping_every = opts.ping_every();
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut awaiting: Option<Instant> = None;
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            r = stream.read_buf(&mut rbuf) => {
                let mut gone = !matches!(r, Ok(n) if n > 0);
                while !gone {
                    match mqtt::decode(&mut rbuf, version, MAX_INBOUND_PACKET) {
                        Ok(Some(Packet::PingResp)) => {
                            if awaiting.take().is_some() {
                                c.check_ok.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        Ok(Some(Packet::Disconnect(_))) | Err(_) => gone = true,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                    }
                }
                if gone {
                    c.closed.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                rbuf.reserve(64);
            }
            r = cmd.changed() => {
                if r.is_err() {
                    return;
                }
                let now = *cmd.borrow_and_update();
                match now {
                    Cmd::Hold => {}
                    Cmd::Check => {
                        awaiting = Some(Instant::now() + Duration::from_secs(15));
                        if send(&mut stream, &mut wbuf, version, &Packet::PingReq).await.is_err() {
                            c.closed.fetch_add(1, Ordering::AcqRel);
                            return;
                        }
                    }
                    Cmd::Close => {
                        let bye = Packet::Disconnect(Disconnect::default());
                        let _ = send(&mut stream, &mut wbuf, version, &bye).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            }
            _ = ping.tick() => {
                if send(&mut stream, &mut wbuf, version, &Packet::PingReq).await.is_err() {
                    c.closed.fetch_add(1, Ordering::AcqRel);
                    return;
                }
            }
            _ = tokio::time::sleep_until(awaiting.unwrap_or(far)), if awaiting.is_some() => {
                awaiting = None;
                c.check_fail.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

async fn send(
    stream: &mut super::transport::MqttStream,
    wbuf: &mut BytesMut,
    version: mqtt::ProtocolVersion,
    p: &Packet,
) -> std::io::Result<()> {
    wbuf.clear();
    mqtt::encode(p, version, wbuf).map_err(std::io::Error::other)?;
    tokio::time::timeout(Duration::from_secs(5), stream.write_all(wbuf))
        .await
        .map_err(|_| std::io::Error::other("write timed out"))?
}

/// Publishes one QoS 1 message through the broker to a fresh subscriber; returns its latency.
async fn routing_check(opts: &Arc<ClientOpts>, prefix: &str) -> anyhow::Result<f64> {
    let topic = format!("bench/idle/{prefix}/ping");
    let mut sub = Session::connect(opts, format!("{prefix}-ping-sub"), 4096).await?;
    sub.subscribe(std::slice::from_ref(&topic), QoS::AtLeastOnce, opts.timeout)
        .await?;
    let mut publisher = Session::connect(opts, format!("{prefix}-ping-pub"), 4096).await?;
    let mut body = payload::template(64);
    let t0 = Instant::now();
    Stamp {
        sent_ns: 0,
        publisher: 0,
        seq: 0x5eed,
    }
    .write(&mut body);
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Arc::from(topic.as_str()),
        packet_id: 1,
        properties: PublishProperties::default(),
        payload: body.into(),
    };
    publisher.send(&Packet::Publish(publish)).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sub.read_packet().await? {
                Packet::Publish(p) if Stamp::read(&p.payload).map(|s| s.seq) == Some(0x5eed) => {
                    return Ok::<_, anyhow::Error>(t0.elapsed());
                }
                _ => {}
            }
        }
    })
    .await
    .context("no delivery within 5 s")??;
    for s in [&mut sub, &mut publisher] {
        let _ = s.send(&Packet::Disconnect(Disconnect::default())).await;
    }
    Ok(got.as_secs_f64() * 1000.0)
}

/// Child processes holding shares of the connections.
struct Workers {
    children: Vec<tokio::process::Child>,
    stdins: Vec<tokio::process::ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, Result<Value, String>)>,
}

impl Workers {
    fn spawn(p: &IdleParams, shares: &[usize]) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("locating the harness executable")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let per_worker_concurrency = (p.concurrency / shares.len().max(1)).max(1);
        for (i, share) in shares.iter().enumerate() {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("bench")
                .arg("idle-worker")
                .args(&p.worker_args)
                .arg("--connections")
                .arg(share.to_string())
                .arg("--connect-concurrency")
                .arg(per_worker_concurrency.to_string())
                .arg("--client-prefix")
                .arg(format!("{}-w{i}", p.client_prefix))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .envs(p.worker_env.iter().map(|(k, v)| (k, v)))
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting idle worker {i} ({})", exe.display()))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("idle worker {i}: no stdio pipes");
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(stdout).lines();
                loop {
                    let item = match r.next_line().await {
                        Ok(Some(l)) => serde_json::from_str::<Value>(&l)
                            .map_err(|e| format!("bad worker line {l:?}: {e}")),
                        Ok(None) => Err("worker exited".to_string()),
                        Err(e) => Err(format!("reading worker output: {e}")),
                    };
                    let end = item.is_err();
                    if tx.send((i, item)).is_err() || end {
                        return;
                    }
                }
            });
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Workers {
            children,
            stdins,
            lines,
        })
    }

    /// Sends `cmd` to every worker (unless empty) and collects one answer from each.
    async fn round(&mut self, cmd: &str, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        if !cmd.is_empty() {
            for (i, s) in self.stdins.iter_mut().enumerate() {
                s.write_all(format!("{cmd}\n").as_bytes())
                    .await
                    .with_context(|| format!("sending {cmd:?} to idle worker {i}"))?;
                s.flush().await?;
            }
        }
        let mut out: Vec<Option<Value>> = vec![None; self.stdins.len()];
        let deadline = Instant::now() + timeout;
        while out.iter().any(Option::is_none) {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((i, Ok(v)))) => {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = Some(v);
                    }
                }
                // A worker that already answered may exit right after (that is how `close` ends).
                Ok(Some((i, Err(_)))) if out.get(i).is_some_and(Option::is_some) => {}
                Ok(Some((i, Err(e)))) => bail!("idle worker {i}: {e}"),
                Ok(None) => bail!("idle workers vanished"),
                Err(_) => bail!("idle workers did not answer {cmd:?} in time"),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn finish(mut self) {
        self.stdins.clear();
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

fn field(v: &Value, k: &str) -> usize {
    v.get(k).and_then(Value::as_u64).unwrap_or(0) as usize
}

/// Splits `total` into `ceil(total / max)` nearly equal shares.
pub fn shares(total: usize, max: usize) -> Vec<usize> {
    let k = total.div_ceil(max.max(1)).max(1);
    (0..k)
        .map(|i| total / k + usize::from(i < total % k))
        .collect()
}

/// Runs the idle scenario.
pub async fn run(p: &IdleParams) -> anyhow::Result<IdleStats> {
    let cpu_start = sys::self_cpu();
    let broker_before = p.broker_pid.and_then(sys::sample_process);
    let use_workers = p.connections > p.max_per_process;
    let first_error;
    let mut worker_cpu = 0.0;

    enum Holder {
        Local(Pool),
        Remote(Workers),
    }

    // Connect.
    let (holder, connected, failed, connect_s) = if use_workers {
        let mut w = Workers::spawn(p, &shares(p.connections, p.max_per_process))?;
        w.round("", Duration::from_secs(30)).await?;
        let t0 = Instant::now();
        let answers = w.round("go", Duration::from_secs(600)).await?;
        let secs = t0.elapsed().as_secs_f64();
        let connected = answers.iter().map(|v| field(v, "connected")).sum();
        let failed = answers.iter().map(|v| field(v, "failed")).sum();
        first_error = answers.iter().find_map(|v| {
            v.get("first_error")
                .and_then(Value::as_str)
                .map(String::from)
        });
        (Holder::Remote(w), connected, failed, secs)
    } else {
        let t0 = Instant::now();
        let pool = Pool::start(&p.opts, p.connections, &p.client_prefix, p.concurrency);
        let (c, f) = pool.wait_connected().await;
        let secs = t0.elapsed().as_secs_f64();
        first_error = pool.counters.first_error();
        (Holder::Local(pool), c, f, secs)
    };
    let harness_connect_cpu_s = sys::self_cpu().saturating_sub(cpu_start).as_secs_f64();
    let broker_connected = p.broker_pid.and_then(sys::sample_process);
    if p.progress {
        eprintln!(
            "[idle] {connected} connected, {failed} failed in {connect_s:.2} s; holding {:.0} s",
            p.hold.as_secs_f64()
        );
    }
    if connected == 0 {
        match holder {
            Holder::Local(pool) => pool.close().await,
            Holder::Remote(w) => w.finish().await,
        }
        bail!(
            "no idle connection could be opened: {}",
            first_error.unwrap_or_else(|| "unknown error".into())
        );
    }

    // Hold.
    let hold_started = Instant::now();
    tokio::time::sleep(p.hold).await;
    let hold_s = hold_started.elapsed().as_secs_f64();
    let broker_after = p.broker_pid.and_then(sys::sample_process);

    // Does the broker still route, with all of them connected?
    let (routing_ok, routing_latency_ms, routing_error) =
        match routing_check(&p.opts, &p.client_prefix).await {
            Ok(ms) => (true, Some(ms), None),
            Err(e) => (false, None, Some(format!("{e:#}"))),
        };

    // Is every connection still open?
    let check = match holder {
        Holder::Local(pool) => {
            let c = pool.check().await;
            pool.close().await;
            c
        }
        Holder::Remote(mut w) => {
            let answers = w.round("check", Duration::from_secs(60)).await?;
            let c = Check {
                ok: answers.iter().map(|v| field(v, "ok")).sum(),
                lost: answers.iter().map(|v| field(v, "lost")).sum(),
            };
            let bye = w.round("close", Duration::from_secs(60)).await?;
            worker_cpu = bye
                .iter()
                .filter_map(|v| v.get("cpu_s").and_then(Value::as_f64))
                .sum();
            w.finish().await;
            c
        }
    };
    let harness_cpu_s = sys::self_cpu().saturating_sub(cpu_start).as_secs_f64() + worker_cpu;
    let rss_before = broker_before.map(|s| s.rss_bytes);
    let rss_after = broker_after.map(|s| s.rss_bytes);
    Ok(IdleStats {
        connections: p.connections,
        connected,
        failed,
        first_error,
        workers: if use_workers {
            shares(p.connections, p.max_per_process).len()
        } else {
            0
        },
        connect_s,
        connect_rate: connected as f64 / connect_s.max(1e-9),
        hold_s,
        still_open: check.ok,
        lost: check.lost,
        routing_ok,
        routing_latency_ms,
        routing_error,
        broker_rss_before_bytes: rss_before,
        broker_rss_after_bytes: rss_after,
        rss_per_connection_bytes: match (rss_before, rss_after) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / connected as f64),
            _ => None,
        },
        broker_connect_cpu_s: match (broker_before, broker_connected) {
            (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu).as_secs_f64()),
            _ => None,
        },
        harness_cpu_s,
        harness_connect_cpu_s,
    })
}

/// The worker side (`ferrohub bench idle-worker`): holds `n` connections, driven over stdio.
pub async fn worker(
    opts: Arc<ClientOpts>,
    n: usize,
    prefix: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut out = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let say = |v: Value| format!("{v}\n");
    out.write_all(say(json!({ "ready": true })).as_bytes())
        .await?;
    out.flush().await?;
    let mut pool: Option<Pool> = None;
    while let Some(line) = lines.next_line().await? {
        let reply = match line.trim() {
            "go" => {
                let t0 = Instant::now();
                let p = Pool::start(&opts, n, prefix, concurrency);
                let (c, f) = p.wait_connected().await;
                let v = json!({
                    "connected": c,
                    "failed": f,
                    "secs": t0.elapsed().as_secs_f64(),
                    "first_error": p.counters.first_error(),
                });
                pool = Some(p);
                v
            }
            "check" => {
                let c = match &pool {
                    Some(p) => p.check().await,
                    None => Check::default(),
                };
                json!({ "ok": c.ok, "lost": c.lost })
            }
            "close" => {
                if let Some(p) = pool.take() {
                    p.close().await;
                }
                let v = json!({ "cpu_s": sys::self_cpu().as_secs_f64() });
                out.write_all(say(v).as_bytes()).await?;
                out.flush().await?;
                return Ok(());
            }
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        out.write_all(say(reply).as_bytes()).await?;
        out.flush().await?;
    }
    // Parent went away: close everything.
    if let Some(p) = pool.take() {
        p.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_evenly() {
        assert_eq!(shares(19_000, 15_000), vec![9_500, 9_500]);
        assert_eq!(shares(15_000, 15_000), vec![15_000]);
        assert_eq!(shares(30_001, 15_000), vec![10_001, 10_000, 10_000]);
        assert_eq!(shares(0, 15_000), vec![0]);
    }
}
