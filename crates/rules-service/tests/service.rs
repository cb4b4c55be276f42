//! The rules service against a recording publisher and a real local HTTP server.

#![allow(clippy::expect_used)] // test helpers: a failure is the test failing

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use ferrohub_rules_service::{
    ActionError, ActionSpec, AlarmRequest, CommandRequest, HubLink, Inbound, RuleSpec, RulesConfig,
    RulesError, RulesService, Sample, SqliteRuleStore, TwinSection, WebhookSpec,
};
use parking_lot::Mutex;
use serde_json::{Value, json};

type Published = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Records what actions do: publications as (tenant, topic, payload); other actions as
/// (tenant, "kind:…", value). Twins of devices named `d*` exist for lookups; device `locked`
/// refuses twin writes for good, device `busy` the first time only.
struct Recorder(Published, AtomicUsize);

#[async_trait::async_trait]
impl HubLink for Recorder {
    async fn publish(
        &self,
        tenant: &str,
        topic: &str,
        payload: Bytes,
        _qos: u8,
    ) -> Result<(), ActionError> {
        let v = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        self.0.lock().push((tenant.into(), topic.into(), v));
        Ok(())
    }

    async fn store_telemetry(
        &self,
        tenant: &str,
        device: &str,
        payload: Value,
    ) -> Result<(), ActionError> {
        self.0
            .lock()
            .push((tenant.into(), format!("telemetry:{device}"), payload));
        Ok(())
    }

    async fn update_twin(
        &self,
        tenant: &str,
        device: &str,
        section: TwinSection,
        patch: Value,
        actor: &str,
    ) -> Result<(), ActionError> {
        match device {
            "locked" => return Err(ActionError::permanent("twin locked")),
            "busy" if self.1.fetch_add(1, SeqCst) == 0 => {
                return Err(ActionError::transient("twin store busy"));
            }
            _ => {}
        }
        let section = serde_json::to_value(section).expect("section");
        self.0.lock().push((
            tenant.into(),
            format!("twin:{}:{device}:{actor}", section.as_str().unwrap_or("")),
            patch,
        ));
        Ok(())
    }

    async fn send_command(
        &self,
        tenant: &str,
        device: &str,
        command: CommandRequest,
        _actor: &str,
    ) -> Result<(), ActionError> {
        let v = serde_json::from_slice(&command.payload).unwrap_or(Value::Null);
        self.0.lock().push((
            tenant.into(),
            format!("command:{device}:{}:{}", command.name, command.queued),
            v,
        ));
        Ok(())
    }

    async fn alarm(
        &self,
        tenant: &str,
        request: AlarmRequest,
        source: &str,
    ) -> Result<(), ActionError> {
        let entry = match request {
            AlarmRequest::Raise {
                key,
                severity,
                device,
                message,
                details,
            } => (
                format!(
                    "alarm:raise:{key}:{severity}:{}:{source}",
                    device.unwrap_or_default()
                ),
                json!({"message": message, "details": details}),
            ),
            AlarmRequest::Clear { key } => (format!("alarm:clear:{key}:{source}"), Value::Null),
        };
        self.0.lock().push((tenant.into(), entry.0, entry.1));
        Ok(())
    }

    async fn twin(&self, tenant: &str, device: &str) -> Option<Value> {
        device
            .starts_with('d')
            .then(|| json!({"reported": {"limit": 50, "of": device, "tenant": tenant}}))
    }

    async fn device(&self, _tenant: &str, device: &str) -> Option<Value> {
        device
            .starts_with('d')
            .then(|| json!({"id": device, "tags": {"site": "plant-1"}}))
    }
}

async fn service() -> (Arc<RulesService>, Published) {
    let store = SqliteRuleStore::in_memory().await.expect("store");
    let published: Published = Arc::default();
    let svc = RulesService::new(
        Arc::new(store),
        Arc::new(Recorder(published.clone(), AtomicUsize::new(0))),
        RulesConfig::default(),
    );
    svc.start(std::future::pending()).await.expect("start");
    (svc, published)
}

