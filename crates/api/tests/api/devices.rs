//! Device CRUD, filtering, sorting, pagination and groups.

use std::collections::BTreeSet;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_crud() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("crud").await;
        admin
            .put(
                "/tenants/crud/device-types/thermo",
                json!({"description": "thermostat", "tags": {"kind": "thermo"}, "attributes": {"fw": "1.0"}}),
            )
            .await
            .expect(200);
        let types = admin.get("/tenants/crud/device-types").await.expect(200);
        assert_eq!(types[0]["name"], "thermo");
        admin.get("/tenants/crud/device-types/thermo").await.expect(200);
        admin.get("/tenants/crud/device-types/nope").await.expect_error(404, "not_found");

        let d = admin
            .device(
                "crud",
                json!({"id": "t1", "name": "Boiler", "type": "thermo", "tags": {"site": "a"}, "attributes": {"room": 3}}),
            )
            .await;
        assert_eq!(d["id"], "t1");
        assert_eq!(d["tenant"], "crud");
        assert_eq!(d["type"], "thermo");
        assert_eq!(d["tags"], json!({"kind": "thermo", "site": "a"}));
        assert_eq!(d["attributes"], json!({"fw": "1.0", "room": 3}));
        assert_eq!(d["status"], "enabled");
        assert_eq!(d["connectivity"]["online"], false);

        admin.get("/tenants/crud/devices/t1").await.expect(200);
        admin
            .post("/tenants/crud/devices", json!({"id": "t1"}))
            .await
            .expect_error(409, "conflict");
        admin
            .post("/tenants/crud/devices", json!({"id": "bad id"}))
            .await
            .expect_error(400, "invalid");
        let m = admin
            .post("/tenants/crud/devices", json!({"id": "t2", "type": "nope"}))
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("nope"), "{m}");

        let p = admin
            .patch(
                "/tenants/crud/devices/t1",
                json!({"name": "Boiler 2", "tags": {"site": null, "floor": "2"}, "status": "disabled"}),
            )
            .await
            .expect(200);
        assert_eq!(p["name"], "Boiler 2");
        assert_eq!(p["tags"], json!({"kind": "thermo", "floor": "2"}));
        assert_eq!(p["status"], "disabled");
        assert_eq!(admin.get("/tenants/crud/devices/t1").await.expect(200), p);
        admin
            .patch("/tenants/crud/devices/t1", json!({"type": "missing"}))
            .await
            .expect_error(400, "invalid");
        admin
            .patch("/tenants/crud/devices/ghost", json!({"name": "x"}))
            .await
            .expect_error(404, "not_found");

        let gone = admin.delete("/tenants/crud/devices/t1").await.expect(200);
        assert_eq!(gone, json!({"id": "t1", "telemetry": "keep"}));
        admin.get("/tenants/crud/devices/t1").await.expect_error(404, "not_found");
        admin.delete("/tenants/crud/devices/t1").await.expect_error(404, "not_found");

        // Tenant settings decide the telemetry answer.
        let t = admin
            .patch(
                "/tenants/crud",
                json!({"name": "CRUD", "settings": {"telemetry_on_decommission": "purge"}}),
            )
            .await
            .expect(200);
        assert_eq!(t["name"], "CRUD");
        admin.device("crud", json!({"id": "t3"})).await;
        let gone = admin.delete("/tenants/crud/devices/t3").await.expect(200);
        assert_eq!(gone["telemetry"], "purge");

        admin.delete("/tenants/crud/device-types/thermo").await.expect(204);
        admin.delete("/tenants/crud/device-types/thermo").await.expect_error(404, "not_found");
        admin.delete("/tenants/crud").await.expect(204);
        admin.get("/tenants/crud").await.expect_error(404, "not_found");
        hub.stop().await;
    })
    .await;
}

