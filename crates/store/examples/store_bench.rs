//! Throughput and latency of the store's group commit.
//!
//! `cargo run --release -p ferrohub-store --example store_bench -- [ops] [tasks] [window]`
//! (defaults: 200000 ops, 8 tasks, 64 outstanding commits per task). Each op is an `Enqueue` of a
//! 100-byte message for one recipient, submitted as its own batch; each task awaits its oldest
//! commit once `window` are outstanding. Runs with `FsyncPolicy::Never` then `Always`, then
//! measures the latency of a lone commit (one task, one outstanding). The store lives in a
//! temporary directory under `$FERROHUB_BENCH_DIR` (default: the system temp directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrohub_store::{BrokerStore, FsyncPolicy, QueuedFor, SessionRecord, StoreConfig, StoreOp};
use ferrohub_types::{Message, QoS, TenantId, TopicName};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("FERROHUB_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn enqueue(id: u64, message: &Message, client: &Arc<str>) -> StoreOp {
    StoreOp::Enqueue {
        tenant: TenantId::default(),
        message_id: id,
        message: message.clone(),
        recipients: vec![QueuedFor {
            client_id: client.clone(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
        }],
    }
}

fn message() -> Message {
    Message {
        topic: TopicName::parse("devices/dev-1/telemetry").unwrap(),
        payload: Bytes::from(vec![0x42; 100]),
        qos: QoS::AtLeastOnce,
        retain: false,
        received_at: 1_700_000_000_000,
        properties: None,
    }
}

async fn open(policy: FsyncPolicy, dir: &std::path::Path) -> (BrokerStore, Arc<str>) {
    open_with(
        dir,
        StoreConfig {
            fsync: policy,
            ..StoreConfig::default()
        },
    )
    .await
}

async fn open_with(dir: &std::path::Path, config: StoreConfig) -> (BrokerStore, Arc<str>) {
    let (store, _) = BrokerStore::open(dir, config).unwrap();
    let client: Arc<str> = "bench-client".into();
    store
        .submit(vec![StoreOp::PutSession(SessionRecord {
            tenant: TenantId::default(),
            client_id: client.clone(),
            expiry_secs: u32::MAX,
            disconnected_at: None,
        })])
        .await
        .unwrap()
        .await
        .unwrap();
    (store, client)
}

async fn throughput(policy: FsyncPolicy, ops: u64, tasks: u64, window: usize) {
    let dir = bench_dir();
    let (store, client) = open(policy, dir.path()).await;
    let before = store.stats();
    let per_task = ops / tasks;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let msg = message();
            let mut outstanding = VecDeque::with_capacity(window);
            for i in 0..per_task {
                let id = t * per_task + i + 1;
                outstanding.push_back(
                    store
                        .submit(vec![enqueue(id, &msg, &client)])
                        .await
                        .unwrap(),
                );
                if outstanding.len() >= window {
                    outstanding.pop_front().unwrap().await.unwrap();
                }
            }
            while let Some(c) = outstanding.pop_front() {
                c.await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = start.elapsed();
    let s = store.stats();
    let done = per_task * tasks;
    let groups = s.group_commits - before.group_commits;
    let secs = elapsed.as_secs_f64();
    println!(
        "{policy:?}: {done} ops in {:.2} s: {:.0} ops/s, {:.0} commits/s (batches), {:.0} group commits/s ({:.1} batches per group), {:.1} MB/s, {} compactions",
        secs,
        done as f64 / secs,
        (s.batches_written - before.batches_written) as f64 / secs,
        groups as f64 / secs,
        (s.batches_written - before.batches_written) as f64 / groups.max(1) as f64,
        (s.bytes_written - before.bytes_written) as f64 / secs / 1e6,
        s.compactions - before.compactions,
    );
    // A compaction of the resulting live state (every message still queued) stalls commits for:
    let t = Instant::now();
    store.compact().await.unwrap();
    println!(
        "{policy:?}: compaction of {done} live messages into a {:.1} MB snapshot took {:?}",
        store.stats().snapshot_bytes as f64 / 1e6,
        t.elapsed()
    );
    store.close().await.unwrap();
    // And reopening replays it:
    let t = Instant::now();
    let (store, rec) = BrokerStore::open(dir.path(), StoreConfig::default()).unwrap();
    println!(
        "{policy:?}: reopening ({} pending deliveries) took {:?}",
        rec.sessions.iter().map(|s| s.pending.len()).sum::<usize>(),
        t.elapsed()
    );
    store.close().await.unwrap();
}

/// Latency of lone commits; with `backlog` messages queued first and a small compaction
/// threshold, so that background compactions of that backlog run during the measurement.
async fn latency(policy: FsyncPolicy, n: u64, backlog: u64) {
    let dir = bench_dir();
    let compact_after_bytes = if backlog > 0 {
        1 << 20
    } else {
        StoreConfig::default().compact_after_bytes
    };
    let (store, client) = open_with(
        dir.path(),
        StoreConfig {
            fsync: policy,
            compact_after_bytes,
            ..StoreConfig::default()
        },
    )
    .await;
    let msg = message();
    let mut pending = VecDeque::new();
    for id in 1..=backlog {
        pending.push_back(
            store
                .submit(vec![enqueue(id, &msg, &client)])
                .await
                .unwrap(),
        );
        if pending.len() >= 512 {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for c in pending {
        c.await.unwrap();
    }
    let before = store.stats();
    let mut lat = Vec::with_capacity(n as usize);
    for id in backlog + 1..=backlog + n {
        let t = Instant::now();
        store
            .submit(vec![enqueue(id, &msg, &client), dequeue(id, &client)])
            .await
            .unwrap()
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "{policy:?}: lone commit latency over {n} ({backlog} messages queued, {} background compactions meanwhile): mean {mean:?}, p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        store.stats().compactions - before.compactions,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    store.close().await.unwrap();
}

fn dequeue(id: u64, client: &Arc<str>) -> StoreOp {
    StoreOp::Dequeue {
        tenant: TenantId::default(),
        client_id: client.clone(),
        message_id: id,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments: ops tasks window"))
        .collect();
    let ops = args.first().copied().unwrap_or(200_000);
    let tasks = args.get(1).copied().unwrap_or(8).max(1);
    let window = args.get(2).copied().unwrap_or(64).max(1) as usize;
    println!(
        "{ops} Enqueue ops (100-byte payload, 1 recipient), {tasks} tasks, {window} outstanding commits per task"
    );
    throughput(FsyncPolicy::Never, ops, tasks, window).await;
    throughput(FsyncPolicy::Always, ops, tasks, window).await;
    latency(FsyncPolicy::Never, 20_000, 0).await;
    latency(FsyncPolicy::Always, 2_000, 0).await;
    latency(FsyncPolicy::Never, 50_000, 200_000).await;
}
