//! Alarms end to end against an in-process hub: raise through the API → a webhook channel
//! receives the rendered template; acknowledge, clear, history, counts; the SSE stream sees
//! raised and cleared; roles (a viewer cannot acknowledge), tenant scope (another tenant's token
//! gets 404), 409 on clearing twice, 400 naming the line of a bad channel template; alarms and
//! history survive a restart; the stream ends at shutdown. Every test is bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub, test_config};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within 60 s");
}

async fn api(
    hub: &TestHub,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", hub.api_url()))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header(header::CONTENT_TYPE, "application/json")
            .body(b.to_string());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn admin(hub: &TestHub, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, body) = api(hub, TEST_ADMIN_TOKEN, method, path, body).await;
    assert!((200..300).contains(&status), "{path}: {status} {body}");
    body
}

/// A token of `role` scoped to `tenant`; returns its secret.
async fn scoped_token(hub: &TestHub, tenant: &str, role: &str) -> String {
    let r = admin(
        hub,
        Method::POST,
        "/tokens",
        Some(json!({"name": format!("{role} of {tenant}"), "role": role, "tenant": tenant})),
    )
    .await;
    r["secret"].as_str().unwrap().to_string()
}

type Calls = Arc<parking_lot::Mutex<Vec<(HeaderMap, String)>>>;

