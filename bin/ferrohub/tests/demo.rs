//! `ferrohub serve --demo`: the real hub (in-process, port 0) creates the demo tenant and its
//! devices, runs the simulated fleet against its own MQTT listener (devices online, telemetry of
//! several profiles through the API), stops it on shutdown, and reuses the same devices and
//! credentials after a restart on the same data directory. Demo mode without the MQTT listener is
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferrohub::config::{FsyncMode, HubConfig};
use ferrohub::demo;
use ferrohub::hub::Hub;
use serde_json::Value;

/// The longest any wait of this test takes.
const BOUND: Duration = Duration::from_secs(30);
const TOKEN: &str = "demo-test-admin-token-0123456789";

fn config(dir: &std::path::Path) -> HubConfig {
    let mut c = HubConfig {
        data_dir: dir.to_path_buf(),
        demo: true,
        admin_token: TOKEN.into(),
        ..HubConfig::default()
    };
    c.listeners.mqtt = "127.0.0.1:0".into();
    c.listeners.http = "127.0.0.1:0".into();
    c.listeners.mqtts = String::new();
    c.listeners.ws = String::new();
    c.storage.fsync = FsyncMode::Never;
    c
}

async fn get(hub: &Hub, path: &str) -> Value {
    let url = format!("http://{}/api/v1{path}", hub.http_addr.unwrap());
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

/// Device id → (profile tag, site tag, online) as the API lists them.
async fn devices(hub: &Hub) -> BTreeMap<String, (String, String, bool)> {
    let page = get(
        hub,
        &format!("/tenants/{}/devices?limit=1000", demo::TENANT),
    )
    .await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                (
                    d["tags"]["profile"].as_str().unwrap_or("").to_string(),
                    d["tags"]["site"].as_str().unwrap_or("").to_string(),
                    d["connectivity"]["online"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
}

/// Points of one series through the API.
async fn points(hub: &Hub, device: &str, metric: &str) -> usize {
    let page = get(
        hub,
        &format!(
            "/tenants/{}/devices/{device}/telemetry/{metric}",
            demo::TENANT
        ),
    )
    .await;
    page["points"].as_array().map_or(0, Vec::len)
}

/// Waits until the fleet is live: most devices online, and points for one metric of each of
/// the profiles named in `check` (device of that profile, metric).
async fn wait_live(hub: &Hub, check: &[(&str, &str)]) -> BTreeMap<String, (String, String, bool)> {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let devs = devices(hub).await;
        let online = devs.values().filter(|d| d.2).count();
        let mut with_points = 0;
        for (profile, metric) in check {
            let device = devs
                .iter()
                .find(|(_, d)| d.0 == *profile)
                .map(|(id, _)| id.clone())
                .unwrap_or_else(|| panic!("no demo device of profile {profile}: {devs:?}"));
            if points(hub, &device, metric).await > 0 {
                with_points += 1;
            }
        }
        if online >= demo::DEVICES / 2 && with_points == check.len() {
            return devs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "demo fleet not live within {BOUND:?}: {online} online, {with_points}/{} profiles with points",
            check.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn stop(hub: Hub) {
    tokio::time::timeout(BOUND, hub.shutdown())
        .await
        .expect("the hub (and its demo fleet) did not stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mode_populates_a_live_tenant_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let check = [
        ("environment", "temperature"),
        ("rotating-machine", "vibration_rms"),
        ("gps-tracker", "speed"),
        ("smart-meter", "power"),
        ("cold-chain", "door_open"),
    ];

    let hub = Hub::start(config(dir.path())).await.unwrap();
    let tenant = get(&hub, &format!("/tenants/{}", demo::TENANT)).await;
    assert!(
        tenant["name"].as_str().unwrap().contains("Demo data"),
        "{tenant}"
    );
    let first = wait_live(&hub, &check).await;
    assert_eq!(first.len(), demo::DEVICES, "{first:?}");
    for p in demo::PROFILES {
        // Equal weights: close to a fifth each (the mix is a low-discrepancy sequence).
        let n = first.values().filter(|d| d.0 == p).count();
        assert!((8..=12).contains(&n), "{n} devices of {p}");
    }
    assert!(first.values().all(|d| !d.1.is_empty()), "site tags");
    let fleet_file = dir.path().join(demo::FLEET_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fleet_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the credentials file is private");
    }
    let secrets = std::fs::read_to_string(&fleet_file).unwrap();
    stop(hub).await;

    // Same data directory: the same devices, the same credentials, live again.
    let hub = Hub::start(config(dir.path())).await.unwrap();
    let second = wait_live(&hub, &check[..3]).await;
    let ids = |m: &BTreeMap<String, (String, String, bool)>| {
        m.iter()
            .map(|(id, d)| (id.clone(), d.0.clone(), d.1.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(
        std::fs::read_to_string(&fleet_file).unwrap(),
        secrets,
        "no new passwords"
    );
    let tenants = get(&hub, "/tenants").await;
    let n = tenants
        .as_array()
        .or_else(|| tenants["items"].as_array())
        .map_or(0, |t| {
            t.iter()
                .filter(|t| t["id"].as_str() == Some(demo::TENANT))
                .count()
        });
    assert_eq!(n, 1, "{tenants}");
    stop(hub).await;
}

#[tokio::test]
async fn demo_mode_needs_the_mqtt_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.listeners.mqtt = String::new();
    let e = match Hub::start(c).await {
        Ok(_) => panic!("demo mode started without the MQTT listener"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("demo mode") && e.contains("MQTT"), "{e}");
}