fn offer(svc: &RulesService, tenant: &str, topic: &str, payload: Value) -> bool {
    svc.offer(tenant, topic, || Inbound {
        tenant: Arc::from(tenant),
        topic: Arc::from(topic),
        payload: Bytes::from(payload.to_string()),
        client_id: Some(Arc::from("c1")),
        device: None,
        timestamp_ms: 1_000,
    })
}

async fn until<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn republish(sql: &str, topic: &str) -> RuleSpec {
    RuleSpec {
        sql: sql.into(),
        description: String::new(),
        actions: vec![ActionSpec::Republish {
            topic: topic.into(),
            qos: 1,
            payload: None,
        }],
        error_action: None,
    }
}

fn webhook(url: String, attempts: u32) -> WebhookSpec {
    WebhookSpec {
        url,
        method: "POST".into(),
        headers: BTreeMap::new(),
        body: None,
        max_attempts: attempts,
        timeout_ms: 5_000,
        backoff_ms: 10,
    }
}

/// A local webhook receiver: answers the statuses in `script` in turn (then 200), after
/// `delay`, recording every request's headers and body.
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<(HeaderMap, String)>>>,
}

async fn receiver(script: Vec<u16>, delay: Duration) -> Receiver {
    let calls: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
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
                StatusCode::from_u16(*script.get(i).unwrap_or(&200)).unwrap_or(StatusCode::OK)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver {
        url: format!("http://{addr}"),
        calls,
    }
}

#[tokio::test]
async fn republishes_matching_messages_only_within_the_tenant() {
    let (svc, published) = service().await;
    svc.create(
        "a",
        "hot",
        republish(
            "SELECT temp AS t FROM 'devices/+/telemetry' WHERE temp > 30",
            "alerts/${topic(2)}",
        ),
        true,
    )
    .await
    .expect("create");
    assert!(offer(
        &svc,
        "a",
        "devices/d1/telemetry",
        json!({"temp": 31})
    ));
    assert!(offer(
        &svc,
        "a",
        "devices/d2/telemetry",
        json!({"temp": 20})
    ));
    // Another tenant's message on the same topic is not even offered to the rule.
    assert!(!offer(
        &svc,
        "b",
        "devices/d3/telemetry",
        json!({"temp": 99})
    ));
    assert!(!offer(&svc, "a", "other/topic", json!({"temp": 99})));
    until("republished", || !published.lock().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *published.lock(),
        vec![("a".into(), "alerts/d1".into(), json!({"t": 31}))]
    );
    let stats = svc.stats("a", "hot").await.expect("stats");
    assert_eq!((stats.matched, stats.passed, stats.failed), (2, 1, 0));
    assert_eq!(stats.actions[0].successes, 1);
}

