//! Ferrohub's MQTT codec (`ferrohub-proto`) against `mqtt-protocol-core`, QoS 1 PUBLISH only.
//!
//! See README.md. Prints a Markdown table to stdout.

use std::hint::black_box;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{self as fh, Packet, ProtocolVersion, Publish, PublishProperties};
use ferrohub_types::QoS;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::connection::{PacketBuildResult, PacketBuilder, PacketData};
use mqtt_protocol_core::mqtt::packet::{Qos, v3_1_1, v5_0};
use mqtt_protocol_core::mqtt::result_code::MqttError;

const N: usize = 100_000;
const REPS: usize = 7;
/// 20 bytes.
const TOPIC: &str = "sensors/room-17/temp";
const MAX_PACKET: usize = 1 << 20;

fn pid(i: usize) -> u16 {
    (i % 65_535) as u16 + 1
}

// ---------------------------------------------------------------- ferrohub-proto

fn fh_packets(payload: &Bytes) -> Vec<Packet> {
    let topic: Arc<str> = Arc::from(TOPIC);
    (0..N)
        .map(|i| {
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: pid(i),
                properties: PublishProperties::default(),
                payload: payload.clone(),
            })
        })
        .collect()
}

fn fh_encode_all(pkts: &[Packet], v: ProtocolVersion, out: &mut BytesMut) {
    out.clear();
    for p in pkts {
        fh::encode(black_box(p), v, out).expect("ferrohub encode");
    }
    black_box(&out[..]);
}

/// Decodes every packet in `buf`; returns the count.
fn fh_decode_all(mut buf: BytesMut, v: ProtocolVersion) -> usize {
    let mut n = 0;
    while let Some(p) = fh::decode(&mut buf, v, MAX_PACKET).expect("ferrohub decode") {
        black_box(&p);
        n += 1;
    }
    n
}

// ---------------------------------------------------------------- mqtt-protocol-core

/// The two version-specific PUBLISH types of mqtt-protocol-core behind one interface, so the
/// benchmark loops are monomorphised per version (no per-packet branching).
trait MpcPub: Sized {
    fn build(pid: u16, payload: Arc<[u8]>) -> Self;
    fn parse(flags: u8, body: Arc<[u8]>) -> Result<(Self, usize), MqttError>;
    fn bufs(&self) -> Vec<IoSlice<'_>>;
    fn continuous(&self) -> Vec<u8>;
    fn topic(&self) -> &str;
    fn pid(&self) -> Option<u16>;
    fn payload(&self) -> &[u8];
}

macro_rules! impl_mpc {
    ($m:ident) => {
        impl MpcPub for $m::Publish {
            fn build(pid: u16, payload: Arc<[u8]>) -> Self {
                $m::Publish::builder()
                    .topic_name(TOPIC)
                    .expect("topic")
                    .qos(Qos::AtLeastOnce)
                    .packet_id(pid)
                    .payload(payload)
                    .build()
                    .expect("mpc build")
            }
            fn parse(flags: u8, body: Arc<[u8]>) -> Result<(Self, usize), MqttError> {
                $m::Publish::parse(flags, body)
            }
            fn bufs(&self) -> Vec<IoSlice<'_>> {
                self.to_buffers()
            }
            fn continuous(&self) -> Vec<u8> {
                self.to_continuous_buffer()
            }
            fn topic(&self) -> &str {
                self.topic_name()
            }
            fn pid(&self) -> Option<u16> {
                self.packet_id()
            }
            fn payload(&self) -> &[u8] {
                $m::Publish::payload(self).as_slice()
            }
        }
    };
}
impl_mpc!(v3_1_1);
impl_mpc!(v5_0);

fn mpc_packets<P: MpcPub>(payload: &Arc<[u8]>) -> Vec<P> {
    (0..N).map(|i| P::build(pid(i), payload.clone())).collect()
}

/// Serialises via `to_buffers()` (the crate's vectored-write form), copying the slices into `out`.
fn mpc_encode_all<P: MpcPub>(pkts: &[P], out: &mut Vec<u8>) {
    out.clear();
    for p in pkts {
        for s in black_box(p).bufs() {
            out.extend_from_slice(&s);
        }
    }
    black_box(&out[..]);
}

