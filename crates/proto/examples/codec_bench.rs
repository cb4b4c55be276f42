//! Micro-benchmark of the MQTT codec's hot path: decode and encode of QoS 1 PUBLISH packets.
//!
//! Run with `cargo run --release -p ferrohub-proto --example codec_bench [seconds-per-case [op]]`
//! where `op` (`decode` or `encode`) restricts the run, e.g. for profiling.
//! Decoding is timed from a filled read buffer to dropped packets (topic allocation, payload
//! slicing and freeing included); encoding from packet to bytes in a reused buffer.

#![allow(clippy::expect_used)] // A benchmark harness: a codec error is a bug to stop on.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{
    Packet, ProtocolVersion, Publish, PublishProperties, decode, encode, encoded_len,
};
use ferrohub_types::QoS;

/// Packets per batch: large enough that per-batch overhead vanishes, small enough for the cache
/// not to be the whole story at 1 KiB (about 10 MB per batch).
const BATCH: usize = 10_000;

fn publish(payload: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Arc::from("site-7/building-2/floor-3/room-12/temperature"),
        packet_id: 42,
        properties: PublishProperties::default(),
        payload: Bytes::from(vec![0xA5; payload]),
    })
}

struct Rate {
    packets_per_sec: f64,
    bytes_per_sec: f64,
}

/// The rate of the median batch: robust against other processes stealing the CPU.
fn rate(mut batches: Vec<Duration>, batch_bytes: usize) -> Rate {
    batches.sort();
    let secs = batches[batches.len() / 2].as_secs_f64();
    Rate {
        packets_per_sec: BATCH as f64 / secs,
        bytes_per_sec: batch_bytes as f64 / secs,
    }
}

fn bench_decode(p: &Packet, version: ProtocolVersion, budget: Duration) -> Rate {
    let mut wire = BytesMut::new();
    for _ in 0..BATCH {
        encode(p, version, &mut wire).expect("encodable");
    }
    let (mut batches, mut elapsed) = (Vec::new(), Duration::ZERO);
    while elapsed < budget {
        // The copy stands for the socket read and is not timed.
        let mut buf = BytesMut::from(&wire[..]);
        let start = Instant::now();
        while let Some(packet) = decode(&mut buf, version, usize::MAX).expect("valid") {
            black_box(packet);
        }
        let took = start.elapsed();
        elapsed += took;
        batches.push(took);
    }
    rate(batches, wire.len())
}

fn bench_encode(p: &Packet, version: ProtocolVersion, budget: Duration) -> Rate {
    let size = encoded_len(p, version).expect("encodable");
    let mut buf = BytesMut::with_capacity(size * BATCH);
    let (mut batches, mut elapsed) = (Vec::new(), Duration::ZERO);
    while elapsed < budget {
        buf.clear();
        let start = Instant::now();
        for _ in 0..BATCH {
            encode(black_box(p), version, &mut buf).expect("encodable");
        }
        let took = start.elapsed();
        black_box(&buf);
        elapsed += took;
        batches.push(took);
    }
    rate(batches, size * BATCH)
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let budget = Duration::from_secs_f64(secs);
    let only = std::env::args().nth(2);
    let wanted = |op: &str| only.as_deref().is_none_or(|o| o == op);
    println!(
        "{:<8} {:>8} {:>6} {:>7} {:>12} {:>8}",
        "version", "payload", "wire", "op", "Mpackets/s", "GB/s"
    );
    for (version, name) in [
        (ProtocolVersion::V311, "3.1.1"),
        (ProtocolVersion::V5, "5.0"),
    ] {
        for payload in [100, 1024] {
            let p = publish(payload);
            let wire = encoded_len(&p, version).expect("encodable");
            for op in ["decode", "encode"].into_iter().filter(|op| wanted(op)) {
                let r = if op == "decode" {
                    bench_decode(&p, version, budget)
                } else {
                    bench_encode(&p, version, budget)
                };
                println!(
                    "{name:<8} {payload:>8} {wire:>6} {op:>7} {:>12.2} {:>8.2}",
                    r.packets_per_sec / 1e6,
                    r.bytes_per_sec / 1e9
                );
            }
        }
    }
}
