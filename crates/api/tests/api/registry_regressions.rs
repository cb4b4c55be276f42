//! Registry behaviour the API relies on that was once broken: group deletion takes its
//! memberships along, and a 10,000-row import stays fast (device inserts use the tag index).

use std::time::Duration;

use crate::common::*;

/// `Registry::delete_group` deletes the group document but not its `group_members` rows: the
/// devices keep listing the group, and a new static group of the same name inherits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_group_removes_its_memberships() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("gd").await;
        admin
            .put("/tenants/gd/groups/g", json!({}))
            .await
            .expect(200);
        admin
            .device("gd", json!({"id": "d", "groups": ["g"]}))
            .await;
        admin.delete("/tenants/gd/groups/g").await.expect(204);
        let d = admin.get("/tenants/gd/devices/d").await.expect(200);
        assert_eq!(d["groups"], json!([]), "{d}");
        admin
            .put("/tenants/gd/groups/g", json!({}))
            .await
            .expect(200);
        assert!(admin.all_devices("gd", "group=g", 100).await.is_empty());
        hub.stop().await;
    })
    .await;
}

/// Every device insert runs `DELETE FROM device_tags WHERE tenant = ? AND device_id = ?`, which
/// has no index to use (the key is `(tenant, key, value, device_id)`) and scans all the tenant's
/// tags: imports are quadratic in the tenant's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_row_import_within_30_s() {
    crate::import::import_ten_thousand(Duration::from_secs(30)).await;
}