/// Serialises via `to_continuous_buffer()` (one fresh Vec per packet), appended to `out`.
fn mpc_encode_all_cont<P: MpcPub>(pkts: &[P], out: &mut Vec<u8>) {
    out.clear();
    for p in pkts {
        out.extend_from_slice(&black_box(p).continuous());
    }
    black_box(&out[..]);
}

/// Frames with the crate's `PacketBuilder` (what `Connection::recv` uses) and parses each body
/// with `Publish::parse`; returns the packets via `f`.
fn mpc_decode_each<P: MpcPub>(data: &[u8], mut f: impl FnMut(P)) -> usize {
    let mut pb = PacketBuilder::new();
    let mut cur = Cursor::new(data);
    let mut n = 0;
    loop {
        match pb.feed(&mut cur) {
            PacketBuildResult::Complete(raw) => {
                assert!(raw.is_publish());
                let flags = raw.flags();
                let PacketData::Publish(body) = raw.data else { panic!("not a PUBLISH body") };
                let (p, _consumed) = P::parse(flags, body).expect("mpc parse");
                f(p);
                n += 1;
            }
            PacketBuildResult::Incomplete => {
                if cur.position() as usize == data.len() {
                    break;
                }
            }
            PacketBuildResult::Error(e) => panic!("mpc framing error: {e:?}"),
        }
    }
    n
}

fn mpc_decode_all<P: MpcPub>(data: &[u8]) -> usize {
    mpc_decode_each::<P>(data, |p| {
        black_box(&p);
    })
}

/// Splits `data` into (flags, body) pairs outside the timed region, for the parse-only row.
fn mpc_preframe(data: &[u8]) -> Vec<(u8, Arc<[u8]>)> {
    let mut pb = PacketBuilder::new();
    let mut cur = Cursor::new(data);
    let mut out = Vec::with_capacity(N);
    while let PacketBuildResult::Complete(raw) = pb.feed(&mut cur) {
        let flags = raw.flags();
        let PacketData::Publish(body) = raw.data else { panic!("not a PUBLISH body") };
        out.push((flags, body));
    }
    out
}

fn mpc_parse_only<P: MpcPub>(framed: &[(u8, Arc<[u8]>)]) -> usize {
    let mut n = 0;
    for (flags, body) in framed {
        let (p, _) = P::parse(*flags, body.clone()).expect("mpc parse");
        black_box(&p);
        n += 1;
    }
    n
}

// ---------------------------------------------------------------- harness

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default()
}

struct Row {
    ver: &'static str,
    payload: usize,
    wire: usize,
    op: &'static str,
    mpc_api: &'static str,
    fh_s: f64,
    mpc_s: f64,
}

