//! The operator console's HTTP surface against an in-process hub: the shell at `/` (and at any
//! non-API path) with its Content-Security-Policy, the assets' content types, ETag/304 and gzip,
//! the fleet overview (once and as a Server-Sent Events stream: auth, tenant scope, bounds, end at
//! shutdown), the device listing's `id_prefix` search the console uses, a device's live message
//! tail (publishes, deliveries, base64, skipped counts, the watcher cap, tenant scope, shutdown, no
//! watch-table lookups while nobody watches) and `GET /me`. Every test is bounded in time and
//! stops its hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within 60 s");
}

fn origin(hub: &TestHub) -> String {
    hub.api_url().trim_end_matches("/api/v1").to_string()
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

async fn create_devices(hub: &TestHub, tenant: &str, ids: &[&str]) {
    for id in ids {
        admin(
            hub,
            Method::POST,
            &format!("/tenants/{tenant}/devices"),
            Some(json!({"id": id, "name": format!("name of {id}")})),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_is_served_at_the_root_and_any_non_api_path_with_a_strict_csp() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        let http = reqwest::Client::new();
        for path in ["/", "/devices/d1", "/some/deep/link"] {
            let res = http
                .get(format!("{}{path}", origin(&hub)))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            let h = res.headers().clone();
            assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.starts_with("default-src 'self'"), "{csp}");
            assert!(
                csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
                "{csp}"
            );
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert!(h.contains_key(header::ETAG));
            let body = res.text().await.unwrap();
            assert!(body.contains("<script type=\"module\" src=\"/console/app.js\">"));
            // No inline script: every <script> has a src.
            assert_eq!(
                body.matches("<script").count(),
                body.matches("<script type=\"module\" src=").count()
            );
        }
        // The APIs keep their JSON 404s.
        for path in ["/api/v1/nothing-here", "/api/other", "/console/missing.js"] {
            let res = http
                .get(format!("{}{path}", origin(&hub)))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
            assert_ne!(
                res.headers()[header::CONTENT_TYPE],
                "text/html; charset=utf-8",
                "{path}"
            );
        }
        // A POST to a console path is not the shell.
        let res = http
            .post(format!("{}/devices", origin(&hub)))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_have_their_content_types_etags_304s_and_gzip() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        let http = reqwest::Client::new();
        // Every file of the console's source folder is served (a module added there but not to
        // the asset table would break the page that imports it).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/console");
        let mut files: Vec<(String, &str)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .map(|name| {
                let content_type = match name.rsplit('.').next() {
                    Some("html") => "text/html; charset=utf-8",
                    Some("js") => "text/javascript; charset=utf-8",
                    Some("css") => "text/css; charset=utf-8",
                    Some("svg") => "image/svg+xml",
                    other => panic!("{name}: no content type known for {other:?}"),
                };
                (name, content_type)
            })
            .collect();
        files.sort();
        assert!(files.len() >= 10, "{files:?}");
        for (file, content_type) in files {
            let url = format!("{}/console/{file}", origin(&hub));
            let res = http.get(&url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{file}");
            assert_eq!(res.headers()[header::CONTENT_TYPE], content_type, "{file}");
            assert!(
                res.headers().contains_key(header::CONTENT_SECURITY_POLICY),
                "{file}"
            );
            assert!(
                !res.headers().contains_key(header::CONTENT_ENCODING),
                "{file}: not asked for gzip"
            );
            let etag = res.headers()[header::ETAG].to_str().unwrap().to_string();
            assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
            let plain = res.bytes().await.unwrap();
            assert!(!plain.is_empty());

            // Revalidation: the same ETag is a 304 without a body; another is a 200.
            let res = http
                .get(&url)
                .header(header::IF_NONE_MATCH, &etag)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{file}");
            assert_eq!(res.headers()[header::ETAG].to_str().unwrap(), etag);
            assert!(res.bytes().await.unwrap().is_empty());
            let res = http
                .get(&url)
                .header(header::IF_NONE_MATCH, "\"other\"")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{file}");

            // Gzip when accepted (the SVG icon is too small to gain and stays plain).
            let res = http
                .get(&url)
                .header(header::ACCEPT_ENCODING, "gzip")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            if file != "favicon.svg" {
                assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip", "{file}");
                let gz = res.bytes().await.unwrap();
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out)
                    .unwrap();
                assert_eq!(out, plain, "{file}: gzip body decodes to the file");
            }
        }
        let res = http
            .head(format!("{}/console/app.js", origin(&hub)))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        hub.stop().await;
    })
    .await;
}

