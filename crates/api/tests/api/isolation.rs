//! Tenant isolation: a token scoped to tenant X cannot see or touch tenant Y through any
//! tenant-scoped route, and gets 404 (exactly as for a missing tenant), never 403.

use std::collections::BTreeMap;

use crate::auth::{document_routes, fill};
use crate::common::*;

fn policy() -> Value {
    json!({"version": 1, "statements": [
        {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
        {"effect": "allow", "actions": ["publish", "subscribe", "receive"], "resources": ["devices/${device.id}/#"]}
    ]})
}

/// Gives `tenant` one of everything; returns the path parameters naming them.
async fn populate(admin: &Api, tenant: &str) -> BTreeMap<&'static str, String> {
    let t = format!("/tenants/{tenant}");
    admin
        .put(&format!("{t}/device-types/ty"), json!({}))
        .await
        .expect(200);
    admin
        .put(&format!("{t}/policies/pol"), policy())
        .await
        .expect(200);
    admin
        .put(&format!("{t}/groups/grp"), json!({}))
        .await
        .expect(200);
    admin
        .put(&format!("{t}/provisioning-templates/tpl"), json!({}))
        .await
        .expect(200);
    admin
        .device(
            tenant,
            json!({"id": "dev", "type": "ty", "groups": ["grp"]}),
        )
        .await;
    let cred = admin
        .post(
            &format!("{t}/devices/dev/credentials"),
            json!({"kind": "password"}),
        )
        .await
        .expect(201);
    let ca = admin
        .get(&format!("{t}/cas/builtin/certificate"))
        .await
        .expect(200);
    admin
        .put(
            &format!("{t}/cas/extca"),
            json!({"certificate_pem": ca.as_str().unwrap()}),
        )
        .await
        .expect(200);
    BTreeMap::from([
        ("tenant", tenant.to_string()),
        ("device", "dev".to_string()),
        ("group", "grp".to_string()),
        (
            "cred",
            cred["credential"]["id"].as_str().unwrap().to_string(),
        ),
    ])
}

