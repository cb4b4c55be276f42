//! Durability across `kill -9`: every QoS 1/2 message the hub acknowledged to a publisher (and
//! every retained message it acknowledged) is delivered after the hub process is killed with
//! SIGKILL and restarted on the same data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::timeout;

/// A hub process and its MQTT address.
struct HubProcess {
    child: Child,
    mqtt: SocketAddr,
    http: SocketAddr,
}

const ADMIN_TOKEN: &str = "fh_kill9_admin_token_0123456789";

impl HubProcess {
    fn start(data_dir: &Path, fsync: &str) -> HubProcess {
        Self::start_with_env(data_dir, fsync, &[])
    }

    fn start_with_env(data_dir: &Path, fsync: &str, env: &[(&str, &str)]) -> HubProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrohub"))
            .args(["serve", "--allow-anonymous", "--log-format", "json"])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--ws-listen",
                "",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("FERROHUB_STORAGE__FSYNC", fsync)
            .env("FERROHUB_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .env(
                "FERROHUB_STORAGE__PERSISTENCE",
                std::env::var("KILL9_SABOTAGE_PERSISTENCE").unwrap_or("true".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrohub");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stderr after the addresses are known, so the hub never blocks on it.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let f = &v["fields"];
                    if f["message"] == "listening" {
                        let addr: SocketAddr = f["addr"].as_str().unwrap().parse().unwrap();
                        let _ = tx.send((f["protocol"].as_str().unwrap_or("").to_string(), addr));
                    }
                }
            }
        });
        let (mut mqtt, mut http) = (None, None);
        while mqtt.is_none() || http.is_none() {
            let (protocol, addr) = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("hub did not report its MQTT and HTTP addresses");
            match protocol.as_str() {
                "mqtt" => mqtt = Some(addr),
                "http" => http = Some(addr),
                _ => {}
            }
        }
        HubProcess {
            child,
            mqtt: mqtt.unwrap(),
            http: http.unwrap(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the hub");
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options(id: &str, addr: SocketAddr, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(64);
    o
}

/// Connects, subscribes (persistent session) and disconnects cleanly.
async fn create_persistent_subscriber(addr: SocketAddr, id: &str, qos: QoS) {
    let (client, mut ev) = AsyncClient::new(options(id, addr, false), 100);
    client.subscribe("durable/#", qos).await.unwrap();
    timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("SUBACK");
    client.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

/// Publishes numbered messages until the connection breaks; returns the numbers acknowledged.
async fn publish_until_killed(
    addr: SocketAddr,
    qos: QoS,
    kill_after_acks: usize,
    hub: HubProcess,
) -> BTreeSet<u32> {
    publish_numbered_until_killed(addr, qos, kill_after_acks, hub, "durable/data", |seq| {
        seq.to_be_bytes().to_vec()
    })
    .await
}

/// Publishes numbered messages (`payload(seq)` on `topic`) until the connection breaks, killing
/// the hub after `kill_after_acks` acknowledgements; returns the numbers acknowledged.
async fn publish_numbered_until_killed(
    addr: SocketAddr,
    qos: QoS,
    kill_after_acks: usize,
    hub: HubProcess,
    topic: &'static str,
    payload: fn(u32) -> Vec<u8>,
) -> BTreeSet<u32> {
    let (client, mut ev) = AsyncClient::new(options("publisher", addr, true), 1000);
    client
        .publish(
            "durable/retained",
            QoS::AtLeastOnce,
            true,
            b"keep me".to_vec(),
        )
        .await
        .unwrap();
    let publisher = client.clone();
    tokio::spawn(async move {
        for seq in 0u32..100_000 {
            if publisher
                .publish(topic, qos, false, payload(seq))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // rumqttc numbers packets in publish order: map each outgoing packet id to its sequence.
    let mut outgoing: std::collections::HashMap<u16, i64> = Default::default();
    let mut next_seq: i64 = -1; // the retained publish goes first
    let mut acked = BTreeSet::new();
    let mut hub = Some(hub);
    let result = timeout(Duration::from_secs(60), async {
        loop {
            match ev.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    outgoing.insert(pkid, next_seq);
                    next_seq += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(seq) = outgoing.remove(&a.pkid).filter(|s| *s >= 0) {
                        acked.insert(seq as u32);
                    }
                }
                Ok(Event::Incoming(Packet::PubComp(a))) => {
                    if let Some(seq) = outgoing.remove(&a.pkid).filter(|s| *s >= 0) {
                        acked.insert(seq as u32);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
            if acked.len() >= kill_after_acks
                && let Some(h) = hub.take()
            {
                // Kill while messages are still in flight.
                h.kill9();
            }
        }
    })
    .await;
    assert!(result.is_ok(), "publisher did not notice the hub dying");
    assert!(
        hub.is_none(),
        "the hub was never killed: only {} acks",
        acked.len()
    );
    acked
}

async fn receive_all(addr: SocketAddr, id: &str) -> (BTreeSet<u32>, bool) {
    let (client, mut ev) = AsyncClient::new(options(id, addr, false), 1000);
    let mut got = BTreeSet::new();
    let mut present = false;
    let _ = timeout(Duration::from_secs(30), async {
        loop {
            match timeout(Duration::from_secs(3), ev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => present = c.session_present,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == "durable/data" => {
                    got.insert(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
                Err(_) => break, // quiet for 3 s: everything owed has arrived
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    (got, present)
}

async fn retained_survives(addr: SocketAddr) {
    let (client, mut ev) = AsyncClient::new(options("retained-check", addr, true), 10);
    client
        .subscribe("durable/retained", QoS::AtLeastOnce)
        .await
        .unwrap();
    let payload = timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = ev.poll().await.unwrap() {
                return p.payload;
            }
        }
    })
    .await
    .expect("retained message after restart");
    assert_eq!(&payload[..], b"keep me");
}

async fn kill_and_check(fsync: &str, qos: QoS) {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), fsync);
    let addr = hub.mqtt;
    create_persistent_subscriber(addr, "durable-sub", qos).await;
    let acked = publish_until_killed(addr, qos, 300, hub).await;
    let hub = HubProcess::start(dir.path(), fsync);
    let (received, present) = receive_all(hub.mqtt, "durable-sub").await;
    assert!(present, "the persistent session must survive the crash");
    eprintln!(
        "fsync={fsync} qos={qos:?}: {} acknowledged before the kill, {} delivered after restart",
        acked.len(),
        received.len()
    );
    let lost: Vec<_> = acked.difference(&received).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost after kill -9 (fsync={fsync}): first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(acked.len() >= 300);
    retained_survives(hub.mqtt).await;
}

/// A minimal HTTP/1.1 exchange (the test must not depend on the hub's own client code).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("HTTP answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// What the registry acknowledged with a 2xx — a device and its password — survives `kill -9`,
/// even with fsync off (SQLite WAL: the commit is in the OS before the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_registry_writes_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), "never");
    let (status, body) = http(
        hub.http,
        "POST",
        "/api/v1/tenants/default/devices",
        r#"{"id":"dur-1","tags":{"site":"a"}}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(
        hub.http,
        "POST",
        "/api/v1/tenants/default/devices/dur-1/credentials",
        r#"{"kind":"password","secret":"dur-secret-1"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    hub.kill9();

    let hub = HubProcess::start(dir.path(), "never");
    let (status, body) = http(hub.http, "GET", "/api/v1/tenants/default/devices/dur-1", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"site\":\"a\""), "{body}");
    let mut o = options("dur-1", hub.mqtt, true);
    o.set_credentials("dur-1", "dur-secret-1");
    let (_client, mut ev) = AsyncClient::new(o, 10);
    let first = timeout(Duration::from_secs(10), ev.poll()).await.unwrap();
    assert!(
        matches!(first, Ok(Event::Incoming(Packet::ConnAck(ref c))) if c.code == rumqttc::ConnectReturnCode::Success),
        "the password acknowledged before the kill does not work: {first:?}"
    );
    hub.kill9();
}

/// Every alarm change answered 2xx — raises, a folded re-raise, an acknowledgement, a clear —
/// survives `kill -9` with its history (alarms.db: one committed transaction per change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_alarm_changes_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), "always");
    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, body) = http(
            hub.http,
            "POST",
            "/api/v1/tenants/default/alarms",
            &format!(r#"{{"key":"k{i}","severity":"major","message":"m{i}"}}"#),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (status, body) = http(
        hub.http,
        "POST",
        "/api/v1/tenants/default/alarms",
        r#"{"key":"k0","severity":"critical","message":"again"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ack = format!("/api/v1/tenants/default/alarms/{}/acknowledge", ids[1]);
    let (status, body) = http(hub.http, "POST", &ack, "").await;
    assert_eq!(status, 200, "{body}");
    let clear = format!("/api/v1/tenants/default/alarms/{}/clear", ids[2]);
    let (status, body) = http(hub.http, "POST", &clear, r#"{"note":"done"}"#).await;
    assert_eq!(status, 200, "{body}");
    hub.kill9();

    let hub = HubProcess::start(dir.path(), "always");
    let get = |id: &str| format!("/api/v1/tenants/default/alarms/{id}");
    for (i, id) in ids.iter().enumerate() {
        let (status, body) = http(hub.http, "GET", &get(id), "").await;
        assert_eq!(status, 200, "alarm {i} lost: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let want = match i {
            0 => ("active", "critical", 2),
            1 => ("acknowledged", "major", 1),
            2 => ("cleared", "major", 1),
            _ => ("active", "major", 1),
        };
        assert_eq!(
            (
                v["state"].as_str().unwrap(),
                v["severity"].as_str().unwrap(),
                v["count"].as_u64().unwrap()
            ),
            want,
            "alarm {i}"
        );
    }
    let (status, body) = http(hub.http, "GET", &format!("{}/history", get(&ids[2])), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""note":"done""#), "{body}");
    hub.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_qos1_survives_kill9_with_fsync() {
    kill_and_check("always", QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_qos1_survives_kill9_without_fsync() {
    kill_and_check("never", QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_qos2_survives_kill9() {
    kill_and_check("always", QoS::ExactlyOnce).await;
}

/// SIGTERM is a graceful shutdown: an MQTT 5 client is told "Server shutting down" (0x8B), the
/// process exits successfully, and a persistent session with its queued message survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_v5_clients_and_persists_state() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as Opts5};

    let dir = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(dir.path(), "always");
    let addr = hub.mqtt;
    create_persistent_subscriber(addr, "term-sub", QoS::AtLeastOnce).await;
    let (publisher, mut pub_ev) = AsyncClient::new(options("term-pub", addr, true), 10);
    publisher
        .publish(
            "durable/data",
            QoS::AtLeastOnce,
            false,
            7u32.to_be_bytes().to_vec(),
        )
        .await
        .unwrap();
    timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = pub_ev.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("PUBACK");

    let mut o = Opts5::new("term-v5", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (_v5, mut ev) = Client5::new(o, 10);
    timeout(Duration::from_secs(10), async {
        loop {
            if let E5::Incoming(P5::ConnAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("CONNACK");

    let pid = hub.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let reason = timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(E5::Incoming(P5::Disconnect(d))) => return Some(d.reason_code),
                Ok(_) => {}
                // rumqttc reports a server DISCONNECT as an error carrying its reason code.
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => return Some(reason_code),
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("the v5 client hears from the hub within 10 s");
    assert_eq!(
        reason,
        Some(rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::ServerShuttingDown)
    );
    let exit = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = hub.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("hub exits after SIGTERM");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");

    let hub = HubProcess::start(dir.path(), "always");
    let (received, present) = receive_all(hub.mqtt, "term-sub").await;
    assert!(present);
    assert!(
        received.contains(&7),
        "the queued message survived the graceful restart"
    );
}

/// Every twin update the hub answered (`update/accepted` to the device, 200 to the operator) and
/// every queued command it answered 202 survives `kill -9` in the middle of a stream of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_twin_updates_and_queued_commands_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), "always");
    let (status, body) = http(
        hub.http,
        "POST",
        "/api/v1/tenants/default/devices",
        r#"{"id":"tw-1"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The device (anonymous: development mode) reports numbered updates as fast as they are
    // accepted, and records every accepted one.
    let (client, mut ev) = AsyncClient::new(options("tw-1", hub.mqtt, true), 100);
    client
        .subscribe("$devices/tw-1/twin/update/accepted", QoS::AtLeastOnce)
        .await
        .unwrap();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let acc = accepted.clone();
    let device = tokio::spawn(async move {
        let mut next = 0u64;
        let mut subscribed = false;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => subscribed = true,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    acc.lock()
                        .unwrap()
                        .push(v["clientToken"].as_str().unwrap().parse().unwrap());
                }
                Ok(_) => {}
                Err(_) => break,
            }
            // Keep a few updates in flight.
            while subscribed && next < acc.lock().unwrap().len() as u64 + 8 {
                let body = format!(r#"{{"reported":{{"seq":{next}}},"clientToken":"{next}"}}"#);
                if client
                    .try_publish("$devices/tw-1/twin/update", QoS::AtLeastOnce, false, body)
                    .is_err()
                {
                    break;
                }
                next += 1;
            }
        }
    });
    // The operator patches desired and queues commands meanwhile.
    let mut desired_ok = 0u64;
    let mut commands_ok = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        let (status, _) = http(
            hub.http,
            "PATCH",
            "/api/v1/tenants/default/devices/tw-1/twins/default/desired",
            &format!(r#"{{"rate":{}}}"#, desired_ok + 1),
        )
        .await;
        if status == 200 {
            desired_ok += 1;
        }
        let (status, body) = http(
            hub.http,
            "POST",
            "/api/v1/tenants/default/devices/tw-1/commands/reboot?mode=queued&ttl=600",
            r#"{"n":1}"#,
        )
        .await;
        if status == 202 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            commands_ok.push(v["id"].as_str().unwrap().to_string());
        }
    }
    hub.kill9();
    let _ = timeout(Duration::from_secs(5), device).await;
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= 20,
        "only {} updates accepted",
        accepted.len()
    );
    assert!(desired_ok >= 3 && !commands_ok.is_empty());
    let last_reported = *accepted.iter().max().unwrap();

    let hub = HubProcess::start(dir.path(), "always");
    let (status, body) = http(
        hub.http,
        "GET",
        "/api/v1/tenants/default/devices/tw-1/twins/default",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let twin: serde_json::Value = serde_json::from_str(&body).unwrap();
    // Updates apply in order, so the last accepted one (or a later one) is what reported holds.
    assert!(
        twin["reported"]["seq"].as_u64().unwrap() >= last_reported,
        "reported lost acknowledged updates: {} < {last_reported}",
        twin["reported"]["seq"]
    );
    assert!(
        twin["desired"]["rate"].as_u64().unwrap() >= desired_ok,
        "desired lost acknowledged patches"
    );
    assert!(twin["version"].as_u64().unwrap() >= accepted.len() as u64 + desired_ok);
    for id in &commands_ok {
        let (status, body) = http(
            hub.http,
            "GET",
            &format!("/api/v1/tenants/default/devices/tw-1/queued-commands/{id}"),
            "",
        )
        .await;
        assert_eq!(status, 200, "acknowledged command {id} lost: {body}");
        assert!(
            body.contains("\"state\":\"queued\"") || body.contains("\"state\":\"sent\""),
            "{body}"
        );
    }
    // The history holds every accepted change, in order (read a page at a time).
    let mut tokens = BTreeSet::new();
    let mut after = 0u64;
    loop {
        let (status, body) = http(
            hub.http,
            "GET",
            &format!(
                "/api/v1/tenants/default/devices/tw-1/twins/default/history?limit=1000&after={after}"
            ),
            "",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let page: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let Some(last) = page.last() else { break };
        after = last["version"].as_u64().unwrap();
        tokens.extend(page.iter().filter_map(|e| {
            e["clientToken"]
                .as_str()
                .and_then(|t| t.parse::<u64>().ok())
        }));
    }
    // The history keeps the last twins.history_per_twin (1000) changes: every accepted update
    // from the oldest kept one on is there.
    let oldest = *tokens.iter().next().expect("a non-empty history");
    assert!(tokens.contains(&last_reported));
    for a in accepted.iter().filter(|a| **a >= oldest) {
        assert!(
            tokens.contains(a),
            "accepted update {a} missing from the history"
        );
    }
    hub.kill9();
}

/// Base of the device timestamps of the telemetry kill test (set once per run).
static TELEMETRY_BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

fn telemetry_payload(seq: u32) -> Vec<u8> {
    let base = *TELEMETRY_BASE.get().unwrap();
    format!(
        "{{\"ts\": {}, \"seq\": {seq}, \"temp\": {}.{:02}}}",
        base + i64::from(seq),
        20 + seq % 7,
        seq % 100
    )
    .into_bytes()
}

/// Telemetry acknowledged with PUBACK is in the time-series engine after `kill -9`: read back by
/// opening the engine on the dead hub's data directory. A small head makes the hub seal parts
/// while it ingests, so points are both in parts and in the WAL at the kill.
async fn telemetry_kill_and_check(fsync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    TELEMETRY_BASE.get_or_init(|| now - 600_000);
    let env = [
        ("FERROHUB_TELEMETRY__HEAD_MAX_POINTS", "2000"),
        ("FERROHUB_TELEMETRY__RETENTION_DAYS", "0"),
    ];
    let hub = HubProcess::start_with_env(dir.path(), fsync, &env);
    let addr = hub.mqtt;
    let acked = publish_numbered_until_killed(
        addr,
        QoS::AtLeastOnce,
        3000,
        hub,
        "devices/meter-1/telemetry",
        telemetry_payload,
    )
    .await;
    let mut cfg = ferrohub_tsdb::EngineConfig::new(dir.path().join("telemetry"));
    cfg.default_retention_days = None;
    let engine = ferrohub_tsdb::Engine::open(cfg).expect("the engine opens after kill -9");
    let tenant = ferrohub_types::TenantId::default_tenant();
    let mut stored = BTreeSet::new();
    let mut from = 0;
    loop {
        let page = engine
            .raw(
                &tenant,
                &ferrohub_tsdb::RawQuery {
                    device: "meter-1".into(),
                    metric: "seq".into(),
                    from,
                    to: i64::MAX / 2,
                    limit: 10_000,
                    descending: false,
                },
            )
            .unwrap();
        for (ts, v) in &page.points {
            assert_eq!(
                *v,
                ferrohub_types::telemetry::Value::Int(ts - TELEMETRY_BASE.get().unwrap())
            );
            if let ferrohub_types::telemetry::Value::Int(seq) = v {
                stored.insert(*seq as u32);
            }
        }
        match page.next {
            Some(n) => from = n,
            None => break,
        }
    }
    eprintln!(
        "telemetry fsync={fsync}: {} acknowledged before the kill, {} stored ({} parts, {} replayed from the WAL)",
        acked.len(),
        stored.len(),
        engine.recovery().parts,
        engine.recovery().wal_points
    );
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged telemetry messages lost after kill -9 (fsync={fsync}): first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(acked.len() >= 3000);
    assert!(
        engine.recovery().parts > 0,
        "the run should have sealed parts before the kill"
    );
    tokio::task::spawn_blocking(move || engine.close())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_telemetry_survives_kill9() {
    telemetry_kill_and_check("always").await;
}