/// Reads from an event stream until `want` events named `name` arrived; returns their data.
async fn read_events(res: &mut reqwest::Response, name: &str, want: usize) -> Vec<Value> {
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
            let mut event = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = if e.trim() == name { name } else { "other" };
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if event == name {
                out.push(serde_json::from_str(&data).unwrap());
            }
        }
    }
    out
}

fn stream_request(
    hub: &TestHub,
    tenant: &str,
    query: &str,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    let req = reqwest::Client::new().get(format!(
        "{}/tenants/{tenant}/overview/stream{query}",
        hub.api_url()
    ));
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_devices_once_and_as_a_stream() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        create_devices(&hub, "acme", &["d1", "d2", "d3"]).await;
        let o = admin(&hub, Method::GET, "/tenants/acme/overview", None).await;
        assert_eq!(o["tenant"], "acme");
        assert_eq!(o["devices"], json!({"total": 3, "online": 0, "offline": 3}));
        assert!(o["at"].as_u64().unwrap() > 0);
        assert_eq!(o["alarms"]["total"], 0, "{o}");

        let mut res = stream_request(&hub, "acme", "?interval=1", Some(TEST_ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        let first = read_events(&mut res, "overview", 1).await;
        assert_eq!(first[0]["devices"]["total"], 3);
        // A platform token gets the hub-wide broker figures, rates from the second event on.
        assert!(
            first[0]["hub"]["messages_received"].is_u64(),
            "{}",
            first[0]
        );
        assert!(first[0]["hub"].get("messages_in_per_sec").is_none());
        // A device created and an alarm raised meanwhile show in a later figure, without a new
        // request.
        create_devices(&hub, "acme", &["d4"]).await;
        let alarm = json!({"key": "overheat:d4", "severity": "major", "device": "d4"});
        admin(&hub, Method::POST, "/tenants/acme/alarms", Some(alarm)).await;
        let mut seen = (3, 0);
        for _ in 0..5 {
            let next = read_events(&mut res, "overview", 1).await;
            let alarms = &next[0]["alarms"];
            seen = (
                next[0]["devices"]["total"].as_u64().unwrap(),
                alarms["major"].as_u64().unwrap(),
            );
            assert!(
                next[0]["hub"]["messages_in_per_sec"].is_f64(),
                "{}",
                next[0]
            );
            if seen == (4, 1) {
                assert_eq!(alarms["unacknowledged"], 1, "{alarms}");
                break;
            }
        }
        assert_eq!(seen, (4, 1));
        drop(res);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_stream_respects_auth_tenant_scope_and_bounds() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        for t in ["acme", "other"] {
            admin(&hub, Method::POST, "/tenants", Some(json!({"id": t}))).await;
        }
        let viewer = scoped_token(&hub, "acme", "viewer").await;

        let res = stream_request(&hub, "acme", "", None).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let res = stream_request(&hub, "acme", "", Some("fh_wrong_token_0000000000"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        // Another tenant is answered like a missing one.
        let res = stream_request(&hub, "other", "", Some(&viewer))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let (status, _) = api(&hub, &viewer, Method::GET, "/tenants/other/overview", None).await;
        assert_eq!(status, 404);
        // A viewer of its own tenant may watch.
        let mut res = stream_request(&hub, "acme", "", Some(&viewer))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = read_events(&mut res, "overview", 1).await;
        assert_eq!(seen[0]["tenant"], "acme");
        // Hub-wide figures span every tenant: not for a tenant's token.
        assert!(seen[0].get("hub").is_none(), "{}", seen[0]);
        // Bounds of the interval; unknown parameters are refused.
        for q in ["?interval=0", "?interval=61", "?interval=x", "?every=2"] {
            let res = stream_request(&hub, "acme", q, Some(&viewer))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{q}");
        }
        drop(res);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_event_streams_end_when_the_hub_shuts_down() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        let mut res = stream_request(&hub, "default", "?interval=60", Some(TEST_ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        read_events(&mut res, "overview", 1).await;
        // The console's other stream, a device's twin changes, ends the same way.
        admin(
            &hub,
            Method::POST,
            "/tenants/default/devices",
            Some(json!({"id": "w1"})),
        )
        .await;
        let mut watch = reqwest::Client::new()
            .get(format!(
                "{}/tenants/default/twins/watch?device=w1",
                hub.api_url()
            ))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(watch.status(), StatusCode::OK);
        admin(
            &hub,
            Method::PATCH,
            "/tenants/default/devices/w1/twins/default/desired",
            Some(json!({"a": 1})),
        )
        .await;
        read_events(&mut watch, "change", 1).await;
        // Shutdown does not wait for the client to hang up: it ends the stream.
        tokio::time::timeout(Duration::from_secs(15), hub.stop())
            .await
            .expect("the hub stops with a stream open");
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = res.chunk().await {}
        })
        .await;
        assert!(end.is_ok(), "the stream ended");
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = watch.chunk().await {}
        })
        .await;
        assert!(end.is_ok(), "the twin watch ended");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_listing_searches_by_id_prefix() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        create_devices(
            &hub,
            "acme",
            &["pump-1", "pump-2", "pump-10", "valve-1", "pum"],
        )
        .await;
        let ids = |page: &Value| -> Vec<String> {
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string())
                .collect()
        };
        let page = admin(
            &hub,
            Method::GET,
            "/tenants/acme/devices?id_prefix=pump-",
            None,
        )
        .await;
        assert_eq!(ids(&page), ["pump-1", "pump-10", "pump-2"]);
        let page = admin(
            &hub,
            Method::GET,
            "/tenants/acme/devices?id_prefix=pump-1&sort=id&order=desc",
            None,
        )
        .await;
        assert_eq!(ids(&page), ["pump-10", "pump-1"]);
        // Paged: the cursor keeps the filter.
        let page = admin(
            &hub,
            Method::GET,
            "/tenants/acme/devices?id_prefix=pump&limit=2",
            None,
        )
        .await;
        // "pum" is shorter than the prefix: not a match.
        assert_eq!(ids(&page), ["pump-1", "pump-10"]);
        let cursor = page["next_cursor"].as_str().unwrap();
        let page = admin(
            &hub,
            Method::GET,
            &format!("/tenants/acme/devices?id_prefix=pump&limit=2&cursor={cursor}"),
            None,
        )
        .await;
        assert_eq!(ids(&page), ["pump-2"]);
        // With other filters, and nothing matching.
        let page = admin(
            &hub,
            Method::GET,
            "/tenants/acme/devices?id_prefix=valve&status=enabled",
            None,
        )
        .await;
        assert_eq!(ids(&page), ["valve-1"]);
        let page = admin(
            &hub,
            Method::GET,
            "/tenants/acme/devices?id_prefix=zzz",
            None,
        )
        .await;
        assert!(ids(&page).is_empty());
        // The parameter is in the OpenAPI document.
        let doc = admin(&hub, Method::GET, "/openapi.json", None).await;
        let params = doc["paths"]["/api/v1/tenants/{tenant}/devices"]["get"]["parameters"]
            .as_array()
            .unwrap();
        assert!(params.iter().any(|p| p["name"] == "id_prefix"));
        assert!(doc["paths"]["/api/v1/tenants/{tenant}/overview/stream"]["get"].is_object());
        assert!(doc["paths"]["/api/v1/tenants/{tenant}/overview"]["get"].is_object());
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A device's live message tail and /me
// ---------------------------------------------------------------------------------------------

fn tail_request(
    hub: &TestHub,
    tenant: &str,
    device: &str,
    query: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!(
            "{}/tenants/{tenant}/devices/{device}/messages/stream{query}",
            hub.api_url()
        ))
        .bearer_auth(token)
}

/// Opens a tail and waits for its `ready` event (the watch is in place from then on).
async fn open_tail(
    hub: &TestHub,
    tenant: &str,
    device: &str,
    query: &str,
    token: &str,
) -> reqwest::Response {
    let mut res = tail_request(hub, tenant, device, query, token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    read_events(&mut res, "ready", 1).await;
    res
}

/// An MQTT 3.1.1 client whose event loop runs in a task; the receiver gets its PUBLISHes.
fn mqtt_client(
    hub: &TestHub,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    tokio::task::JoinHandle<()>,
) {
    let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", hub.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, pass)) = credentials {
        o.set_credentials(user, pass);
    }
    let (client, mut events) = rumqttc::AsyncClient::new(o, 4096);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e {
                let _ = tx.send(p);
            }
        }
    });
    (client, rx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_tail_shows_its_publishes_and_deliveries_binary_as_base64() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        create_devices(&hub, "default", &["d1"]).await;
        admin(
            &hub,
            Method::POST,
            "/tenants/default/devices/d1/credentials",
            Some(json!({"kind": "password", "secret": "secret-d1-0123"})),
        )
        .await;
        // A viewer may watch.
        let viewer = scoped_token(&hub, "default", "viewer").await;
        let mut tail = open_tail(&hub, "default", "d1", "", &viewer).await;

        let (dev, mut dev_rx, dev_task) = mqtt_client(&hub, "d1", Some(("d1", "secret-d1-0123")));
        dev.subscribe("devices/d1/cmd", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        dev.publish(
            "devices/d1/status",
            rumqttc::QoS::AtLeastOnce,
            false,
            "{\"ok\":true}",
        )
        .await
        .unwrap();
        dev.publish(
            "devices/d1/raw",
            rumqttc::QoS::AtMostOnce,
            false,
            vec![0xffu8, 0x00, 0x10],
        )
        .await
        .unwrap();
        let got = read_events(&mut tail, "message", 2).await;
        assert_eq!(got[0]["direction"], "in");
        assert_eq!(got[0]["topic"], "devices/d1/status");
        assert_eq!(got[0]["payload"], "{\"ok\":true}");
        assert_eq!(got[0]["base64"], false);
        assert_eq!(got[0]["qos"], 1);
        assert_eq!(got[0]["size"], 11);
        assert_eq!(got[1]["topic"], "devices/d1/raw");
        assert_eq!(got[1]["payload"], "/wAQ");
        assert_eq!(got[1]["base64"], true);

        // A message another client sends to the device shows as delivered ("out"), once the
        // device has it. (Waiting for the SUBACK: the subscription is in place.)
        let (other, _other_rx, other_task) = mqtt_client(&hub, "console-test-sender", None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            other
                .publish("devices/d1/cmd", rumqttc::QoS::AtLeastOnce, false, "reboot")
                .await
                .unwrap();
            if let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_millis(500), dev_rx.recv()).await
            {
                assert_eq!(&p.payload[..], b"reboot");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no delivery");
        }
        let out = read_events(&mut tail, "message", 1).await;
        assert_eq!(out[0]["direction"], "out");
        assert_eq!(out[0]["topic"], "devices/d1/cmd");
        assert_eq!(out[0]["payload"], "reboot");
        // What the other client published is not d1's traffic.
        assert_ne!(out[0]["direction"], "in");
        drop(tail);
        dev_task.abort();
        other_task.abort();
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_tail_reports_every_message_it_skipped() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        create_devices(&hub, "default", &["f1"]).await;
        // A tail of one message: nearly everything of a burst is skipped, and counted.
        let mut tail = open_tail(&hub, "default", "f1", "?capacity=1", TEST_ADMIN_TOKEN).await;
        // Anonymous clients are watched under their client id.
        let (c, _rx, task) = mqtt_client(&hub, "f1", None);
        const SENT: u64 = 2000;
        let payload = vec![b'x'; 2048];
        for _ in 0..SENT {
            c.publish(
                "devices/f1/flood",
                rumqttc::QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        }
        let (mut received, mut skipped) = (0u64, 0u64);
        while received + skipped < SENT {
            for e in read_events(&mut tail, "message", 1).await {
                received += 1;
                skipped += e["skipped"].as_u64().unwrap();
                assert_eq!(e["size"], 2048);
            }
        }
        assert_eq!(
            received + skipped,
            SENT,
            "each message arrived or was counted"
        );
        assert!(skipped > 0, "a queue of one skipped some of {SENT}");
        let metrics = reqwest::get(format!("{}/metrics", origin(&hub)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(&format!("ferrohub_watch_dropped_total {skipped}")),
            "the skipped copies are in the metrics"
        );
        drop(tail);
        task.abort();
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_are_capped_scoped_to_their_tenant_and_end_at_shutdown() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        create_devices(&hub, "default", &["d1"]).await;
        create_devices(&hub, "acme", &["a1"]).await;
        // Another tenant's device and an unknown device look the same: 404.
        let acme_viewer = scoped_token(&hub, "acme", "viewer").await;
        let res = tail_request(&hub, "default", "d1", "", &acme_viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let res = tail_request(&hub, "acme", "nobody", "", &acme_viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let res = tail_request(&hub, "acme", "d1", "", TEST_ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "d1 is not acme's");
        let res = tail_request(&hub, "acme", "a1", "?capacity=0", &acme_viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        // No token: 401.
        let res = reqwest::get(format!(
            "{}/tenants/acme/devices/a1/messages/stream",
            hub.api_url()
        ))
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

        // 64 tails per hub; the 65th is refused until one closes.
        let mut open = Vec::new();
        for _ in 0..ferrohub_adapters::mqtt::MAX_WATCHERS {
            open.push(open_tail(&hub, "acme", "a1", "", &acme_viewer).await);
        }
        let (status, body) = {
            let res = tail_request(&hub, "acme", "a1", "", &acme_viewer)
                .send()
                .await
                .unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        };
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["code"], "too_many_streams");
        open.pop();
        // The watch goes with the response; the server notices when it next writes or polls.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = loop {
            let res = tail_request(&hub, "acme", "a1", "", &acme_viewer)
                .send()
                .await
                .unwrap();
            if res.status() == StatusCode::OK {
                break res;
            }
            assert!(tokio::time::Instant::now() < deadline, "a slot frees up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        read_events(&mut last, "ready", 1).await;

        // Shutdown ends every tail.
        tokio::time::timeout(Duration::from_secs(15), hub.stop())
            .await
            .expect("the hub stops with tails open");
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = last.chunk().await {}
        })
        .await;
        assert!(end.is_ok(), "the tail ended");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_tells_the_token_its_role_and_tenant() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin(&hub, Method::POST, "/tenants", Some(json!({"id": "acme"}))).await;
        let me = admin(&hub, Method::GET, "/me", None).await;
        assert_eq!(me["role"], "admin");
        assert!(me["tenant"].is_null());
        assert!(me["actor"].as_str().unwrap().starts_with("token:"));
        let viewer = scoped_token(&hub, "acme", "viewer").await;
        let (status, me) = api(&hub, &viewer, Method::GET, "/me", None).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["role"], "viewer");
        assert_eq!(me["tenant"], "acme");
        assert_eq!(me["name"], "viewer of acme");
        assert_eq!(
            me["actor"].as_str().unwrap(),
            format!("token:{}", me["token_id"].as_str().unwrap())
        );
        let (status, _) = api(&hub, "fh_wrong_token_0000000000", Method::GET, "/me", None).await;
        assert_eq!(status, 401);
        let doc = admin(&hub, Method::GET, "/openapi.json", None).await;
        assert!(doc["paths"]["/api/v1/me"]["get"].is_object());
        assert!(
            doc["paths"]["/api/v1/tenants/{tenant}/devices/{device}/messages/stream"]["get"]
                .is_object()
        );
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatched_traffic_never_looks_up_the_watch_table() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        create_devices(&hub, "default", &["u1", "u1-other"]).await;
        let broker = hub.hub().broker.clone();
        let (sub, mut sub_rx, sub_task) = mqtt_client(&hub, "u1", None);
        sub.subscribe("devices/u1/#", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        // Publishes and deliveries (the subscriber gets its own messages back) with nobody
        // watching: no lookup at all.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < 20 {
            sub.publish("devices/u1/x", rumqttc::QoS::AtLeastOnce, false, "m")
                .await
                .unwrap();
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), sub_rx.recv()).await
            {
                got += 1;
            }
            assert!(tokio::time::Instant::now() < deadline, "no deliveries");
        }
        assert_eq!(broker.watch_lookups(), 0, "nobody watches: no lookup");
        // Someone watches another device: each publish and delivery looks once (and finds
        // nothing for u1); after the tail closes, none again.
        let tail = open_tail(&hub, "default", "u1-other", "", TEST_ADMIN_TOKEN).await;
        sub.publish("devices/u1/x", rumqttc::QoS::AtLeastOnce, false, "m")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let watched = broker.watch_lookups();
        assert!(
            watched >= 2,
            "a publish and a delivery looked up: {watched}"
        );
        drop(tail);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut before;
        loop {
            before = broker.watch_lookups();
            sub.publish("devices/u1/x", rumqttc::QoS::AtLeastOnce, false, "m")
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
                .await
                .unwrap()
                .unwrap();
            if broker.watch_lookups() == before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the closed tail's watch went away"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sub_task.abort();
        hub.stop().await;
    })
    .await;
}
