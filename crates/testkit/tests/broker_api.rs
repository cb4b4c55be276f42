//! The broker through the operator API (`/api/v1/tenants/{t}/broker/…`, `/api/v1/broker/sys`)
//! against an in-process hub, driven by rumqttc clients (3.1.1, 5.0, one over WebSocket):
//! sessions (content, paging, prefix search, detail with subscriptions), kick and discard as the
//! clients see them, subscriptions, retained messages (preview, full payload, delete that
//! survives a restart), per-tenant figures and top talkers (also in the overview), `$SYS`
//! figures, roles and tenant isolation. Every test is bounded in time and stops its hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub, test_config};
use reqwest::Method;
use serde_json::{Value, json};

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within 60 s");
}

async fn api(hub: &TestHub, token: &str, method: Method, path: &str) -> (u16, Value) {
    api_body(hub, token, method, path, None).await
}

async fn api_body(
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
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b.to_string());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn admin(hub: &TestHub, method: Method, path: &str) -> Value {
    let (status, body) = api(hub, TEST_ADMIN_TOKEN, method, path).await;
    assert!((200..300).contains(&status), "{path}: {status} {body}");
    body
}

async fn admin_post(hub: &TestHub, path: &str, body: Value) -> Value {
    let (status, body) = api_body(hub, TEST_ADMIN_TOKEN, Method::POST, path, Some(body)).await;
    assert!((200..300).contains(&status), "{path}: {status} {body}");
    body
}

/// A token of `role` scoped to `tenant`.
async fn scoped_token(hub: &TestHub, tenant: &str, role: &str) -> String {
    let r = admin_post(
        hub,
        "/tokens",
        json!({"name": format!("{role} of {tenant}"), "role": role, "tenant": tenant}),
    )
    .await;
    r["secret"].as_str().unwrap().to_string()
}

/// A path segment: client ids and topics are percent-encoded (`/` as `%2F`).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["client_id"].as_str().unwrap().to_string())
        .collect()
}

