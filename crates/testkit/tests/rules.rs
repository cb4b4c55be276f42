//! Rules running in the hub, end to end: rules created through the operator API, messages
//! published and received over MQTT (rumqttc 3.1.1), webhooks against a local axum server.
//! Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::*;
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub, test_config};
use rumqttc::QoS;
use serde_json::{Value, json};

/// Calls the operator API as the admin; returns status and JSON body (`Null` when empty).
async fn api(
    hub: &TestHub,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, format!("{}{path}", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn create_rule(hub: &TestHub, tenant: &str, rule: Value) {
    let (status, body) = api(
        hub,
        reqwest::Method::POST,
        &format!("/tenants/{tenant}/rules"),
        Some(rule),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn stats(hub: &TestHub, tenant: &str, id: &str) -> Value {
    let (status, body) = api(
        hub,
        reqwest::Method::GET,
        &format!("/tenants/{tenant}/rules/{id}/stats"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls the rule's stats until `f` holds (at most 10 s).
async fn stats_until(
    hub: &TestHub,
    tenant: &str,
    id: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(hub, tenant, id).await;
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A local webhook receiver answering `script`'s statuses in turn (then 200) after `delay`.
struct Receiver {
    url: String,
    calls: Arc<parking_lot::Mutex<Vec<(HeaderMap, String)>>>,
}

async fn receiver(script: Vec<u16>, delay: Duration) -> Receiver {
    let calls: Arc<parking_lot::Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::any(move |headers: HeaderMap, body: String| {
            let (c, n, script) = (c.clone(), n.clone(), script.clone());
            async move {
                tokio::time::sleep(delay).await;
                c.lock().push((headers, body));
                let i = n.fetch_add(1, SeqCst);
                StatusCode::from_u16(*script.get(i).unwrap_or(&200)).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver {
        url: format!("http://{addr}"),
        calls,
    }
}

#[tokio::test]
async fn matching_message_is_republished_on_the_templated_topic() {
    let hub = TestHub::start().await.unwrap();
    create_rule(&hub, "default", json!({
        "id": "hot",
        "sql": "SELECT temp AS t, topic(2) AS device FROM 'devices/+/telemetry' WHERE temp > 30",
        "actions": [{"type": "republish", "topic": "alerts/${topic(2)}", "qos": 1}],
    }))
    .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publisher
        .publish(
            "devices/d1/telemetry",
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 20}"#,
        )
        .await;
    publisher
        .publish(
            "devices/d2/telemetry",
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 31.5}"#,
        )
        .await;
    let p = tokio::time::timeout(WAIT, sub.recv_publish())
        .await
        .expect("republished");
    assert_eq!(p.topic, "alerts/d2");
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"t": 31.5, "device": "d2"})
    );
    sub.expect_no_publish(QUIET).await;
    let s = stats_until(&hub, "default", "hot", "both evaluated", |s| {
        s["matched"] == 2
    })
    .await;
    assert_eq!(
        (s["passed"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["actions"][0]["successes"], 1);
    let text = metrics(&hub).await;
    assert!(
        text.contains(r#"ferrohub_rule_matched{tenant="default",rule="hot"} 2"#),
        "{text}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_rule_never_sees_another_tenants_messages() {
    let hub = TestHub::start().await.unwrap();
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants",
        Some(json!({"id": "tenant-b"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let rule = |id: &str| {
        json!({"id": id, "sql": "SELECT * FROM 'sensors/#'",
               "actions": [{"type": "republish", "topic": "copy/${topic(2)}"}]})
    };
    create_rule(&hub, "tenant-b", rule("in-b")).await;
    create_rule(&hub, "default", rule("in-default")).await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publisher
        .publish("sensors/s1", QoS::AtLeastOnce, false, br#"{"x": 1}"#)
        .await;
    stats_until(
        &hub,
        "default",
        "in-default",
        "the default tenant's rule ran",
        |s| s["matched"] == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = stats(&hub, "tenant-b", "in-b").await;
    assert_eq!(b["matched"], 0, "{b}");
    hub.stop().await;
}

#[tokio::test]
async fn webhook_gets_templated_body_and_headers_and_is_retried() {
    let hub = TestHub::start().await.unwrap();
    let r = receiver(vec![500, 503], Duration::ZERO).await;
    create_rule(
        &hub,
        "default",
        json!({
            "id": "hook",
            "sql": "SELECT temp FROM 'devices/+/telemetry'",
            "actions": [{"type": "webhook", "url": format!("{}/in/${{topic(2)}}", r.url),
                         "headers": {"x-device": "${topic(2)}"},
                         "body": "{\"device\": \"${topic(2)}\", \"temp\": ${temp}}",
                         "max_attempts": 3, "backoff_ms": 20}],
        }),
    )
    .await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publisher
        .publish(
            "devices/d5/telemetry",
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 7}"#,
        )
        .await;
    let s = stats_until(&hub, "default", "hook", "delivered", |s| {
        s["actions"][0]["successes"] == 1
    })
    .await;
    assert_eq!(r.calls.lock().len(), 3, "two failures, then success");
    assert_eq!(
        (
            s["actions"][0]["errors"].as_u64(),
            s["actions"][0]["retries"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let (headers, body) = r.calls.lock()[2].clone();
    assert_eq!(headers["x-device"], "d5");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"device": "d5", "temp": 7})
    );
    let (_, letters) = api(
        &hub,
        reqwest::Method::GET,
        "/tenants/default/rules/hook/dead-letters",
        None,
    )
    .await;
    assert_eq!(letters, json!([]));
    hub.stop().await;
}

#[tokio::test]
async fn failing_webhook_ends_in_dead_letters_and_fires_the_error_action() {
    let hub = TestHub::start().await.unwrap();
    let r = receiver(vec![500; 10], Duration::ZERO).await;
    create_rule(&hub, "default", json!({
        "id": "doomed",
        "sql": "SELECT * FROM 'jobs/#'",
        "actions": [{"type": "webhook", "url": format!("{}/h", r.url), "max_attempts": 3, "backoff_ms": 10}],
        "error_action": {"type": "republish", "topic": "rule-errors/${rule}"},
    }))
    .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("rule-errors/#", QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publisher
        .publish("jobs/j1", QoS::AtLeastOnce, false, br#"{"job": 1}"#)
        .await;
    let p = tokio::time::timeout(Duration::from_secs(10), sub.recv_publish())
        .await
        .expect("error action");
    assert_eq!(p.topic, "rule-errors/doomed");
    let doc: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(doc["attempts"], 3);
    assert_eq!(doc["input"]["payload"], json!({"job": 1}));
    assert_eq!(r.calls.lock().len(), 3);
    let (status, letters) = api(
        &hub,
        reqwest::Method::GET,
        "/tenants/default/rules/doomed/dead-letters",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(letters.as_array().map(Vec::len), Some(1), "{letters}");
    assert_eq!(letters[0]["attempts"], 3);
    assert_eq!(letters[0]["payload"], json!({"job": 1}));
    let s = stats(&hub, "default", "doomed").await;
    assert_eq!(
        (
            s["actions"][0]["dead_letters"].as_u64(),
            s["error_actions"].as_u64()
        ),
        (Some(1), Some(1))
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_slow_webhook_does_not_slow_mqtt_delivery() {
    let hub = TestHub::start().await.unwrap();
    let r = receiver(vec![], Duration::from_secs(2)).await;
    create_rule(
        &hub,
        "default",
        json!({
            "id": "slow",
            "sql": "SELECT * FROM 'sensors/#'",
            "actions": [{"type": "webhook", "url": format!("{}/slow", r.url), "max_attempts": 1}],
        }),
    )
    .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("sensors/#", QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    let mut worst = Duration::ZERO;
    for n in 0..20 {
        let sent = Instant::now();
        publisher
            .publish(
                "sensors/s1",
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\": {n}}}").as_bytes(),
            )
            .await;
        let p = tokio::time::timeout(WAIT, sub.recv_publish())
            .await
            .expect("delivered");
        assert_eq!(serde_json::from_slice::<Value>(&p.payload).unwrap()["n"], n);
        worst = worst.max(sent.elapsed());
    }
    // The webhook has taken at most one of the 20 messages by now; the rest wait in its queue.
    let s = stats(&hub, "default", "slow").await;
    assert!(s["actions"][0]["queued"].as_u64().unwrap_or(0) >= 15, "{s}");
    assert!(
        worst < Duration::from_millis(500),
        "delivery took {worst:?} while the webhook was busy"
    );
    hub.stop().await;
}

#[tokio::test]
async fn compile_errors_versions_and_dry_runs_through_the_api() {
    let hub = TestHub::start().await.unwrap();
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules",
        Some(json!({
            "id": "bad", "sql": "SELECT temp\nFROM 'a' WHERE avgg(temp) > 1", "actions": [],
        })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_rule");
    assert_eq!(
        (body["line"].as_u64(), body["column"].as_u64()),
        (Some(2), Some(16)),
        "{body}"
    );
    assert!(
        body["hint"].as_str().unwrap_or("").contains("avg"),
        "{body}"
    );

    create_rule(
        &hub,
        "default",
        json!({"id": "r", "sql": "SELECT * FROM 'a'", "enabled": false}),
    )
    .await;
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules",
        Some(json!({"id": "r", "sql": "SELECT * FROM 'a'"})),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")));
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules/r/enable",
        None,
    )
    .await;
    assert_eq!(
        (status, body["version"].as_u64(), body["enabled"].as_bool()),
        (200, Some(2), Some(true))
    );
    let client = reqwest::Client::new();
    let res = client
        .put(format!("{}/tenants/default/rules/r", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("If-Match", "\"1\"")
        .json(&json!({"sql": "SELECT 1 AS one FROM 'a'"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    let res = client
        .put(format!("{}/tenants/default/rules/r", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("If-Match", "\"2\"")
        .json(&json!({"sql": "SELECT 1 AS one FROM 'a'"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"3\"");

    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules/r/dry-run",
        Some(json!({"topic": "a", "payload": {"x": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!({"one": 1}));
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules:dry-run",
        Some(json!({
            "sql": "SELECT temp FROM 'd/+' WHERE temp > 5",
            "actions": [{"type": "republish", "topic": "out/${topic(2)}"}],
            "sample": {"topic": "d/x", "payload": {"temp": 9}},
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!({"temp": 9}));
    assert_eq!(body["actions"][0]["topic"], "out/x");
    let (_, body) = api(&hub, reqwest::Method::POST, "/tenants/default/rules:dry-run", Some(json!({
        "sql": "SELECT temp FROM 'd/+' WHERE temp > 5", "sample": {"topic": "d/x", "payload": {"temp": 1}},
    })))
    .await;
    assert_eq!(body["output"], Value::Null);
    let (status, _) = api(
        &hub,
        reqwest::Method::DELETE,
        "/tenants/default/rules/r",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = api(&hub, reqwest::Method::GET, "/tenants/default/rules/r", None).await;
    assert_eq!(status, 404);
    hub.stop().await;
}

#[tokio::test]
async fn rules_survive_a_restart() {
    let hub = TestHub::start().await.unwrap();
    create_rule(
        &hub,
        "default",
        json!({
            "id": "kept", "sql": "SELECT * FROM 'in/#'",
            "actions": [{"type": "republish", "topic": "out/${topic(2)}"}],
        }),
    )
    .await;
    let path = hub.data_dir.clone();
    let _dir = tokio::time::timeout(Duration::from_secs(10), hub.stop())
        .await
        .expect("stop");
    let hub = TestHub::start_config(test_config(path))
        .await
        .expect("restart");
    let (status, body) = api(
        &hub,
        reqwest::Method::GET,
        "/tenants/default/rules/kept",
        None,
    )
    .await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)), "{body}");
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("out/#", QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publisher
        .publish("in/x", QoS::AtLeastOnce, false, b"{}")
        .await;
    let p = tokio::time::timeout(WAIT, sub.recv_publish())
        .await
        .expect("rule ran after restart");
    assert_eq!(p.topic, "out/x");
    hub.stop().await;
}

#[tokio::test]
async fn a_deleted_tenants_rules_go_with_it() {
    let hub = TestHub::start().await.unwrap();
    let new_tenant = json!({"id": "tenant-c"});
    let (status, _) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants",
        Some(new_tenant.clone()),
    )
    .await;
    assert_eq!(status, 201);
    create_rule(
        &hub,
        "tenant-c",
        json!({"id": "r", "sql": "SELECT * FROM 'a'"}),
    )
    .await;
    let (status, body) = api(&hub, reqwest::Method::DELETE, "/tenants/tenant-c", None).await;
    assert!(status == 204 || status == 200, "{status} {body}");
    let (status, _) = api(&hub, reqwest::Method::POST, "/tenants", Some(new_tenant)).await;
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, rules) =
            api(&hub, reqwest::Method::GET, "/tenants/tenant-c/rules", None).await;
        assert_eq!(status, 200);
        if rules == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old tenant's rules are still there: {rules}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.stop().await;
}

/// Polls `GET path` until `f` holds on the body (at most 10 s).
async fn get_until(hub: &TestHub, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api(hub, reqwest::Method::GET, path, None).await;
        if status == 200 && f(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn actions_write_telemetry_twins_and_commands_with_lookups() {
    let hub = TestHub::start().await.unwrap();
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/devices",
        Some(json!({"id": "boiler-1", "tags": {"site": "plant-7"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/devices/boiler-1/credentials",
        Some(json!({"kind": "password", "secret": "boiler-1-secret-0123"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api(
        &hub,
        reqwest::Method::PATCH,
        "/tenants/default/devices/boiler-1/twins/default/desired",
        Some(json!({"max_temp": 70})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    create_rule(&hub, "default", json!({
        "id": "overheat",
        "sql": "SELECT temp, twin().desired.max_temp AS max, device().tags.site AS site \
                FROM 'devices/+/telemetry' WHERE temp > twin().desired.max_temp",
        "actions": [
            {"type": "store_telemetry", "metrics": {"overheat_margin": "temp - max"}},
            {"type": "update_twin", "section": "tags", "patch": "{\"last_overheat\": ${temp}}"},
            {"type": "command", "name": "cool_down", "payload": "{\"target\": ${twin().desired.max_temp}}"},
            {"type": "republish", "topic": "sites/${device().tags.site}/overheat"},
        ],
    }))
    .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("sites/#", QoS::AtLeastOnce).await;
    let mut opts = v4_opts(&hub, "boiler-1");
    opts.set_credentials("boiler-1", "boiler-1-secret-0123");
    let mut device = V4::connect(opts).await;
    for temp in [60, 80] {
        device
            .publish(
                "devices/boiler-1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"temp": {temp}}}"#).as_bytes(),
            )
            .await;
    }
    // The registry lookup made the topic; the twin lookup made WHERE and the output.
    let p = tokio::time::timeout(WAIT, sub.recv_publish())
        .await
        .expect("republished");
    assert_eq!(p.topic, "sites/plant-7/overheat");
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"temp": 80, "max": 70, "site": "plant-7"})
    );
    let points = get_until(
        &hub,
        "/tenants/default/devices/boiler-1/telemetry/overheat_margin?from=0",
        "the margin is stored",
        |b| b.to_string().contains("10"),
    )
    .await;
    assert!(!points.to_string().contains("60"), "{points}");
    let twin = get_until(
        &hub,
        "/tenants/default/devices/boiler-1/twins/default",
        "the tag is written",
        |b| b["tags"]["last_overheat"] == 80,
    )
    .await;
    assert_eq!(twin["desired"]["max_temp"], 70, "{twin}");
    let queued = get_until(
        &hub,
        "/tenants/default/devices/boiler-1/queued-commands",
        "the command is queued",
        |b| b.to_string().contains("cool_down"),
    )
    .await;
    assert!(queued.to_string().contains("\"target\":70"), "{queued}");
    let s = stats_until(&hub, "default", "overheat", "four successes", |s| {
        s["actions"]
            .as_array()
            .is_some_and(|a| a.iter().all(|a| a["successes"] == 1))
    })
    .await;
    assert_eq!(
        (s["matched"].as_u64(), s["passed"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    // A rule naming a device that is not registered: a dead letter saying so.
    create_rule(
        &hub,
        "default",
        json!({
            "id": "ghost",
            "sql": "SELECT * FROM 'ghosts/+'",
            "actions": [{"type": "update_twin", "device": "${topic(2)}"}],
        }),
    )
    .await;
    // (From an anonymous client: the device's policy keeps it to its own topics.)
    sub.publish("ghosts/nobody", QoS::AtLeastOnce, false, br#"{"a": 1}"#)
        .await;
    let letters = get_until(
        &hub,
        "/tenants/default/rules/ghost/dead-letters",
        "the dead letter",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("device `nobody` is not registered"),
        "{letters}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_rule_replays_against_stored_telemetry() {
    let hub = TestHub::start().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = now - now % 60_000 - 600_000; // ten minutes ago, on a minute
    for (device, temps) in [("m-1", [20, 30, 90, 40]), ("m-2", [10, 10, 10, 95])] {
        let (status, body) = api(
            &hub,
            reqwest::Method::POST,
            "/tenants/default/devices",
            Some(json!({"id": device})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let samples: Vec<Value> = temps
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"ts": t0 + i as i64 * 30_000, "temp": t, "env": {"hum": 50}}))
            .collect();
        let (status, body) = api(
            &hub,
            reqwest::Method::POST,
            &format!("/tenants/default/devices/{device}/telemetry"),
            Some(Value::Array(samples)),
        )
        .await;
        assert!(status / 100 == 2, "{status} {body}");
    }
    // Created disabled: replay it before it runs.
    create_rule(
        &hub,
        "default",
        json!({
            "id": "spikes", "enabled": false,
            "sql": "SELECT topic(2) AS dev, temp, env.hum AS hum \
                    FROM 'devices/+/telemetry' WHERE delta(temp) > 50 GROUP BY topic(2)",
            "actions": [{"type": "alarm", "key": "spike:${topic(2)}", "severity": "minor"}],
        }),
    )
    .await;
    let (status, r) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules/spikes/replay",
        Some(json!({"from": t0, "to": t0 + 120_000})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["messages"].as_u64(), r["matched"].as_u64()),
        (Some(8), Some(8)),
        "{r}"
    );
    assert_eq!(r["outputs_total"], 2, "{r}");
    let out = &r["outputs"];
    assert_eq!(
        out[0]["output"],
        json!({"dev": "m-1", "temp": 90, "hum": 50}),
        "{r}"
    );
    assert_eq!(out[0]["timestamp_ms"], t0 + 60_000);
    assert_eq!(out[0]["actions"][0]["key"], "spike:m-1", "{r}");
    assert_eq!(out[1]["output"]["dev"], "m-2");
    assert_eq!(
        out[1]["output"]["temp"], 95,
        "per device: m-2's jump is 85, not 55"
    );
    assert_eq!(r["truncated"], false);
    // Bounded: two messages at most, the earliest kept.
    let (status, r) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules/spikes/replay",
        Some(json!({"from": t0, "to": t0 + 120_000, "max_messages": 2, "devices": ["m-1"]})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["messages"].as_u64(), r["truncated"].as_bool()),
        (Some(2), Some(true)),
        "{r}"
    );
    // Nothing ran: the rule is disabled and replays run no action.
    let s = stats(&hub, "default", "spikes").await;
    assert_eq!(s["matched"], 0, "{s}");
    let (status, body) = api(
        &hub,
        reqwest::Method::POST,
        "/tenants/default/rules/spikes/replay",
        Some(json!({"from": t0, "to": t0})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    hub.stop().await;
}

/// The rotating-machine profile's bearing fault, played 3000× faster, found by an EWMA z-score
/// rule: every drifting machine is flagged, after the fault starts; no healthy one ever is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_zscore_flags_the_simulated_bearing_fault_only() {
    let hub = TestHub::start().await.unwrap();
    create_rule(
        &hub,
        "default",
        json!({
            "id": "bearing",
            "sql": "SELECT topic(2) AS dev, vibration_rms AS v FROM 'devices/+/telemetry' \
                    WHERE ewma_zscore(vibration_rms, 0.01) > 5 GROUP BY topic(2)",
            "actions": [{"type": "republish", "topic": "anomalies/${topic(2)}", "qos": 1}],
        }),
    )
    .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("anomalies/#", QoS::AtLeastOnce).await;
    // The fault begins 6 simulated hours in: 7.2 s at 3000× (144 samples of 50 ms; the baseline
    // warms up over 100); it then drifts 1.5 mm/s per simulated hour, 0.0625 per sample against
    // noise of σ 0.12. (A drift much slower per sample than σ·α^½ is absorbed by the EWMA's
    // variance before it crosses 3σ: see docs/rules.md on choosing alpha.)
    let fleet = |prefix: &str, fraction: &str| {
        common::sim_args(
            hub.mqtt,
            &format!(
                "-n 4 --prefix {prefix} --profile rotating-machine --set bearing_fault_after=6h \
                 --set bearing_fault_fraction={fraction} --time-scale 3000 --interval 50ms \
                 --duration 13s --no-twin --no-commands --qos 0 --seed 7"
            ),
        )
    };
    let (faulty, healthy) = (fleet("bad", "1.0"), fleet("good", "0.0"));
    let started = Instant::now();
    let runs = tokio::spawn(async move {
        tokio::join!(
            common::try_sim_run(&faulty, Duration::from_secs(60)),
            common::try_sim_run(&healthy, Duration::from_secs(60))
        )
    });
    let mut first: std::collections::BTreeMap<String, Duration> = Default::default();
    let deadline = started + Duration::from_secs(25);
    while Instant::now() < deadline && first.len() < 4 {
        let Ok(p) = tokio::time::timeout(Duration::from_secs(1), sub.recv_publish()).await else {
            continue;
        };
        let dev = p.topic.trim_start_matches("anomalies/").to_string();
        assert!(
            dev.starts_with("bad"),
            "a healthy machine was flagged: {dev}"
        );
        first.entry(dev).or_insert_with(|| started.elapsed());
    }
    let (a, b) = runs.await.unwrap();
    a.unwrap();
    b.unwrap();
    assert_eq!(
        first.len(),
        4,
        "every drifting machine is flagged: {first:?}"
    );
    for (dev, at) in &first {
        assert!(
            *at > Duration::from_millis(7_000),
            "{dev} flagged at {at:?}, before its fault began"
        );
    }
    // What was flagged after every faulty machine had been: still only faulty ones.
    while let Ok(p) = tokio::time::timeout(Duration::from_millis(500), sub.recv_publish()).await {
        assert!(
            p.topic.starts_with("anomalies/bad"),
            "a healthy machine was flagged: {}",
            p.topic
        );
    }
    hub.stop().await;
}

/// Issue 8's end-to-end alarm: an MQTT message → a rule's alarm action → the alarm raised
/// (deduplicated on the next message) → a webhook channel called with its template; a cool
/// message clears it and the channel hears that too.
#[tokio::test]
async fn an_mqtt_message_raises_an_alarm_that_calls_a_webhook_and_clears_it() {
    let hub = TestHub::start().await.unwrap();
    let rx = receiver(vec![], Duration::ZERO).await;
    let (status, body) = api(
        &hub,
        reqwest::Method::PUT,
        "/tenants/default/alarm-channels/ops",
        Some(json!({
            "kind": {"webhook": {
                "url": format!("{}/hook", rx.url),
                "body": "{\"text\": \"{{ alarm.severity }} {{ alarm.key }} {{ event.kind }} {{ alarm.message }}\"}",
                "backoff_ms": 10
            }},
            "min_severity": "warning",
            "events": ["raised", "cleared"],
            "rate_limit_s": 0
        })),
    )
    .await;
    assert!(status == 201 || status == 200, "{status} {body}");
    create_rule(
        &hub,
        "default",
        json!({
            "id": "overheat",
            "sql": "SELECT temp FROM 'devices/+/telemetry'",
            "actions": [{"type": "alarm", "key": "overheat:${topic(2)}", "severity": "critical",
                         "message": "${topic(2)} at ${temp}", "raise_when": "temp > 80"}],
        }),
    )
    .await;
    let mut device = V4::connect(v4_opts(&hub, &uid("dev"))).await;
    for temp in [90, 95] {
        device
            .publish(
                "devices/press-4/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"temp": {temp}}}"#).as_bytes(),
            )
            .await;
    }
    let alarms = get_until(
        &hub,
        "/tenants/default/alarms?state=open",
        "the alarm",
        |b| b.to_string().contains("overheat:press-4") && b.to_string().contains("\"count\":2"),
    )
    .await;
    let list = alarms["items"].as_array().unwrap();
    assert_eq!(list.len(), 1, "deduplicated by key: {alarms}");
    assert_eq!(list[0]["severity"], "critical");
    assert_eq!(list[0]["source"], "rule:overheat");
    wait_until(WAIT, "the raised notification", || {
        !rx.calls.lock().is_empty()
    })
    .await;
    let (_, first) = rx.calls.lock()[0].clone();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        first["text"], "critical overheat:press-4 raised press-4 at 90",
        "the template is rendered with the alarm and the event"
    );
    device
        .publish(
            "devices/press-4/telemetry",
            QoS::AtLeastOnce,
            false,
            br#"{"temp": 40}"#,
        )
        .await;
    get_until(
        &hub,
        "/tenants/default/alarms?state=cleared",
        "the clear",
        |b| b.to_string().contains("overheat:press-4"),
    )
    .await;
    wait_until(WAIT, "the cleared notification", || {
        rx.calls.lock().iter().any(|(_, b)| b.contains(" cleared "))
    })
    .await;
    hub.stop().await;
}
