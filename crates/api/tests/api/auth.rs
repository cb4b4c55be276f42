//! Authentication, error format, and the OpenAPI document against the router.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::common::*;

/// Every route of the API, as specified (method, path under /api/v1).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/openapi.json"),
    ("GET", "/tenants"),
    ("POST", "/tenants"),
    ("GET", "/tenants/{tenant}"),
    ("PATCH", "/tenants/{tenant}"),
    ("DELETE", "/tenants/{tenant}"),
    ("GET", "/tenants/{tenant}/devices"),
    ("POST", "/tenants/{tenant}/devices"),
    ("GET", "/tenants/{tenant}/devices/{device}"),
    ("PATCH", "/tenants/{tenant}/devices/{device}"),
    ("DELETE", "/tenants/{tenant}/devices/{device}"),
    ("GET", "/tenants/{tenant}/devices/{device}/connectivity"),
    ("GET", "/tenants/{tenant}/devices/{device}/messages/stream"),
    ("POST", "/tenants/{tenant}/devices/import"),
    ("GET", "/tenants/{tenant}/devices/{device}/credentials"),
    ("POST", "/tenants/{tenant}/devices/{device}/credentials"),
    (
        "DELETE",
        "/tenants/{tenant}/devices/{device}/credentials/{id}",
    ),
    ("POST", "/tenants/{tenant}/devices/{device}/token"),
    ("GET", "/tenants/{tenant}/groups"),
    ("GET", "/tenants/{tenant}/groups/{group}"),
    ("PUT", "/tenants/{tenant}/groups/{group}"),
    ("DELETE", "/tenants/{tenant}/groups/{group}"),
    ("PUT", "/tenants/{tenant}/groups/{group}/members/{device}"),
    (
        "DELETE",
        "/tenants/{tenant}/groups/{group}/members/{device}",
    ),
    ("GET", "/tenants/{tenant}/device-types"),
    ("GET", "/tenants/{tenant}/device-types/{name}"),
    ("PUT", "/tenants/{tenant}/device-types/{name}"),
    ("DELETE", "/tenants/{tenant}/device-types/{name}"),
    ("GET", "/tenants/{tenant}/policies"),
    ("GET", "/tenants/{tenant}/policies/{name}"),
    ("PUT", "/tenants/{tenant}/policies/{name}"),
    ("DELETE", "/tenants/{tenant}/policies/{name}"),
    ("GET", "/tenants/{tenant}/cas"),
    ("GET", "/tenants/{tenant}/cas/builtin/certificate"),
    ("PUT", "/tenants/{tenant}/cas/{id}"),
    ("DELETE", "/tenants/{tenant}/cas/{id}"),
    ("GET", "/tenants/{tenant}/provisioning-templates"),
    ("GET", "/tenants/{tenant}/provisioning-templates/{name}"),
    ("PUT", "/tenants/{tenant}/provisioning-templates/{name}"),
    ("POST", "/tenants/{tenant}/revoked-certificates"),
    ("PUT", "/tenants/{tenant}/token-keys/{name}"),
    ("GET", "/tokens"),
    ("POST", "/tokens"),
    ("DELETE", "/tokens/{id}"),
    ("GET", "/me"),
    ("GET", "/audit"),
    ("GET", "/tenants/{tenant}/overview"),
    ("GET", "/tenants/{tenant}/overview/stream"),
    ("GET", "/tenants/{tenant}/devices/{device}/twins"),
    ("GET", "/tenants/{tenant}/devices/{device}/twins/{name}"),
    (
        "PATCH",
        "/tenants/{tenant}/devices/{device}/twins/{name}/desired",
    ),
    (
        "PATCH",
        "/tenants/{tenant}/devices/{device}/twins/{name}/tags",
    ),
    (
        "GET",
        "/tenants/{tenant}/devices/{device}/twins/{name}/history",
    ),
    ("GET", "/tenants/{tenant}/twins"),
    ("GET", "/tenants/{tenant}/twins/counts"),
    ("GET", "/tenants/{tenant}/twins/watch"),
    ("POST", "/tenants/{tenant}/devices/{device}/commands/{name}"),
    ("GET", "/tenants/{tenant}/devices/{device}/queued-commands"),
    (
        "GET",
        "/tenants/{tenant}/devices/{device}/queued-commands/{id}",
    ),
    (
        "DELETE",
        "/tenants/{tenant}/devices/{device}/queued-commands/{id}",
    ),
    ("POST", "/tenants/{tenant}/devices/{device}/telemetry"),
    ("GET", "/tenants/{tenant}/devices/{device}/telemetry"),
    (
        "GET",
        "/tenants/{tenant}/devices/{device}/telemetry/{metric}",
    ),
    (
        "GET",
        "/tenants/{tenant}/devices/{device}/telemetry/{metric}/aggregate",
    ),
    ("GET", "/tenants/{tenant}/telemetry/latest"),
    ("GET", "/tenants/{tenant}/telemetry/aggregate"),
    ("GET", "/tenants/{tenant}/telemetry/settings"),
    ("PUT", "/tenants/{tenant}/telemetry/settings"),
    ("POST", "/tenants/{tenant}/telemetry/retention/apply"),
    ("POST", "/tenants/{tenant}/telemetry/exports"),
    ("GET", "/tenants/{tenant}/telemetry/exports"),
    ("GET", "/tenants/{tenant}/telemetry/exports/{id}"),
    ("GET", "/tenants/{tenant}/rules"),
    ("POST", "/tenants/{tenant}/rules"),
    ("GET", "/tenants/{tenant}/rules/{rule}"),
    ("PUT", "/tenants/{tenant}/rules/{rule}"),
    ("DELETE", "/tenants/{tenant}/rules/{rule}"),
    ("POST", "/tenants/{tenant}/rules/{rule}/enable"),
    ("POST", "/tenants/{tenant}/rules/{rule}/disable"),
    ("POST", "/tenants/{tenant}/rules/{rule}/dry-run"),
    ("POST", "/tenants/{tenant}/rules:dry-run"),
    ("GET", "/tenants/{tenant}/rules/{rule}/stats"),
    ("GET", "/tenants/{tenant}/rules/{rule}/dead-letters"),
    ("POST", "/tenants/{tenant}/rules/{rule}/replay"),
    ("GET", "/tenants/{tenant}/alarms"),
    ("POST", "/tenants/{tenant}/alarms"),
    ("GET", "/tenants/{tenant}/alarms/counts"),
    ("GET", "/tenants/{tenant}/alarms/stream"),
    ("GET", "/tenants/{tenant}/alarms/{alarm}"),
    ("POST", "/tenants/{tenant}/alarms/{alarm}/acknowledge"),
    ("POST", "/tenants/{tenant}/alarms/{alarm}/clear"),
    ("GET", "/tenants/{tenant}/alarms/{alarm}/history"),
    ("GET", "/tenants/{tenant}/alarm-channels"),
    ("GET", "/tenants/{tenant}/alarm-channels/{channel}"),
    ("PUT", "/tenants/{tenant}/alarm-channels/{channel}"),
    ("DELETE", "/tenants/{tenant}/alarm-channels/{channel}"),
    ("POST", "/tenants/{tenant}/alarm-channels/{channel}/test"),
    (
        "GET",
        "/tenants/{tenant}/alarm-channels/{channel}/deliveries",
    ),
    ("GET", "/tenants/{tenant}/broker/sessions"),
    ("GET", "/tenants/{tenant}/broker/sessions/{client_id}"),
    ("DELETE", "/tenants/{tenant}/broker/sessions/{client_id}"),
    ("GET", "/tenants/{tenant}/broker/subscriptions"),
    ("GET", "/tenants/{tenant}/broker/retained"),
    ("GET", "/tenants/{tenant}/broker/retained/{topic}"),
    ("DELETE", "/tenants/{tenant}/broker/retained/{topic}"),
    ("GET", "/tenants/{tenant}/broker/stats"),
    ("GET", "/broker/sys"),
];

