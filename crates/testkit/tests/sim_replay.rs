//! `ferrohub sim replay` against real hubs in-process: a wide CSV replayed into hub A, exported
//! by A as CSV (and Parquet), and the export replayed into hub B (and C) gives exactly A's points
//! (values, kinds and timestamps, read back through the HTTP API); `--speed` scales the pace, `--shift-to-now` moves
//! the timestamps, `--loop` continues the timeline; a device whose connection is taken over
//! reconnects, sends again what was in flight, and sends the rest; bad rows are skipped or fail with `--strict`; a replay that
//! sends nothing is an error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrohub_sim::sim::replay::{self, ReplaySummary};
use ferrohub_sim::sim::{self, ReplayArgs, SimArgs, SimCommand};
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub};
use serde_json::{Value as Json, json};

/// Every test gives up after this long instead of hanging.
const BOUND: Duration = Duration::from_secs(120);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// RFC 3339 UTC with milliseconds (H. Hinnant's civil_from_days).
fn rfc3339(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// `ferrohub sim replay` arguments against `addr`; `flags` is split at whitespace.
fn args(addr: SocketAddr, files: &[&Path], flags: &str) -> ReplayArgs {
    let port = addr.port().to_string();
    let mut v: Vec<String> = vec![
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port,
        "--no-progress".into(),
    ];
    v.extend(flags.split_whitespace().map(String::from));
    v.extend(files.iter().map(|f| f.display().to_string()));
    ReplayArgs::try_parse_from(v).unwrap()
}

async fn replay(a: &ReplayArgs) -> anyhow::Result<ReplaySummary> {
    tokio::time::timeout(BOUND, replay::replay_args(a, std::future::pending()))
        .await
        .expect("the replay did not stop by itself")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn api(hub: &TestHub, method: reqwest::Method, path: &str, body: Option<Json>) -> Json {
    let mut req = client()
        .request(method, format!("{}{path}", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

/// A device's points of `metric` through the HTTP API: (ts, value as the API renders it).
async fn points(hub: &TestHub, device: &str, metric: &str) -> Vec<(i64, Json)> {
    let page = api(
        hub,
        reqwest::Method::GET,
        &format!(
            "/tenants/default/devices/{device}/telemetry/{metric}?from=0&to={}&limit=100000",
            now_ms() + 86_400_000 * 30
        ),
        None,
    )
    .await;
    page["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["ts"].as_i64().unwrap(), p["value"].clone()))
        .collect()
}

/// The metric names of a device, sorted.
async fn metrics(hub: &TestHub, device: &str) -> Vec<String> {
    let list = api(
        hub,
        reqwest::Method::GET,
        &format!("/tenants/default/devices/{device}/telemetry"),
        None,
    )
    .await;
    let mut m: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"].as_str().unwrap().to_string())
        .collect();
    m.sort();
    m
}

/// Exports the default tenant's telemetry of `[from, to)` as `format`; the file's path.
async fn export(hub: &TestHub, format: &str, from: i64, to: i64) -> PathBuf {
    let job = api(
        hub,
        reqwest::Method::POST,
        "/tenants/default/telemetry/exports",
        Some(json!({"destination": "rec", "format": format, "from": from, "to": to})),
    )
    .await;
    let path = format!("/tenants/default/telemetry/exports/{}", job["id"]);
    loop {
        let j = api(hub, reqwest::Method::GET, &path, None).await;
        if j["state"] != "running" {
            assert_eq!(j["state"], "succeeded", "{j}");
            return PathBuf::from(j["files"][0].as_str().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A recorded value and how the API shows it.
#[derive(Clone)]
enum V {
    F(f64),
    I(i64),
    B(bool),
    S(&'static str),
}

impl V {
    /// As a wide CSV cell (floats keep a decimal point or an exponent, strings are quoted).
    fn cell(&self) -> String {
        match self {
            V::F(f) => format!("{f:?}"),
            V::I(i) => i.to_string(),
            V::B(b) => b.to_string(),
            V::S(s) => format!("\"{}\"", s.replace('"', "\"\"")),
        }
    }

    fn json(&self) -> Json {
        match self {
            V::F(f) => json!(f),
            V::I(i) => json!(i),
            V::B(b) => json!(b),
            V::S(s) => json!(s),
        }
    }
}

const METRICS: [&str; 5] = ["temp", "count", "on", "state", "rare"];

/// Device `d`'s value of metric `m` in row `r` (`None`: an empty cell).
fn value(d: usize, r: usize, m: usize) -> Option<V> {
    let (d, r) = (d as i64, r as i64);
    match m {
        0 => Some(V::F(
            [21.37, 1e-7, 0.1 + 0.2, -40.0, 1e300][(r as usize) % 5] + d as f64,
        )),
        1 => Some(V::I(if r % 2 == 0 {
            i64::MAX - r - d
        } else {
            -r * 1000 - d
        })),
        2 => Some(V::B((r + d) % 3 == 0)),
        3 => Some(V::S(
            ["idle, \"really\"", "running", "état ✓"][(r as usize) % 3],
        )),
        _ => (r % 4 == 1).then_some(V::F(r as f64 * 0.5 + 0.25)),
    }
}

const DEVICES: usize = 3;
const ROWS: usize = 12;

/// Row `r`'s timestamp: irregular, to the millisecond.
fn row_ts(t0: i64, r: usize) -> i64 {
    t0 + r as i64 * 1_013 + (r as i64 * 37) % 11
}

/// A wide CSV of DEVICES × ROWS rows, timestamps alternately RFC 3339 and epoch milliseconds.
fn wide_csv(dir: &Path, t0: i64) -> PathBuf {
    let mut text = format!("ts,device,{}\n", METRICS.join(","));
    for r in 0..ROWS {
        for d in 0..DEVICES {
            let ts = row_ts(t0, r);
            let ts = if r % 2 == 0 {
                rfc3339(ts)
            } else {
                ts.to_string()
            };
            let cells: Vec<String> = (0..METRICS.len())
                .map(|m| value(d, r, m).map(|v| v.cell()).unwrap_or_default())
                .collect();
            text += &format!("{ts},rp-{d},{}\n", cells.join(","));
        }
    }
    let path = dir.join("wide.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// Checks that `hub` holds exactly the wide recording's points.
async fn check_hub(hub: &TestHub, t0: i64, shift: i64) {
    for d in 0..DEVICES {
        let device = format!("rp-{d}");
        let mut want_metrics: Vec<String> = METRICS.iter().map(|m| m.to_string()).collect();
        want_metrics.sort();
        assert_eq!(metrics(hub, &device).await, want_metrics, "{device}");
        for (m, name) in METRICS.iter().enumerate() {
            let want: Vec<(i64, Json)> = (0..ROWS)
                .filter_map(|r| value(d, r, m).map(|v| (row_ts(t0, r) + shift, v.json())))
                .collect();
            assert_eq!(points(hub, &device, name).await, want, "{device} {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_replayed_into_another_hub_gives_the_same_points() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let t0 = now_ms() - 3_600_000;
        let wide = wide_csv(dir.path(), t0);

        // Hub A: the wide recording, as recorded (backfill), as fast as acks allow.
        let a = TestHub::start().await.unwrap();
        let s = replay(&args(a.mqtt, &[&wide], "--speed max --json"))
            .await
            .unwrap();
        let messages = (DEVICES * ROWS) as u64;
        assert_eq!(
            (
                s.run.devices,
                s.run.connected,
                s.run.messages_sent,
                s.run.messages_acked
            ),
            (DEVICES as u64, DEVICES as u64, messages, messages),
            "{s:?}"
        );
        assert_eq!((s.run.errors, s.replay.bad_rows), (0, 0), "{s:?}");
        assert_eq!(s.replay.layouts, ["wide"]);
        assert_eq!((s.replay.first_ts, s.replay.shift_ms), (t0, 0));
        // --json: `sim run`'s fields and a `replay` object, read back the same.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["messages_sent"], json!(messages));
        assert_eq!(v["replay"]["rows"], json!(DEVICES * ROWS));
        let back: ReplaySummary = serde_json::from_value(v).unwrap();
        assert_eq!(
            (back.replay, back.run.messages_sent),
            (s.replay.clone(), messages)
        );
        let table = s.table();
        assert!(
            table.contains("messages sent") && table.contains("(0 bad, skipped; 1 runs merged)"),
            "{table}"
        );
        check_hub(&a, t0, 0).await;

        // A's export, sorted by series: one run per series, merged back into time order.
        let csv = export(&a, "csv", t0 - 1, t0 + 3_600_000).await;
        let text = std::fs::read_to_string(&csv).unwrap();
        assert!(
            text.starts_with("tenant,device,metric,ts,value,type\n"),
            "{text}"
        );

        // Hub B: the export, in CBOR.
        let b = TestHub::start().await.unwrap();
        let s = replay(&args(b.mqtt, &[&csv], "--speed max --format cbor"))
            .await
            .unwrap();
        assert_eq!(s.replay.layouts, ["export"]);
        assert_eq!(s.replay.runs, (DEVICES * METRICS.len()) as u64, "{s:?}");
        assert_eq!(
            (s.run.messages_sent, s.run.messages_acked, s.run.errors),
            (messages, messages, 0),
            "{s:?}"
        );
        check_hub(&b, t0, 0).await;
        // And B's points are A's, series by series.
        for d in 0..DEVICES {
            let device = format!("rp-{d}");
            for m in METRICS {
                assert_eq!(points(&a, &device, m).await, points(&b, &device, m).await);
            }
        }
        b.stop().await;

        // Hub C: A's Parquet export (converted to CSV on the fly).
        let parquet = export(&a, "parquet", t0 - 1, t0 + 3_600_000).await;
        let c = TestHub::start().await.unwrap();
        let s = replay(&args(c.mqtt, &[&parquet], "--speed max"))
            .await
            .unwrap();
        assert_eq!(s.replay.layouts, ["export"]);
        assert_eq!(
            (s.run.messages_sent, s.run.messages_acked, s.run.errors),
            (messages, messages, 0),
            "{s:?}"
        );
        check_hub(&c, t0, 0).await;
        a.stop().await;
        c.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A recording of one device: `n` rows `step` ms apart from 2026-01-01 (long ago: only
/// `--shift-to-now` makes the hub keep these timestamps).
fn paced_csv(dir: &Path, n: i64, step: i64) -> (PathBuf, i64) {
    let t0 = 1_767_225_600_000;
    let mut text = String::from("device,ts,v\n");
    for i in 0..n {
        text += &format!("pace,{},{i}\n", t0 + i * step);
    }
    let path = dir.join("paced.csv");
    std::fs::write(&path, text).unwrap();
    (path, t0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_scales_the_pace_and_shift_moves_the_timestamps() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start().await.unwrap();
        // 2 s recorded, replayed at 4×: about 0.5 s.
        let (path, t0) = paced_csv(dir.path(), 5, 500);
        let before = now_ms();
        let started = Instant::now();
        let s = replay(&args(
            hub.mqtt,
            &[&path],
            "--speed 4 --shift-to-now --format msgpack",
        ))
        .await
        .unwrap();
        let took = started.elapsed();
        let after = now_ms();
        assert!(
            took >= Duration::from_millis(300) && took <= Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!((s.run.messages_sent, s.run.messages_acked), (5, 5), "{s:?}");
        assert_eq!(s.replay.speed, "4x");
        let stored = points(&hub, "pace", "v").await;
        assert_eq!(stored.len(), 5, "{stored:?}");
        // The first record is at the start of the replay; the recorded gaps are kept.
        let first = stored[0].0;
        assert!(
            (before..=after).contains(&first),
            "{first} not in {before}..{after}"
        );
        assert_eq!(s.replay.shift_ms, first - t0);
        for (i, (ts, v)) in stored.iter().enumerate() {
            assert_eq!((*ts - first, v.clone()), (i as i64 * 500, json!(i)));
        }

        // --loop 2 at max speed: the second loop continues the timeline one interval later.
        let (path, _) = paced_csv(dir.path(), 3, 1000);
        let started = Instant::now();
        let s = replay(&args(
            hub.mqtt,
            &[&path],
            "--speed max --shift-to-now --loop 2 --qos 0 --topic devices/{device}/telemetry/loop",
        ))
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!((s.run.messages_sent, s.replay.loops), (6, 2), "{s:?}");
        // QoS 0: nothing acknowledges the last message; wait until it is stored.
        let mut stored = Vec::new();
        for _ in 0..250 {
            stored = points(&hub, "pace", "loop.v").await;
            if stored.len() == 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = stored[0].0;
        let got: Vec<(i64, Json)> = stored.into_iter().map(|(t, v)| (t - first, v)).collect();
        let want: Vec<(i64, Json)> = (0..6).map(|i| (i * 1000, json!(i % 3))).collect();
        assert_eq!(got, want);
        hub.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_reestablished_and_the_rest_is_sent() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start().await.unwrap();
        // Four rows a second apart at the recorded pace; half-way through the first gap another
        // client takes the device's client id over, and the hub closes the replay's connection.
        let (path, _) = paced_csv(dir.path(), 4, 1000);
        let a = args(
            hub.mqtt,
            &[&path],
            "--speed 1 --shift-to-now --reconnect-backoff 10ms..50ms",
        );
        let run = tokio::spawn(async move { replay(&a).await });
        // The first row is stored when the clock has started: kick in the middle of the gap.
        while points(&hub, "pace", "v").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let thief = common::V5::connect(common::v5_opts(&hub, "pace")).await;
        let s = run.await.unwrap().unwrap();
        drop(thief);
        assert_eq!(
            (s.run.messages_sent, s.run.messages_acked, s.run.reconnects),
            (4, 4, 1),
            "{s:?}"
        );
        assert_eq!(s.run.connections_lost, 1, "{s:?}");
        let stored = points(&hub, "pace", "v").await;
        let values: Vec<Json> = stored.into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, [json!(0), json!(1), json!(2), json!(3)]);
        hub.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_on_a_lost_connection_are_resent() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start().await.unwrap();
        // One device replaying 20,000 rows as fast as acks allow while its client id is taken
        // over again and again: whatever was in flight is sent again, so every point arrives.
        let n = 20_000;
        let path = dir.path().join("burst.csv");
        let t0 = now_ms() - 600_000;
        let mut text = String::from("ts,device,v\n");
        for i in 0..n {
            text += &format!("{},burst,{i}\n", t0 + i);
        }
        std::fs::write(&path, text).unwrap();
        let a = args(
            hub.mqtt,
            &[&path],
            "--speed max --inflight 64 --reconnect-backoff 5ms..20ms --reconnect-attempts 50",
        );
        let run = tokio::spawn(async move { replay(&a).await });
        while points(&hub, "burst", "v").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut thieves = Vec::new();
        for _ in 0..3 {
            if run.is_finished() {
                break;
            }
            thieves.push(common::V5::connect(common::v5_opts(&hub, "burst")).await);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let s = run.await.unwrap().unwrap();
        drop(thieves);
        assert_eq!(
            (s.run.messages_sent, s.run.unacked, s.run.reconnects),
            (n as u64, 0, s.run.connections_lost),
            "sent, unacked, reconnects; resent {}",
            s.run.resent
        );
        assert!(s.run.reconnects >= 1, "{:?}", s.replay);
        // Each message is acknowledged once: a resent one was not acknowledged before.
        assert_eq!(s.run.messages_acked, s.run.messages_sent);
        let stored = points(&hub, "burst", "v").await;
        let want: Vec<(i64, Json)> = (0..n).map(|i| (t0 + i, json!(i))).collect();
        assert_eq!(stored.len(), want.len());
        assert!(
            stored == want,
            "the stored points differ from the recording"
        );
        hub.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_skipped_or_fail_with_strict() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start().await.unwrap();
        let t0 = now_ms() - 60_000;
        let path = dir.path().join("bad.csv");
        std::fs::write(
            &path,
            format!(
                "tenant,device,metric,ts,value,type\n\
                 default,bad-1,v,{t0},1,int\n\
                 default,bad-1,v,{},one,int\n\
                 default,bad-1,v,{},3,int\n",
                t0 + 1,
                t0 + 2
            ),
        )
        .unwrap();
        let e = replay(&args(hub.mqtt, &[&path], "--strict --speed max"))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("bad.csv:3: value \"one\" is not of type int"),
            "{e:#}"
        );
        assert!(points(&hub, "bad-1", "v").await.is_empty());
        let s = replay(&args(hub.mqtt, &[&path], "--speed max --protocol v3"))
            .await
            .unwrap();
        assert_eq!((s.replay.rows, s.replay.bad_rows), (2, 1), "{s:?}");
        assert_eq!(
            (s.run.protocol.as_str(), s.run.messages_acked),
            ("3.1.1", 2)
        );
        assert_eq!(
            points(&hub, "bad-1", "v").await,
            [(t0, json!(1)), (t0 + 2, json!(3))]
        );

        // A file that is no recording says what is expected.
        let other = dir.path().join("other.csv");
        std::fs::write(&other, "name,age\nx,1\n").unwrap();
        let e = replay(&args(hub.mqtt, &[&other], "")).await.unwrap_err();
        assert!(e.to_string().contains("unknown format"), "{e:#}");
        hub.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn nothing_sent_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = paced_csv(dir.path(), 2, 10);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = args(port, &[&path], "--speed max");
    let err = tokio::time::timeout(
        BOUND,
        sim::run_cli(
            SimArgs {
                command: SimCommand::Replay(Box::new(a)),
            },
            std::future::pending(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("nothing could be sent"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shares_the_transports_of_sim_run() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start().await.unwrap();
        let t0 = now_ms() - 60_000;
        let path = dir.path().join("ws.csv");
        std::fs::write(
            &path,
            format!(
                "ts,device,v\n{t0},ws-1,1.5\n{},ws-2,2.5\n{},ws-1,3.5\n",
                t0 + 10,
                t0 + 20
            ),
        )
        .unwrap();
        // Over the hub's WebSocket listener, from a second loopback address.
        let s = replay(&args(
            hub.ws,
            &[&path],
            "--transport ws --speed max --source-address 127.0.0.2",
        ))
        .await
        .unwrap();
        assert_eq!(s.run.broker, format!("ws://{}/mqtt", hub.ws), "{s:?}");
        assert_eq!((s.run.messages_acked, s.run.errors), (3, 0), "{s:?}");
        let stored = points(&hub, "ws-1", "v").await;
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert_eq!(stored[0].0, t0);
        assert_eq!(points(&hub, "ws-2", "v").await.len(), 1);
        hub.stop().await;
    })
    .await
    .expect("the test did not finish in time");
}
