//! `ferrohub bench twins` and `ferrohub bench commands`: the twin and command services of a
//! running hub, driven like devices and operators would.
//!
//! * `twins`: C connections act for N devices (ids `bt-{run}-{i}`), publishing reported updates
//!   on `$devices/{id}/twin/update` (QoS 1, a `clientToken` per update) and waiting for each
//!   `…/update/accepted` (which the hub sends once the update is durable). Each connection keeps
//!   `--inflight` updates outstanding, or the total is paced at `--rate`. Reports accepted
//!   updates/s and the accept latency (publish → accepted), plus the hub's CPU and RSS with
//!   `--broker-pid`. With one connection the accepted answers arrive on one wildcard subscription,
//!   so `--devices 1000000 --connections 1` fills a million twins cheaply.
//! * `commands`: N devices connect (client id = device id; the hub must allow anonymous clients)
//!   and answer every command request at once; `--http-concurrency` operators send direct
//!   commands (`POST …/commands/ping`) to random devices over HTTP. Reports the round-trip
//!   latency as the operator sees it. The devices are registered through the API first.
//!
//! Both need a hub started with `--allow-anonymous` (the bench acts for many devices from few
//! connections) and, for `commands`, its HTTP address and an admin token.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use ferrohub_proto::mqtt::{Packet, Publish, PublishProperties};
use ferrohub_types::QoS;
use parking_lot::Mutex;
use serde::Serialize;

use super::stats::Latency;
use super::wire::{ClientOpts, Session, WindowSlot, spawn_packet_reader, take_window_slot};
use super::{BenchArgs, sys};

/// One JSON line of `bench twins`.
#[derive(Debug, Serialize)]
struct TwinsReport {
    scenario: &'static str,
    label: String,
    devices: usize,
    connections: usize,
    offered_rate: u64,
    duration_s: f64,
    accepted: u64,
    accepted_per_s: f64,
    rejected: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    broker_cpu_cores: Option<f64>,
    broker_rss_mib: Option<f64>,
}

/// One JSON line of `bench commands`.
#[derive(Debug, Serialize)]
struct CommandsReport {
    scenario: &'static str,
    label: String,
    devices: usize,
    http_concurrency: usize,
    duration_s: f64,
    commands: u64,
    commands_per_s: f64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    broker_cpu_cores: Option<f64>,
    broker_rss_mib: Option<f64>,
}

struct Shared {
    latency: Mutex<Latency>,
    accepted: AtomicU64,
    rejected: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

fn publish(topic: String, payload: String, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Arc::from(topic.as_str()),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::from(payload),
    })
}

fn device_ids(run: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bt-{run}-{i}")).collect()
}

