//! `ferrohub sim run` devices beyond telemetry, against a real hub in-process and driven through
//! its HTTP API: they report firmware and health in their twin, apply desired settings (the
//! delta clears, unknown keys are rejected with a reason), answer commands over MQTT 5 and
//! 3.1.1 (ping, get_config, set_interval, reboot; 501 for others), resend unacknowledged
//! messages after a lost connection, and survive their own malformed packets without losing a
//! message. Every test is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::stored_points;
use ferrohub_sim::sim::{self, RunArgs, Summary};
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every test gives up after this long instead of hanging.
const BOUND: Duration = Duration::from_secs(90);
/// Longest wait for something the devices do.
const WAIT: Duration = Duration::from_secs(20);

fn args(addr: SocketAddr, flags: &str) -> RunArgs {
    common::sim_args(addr, flags)
}

async fn run(a: &RunArgs) -> Summary {
    common::try_sim_run(a, BOUND).await.unwrap()
}

/// A run in the background, stopped by [`Background::stop`].
struct Background {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<Summary>>,
}

fn start(a: RunArgs) -> Background {
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        sim::run_args(&a, async move {
            let _ = rx.await;
        })
        .await
    });
    Background { stop, task }
}

impl Background {
    async fn stop(self) -> Summary {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the run did not stop")
            .unwrap()
            .unwrap()
    }
}

/// The operator API with the admin token.
struct Api {
    http: reqwest::Client,
    /// `…/api/v1/tenants/{tenant}`.
    base: String,
}

impl Api {
    fn new(hub: &TestHub) -> Api {
        Api::in_tenant(hub, "default")
    }