/// Routes outside /api/v1 that the OpenAPI document also describes (full paths).
const ROOT_ROUTES: &[(&str, &str)] = &[("POST", "/api/v2/write")];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// (METHOD, full path) of every operation in an OpenAPI document.
pub fn document_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// Substitutes every `{param}` of a path template.
pub fn fill(template: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    assert!(!out.contains('{'), "unfilled parameter in {out}");
    out
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_every_route_the_router_serves() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let anon = Api::admin(&hub).with_token(None);
        let reply = anon.get("/openapi.json").await;
        assert!(reply.content_type.starts_with("application/json"));
        let doc = reply.expect(200);
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );

        // The document and the specified route list agree exactly.
        let expected: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), format!("/api/v1{p}")))
            .chain(
                ROOT_ROUTES
                    .iter()
                    .map(|(m, p)| (m.to_string(), p.to_string())),
            )
            .collect();
        let documented = document_routes(&doc);
        let missing: Vec<_> = expected.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&expected).collect();
        assert!(
            missing.is_empty(),
            "routes missing from the document: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "documented routes that are not specified: {extra:?}"
        );

        // The router serves every documented operation: without a token each answers 401
        // (openapi.json 200), never the router's 404/405.
        let values: BTreeMap<&str, String> = [
            "tenant",
            "device",
            "id",
            "group",
            "name",
            "metric",
            "rule",
            "alarm",
            "channel",
            "client_id",
            "topic",
        ]
        .into_iter()
        .map(|k| (k, "x".to_string()))
        .collect();
        for (method, path) in &documented {
            if !path.starts_with("/api/v1/") {
                // The InfluxDB write API answers in InfluxDB's error shape.
                let res = reqwest::Client::new()
                    .request(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        format!("http://{}{path}", hub.http),
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 401, "{method} {path}");
                let body: Value = res.json().await.unwrap();
                assert_eq!(body["code"], "unauthorized", "{method} {path}: {body}");
                continue;
            }
            let url = fill(path.trim_start_matches("/api/v1"), &values);
            let reply = anon
                .call(Method::from_bytes(method.as_bytes()).unwrap(), &url, None)
                .await;
            if path == "/api/v1/openapi.json" {
                assert_eq!(reply.status, 200);
            } else {
                reply.expect_error(401, "unauthenticated");
            }
        }

        // Every operation is described: responses, request bodies for writes, and references
        // that resolve; authenticated ones under the bearer scheme.
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"][0]["bearer"], json!([]));
        for (path, item) in doc["paths"].as_object().unwrap() {
            for m in METHODS {
                let Some(op) = item.get(m) else { continue };
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{m} {path} has no success response"
                );
                if path != "/api/v1/openapi.json" {
                    assert!(responses.contains_key("401"), "{m} {path} lacks 401");
                    assert!(responses.contains_key("404"), "{m} {path} lacks 404");
                }
                let bodyless = path.ends_with("/members/{device}")
                    || path.ends_with("/retention/apply")
                    || path.ends_with("/enable")
                    || path.ends_with("/disable")
                    || path.ends_with("/alarm-channels/{channel}/test");
                if matches!(m, "post" | "put" | "patch") && !bodyless {
                    assert!(
                        op.get("requestBody").is_some(),
                        "{m} {path} has no request body"
                    );
                }
            }
        }
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(refs.len() > 20);
        for r in refs {
            let name = r.strip_prefix("#/components/schemas/").expect(&r);
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling reference {r}"
            );
        }
        for schema in [
            "Device",
            "Tenant",
            "ErrorBody",
            "ImportReport",
            "NewCredential",
            "AuditEvent",
            "WriteReport",
            "PointsPage",
            "TelemetrySettings",
        ] {
            assert!(
                doc["components"]["schemas"].get(schema).is_some(),
                "no schema {schema}"
            );
        }
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_refused() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);

        let none = admin.with_token(None).get("/tenants").await;
        assert_eq!(none.status, 401);
        none.expect_error(401, "unauthenticated");
        let res = reqwest::Client::new()
            .get(format!("{}/tenants", hub.api_url()))
            .send()
            .await
            .unwrap();
        assert!(res.headers().get("www-authenticate").is_some());

        admin
            .with_token(Some("fh_not_a_token_at_all_000000"))
            .get("/tenants")
            .await
            .expect_error(401, "unauthenticated");
        let basic = reqwest::Client::new()
            .get(format!("{}/tenants", hub.api_url()))
            .basic_auth("admin", Some(TEST_ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 401);

        // A revoked token stops working at once.
        let created = admin
            .post("/tokens", json!({"name": "temp", "role": "admin"}))
            .await
            .expect(201);
        let temp = admin.with_token(created["secret"].as_str());
        temp.get("/tenants").await.expect(200);
        let id = created["token"]["id"].as_str().unwrap();
        admin.delete(&format!("/tokens/{id}")).await.expect(204);
        temp.get("/tenants")
            .await
            .expect_error(401, "unauthenticated");
        // The list shows no secrets.
        let list = admin.get("/tokens").await.expect(200);
        assert!(
            !list
                .to_string()
                .contains(created["secret"].as_str().unwrap())
        );

        // Health endpoints stay open.
        let health = reqwest::get(format!("http://{}/healthz", hub.http))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let metrics = reqwest::get(format!("http://{}/metrics", hub.http))
            .await
            .unwrap();
        assert_eq!(metrics.status(), 200);
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("bad").await;

        // Bodies: not JSON, wrong shape, unknown field, empty.
        let r = admin
            .raw(Method::POST, "/tenants/bad/devices", Some("application/json"), b"{not json".to_vec())
            .await;
        assert!(r.expect_error(400, "invalid").contains("JSON"));
        admin
            .post("/tenants/bad/devices", json!(["a"]))
            .await
            .expect_error(400, "invalid");
        let m = admin
            .post("/tenants/bad/devices", json!({"id": "d1", "colour": "red"}))
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("colour"), "{m}");
        admin
            .raw(Method::POST, "/tenants", None, Vec::new())
            .await
            .expect_error(400, "invalid");
        admin.device("bad", json!({"id": "d1"})).await;
        admin
            .post("/tenants/bad/devices/d1/credentials", json!({"kind": "telepathy"}))
            .await
            .expect_error(400, "invalid");
        let m = admin
            .post("/tenants/bad/devices/d1/credentials", json!({"kind": "password", "colour": "red"}))
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("colour"), "{m}");

        // Query strings.
        for q in ["limit=abc", "limit=0", "limit=1001", "sort=colour", "order=up", "online=maybe",
                  "status=sleepy", "tag=novalue", "colour=red"] {
            let m = admin
                .get(&format!("/tenants/bad/devices?{q}"))
                .await
                .expect_error(400, "invalid");
            assert!(!m.is_empty());
        }
        admin
            .get("/tenants/bad/devices?cursor=garbage!!")
            .await
            .expect_error(400, "invalid");
        admin.get("/audit?limit=x").await.expect_error(400, "invalid");
        admin.get("/audit?colour=red").await.expect_error(400, "invalid");
        admin.get("/audit?result=maybe").await.expect_error(400, "invalid");

        // Routing.
        admin.get("/no/such/route").await.expect_error(404, "not_found");
        admin
            .call(Method::PATCH, "/tokens", None)
            .await
            .expect_error(405, "method_not_allowed");
        // Registry errors.
        admin.get("/tenants/nope").await.expect_error(404, "not_found");
        admin.get("/tenants/nope/devices").await.expect_error(404, "not_found");
        admin.post("/tenants", json!({"id": "bad"})).await.expect_error(409, "conflict");
        admin.post("/tenants", json!({"id": "no/slash"})).await.expect_error(400, "invalid");
        admin.delete("/tenants/default").await.expect_error(400, "invalid");
        let m = admin
            .put(
                "/tenants/bad/policies/p",
                json!({"version": 1, "statements": [{"effect": "allow", "actions": ["publish"], "resources": ["a/*"]}]}),
            )
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("statements[0].resources[0]"), "{m}");
        let m = admin
            .put("/tenants/bad/policies/p", json!({"version": 2, "statements": []}))
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("version"), "{m}");
        admin
            .put("/tenants/bad/groups/g", json!({"name": "other"}))
            .await
            .expect_error(400, "invalid");
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registry_the_api_answers_503() {
    bounded(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = ferrohub_api::ApiState {
            twins: None,
            commands: None,
            telemetry: None,
            rules: None,
            alarms: None,
            ready: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(|out: &mut String| out.push_str("# nothing\n")),
            registry: None,
            broker: None,
            tails: None,
            broker_view: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(ferrohub_api::serve(
            listener,
            ferrohub_api::router(state),
            async move {
                let _ = rx.await;
            },
        ));
        let api = Api {
            http: reqwest::Client::new(),
            base: format!("http://{addr}/api/v1"),
            token: Some(TEST_ADMIN_TOKEN.into()),
        };
        api.get("/tenants").await.expect_error(503, "unavailable");
        api.get("/openapi.json").await.expect(200);
        let health = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_rendered_on_a_blocking_thread() {
    bounded(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // `Handle::block_on` works on a blocking thread and panics on an async worker: the
        // renderer says where it ran.
        let state = ferrohub_api::ApiState {
            twins: None,
            commands: None,
            telemetry: None,
            rules: None,
            alarms: None,
            ready: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(|out: &mut String| {
                let blocking = std::panic::catch_unwind(|| {
                    tokio::runtime::Handle::current().block_on(async {})
                })
                .is_ok();
                out.push_str(&format!(
                    "# TYPE probe gauge\nprobe {}\n",
                    u8::from(blocking)
                ));
            }),
            registry: None,
            broker: None,
            tails: None,
            broker_view: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(ferrohub_api::serve(
            listener,
            ferrohub_api::router(state),
            async move {
                let _ = rx.await;
            },
        ));
        let res = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(res.text().await.unwrap(), "# TYPE probe gauge\nprobe 1\n");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    })
    .await;
}