/// `bench twins`.
pub async fn run_twins(a: &BenchArgs, opts: Arc<ClientOpts>, run: String) -> anyhow::Result<()> {
    let devices = a.devices.unwrap_or(1000);
    let connections = a.connections.clamp(1, devices as u32) as usize;
    let ids = device_ids(&run, devices);
    let shared = Arc::new(Shared {
        latency: Mutex::new(Latency::new(3)?),
        accepted: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let per_conn_rate = (a.rate as f64) / connections as f64;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mine: Vec<String> = ids.iter().skip(c).step_by(connections).cloned().collect();
        let (opts, shared) = (opts.clone(), shared.clone());
        let inflight = usize::from(a.inflight);
        let wildcard = connections == 1;
        tasks.push(tokio::spawn(async move {
            twin_connection(opts, c, mine, wildcard, inflight, per_conn_rate, shared).await
        }));
    }
    let progress = a.progress;
    let warmup = Duration::from_secs_f64(a.warmup);
    tokio::time::sleep(warmup).await;
    let before = a.broker_pid.and_then(sys::sample_process);
    let started = Instant::now();
    shared.measuring.store(true, Relaxed);
    let window = Duration::from_secs_f64(a.duration);
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1).min(window.saturating_sub(started.elapsed())))
            .await;
        if progress {
            eprintln!(
                "[twins] {:>5.1}s accepted {} rejected {}",
                started.elapsed().as_secs_f64(),
                shared.accepted.load(Relaxed),
                shared.rejected.load(Relaxed)
            );
        }
        for t in &tasks {
            if t.is_finished() {
                bail!(
                    "a connection ended early (see the error above); is the hub running with --allow-anonymous?"
                );
            }
        }
    }
    shared.measuring.store(false, Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = a.broker_pid.and_then(sys::sample_process);
    shared.stop.store(true, Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let lat = shared.latency.lock();
    let accepted = shared.accepted.load(Relaxed);
    let report = TwinsReport {
        scenario: "twins",
        label: a.label.clone(),
        devices,
        connections,
        offered_rate: a.rate,
        duration_s: elapsed,
        accepted,
        accepted_per_s: accepted as f64 / elapsed,
        rejected: shared.rejected.load(Relaxed),
        p50_ms: lat.quantile_ms(0.5),
        p99_ms: lat.quantile_ms(0.99),
        max_ms: lat.max_ms(),
        broker_cpu_cores: sys::cpu_cores(before, after, elapsed),
        broker_rss_mib: after.map(|s| s.rss_bytes as f64 / (1024.0 * 1024.0)),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(serde::Deserialize)]
struct Answer {
    #[serde(rename = "clientToken")]
    client_token: Option<String>,
}

async fn twin_connection(
    opts: Arc<ClientOpts>,
    index: usize,
    devices: Vec<String>,
    wildcard: bool,
    inflight: usize,
    rate: f64,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let client_id = format!("{}-c{index}", devices.first().map_or("bt", |d| d.as_str()));
    let mut s = Session::connect(&opts, client_id, 64 * 1024)
        .await
        .context("connecting")?;
    let filters: Vec<String> = if wildcard {
        vec![
            "$devices/+/twin/update/accepted".into(),
            "$devices/+/twin/update/rejected".into(),
        ]
    } else {
        devices
            .iter()
            .flat_map(|d| {
                [
                    format!("$devices/{d}/twin/update/accepted"),
                    format!("$devices/{d}/twin/update/rejected"),
                ]
            })
            .collect()
    };
    for chunk in filters.chunks(64) {
        s.subscribe(chunk, QoS::AtMostOnce, opts.timeout)
            .await
            .context("subscribing to the accepted/rejected topics")?;
    }
    let (rd, mut wr) = s.stream.into_split();
    let version = s.version;
    let pending: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let window = Arc::new(tokio::sync::Semaphore::new(inflight));
    let reader = {
        let (pending, window, shared) = (pending.clone(), window.clone(), shared.clone());
        spawn_packet_reader(rd, s.rbuf, version, move |p| {
            let Packet::Publish(p) = p else { return };
            let Ok(answer) = serde_json::from_slice::<Answer>(&p.payload) else {
                return;
            };
            let Some(token) = answer.client_token.and_then(|t| t.parse::<u64>().ok()) else {
                return;
            };
            let Some(sent) = pending.lock().remove(&token) else {
                return;
            };
            window.add_permits(1);
            if shared.measuring.load(Relaxed) {
                if p.topic.ends_with("/accepted") {
                    shared.accepted.fetch_add(1, Relaxed);
                    shared
                        .latency
                        .lock()
                        .record_ns(sent.elapsed().as_nanos() as u64);
                } else {
                    shared.rejected.fetch_add(1, Relaxed);
                }
            }
        })
    };
    use tokio::io::AsyncWriteExt;
    let mut seq: u64 = (index as u64) << 40;
    let mut packet_id: u16 = 0;
    let mut wbuf = bytes::BytesMut::new();
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let mut next_send = tokio::time::Instant::now();
    let mut i = 0usize;
    while !shared.stop.load(Relaxed) {
        match take_window_slot(&window, &mut wr, &mut wbuf, Duration::from_secs(5))
            .await
            .context("writing")?
        {
            WindowSlot::Taken => {}
            WindowSlot::Closed => break,
            WindowSlot::TimedOut => {
                // Nothing answered for 5 s: forget what is outstanding, do not stall.
                let n = {
                    let mut p = pending.lock();
                    let n = p.len();
                    p.clear();
                    n
                };
                window.add_permits(n);
                continue;
            }
        }
        if let Some(pace) = pace {
            next_send += pace;
            tokio::time::sleep_until(next_send).await;
        }
        let device = &devices[i % devices.len()];
        i += 1;
        seq += 1;
        packet_id = packet_id.checked_add(1).unwrap_or(1);
        let body = format!(
            r#"{{"reported":{{"temp":{:.2},"seq":{seq},"health":{{"battery":{},"uptime":{}}}}},"clientToken":"{seq}"}}"#,
            20.0 + (seq % 100) as f64 / 10.0,
            100 - (seq % 100),
            seq
        );
        pending.lock().insert(seq, Instant::now());
        ferrohub_proto::mqtt::encode(
            &publish(format!("$devices/{device}/twin/update"), body, packet_id),
            version,
            &mut wbuf,
        )?;
        if pace.is_some() || wbuf.len() > 32 * 1024 {
            wr.write_all(&wbuf).await.context("writing")?;
            wbuf.clear();
        }
    }
    reader.abort();
    Ok(())
}

/// `bench commands`.
pub async fn run_commands(a: &BenchArgs, opts: Arc<ClientOpts>, run: String) -> anyhow::Result<()> {
    let devices = a.devices.unwrap_or(10_000);
    let Some(token) = a.token.clone() else {
        bail!("commands needs --token (an admin API token; FERROHUB_TOKEN)");
    };
    let base = format!("http://{}:{}/api/v1/tenants/default", a.host, a.http_port);
    // reqwest's rustls backend needs a process-wide crypto provider even for plain HTTP.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.http_concurrency as usize)
        .build()?;
    let ids: Vec<String> = (0..devices).map(|i| format!("bc-{run}-{i}")).collect();
    // Register the devices (the API answers commands for registered devices only).
    for chunk in ids.chunks(5000) {
        let specs: Vec<serde_json::Value> = chunk
            .iter()
            .map(|id| serde_json::json!({"id": id}))
            .collect();
        let r = http
            .post(format!("{base}/devices/import"))
            .bearer_auth(&token)
            .json(&specs)
            .send()
            .await
            .context("registering the devices")?;
        if !r.status().is_success() {
            bail!(
                "registering the devices: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
    }
    // Connect them; each answers its requests at once.
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency as usize));
    let mut tasks = Vec::with_capacity(devices);
    for id in &ids {
        let (opts, id, stop, connected, gate) = (
            opts.clone(),
            id.clone(),
            stop.clone(),
            connected.clone(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            answering_device(opts, id, stop, connected, gate).await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Relaxed) < devices as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {devices} devices connected within 120 s",
                connected.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if a.progress {
        eprintln!("[commands] {devices} devices connected");
    }
    // Operators: direct commands to random devices.
    let latency = Arc::new(Mutex::new(Latency::new(3)?));
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let measuring = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(ids);
    let mut ops = Vec::new();
    for w in 0..a.http_concurrency {
        let (http, base, token, ids, latency, done, errors, stop, measuring) = (
            http.clone(),
            base.clone(),
            token.clone(),
            ids.clone(),
            latency.clone(),
            done.clone(),
            errors.clone(),
            stop.clone(),
            measuring.clone(),
        );
        ops.push(tokio::spawn(async move {
            let mut k = u64::from(w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while !stop.load(Relaxed) {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let id = &ids[(k >> 33) as usize % ids.len()];
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/devices/{id}/commands/ping?timeout=5"))
                    .bearer_auth(&token)
                    .body(r#"{"n":1}"#)
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if measuring.load(Relaxed) {
                    if ok {
                        done.fetch_add(1, Relaxed);
                        latency.lock().record_ns(t.elapsed().as_nanos() as u64);
                    } else {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let before = a.broker_pid.and_then(sys::sample_process);
    let started = Instant::now();
    measuring.store(true, Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    measuring.store(false, Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = a.broker_pid.and_then(sys::sample_process);
    stop.store(true, Relaxed);
    for t in ops {
        let _ = tokio::time::timeout(Duration::from_secs(6), t).await;
    }
    for t in tasks {
        t.abort();
    }
    let lat = latency.lock();
    let n = done.load(Relaxed);
    let report = CommandsReport {
        scenario: "commands",
        label: a.label.clone(),
        devices,
        http_concurrency: a.http_concurrency as usize,
        duration_s: elapsed,
        commands: n,
        commands_per_s: n as f64 / elapsed,
        errors: errors.load(Relaxed),
        p50_ms: lat.quantile_ms(0.5),
        p99_ms: lat.quantile_ms(0.99),
        max_ms: lat.max_ms(),
        broker_cpu_cores: sys::cpu_cores(before, after, elapsed),
        broker_rss_mib: after.map(|s| s.rss_bytes as f64 / (1024.0 * 1024.0)),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A device that answers every command request with status 200 (3.1.1 topic convention).
async fn answering_device(
    opts: Arc<ClientOpts>,
    id: String,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicU64>,
    gate: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let mut s = {
        let _permit = gate.acquire().await?;
        let mut s = Session::connect(&opts, id.clone(), 1024).await?;
        s.subscribe(
            &[format!("$devices/{id}/commands/req/#")],
            QoS::AtMostOnce,
            opts.timeout,
        )
        .await?;
        s
    };
    connected.fetch_add(1, Relaxed);
    let prefix = format!("$devices/{id}/commands/req/");
    let mut ping = tokio::time::interval(opts.ping_every());
    ping.tick().await;
    while !stop.load(Relaxed) {
        tokio::select! {
            p = s.read_packet() => {
                if let Packet::Publish(p) = p? {
                    let Some(rest) = p.topic.strip_prefix(prefix.as_str()) else { continue };
                    let Some((_, rid)) = rest.rsplit_once('/') else { continue };
                    let answer = Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic: Arc::from(format!("$devices/{id}/commands/res/{rid}/200").as_str()),
                        packet_id: 0,
                        properties: PublishProperties::default(),
                        payload: Bytes::from_static(b"{\"pong\":true}"),
                    });
                    s.send(&answer).await?;
                }
            }
            _ = ping.tick() => {
                s.send(&Packet::PingReq).await?;
            }
        }
    }
    Ok(())
}
