//! Device twins, commands and lifecycle events, end to end against the real hub.
//!
//! Devices are registered through the operator API (`POST …/devices`, a password credential) and
//! speak MQTT 5 (rumqttc v5) or 3.1.1 (rumqttc v4) on their reserved `$devices/{id}/…` topics
//! under the default policy; operators use the HTTP API with the admin token. Every test is
//! bounded in time and stops its hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrohub_proto::mqtt::{Packet, ProtocolVersion};
use ferrohub_testkit::{RawClient, TEST_ADMIN_TOKEN, TestHub};
use reqwest::Method;
use serde_json::{Value, json};

/// Bound for a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within 60 s");
}

/// A hub that authenticates every client against the registry (no anonymous access); the
/// failed-login back-off is effectively off (every client comes from 127.0.0.1).
async fn secured_hub() -> TestHub {
    TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.registry.auth_backoff.free_failures = 10_000;
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Operator API
// ---------------------------------------------------------------------------------------------

/// The operator API with the admin token.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

/// An API answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    etag: Option<String>,
}

impl Api {
    fn new(hub: &TestHub) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: hub.api_url(),
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TEST_ADMIN_TOKEN)
    }

    async fn send(rb: reqwest::RequestBuilder) -> Reply {
        let resp = tokio::time::timeout(Duration::from_secs(20), rb.send())
            .await
            .expect("HTTP timeout")
            .expect("HTTP request failed");
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply { status, body, etag }
    }

    async fn get(&self, path: &str) -> Reply {
        Self::send(self.request(Method::GET, path)).await
    }

    async fn get_query(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        Self::send(self.request(Method::GET, path).query(query)).await
    }

    async fn call(&self, method: Method, path: &str, body: &Value) -> Reply {
        self.call_with(method, path, body, None).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Reply {
        let mut rb = self
            .request(method, path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(m) = if_match {
            rb = rb.header(reqwest::header::IF_MATCH, m);
        }
        Self::send(rb).await
    }

    /// The default twin of `device` (operator view).
    async fn twin(&self, device: &str) -> Value {
        let r = self
            .get(&format!("/tenants/default/devices/{device}/twins/default"))
            .await;
        assert_eq!(r.status, 200, "GET twin of {device}: {:?}", r.body);
        r.body
    }

    /// PATCH desired of the default twin.
    async fn patch_desired(&self, device: &str, patch: Value, if_match: Option<&str>) -> Reply {
        self.call_with(
            Method::PATCH,
            &format!("/tenants/default/devices/{device}/twins/default/desired"),
            &patch,
            if_match,
        )
        .await
    }

    /// PATCH desired, asserting 200; returns the twin after the change.
    async fn set_desired(&self, device: &str, patch: Value) -> Value {
        let r = self.patch_desired(device, patch, None).await;
        assert_eq!(r.status, 200, "PATCH desired of {device}: {:?}", r.body);
        r.body
    }

    /// A queued command.
    async fn queued(&self, device: &str, id: &str) -> Value {
        let r = self
            .get(&format!(
                "/tenants/default/devices/{device}/queued-commands/{id}"
            ))
            .await;
        assert_eq!(r.status, 200, "GET queued command {id}: {:?}", r.body);
        r.body
    }

    /// Polls a queued command until its state is `state` (at most `within`); returns it.
    async fn wait_command_state(
        &self,
        device: &str,
        id: &str,
        state: &str,
        within: Duration,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let c = self.queued(device, id).await;
            if c["state"] == state {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "command {id} never reached state {state}: {c}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The password of a device registered by [`register`].
fn secret(device: &str) -> String {
    format!("secret-{device}-0123")
}

/// Registers `device` in the default tenant with a password credential, through the API.
async fn register(api: &Api, device: &str) {
    register_spec(api, json!({ "id": device })).await;
}

/// Registers a device from a spec (`{"id", "policy"?, …}`) with a password credential.
async fn register_spec(api: &Api, spec: Value) {
    register_spec_in(api, "default", spec).await;
}

/// Registers a device of `tenant` from a spec with a password credential.
async fn register_spec_in(api: &Api, tenant: &str, spec: Value) {
    let device = spec["id"].as_str().unwrap().to_string();
    let r = api
        .call(Method::POST, &format!("/tenants/{tenant}/devices"), &spec)
        .await;
    assert_eq!(
        r.status, 201,
        "create device {tenant}/{device}: {:?}",
        r.body
    );
    let r = api
        .call(
            Method::POST,
            &format!("/tenants/{tenant}/devices/{device}/credentials"),
            &json!({"kind": "password", "secret": secret(&device)}),
        )
        .await;
    assert_eq!(
        r.status, 201,
        "add password to {tenant}/{device}: {:?}",
        r.body
    );
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

/// MQTT 5 options for a registered device (user name and client id = device id), clean start as
/// asked, a persistent session (one hour) when `persistent`, and room for large twins.
fn v5_device(
    hub: &TestHub,
    device: &str,
    clean: bool,
    persistent: bool,
) -> rumqttc::v5::MqttOptions {
    let mut o = v5_opts(hub, device);
    o.set_credentials(device, secret(device));
    o.set_clean_start(clean);
    let mut props = m5::ConnectProperties::new();
    props.max_packet_size = Some(1 << 20);
    if persistent {
        props.session_expiry_interval = Some(3600);
    }
    o.set_connect_properties(props);
    o
}

/// MQTT 3.1.1 options for a registered device.
fn v4_device(hub: &TestHub, device: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut o = v4_opts(hub, device);
    o.set_credentials(device, secret(device));
    o.set_clean_session(clean);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    V5,
    V311,
}

/// A device's MQTT connection, 5.0 or 3.1.1.
enum Dev {
    V5(Box<V5>),
    V4(V4),
}

impl Dev {
    /// Connects with a clean (non-persistent) session.
    async fn connect(hub: &TestHub, device: &str, proto: Proto) -> Dev {
        match proto {
            Proto::V5 => Dev::V5(Box::new(
                V5::connect(v5_device(hub, device, true, false)).await,
            )),
            Proto::V311 => Dev::V4(V4::connect(v4_device(hub, device, true)).await),
        }
    }

    /// Subscribes at QoS 1 and asserts it was granted.
    async fn subscribe(&mut self, filter: &str) {
        match self {
            Dev::V5(c) => {
                let codes = c.subscribe(filter, m5::QoS::AtLeastOnce).await;
                assert_eq!(
                    codes,
                    [m5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce)],
                    "SUBACK for {filter}"
                );
            }
            Dev::V4(c) => {
                let codes = c.subscribe(filter, rumqttc::QoS::AtLeastOnce).await;
                assert_eq!(
                    codes,
                    [rumqttc::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )],
                    "SUBACK for {filter}"
                );
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK (MQTT 5: asserts it is not negative).
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        match self {
            Dev::V5(c) => {
                let r = c.publish(topic, m5::QoS::AtLeastOnce, false, payload).await;
                assert!(
                    matches!(
                        r,
                        Some(m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers)
                    ),
                    "PUBACK {r:?} for {topic}"
                );
            }
            Dev::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
            }
        }
    }

    /// The next PUBLISH on one of `topics` (others are kept for later): its topic and payload.
    async fn recv_on_any(&mut self, topics: &[&str]) -> (String, Bytes) {
        match self {
            Dev::V5(c) => {
                let p = c
                    .wait_for(&format!("a PUBLISH on {topics:?}"), |p| {
                        matches!(p, m5::Packet::Publish(p) if topics.contains(&topic5(p).as_str()))
                    })
                    .await;
                match p {
                    m5::Packet::Publish(p) => (topic5(&p), p.payload),
                    _ => unreachable!(),
                }
            }
            Dev::V4(c) => {
                let p = c
                    .wait_for(&format!("a PUBLISH on {topics:?}"), |p| {
                        matches!(p, rumqttc::Packet::Publish(p) if topics.contains(&p.topic.as_str()))
                    })
                    .await;
                match p {
                    rumqttc::Packet::Publish(p) => (p.topic, p.payload),
                    _ => unreachable!(),
                }
            }
        }
    }

    /// The payload of the next PUBLISH on `topic`.
    async fn recv_raw(&mut self, topic: &str) -> Bytes {
        self.recv_on_any(&[topic]).await.1
    }

    /// The JSON payload of the next PUBLISH on `topic`.
    async fn recv_json(&mut self, topic: &str) -> Value {
        let raw = self.recv_raw(topic).await;
        serde_json::from_slice(&raw)
            .unwrap_or_else(|e| panic!("payload on {topic} is not JSON ({e}): {raw:?}"))
    }

    /// Asserts that no PUBLISH arrives for `within`.
    async fn expect_no_publish(&mut self, within: Duration) {
        match self {
            Dev::V5(c) => c.expect_no_publish(within).await,
            Dev::V4(c) => c.expect_no_publish(within).await,
        }
    }

    /// Whether the last CONNACK said a session was resumed.
    fn session_present(&self) -> bool {
        match self {
            Dev::V5(c) => c.connack.session_present,
            Dev::V4(c) => c.connack.session_present,
        }
    }

    /// Sends DISCONNECT and waits for the connection to end.
    async fn disconnect(self) {
        match self {
            Dev::V5(c) => (*c).disconnect().await,
            Dev::V4(c) => c.disconnect().await,
        }
    }
}

/// `$devices/{device}/twin/{rest}`.
fn twin_topic(device: &str, rest: &str) -> String {
    format!("$devices/{device}/twin/{rest}")
}

/// Subscribes a device to the answers of its default twin and to its delta (not to `twin/#`:
/// a device must not hear its own `update` and `get` publications).
async fn subscribe_twin(dev: &mut Dev, device: &str) {
    for rest in [
        "update/accepted",
        "update/rejected",
        "get/accepted",
        "get/rejected",
        "delta",
    ] {
        dev.subscribe(&twin_topic(device, rest)).await;
    }
}

/// Publishes a twin update and returns which answer came (`accepted` / `rejected`) and its body.
async fn twin_update(dev: &mut Dev, device: &str, body: &Value) -> (&'static str, Value) {
    let accepted = twin_topic(device, "update/accepted");
    let rejected = twin_topic(device, "update/rejected");
    dev.publish(&twin_topic(device, "update"), body.to_string().as_bytes())
        .await;
    let (topic, payload) = dev.recv_on_any(&[&accepted, &rejected]).await;
    let v: Value = serde_json::from_slice(&payload).unwrap();
    if topic == accepted {
        ("accepted", v)
    } else {
        ("rejected", v)
    }
}

/// A twin update that must be accepted; returns `update/accepted`.
async fn report(dev: &mut Dev, device: &str, body: Value) -> Value {
    let (answer, v) = twin_update(dev, device, &body).await;
    assert_eq!(answer, "accepted", "update {body} was refused: {v}");
    v
}

/// A twin update that must be rejected; returns `update/rejected`.
async fn report_rejected(dev: &mut Dev, device: &str, body: &Value) -> Value {
    let (answer, v) = twin_update(dev, device, body).await;
    assert_eq!(answer, "rejected", "update was accepted: {v}");
    v
}

/// A twin GET over MQTT; returns `get/accepted`.
async fn twin_get(dev: &mut Dev, device: &str, body: &[u8]) -> (Bytes, Value) {
    dev.publish(&twin_topic(device, "get"), body).await;
    let raw = dev.recv_raw(&twin_topic(device, "get/accepted")).await;
    let v = serde_json::from_slice(&raw).unwrap();
    (raw, v)
}

/// Waits until the registry no longer counts `device` as online.
async fn wait_offline(hub: &TestHub, device: &str) {
    wait_until(WAIT, &format!("{device} is offline"), || {
        !hub.hub().registry.is_online("default", device)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 1. Twin round trip
// ---------------------------------------------------------------------------------------------

/// Queues command `name` for `device` (ttl in seconds) and returns its id.
async fn queue_command(api: &Api, device: &str, name: &str, ttl: u64) -> String {
    let r = api
        .call(
            Method::POST,
            &format!("/tenants/default/devices/{device}/commands/{name}?mode=queued&ttl={ttl}"),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_round_trip_over_mqtt5_and_311() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        for (device, proto) in [("rt-5", Proto::V5), ("rt-4", Proto::V311)] {
            register(&api, device).await;
            let mut dev = Dev::connect(&hub, device, proto).await;
            subscribe_twin(&mut dev, device).await;

            let patch = json!({"temp": 21.5, "fw": {"version": "1.0"}});
            let a = report(
                &mut dev,
                device,
                json!({"reported": patch, "clientToken": "t1"}),
            )
            .await;
            assert_eq!(a["version"], 1, "{proto:?}: {a}");
            assert_eq!(a["clientToken"], "t1", "{proto:?}: {a}");
            assert_eq!(a["reported"], patch, "{proto:?}: {a}");
            assert!(a["timestamp"].as_u64().unwrap() > 0, "{proto:?}: {a}");

            // A merge patch: temp replaced, fw kept.
            let a = report(
                &mut dev,
                device,
                json!({"reported": {"temp": 22}, "clientToken": "t2"}),
            )
            .await;
            assert_eq!(
                (a["version"].as_u64(), a["clientToken"].as_str()),
                (Some(2), Some("t2"))
            );

            // GET with a client token, and without a payload.
            let (_, g) = twin_get(&mut dev, device, br#"{"clientToken": "g1"}"#).await;
            assert_eq!(g["clientToken"], "g1", "{proto:?}: {g}");
            assert_eq!(g["version"], 2, "{proto:?}: {g}");
            assert_eq!(
                g["reported"],
                json!({"temp": 22, "fw": {"version": "1.0"}}),
                "{proto:?}: {g}"
            );
            assert_eq!(g["desired"], json!({}), "{proto:?}: {g}");
            assert_eq!(g["delta"], json!({}), "{proto:?}: {g}");
            assert!(
                g.get("tags").is_none(),
                "{proto:?}: the device sees tags: {g}"
            );
            let (_, g) = twin_get(&mut dev, device, b"").await;
            assert_eq!(g["version"], 2, "{proto:?}: {g}");
            assert!(g.get("clientToken").is_none(), "{proto:?}: {g}");

            // The operator sees the same document.
            let t = api.twin(device).await;
            assert_eq!(t["version"], 2, "{t}");
            assert_eq!(t["reported"], g["reported"], "{t}");

            // Nothing else arrived (not the device's own publications either).
            dev.expect_no_publish(QUIET).await;
            dev.disconnect().await;
        }
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Desired → delta → acknowledgements
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_desired_change_reaches_the_device_and_acks_follow() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "acks-1";
        register(&api, device).await;
        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        subscribe_twin(&mut dev, device).await;
        report(
            &mut dev,
            device,
            json!({"reported": {"rate": 5, "mode": "eco"}}),
        )
        .await;

        let t = api
            .set_desired(device, json!({"rate": 10, "mode": "eco", "led": "on"}))
            .await;
        assert_eq!(t["delta"], json!({"rate": 10, "led": "on"}), "{t}");

        // The connected device gets exactly the keys that differ.
        let d = dev.recv_json(&twin_topic(device, "delta")).await;
        assert_eq!(d["delta"], json!({"rate": 10, "led": "on"}), "{d}");
        assert_eq!(d["version"], t["versions"]["desired"], "{d} vs {t}");

        // It applies one key.
        report(&mut dev, device, json!({"reported": {"rate": 10}})).await;
        let t = api.twin(device).await;
        assert_eq!(t["delta"], json!({"led": "on"}), "{t}");
        assert_eq!(t["acks"]["rate"]["status"], "applied", "{t}");
        assert_eq!(t["acks"]["led"]["status"], "pending", "{t}");
        assert_eq!(t["acks"]["mode"]["status"], "applied", "{t}");

        // And rejects the other.
        let a = report(
            &mut dev,
            device,
            json!({"rejected": {"led": "no LED on this board"}, "clientToken": "rj"}),
        )
        .await;
        assert_eq!(a["clientToken"], "rj", "{a}");
        let t = api.twin(device).await;
        assert_eq!(t["acks"]["led"]["status"], "rejected", "{t}");
        assert_eq!(t["acks"]["led"]["reason"], "no LED on this board", "{t}");
        assert_eq!(t["acks"]["rate"]["status"], "applied", "{t}");
        assert_eq!(t["delta"], json!({"led": "on"}), "{t}");

        // Rejecting a key that does not exist in desired is refused.
        let r = report_rejected(&mut dev, device, &json!({"rejected": {"nope": "x"}})).await;
        assert_eq!(r["code"], 400, "{r}");

        // Setting the key again makes it pending again.
        let t = api.set_desired(device, json!({"led": "on"})).await;
        assert_eq!(t["acks"]["led"]["status"], "pending", "{t}");

        // A device may not write desired.
        let r = report_rejected(&mut dev, device, &json!({"desired": {"rate": 1}})).await;
        assert_eq!(r["code"], 400, "{r}");
        assert_eq!(api.twin(device).await["desired"]["rate"], 10);
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Offline devices catch up
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_session_device_gets_the_current_delta_when_it_subscribes() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        for (device, proto) in [("off-c5", Proto::V5), ("off-c4", Proto::V311)] {
            register(&api, device).await;
            let mut dev = Dev::connect(&hub, device, proto).await;
            subscribe_twin(&mut dev, device).await;
            report(
                &mut dev,
                device,
                json!({"reported": {"rate": 1, "unit": "s"}}),
            )
            .await;
            dev.disconnect().await;
            wait_offline(&hub, device).await;

            api.set_desired(device, json!({"rate": 2, "unit": "s", "mode": "fast"}))
                .await;

            // A new clean session: nothing is kept, but subscribing to the delta topic brings
            // the current delta without a GET.
            let mut dev = Dev::connect(&hub, device, proto).await;
            assert!(!dev.session_present(), "{proto:?}");
            dev.subscribe(&twin_topic(device, "delta")).await;
            let d = dev.recv_json(&twin_topic(device, "delta")).await;
            assert_eq!(
                d["delta"],
                json!({"rate": 2, "mode": "fast"}),
                "{proto:?}: {d}"
            );
            assert_eq!(d["version"], 1, "{proto:?}: {d}");
            dev.disconnect().await;
        }
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_device_gets_the_delta_after_reconnecting() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        for (device, proto) in [("off-p5", Proto::V5), ("off-p4", Proto::V311)] {
            register(&api, device).await;
            let connect = |clean: bool| {
                let hub = &hub;
                async move {
                    match proto {
                        Proto::V5 => Dev::V5(Box::new(
                            V5::connect(v5_device(hub, device, clean, true)).await,
                        )),
                        Proto::V311 => Dev::V4(V4::connect(v4_device(hub, device, false)).await),
                    }
                }
            };
            let mut dev = connect(true).await;
            dev.subscribe(&twin_topic(device, "delta")).await;
            dev.disconnect().await;
            wait_offline(&hub, device).await;

            api.set_desired(device, json!({"interval": 30})).await;

            // Resuming the session: the delta arrives without subscribing or asking.
            let mut dev = connect(false).await;
            assert!(
                dev.session_present(),
                "{proto:?}: the session was not resumed"
            );
            let d = dev.recv_json(&twin_topic(device, "delta")).await;
            assert_eq!(d["delta"], json!({"interval": 30}), "{proto:?}: {d}");
            dev.disconnect().await;
        }
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Version conflicts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_conflicts_are_refused() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "ver-1";
        register(&api, device).await;
        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        subscribe_twin(&mut dev, device).await;
        report(&mut dev, device, json!({"reported": {"a": 1}})).await;
        report(&mut dev, device, json!({"reported": {"a": 2}})).await;

        // Operator side: If-Match on an old version.
        let r = api
            .patch_desired(device, json!({"a": 3}), Some("\"1\""))
            .await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.body["code"], "version_conflict", "{:?}", r.body);
        let r = api
            .call(
                Method::PATCH,
                &format!("/tenants/default/devices/{device}/twins/default/desired?version=1"),
                &json!({"a": 3}),
            )
            .await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.body["code"], "version_conflict", "{:?}", r.body);
        let t = api.twin(device).await;
        assert_eq!(
            (t["version"].as_u64(), &t["desired"]),
            (Some(2), &json!({})),
            "{t}"
        );

        // The current ETag works.
        let r = api
            .get(&format!("/tenants/default/devices/{device}/twins/default"))
            .await;
        let etag = r.etag.expect("GET twin has an ETag");
        assert_eq!(etag, "\"2\"");
        let r = api
            .patch_desired(device, json!({"a": 3}), Some(&etag))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.etag.as_deref(), Some("\"3\""));
        dev.recv_json(&twin_topic(device, "delta")).await;

        // Device side: a stale version.
        let rj = report_rejected(
            &mut dev,
            device,
            &json!({"reported": {"a": 3}, "version": 1, "clientToken": "stale"}),
        )
        .await;
        assert_eq!(rj["code"], 409, "{rj}");
        assert_eq!(rj["error"], "version_conflict", "{rj}");
        assert_eq!(rj["clientToken"], "stale", "{rj}");
        assert!(rj["message"].as_str().unwrap().contains('3'), "{rj}");
        // The right one.
        let a = report(
            &mut dev,
            device,
            json!({"reported": {"a": 3}, "version": 3}),
        )
        .await;
        assert_eq!(a["version"], 4, "{a}");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Tags
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_invisible_to_devices() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "tags-1";
        register(&api, device).await;
        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        subscribe_twin(&mut dev, device).await;

        let r = api
            .call(
                Method::PATCH,
                &format!("/tenants/default/devices/{device}/twins/default/tags"),
                &json!({"site": "berlin-secret-site", "owner": "team-hidden"}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["tags"]["site"], "berlin-secret-site");
        // Tags change no delta: nothing is sent.
        dev.expect_no_publish(QUIET).await;

        api.set_desired(device, json!({"rate": 3})).await;
        let raw = dev.recv_raw(&twin_topic(device, "delta")).await;
        let d: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(d["delta"], json!({"rate": 3}), "{d}");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            !text.contains("secret-site") && !text.contains("team-hidden"),
            "{text}"
        );

        let (raw, g) = twin_get(&mut dev, device, b"").await;
        assert!(g.get("tags").is_none(), "{g}");
        assert!(g["versions"].get("tags").is_none(), "{g}");
        assert!(g["metadata"].get("tags").is_none(), "{g}");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            !text.contains("secret-site") && !text.contains("team-hidden"),
            "{text}"
        );

        // Nor does the `documents` topic (the device's view before and after its update).
        dev.subscribe(&twin_topic(device, "documents")).await;
        report(&mut dev, device, json!({"reported": {"y": 2}})).await;
        let raw = dev.recv_raw(&twin_topic(device, "documents")).await;
        let docs: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(docs["current"]["reported"]["y"], 2, "{docs}");
        assert!(docs["previous"]["reported"].get("y").is_none(), "{docs}");
        assert!(docs["current"].get("tags").is_none(), "{docs}");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            !text.contains("secret-site") && !text.contains("team-hidden"),
            "{text}"
        );

        // A device cannot write tags either.
        let (_, _) = twin_update(
            &mut dev,
            device,
            &json!({"reported": {"x": 1}, "tags": {"site": "hacked"}}),
        )
        .await;
        let t = api.twin(device).await;
        assert_eq!(
            t["tags"],
            json!({"site": "berlin-secret-site", "owner": "team-hidden"}),
            "{t}"
        );
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Another device's twin
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_touch_another_devices_twin() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        register(&api, "own-a").await;
        register(&api, "own-b").await;
        let mut b = Dev::connect(&hub, "own-b", Proto::V5).await;
        subscribe_twin(&mut b, "own-b").await;
        report(&mut b, "own-b", json!({"reported": {"owner": "b"}})).await;

        let mut a = V5::connect(v5_device(&hub, "own-a", true, false)).await;
        for rest in ["update", "get"] {
            let r = a
                .publish(
                    &twin_topic("own-b", rest),
                    m5::QoS::AtLeastOnce,
                    false,
                    br#"{"reported": {"owner": "a"}}"#,
                )
                .await;
            assert_eq!(
                r,
                Some(m5::PubAckReason::NotAuthorized),
                "PUBACK for A publishing on B's twin/{rest}"
            );
        }
        let codes = a
            .subscribe(&twin_topic("own-b", "#"), m5::QoS::AtLeastOnce)
            .await;
        assert_eq!(codes, [m5::SubscribeReasonCode::NotAuthorized]);

        // 3.1.1: acknowledged (no negative PUBACK) and dropped.
        drop(a);
        wait_offline(&hub, "own-a").await;
        let mut a4 = V4::connect(v4_device(&hub, "own-a", true)).await;
        a4.publish(
            &twin_topic("own-b", "update"),
            rumqttc::QoS::AtLeastOnce,
            false,
            br#"{"reported": {"owner": "a4"}}"#,
        )
        .await;
        a4.barrier().await;

        // B heard nothing and its twin is unchanged.
        b.expect_no_publish(QUIET).await;
        let t = api.twin("own-b").await;
        assert_eq!(t["version"], 1, "{t}");
        assert_eq!(t["reported"], json!({"owner": "b"}), "{t}");
        let h = api
            .get("/tenants/default/devices/own-b/twins/default/history")
            .await;
        assert_eq!(h.body.as_array().map(Vec::len), Some(1), "{:?}", h.body);
        b.disconnect().await;
        a4.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Limits
// ---------------------------------------------------------------------------------------------

/// `{"k": {"k": … 1}}` with `depth` nested objects, the outermost included.
fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!({ "k": v });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_limits_are_enforced_on_device_updates() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "lim-1";
        register(&api, device).await;
        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        subscribe_twin(&mut dev, device).await;

        // Under the limit: accepted.
        report(
            &mut dev,
            device,
            json!({"reported": {"blob": "a".repeat(30 * 1024)}}),
        )
        .await;
        // Over 32 KiB: 413, naming the limit; nothing of it applied.
        let rj = report_rejected(
            &mut dev,
            device,
            &json!({"reported": {"blob": "b".repeat(33 * 1024)}, "clientToken": "big"}),
        )
        .await;
        assert_eq!(rj["code"], 413, "{rj}");
        assert_eq!(rj["error"], "too_large", "{rj}");
        assert_eq!(rj["clientToken"], "big", "{rj}");
        let msg = rj["message"].as_str().unwrap();
        assert!(
            msg.contains("32768") && msg.contains("twins.max_section_bytes"),
            "{msg}"
        );
        let t = api.twin(device).await;
        assert_eq!(t["version"], 1, "version moved");
        assert!(t["reported"]["blob"].as_str().unwrap().starts_with('a'));

        // Depth: the section root is level 1; 10 is the limit.
        report(&mut dev, device, json!({"reported": {"deep": nested(9)}})).await;
        let rj =
            report_rejected(&mut dev, device, &json!({"reported": {"deep": nested(10)}})).await;
        assert_eq!(rj["code"], 400, "{rj}");
        let msg = rj["message"].as_str().unwrap();
        assert!(
            msg.contains("11") && msg.contains("twins.max_depth"),
            "{msg}"
        );

        // Not JSON at all.
        dev.publish(&twin_topic(device, "update"), b"not json")
            .await;
        let rj = dev.recv_json(&twin_topic(device, "update/rejected")).await;
        assert_eq!(rj["code"], 400, "{rj}");
        assert_eq!(api.twin(device).await["version"], 2);
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Direct commands
// ---------------------------------------------------------------------------------------------

/// Sends a command from a background task (the call waits for the device).
fn invoke(
    api: &Api,
    device: &str,
    name: &str,
    query: &str,
    body: Value,
) -> tokio::task::JoinHandle<(Reply, Duration)> {
    let api = api.clone();
    let path = format!("/tenants/default/devices/{device}/commands/{name}?{query}");
    tokio::spawn(async move {
        let started = Instant::now();
        let r = api.call(Method::POST, &path, &body).await;
        (r, started.elapsed())
    })
}

async fn join(h: tokio::task::JoinHandle<(Reply, Duration)>) -> (Reply, Duration) {
    tokio::time::timeout(Duration::from_secs(15), h)
        .await
        .expect("the command call did not return")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_command_round_trip_over_mqtt5() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "cmd-5";
        register(&api, device).await;
        let mut dev = V5::connect(v5_device(&hub, device, true, false)).await;
        let codes = dev
            .subscribe(
                &format!("$devices/{device}/commands/req/#"),
                m5::QoS::AtLeastOnce,
            )
            .await;
        assert_eq!(
            codes,
            [m5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce)]
        );

        for (name, status) in [("reboot", "200"), ("selftest", "503")] {
            let call = invoke(&api, device, name, "timeout=5", json!({"delay": 3}));
            let req = dev.recv_publish().await;
            let topic = topic5(&req);
            let prefix = format!("$devices/{device}/commands/req/{name}/");
            let rid = topic
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("request topic {topic}"))
                .to_string();
            assert!(!rid.is_empty() && !rid.contains('/'), "{topic}");
            assert_eq!(
                serde_json::from_slice::<Value>(&req.payload).unwrap(),
                json!({"delay": 3})
            );
            let props = req.properties.clone().expect("MQTT 5 request properties");
            let response_topic = props.response_topic.clone().expect("Response Topic");
            assert_eq!(
                response_topic,
                format!("$devices/{device}/commands/res/{rid}")
            );
            let correlation = props.correlation_data.clone().expect("Correlation Data");
            assert_eq!(correlation.as_ref(), rid.as_bytes());

            let answer = m5::PublishProperties {
                correlation_data: Some(correlation),
                user_properties: vec![("status".into(), status.into())],
                ..Default::default()
            };
            let r = dev
                .publish_props(
                    &response_topic,
                    m5::QoS::AtLeastOnce,
                    false,
                    br#"{"rebooting": true}"#,
                    Some(answer),
                )
                .await;
            assert!(
                matches!(
                    r,
                    Some(m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers)
                ),
                "{r:?}"
            );
            let (reply, _) = join(call).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            assert_eq!(
                reply.body,
                json!({"status": status.parse::<u16>().unwrap(), "payload": {"rebooting": true}}),
                "{name}"
            );
        }
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_command_round_trip_over_mqtt311() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "cmd-4";
        register(&api, device).await;
        let mut dev = V4::connect(v4_device(&hub, device, true)).await;
        let codes = dev
            .subscribe(
                &format!("$devices/{device}/commands/req/#"),
                rumqttc::QoS::AtLeastOnce,
            )
            .await;
        assert_eq!(
            codes,
            [rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::AtLeastOnce
            )]
        );

        // Status in the topic, or none (200).
        for (suffix, expected) in [("/200", 200), ("/500", 500), ("", 200)] {
            let call = invoke(&api, device, "reboot", "timeout=5", json!({"why": "test"}));
            let req = dev.recv_publish().await;
            let rid = req
                .topic
                .strip_prefix(&format!("$devices/{device}/commands/req/reboot/"))
                .unwrap_or_else(|| panic!("request topic {}", req.topic))
                .to_string();
            assert_eq!(
                serde_json::from_slice::<Value>(&req.payload).unwrap(),
                json!({"why": "test"})
            );
            dev.publish(
                &format!("$devices/{device}/commands/res/{rid}{suffix}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                br#"{"ok": true}"#,
            )
            .await;
            let (reply, _) = join(call).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            assert_eq!(
                reply.body,
                json!({"status": expected, "payload": {"ok": true}}),
                "suffix {suffix:?}"
            );
        }
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Direct commands that get no answer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_command_to_an_offline_or_silent_device() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "quiet-1";
        register(&api, device).await;

        // Offline: refused at once.
        let (r, took) = join(invoke(&api, device, "reboot", "timeout=30", json!({}))).await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.body["code"], "device_offline", "{:?}", r.body);
        assert!(took < Duration::from_secs(1), "took {took:?}");

        // Connected but not subscribed to its command topic.
        let mut dev = V5::connect(v5_device(&hub, device, true, false)).await;
        let (r, took) = join(invoke(&api, device, "reboot", "timeout=30", json!({}))).await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.body["code"], "device_not_listening", "{:?}", r.body);
        assert!(took < Duration::from_secs(1), "took {took:?}");

        // Subscribed but silent: 504 after the timeout.
        dev.subscribe(
            &format!("$devices/{device}/commands/req/#"),
            m5::QoS::AtLeastOnce,
        )
        .await;
        let call = invoke(&api, device, "reboot", "timeout=1", json!({}));
        let req = dev.recv_publish().await;
        assert!(topic5(&req).starts_with(&format!("$devices/{device}/commands/req/reboot/")));
        let (r, took) = join(call).await;
        assert_eq!(r.status, 504, "{:?}", r.body);
        assert_eq!(r.body["code"], "command_timeout", "{:?}", r.body);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "took {took:?}"
        );

        // Disconnected again: offline at once.
        dev.disconnect().await;
        wait_offline(&hub, device).await;
        let (r, took) = join(invoke(&api, device, "reboot", "timeout=30", json!({}))).await;
        assert_eq!(r.body["code"], "device_offline", "{:?}", r.body);
        assert!(took < Duration::from_secs(1), "took {took:?}");
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 10. Queued commands
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_command_is_delivered_when_the_device_comes_online() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "queue-1";
        register(&api, device).await;

        let r = api
            .call(
                Method::POST,
                &format!("/tenants/default/devices/{device}/commands/update?mode=queued&ttl=60"),
                &json!({"url": "https://example.invalid/fw-2.bin"}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert_eq!(r.body["state"], "queued", "{:?}", r.body);
        assert_eq!(r.body["attempts"], 0, "{:?}", r.body);
        let id = r.body["id"].as_str().unwrap().to_string();
        assert_eq!(api.queued(device, &id).await["state"], "queued");

        // The device comes online (acknowledging by hand) and subscribes.
        let mut opts = v5_device(&hub, device, true, false);
        opts.set_manual_acks(true);
        let mut dev = V5::connect(opts).await;
        dev.subscribe(
            &format!("$devices/{device}/commands/req/#"),
            m5::QoS::AtLeastOnce,
        )
        .await;
        let req = dev.recv_publish().await;
        assert_eq!(
            topic5(&req),
            format!("$devices/{device}/commands/req/update/{id}")
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&req.payload).unwrap(),
            json!({"url": "https://example.invalid/fw-2.bin"})
        );
        let c = api.queued(device, &id).await;
        assert_eq!(c["state"], "sent", "{c}");
        assert_eq!(c["attempts"], 1, "{c}");

        // PUBACK → delivered.
        dev.client.ack(&req).await.unwrap();
        let c = api.wait_command_state(device, &id, "delivered", WAIT).await;
        assert_eq!(c["attempts"], 1, "{c}");

        // The answer → succeeded.
        let response_topic = req
            .properties
            .as_ref()
            .and_then(|p| p.response_topic.clone())
            .expect("Response Topic");
        dev.publish(
            &response_topic,
            m5::QoS::AtLeastOnce,
            false,
            br#"{"done": true}"#,
        )
        .await;
        let c = api.wait_command_state(device, &id, "succeeded", WAIT).await;
        assert_eq!(c["attempts"], 1, "{c}");
        assert_eq!(c["status"], 200, "{c}");
        assert_eq!(c["response"], json!({"done": true}), "{c}");

        let list = api
            .get(&format!(
                "/tenants/default/devices/{device}/queued-commands"
            ))
            .await;
        assert_eq!(list.status, 200);
        assert_eq!(list.body[0]["id"], id.as_str(), "{:?}", list.body);

        // Queued while the device is online: sent at once; a 404 answer fails it.
        let r = api
            .call(
                Method::POST,
                &format!("/tenants/default/devices/{device}/commands/locate?mode=queued"),
                &json!({}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        let id2 = r.body["id"].as_str().unwrap().to_string();
        let req = dev.recv_publish().await;
        assert_eq!(
            topic5(&req),
            format!("$devices/{device}/commands/req/locate/{id2}")
        );
        dev.client.ack(&req).await.unwrap();
        api.wait_command_state(device, &id2, "delivered", WAIT)
            .await;
        dev.publish(
            &format!("$devices/{device}/commands/res/{id2}/404"),
            m5::QoS::AtLeastOnce,
            false,
            b"",
        )
        .await;
        let c = api.wait_command_state(device, &id2, "failed", WAIT).await;
        assert_eq!(
            (c["status"].as_u64(), c["attempts"].as_u64()),
            (Some(404), Some(1)),
            "{c}"
        );
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_queued_command_is_sent_again_to_a_fresh_session() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "queue-2";
        register(&api, device).await;
        let id = queue_command(&api, device, "ping", 60).await;

        let filter = format!("$devices/{device}/commands/req/#");
        let mut opts = v5_device(&hub, device, true, false);
        opts.set_manual_acks(true);
        let mut dev = V5::connect(opts).await;
        dev.subscribe(&filter, m5::QoS::AtLeastOnce).await;
        let first = dev.recv_publish().await;
        assert!(topic5(&first).ends_with(&id));
        // Gone without acknowledging.
        drop(dev);
        wait_offline(&hub, device).await;

        let mut dev = V5::connect(v5_device(&hub, device, true, false)).await;
        dev.subscribe(&filter, m5::QoS::AtLeastOnce).await;
        let again = dev.recv_publish().await;
        assert_eq!(topic5(&again), topic5(&first), "the same request id");
        let c = api.wait_command_state(device, &id, "delivered", WAIT).await;
        assert_eq!(c["attempts"], 2, "{c}");
        dev.publish(
            &format!("$devices/{device}/commands/res/{id}/500"),
            m5::QoS::AtLeastOnce,
            false,
            b"broken",
        )
        .await;
        let c = api.wait_command_state(device, &id, "failed", WAIT).await;
        assert_eq!(c["status"], 500, "{c}");
        assert_eq!(c["response"], "broken", "{c}");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_in_the_same_session_does_not_resend_or_burn_attempts() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "queue-resub";
        register(&api, device).await;
        let id = queue_command(&api, device, "ping", 60).await;
        let filter = format!("$devices/{device}/commands/req/#");
        let mut opts = v5_device(&hub, device, true, false);
        opts.set_manual_acks(true);
        let mut dev = V5::connect(opts).await;
        dev.subscribe(&filter, m5::QoS::AtLeastOnce).await;
        let first = dev.recv_publish().await;
        assert!(topic5(&first).ends_with(&id));
        // The same SUBSCRIBE again (libraries do this on every reconnect of their own loop).
        for _ in 0..3 {
            dev.subscribe(&filter, m5::QoS::AtLeastOnce).await;
        }
        dev.expect_no_publish(QUIET).await;
        let c = api.queued(device, &id).await;
        assert_eq!(c["attempts"], 1, "{c}");
        assert_eq!(c["state"], "sent", "{c}");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_command_expires_when_the_device_stays_away() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "queue-3";
        register(&api, device).await;
        let id = queue_command(&api, device, "reboot", 1).await;
        // The hub sweeps every 5 s.
        let c = api
            .wait_command_state(device, &id, "expired", Duration::from_secs(10))
            .await;
        assert_eq!(c["attempts"], 0, "{c}");
        assert!(c["error"].as_str().is_some_and(|e| !e.is_empty()), "{c}");

        // An expired command is not sent when the device shows up.
        let mut dev = V5::connect(v5_device(&hub, device, true, false)).await;
        dev.subscribe(
            &format!("$devices/{device}/commands/req/#"),
            m5::QoS::AtLeastOnce,
        )
        .await;
        dev.expect_no_publish(QUIET).await;
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 11. Lifecycle events
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_a_client_whose_policy_allows_them() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let policy = json!({"version": 1, "statements": [
            {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
            {"effect": "allow", "actions": ["subscribe", "receive"], "resources": ["$events/devices/+/#"]}
        ]});
        let r = api
            .call(Method::PUT, "/tenants/default/policies/lifecycle-monitor", &policy)
            .await;
        assert!(matches!(r.status, 200 | 201), "{:?}", r.body);
        register_spec(&api, json!({"id": "monitor", "policy": "lifecycle-monitor"})).await;
        register(&api, "ev-1").await;

        let mut monitor = V5::connect(v5_device(&hub, "monitor", true, false)).await;
        for filter in ["$events/devices/+/connected", "$events/devices/+/disconnected"] {
            let codes = monitor.subscribe(filter, m5::QoS::AtLeastOnce).await;
            assert_eq!(
                codes,
                [m5::SubscribeReasonCode::Success(m5::QoS::AtLeastOnce)],
                "{filter}"
            );
        }
        let connected = "$events/devices/ev-1/connected";
        let disconnected = "$events/devices/ev-1/disconnected";
        async fn event(monitor: &mut V5, topic: &str) -> Value {
            let p = monitor
                .wait_for(topic, |p| matches!(p, m5::Packet::Publish(p) if topic5(p) == topic))
                .await;
            match p {
                m5::Packet::Publish(p) => serde_json::from_slice(&p.payload).unwrap(),
                _ => unreachable!(),
            }
        }

        // A clean DISCONNECT.
        let mut dev = V5::connect(v5_device(&hub, "ev-1", true, false)).await;
        let e = event(&mut monitor, connected).await;
        assert_eq!(e["event"], "connected", "{e}");
        assert_eq!(e["deviceId"], "ev-1", "{e}");
        assert_eq!(e["clientId"], "ev-1", "{e}");
        assert_eq!(e["sessionPresent"], false, "{e}");
        // The default policy gives devices no lifecycle events.
        let codes = dev
            .subscribe("$events/devices/+/connected", m5::QoS::AtLeastOnce)
            .await;
        assert_eq!(codes, [m5::SubscribeReasonCode::NotAuthorized]);
        dev.disconnect().await;
        let e = event(&mut monitor, disconnected).await;
        assert_eq!(e["event"], "disconnected", "{e}");
        assert_eq!(e["deviceId"], "ev-1", "{e}");
        assert_eq!(e["reason"], "client_disconnect", "{e}");

        // A dropped client (its event loop and socket go, no DISCONNECT).
        let dev = V5::connect(v5_device(&hub, "ev-1", true, false)).await;
        event(&mut monitor, connected).await;
        drop(dev);
        let e = event(&mut monitor, disconnected).await;
        assert_eq!(e["reason"], "connection_lost", "{e}");

        // A raw 3.1.1 socket closed after CONNACK.
        let mut c = connect_packet(ProtocolVersion::V311, "ev-1");
        c.username = Some("ev-1".into());
        c.password = Some(Bytes::from(secret("ev-1")));
        let mut raw = RawClient::connect(hub.mqtt, ProtocolVersion::V311)
            .await
            .unwrap();
        raw.send(&Packet::Connect(Box::new(c))).await.unwrap();
        match raw.recv(WAIT).await.unwrap() {
            Packet::ConnAck(a) => assert_eq!(a.code, 0, "{a:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        event(&mut monitor, connected).await;
        drop(raw);
        let e = event(&mut monitor, disconnected).await;
        assert_eq!(e["reason"], "connection_lost", "{e}");

        // A resumed session, then a takeover by a second connection with the same client id.
        let first = V5::connect(v5_device(&hub, "ev-1", true, true)).await;
        assert_eq!(event(&mut monitor, connected).await["sessionPresent"], false);
        first.disconnect().await;
        assert_eq!(
            event(&mut monitor, disconnected).await["reason"],
            "client_disconnect"
        );
        let mut resumed = V5::connect(v5_device(&hub, "ev-1", false, true)).await;
        assert!(resumed.connack.session_present);
        let e = event(&mut monitor, connected).await;
        assert_eq!(e["sessionPresent"], true, "{e}");
        let second = V5::connect(v5_device(&hub, "ev-1", false, true)).await;
        let e = event(&mut monitor, disconnected).await;
        assert_eq!(e["reason"], "taken_over", "{e}");
        assert_eq!(event(&mut monitor, connected).await["sessionPresent"], true);
        resumed.wait_closed(WAIT).await;
        second.disconnect().await;
        assert_eq!(
            event(&mut monitor, disconnected).await["reason"],
            "client_disconnect"
        );

        monitor.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 12. Live change stream
// ---------------------------------------------------------------------------------------------

/// Reads Server-Sent Events until one named `event` whose data satisfies `pred`.
async fn next_sse(
    resp: &mut reqwest::Response,
    buf: &mut String,
    event: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            // Events end with a blank line.
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut name = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name == event
                    && let Ok(v) = serde_json::from_str::<Value>(&data)
                    && pred(&v)
                {
                    return v;
                }
            }
            let chunk = resp
                .chunk()
                .await
                .expect("reading the event stream")
                .expect("the event stream ended");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event} event within 5 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_reports_a_device_update() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "watch-1";
        register(&api, device).await;
        register(&api, "watch-other").await;

        let open = |query: &str| {
            let rb = api.request(Method::GET, &format!("/tenants/default/twins/watch{query}"));
            async move {
                tokio::time::timeout(WAIT, rb.send())
                    .await
                    .expect("watch did not answer")
                    .expect("watch failed")
            }
        };
        let mut all = open("").await;
        assert_eq!(all.status().as_u16(), 200);
        let ct = all
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            ct.as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "{ct:?}"
        );
        let mut other = open("?device=watch-other").await;
        assert_eq!(other.status().as_u16(), 200);

        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        subscribe_twin(&mut dev, device).await;
        report(
            &mut dev,
            device,
            json!({"reported": {"fw_version": "3.1"}, "clientToken": "w1"}),
        )
        .await;

        let mut buf = String::new();
        let change = next_sse(&mut all, &mut buf, "change", |v| v["deviceId"] == device).await;
        assert_eq!(change["name"], "default", "{change}");
        assert_eq!(change["section"], "reported", "{change}");
        assert_eq!(change["version"], 1, "{change}");
        assert_eq!(change["patch"], json!({"fw_version": "3.1"}), "{change}");
        assert_eq!(change["actor"], format!("device:{device}"), "{change}");

        // The operator's change too.
        api.set_desired(device, json!({"fw_version": "3.2"})).await;
        let change = next_sse(&mut all, &mut buf, "change", |v| v["deviceId"] == device).await;
        assert_eq!(change["section"], "desired", "{change}");
        assert_eq!(change["version"], 2, "{change}");

        // A stream filtered on another device saw neither.
        let quiet = tokio::time::timeout(QUIET, other.chunk()).await;
        if let Ok(Ok(Some(chunk))) = &quiet {
            assert!(
                !String::from_utf8_lossy(chunk).contains("event: change"),
                "{chunk:?}"
            );
        }
        drop(all);
        drop(other);
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 13. Fleet queries and counts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_query_and_counts_over_http() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let fleet = [("fq-1", "1.0"), ("fq-2", "1.0"), ("fq-3", "2.0")];
        for (device, fw) in fleet {
            register(&api, device).await;
            let mut dev = Dev::connect(&hub, device, Proto::V311).await;
            subscribe_twin(&mut dev, device).await;
            report(&mut dev, device, json!({"reported": {"fw_version": fw}})).await;
            dev.disconnect().await;
            api.set_desired(device, json!({"fw_version": "2.0"})).await;
        }

        let r = api
            .get_query(
                "/tenants/default/twins",
                &[("where", "reported.fw_version != desired.fw_version")],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let ids: Vec<&str> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["deviceId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["fq-1", "fq-2"], "{:?}", r.body);
        assert!(r.body["next"].is_null(), "{:?}", r.body);
        assert_eq!(r.body["items"][0]["reported"]["fw_version"], "1.0");

        // A page at a time.
        let filter = "reported.fw_version != desired.fw_version";
        let r = api
            .get_query(
                "/tenants/default/twins",
                &[("where", filter), ("limit", "1")],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.body["items"].as_array().map(Vec::len),
            Some(1),
            "{:?}",
            r.body
        );
        assert_eq!(r.body["items"][0]["deviceId"], "fq-1", "{:?}", r.body);
        let cursor = r.body["next"].as_str().expect("a next cursor").to_string();
        let r = api
            .get_query(
                "/tenants/default/twins",
                &[("where", filter), ("limit", "1"), ("cursor", &cursor)],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.body["items"].as_array().map(Vec::len),
            Some(1),
            "{:?}",
            r.body
        );
        assert_eq!(r.body["items"][0]["deviceId"], "fq-2", "{:?}", r.body);
        assert!(r.body["next"].is_null(), "{:?}", r.body);

        let r = api
            .get_query(
                "/tenants/default/twins/counts",
                &[("by", "reported.fw_version")],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.body,
            json!([{"value": "1.0", "count": 2}, {"value": "2.0", "count": 1}])
        );
        let r = api
            .get_query(
                "/tenants/default/twins/counts",
                &[
                    ("by", "reported.fw_version"),
                    ("where", "deviceId != 'fq-1'"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.body,
            json!([{"value": "1.0", "count": 1}, {"value": "2.0", "count": 1}])
        );

        // A filter that does not parse: 400 with a code.
        let r = api
            .get_query(
                "/tenants/default/twins",
                &[("where", "reported.fw_version !=")],
            )
            .await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.body["code"], "invalid_query", "{:?}", r.body);
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// More: named twins, persistent sessions and queued commands, tenant isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_twins_work_like_the_default_twin() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "named-1";
        register(&api, device).await;
        let named = |rest: &str| format!("$devices/{device}/twin/name/fw/{rest}");

        // The operator writes a named twin while the device is away.
        let r = api
            .call(
                Method::PATCH,
                &format!("/tenants/default/devices/{device}/twins/fw/desired"),
                &json!({"target": "2.0", "channel": "beta"}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["name"], "fw", "{:?}", r.body);

        let mut dev = Dev::connect(&hub, device, Proto::V5).await;
        for rest in ["update/accepted", "update/rejected", "get/accepted"] {
            dev.subscribe(&named(rest)).await;
        }
        dev.publish(
            &named("update"),
            br#"{"reported": {"target": "2.0"}, "clientToken": "n1"}"#,
        )
        .await;
        let a = dev.recv_json(&named("update/accepted")).await;
        assert_eq!(
            (a["version"].as_u64(), a["clientToken"].as_str()),
            (Some(2), Some("n1")),
            "{a}"
        );
        dev.publish(&named("get"), b"").await;
        let g = dev.recv_json(&named("get/accepted")).await;
        assert_eq!(g["delta"], json!({"channel": "beta"}), "{g}");
        assert_eq!(g["acks"]["target"]["status"], "applied", "{g}");

        // The default twin is untouched, and the device has just the one twin.
        assert_eq!(api.twin(device).await["version"], 0);
        let r = api
            .get(&format!("/tenants/default/devices/{device}/twins"))
            .await;
        assert_eq!(r.body, json!(["fw"]));

        // Subscribing to the named twin's delta topic brings its current delta, as it does for
        // the default twin (docs/device-api.md: "when a device … subscribes to its delta topic,
        // the hub sends the current delta").
        dev.subscribe(&named("delta")).await;
        let d = dev.recv_json(&named("delta")).await;
        assert_eq!(d["delta"], json!({"channel": "beta"}), "{d}");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_command_reaches_a_resumed_session_without_a_new_subscription() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let device = "queue-4";
        register(&api, device).await;
        let mut dev = V5::connect(v5_device(&hub, device, true, true)).await;
        dev.subscribe(
            &format!("$devices/{device}/commands/req/#"),
            m5::QoS::AtLeastOnce,
        )
        .await;
        dev.disconnect().await;
        wait_offline(&hub, device).await;

        let r = api
            .call(
                Method::POST,
                &format!("/tenants/default/devices/{device}/commands/sync?mode=queued&ttl=60"),
                &json!({"full": true}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        let id = r.body["id"].as_str().unwrap().to_string();

        let mut dev = V5::connect(v5_device(&hub, device, false, true)).await;
        assert!(dev.connack.session_present);
        let req = dev.recv_publish().await;
        assert_eq!(
            topic5(&req),
            format!("$devices/{device}/commands/req/sync/{id}")
        );
        let c = api.wait_command_state(device, &id, "delivered", WAIT).await;
        assert_eq!(c["attempts"], 1, "{c}");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

/// MQTT 5 options for device `device` of `tenant` (user name `tenant/device`).
fn v5_tenant_device(hub: &TestHub, tenant: &str, device: &str) -> rumqttc::v5::MqttOptions {
    let mut o = v5_device(hub, device, true, false);
    o.set_credentials(format!("{tenant}/{device}"), secret(device));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_and_commands_are_isolated_between_tenants() {
    bounded(async {
        let hub = secured_hub().await;
        let api = Api::new(&hub);
        let r = api
            .call(Method::POST, "/tenants", &json!({"id": "tx"}))
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        // The same device id in two tenants.
        register_spec_in(&api, "default", json!({"id": "dup"})).await;
        register_spec_in(&api, "tx", json!({"id": "dup"})).await;

        let mut watch = api
            .request(Method::GET, "/tenants/default/twins/watch")
            .send()
            .await
            .unwrap();
        assert_eq!(watch.status().as_u16(), 200);
        let mut buf = String::new();

        let mut d = Dev::V5(Box::new(
            V5::connect(v5_tenant_device(&hub, "default", "dup")).await,
        ));
        let mut x = Dev::V5(Box::new(
            V5::connect(v5_tenant_device(&hub, "tx", "dup")).await,
        ));
        subscribe_twin(&mut d, "dup").await;
        subscribe_twin(&mut x, "dup").await;
        x.subscribe("$devices/dup/commands/req/#").await;
        report(&mut x, "dup", json!({"reported": {"site": "tx-site"}})).await;
        report(&mut d, "dup", json!({"reported": {"site": "default-site"}})).await;

        // The default tenant's stream shows its own change only.
        let change = next_sse(&mut watch, &mut buf, "change", |v| v["deviceId"] == "dup").await;
        assert_eq!(change["patch"], json!({"site": "default-site"}), "{change}");

        let t = api.twin("dup").await;
        assert_eq!(
            (t["version"].as_u64(), &t["reported"]),
            (Some(1), &json!({"site": "default-site"}))
        );
        let r = api.get("/tenants/tx/devices/dup/twins/default").await;
        assert_eq!(
            r.body["reported"],
            json!({"site": "tx-site"}),
            "{:?}",
            r.body
        );

        // A desired change in tx reaches tx's device only.
        let r = api
            .call(
                Method::PATCH,
                "/tenants/tx/devices/dup/twins/default/desired",
                &json!({"mode": "tx-only"}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let delta = x.recv_json("$devices/dup/twin/delta").await;
        assert_eq!(delta["delta"], json!({"mode": "tx-only"}), "{delta}");
        d.expect_no_publish(QUIET).await;
        let quiet = tokio::time::timeout(QUIET, watch.chunk()).await;
        if let Ok(Ok(Some(chunk))) = &quiet {
            assert!(
                !String::from_utf8_lossy(chunk).contains("tx-only"),
                "{chunk:?}"
            );
        }

        // Queries and counts are per tenant.
        let r = api.get_query("/tenants/default/twins", &[]).await;
        let items = r.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{:?}", r.body);
        assert_eq!(items[0]["reported"]["site"], "default-site");
        let r = api
            .get_query("/tenants/tx/twins/counts", &[("by", "reported.site")])
            .await;
        assert_eq!(r.body, json!([{"value": "tx-site", "count": 1}]));

        // A command to default/dup while only tx/dup listens: offline, not routed to tx.
        d.disconnect().await;
        wait_offline(&hub, "dup").await;
        let (r, _) = join(invoke(&api, "dup", "reboot", "timeout=2", json!({}))).await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert_eq!(r.body["code"], "device_offline", "{:?}", r.body);
        x.expect_no_publish(QUIET).await;
        drop(watch);
        x.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_are_bounded_and_can_be_cancelled() {
    bounded(async {
        let hub = TestHub::start_with(|cfg| {
            cfg.allow_anonymous = false;
            cfg.registry.auth_backoff.free_failures = 10_000;
            cfg.commands.max_queued_per_device = 2;
        })
        .await
        .unwrap();
        let api = Api::new(&hub);
        let device = "queue-5";
        register(&api, device).await;
        let queue = |name: &str, body: Value| {
            let api = api.clone();
            let path =
                format!("/tenants/default/devices/{device}/commands/{name}?mode=queued&ttl=60");
            async move { api.call(Method::POST, &path, &body).await }
        };
        let a = queue("a", json!({})).await;
        assert_eq!(a.status, 202, "{:?}", a.body);
        let b = queue("b", json!({})).await;
        assert_eq!(b.status, 202, "{:?}", b.body);
        let c = queue("c", json!({})).await;
        assert_eq!(c.status, 429, "{:?}", c.body);
        assert_eq!(c.body["code"], "queue_full", "{:?}", c.body);

        // Payloads are bounded too (commands.max_payload_bytes, 64 KiB).
        let big = queue("big", json!({"blob": "z".repeat(65 * 1024)})).await;
        assert_eq!(big.status, 400, "{:?}", big.body);
        assert!(
            big.body["message"]
                .as_str()
                .is_some_and(|m| m.contains("commands.max_payload_bytes")),
            "{:?}",
            big.body
        );

        // Cancelling one makes room; a cancelled command is never sent.
        let a_id = a.body["id"].as_str().unwrap().to_string();
        let path = format!("/tenants/default/devices/{device}/queued-commands/{a_id}");
        let r = Api::send(api.request(Method::DELETE, &path)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["state"], "cancelled", "{:?}", r.body);
        let c = queue("c", json!({})).await;
        assert_eq!(c.status, 202, "{:?}", c.body);

        let mut dev = V5::connect(v5_device(&hub, device, true, false)).await;
        dev.subscribe(
            &format!("$devices/{device}/commands/req/#"),
            m5::QoS::AtLeastOnce,
        )
        .await;
        let mut names = Vec::new();
        for _ in 0..2 {
            let p = dev.recv_publish().await;
            let t = topic5(&p);
            names.push(t.split('/').nth(4).unwrap().to_string());
        }
        assert_eq!(
            names,
            ["b", "c"],
            "oldest first, the cancelled one left out"
        );
        dev.expect_no_publish(QUIET).await;
        assert_eq!(api.queued(device, &a_id).await["state"], "cancelled");
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}
