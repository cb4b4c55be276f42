//! Notifications against a real local HTTP server (axum): retries then success, a failed
//! delivery after the last attempt, the per-alarm rate limit, the queue-full policy, and a slow
//! webhook that must not slow down raise(). Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use ferrohub_alarms::{
    AlarmService, AlarmsConfig, ChannelDeliveries, ChannelKind, ChannelSpec, DeliveryStatus,
    EventKind, RaiseAlarm, Severity, SqliteAlarmStore, WebhookChannel,
};
use serde_json::{Value, json};

type Calls = Arc<parking_lot::Mutex<Vec<(HeaderMap, String)>>>;

/// A local webhook receiver answering `script`'s statuses in turn (then 200) after `delay`.
async fn receiver(script: Vec<u16>, delay: Duration) -> (String, Calls) {
    let calls: Calls = Arc::default();
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
    (format!("http://{addr}/hook"), calls)
}

async fn started(config: AlarmsConfig) -> Arc<AlarmService> {
    let store = SqliteAlarmStore::in_memory().await.unwrap();
    let s = AlarmService::open(Arc::new(store), config).await.unwrap();
    // Runs until the test's runtime ends.
    s.start(std::future::pending());
    s
}

fn channel(url: String, max_attempts: u32, rate_limit_s: u64, timeout_ms: u64) -> ChannelSpec {
    ChannelSpec {
        kind: ChannelKind::Webhook(WebhookChannel {
            url,
            method: "POST".into(),
            headers: BTreeMap::from([("X-Alarm".into(), "{{ alarm.key }}".into())]),
            body: Some(
                r#"{"text": {{ (alarm.severity ~ ": " ~ alarm.message) | tojson }}, "kind": "{{ event.kind }}", "count": {{ alarm.count }}}"#
                    .into(),
            ),
            timeout_ms,
            max_attempts,
            backoff_ms: 20,
        }),
        min_severity: Severity::Info,
        events: EventKind::ALL.to_vec(),
        rate_limit_s,
        enabled: true,
        description: String::new(),
    }
}

fn raise(key: &str) -> RaiseAlarm {
    RaiseAlarm {
        key: key.into(),
        severity: Severity::Major,
        device: Some("dev-1".into()),
        message: "too hot".into(),
        details: json!({}),
        source: "api".into(),
    }
}

async fn wait_for(
    s: &AlarmService,
    id: &str,
    what: impl Fn(&ChannelDeliveries) -> bool,
) -> ChannelDeliveries {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = s.deliveries("t1", id).unwrap();
        if what(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "timed out; deliveries: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn retries_then_success_with_rendered_template() {
    let (url, calls) = receiver(vec![500, 503], Duration::ZERO).await;
    let s = started(AlarmsConfig::default()).await;
    s.put_channel("t1", "hook", channel(url, 5, 0, 2000))
        .await
        .unwrap();
    let a = s.raise("t1", raise("hot:dev-1")).await.unwrap();
    let d = wait_for(&s, "hook", |d| d.sent == 1).await;
    let last = &d.deliveries[0];
    assert_eq!(
        (
            last.status,
            last.attempts,
            last.http_status,
            last.alarm_id.as_str()
        ),
        (DeliveryStatus::Sent, 3, Some(200), a.id.as_str())
    );
    let calls = calls.lock();
    assert_eq!(calls.len(), 3);
    let (headers, body) = &calls[2];
    assert_eq!(headers["x-alarm"], "hot:dev-1");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body,
        json!({"text": "major: too hot", "kind": "raised", "count": 1})
    );
}

#[tokio::test]
async fn gives_up_after_max_attempts_and_records_it() {
    let (url, calls) = receiver(vec![500; 10], Duration::ZERO).await;
    let s = started(AlarmsConfig::default()).await;
    s.put_channel("t1", "hook", channel(url, 3, 0, 2000))
        .await
        .unwrap();
    s.raise("t1", raise("k")).await.unwrap();
    let d = wait_for(&s, "hook", |d| d.failed == 1).await;
    let last = &d.deliveries[0];
    assert_eq!(
        (last.status, last.attempts, last.http_status),
        (DeliveryStatus::Failed, 3, Some(500))
    );
    assert_eq!(
        last.error.as_deref(),
        Some("HTTP 500 Internal Server Error")
    );
    assert_eq!(calls.lock().len(), 3);
    let mut m = String::new();
    s.render_metrics(&mut m);
    assert!(
        m.contains("ferrohub_alarm_notifications_total{outcome=\"failed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferrohub_alarm_notification_retries_total 2"),
        "{m}"
    );
}