/// A local webhook receiver answering 200.
async fn receiver() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let c = calls.clone();
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let c = c.clone();
            async move {
                c.lock().push((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hooks/alarms"), calls)
}

async fn wait_calls(calls: &Calls, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.lock().len() < n {
        assert!(
            Instant::now() < deadline,
            "{} webhook calls, wanted {n}",
            calls.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_stream(hub: &TestHub, tenant: &str, token: &str) -> reqwest::Response {
    let res = reqwest::Client::new()
        .get(format!("{}/tenants/{tenant}/alarms/stream", hub.api_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    res
}

/// Reads an event stream until `want` events arrived; returns (name, data) of each.
async fn read_events(res: &mut reqwest::Response, want: usize) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < want {
        let chunk = tokio::time::timeout(Duration::from_secs(10), res.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream is open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !event.is_empty() {
                out.push((event, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

const SLACK_BODY: &str = r#"{"text": {{ ("[" ~ alarm.severity | upper ~ "] " ~ alarm.message) | tojson }},
 "key": "{{ alarm.key }}", "event": "{{ event.kind }}", "by": "{{ event.by }}", "count": {{ alarm.count }}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_notifies_the_webhook_then_ack_clear_history_counts_and_stream() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "other"}))).await;
        let operator = scoped_token(&hub, "acme", "operator").await;
        let viewer = scoped_token(&hub, "acme", "viewer").await;
        let outsider = scoped_token(&hub, "other", "admin").await;
        let (url, calls) = receiver().await;

        // A channel with a bad template: 400 naming the field and the line.
        let (status, body) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::PUT,
            "/tenants/acme/alarm-channels/ops",
            Some(
                json!({"kind": {"webhook": {"url": url, "body": "{\n  \"a\": {{ alarm.key \n}"}}}),
            ),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], "invalid_template");
        assert_eq!(body["field"], "body");
        assert!(body["line"].as_u64().unwrap() >= 2, "{body}");
        assert!(body["message"].as_str().unwrap().contains("line"), "{body}");
        // Operators may not manage channels.
        let spec = json!({
            "kind": {"webhook": {"url": url, "headers": {"X-Alarm-Key": "{{ alarm.key }}"},
                                 "body": SLACK_BODY}},
            "min_severity": "major",
            "events": ["raised", "acknowledged", "cleared"],
        });
        let (status, _) = api(
            &hub,
            &operator,
            Method::PUT,
            "/tenants/acme/alarm-channels/ops",
            Some(spec.clone()),
        )
        .await;
        assert_eq!(status, 403);
        let (status, ch) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::PUT,
            "/tenants/acme/alarm-channels/ops",
            Some(spec.clone()),
        )
        .await;
        assert_eq!(status, 201, "{ch}");
        assert_eq!(ch["rate_limit_s"], 0);
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::PUT,
            "/tenants/acme/alarm-channels/ops",
            Some(spec),
        )
        .await;
        assert_eq!(status, 200, "replaced");

        let mut stream = open_stream(&hub, "acme", &viewer).await;

        // Raise: 201, then a re-raise folds: 200, count 2.
        let raise = json!({"key": "overheat:b17", "severity": "major", "device": "b17",
                           "message": "boiler at 97 °C", "details": {"temp": 97}});
        let (status, a) = api(
            &hub,
            &operator,
            Method::POST,
            "/tenants/acme/alarms",
            Some(raise.clone()),
        )
        .await;
        assert_eq!(status, 201, "{a}");
        assert_eq!(
            (
                a["state"].as_str(),
                a["count"].as_u64(),
                a["source"].as_str()
            ),
            (Some("active"), Some(1), Some("api"))
        );
        let id = a["id"].as_str().unwrap().to_string();
        wait_calls(&calls, 1).await;
        {
            let calls = calls.lock();
            let (headers, body) = &calls[0];
            assert_eq!(headers["x-alarm-key"], "overheat:b17");
            assert_eq!(headers[header::CONTENT_TYPE.as_str()], "application/json");
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                body,
                json!({"text": "[MAJOR] boiler at 97 °C", "key": "overheat:b17",
                                    "event": "raised", "by": "api", "count": 1})
            );
        }
        let (status, again) = api(
            &hub,
            &operator,
            Method::POST,
            "/tenants/acme/alarms",
            Some(raise),
        )
        .await;
        assert_eq!(
            (status, again["id"].as_str(), again["count"].as_u64()),
            (200, Some(id.as_str()), Some(2))
        );
        // Below the channel's minimum severity: no call.
        let (status, _) = api(
            &hub,
            &operator,
            Method::POST,
            "/tenants/acme/alarms",
            Some(json!({"key": "low", "severity": "info"})),
        )
        .await;
        assert_eq!(status, 201);

        // Viewers read but cannot acknowledge; another tenant's token sees nothing.
        let (status, _) = api(
            &hub,
            &viewer,
            Method::GET,
            &format!("/tenants/acme/alarms/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        let (status, _) = api(
            &hub,
            &viewer,
            Method::POST,
            &format!("/tenants/acme/alarms/{id}/acknowledge"),
            None,
        )
        .await;
        assert_eq!(status, 403);
        let (status, _) = api(
            &hub,
            &outsider,
            Method::GET,
            &format!("/tenants/acme/alarms/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 404);
        let (status, _) = api(
            &hub,
            &outsider,
            Method::GET,
            &format!("/tenants/other/alarms/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 404, "the id is not in the other tenant");
        let (status, _) = api(
            &hub,
            &viewer,
            Method::GET,
            "/tenants/acme/alarm-channels",
            None,
        )
        .await;
        assert_eq!(status, 403, "channel specs hold secrets");

        let counts = admin(&hub, Method::GET, "/tenants/acme/alarms/counts", None).await;
        assert_eq!(
            counts,
            json!({"critical": 0, "major": 1, "minor": 0, "warning": 0, "info": 1,
                                  "total": 2, "unacknowledged": 2})
        );

        let (status, ack) = api(
            &hub,
            &operator,
            Method::POST,
            &format!("/tenants/acme/alarms/{id}/acknowledge"),
            Some(json!({"note": "crew dispatched"})),
        )
        .await;
        assert_eq!(status, 200, "{ack}");
        assert_eq!(ack["state"], "acknowledged");
        assert!(
            ack["acknowledged_by"]
                .as_str()
                .unwrap()
                .starts_with("token:")
        );
        let (status, cleared) = api(
            &hub,
            &operator,
            Method::POST,
            &format!("/tenants/acme/alarms/{id}/clear"),
            None,
        )
        .await;
        assert_eq!((status, cleared["state"].as_str()), (200, Some("cleared")));
        let (status, twice) = api(
            &hub,
            &operator,
            Method::POST,
            &format!("/tenants/acme/alarms/{id}/clear"),
            None,
        )
        .await;
        assert_eq!(status, 409);
        assert!(
            twice["message"]
                .as_str()
                .unwrap()
                .contains("already cleared"),
            "{twice}"
        );
        wait_calls(&calls, 3).await;
        let events: Vec<String> = calls
            .lock()
            .iter()
            .map(|(_, b)| {
                serde_json::from_str::<Value>(b).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            events,
            ["raised", "acknowledged", "cleared"],
            "updated is not among the channel's events"
        );

        let history = admin(
            &hub,
            Method::GET,
            &format!("/tenants/acme/alarms/{id}/history"),
            None,
        )
        .await;
        let kinds: Vec<&str> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["raised", "updated", "acknowledged", "cleared"]);
        assert_eq!(history[2]["note"], "crew dispatched");

        let open = admin(&hub, Method::GET, "/tenants/acme/alarms?state=open", None).await;
        assert_eq!(open["items"].as_array().unwrap().len(), 1);
        let all = admin(&hub, Method::GET, "/tenants/acme/alarms?limit=1", None).await;
        assert_eq!(all["items"].as_array().unwrap().len(), 1);
        let next = all["next_cursor"].as_str().unwrap();
        let page2 = admin(
            &hub,
            Method::GET,
            &format!("/tenants/acme/alarms?limit=1&cursor={next}"),
            None,
        )
        .await;
        assert_eq!(page2["items"].as_array().unwrap().len(), 1);
        assert_ne!(page2["items"][0]["id"], all["items"][0]["id"]);
        assert!(page2.get("next_cursor").is_none());
        let (status, _) = api(
            &hub,
            &viewer,
            Method::GET,
            "/tenants/acme/alarms?severity=urgent",
            None,
        )
        .await;
        assert_eq!(status, 400);
        let counts = admin(&hub, Method::GET, "/tenants/acme/alarms/counts", None).await;
        assert_eq!(
            (counts["total"].as_u64(), counts["major"].as_u64()),
            (Some(1), Some(0))
        );

        // The stream saw the lifecycle, in order.
        let seen = read_events(&mut stream, 5).await;
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["raised", "updated", "raised", "acknowledged", "cleared"]
        );
        assert_eq!(seen[4].1["alarm"]["id"], id.as_str());
        assert!(
            seen.windows(2)
                .all(|w| w[0].1["seq"].as_i64() < w[1].1["seq"].as_i64())
        );

        // Deliveries and a test send.
        let d = admin(
            &hub,
            Method::GET,
            "/tenants/acme/alarm-channels/ops/deliveries",
            None,
        )
        .await;
        assert_eq!(
            (d["sent"].as_u64(), d["failed"].as_u64()),
            (Some(3), Some(0))
        );
        assert_eq!(d["deliveries"][0]["event"], "cleared");
        let t = admin(
            &hub,
            Method::POST,
            "/tenants/acme/alarm-channels/ops/test",
            None,
        )
        .await;
        assert_eq!(
            (t["status"].as_str(), t["http_status"].as_u64()),
            (Some("sent"), Some(200))
        );
        wait_calls(&calls, 4).await;

        // /metrics carries the alarm series.
        let metrics = reqwest::get(format!(
            "{}/metrics",
            hub.api_url().trim_end_matches("/api/v1")
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        assert!(
            metrics.contains("ferrohub_alarms_raised_total 2"),
            "{metrics}"
        );
        assert!(metrics.contains("ferrohub_alarms_open 1"), "{metrics}");
        assert!(
            metrics.contains("ferrohub_alarm_notifications_total{outcome=\"sent\"} 4"),
            "{metrics}"
        );

        // The document lists the routes.
        let doc = admin(&hub, Method::GET, "/openapi.json", None).await;
        for p in [
            "/api/v1/tenants/{tenant}/alarms",
            "/api/v1/tenants/{tenant}/alarms/stream",
            "/api/v1/tenants/{tenant}/alarm-channels/{channel}/test",
        ] {
            assert!(doc["paths"][p].is_object(), "{p}");
        }

        // Deleting a channel; the stream ends at shutdown.
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::DELETE,
            "/tenants/acme/alarm-channels/ops",
            None,
        )
        .await;
        assert_eq!(status, 204);
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            "/tenants/acme/alarm-channels/ops",
            None,
        )
        .await;
        assert_eq!(status, 404);
        hub.stop().await;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = stream.chunk().await {}
        })
        .await;
        assert!(end.is_ok(), "the stream ended with the hub");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_survive_a_restart_and_go_with_their_tenant() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let hub = TestHub::start_config(test_config(dir.path().to_path_buf()))
            .await
            .unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        let a = admin(
            &hub,
            Method::POST,
            "/tenants/acme/alarms",
            Some(json!({"key": "door:1", "severity": "critical", "message": "open"})),
        )
        .await;
        let id = a["id"].as_str().unwrap().to_string();
        admin(
            &hub,
            Method::POST,
            &format!("/tenants/acme/alarms/{id}/acknowledge"),
            None,
        )
        .await;
        hub.stop().await;

        let hub = TestHub::start_config(test_config(dir.path().to_path_buf()))
            .await
            .unwrap();
        let got = admin(
            &hub,
            Method::GET,
            &format!("/tenants/acme/alarms/{id}"),
            None,
        )
        .await;
        assert_eq!(
            (got["state"].as_str(), got["severity"].as_str()),
            (Some("acknowledged"), Some("critical"))
        );
        let history = admin(
            &hub,
            Method::GET,
            &format!("/tenants/acme/alarms/{id}/history"),
            None,
        )
        .await;
        assert_eq!(history.as_array().unwrap().len(), 2);
        // Still the open alarm of its key.
        let (status, again) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::POST,
            "/tenants/acme/alarms",
            Some(json!({"key": "door:1", "severity": "minor"})),
        )
        .await;
        assert_eq!(
            (status, again["id"].as_str(), again["count"].as_u64()),
            (200, Some(id.as_str()), Some(2))
        );

        // Deleting the tenant deletes its alarms: a tenant created again under the id has none.
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::DELETE,
            "/tenants/acme",
            None,
        )
        .await;
        assert!((200..300).contains(&status), "{status}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _) = api(
                &hub,
                TEST_ADMIN_TOKEN,
                Method::GET,
                &format!("/tenants/acme/alarms/{id}"),
                None,
            )
            .await;
            if status == 404 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the tenant's alarm is still there"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hub.stop().await;
    })
    .await;
}