/// 60 devices: id `d-NN`, name reversed (`n-(59-NN)`), site a/b/c by NN%3, type by NN%2, every
/// fifth disabled.
async fn fleet(admin: &Api, tenant: &str) {
    admin.tenant(tenant).await;
    for t in ["even", "odd"] {
        admin
            .put(&format!("/tenants/{tenant}/device-types/{t}"), json!({}))
            .await
            .expect(200);
    }
    for i in 0..60 {
        let site = ["a", "b", "c"][i % 3];
        admin
            .device(
                tenant,
                json!({
                    "id": format!("d-{i:02}"),
                    "name": format!("n-{:02}", 59 - i),
                    "type": if i % 2 == 0 { "even" } else { "odd" },
                    "tags": {"site": site, "floor": (i % 4).to_string()},
                    "status": if i % 5 == 0 { "disabled" } else { "enabled" },
                }),
            )
            .await;
    }
}

fn expected(pred: impl Fn(usize) -> bool) -> BTreeSet<String> {
    (0..60)
        .filter(|i| pred(*i))
        .map(|i| format!("d-{i:02}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtering_sorting_and_pagination() {
    bounded(90, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        fleet(&admin, "fleet").await;

        let set = |v: Vec<Value>| -> BTreeSet<String> { ids(&v).into_iter().collect() };
        let all = admin.all_devices("fleet", "", 1000).await;
        assert_eq!(all.len(), 60);
        assert_eq!(set(all), expected(|_| true));

        // Filters, alone and together (AND).
        type Pred = Box<dyn Fn(usize) -> bool>;
        let cases: Vec<(&str, Pred)> = vec![
            ("tag=site:a", Box::new(|i| i % 3 == 0)),
            (
                "tag=site:a&tag=floor:0",
                Box::new(|i| i % 3 == 0 && i % 4 == 0),
            ),
            ("type=odd", Box::new(|i| i % 2 == 1)),
            ("status=disabled", Box::new(|i| i % 5 == 0)),
            (
                "status=enabled&type=even&tag=site:b",
                Box::new(|i| i % 5 != 0 && i % 2 == 0 && i % 3 == 1),
            ),
            ("name_prefix=n-5", Box::new(|i| 59 - i >= 50)),
            ("online=false", Box::new(|_| true)),
            ("online=true", Box::new(|_| false)),
            ("tag=site:zzz", Box::new(|_| false)),
        ];
        for (q, pred) in &cases {
            let got = admin.all_devices("fleet", q, 1000).await;
            assert_eq!(set(got.clone()), expected(pred), "{q}");
            // Paged walk of the same filter: same set, no duplicates.
            let paged = admin.all_devices("fleet", q, 4).await;
            assert_eq!(ids(&paged), ids(&got), "{q} paged");
        }

        // Sorting.
        let by_name = admin.all_devices("fleet", "sort=name", 1000).await;
        let names: Vec<String> = by_name
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(by_name[0]["id"], "d-59");
        let by_name_desc = admin
            .all_devices("fleet", "sort=name&order=desc", 1000)
            .await;
        assert_eq!(by_name_desc[0]["id"], "d-00");
        let by_id_desc = admin.all_devices("fleet", "order=desc", 1000).await;
        assert_eq!(by_id_desc[0]["id"], "d-59");
        let by_created = admin.all_devices("fleet", "sort=created_at", 1000).await;
        let created: Vec<i64> = by_created
            .iter()
            .map(|d| d["created_at"].as_i64().unwrap())
            .collect();
        assert!(created.windows(2).all(|w| w[0] <= w[1]));

        // Pagination in every order: all pages together are the whole set, in order, once.
        for (q, reference) in [
            (
                "sort=id",
                ids(&admin.all_devices("fleet", "sort=id", 1000).await),
            ),
            ("sort=name", ids(&by_name)),
            ("sort=name&order=desc", ids(&by_name_desc)),
            ("sort=created_at", ids(&by_created)),
            (
                "sort=created_at&order=desc",
                ids(&admin
                    .all_devices("fleet", "sort=created_at&order=desc", 1000)
                    .await),
            ),
            (
                "sort=last_seen",
                ids(&admin.all_devices("fleet", "sort=last_seen", 1000).await),
            ),
        ] {
            for limit in [1, 7, 59, 60] {
                let paged = ids(&admin.all_devices("fleet", q, limit).await);
                assert_eq!(paged.len(), 60, "{q} limit {limit}");
                assert_eq!(paged, reference, "{q} limit {limit}");
            }
        }
        // Default page size is 100, the last page has no cursor.
        let page = admin.get("/tenants/fleet/devices").await.expect(200);
        assert_eq!(page["items"].as_array().unwrap().len(), 60);
        assert!(page["next_cursor"].is_null());
        let page = admin
            .get("/tenants/fleet/devices?limit=10")
            .await
            .expect(200);
        assert_eq!(page["items"].as_array().unwrap().len(), 10);
        assert!(page["next_cursor"].is_string());
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_dynamic_groups() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        fleet(&admin, "grp").await;
        let set = |v: Vec<Value>| -> BTreeSet<String> { ids(&v).into_iter().collect() };

        // Dynamic: membership follows the query.
        admin
            .put(
                "/tenants/grp/groups/site-a-even",
                json!({"description": "site a, even", "query": {"tags": {"site": "a"}, "type": "even"}}),
            )
            .await
            .expect(200);
        let members = admin.all_devices("grp", "group=site-a-even", 3).await;
        assert_eq!(set(members), expected(|i| i % 3 == 0 && i % 2 == 0));
        // Combined with a listing filter.
        let members = admin.all_devices("grp", "group=site-a-even&status=enabled", 1000).await;
        assert_eq!(set(members), expected(|i| i % 6 == 0 && i % 5 != 0));
        // A device that starts matching is a member at once.
        admin
            .patch("/tenants/grp/devices/d-01", json!({"type": "even", "tags": {"site": "a"}}))
            .await
            .expect(200);
        let members = admin.all_devices("grp", "group=site-a-even", 1000).await;
        assert!(ids(&members).contains(&"d-01".to_string()));
        admin
            .put("/tenants/grp/groups/site-a-even/members/d-02", json!(null))
            .await
            .expect_error(400, "invalid");

        // Static: explicit members.
        admin.put("/tenants/grp/groups/batch", json!({"name": "batch"})).await.expect(200);
        for d in ["d-10", "d-11", "d-12"] {
            admin
                .call(Method::PUT, &format!("/tenants/grp/groups/batch/members/{d}"), None)
                .await
                .expect(204);
        }
        // Idempotent.
        admin.call(Method::PUT, "/tenants/grp/groups/batch/members/d-10", None).await.expect(204);
        let members = admin.all_devices("grp", "group=batch", 2).await;
        assert_eq!(ids(&members), vec!["d-10", "d-11", "d-12"]);
        let d = admin.get("/tenants/grp/devices/d-11").await.expect(200);
        assert_eq!(d["groups"], json!(["batch"]));
        admin.delete("/tenants/grp/groups/batch/members/d-11").await.expect(204);
        admin
            .delete("/tenants/grp/groups/batch/members/d-11")
            .await
            .expect_error(404, "not_found");
        let members = admin.all_devices("grp", "group=batch", 1000).await;
        assert_eq!(ids(&members), vec!["d-10", "d-12"]);
        admin
            .call(Method::PUT, "/tenants/grp/groups/batch/members/ghost", None)
            .await
            .expect_error(404, "not_found");
        admin
            .call(Method::PUT, "/tenants/grp/groups/nogroup/members/d-10", None)
            .await
            .expect_error(404, "not_found");
        // Devices can be created into a static group.
        admin.device("grp", json!({"id": "late", "groups": ["batch"]})).await;
        assert_eq!(admin.all_devices("grp", "group=batch", 1000).await.len(), 3);

        let groups = admin.get("/tenants/grp/groups").await.expect(200);
        assert_eq!(groups.as_array().unwrap().len(), 2);
        let g = admin.get("/tenants/grp/groups/site-a-even").await.expect(200);
        assert_eq!(g["query"]["type"], "even");
        admin.get("/tenants/grp/devices?group=nope").await.expect_error(404, "not_found");
        admin.delete("/tenants/grp/groups/batch").await.expect(204);
        admin.get("/tenants/grp/groups/batch").await.expect_error(404, "not_found");
        admin.get("/tenants/grp/devices/d-10").await.expect(200);
        hub.stop().await;
    })
    .await;
}
