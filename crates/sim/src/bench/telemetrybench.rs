//! `ferrohub bench telemetry`: end-to-end telemetry ingest of a running hub, from MQTT publishers
//! to points stored in its time-series engine.
//!
//! `--connections` connections publish QoS 1 JSON payloads of `--metrics-per-message` metrics each
//! (`{"ts": …, "m0": 21.37, "m1": …}`, realistic two-decimal values, device timestamps) on
//! `devices/{device}/telemetry` for `--devices` devices, keeping `--inflight` publications
//! unacknowledged per connection. The hub acknowledges a publication only after its points are
//! durable in the engine's WAL, so acknowledged messages × metrics is the stored rate; the hub's
//! own counter (read from `--http-port`) `ferrohub_tsdb_points_written_total` is read before and
//! after the window as a cross-check. Reports messages/s, points/s, acknowledgement latency and
//! the hub's CPU (with `--broker-pid`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use ferrohub_proto::mqtt::{Packet, Publish, PublishProperties};
use ferrohub_types::QoS;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stats::Latency;
use super::wire::{ClientOpts, Session, WindowSlot, spawn_packet_reader, take_window_slot};
use super::{BenchArgs, sys};

#[derive(Debug, Serialize)]
struct TelemetryReport {
    scenario: &'static str,
    label: String,
    devices: usize,
    connections: usize,
    metrics_per_message: usize,
    inflight: u16,
    duration_s: f64,
    messages: u64,
    messages_per_s: f64,
    points_per_s: f64,
    /// From the hub's `ferrohub_tsdb_points_written_total` (if its /metrics answered).
    hub_points_per_s: Option<f64>,
    refused: u64,
    p50_ms: f64,
    p99_ms: f64,
    broker_cpu_cores: Option<f64>,
    broker_rss_mib: Option<f64>,
}