/// Checks both directions: ferrohub bytes → mpc packets, mpc bytes → ferrohub packets.
/// Returns notes on any discrepancy (empty if none).
fn verify<P: MpcPub>(
    v: ProtocolVersion,
    payload: &[u8],
    fh_bytes: &[u8],
    mpc_bytes: &[u8],
    mpc_cont_bytes: &[u8],
) -> Vec<String> {
    let mut notes = Vec::new();
    if fh_bytes != mpc_bytes {
        notes.push(format!(
            "{v:?}/{}B: encoders differ byte-wise (ferrohub {} B, mpc {} B)",
            payload.len(),
            fh_bytes.len(),
            mpc_bytes.len()
        ));
    }
    if mpc_bytes != mpc_cont_bytes {
        notes.push(format!("{v:?}/{}B: mpc to_buffers != to_continuous_buffer", payload.len()));
    }
    // ferrohub-encoded → mqtt-protocol-core
    let mut i = 0;
    let mut bad = 0;
    let n = mpc_decode_each::<P>(fh_bytes, |p| {
        if p.topic() != TOPIC || p.pid() != Some(pid(i)) || p.payload() != payload {
            bad += 1;
        }
        i += 1;
    });
    if n != N || bad != 0 {
        notes.push(format!("{v:?}/{}B: mpc decoded ferrohub bytes: {n} packets, {bad} mismatched", payload.len()));
    }
    // mqtt-protocol-core-encoded → ferrohub
    let mut buf = BytesMut::from(mpc_bytes);
    let (mut n, mut bad) = (0, 0);
    loop {
        match fh::decode(&mut buf, v, MAX_PACKET) {
            Ok(Some(Packet::Publish(p))) => {
                if &*p.topic != TOPIC
                    || p.packet_id != pid(n)
                    || p.qos != QoS::AtLeastOnce
                    || &p.payload[..] != payload
                {
                    bad += 1;
                }
                n += 1;
            }
            Ok(Some(other)) => {
                notes.push(format!("{v:?}: ferrohub decoded a non-PUBLISH: {other:?}"));
                break;
            }
            Ok(None) => break,
            Err(e) => {
                notes.push(format!("{v:?}/{}B: ferrohub cannot decode mpc bytes: {e}", payload.len()));
                break;
            }
        }
    }
    if n != N || bad != 0 || !buf.is_empty() {
        notes.push(format!(
            "{v:?}/{}B: ferrohub decoded mpc bytes: {n} packets, {bad} mismatched, {} bytes left",
            payload.len(),
            buf.len()
        ));
    }
    notes
}

fn run_case<P: MpcPub>(v: ProtocolVersion, ver: &'static str, plen: usize, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let payload_vec: Vec<u8> = (0..plen).map(|i| (i * 31 % 251) as u8).collect();
    let fh_payload = Bytes::from(payload_vec.clone());
    let mpc_payload: Arc<[u8]> = Arc::from(payload_vec.clone());

    let fh_pkts = fh_packets(&fh_payload);
    let mpc_pkts: Vec<P> = mpc_packets(&mpc_payload);

    let mut fh_out = BytesMut::new();
    fh_encode_all(&fh_pkts, v, &mut fh_out);
    let mut mpc_out = Vec::new();
    mpc_encode_all(&mpc_pkts, &mut mpc_out);
    let mut mpc_cont = Vec::new();
    mpc_encode_all_cont(&mpc_pkts, &mut mpc_cont);

    notes.extend(verify::<P>(v, &payload_vec, &fh_out, &mpc_out, &mpc_cont));

    let wire = fh_out.len() / N;
    let encoded: Vec<u8> = fh_out.to_vec();
    let framed = mpc_preframe(&encoded);
    assert_eq!(framed.len(), N);

    let (mut t_fh_dec, mut t_mpc_dec, mut t_mpc_parse) = (vec![], vec![], vec![]);
    let (mut t_fh_enc, mut t_mpc_enc, mut t_mpc_enc_cont) = (vec![], vec![], vec![]);
    // One warm-up round (index 0, discarded), then REPS measured; libraries interleaved per
    // round so that load changes on the shared machine hit both alike.
    for rep in 0..=REPS {
        // Copy outside the timed region. `guard` is an empty handle on the same allocation, so
        // the input buffer is freed after the clock stops (as mqtt-protocol-core's input slice
        // is never freed inside its timed region either).
        let mut input = BytesMut::from(&encoded[..]);
        let guard = input.split_off(input.len());
        let t = Instant::now();
        let n = fh_decode_all(black_box(input), v);
        let d_fh_dec = t.elapsed().as_secs_f64();
        assert_eq!(n, N);
        drop(guard);

        let t = Instant::now();
        let n = mpc_decode_all::<P>(black_box(&encoded));
        let d_mpc_dec = t.elapsed().as_secs_f64();
        assert_eq!(n, N);

        let t = Instant::now();
        let n = mpc_parse_only::<P>(black_box(&framed));
        let d_mpc_parse = t.elapsed().as_secs_f64();
        assert_eq!(n, N);

        let t = Instant::now();
        fh_encode_all(black_box(&fh_pkts), v, &mut fh_out);
        let d_fh_enc = t.elapsed().as_secs_f64();

        let t = Instant::now();
        mpc_encode_all(black_box(&mpc_pkts), &mut mpc_out);
        let d_mpc_enc = t.elapsed().as_secs_f64();

        let t = Instant::now();
        mpc_encode_all_cont(black_box(&mpc_pkts), &mut mpc_cont);
        let d_mpc_enc_cont = t.elapsed().as_secs_f64();

        if rep > 0 {
            t_fh_dec.push(d_fh_dec);
            t_mpc_dec.push(d_mpc_dec);
            t_mpc_parse.push(d_mpc_parse);
            t_fh_enc.push(d_fh_enc);
            t_mpc_enc.push(d_mpc_enc);
            t_mpc_enc_cont.push(d_mpc_enc_cont);
        }
    }
    let (fh_dec, fh_enc) = (median(t_fh_dec), median(t_fh_enc));
    let mk = |op, mpc_api, fh_s, mpc_s| Row { ver, payload: plen, wire, op, mpc_api, fh_s, mpc_s };
    rows.push(mk("decode", "PacketBuilder::feed + Publish::parse", fh_dec, median(t_mpc_dec)));
    rows.push(mk("decode (mpc parse only*)", "Publish::parse on pre-framed Arc body", fh_dec, median(t_mpc_parse)));
    rows.push(mk("encode", "to_buffers() → copy into reused Vec", fh_enc, median(t_mpc_enc)));
    rows.push(mk("encode", "to_continuous_buffer() → copy into reused Vec", fh_enc, median(t_mpc_enc_cont)));
}