fn session_of<'a>(page: &'a Value, client_id: &str) -> &'a Value {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == client_id)
        .unwrap_or_else(|| panic!("no session {client_id} in {page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_paged_searched_and_detailed_with_their_subscriptions() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        // 3.1.1 over TCP, persistent.
        let mut o = v4_opts(&hub, "bk-a-v4");
        o.set_clean_session(false);
        let mut a = V4::connect(o).await;
        a.subscribe("plant/+/temp", rumqttc::QoS::AtLeastOnce).await;
        // 5.0 over TCP: subscription options, an identifier, a shared subscription.
        let mut o = v5_opts(&hub, "bk-b-v5");
        o.set_keep_alive(Duration::from_secs(45));
        let mut b = V5::connect(o).await;
        let mut f = m5::Filter::new("plant/#", m5::QoS::ExactlyOnce);
        f.nolocal = true;
        f.preserve_retain = true;
        f.retain_forward_rule = m5::RetainForwardRule::Never;
        b.subscribe_filter(
            f,
            Some(m5::SubscribeProperties {
                id: Some(7),
                user_properties: Vec::new(),
            }),
        )
        .await;
        b.subscribe("$share/workers/jobs/#", m5::QoS::AtLeastOnce)
            .await;
        // 3.1.1 over WebSocket.
        let url = format!("ws://{}/mqtt", hub.ws);
        let mut o = rumqttc::MqttOptions::new("bk-c-ws", url, hub.ws.port());
        o.set_transport(rumqttc::Transport::Ws);
        let mut c = V4::connect(o).await;
        c.subscribe("alerts", rumqttc::QoS::AtMostOnce).await;
        for _ in 0..3 {
            c.publish("telemetry/x", rumqttc::QoS::AtLeastOnce, false, b"1")
                .await;
        }
        b.barrier().await;

        let all = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/sessions?prefix=bk-",
        )
        .await;
        assert_eq!(ids(&all), ["bk-a-v4", "bk-b-v5", "bk-c-ws"], "{all}");
        assert!(all.get("next").is_none(), "{all}");
        let sa = session_of(&all, "bk-a-v4");
        assert_eq!(sa["connected"], true);
        assert_eq!(sa["protocol"], "3.1.1");
        assert_eq!(sa["transport"], "tcp");
        assert_eq!(sa["clean_start"], false);
        assert!(sa["session_expiry_secs"].as_u64().unwrap() > 0, "{sa}");
        assert_eq!(sa["keep_alive_secs"], 30);
        assert_eq!(sa["subscriptions"], 1);
        assert!(
            sa["remote_address"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert!(sa["connected_at"].as_u64().unwrap() > 0);
        assert!(sa.get("device_id").is_none(), "anonymous: {sa}");
        let sb = session_of(&all, "bk-b-v5");
        assert_eq!(
            (&sb["protocol"], &sb["transport"], &sb["clean_start"]),
            (&json!("5.0"), &json!("tcp"), &json!(true))
        );
        assert_eq!(sb["keep_alive_secs"], 45);
        assert_eq!(sb["session_expiry_secs"], 0);
        assert_eq!(sb["subscriptions"], 2);
        // The barrier is one PUBLISH in.
        assert_eq!(sb["messages_in"], 1);
        let sc = session_of(&all, "bk-c-ws");
        assert_eq!(
            (&sc["protocol"], &sc["transport"]),
            (&json!("3.1.1"), &json!("ws"))
        );
        assert_eq!(sc["messages_in"], 3);
        for s in all["items"].as_array().unwrap() {
            for key in ["queued", "inflight", "messages_out"] {
                assert!(s[key].is_u64(), "{key} in {s}");
            }
        }

        // Paging: one at a time, following `next`.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = "/tenants/default/broker/sessions?prefix=bk-&limit=1".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", seg(a)));
            }
            let page = admin(&hub, Method::GET, &path).await;
            seen.extend(ids(&page));
            match page.get("next").and_then(Value::as_str) {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
            assert!(seen.len() <= 3, "paging does not end: {seen:?}");
        }
        assert_eq!(seen, ["bk-a-v4", "bk-b-v5", "bk-c-ws"]);
        let narrowed = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/sessions?prefix=bk-b",
        )
        .await;
        assert_eq!(ids(&narrowed), ["bk-b-v5"]);
        let (status, body) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            "/tenants/default/broker/sessions?limit=0",
        )
        .await;
        assert_eq!(status, 400, "{body}");

        // Detail.
        let d = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/sessions/bk-b-v5",
        )
        .await;
        assert_eq!(d["client_id"], "bk-b-v5");
        assert_eq!(d["connected"], true);
        let subs = d["subscription_list"].as_array().unwrap();
        assert_eq!(subs.len(), 2, "{d}");
        assert_eq!(
            subs[0],
            json!({"client_id": "bk-b-v5", "filter": "jobs/#", "share_group": "workers",
                   "qos": 1, "no_local": false, "retain_as_published": false, "retain_handling": 0})
        );
        assert_eq!(
            subs[1],
            json!({"client_id": "bk-b-v5", "filter": "plant/#", "qos": 2, "no_local": true,
                   "retain_as_published": true, "retain_handling": 2, "subscription_id": 7})
        );
        let (status, body) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            "/tenants/default/broker/sessions/nobody",
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

        // Subscriptions of the tenant, by filter then client, searched and paged.
        let subs = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/subscriptions?filter_prefix=plant",
        )
        .await;
        let rows: Vec<(String, String)> = subs["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["filter"].as_str().unwrap().to_string(),
                    r["client_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("plant/#".to_string(), "bk-b-v5".to_string()),
                ("plant/+/temp".to_string(), "bk-a-v4".to_string())
            ]
        );
        let first = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/subscriptions?filter_prefix=plant&limit=1",
        )
        .await;
        assert_eq!(first["items"].as_array().unwrap().len(), 1);
        let next = first["next"].as_str().expect("a next page").to_string();
        let second = admin(
            &hub,
            Method::GET,
            &format!(
                "/tenants/default/broker/subscriptions?filter_prefix=plant&limit=1&after={}",
                seg(&next)
            ),
        )
        .await;
        assert_eq!(second["items"][0]["filter"], "plant/+/temp", "{second}");
        assert!(second.get("next").is_none(), "{second}");
        let shared = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/subscriptions?filter_prefix=jobs",
        )
        .await;
        assert_eq!(shared["items"][0]["share_group"], "workers");

        // A persistent session outlives its connection: listed offline.
        a.disconnect().await;
        let d = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/sessions/bk-a-v4",
        )
        .await;
        assert_eq!(d["connected"], false, "{d}");
        assert!(d["disconnected_at"].as_u64().is_some(), "{d}");
        assert_eq!(d["subscription_list"][0]["filter"], "plant/+/temp");
        b.disconnect().await;
        c.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_disconnects_keeping_the_session_and_discard_drops_it() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        let viewer = scoped_token(&hub, "default", "viewer").await;
        let operator = scoped_token(&hub, "default", "operator").await;
        let persistent = |hub: &TestHub| {
            let mut o = v5_opts(hub, "bk-kick");
            o.set_clean_start(false);
            let mut props = m5::ConnectProperties::new();
            props.session_expiry_interval = Some(600);
            o.set_connect_properties(props);
            o
        };
        let mut c = V5::connect(persistent(&hub)).await;
        c.subscribe("kick/#", m5::QoS::AtLeastOnce).await;
        let path = "/tenants/default/broker/sessions/bk-kick";

        // A viewer reads but may not kick.
        let (status, _) = api(&hub, &viewer, Method::GET, path).await;
        assert_eq!(status, 200);
        let (status, body) = api(&hub, &viewer, Method::DELETE, path).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
        let (status, _) = api(
            &hub,
            &viewer,
            Method::DELETE,
            &format!("{path}?discard=true"),
        )
        .await;
        assert_eq!(status, 403);
        assert!(!c.is_closed());

        // Kick: the client is told (v5 DISCONNECT 0x98 Administrative action), the session stays.
        let (status, body) = api(&hub, &operator, Method::DELETE, path).await;
        assert_eq!(status, 204, "{body}");
        let reason = server_disconnect_reason(c.wait_closed(WAIT).await);
        assert_eq!(reason, Some(0x98));
        let d = admin(&hub, Method::GET, path).await;
        assert_eq!(d["connected"], false, "{d}");
        assert_eq!(d["subscriptions"], 1);
        // Kicking a client that is not connected is a conflict; an unknown one is not found.
        let (status, body) = api(&hub, &operator, Method::DELETE, path).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("not_connected"))
        );
        let (status, _) = api(
            &hub,
            &operator,
            Method::DELETE,
            "/tenants/default/broker/sessions/nobody",
        )
        .await;
        assert_eq!(status, 404);

        // The session was kept: resuming finds it.
        let mut c = V5::connect(persistent(&hub)).await;
        assert!(c.connack.session_present, "a kick keeps the session");

        // Discard: disconnected, and the session is gone.
        let (status, body) = api(
            &hub,
            &operator,
            Method::DELETE,
            &format!("{path}?discard=true"),
        )
        .await;
        assert_eq!(status, 204, "{body}");
        c.wait_closed(WAIT).await;
        let (status, _) = api(&hub, TEST_ADMIN_TOKEN, Method::GET, path).await;
        assert_eq!(status, 404, "a discarded session is gone");
        let c = V5::connect(persistent(&hub)).await;
        assert!(!c.connack.session_present, "discard dropped the session");
        let (status, _) = api(
            &hub,
            &operator,
            Method::DELETE,
            "/tenants/default/broker/sessions/nobody?discard=true",
        )
        .await;
        assert_eq!(status, 404);

        // Both actions are audited.
        let audit = admin(&hub, Method::GET, "/audit?tenant=default").await;
        let text = audit.to_string();
        assert!(text.contains("broker.session.kick"), "{text}");
        assert!(text.contains("broker.session.discard"), "{text}");
        c.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_listed_read_and_deleted_for_good() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        let viewer = scoped_token(&hub, "default", "viewer").await;
        let mut p = V5::connect(v5_opts(&hub, &uid("ret"))).await;
        let long = "x".repeat(300);
        p.publish("r/text", m5::QoS::AtLeastOnce, true, b"hello")
            .await;
        p.publish("r/bin", m5::QoS::AtLeastOnce, true, &[0xff, 0x00, 0x01])
            .await;
        p.publish("r/long", m5::QoS::AtLeastOnce, true, long.as_bytes())
            .await;
        p.publish_props(
            "r/deep/json",
            m5::QoS::AtLeastOnce,
            true,
            br#"{"on":true}"#,
            Some(m5::PublishProperties {
                payload_format_indicator: Some(1),
                content_type: Some("application/json".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            }),
        )
        .await;
        p.publish("other/x", m5::QoS::AtMostOnce, true, b"o").await;
        p.barrier().await;

        let page = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/retained?filter=r%2F%23",
        )
        .await;
        let topics: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["topic"].as_str().unwrap())
            .collect();
        assert_eq!(
            topics,
            ["r/bin", "r/deep/json", "r/long", "r/text"],
            "{page}"
        );
        let by = |t: &str| {
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["topic"] == t)
                .unwrap()
                .clone()
        };
        let text = by("r/text");
        assert_eq!(
            (
                &text["payload"],
                &text["payload_encoding"],
                &text["payload_size"],
                &text["qos"]
            ),
            (&json!("hello"), &json!("utf8"), &json!(5), &json!(1))
        );
        assert!(text["stored_at"].as_u64().unwrap() > 0);
        let bin = by("r/bin");
        assert_eq!(
            (&bin["payload"], &bin["payload_encoding"]),
            (&json!("/wAB"), &json!("base64"))
        );
        let l = by("r/long");
        assert_eq!(l["truncated"], true);
        assert_eq!(l["payload"].as_str().unwrap().len(), 256);
        assert_eq!(l["payload_size"], 300);
        let j = by("r/deep/json");
        assert_eq!(j["content_type"], "application/json");
        assert_eq!(j["payload_format_utf8"], true);
        assert_eq!(j["user_properties"], json!([["k", "v"]]));

        // Paging by topic.
        let first = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/retained?filter=r%2F%23&limit=3",
        )
        .await;
        assert_eq!(first["items"].as_array().unwrap().len(), 3);
        assert_eq!(first["next"], "r/long");
        let rest = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/retained?filter=r%2F%23&limit=3&after=r%2Flong",
        )
        .await;
        assert_eq!(rest["items"][0]["topic"], "r/text");
        assert!(rest.get("next").is_none());
        // `$SYS` is retained too (the default tenant), found with a filter naming it.
        let sys = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/retained?filter=%24SYS%2Fbroker%2Fversion",
        )
        .await;
        assert!(
            sys["items"][0]["payload"]
                .as_str()
                .unwrap()
                .starts_with("ferrohub "),
            "{sys}"
        );
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            "/tenants/default/broker/retained?filter=a%23",
        )
        .await;
        assert_eq!(status, 400, "an invalid filter");

        // One message, whole.
        let full = admin(
            &hub,
            Method::GET,
            &format!("/tenants/default/broker/retained/{}", seg("r/long")),
        )
        .await;
        assert_eq!(full["payload"].as_str().unwrap(), long);
        assert_eq!(full["truncated"], false);
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            &format!("/tenants/default/broker/retained/{}", seg("r/none")),
        )
        .await;
        assert_eq!(status, 404);
        let (status, _) = api(
            &hub,
            TEST_ADMIN_TOKEN,
            Method::GET,
            &format!("/tenants/default/broker/retained/{}", seg("r/+")),
        )
        .await;
        assert_eq!(status, 400, "a wildcard is not a topic");

        // Delete: operators only; subscribers no longer get it.
        let del = format!("/tenants/default/broker/retained/{}", seg("r/text"));
        let (status, _) = api(&hub, &viewer, Method::DELETE, &del).await;
        assert_eq!(status, 403);
        let (status, body) = api(&hub, TEST_ADMIN_TOKEN, Method::DELETE, &del).await;
        assert_eq!(status, 204, "{body}");
        let (status, _) = api(&hub, TEST_ADMIN_TOKEN, Method::DELETE, &del).await;
        assert_eq!(status, 404);
        let mut s = V5::connect(v5_opts(&hub, &uid("rsub"))).await;
        s.subscribe("r/text", m5::QoS::AtLeastOnce).await;
        s.expect_no_publish(QUIET).await;
        s.disconnect().await;
        p.disconnect().await;

        // Gone after a restart; the others are still there.
        let path = hub.data_dir.clone();
        let _dir = tokio::time::timeout(Duration::from_secs(10), hub.stop())
            .await
            .expect("stop");
        let hub = TestHub::start_config(test_config(path))
            .await
            .expect("restart");
        let (status, _) = api(&hub, TEST_ADMIN_TOKEN, Method::GET, &del).await;
        assert_eq!(status, 404, "the deletion was durable");
        let kept = admin(
            &hub,
            Method::GET,
            &format!("/tenants/default/broker/retained/{}", seg("r/bin")),
        )
        .await;
        assert_eq!(kept["payload"], "/wAB");
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_broker_and_sys_is_platform_only() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin_post(&hub, "/tenants", json!({"id": "acme"})).await;
        admin_post(&hub, "/tenants/acme/devices", json!({"id": "d1"})).await;
        admin_post(
            &hub,
            "/tenants/acme/devices/d1/credentials",
            json!({"kind": "password", "secret": "secret-d1-0123456789"}),
        )
        .await;
        let mut o = v5_opts(&hub, "d1");
        o.set_credentials("acme/d1", "secret-d1-0123456789");
        let mut dev = V5::connect(o).await;
        // The default policy: a device's own `devices/{id}/#`.
        dev.subscribe("devices/d1/cmd", m5::QoS::AtLeastOnce).await;
        dev.publish("devices/d1/state", m5::QoS::AtLeastOnce, true, b"on")
            .await;
        let _other = V4::connect(v4_opts(&hub, "d1-default")).await;

        let acme = scoped_token(&hub, "acme", "admin").await;
        let page = {
            let (status, body) =
                api(&hub, &acme, Method::GET, "/tenants/acme/broker/sessions").await;
            assert_eq!(status, 200, "{body}");
            body
        };
        assert_eq!(ids(&page), ["d1"]);
        assert_eq!(page["items"][0]["device_id"], "d1");
        for path in [
            "/tenants/default/broker/sessions",
            "/tenants/default/broker/sessions/d1-default",
            "/tenants/default/broker/subscriptions",
            "/tenants/default/broker/retained",
            "/tenants/default/broker/stats",
        ] {
            let (status, body) = api(&hub, &acme, Method::GET, path).await;
            assert_eq!(status, 404, "{path}: {body}");
        }
        let (status, _) = api(
            &hub,
            &acme,
            Method::DELETE,
            "/tenants/default/broker/sessions/d1-default",
        )
        .await;
        assert_eq!(status, 404);
        // The default tenant does not see acme's session, subscription or retained message.
        let d = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/sessions?prefix=d1",
        )
        .await;
        assert_eq!(ids(&d), ["d1-default"]);
        let s = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/subscriptions?filter_prefix=devices",
        )
        .await;
        assert_eq!(s["items"], json!([]));
        let r = admin(
            &hub,
            Method::GET,
            "/tenants/default/broker/retained?filter=devices%2F%23",
        )
        .await;
        assert_eq!(r["items"], json!([]));
        let r = admin(&hub, Method::GET, "/tenants/acme/broker/retained").await;
        assert_eq!(r["items"][0]["topic"], "devices/d1/state");

        // $SYS: every tenant's figures, so platform tokens only.
        let (status, body) = api(&hub, &acme, Method::GET, "/broker/sys").await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
        let sys = admin(&hub, Method::GET, "/broker/sys").await;
        assert!(sys["version"].as_str().unwrap().starts_with("ferrohub "));
        assert!(sys["clients_connected"].as_u64().unwrap() >= 2, "{sys}");
        assert!(sys["messages_received"].as_u64().unwrap() >= 1, "{sys}");
        assert!(sys["retained_count"].as_u64().unwrap() >= 1, "{sys}");
        assert!(sys["subscription_count"].as_u64().unwrap() >= 1, "{sys}");
        for key in [
            "uptime_secs",
            "bytes_received",
            "bytes_sent",
            "messages_dropped",
        ] {
            assert!(sys[key].is_u64(), "{key}: {sys}");
        }
        let (status, _) = api(&hub, "fh_not_a_token", Method::GET, "/broker/sys").await;
        assert_eq!(status, 401);
        dev.disconnect().await;
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_figures_count_messages_and_name_the_top_talkers() {
    bounded(async {
        let hub = TestHub::start().await.unwrap();
        admin_post(&hub, "/tenants", json!({"id": "busy"})).await;
        for d in ["loud", "quiet"] {
            admin_post(&hub, "/tenants/busy/devices", json!({"id": d})).await;
            admin_post(
                &hub,
                &format!("/tenants/busy/devices/{d}/credentials"),
                json!({"kind": "password", "secret": format!("secret-{d}-0123456789")}),
            )
            .await;
        }
        let viewer = scoped_token(&hub, "busy", "viewer").await;

        let mut o = v4_opts(&hub, "loud");
        o.set_credentials("busy/loud", "secret-loud-0123456789");
        let mut loud = V4::connect(o).await;
        let mut o = v5_opts(&hub, "quiet");
        o.set_credentials("busy/quiet", "secret-quiet-0123456789");
        let mut quiet = V5::connect(o).await;
        quiet
            .subscribe("devices/quiet/#", m5::QoS::AtMostOnce)
            .await;
        for _ in 0..20 {
            loud.publish("devices/loud/t", rumqttc::QoS::AtLeastOnce, false, b"1")
                .await;
        }
        quiet
            .publish("devices/quiet/q", m5::QoS::AtLeastOnce, false, b"2")
            .await;
        // Its own message comes back to it: the one message out.
        quiet.recv_publish().await;

        // The tenant's first figures cover the time since its first session: every message.
        let (status, stats) = api(&hub, &viewer, Method::GET, "/tenants/busy/broker/stats").await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(stats["messages_in"], 21, "{stats}");
        assert_eq!(stats["messages_out"], 1, "{stats}");
        assert_eq!(stats["connected"], 2);
        assert_eq!(stats["sessions"], 2);
        assert_eq!(stats["subscriptions"], 1);
        assert_eq!(
            stats["connections"],
            json!([{"protocol": "3.1.1", "transport": "tcp", "count": 1},
                   {"protocol": "5.0", "transport": "tcp", "count": 1}])
        );
        let top = &stats["top_talkers"];
        assert_eq!(top[0]["client_id"], "loud");
        assert_eq!(top[0]["device_id"], "loud");
        assert_eq!(top[0]["messages_in"], 20);
        assert!(top[0]["messages_in_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(top[1]["client_id"], "quiet");
        assert!(stats["messages_in_per_sec"].as_f64().unwrap() > 0.0);

        // The overview carries the tenant's figures for a tenant token, never the hub's.
        let o = {
            let (status, body) = api(&hub, &viewer, Method::GET, "/tenants/busy/overview").await;
            assert_eq!(status, 200, "{body}");
            body
        };
        assert!(o.get("hub").is_none(), "{o}");
        assert_eq!(o["broker"]["messages_in"], 21, "{o}");
        assert_eq!(o["broker"]["connected"], 2);
        assert_eq!(o["devices"]["online"], 2);
        // The default tenant's figures do not count busy's messages.
        let d = admin(&hub, Method::GET, "/tenants/default/broker/stats").await;
        assert_eq!(d["messages_in"], 0, "{d}");

        // And the stream has them too.
        let res = reqwest::Client::new()
            .get(format!("{}/tenants/busy/overview/stream", hub.api_url()))
            .bearer_auth(&viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let mut res = res;
        let mut text = String::new();
        while !text.contains("\n\n") {
            let chunk: Bytes = tokio::time::timeout(WAIT, res.chunk())
                .await
                .expect("an event")
                .unwrap()
                .expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .expect("a data line");
        let event: Value = serde_json::from_str(data.trim()).unwrap();
        assert_eq!(event["broker"]["messages_in"], 21, "{event}");
        drop(res);
        loud.disconnect().await;
        quiet.disconnect().await;
        hub.stop().await;
    })
    .await;
}
