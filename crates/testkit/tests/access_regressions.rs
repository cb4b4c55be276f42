//! Regression tests for access-control defects found in review: resumed sessions must not keep
//! what the current policy forbids, tenant admins must not reach platform-level controls, and a
//! decommissioned device's tokens must not authenticate its successor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub::config::UserEntry;
use ferrohub_registry::model::{DevicePatch, DeviceSpec, Quotas, Role, TenantSettings};
use ferrohub_registry::policy::PolicyDocument;
use ferrohub_registry::{Actor, RegistryError};
use ferrohub_testkit::TestHub;
use rumqttc::v5::mqttbytes::QoS as Q5;

const WITH_FLEET: &str = r#"{"version":1,"statements":[
  {"effect":"allow","actions":["connect"],"resources":["${device.id}"]},
  {"effect":"allow","actions":["publish","subscribe","receive"],"resources":["devices/${device.id}/#","fleet/#"]}
]}"#;
const WITHOUT_FLEET: &str = r#"{"version":1,"statements":[
  {"effect":"allow","actions":["connect"],"resources":["${device.id}"]},
  {"effect":"allow","actions":["publish","subscribe","receive"],"resources":["devices/${device.id}/#"]}
]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_nothing_the_current_policy_forbids() {
    let hub = TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.users = vec![UserEntry {
            username: "ops".into(),
            password: "ops-secret".into(),
        }];
    })
    .await
    .unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    r.put_policy(
        &admin,
        "default",
        "fleet",
        PolicyDocument::from_json(WITH_FLEET).unwrap(),
    )
    .await
    .unwrap();
    r.create_device(
        &admin,
        "default",
        DeviceSpec {
            id: "car-1".into(),
            policy: Some("fleet".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    r.add_password(
        &admin,
        "default",
        "car-1",
        Some("car-secret-1".into()),
        None,
    )
    .await
    .unwrap();

    // Subscribed to fleet/# in a persistent session, then offline.
    let mut car = V5::connect(device_session_opts(&hub, "car-1", "car-secret-1", true)).await;
    car.subscribe("fleet/#", Q5::AtLeastOnce).await;
    car.subscribe("devices/car-1/#", Q5::AtLeastOnce).await;
    drop(car);
    // While it is offline the policy loses fleet/#, and a fleet message is queued for it.
    r.put_policy(
        &admin,
        "default",
        "fleet",
        PolicyDocument::from_json(WITHOUT_FLEET).unwrap(),
    )
    .await
    .unwrap();
    let mut ops_opts = v5_opts(&hub, "ops");
    ops_opts.set_credentials("ops", "ops-secret");
    let ops = V5::connect(ops_opts).await;
    ops.client
        .publish("fleet/broadcast", Q5::AtLeastOnce, false, "queued")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Resumed: neither the queued message nor new fleet traffic arrives; its own topic still does.
    let mut car = V5::connect(device_session_opts(&hub, "car-1", "car-secret-1", false)).await;
    assert!(car.connack.session_present);
    ops.client
        .publish("fleet/broadcast", Q5::AtLeastOnce, false, "live")
        .await
        .unwrap();
    ops.client
        .publish("devices/car-1/cmd", Q5::AtLeastOnce, false, "own")
        .await
        .unwrap();
    let p = car.recv_publish().await;
    assert_eq!(topic5(&p), "devices/car-1/cmd", "got {p:?}");
    car.expect_no_publish(Duration::from_millis(500)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_admins_cannot_register_cas_or_lift_their_quotas() {
    let hub = TestHub::start().await.unwrap();
    let r = &hub.hub().registry;
    let platform = Actor::system();
    r.create_tenant(&platform, "acme", None, TenantSettings::default())
        .await
        .unwrap();
    let tenant_admin = Actor {
        name: "token:t".into(),
        role: Role::Admin,
        tenant: Some("acme".into()),
        source: None,
    };
    let ca = r.builtin_ca_pem(&platform, "default").await.unwrap();
    let e = r
        .register_ca(&tenant_admin, "acme", "stolen", &ca, true, None)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Forbidden(_)), "{e}");

    let mut settings = r.tenant(&platform, "acme").await.unwrap().settings;
    settings.quotas = Quotas {
        max_connections: 10,
        ..Quotas::default()
    };
    r.update_tenant(&platform, "acme", None, Some(settings.clone()))
        .await
        .unwrap();
    settings.quotas.max_connections = 0;
    let e = r
        .update_tenant(&tenant_admin, "acme", None, Some(settings))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Forbidden(_)), "{e}");
    // Other settings stay theirs to change.
    let mut settings = r.tenant(&platform, "acme").await.unwrap().settings;
    settings.telemetry_on_decommission = ferrohub_registry::model::TelemetryOnDecommission::Purge;
    r.update_tenant(&tenant_admin, "acme", Some("ACME".into()), Some(settings))
        .await
        .unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_devices_token_does_not_authenticate_its_successor() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    let spec = || DeviceSpec {
        id: "meter-9".into(),
        ..Default::default()
    };
    r.create_device(&admin, "default", spec()).await.unwrap();
    let old_token = r
        .issue_device_token(&admin, "default", "meter-9", 3600)
        .await
        .unwrap();
    r.delete_device(&admin, "default", "meter-9").await.unwrap();
    // Registered again a second later (tokens carry whole seconds).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    r.create_device(&admin, "default", spec()).await.unwrap();
    let mut o = v5_opts(&hub, "meter-9");
    o.set_credentials("meter-9", old_token);
    assert!(
        V5::try_connect(o).await.is_err(),
        "the old device's token authenticated the new one"
    );
    let new_token = r
        .issue_device_token(&admin, "default", "meter-9", 3600)
        .await
        .unwrap();
    let mut o = v5_opts(&hub, "meter-9");
    o.set_credentials("meter-9", new_token);
    V5::connect(o).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_cannot_undo_a_disable() {
    let hub = TestHub::start().await.unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    r.create_device(
        &admin,
        "default",
        DeviceSpec {
            id: "pump-7".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A tag sync read the device, then someone disabled it, then the sync writes back.
    let stale = r.device(&admin, "default", "pump-7").await.unwrap();
    r.update_device(
        &admin,
        "default",
        "pump-7",
        DevicePatch {
            status: Some(ferrohub_registry::model::DeviceStatus::Disabled),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut write_back = stale.clone();
    write_back.tags.insert("synced".into(), "yes".into());
    use ferrohub_registry::RegistryStore;
    let e = r
        .store()
        .update_device(&write_back, stale.updated_at)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Stale(_)), "{e}");
    let now = r.device(&admin, "default", "pump-7").await.unwrap();
    assert_eq!(now.status, ferrohub_registry::model::DeviceStatus::Disabled);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_generated_secrets_authenticate_without_argon2() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    r.create_device(
        &admin,
        "default",
        DeviceSpec {
            id: "tag-1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, secret) = r
        .add_password(&admin, "default", "tag-1", None, None)
        .await
        .unwrap();
    assert_eq!(secret.len(), 43, "256 random bits, base64url");
    let mut o = v5_opts(&hub, "tag-1");
    o.set_credentials("tag-1", secret.clone());
    V5::connect(o).await;
    let mut wrong = v5_opts(&hub, "tag-1");
    wrong.set_credentials("tag-1", format!("{secret}x"));
    assert!(V5::try_connect(wrong).await.is_err());
    let text = metrics(&hub).await;
    assert_eq!(
        metric(&text, "ferrohub_password_hashes_total"),
        Some(0.0),
        "a generated secret went through argon2id"
    );
    hub.stop().await;
}