    fn in_tenant(hub: &TestHub, tenant: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: format!("{}/tenants/{tenant}", hub.api_url()),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TEST_ADMIN_TOKEN);
        if let Some(b) = body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.expect("HTTP request failed");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    async fn register(&self, device: &str) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/devices",
                Some(json!({ "id": device })),
            )
            .await;
        assert_eq!(status, 201, "register {device}: {body}");
    }

    async fn twin(&self, device: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/devices/{device}/twins/default"),
                None,
            )
            .await;
        assert_eq!(status, 200, "twin of {device}: {body}");
        body
    }

    async fn set_desired(&self, device: &str, patch: Value) {
        let (status, body) = self
            .call(
                reqwest::Method::PATCH,
                &format!("/devices/{device}/twins/default/desired"),
                Some(patch),
            )
            .await;
        assert_eq!(status, 200, "desired of {device}: {body}");
    }

    /// A direct command: (HTTP status, body).
    async fn command(&self, device: &str, name: &str, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/devices/{device}/commands/{name}?timeout=5"),
            Some(body),
        )
        .await
    }

    /// Polls the twin of `device` until `ok` holds (at most [`WAIT`]); returns it.
    async fn twin_until(&self, device: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = self.twin(device).await;
            if ok(&t) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{device}: never {what}: {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `ping` until the device answers (it is connected and subscribed).
    async fn wait_listening(&self, device: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.command(device, "ping", json!({})).await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{device} never answered a ping: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_report_firmware_and_apply_desired_settings() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start().await.unwrap();
        let api = Api::new(&hub);
        for d in ["tw-0", "tw-1"] {
            api.register(d).await;
        }
        let bg = start(args(
            hub.mqtt,
            "--devices 2 --prefix tw --interval 200ms --health-every 300ms --firmware 2.4.1",
        ));
        // Firmware and health at connect, and health again later.
        let t = api
            .twin_until("tw-0", "reports firmware and health twice", |t| {
                t["reported"]["firmware"] == "2.4.1"
                    && t["reported"]["health"]["firmware"] == "2.4.1"
                    && t["versions"]["reported"].as_u64().unwrap_or(0) >= 2
            })
            .await;
        let health = &t["reported"]["health"];
        assert_eq!(health["status"], "ok", "{t}");
        for k in ["uptime", "signal", "battery", "memory"] {
            assert!(health[k].is_number(), "{k}: {t}");
        }
        assert_eq!(t["reported"]["interval_ms"], 200, "{t}");
        assert_eq!(t["reported"]["profile"], "environment", "{t}");

        // Desired: a faster interval and a key the device does not have.
        api.set_desired("tw-0", json!({"interval_ms": 50, "color": "red"}))
            .await;
        let t = api
            .twin_until("tw-0", "applies interval_ms and rejects color", |t| {
                t["acks"]["interval_ms"]["status"] == "applied"
                    && t["acks"]["color"]["status"] == "rejected"
            })
            .await;
        assert_eq!(t["reported"]["interval_ms"], 50, "{t}");
        assert!(t["delta"].get("interval_ms").is_none(), "{t}");
        assert!(
            t["acks"]["color"]["reason"]
                .as_str()
                .unwrap()
                .contains("not applicable"),
            "{t}"
        );
        // The device samples at the new interval: its stored timestamps step by 50 ms.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let points = stored_points(&hub, "tw-0", "temperature");
            let steps: Vec<i64> = points.windows(2).map(|w| w[1].0 - w[0].0).collect();
            if steps.iter().rev().take(3).filter(|s| **s == 50).count() == 3 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{steps:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A duration string is echoed as given; `enabled: false` pauses telemetry.
        api.set_desired(
            "tw-1",
            json!({"sampling_interval": "100ms", "enabled": false}),
        )
        .await;
        let t = api
            .twin_until("tw-1", "applies sampling_interval and enabled", |t| {
                t["delta"].as_object().is_some_and(|d| d.is_empty())
                    && t["reported"]["enabled"] == false
            })
            .await;
        assert_eq!(t["reported"]["sampling_interval"], "100ms", "{t}");
        assert_eq!(t["reported"]["interval_ms"], 100, "{t}");

        let s = bg.stop().await;
        assert_eq!((s.connected, s.errors), (2, 0), "{s:?}");
        assert!(s.twin_reports >= 6, "{s:?}");
        assert_eq!((s.desired_applied, s.desired_rejected), (3, 1), "{s:?}");
        hub.stop().await;
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_answered_over_mqtt5_and_311() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start().await.unwrap();
        let api = Api::new(&hub);
        for (protocol, device) in [("v5", "cmd5-0"), ("v3", "cmd3-0")] {
            api.register(device).await;
            let prefix = device.trim_end_matches("-0");
            let bg = start(args(
                hub.mqtt,
                &format!(
                    "--devices 1 --prefix {prefix} --protocol {protocol} --interval 100ms \
                    --reconnect-backoff 20ms..200ms"
                ),
            ));
            api.wait_listening(device).await;
            let (status, body) = api.command(device, "ping", json!({"n": 7})).await;
            assert_eq!(
                (status, &body),
                (200, &json!({"status": 200, "payload": {"n": 7}}))
            );

            let (status, body) = api.command(device, "get_config", json!({})).await;
            assert_eq!((status, &body["status"]), (200, &json!(200)), "{body}");
            assert_eq!(body["payload"]["firmware"], "sim-1.0.0", "{body}");
            assert_eq!(body["payload"]["interval_ms"], 100, "{body}");
            assert_eq!(
                body["payload"]["topic"],
                format!("devices/{device}/telemetry"),
                "{body}"
            );

            let (_, body) = api
                .command(device, "set_interval", json!({"interval_ms": 40}))
                .await;
            assert_eq!(body, json!({"status": 200, "payload": {"interval_ms": 40}}));
            api.twin_until(device, "reports the new interval", |t| {
                t["reported"]["interval_ms"] == 40
            })
            .await;
            let (_, body) = api
                .command(device, "set_interval", json!({"interval_ms": "fast"}))
                .await;
            assert_eq!(body["status"], 400, "{body}");

            let (_, body) = api.command(device, "selfdestruct", json!({})).await;
            assert_eq!(body["status"], 501, "{body}");
            assert!(
                body["payload"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("selfdestruct")
            );

            // A reboot: answered, then the device reconnects and says so in its twin.
            let (_, body) = api
                .command(device, "reboot", json!({"delay_ms": 100}))
                .await;
            assert_eq!(body["status"], 200, "{body}");
            assert_eq!(body["payload"]["rebooting"], true, "{body}");
            let t = api
                .twin_until(device, "reports the reboot", |t| {
                    t["reported"]["health"]["reboots"] == 1
                })
                .await;
            assert_eq!(t["reported"]["last_reboot"]["reason"], "command", "{t}");
            api.wait_listening(device).await;

            let s = bg.stop().await;
            assert_eq!((s.connected, s.reboots), (1, 1), "{s:?}");
            assert!(s.reconnects >= 1, "{s:?}");
            assert!(s.commands_answered >= 6, "{s:?}");
            assert_eq!((s.unacked, s.refused), (0, 0), "{s:?}");
            assert_eq!(s.messages_acked, s.messages_sent, "{s:?}");
        }
        hub.stop().await;
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pure_telemetry_without_twin_and_commands() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start().await.unwrap();
        let api = Api::new(&hub);
        api.register("pt-0").await;
        let s = run(&args(
            hub.mqtt,
            "--devices 1 --prefix pt --messages-per-device 5 --interval 20ms --no-twin \
            --no-commands",
        ))
        .await;
        assert_eq!((s.messages_acked, s.errors), (5, 0), "{s:?}");
        assert_eq!((s.twin_reports, s.commands_answered), (0, 0), "{s:?}");
        let t = api.twin("pt-0").await;
        assert!(
            t["reported"].as_object().is_none_or(|r| r.is_empty()),
            "{t}"
        );
        // With the behaviour on (the default) the same run reports its firmware.
        let s = run(&args(
            hub.mqtt,
            "--devices 1 --prefix pt --messages-per-device 5 --interval 20ms",
        ))
        .await;
        assert!(s.twin_reports >= 1, "{s:?}");
        api.twin_until("pt-0", "reports firmware", |t| {
            t["reported"]["firmware"] == "sim-1.0.0"
        })
        .await;
        hub.stop().await;
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_devices_report_firmware_and_answer_commands() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start_with(|cfg| cfg.demo = true).await.unwrap();
        let api = Api::in_tenant(&hub, ferrohub::demo::TENANT);
        api.wait_listening("demo-00").await;
        let (_, body) = api.command("demo-00", "get_config", json!({})).await;
        assert_eq!(body["status"], 200, "{body}");
        api.twin_until("demo-00", "reports firmware and health", |t| {
            t["reported"]["firmware"] == "sim-1.0.0" && t["reported"]["health"].is_object()
        })
        .await;
        hub.stop().await;
    })
    .await
    .expect("test bound");
}

/// Messages each device of a chaos run skips on purpose (`--chaos-loss`).
fn skipped(loss: f64, seed: u64, devices: u64, per_device: u64) -> Vec<u64> {
    let chaos = sim::chaos::Chaos {
        loss,
        ..Default::default()
    };
    (0..devices)
        .map(|i| (0..per_device).filter(|m| chaos.lost(seed, i, *m)).count() as u64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_resend_what_was_not_acknowledged() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start().await.unwrap();
        let (devices, per_device, seed) = (6u64, 40u64, 11u64);
        let mut resent = 0;
        // Persistent sessions (resent with their packet ids) over both versions, and clean ones
        // (resent as new publications).
        for (protocol, prefix, session) in
            [("v5", "rs5", "5m"), ("v3", "rs3", "5m"), ("v5", "rsc", "0")]
        {
            // Disconnects drop the connection at once, with bursts keeping messages in flight.
            let s = run(&args(
                hub.mqtt,
                &format!(
                    "--protocol {protocol} --devices {devices} --prefix {prefix} \
                    --session-expiry {session} \
                    --messages-per-device {per_device} --interval 20ms --connect-rate 0 \
                    --seed {seed} --chaos-disconnect 120 --chaos-burst 10@200ms \
                    --chaos-loss 0.1 --reconnect-backoff 20ms..200ms --no-twin --no-commands"
                ),
            ))
            .await;
            let lost = skipped(0.1, seed, devices, per_device);
            let total_lost: u64 = lost.iter().sum();
            assert!(s.chaos.get("disconnect").copied().unwrap_or(0) > 0, "{s:?}");
            resent += s.resent;
            assert_eq!((s.connected, s.unacked, s.errors), (devices, 0, 0), "{s:?}");
            assert_eq!(s.messages_sent, devices * per_device - total_lost, "{s:?}");
            assert_eq!(s.messages_acked, s.messages_sent, "{s:?}");
            for i in 0..devices {
                let stored = stored_points(&hub, &format!("{prefix}-{i}"), "humidity");
                assert_eq!(
                    stored.len() as u64,
                    per_device - lost[i as usize],
                    "{prefix}-{i}: {s:?}"
                );
            }
        }
        // A disconnect strikes just after a message is written: some were in flight.
        assert!(resent > 0);
        hub.stop().await;
    })
    .await
    .expect("test bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_answered_and_nothing_is_lost() {
    tokio::time::timeout(BOUND, async {
        let hub = TestHub::start().await.unwrap();
        let (devices, per_device, seed, fraction) = (10u64, 30u64, 5u64, 0.5);
        for (protocol, prefix) in [("v5", "mp5"), ("v3", "mp3")] {
            let s = run(&args(
                hub.mqtt,
                &format!(
                    "--protocol {protocol} --devices {devices} --prefix {prefix} \
                    --messages-per-device {per_device} --interval 20ms --connect-rate 0 \
                    --seed {seed} --chaos-misbehave {fraction} --reconnect-backoff 20ms..200ms \
                    --reconnect-attempts 50"
                ),
            ))
            .await;
            let packets: u64 = s
                .chaos
                .iter()
                .filter(|(k, _)| k.starts_with("packet_"))
                .map(|(_, v)| *v)
                .sum();
            assert!(packets > 0, "{s:?}");
            let answer = |k: &str| s.answers.get(k).copied().unwrap_or(0);
            if protocol == "v5" {
                // Malformed: 0x81; a second CONNECT: 0x82 (a protocol error).
                let malformed = packets - s.chaos.get("packet_connect").copied().unwrap_or(0);
                assert!(answer("DISCONNECT 0x81") >= malformed, "{s:?}");
                if s.chaos.contains_key("packet_connect") {
                    assert!(answer("DISCONNECT 0x82") > 0, "{s:?}");
                }
            } else {
                // 3.1.1 has no DISCONNECT from the server: the hub closes the connection.
                assert!(answer("CLOSE") >= packets, "{s:?}");
            }
            assert_eq!(answer("NO CLOSE"), 0, "{s:?}");
            assert!(s.reconnects >= packets, "{s:?}");
            // Every regular message of every device is stored, misbehaving ones included (what
            // was in flight when the hub closed a connection was resent).
            assert_eq!((s.connected, s.unacked), (devices, 0), "{s:?}");
            assert_eq!(s.messages_acked + s.refused, devices * per_device, "{s:?}");
            for i in 0..devices {
                let stored = stored_points(&hub, &format!("{prefix}-{i}"), "humidity");
                assert_eq!(stored.len() as u64, per_device, "{prefix}-{i}: {s:?}");
            }
        }
        // The hub keeps serving: a well-behaved run afterwards is unaffected.
        let s = run(&args(
            hub.mqtt,
            "--devices 5 --prefix after --messages-per-device 5 --interval 10ms",
        ))
        .await;
        assert_eq!((s.messages_acked, s.errors), (25, 0), "{s:?}");
        hub.stop().await;
    })
    .await
    .expect("test bound");
}