#[tokio::test]
async fn webhook_gets_templated_body_and_headers() {
    let (svc, _) = service().await;
    let r = receiver(vec![], Duration::ZERO).await;
    let mut w = webhook(format!("{}/hook/${{topic(2)}}", r.url), 3);
    w.headers
        .insert("x-device".into(), "${topic(2)}-${upper(kind)}".into());
    w.body = Some(r#"{"device": "${topic(2)}", "t": ${temp}}"#.into());
    let spec = RuleSpec {
        sql: "SELECT * FROM 'devices/+/telemetry'".into(),
        description: String::new(),
        actions: vec![
            ActionSpec::Webhook(w),
            ActionSpec::Webhook(webhook(format!("{}/plain", r.url), 1)),
        ],
        error_action: None,
    };
    svc.create("a", "hook", spec, true).await.expect("create");
    offer(
        &svc,
        "a",
        "devices/d7/telemetry",
        json!({"temp": 5, "kind": "x"}),
    );
    until("two calls", || r.calls.lock().len() == 2).await;
    let calls = r.calls.lock().clone();
    let templated = calls
        .iter()
        .find(|(h, _)| h.contains_key("x-device"))
        .expect("templated call");
    assert_eq!(templated.0["x-device"], "d7-X");
    assert_eq!(
        serde_json::from_str::<Value>(&templated.1).expect("json"),
        json!({"device": "d7", "t": 5})
    );
    let plain = calls
        .iter()
        .find(|(h, _)| !h.contains_key("x-device"))
        .expect("plain call");
    assert_eq!(
        serde_json::from_str::<Value>(&plain.1).expect("json"),
        json!({"temp": 5, "kind": "x"})
    );
    assert_eq!(plain.0["content-type"], "application/json");
}

#[tokio::test]
async fn webhook_retries_then_succeeds() {
    let (svc, _) = service().await;
    let r = receiver(vec![500, 503], Duration::ZERO).await;
    let spec = RuleSpec {
        sql: "SELECT * FROM 'x'".into(),
        description: String::new(),
        actions: vec![ActionSpec::Webhook(webhook(r.url.clone() + "/h", 3))],
        error_action: None,
    };
    svc.create("a", "r", spec, true).await.expect("create");
    offer(&svc, "a", "x", json!({"n": 1}));
    until("three calls", || r.calls.lock().len() == 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while svc.stats("a", "r").await.expect("stats").actions[0].successes != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "success not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = svc.stats("a", "r").await.expect("stats");
    assert_eq!(
        (
            s.actions[0].errors,
            s.actions[0].retries,
            s.actions[0].dead_letters
        ),
        (2, 2, 0)
    );
    assert!(svc.dead_letters("a", "r").await.expect("dl").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_webhook_ends_in_dead_letters_and_fires_the_error_action() {
    let (svc, published) = service().await;
    let r = receiver(vec![500; 10], Duration::ZERO).await;
    let spec = RuleSpec {
        sql: "SELECT * FROM 'x'".into(),
        description: String::new(),
        actions: vec![ActionSpec::Webhook(webhook(r.url.clone() + "/h", 3))],
        error_action: Some(ActionSpec::Republish {
            topic: "errors/${rule}".into(),
            qos: 0,
            payload: None,
        }),
    };
    svc.create("a", "r", spec, true).await.expect("create");
    offer(&svc, "a", "x", json!({"n": 1}));
    until("error action", || !published.lock().is_empty()).await;
    assert_eq!(r.calls.lock().len(), 3);
    let (tenant, topic, doc) = published.lock()[0].clone();
    assert_eq!((tenant.as_str(), topic.as_str()), ("a", "errors/r"));
    assert_eq!(doc["attempts"], 3);
    assert_eq!(doc["error"], "HTTP 500 Internal Server Error");
    assert_eq!(doc["input"]["payload"], json!({"n": 1}));
    let letters = svc.dead_letters("a", "r").await.expect("dl");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].payload, json!({"n": 1}));
    let s = svc.stats("a", "r").await.expect("stats");
    assert_eq!((s.actions[0].dead_letters, s.error_actions), (1, 1));
}

#[tokio::test]
async fn a_slow_webhook_does_not_hold_up_other_rules() {
    let (svc, published) = service().await;
    let r = receiver(vec![], Duration::from_secs(2)).await;
    let slow = RuleSpec {
        sql: "SELECT * FROM 'x'".into(),
        description: String::new(),
        actions: vec![ActionSpec::Webhook(webhook(r.url.clone() + "/slow", 1))],
        error_action: None,
    };
    svc.create("a", "slow", slow, true).await.expect("create");
    svc.create("a", "fast", republish("SELECT n FROM 'x'", "out"), true)
        .await
        .expect("create");
    let started = std::time::Instant::now();
    for n in 0..20 {
        offer(&svc, "a", "x", json!({"n": n}));
    }
    until("fast rule output", || published.lock().len() == 20).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "republish waited for the webhook: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn validation_versions_and_dry_run() {
    let (svc, published) = service().await;
    let err = svc
        .create("a", "bad", republish("SELECT avgg(x) FROM 'x'", "o"), true)
        .await
        .expect_err("must not compile");
    let RulesError::Compile(e) = err else {
        panic!("not a compile error: {err}")
    };
    assert_eq!((e.line, e.column), (1, 8));
    assert!(matches!(
        svc.create("a", "bad id", republish("SELECT * FROM 'x'", "o"), true)
            .await,
        Err(RulesError::Invalid(_))
    ));
    let r = svc
        .create("a", "r", republish("SELECT * FROM 'x'", "o"), false)
        .await
        .expect("create");
    assert_eq!((r.version, r.enabled), (1, false));
    assert!(
        !offer(&svc, "a", "x", json!({})),
        "a disabled rule takes nothing"
    );
    let r = svc
        .set_enabled("a", "r", true, Some(1))
        .await
        .expect("enable");
    assert_eq!((r.version, r.enabled), (2, true));
    assert!(matches!(
        svc.update(
            "a",
            "r",
            republish("SELECT 1 AS one FROM 'x'", "o2"),
            Some(1)
        )
        .await,
        Err(RulesError::VersionMismatch { current: 2, .. })
    ));
    let r = svc
        .update(
            "a",
            "r",
            republish("SELECT 1 AS one FROM 'x'", "o2"),
            Some(2),
        )
        .await
        .expect("update");
    assert_eq!(r.version, 3);
    offer(&svc, "a", "x", json!({}));
    until("updated rule ran", || !published.lock().is_empty()).await;
    assert_eq!(published.lock()[0].1, "o2");

    let spec = republish(
        "SELECT temp FROM 'devices/+/t' WHERE temp > 1",
        "alerts/${topic(2)}",
    );
    let sample = |temp: i64| Sample {
        topic: "devices/d9/t".into(),
        payload: json!({"temp": temp}),
        client_id: None,
        timestamp: None,
    };
    let d = svc.dry_run("a", &spec, &sample(5)).expect("dry run");
    assert_eq!(d.output, Some(json!({"temp": 5})));
    assert_eq!(d.actions[0]["topic"], "alerts/d9");
    let d = svc.dry_run("a", &spec, &sample(0)).expect("dry run");
    assert_eq!(d.output, None);
    svc.delete("a", "r").await.expect("delete");
    assert!(matches!(
        svc.get("a", "r").await,
        Err(RulesError::NotFound(_))
    ));
}

#[tokio::test]
async fn rules_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("rules.db");
    let published: Published = Arc::default();
    {
        let store = SqliteRuleStore::open(&path, false).await.expect("open");
        let svc = RulesService::new(
            Arc::new(store.clone()),
            Arc::new(Recorder(published.clone(), AtomicUsize::new(0))),
            RulesConfig::default(),
        );
        svc.create("a", "r", republish("SELECT * FROM 'x'", "o"), true)
            .await
            .expect("create");
        store.close().await;
    }
    let store = SqliteRuleStore::open(&path, false).await.expect("reopen");
    let svc = RulesService::new(
        Arc::new(store),
        Arc::new(Recorder(published.clone(), AtomicUsize::new(0))),
        RulesConfig::default(),
    );
    svc.start(std::future::pending()).await.expect("start");
    assert!(offer(&svc, "a", "x", json!({"k": 1})));
    until("output after restart", || published.lock().len() == 1).await;
}

#[tokio::test]
async fn a_full_input_queue_drops_evaluations_visibly() {
    let store = SqliteRuleStore::in_memory().await.expect("store");
    let published: Published = Arc::default();
    let config = RulesConfig {
        input_queue: 2,
        ..RulesConfig::default()
    };
    // Not started: nothing drains the input queue.
    let svc = RulesService::new(
        Arc::new(store),
        Arc::new(Recorder(published, AtomicUsize::new(0))),
        config,
    );
    svc.create("a", "r", republish("SELECT * FROM 'x'", "o"), true)
        .await
        .expect("create");
    svc.create("a", "other", republish("SELECT * FROM 'y'", "o"), true)
        .await
        .expect("create");
    for n in 0..5 {
        // The offer never blocks and still reports that a rule wanted the message.
        assert!(offer(&svc, "a", "x", json!({ "n": n })));
    }
    let s = svc.stats("a", "r").await.expect("stats");
    assert_eq!(s.dropped_queue_full, 3);
    assert_eq!(
        svc.stats("a", "other")
            .await
            .expect("stats")
            .dropped_queue_full,
        0
    );
    let mut text = String::new();
    svc.render_metrics(&mut text);
    assert!(
        text.contains("ferrohub_rules_input_dropped_total 3"),
        "{text}"
    );
    assert!(
        text.contains(r#"ferrohub_rule_dropped{tenant="a",rule="r"} 3"#),
        "{text}"
    );
}

fn offer_from(svc: &RulesService, topic: &str, device: &str, ts: i64, payload: Value) -> bool {
    svc.offer("a", topic, || Inbound {
        tenant: Arc::from("a"),
        topic: Arc::from(topic),
        payload: Bytes::from(payload.to_string()),
        client_id: Some(Arc::from(device)),
        device: Some(Arc::from(device)),
        timestamp_ms: ts,
    })
}

fn with_actions(sql: &str, actions: Value) -> RuleSpec {
    RuleSpec {
        sql: sql.into(),
        description: String::new(),
        actions: serde_json::from_value(actions).expect("actions"),
        error_action: None,
    }
}

fn calls(published: &Published, prefix: &str) -> Vec<(String, Value)> {
    published
        .lock()
        .iter()
        .filter(|(_, t, _)| t.starts_with(prefix))
        .map(|(_, t, v)| (t.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn telemetry_twin_command_and_alarm_actions() {
    let (svc, published) = service().await;
    let spec = with_actions(
        "SELECT temp, temp > 80 AS hot FROM 'devices/+/telemetry'",
        json!([
            {"type": "store_telemetry", "metrics": {"temp_f": "temp * 9 / 5 + 32", "gone": "nosuch"}},
            {"type": "update_twin", "device": "${topic(2)}", "section": "reported"},
            {"type": "command", "name": "cool", "payload": "{\"to\": ${temp - 10}}"},
            {"type": "alarm", "key": "overheat:${topic(2)}", "severity": "critical",
             "message": "${topic(2)} at ${temp}", "raise_when": "hot"},
        ]),
    );
    svc.create("a", "r1", spec, true).await.expect("create");
    assert!(offer_from(
        &svc,
        "devices/d1/telemetry",
        "d1",
        5_000,
        json!({"temp": 90})
    ));
    until("four actions", || published.lock().len() >= 4).await;
    assert_eq!(
        calls(&published, "telemetry:"),
        vec![("telemetry:d1".into(), json!({"temp_f": 194, "ts": 5_000}))],
        "metrics are expressions over the output; an Undefined one is left out; ts is the message's"
    );
    assert_eq!(
        calls(&published, "twin:"),
        vec![(
            "twin:reported:d1:rule:r1".into(),
            json!({"temp": 90, "hot": true})
        )]
    );
    assert_eq!(
        calls(&published, "command:"),
        vec![("command:d1:cool:true".into(), json!({"to": 80}))]
    );
    assert_eq!(
        calls(&published, "alarm:"),
        vec![(
            "alarm:raise:overheat:d1:critical:d1:rule:r1".into(),
            json!({"message": "d1 at 90", "details": {"temp": 90, "hot": true}})
        )]
    );
    // Cooler: the same rule clears the alarm.
    assert!(offer_from(
        &svc,
        "devices/d1/telemetry",
        "d1",
        6_000,
        json!({"temp": 20})
    ));
    until("the clear", || !calls(&published, "alarm:clear").is_empty()).await;
    assert_eq!(
        calls(&published, "alarm:clear")[0].0,
        "alarm:clear:overheat:d1:rule:r1"
    );
    let stats = svc.stats("a", "r1").await.expect("stats");
    assert_eq!(
        stats.actions.iter().map(|a| a.successes).sum::<u64>(),
        8,
        "{stats:?}"
    );
}

#[tokio::test]
async fn transient_action_errors_are_retried_permanent_ones_become_dead_letters() {
    let (svc, published) = service().await;
    let spec = with_actions(
        "SELECT * FROM 'devices/+/state'",
        json!([{"type": "update_twin", "device": "${topic(2)}"}]),
    );
    svc.create("a", "tw", spec, true).await.expect("create");
    offer_from(
        &svc,
        "devices/busy/state",
        "busy",
        1,
        json!({"mode": "eco"}),
    );
    offer_from(
        &svc,
        "devices/locked/state",
        "locked",
        2,
        json!({"mode": "eco"}),
    );
    until("the retried write", || {
        !calls(&published, "twin:desired:busy").is_empty()
    })
    .await;
    until("the dead letter", || dead_letter_count(&svc, "tw") == 1).await;
    let letters = svc.dead_letters("a", "tw").await.expect("letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].target, "locked");
    assert_eq!(letters[0].attempts, 1, "a permanent error is not retried");
    assert!(letters[0].error.contains("twin locked"), "{letters:?}");
    let stats = svc.stats("a", "tw").await.expect("stats");
    assert_eq!(stats.actions[0].retries, 1, "{stats:?}");
    // No device to write to: a dead letter that says what to set.
    let spec = with_actions(
        "SELECT * FROM 'plain/#'",
        json!([{"type": "store_telemetry"}]),
    );
    svc.create("a", "nodev", spec, true).await.expect("create");
    svc.offer("a", "plain/x", || Inbound {
        tenant: Arc::from("a"),
        topic: Arc::from("plain/x"),
        payload: Bytes::from_static(b"{\"v\": 1}"),
        client_id: None,
        device: None,
        timestamp_ms: 1,
    });
    until("the no-device letter", || {
        dead_letter_count(&svc, "nodev") == 1
    })
    .await;
    let letters = svc.dead_letters("a", "nodev").await.expect("letters");
    assert!(
        letters[0].error.contains("set the action's `device`"),
        "{letters:?}"
    );
}

fn dead_letter_count(svc: &RulesService, rule: &str) -> usize {
    let mut text = String::new();
    svc.render_metrics(&mut text);
    text.lines()
        .find(|l| {
            l.starts_with(&format!(
                "ferrohub_rule_dead_letters{{tenant=\"a\",rule=\"{rule}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn lookups_see_twins_and_registry_records() {
    let (svc, published) = service().await;
    svc.create(
        "a",
        "lim",
        republish(
            "SELECT temp, twin().reported.limit AS lim, device(topic(2)).tags.site AS site \
             FROM 'devices/+/telemetry' WHERE temp > twin().reported.limit",
            "over/${topic(2)}",
        ),
        true,
    )
    .await
    .expect("create");
    offer_from(&svc, "devices/d1/telemetry", "d1", 1, json!({"temp": 40}));
    offer_from(&svc, "devices/x9/telemetry", "x9", 2, json!({"temp": 99}));
    offer_from(&svc, "devices/d1/telemetry", "d1", 3, json!({"temp": 60}));
    until("the output", || !published.lock().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let p = published.lock().clone();
    assert_eq!(
        p,
        vec![(
            "a".to_string(),
            "over/d1".to_string(),
            json!({"temp": 60, "lim": 50, "site": "plant-1"})
        )],
        "below the twin's limit: no output; a device without a twin: WHERE is not true"
    );
    let mut text = String::new();
    svc.render_metrics(&mut text);
    assert!(
        text.contains("ferrohub_rules_lookup_hits_total 2"),
        "{text}"
    );
}

#[tokio::test]
async fn windowed_outputs_are_stored_per_key_at_the_window_start() {
    let (svc, published) = service().await;
    let spec = with_actions(
        "SELECT topic(2) AS dev, avg(temp) AS avg_temp FROM 'devices/+/telemetry' \
         GROUP BY topic(2) WINDOW TUMBLING(10)",
        json!([{"type": "store_telemetry", "device": "${dev}", "metrics": {"temp_avg": "avg_temp"}}]),
    );
    svc.create("a", "avg", spec, true).await.expect("create");
    // Windows that end in the future: only messages close them, never the wall-clock tick.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let t0 = now - now % 10_000 + 60_000;
    for (ts, t) in [(1_000, 10), (2_000, 20), (12_000, 99)] {
        offer_from(
            &svc,
            "devices/d1/telemetry",
            "d1",
            t0 + ts,
            json!({"temp": t}),
        );
    }
    until("the window's point", || {
        !calls(&published, "telemetry:").is_empty()
    })
    .await;
    // The first window is closed by the message at 12 s.
    let (target, point) = calls(&published, "telemetry:")[0].clone();
    assert_eq!(target, "telemetry:d1");
    assert_eq!(point["temp_avg"].as_f64(), Some(15.0), "{point}");
    assert_eq!(point["ts"], json!(t0), "stamped with the window's start");
    // A windowed rule without a device: refused at dispatch with a message naming `device`.
    let dry = svc
        .dry_run(
            "a",
            &with_actions(
                "SELECT count(*) AS n FROM 'x' WINDOW TUMBLING(10)",
                json!([{"type": "alarm", "key": "k", "severity": "loud"}]),
            ),
            &Sample {
                topic: "x".into(),
                payload: json!({}),
                client_id: None,
                timestamp: None,
            },
        )
        .expect_err("bad severity");
    assert!(dry.to_string().contains("severity `loud`"), "{dry}");
}

#[tokio::test]
async fn republish_renders_a_payload_template() {
    let (svc, published) = service().await;
    let spec = with_actions(
        "SELECT temp FROM 'devices/+/telemetry'",
        json!([{"type": "republish", "topic": "plain/${topic(2)}",
                "payload": "{\"device\": \"${topic(2)}\", \"f\": ${temp * 9 / 5 + 32}}"}]),
    );
    svc.create("a", "fmt", spec, true).await.expect("create");
    offer_from(&svc, "devices/d3/telemetry", "d3", 1, json!({"temp": 100}));
    until("the publication", || !published.lock().is_empty()).await;
    assert_eq!(
        published.lock()[0],
        (
            "a".into(),
            "plain/d3".into(),
            json!({"device": "d3", "f": 212})
        )
    );
}

#[tokio::test]
async fn webhooks_to_private_addresses_are_refused_when_configured() {
    let store = SqliteRuleStore::in_memory().await.expect("store");
    let published: Published = Arc::default();
    let svc = RulesService::new(
        Arc::new(store),
        Arc::new(Recorder(published, AtomicUsize::new(0))),
        RulesConfig {
            webhook_deny_private: true,
            ..RulesConfig::default()
        },
    );
    svc.start(std::future::pending()).await.expect("start");
    let rx = receiver(vec![], Duration::ZERO).await;
    let port = rx.url.rsplit(':').next().expect("port").to_string();
    let spec = RuleSpec {
        sql: "SELECT * FROM 'x'".into(),
        description: String::new(),
        actions: vec![
            ActionSpec::Webhook(webhook(rx.url.clone(), 3)),
            ActionSpec::Webhook(webhook(format!("http://localhost:{port}/by-name"), 3)),
        ],
        error_action: None,
    };
    svc.create("a", "ssrf", spec, true).await.expect("create");
    offer(&svc, "a", "x", json!({"v": 1}));
    until("two dead letters", || dead_letter_count(&svc, "ssrf") == 2).await;
    let letters = svc.dead_letters("a", "ssrf").await.expect("letters");
    assert!(
        letters.iter().all(|l| l.attempts == 1),
        "not retried: {letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.error.contains("127.0.0.1 is a private address")),
        "{letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.error.contains("resolves only to private addresses")),
        "{letters:?}"
    );
    assert!(rx.calls.lock().is_empty(), "the receiver was never reached");
}
