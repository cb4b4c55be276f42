//! `ferrohub sim run --processes N`: the real binary spreads a fleet over N worker processes with
//! distinct index ranges and prints one merged summary (exact message counts, the devices of every
//! profile, the stored points of devices of every worker); SIGTERM to the parent stops every
//! worker, which drain and report, and nothing is left running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrohub::config::{FsyncMode, HubConfig};
use ferrohub::hub::Hub;
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(60);
const TOKEN: &str = "sim-processes-test-admin-token-0123";

async fn hub(dir: &std::path::Path) -> Hub {
    let mut c = HubConfig {
        data_dir: dir.to_path_buf(),
        admin_token: TOKEN.into(),
        allow_anonymous: true,
        ..HubConfig::default()
    };
    c.listeners.mqtt = "127.0.0.1:0".into();
    c.listeners.http = "127.0.0.1:0".into();
    c.listeners.mqtts = String::new();
    c.listeners.ws = String::new();
    c.storage.fsync = FsyncMode::Never;
    Hub::start(c).await.unwrap()
}

fn sim(hub: &Hub, flags: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrohub"));
    cmd.args(["sim", "run", "--host", "127.0.0.1", "--port"])
        .arg(hub.mqtt_addr.unwrap().port().to_string())
        .args(flags.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` at most `BOUND` (killing it past that) and returns its stdout.
async fn finish(mut child: std::process::Child) -> (std::process::ExitStatus, String, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if started.elapsed() > BOUND {
            let _ = child.kill();
            panic!("sim run did not stop within {BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn points(hub: &Hub, device: &str, metric: &str) -> usize {
    let url = format!(
        "http://{}/api/v1/tenants/default/devices/{device}/telemetry/{metric}",
        hub.http_addr.unwrap()
    );
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    let v: Value = r.json().await.unwrap();
    v["points"].as_array().map_or(0, Vec::len)
}

/// Pids whose parent is `pid` (Linux /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_report_one_exact_summary() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let child = sim(
        &hub,
        "-n 30 --processes 3 --messages-per-device 4 --interval 20ms --batch 1 \
         --profile environment:1 --profile smart-meter:1 --connect-rate 0 --json",
    )
    .spawn()
    .unwrap();
    let (status, stdout, stderr) = finish(child).await;
    assert!(status.success(), "{status}: {stderr}");
    let s: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(s["processes"], 3, "{s}");
    assert_eq!(s["devices"], 30);
    assert_eq!(s["first_index"], 0);
    assert_eq!(s["connected"], 30);
    assert_eq!(s["messages_sent"], 120);
    assert_eq!(s["messages_acked"], 120);
    assert_eq!(s["errors"], 0);
    assert_eq!(s["profiles"]["environment"], 15);
    assert_eq!(s["profiles"]["smart-meter"], 15);
    assert!(s["latency_p99_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert!(
        s.get("latency_us").is_none(),
        "the histogram is not printed"
    );
    // A device of the first and of the last worker: each stored its 4 samples (environment
    // devices have even indices in a 1:1 mix; `temperature` is one of their metrics).
    let env: Vec<u64> = (0..30).filter(|i| i % 2 == 0).collect();
    for i in [env[0], env[env.len() - 1]] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = points(&hub, &format!("sim-{i}"), "temperature").await;
            if n == 4 {
                break;
            }
            assert!(n < 4 && Instant::now() < deadline, "sim-{i}: {n} points");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_worker_and_still_reports() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let child = sim(
        &hub,
        "-n 10 --processes 2 --duration 5m --interval 50ms --connect-rate 0 --json",
    )
    .spawn()
    .unwrap();
    let pid = child.id();
    // Wait until both workers run and every device is connected.
    let deadline = Instant::now() + Duration::from_secs(20);
    let workers = loop {
        let w = children_of(pid);
        let metrics = reqwest::get(format!("http://{}/metrics", hub.http_addr.unwrap()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let online = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ferrohub_mqtt_connections "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if w.len() == 2 && online == 10 {
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "workers {w:?}, {online} devices online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let (status, stdout, stderr) = finish(child).await;
    assert!(status.success(), "{status}: {stderr}");
    let s: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(s["processes"], 2, "{s}");
    assert_eq!(s["interrupted"], true);
    assert_eq!(s["connected"], 10);
    assert_eq!(s["unacked"], 0, "{s}");
    assert!(s["messages_acked"].as_u64().unwrap() > 0, "{s}");
    for w in workers {
        assert!(
            !std::path::Path::new(&format!("/proc/{w}")).exists(),
            "worker {w} still running"
        );
    }
    hub.shutdown().await;
}

#[test]
fn zero_processes_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrohub"))
        .args(["sim", "run", "--processes", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--processes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