fn fmt_rate(pps: f64) -> String {
    format!("{:.2} M", pps / 1e6)
}

fn main() {
    let load_start = loadavg();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for plen in [100usize, 1024] {
        run_case::<v3_1_1::Publish>(ProtocolVersion::V311, "3.1.1", plen, &mut rows, &mut notes);
        run_case::<v5_0::Publish>(ProtocolVersion::V5, "5.0", plen, &mut rows, &mut notes);
    }
    let load_end = loadavg();

    println!("## ferrohub-proto vs mqtt-protocol-core {}: QoS 1 PUBLISH\n", mpc_version());
    println!(
        "N = {N} packets per repetition, median of {REPS} (after 1 warm-up), topic `{TOPIC}` ({} B), \
         packet ids 1..=65535 cycling. GB/s = wire bytes / s (10^9). \
         Ratio = ferrohub pkt/s ÷ mqtt-protocol-core pkt/s (> 1: ferrohub faster).\n",
        TOPIC.len()
    );
    println!(
        "| MQTT | payload | wire B/pkt | op | mqtt-protocol-core API | ferrohub pkt/s | ferrohub GB/s | mpc pkt/s | mpc GB/s | ferrohub/mpc |"
    );
    println!("|---|---:|---:|---|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (fp, mp) = (N as f64 / r.fh_s, N as f64 / r.mpc_s);
        let bytes = (N * r.wire) as f64;
        println!(
            "| {} | {} B | {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.2}× |",
            r.ver,
            r.payload,
            r.wire,
            r.op,
            r.mpc_api,
            fmt_rate(fp),
            bytes / r.fh_s / 1e9,
            fmt_rate(mp),
            bytes / r.mpc_s / 1e9,
            fp / mp
        );
    }
    println!(
        "\n\\* parse-only excludes mqtt-protocol-core's framing and its per-packet body copy into a new \
         `Arc<[u8]>`; the ferrohub figure in that row is still its full decode (framing included)."
    );
    println!("\nCorrectness (checked before timing, all {N} packets per case, both directions):");
    if notes.is_empty() {
        println!("- all OK: both encoders produce identical bytes; each library decodes the other's output to the same topic, packet id, QoS and payload.");
    } else {
        for n in &notes {
            println!("- {n}");
        }
    }
    println!(
        "\nload average (/proc/loadavg) at start: `{load_start}`, at end: `{load_end}`; wall time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Keep in step with Cargo.toml / Cargo.lock.
fn mpc_version() -> &'static str {
    "0.7.9"
}