/// A request that would succeed on the target's own resources (so that only scoping stops it).
fn request(
    method: &str,
    template: &str,
    p: &BTreeMap<&str, String>,
    ca_pem: &str,
) -> (String, Option<Value>) {
    let mut values = p.clone();
    let name = if template.contains("/device-types/") {
        "ty"
    } else if template.contains("/policies/") {
        "pol"
    } else if template.contains("/provisioning-templates/") {
        "tpl"
    } else {
        "key1"
    };
    values.insert("name", name.to_string());
    let id = if template.contains("/cas/") {
        "extca".to_string()
    } else {
        p["cred"].clone()
    };
    values.insert("id", id);
    values.insert("metric", "temp".to_string());
    values.insert("rule", "r1".to_string());
    values.insert("alarm", "01JALARM0000000000000000AA".to_string());
    values.insert("channel", "ops".to_string());
    values.insert("client_id", "dev".to_string());
    values.insert("topic", "devices%2Fdev%2Fstate".to_string());
    values.entry("id").or_insert_with(|| "1".to_string());
    values.remove("cred");
    let path = fill(template.trim_start_matches("/api/v1"), &values);
    let body = match (method, template.rsplit('/').next().unwrap()) {
        ("GET" | "DELETE", _) => None,
        ("PUT", "{device}") => None, // group membership
        ("POST", "devices") => Some(json!({"id": "intruder"})),
        ("POST", "import") => Some(json!([{"id": "intruder"}])),
        ("POST", "credentials") => Some(json!({"kind": "password"})),
        ("POST", "token") => Some(json!({"ttl_secs": 600})),
        ("POST", "revoked-certificates") => {
            Some(json!({"fingerprint": "ab".repeat(32), "reason": "test"}))
        }
        ("PATCH", _) => Some(json!({"name": "pwned"})),
        ("POST", "{name}") if template.contains("/commands/") => Some(json!({"cmd": "pwn"})),
        ("POST", "telemetry") => Some(json!({"temp": 99})),
        ("POST", "apply") => None,
        ("POST", "exports") => Some(json!({"destination": "x", "from": 0, "to": 1})),
        ("PUT", "settings") => Some(json!({"keep_forever": true})),
        ("POST", "rules") => Some(json!({"id": "intruder", "sql": "SELECT * FROM 'a'"})),
        ("POST", "enable" | "disable") => None,
        ("POST", "dry-run") => Some(json!({"topic": "a", "payload": {}})),
        ("POST", "replay") => Some(json!({"from": 0, "to": 1})),
        ("POST", "rules:dry-run") => {
            Some(json!({"sql": "SELECT * FROM 'a'", "sample": {"topic": "a"}}))
        }
        ("PUT", "{rule}") => Some(json!({"sql": "SELECT * FROM 'a'"})),
        ("POST", "alarms") => Some(json!({"key": "intruder", "severity": "critical"})),
        ("POST", "acknowledge" | "clear" | "test") => None,
        ("PUT", "{channel}") => Some(json!({"kind": {"webhook": {"url": "http://127.0.0.1:9/"}}})),
        ("PUT", _) if template.contains("/policies/") => Some(policy()),
        ("PUT", _) if template.contains("/cas/") => Some(json!({"certificate_pem": ca_pem})),
        ("PUT", _) if template.contains("/token-keys/") => Some(json!({"pem": "not checked"})),
        ("PUT", _) => Some(json!({})),
        other => panic!("no request body for {other:?} {template}"),
    };
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scoped_tokens_cannot_reach_other_tenants() {
    bounded(120, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("tx").await;
        admin.tenant("ty").await;
        let px = populate(&admin, "tx").await;
        let py = populate(&admin, "ty").await;
        let ca_x = admin
            .get("/tenants/tx/cas/builtin/certificate")
            .await
            .expect(200);
        let ca_x = ca_x.as_str().unwrap().to_string();
        let before_devices = admin.get("/tenants/ty/devices").await.expect(200);
        let before_creds = admin
            .get("/tenants/ty/devices/dev/credentials")
            .await
            .expect(200);

        let operator_x = admin.with_token(Some(&admin.token("operator", Some("tx")).await));
        let admin_x = admin.with_token(Some(&admin.token("admin", Some("tx")).await));
        let viewer_x = admin.with_token(Some(&admin.token("viewer", Some("tx")).await));

        // Listing tenants shows only one's own.
        let list = operator_x.get("/tenants").await.expect(200);
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["id"], "tx");

        // Every tenant-scoped route, taken from the OpenAPI document, with every X token, on Y.
        let doc = admin
            .with_token(None)
            .get("/openapi.json")
            .await
            .expect(200);
        let routes: Vec<(String, String)> = document_routes(&doc)
            .into_iter()
            .filter(|(_, p)| p.contains("{tenant}"))
            .collect();
        assert!(routes.len() >= 35, "{} tenant routes", routes.len());
        let missing_tenant = admin
            .get("/tenants/does-not-exist")
            .await
            .expect_error(404, "not_found");
        for token in [&operator_x, &admin_x, &viewer_x] {
            for (method, template) in &routes {
                let (path, body) = request(method, template, &py, &ca_x);
                let reply = token
                    .call(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        &path,
                        body.as_ref(),
                    )
                    .await;
                assert_eq!(reply.status, 404, "{method} {path}: {reply:?}");
                let msg = reply.expect_error(404, "not_found");
                assert_eq!(msg, "tenant ty not found", "{method} {path}");
            }
        }
        assert_eq!(missing_tenant, "tenant does-not-exist not found");

        // Nothing of Y changed.
        assert_eq!(
            admin.get("/tenants/ty/devices").await.expect(200),
            before_devices
        );
        assert_eq!(
            admin
                .get("/tenants/ty/devices/dev/credentials")
                .await
                .expect(200),
            before_creds
        );
        assert_eq!(admin.get("/tenants/ty").await.expect(200)["name"], "ty");
        admin
            .get("/tenants/ty/devices/intruder")
            .await
            .expect_error(404, "not_found");

        // Tokens, audit: Y is out of reach too.
        admin_x
            .post(
                "/tokens",
                json!({"name": "y", "role": "viewer", "tenant": "ty"}),
            )
            .await
            .expect_error(404, "not_found");
        operator_x
            .get("/audit?tenant=ty")
            .await
            .expect_error(404, "not_found");

        // The same X tokens work on X (the refusals above are scoping, not broken routes).
        let (path, _) = request("GET", "/tenants/{tenant}/devices/{device}", &px, &ca_x);
        operator_x.get(&path).await.expect(200);
        operator_x.device("tx", json!({"id": "mine"})).await;
        operator_x
            .patch("/tenants/tx/devices/mine", json!({"name": "Mine"}))
            .await
            .expect(200);
        admin_x
            .put("/tenants/tx/policies/pol2", policy())
            .await
            .expect(200);
        viewer_x.get("/tenants/tx/devices").await.expect(200);

        // A viewer cannot create or change anything.
        viewer_x
            .post("/tenants/tx/devices", json!({"id": "v1"}))
            .await
            .expect_error(403, "forbidden");
        viewer_x
            .put("/tenants/tx/groups/vg", json!({}))
            .await
            .expect_error(403, "forbidden");
        viewer_x
            .post(
                "/tenants/tx/devices/dev/credentials",
                json!({"kind": "password"}),
            )
            .await
            .expect_error(403, "forbidden");
        viewer_x
            .post(
                "/tokens",
                json!({"name": "v", "role": "viewer", "tenant": "tx"}),
            )
            .await
            .expect_error(403, "forbidden");
        viewer_x
            .post("/tenants", json!({"id": "vt"}))
            .await
            .expect_error(403, "forbidden");
        viewer_x
            .delete("/tenants/tx/devices/dev")
            .await
            .expect_error(403, "forbidden");
        // An operator cannot manage policies or CAs, nor create tenants.
        operator_x
            .put("/tenants/tx/policies/p3", policy())
            .await
            .expect_error(403, "forbidden");
        operator_x
            .post("/tenants", json!({"id": "ot"}))
            .await
            .expect_error(403, "forbidden");
        admin_x
            .post("/tenants", json!({"id": "at"}))
            .await
            .expect_error(403, "forbidden");
        hub.stop().await;
    })
    .await;
}