struct Shared {
    latency: Mutex<Latency>,
    acked: AtomicU64,
    refused: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// Reads one counter from the hub's Prometheus endpoint.
async fn hub_counter(host: &str, port: u16, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// `bench telemetry`.
pub async fn run_telemetry(
    a: &BenchArgs,
    opts: Arc<ClientOpts>,
    run: String,
) -> anyhow::Result<()> {
    let devices = a.devices.unwrap_or(1000).max(1);
    let connections = a.connections.clamp(1, devices as u32) as usize;
    let per_message = a.metrics_per_message.clamp(1, 1000);
    let ids: Vec<String> = (0..devices).map(|i| format!("bt-{run}-{i}")).collect();
    let shared = Arc::new(Shared {
        latency: Mutex::new(Latency::new(3)?),
        acked: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mine: Vec<String> = ids.iter().skip(c).step_by(connections).cloned().collect();
        let (opts, shared) = (opts.clone(), shared.clone());
        let inflight = usize::from(a.inflight);
        tasks.push(tokio::spawn(async move {
            telemetry_connection(opts, c, mine, per_message, inflight, shared).await
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let counter = "ferrohub_tsdb_points_written_total";
    let hub_before = hub_counter(&a.host, a.http_port, counter).await;
    let before = a.broker_pid.and_then(sys::sample_process);
    let started = Instant::now();
    shared.measuring.store(true, Relaxed);
    let window = Duration::from_secs_f64(a.duration);
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1).min(window.saturating_sub(started.elapsed())))
            .await;
        if a.progress {
            let n = shared.acked.load(Relaxed);
            eprintln!(
                "[telemetry] {:>5.1}s {n} messages ({:.0} points/s)",
                started.elapsed().as_secs_f64(),
                (n * per_message as u64) as f64 / started.elapsed().as_secs_f64()
            );
        }
        if tasks.iter().any(|t| t.is_finished()) {
            bail!(
                "a connection ended early (see the error above); is the hub running with --allow-anonymous?"
            );
        }
    }
    shared.measuring.store(false, Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = a.broker_pid.and_then(sys::sample_process);
    let hub_after = hub_counter(&a.host, a.http_port, counter).await;
    shared.stop.store(true, Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let messages = shared.acked.load(Relaxed);
    let lat = shared.latency.lock();
    let report = TelemetryReport {
        scenario: "telemetry",
        label: a.label.clone(),
        devices,
        connections,
        metrics_per_message: per_message,
        inflight: a.inflight,
        duration_s: elapsed,
        messages,
        messages_per_s: messages as f64 / elapsed,
        points_per_s: (messages * per_message as u64) as f64 / elapsed,
        hub_points_per_s: hub_before.zip(hub_after).map(|(b, a)| (a - b) / elapsed),
        refused: shared.refused.load(Relaxed),
        p50_ms: lat.quantile_ms(0.5),
        p99_ms: lat.quantile_ms(0.99),
        broker_cpu_cores: sys::cpu_cores(before, after, elapsed),
        broker_rss_mib: after.map(|s| s.rss_bytes as f64 / (1024.0 * 1024.0)),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn telemetry_connection(
    opts: Arc<ClientOpts>,
    index: usize,
    devices: Vec<String>,
    per_message: usize,
    inflight: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let client_id = format!("{}-c{index}", devices.first().map_or("bt", |d| d.as_str()));
    let s = Session::connect(&opts, client_id, 64 * 1024)
        .await
        .context("connecting")?;
    let version = s.version;
    let (rd, mut wr) = s.stream.into_split();
    // Packet id → send time; ids cycle through 1..=inflight so the table is a vector.
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; inflight + 1]));
    let window = Arc::new(tokio::sync::Semaphore::new(inflight));
    let free: Arc<Mutex<Vec<u16>>> = Arc::new(Mutex::new((1..=inflight as u16).rev().collect()));
    let reader = {
        let (sent, window, shared, free) =
            (sent.clone(), window.clone(), shared.clone(), free.clone());
        spawn_packet_reader(rd, s.rbuf, version, move |p| {
            let Packet::PubAck(ack) = p else { return };
            let at = sent
                .lock()
                .get_mut(usize::from(ack.packet_id))
                .and_then(Option::take);
            let Some(at) = at else { return };
            free.lock().push(ack.packet_id);
            window.add_permits(1);
            if shared.measuring.load(Relaxed) {
                if ack.code < 0x80 {
                    shared.acked.fetch_add(1, Relaxed);
                    shared
                        .latency
                        .lock()
                        .record_ns(at.elapsed().as_nanos() as u64);
                } else {
                    shared.refused.fetch_add(1, Relaxed);
                }
            }
        })
    };
    let topics: Vec<Arc<str>> = devices
        .iter()
        .map(|d| Arc::from(format!("devices/{d}/telemetry").as_str()))
        .collect();
    let mut wbuf = bytes::BytesMut::new();
    let mut body = String::with_capacity(32 + per_message * 16);
    let mut seq: u64 = 0;
    while !shared.stop.load(Relaxed) {
        match take_window_slot(&window, &mut wr, &mut wbuf, Duration::from_secs(10))
            .await
            .context("writing")?
        {
            WindowSlot::Taken => {}
            WindowSlot::Closed => break,
            WindowSlot::TimedOut => bail!("no PUBACK for 10 s"),
        }
        let Some(packet_id) = free.lock().pop() else {
            continue;
        };
        seq += 1;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        body.clear();
        {
            use std::fmt::Write;
            let _ = write!(body, "{{\"ts\":{now_ms}");
            for m in 0..per_message {
                let v = 20.0
                    + ((seq.wrapping_mul(31).wrapping_add(m as u64 * 7)) % 1000) as f64 / 100.0;
                let _ = write!(body, ",\"m{m}\":{v:.2}");
            }
            body.push('}');
        }
        let topic = topics[(seq as usize) % topics.len()].clone();
        sent.lock()[usize::from(packet_id)] = Some(Instant::now());
        ferrohub_proto::mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic,
                packet_id,
                properties: PublishProperties::default(),
                payload: Bytes::copy_from_slice(body.as_bytes()),
            }),
            version,
            &mut wbuf,
        )?;
        if wbuf.len() > 32 * 1024 {
            wr.write_all(&wbuf).await.context("writing")?;
            wbuf.clear();
        }
    }
    reader.abort();
    Ok(())
}
