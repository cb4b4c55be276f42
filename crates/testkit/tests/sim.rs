//! `ferrohub sim` against a real hub in-process: a bounded run over MQTT 5 and 3.1.1 delivers
//! exactly the expected messages, the hub's telemetry engine holds exactly the expected points
//! (the same values the generators compute offline), runs stop by their duration or the caller's
//! shutdown, credentials are passed, and a run where no device connects is an error. With chaos,
//! devices that drop their connections reconnect and deliver every message that was not lost on
//! purpose, and misbehaving devices get the hub's 0x99 answers while the others are unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::stored_points;
use ferrohub_sim::sim::profile::{self, Overrides};
use ferrohub_sim::sim::{self, DeviceSim, RunArgs, SimArgs, SimCommand, Summary};
use ferrohub_testkit::TestHub;
use ferrohub_types::telemetry::Value as HubValue;

/// Every test gives up after this long instead of hanging.
const BOUND: Duration = Duration::from_secs(60);

fn args(addr: SocketAddr, flags: &str) -> RunArgs {
    common::sim_args(addr, flags)
}

async fn run(a: &RunArgs) -> Summary {
    common::try_sim_run(a, BOUND).await.unwrap()
}

async fn hub_counter(hub: &TestHub, name: &str) -> f64 {
    let body = reqwest::get(format!("http://{}/metrics", hub.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn to_hub(v: &sim::Value) -> HubValue {
    match v {
        sim::Value::Float(f) => HubValue::Float(*f),
        sim::Value::Int(i) => HubValue::Int(*i),
        sim::Value::Bool(b) => HubValue::Bool(*b),
        sim::Value::Str(s) => HubValue::Str(s.to_string()),
    }
}

/// Checks that `device` stored exactly `samples` samples of every metric of `profile`, with the
/// values the generator computes offline for the same seed, index and first timestamp.
fn check_device(hub: &TestHub, profile: &str, seed: u64, index: u64, device: &str, samples: usize) {
    let p = Arc::new(profile::load(profile, &Overrides::default()).unwrap());
    let names: Vec<String> = p.metric_names().map(String::from).collect();
    let first = stored_points(hub, device, &names[0]);
    assert_eq!(first.len(), samples, "{device} {}: {first:?}", names[0]);
    // The interval of the run (the test overrides it) from the stored timestamps.
    let step = first[1].0 - first[0].0;
    let mut p2 = (*p).clone();
    p2.interval = Duration::from_millis(step as u64);
    let mut sim = DeviceSim::new(Arc::new(p2), seed, index, first[0].0);
    let expected: Vec<_> = (0..samples).map(|_| sim.next_sample()).collect();
    for (m, name) in names.iter().enumerate() {
        let stored = stored_points(hub, device, name);
        let want: Vec<(i64, HubValue)> = expected
            .iter()
            .map(|s| (s.ts_ms, to_hub(&s.values[m])))
            .collect();
        assert_eq!(stored, want, "{device} {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_runs_deliver_exactly_the_expected_points() {
    let hub = TestHub::start().await.unwrap();
    // MQTT 5, JSON, one sample per message: 20 devices × 5 messages.
    let s5 = run(&args(
        hub.mqtt,
        "--protocol v5 --qos 1 --devices 20 --prefix s5 --messages-per-device 5 \
        --interval 20ms --connect-rate 0 --profile environment --seed 7",
    ))
    .await;
    assert_eq!(
        (s5.devices, s5.connected, s5.failed_connects),
        (20, 20, 0),
        "{s5:?}"
    );
    assert_eq!((s5.messages_sent, s5.messages_acked), (100, 100), "{s5:?}");
    assert_eq!((s5.errors, s5.samples_sent), (0, 100), "{s5:?}");
    assert_eq!(s5.protocol, "5.0");
    assert!(s5.latency_p50_ms > 0.0 && s5.latency_p99_ms >= s5.latency_p50_ms);
    assert!(s5.first_error.is_none());
    // Chaos off: no reconnects, no chaos actions, no error answers.
    assert_eq!((s5.reconnects, s5.reconnect_failures), (0, 0), "{s5:?}");
    assert!(s5.chaos.is_empty() && s5.answers.is_empty(), "{s5:?}");

    // MQTT 3.1.1, MessagePack (no content type: the hub detects it), batches of two samples,
    // devices 100..119 of a fleet.
    let s3 = run(&args(
        hub.mqtt,
        "--protocol v3 --qos 1 --devices 20 --first-index 100 --prefix s3 \
        --messages-per-device 5 --interval 10ms --batch 2 --format msgpack \
        --profile environment --seed 7",
    ))
    .await;
    assert_eq!(
        (s3.connected, s3.messages_acked, s3.errors),
        (20, 100, 0),
        "{s3:?}"
    );
    assert_eq!(
        (s3.first_index, s3.samples_sent, s3.protocol.as_str()),
        (100, 200, "3.1.1")
    );

    // The engine holds exactly what the generators compute offline.
    for i in [0, 7, 19] {
        check_device(&hub, "environment", 7, i, &format!("s5-{i}"), 5);
    }
    for i in [100, 113] {
        check_device(&hub, "environment", 7, i, &format!("s3-{i}"), 10);
    }
    // And nothing else: 200 messages, 3 metrics × (100 + 200) samples.
    let total: usize = (0..20)
        .map(|i| stored_points(&hub, &format!("s5-{i}"), "humidity").len())
        .chain((100..120).map(|i| stored_points(&hub, &format!("s3-{i}"), "humidity").len()))
        .sum();
    assert_eq!(total, 300);
    assert_eq!(
        hub_counter(&hub, "ferrohub_telemetry_messages_total").await,
        200.0
    );
    assert_eq!(
        hub_counter(&hub, "ferrohub_telemetry_points_total").await,
        900.0
    );
    assert_eq!(
        hub_counter(&hub, "ferrohub_telemetry_invalid_total").await,
        0.0
    );
    assert_eq!(
        hub_counter(&hub, "ferrohub_telemetry_timestamps_replaced_total").await,
        0.0
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_profiles_in_cbor_reach_the_engine() {
    let hub = TestHub::start().await.unwrap();
    let s = run(&args(
        hub.mqtt,
        "--devices 12 --prefix mix --messages-per-device 3 --interval 10ms \
        --format cbor --connect-rate 200 --profile gps-tracker:1 --profile \
        smart-meter:1 --profile rotating-machine:1 --profile cold-chain:1 \
        --set bearing_fault_after=0s",
    ))
    .await;
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (12, 36, 0),
        "{s:?}"
    );
    assert_eq!(s.profiles.values().sum::<u64>(), 12);
    assert_eq!(s.profiles.len(), 4, "{:?}", s.profiles);
    let mix = sim::Mix::load(
        &[
            "gps-tracker:1".to_string(),
            "smart-meter:1".to_string(),
            "rotating-machine:1".to_string(),
            "cold-chain:1".to_string(),
        ],
        &Overrides::default(),
    )
    .unwrap();
    for i in 0..12u64 {
        let p = mix.pick(i);
        for name in p.metric_names() {
            assert_eq!(
                stored_points(&hub, &format!("mix-{i}"), name).len(),
                3,
                "mix-{i} ({}) {name}",
                p.name
            );
        }
    }
    // Booleans and strings are stored as such.
    let gps = (0..12)
        .find(|i| mix.pick(*i).name == "gps-tracker")
        .unwrap();
    let inside = stored_points(&hub, &format!("mix-{gps}"), "in_depot");
    assert!(inside.iter().all(|(_, v)| matches!(v, HubValue::Bool(_))));
    let cold = (0..12).find(|i| mix.pick(*i).name == "cold-chain").unwrap();
    let state = stored_points(&hub, &format!("mix-{cold}"), "unit_state");
    assert!(state.iter().all(|(_, v)| matches!(v, HubValue::Str(_))));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stop_by_duration_or_shutdown() {
    let hub = TestHub::start().await.unwrap();
    // QoS 0, bounded by time only.
    let t0 = std::time::Instant::now();
    let s = run(&args(
        hub.mqtt,
        "--devices 5 --prefix dur --qos 0 --interval 50ms --duration 1s",
    ))
    .await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (5, 0, 0),
        "{s:?}"
    );
    // About 20 messages per device in a second (minus the phase), and no more.
    assert!((50..=105).contains(&s.messages_sent), "{s:?}");
    assert!(!s.interrupted);

    // Unbounded: the caller's shutdown future stops it, and every acknowledged message counts.
    let unbounded = args(hub.mqtt, "--devices 5 --prefix sig --interval 20ms");
    let s = tokio::time::timeout(
        BOUND,
        sim::run_args(&unbounded, tokio::time::sleep(Duration::from_millis(800))),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.errors, 0, "{s:?}");
    assert_eq!(s.messages_acked, s.messages_sent);
    assert!(s.messages_sent > 20, "{s:?}");
    hub.stop().await;
}

/// Established connections to `port` by local (source) IPv4 address, from /proc/net/tcp (read
/// while it changes, it may list a socket twice: counted once by its local address and port).
fn connections_by_source(port: u16) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let mut sockets = std::collections::BTreeSet::new();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let port_of = |a: &str| u16::from_str_radix(a.split(':').nth(1).unwrap_or(""), 16).ok();
        if *state != "01" || port_of(remote) != Some(port) || !sockets.insert(local.to_string()) {
            continue;
        }
        // Addresses are little-endian hex: 0200007F is 127.0.0.2.
        let ip = u32::from_str_radix(local.split(':').next().unwrap_or(""), 16).unwrap_or(0);
        let ip = std::net::Ipv4Addr::from(ip.swap_bytes());
        *out.entry(ip.to_string()).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_from_the_source_addresses_in_turn() {
    let hub = TestHub::start().await.unwrap();
    let a = args(
        hub.mqtt,
        "--devices 6 --prefix src --interval 50ms --source-address 127.0.0.2 \
         --source-address 127.0.0.3 --connect-rate 0 --no-twin --no-commands",
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        sim::run_args(&a, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = connections_by_source(hub.mqtt.port());
        if seen.values().sum::<usize>() >= 6
            && hub_counter(&hub, "ferrohub_mqtt_connections").await >= 6.0
        {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop_tx.send(());
    let s = tokio::time::timeout(BOUND, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.get("127.0.0.2"), Some(&3), "{seen:?}");
    assert_eq!(seen.get("127.0.0.3"), Some(&3), "{seen:?}");
    assert_eq!((s.connected, s.errors), (6, 0), "{s:?}");
    // An address this machine does not have is a clear connect error.
    let bad = run(&args(
        hub.mqtt,
        "--devices 1 --prefix srcbad --messages-per-device 1 --source-address 192.0.2.1",
    ))
    .await;
    assert_eq!(bad.connected, 0);
    let e = bad.first_error.unwrap_or_default();
    assert!(e.contains("source address 192.0.2.1"), "{e}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_credentials_and_failed_connects() {
    let hub = TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.users.push(ferrohub::config::UserEntry {
            username: "simuser".into(),
            password: "s3cret".into(),
        });
    })
    .await
    .unwrap();
    let ok = run(&args(
        hub.mqtt,
        "--devices 3 --prefix cred --messages-per-device 2 --interval 10ms \
        --username simuser --password s3cret",
    ))
    .await;
    assert_eq!((ok.connected, ok.messages_acked), (3, 6), "{ok:?}");

    // A wrong password: every connect fails, the summary says why, and the command fails.
    let bad = args(
        hub.mqtt,
        "--devices 3 --prefix cred --messages-per-device 2 --username simuser \
        --password wrong --protocol v3",
    );
    let s = run(&bad).await;
    assert_eq!((s.connected, s.failed_connects), (0, 3), "{s:?}");
    let e = s.first_error.unwrap();
    assert!(e.contains("bad user name or password"), "{e}");
    let err = tokio::time::timeout(
        BOUND,
        sim::run_cli(
            SimArgs {
                command: SimCommand::Run(Box::new(bad)),
            },
            std::future::pending(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("no device connected"), "{err:#}");
    hub.stop().await;
}

#[tokio::test]
async fn nothing_listening_is_an_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = args(port, "--devices 2 --messages-per-device 1");
    let s = run(&a).await;
    assert_eq!((s.connected, s.failed_connects), (0, 2));
    assert!(s.first_error.unwrap().contains("connect"));

    // With retries, each device tries three times (backing off) before it gives up.
    let a = args(
        port,
        "--devices 2 --messages-per-device 1 --connect-retries 2 --reconnect-backoff 10ms..40ms",
    );
    let t0 = std::time::Instant::now();
    let s = run(&a).await;
    assert_eq!((s.connected, s.failed_connects, s.reconnects), (0, 2, 0));
    assert!(
        t0.elapsed() >= Duration::from_millis(15),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_disconnects_reconnect_and_deliver_every_message_not_lost() {
    let hub = TestHub::start().await.unwrap();
    let (devices, per_device, seed) = (6u64, 30u64, 3u64);
    let s = run(&args(
        hub.mqtt,
        &format!(
            "--devices {devices} --prefix cd --messages-per-device {per_device} --interval 50ms \
            --connect-rate 0 --seed {seed} --chaos-disconnect 60 --reconnect-backoff 20ms..200ms \
            --chaos-loss 0.1 --chaos-latency 1..5 --chaos-burst 5@300ms --chaos-clock-skew 2s"
        ),
    ))
    .await;
    let chaos = sim::chaos::Chaos {
        loss: 0.1,
        ..Default::default()
    };
    let lost: Vec<u64> = (0..devices)
        .map(|i| (0..per_device).filter(|m| chaos.lost(seed, i, *m)).count() as u64)
        .collect();
    let total_lost: u64 = lost.iter().sum();
    assert!(total_lost > 0);
    assert_eq!((s.connected, s.errors), (devices, 0), "{s:?}");
    let disconnects = s.chaos.get("disconnect").copied().unwrap_or(0);
    assert!(disconnects > 0, "{s:?}");
    assert_eq!(s.reconnects, disconnects, "{s:?}");
    assert_eq!(s.chaos.get("loss").copied(), Some(total_lost), "{s:?}");
    assert!(s.chaos.get("burst").copied().unwrap_or(0) > 0, "{s:?}");
    assert!(s.chaos.get("latency").copied().unwrap_or(0) > 0, "{s:?}");
    assert_eq!(s.messages_sent, devices * per_device - total_lost, "{s:?}");
    assert_eq!(s.messages_acked, s.messages_sent, "{s:?}");
    for i in 0..devices {
        let stored = stored_points(&hub, &format!("cd-{i}"), "humidity");
        assert_eq!(stored.len() as u64, per_device - lost[i as usize], "cd-{i}");
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_devices_meet_the_hubs_protections_and_others_are_unaffected() {
    let hub = TestHub::start().await.unwrap();
    let (devices, per_device, seed, fraction) = (10u64, 20u64, 5u64, 0.5);
    let s = run(&args(
        hub.mqtt,
        &format!(
            "--devices {devices} --prefix mb --messages-per-device {per_device} --interval 20ms \
            --connect-rate 0 --seed {seed} --chaos-misbehave {fraction} \
            --reconnect-backoff 20ms..200ms"
        ),
    ))
    .await;
    let bad: Vec<u64> = (0..devices)
        .filter(|i| sim::chaos::misbehaves(fraction, seed, *i))
        .collect();
    assert!(!bad.is_empty() && bad.len() < devices as usize, "{bad:?}");
    assert_eq!(s.connected, devices, "{s:?}");
    assert!(s.chaos.get("malformed").copied().unwrap_or(0) > 0, "{s:?}");
    assert!(
        s.answers.get("PUBACK 0x99").copied().unwrap_or(0) > 0,
        "{s:?}"
    );
    // An oversized payload makes the hub close the connection (0x95); the device reconnects.
    if s.chaos.contains_key("oversized") {
        assert!(
            s.answers.get("DISCONNECT 0x95").copied().unwrap_or(0) > 0,
            "{s:?}"
        );
        assert!(s.reconnects > 0, "{s:?}");
    }
    // Well-behaved devices: every point stored.
    for i in (0..devices).filter(|i| !bad.contains(i)) {
        let stored = stored_points(&hub, &format!("mb-{i}"), "humidity");
        assert_eq!(stored.len() as u64, per_device, "mb-{i}: {s:?}");
    }
    // Every regular message is acknowledged or counted as unacknowledged, never both.
    assert_eq!(
        s.messages_acked + s.refused + s.unacked,
        s.messages_sent,
        "{s:?}"
    );
    assert!(hub_counter(&hub, "ferrohub_telemetry_invalid_total").await > 0.0);
    hub.stop().await;
}
