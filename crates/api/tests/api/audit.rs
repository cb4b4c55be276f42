//! The audit log through the API: actions appear, filters work, tenant tokens see their tenant.

use std::collections::BTreeSet;

use crate::common::*;

fn actions(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["target"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_api_actions_by_tenant() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("aa").await;
        admin.tenant("bb").await;
        let op_a = admin.with_token(Some(&admin.token("operator", Some("aa")).await));
        let viewer_a = admin.with_token(Some(&admin.token("viewer", Some("aa")).await));

        op_a.device("aa", json!({"id": "a1"})).await;
        op_a.patch("/tenants/aa/devices/a1", json!({"status": "disabled"}))
            .await
            .expect(200);
        op_a.post(
            "/tenants/aa/devices/a1/credentials",
            json!({"kind": "password"}),
        )
        .await
        .expect(201);
        op_a.put("/tenants/aa/groups/g", json!({}))
            .await
            .expect(200);
        admin.device("bb", json!({"id": "b1"})).await;
        admin.delete("/tenants/bb/devices/b1").await.expect(200);

        // Platform admin: filter by tenant and action prefix.
        let page = admin
            .get("/audit?tenant=aa&action=device.")
            .await
            .expect(200);
        assert_eq!(
            actions(&page),
            vec![
                ("device.disable".into(), "a1".into()),
                ("device.create".into(), "a1".into())
            ]
        );
        let created = &page["items"][1];
        assert_eq!(created["tenant"], "aa");
        assert!(
            created["actor"].as_str().unwrap().starts_with("token:tok_"),
            "{created}"
        );
        assert!(
            created["source"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{created}"
        );
        assert_eq!(created["result"], "success");
        let page = admin
            .get("/audit?tenant=bb&action=device.")
            .await
            .expect(200);
        assert_eq!(
            actions(&page),
            vec![
                ("device.decommission".into(), "b1".into()),
                ("device.create".into(), "b1".into())
            ]
        );
        let page = admin.get("/audit?action=tenant.create").await.expect(200);
        let targets: BTreeSet<String> = actions(&page).into_iter().map(|(_, t)| t).collect();
        assert!(targets.contains("aa") && targets.contains("bb"));
        let page = admin
            .get("/audit?tenant=aa&action=credential.create")
            .await
            .expect(200);
        assert_eq!(page["items"][0]["detail"]["kind"], "password");
        let actor = created["actor"].as_str().unwrap();
        let page = admin
            .get(&format!("/audit?actor={actor}&result=success"))
            .await
            .expect(200);
        assert_eq!(page["items"].as_array().unwrap().len(), 4);

        // A tenant token sees only its tenant, whatever it asks.
        for token in [&op_a, &viewer_a] {
            let page = token.get("/audit?limit=1000").await.expect(200);
            let items = page["items"].as_array().unwrap();
            assert!(items.len() >= 5);
            assert!(items.iter().all(|e| e["tenant"] == "aa"), "{page}");
            token
                .get("/audit?tenant=bb")
                .await
                .expect_error(404, "not_found");
            token
                .get("/audit?tenant=aa&action=group.put")
                .await
                .expect(200);
        }

        // Paging newest first with next_before_seq.
        let mut seen = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let q = match before {
                Some(b) => format!("/audit?tenant=aa&limit=2&before_seq={b}"),
                None => "/audit?tenant=aa&limit=2".to_string(),
            };
            let page = admin.get(&q).await.expect(200);
            for e in page["items"].as_array().unwrap() {
                seen.push(e["seq"].as_i64().unwrap());
            }
            match page["next_before_seq"].as_i64() {
                Some(b) => before = Some(b),
                None => break,
            }
        }
        let all = admin.get("/audit?tenant=aa&limit=1000").await.expect(200);
        let all: Vec<i64> = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(seen, all);
        assert!(seen.windows(2).all(|w| w[0] > w[1]));
        hub.stop().await;
    })
    .await;
}