#[tokio::test]
async fn rate_limit_suppresses_within_the_window_and_lets_one_through_after() {
    let (url, calls) = receiver(vec![], Duration::ZERO).await;
    let s = started(AlarmsConfig::default()).await;
    s.put_channel("t1", "hook", channel(url, 1, 1, 2000))
        .await
        .unwrap();
    let a = s.raise("t1", raise("k")).await.unwrap();
    s.raise("t1", raise("k")).await.unwrap();
    s.raise("t1", raise("k")).await.unwrap();
    let d = wait_for(&s, "hook", |d| d.sent == 1).await;
    assert_eq!(d.suppressed, 2);
    // Another alarm has its own window.
    s.raise("t1", raise("other")).await.unwrap();
    wait_for(&s, "hook", |d| d.sent == 2).await;
    // After the window, the next re-raise goes through.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = s.raise("t1", raise("k")).await.unwrap();
    assert_eq!((again.id.as_str(), again.count), (a.id.as_str(), 4));
    let d = wait_for(&s, "hook", |d| d.sent == 3).await;
    assert_eq!(d.suppressed, 2);
    // Clearing is never rate-limited.
    s.clear("t1", &a.id, "token:x", None).await.unwrap();
    wait_for(&s, "hook", |d| d.sent == 4).await;
    let kinds: Vec<String> = calls
        .lock()
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["raised", "raised", "updated", "cleared"]);
}

#[tokio::test]
async fn a_slow_webhook_does_not_delay_raise_and_a_full_queue_drops_with_a_record() {
    let (url, calls) = receiver(vec![], Duration::from_secs(5)).await;
    let s = started(AlarmsConfig {
        notification_queue: 2,
        workers: 1,
        ..Default::default()
    })
    .await;
    s.put_channel("t1", "slow", channel(url, 1, 0, 10_000))
        .await
        .unwrap();
    // One in the worker's hands, two queued, the rest do not fit.
    for i in 0..6 {
        let started = Instant::now();
        s.raise("t1", raise(&format!("k{i}"))).await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "raise {i} took {took:?}");
    }
    let d = wait_for(&s, "slow", |d| d.dropped >= 2).await;
    let dropped = d
        .deliveries
        .iter()
        .filter(|d| d.error.as_deref() == Some("queue full"))
        .count();
    assert_eq!(dropped as u64, d.dropped);
    assert!(d.deliveries.iter().all(|d| d.attempts == 0));
    let mut m = String::new();
    s.render_metrics(&mut m);
    assert!(
        m.contains(&format!(
            "ferrohub_alarm_notifications_total{{outcome=\"dropped\"}} {}",
            d.dropped
        )),
        "{m}"
    );
    assert!(calls.lock().len() <= 1);
}

#[tokio::test]
async fn filters_by_severity_and_event_and_test_sends_one_attempt() {
    let (url, calls) = receiver(vec![503], Duration::ZERO).await;
    let s = started(AlarmsConfig::default()).await;
    let mut spec = channel(url, 5, 0, 2000);
    spec.min_severity = Severity::Critical;
    spec.events = vec![EventKind::Raised];
    s.put_channel("t1", "crit", spec).await.unwrap();
    // Test: one attempt, the outcome returned and recorded.
    let d = s.test_channel("t1", "crit").await.unwrap();
    assert_eq!(
        (d.status, d.attempts, d.http_status, d.test),
        (DeliveryStatus::Failed, 1, Some(503), true)
    );
    let major = s.raise("t1", raise("m")).await.unwrap();
    s.clear("t1", &major.id, "x", None).await.unwrap();
    let mut crit = raise("c");
    crit.severity = Severity::Critical;
    s.raise("t1", crit).await.unwrap();
    let d = wait_for(&s, "crit", |d| d.sent == 1).await;
    assert_eq!(d.deliveries.len(), 2);
    assert_eq!(
        calls.lock().len(),
        2,
        "the test and the critical raise only"
    );
    // A disabled channel sends nothing.
    let mut spec = s.channel("t1", "crit").unwrap().spec;
    spec.enabled = false;
    s.put_channel("t1", "crit", spec).await.unwrap();
    let mut crit = raise("c2");
    crit.severity = Severity::Critical;
    s.raise("t1", crit).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls.lock().len(), 2);
}
