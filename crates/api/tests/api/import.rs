//! Bulk import: 10,000 devices from CSV with a few bad rows; JSON imports; format errors.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_of_ten_thousand_devices_reports_exactly_the_bad_rows() {
    // The 30 s budget (debug build) is held by
    // `registry_regressions::ten_thousand_row_import_within_30_s`; this one checks the report.
    import_ten_thousand(Duration::from_secs(120)).await;
}

/// Imports 10,000 CSV rows with five bad ones, within `budget`, and checks the report and the
/// resulting registry.
pub async fn import_ten_thousand(budget: Duration) {
    bounded(budget.as_secs() + 60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("bulk").await;
        admin
            .put(
                "/tenants/bulk/device-types/meter",
                json!({"tags": {"kind": "meter"}}),
            )
            .await
            .expect(200);
        admin
            .put("/tenants/bulk/groups/wave1", json!({}))
            .await
            .expect(200);
        admin.device("bulk", json!({"id": "exists"})).await;

        const N: usize = 10_000;
        let mut csv = String::from("id,name,type,tags,status,policy,groups\n");
        let mut bad = Vec::new(); // (row, id)
        for row in 1..=N {
            let mut id = format!("m-{row:05}");
            let mut ty = "meter";
            let mut extra = "";
            match row {
                17 => id = "bad id!".into(),
                2500 => id = "m-00010".into(), // duplicate of row 10
                5000 => id = "exists".into(),  // already registered
                7777 => ty = "nope",           // unknown type
                9999 => extra = "sleepy",      // bad status
                _ => {}
            }
            if matches!(row, 17 | 2500 | 5000 | 7777 | 9999) {
                bad.push((row, id.clone()));
            }
            let status = if extra.is_empty() {
                if row % 10 == 0 { "disabled" } else { "enabled" }
            } else {
                extra
            };
            let groups = if row % 100 == 0 { "wave1" } else { "" };
            writeln!(
                csv,
                "{id},\"Meter, no. {row}\",{ty},site={};row={row},{status},,{groups}",
                ["north", "south"][row % 2]
            )
            .unwrap();
        }
        let started = Instant::now();
        let report = admin
            .raw(
                Method::POST,
                "/tenants/bulk/devices/import",
                Some("text/csv; charset=utf-8"),
                csv.into_bytes(),
            )
            .await
            .expect(200);
        let took = started.elapsed();
        eprintln!("imported {N} CSV rows in {took:?}");
        assert!(took < budget, "import took {took:?}, over {budget:?}");
        assert_eq!(report["total"], N);
        assert_eq!(report["imported"], N - bad.len());
        let rejected = report["rejected"].as_array().unwrap();
        let got: Vec<(usize, String)> = rejected
            .iter()
            .map(|r| {
                (
                    r["row"].as_u64().unwrap() as usize,
                    r["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got, bad, "{rejected:#?}");
        for r in rejected {
            assert!(!r["error"].as_str().unwrap().is_empty());
        }
        assert!(
            rejected[1]["error"].as_str().unwrap().contains("twice"),
            "{rejected:?}"
        );
        assert!(
            rejected[2]["error"]
                .as_str()
                .unwrap()
                .contains("already exists"),
            "{rejected:?}"
        );
        assert!(
            rejected[3]["error"].as_str().unwrap().contains("nope"),
            "{rejected:?}"
        );
        assert!(
            rejected[4]["error"].as_str().unwrap().contains("sleepy"),
            "{rejected:?}"
        );

        // The good rows are listable, with their fields.
        let listed = admin.all_devices("bulk", "type=meter", 1000).await;
        let listed_ids: BTreeSet<String> = ids(&listed).into_iter().collect();
        assert_eq!(listed_ids.len(), listed.len(), "duplicates in the listing");
        let expected: BTreeSet<String> = (1..=N)
            .filter(|r| !matches!(r, 17 | 2500 | 5000 | 7777 | 9999))
            .map(|r| format!("m-{r:05}"))
            .collect();
        assert_eq!(listed_ids, expected);
        let d = admin.get("/tenants/bulk/devices/m-00100").await.expect(200);
        assert_eq!(d["name"], "Meter, no. 100");
        assert_eq!(
            d["tags"],
            json!({"kind": "meter", "site": "north", "row": "100"})
        );
        assert_eq!(d["status"], "disabled");
        assert_eq!(d["groups"], json!(["wave1"]));
        let wave = admin.all_devices("bulk", "group=wave1", 1000).await;
        assert_eq!(wave.len(), 98); // rows 2500 and 5000 were rejected
        let disabled = admin
            .all_devices("bulk", "status=disabled&tag=site:north", 1000)
            .await;
        assert_eq!(disabled.len(), 998);

        // The import is audited.
        let audit = admin
            .get("/audit?tenant=bulk&action=device.import")
            .await
            .expect(200);
        assert_eq!(audit["items"][0]["detail"]["imported"], N - bad.len());
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_import_and_format_errors() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("imp").await;
        let report = admin
            .post(
                "/tenants/imp/devices/import",
                json!([
                    {"id": "j1", "tags": {"a": "1"}},
                    {"id": "j2", "colour": "red"},
                    {"id": "j3", "groups": ["missing"]},
                    {"name": "no id"},
                    {"id": "j5", "status": "disabled"}
                ]),
            )
            .await
            .expect(200);
        assert_eq!(report["total"], 5);
        assert_eq!(report["imported"], 2);
        let rows: Vec<u64> = report["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["row"].as_u64().unwrap())
            .collect();
        assert_eq!(rows, vec![2, 3, 4]);
        assert!(
            report["rejected"][0]["error"]
                .as_str()
                .unwrap()
                .contains("colour")
        );
        admin.get("/tenants/imp/devices/j5").await.expect(200);

        // Unknown columns are named.
        let m = admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("text/csv"),
                b"id,colour,size\nx,red,3\n".to_vec(),
            )
            .await
            .expect_error(400, "invalid");
        assert!(m.contains("colour") && m.contains("size"), "{m}");
        // No id column.
        admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("text/csv"),
                b"name\nx\n".to_vec(),
            )
            .await
            .expect_error(400, "invalid");
        // Columns in any order, only id required; a short row is one bad row.
        let report = admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("text/csv"),
                b"tags,id\nk=v;k2=v2,c1\nbroken\nnotapair,c3\n".to_vec(),
            )
            .await
            .expect(200);
        assert_eq!(report["imported"], 1);
        let rows: Vec<u64> = report["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["row"].as_u64().unwrap())
            .collect();
        assert_eq!(rows, vec![2, 3]);
        let c1 = admin.get("/tenants/imp/devices/c1").await.expect(200);
        assert_eq!(c1["tags"], json!({"k": "v", "k2": "v2"}));
        // Neither JSON nor CSV.
        admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("text/plain"),
                b"id\nx\n".to_vec(),
            )
            .await
            .expect_error(415, "unsupported_media_type");
        admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("application/json"),
                b"{\"id\": 1}".to_vec(),
            )
            .await
            .expect_error(400, "invalid");
        // Bodies over the default 2 MiB are accepted here (up to 64 MiB) ...
        let mut big = String::from("id,name\n");
        let pad = "x".repeat(200);
        for i in 0..15_000 {
            writeln!(big, "big-{i},{pad}").unwrap();
        }
        assert!(big.len() > 2 * 1024 * 1024);
        let report = admin
            .raw(
                Method::POST,
                "/tenants/imp/devices/import",
                Some("text/csv"),
                big.into_bytes(),
            )
            .await
            .expect(200);
        assert_eq!(report["imported"], 15_000);
        // ... but not on other routes.
        let huge = format!(
            "{{\"id\": \"h\", \"name\": \"{}\"}}",
            "x".repeat(3 * 1024 * 1024)
        );
        admin
            .raw(
                Method::POST,
                "/tenants/imp/devices",
                Some("application/json"),
                huge.into_bytes(),
            )
            .await
            .expect_error(413, "payload_too_large");
        hub.stop().await;
    })
    .await;
}
