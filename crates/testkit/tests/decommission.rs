//! Decommissioning a device removes its credentials, its connection, and its broker session with
//! everything queued for it; a device registered again under the same id starts from nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub::config::UserEntry;
use ferrohub_registry::Actor;
use ferrohub_registry::model::{DeviceSpec, TelemetryOnDecommission};
use ferrohub_testkit::TestHub;
use rumqttc::v5::mqttbytes::QoS as Q5;

async fn register(hub: &TestHub, id: &str, secret: &str) {
    let r = &hub.hub().registry;
    r.create_device(
        &Actor::system(),
        "default",
        DeviceSpec {
            id: id.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    r.add_password(&Actor::system(), "default", id, Some(secret.into()), None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioning_deletes_the_session_and_its_queued_messages() {
    let hub = TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.users = vec![UserEntry {
            username: "ops".into(),
            password: "ops-secret".into(),
        }];
    })
    .await
    .unwrap();
    register(&hub, "pump-1", "pump-secret-1").await;
    let sessions_before = hub.hub().broker.session_count();

    // The device subscribes in a persistent session and goes offline.
    let mut dev = V5::connect(device_session_opts(&hub, "pump-1", "pump-secret-1", true)).await;
    dev.subscribe("devices/pump-1/cmd", Q5::AtLeastOnce).await;
    drop(dev);
    wait_until(Duration::from_secs(5), "session offline", || {
        hub.hub().broker.session_count() == sessions_before + 1
    })
    .await;

    // A command is queued for it.
    let mut ops_opts = v5_opts(&hub, "ops");
    ops_opts.set_credentials("ops", "ops-secret");
    let ops = V5::connect(ops_opts).await;
    ops.client
        .publish("devices/pump-1/cmd", Q5::AtLeastOnce, false, "stop")
        .await
        .unwrap();
    // And the device's last state is retained.
    ops.client
        .publish("devices/pump-1/state", Q5::AtLeastOnce, true, "running")
        .await
        .unwrap();
    wait_metric(&hub, "ferrohub_mqtt_queued_messages", |v| v >= 1.0).await;

    // Decommission: the session and the queued command go.
    hub.hub()
        .registry
        .delete_device(&Actor::system(), "default", "pump-1")
        .await
        .unwrap();
    // What remains is the operator's own session (the purge is done when the call returns).
    assert_eq!(hub.hub().broker.session_count(), sessions_before + 1);
    // Its retained state is gone too.
    let mut watch_opts = v5_opts(&hub, "ops-watch");
    watch_opts.set_credentials("ops", "ops-secret");
    let mut watch = V5::connect(watch_opts).await;
    watch.subscribe("devices/pump-1/#", Q5::AtLeastOnce).await;
    watch.expect_no_publish(Duration::from_millis(500)).await;
    let e = V5::try_connect(device_session_opts(&hub, "pump-1", "pump-secret-1", false)).await;
    assert!(
        e.is_err(),
        "a decommissioned device's credential still works"
    );

    // Registered again (new credential), it starts from nothing.
    register(&hub, "pump-1", "pump-secret-2").await;
    let mut again = V5::connect(device_session_opts(&hub, "pump-1", "pump-secret-2", false)).await;
    assert!(!again.connack.session_present, "old session survived");
    again.expect_no_publish(Duration::from_millis(500)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioning_a_connected_device_disconnects_it() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    register(&hub, "pump-2", "pump-secret-1").await;
    let mut dev = V5::connect(device_session_opts(&hub, "pump-2", "pump-secret-1", true)).await;
    hub.hub()
        .registry
        .delete_device(&Actor::system(), "default", "pump-2")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        if dev.next(Duration::from_millis(200)).await.is_none() && dev.is_closed() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still connected after decommissioning"
        );
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_created_again_under_a_deleted_ones_id_starts_empty() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    let setup = || async {
        r.create_tenant(&admin, "acme", None, Default::default())
            .await
            .unwrap();
        r.create_device(
            &admin,
            "acme",
            DeviceSpec {
                id: "gw".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        r.add_password(&admin, "acme", "gw", Some("gw-secret-1".into()), None)
            .await
            .unwrap();
    };
    setup().await;
    let opts = |clean| {
        let mut o = device_session_opts(&hub, "gw", "gw-secret-1", clean);
        o.set_credentials("acme/gw", "gw-secret-1");
        o
    };
    let mut gw = V5::connect(opts(true)).await;
    gw.subscribe("devices/gw/#", Q5::AtLeastOnce).await;
    gw.client
        .publish("devices/gw/state", Q5::AtLeastOnce, true, "up")
        .await
        .unwrap();
    gw.recv_publish().await;
    r.delete_tenant(&admin, "acme").await.unwrap();
    // The connection was closed and the session is gone.
    assert!(
        hub.hub()
            .broker
            .client_ids_in(&ferrohub_types::TenantId::new("acme"))
            .is_empty()
    );
    setup().await;
    let mut gw = V5::connect(opts(false)).await;
    assert!(
        !gw.connack.session_present,
        "the old tenant's session survived"
    );
    gw.subscribe("devices/gw/#", Q5::AtLeastOnce).await;
    gw.expect_no_publish(Duration::from_millis(500)).await;
    hub.stop().await;
}

/// Points of `device`/`temp` in the default tenant.
fn temp_points(hub: &TestHub, device: &str) -> usize {
    stored_points(hub, device, "temp").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_devices_telemetry_is_kept_or_purged_as_the_tenant_says() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    for (id, secret) in [("meter-a", "secret-a"), ("meter-b", "secret-b")] {
        register(&hub, id, secret).await;
        let mut dev = V5::connect(device_session_opts(&hub, id, secret, false)).await;
        for i in 0..5 {
            let body = format!(r#"{{"temp": {i}.5}}"#);
            dev.publish(
                &format!("devices/{id}/telemetry"),
                Q5::AtLeastOnce,
                false,
                body.as_bytes(),
            )
            .await;
            // Distinct receive timestamps.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        assert_eq!(temp_points(&hub, id), 5);
    }
    let r = &hub.hub().registry;
    let admin = Actor::system();
    // The default keeps it.
    let kept = r.delete_device(&admin, "default", "meter-a").await.unwrap();
    assert_eq!(kept, TelemetryOnDecommission::Keep);
    assert_eq!(temp_points(&hub, "meter-a"), 5);
    // A tenant that purges: gone when the call returns, and from disk soon after.
    let mut settings = r.tenant(&admin, "default").await.unwrap().settings;
    settings.telemetry_on_decommission = TelemetryOnDecommission::Purge;
    r.update_tenant(&admin, "default", None, Some(settings))
        .await
        .unwrap();
    let purged = r.delete_device(&admin, "default", "meter-b").await.unwrap();
    assert_eq!(purged, TelemetryOnDecommission::Purge);
    assert_eq!(temp_points(&hub, "meter-b"), 0);
    assert_eq!(temp_points(&hub, "meter-a"), 5);
    wait_metric(&hub, "ferrohub_tsdb_device_purges_total", |v| v >= 1.0).await;
    hub.stop().await;
}
