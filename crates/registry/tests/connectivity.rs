//! Connectivity with reasons and its history, through the registry's device authentication (the
//! path every adapter takes) and the operator view.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use ferrohub_registry::model::{ConnectivityEventKind, DeviceSpec, Role, TenantSettings};
use ferrohub_registry::{Actor, Registry, RegistryConfig, RegistryError, SqliteStore};
use ferrohub_types::auth::{Access, Authenticator, Credentials};
use ferrohub_types::lifecycle::DisconnectReason;

async fn registry(config: RegistryConfig) -> (Arc<Registry>, String) {
    let store = SqliteStore::in_memory().await.unwrap();
    let mut config = config;
    config.password.memory_kib = 1024;
    config.password.iterations = 1;
    let r = Registry::open(store, config).await.unwrap();
    let admin = Actor::system();
    r.create_tenant(&admin, "t", None, TenantSettings::default())
        .await
        .unwrap();
    r.create_device(
        &admin,
        "t",
        DeviceSpec {
            id: "d1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, secret) = r.add_password(&admin, "t", "d1", None, None).await.unwrap();
    (r, secret)
}

async fn connect(r: &Registry, secret: &str, port: u16) -> Arc<dyn Access> {
    let grant = r
        .authenticate(Credentials {
            client_id: "d1",
            username: Some("t/d1"),
            password: Some(secret.as_bytes()),
            peer: format!("10.0.0.7:{port}").parse().unwrap(),
            certificates: None,
            protocol: "mqtt",
        })
        .await
        .unwrap();
    grant.access.expect("a device access")
}

fn viewer(tenant: &str) -> Actor {
    Actor {
        name: "token:viewer".into(),
        role: Role::Viewer,
        tenant: Some(tenant.into()),
        source: None,
    }
}

#[tokio::test]
async fn connects_and_disconnects_within_one_flush_are_all_recorded_with_their_reasons() {
    let (r, secret) = registry(RegistryConfig::default()).await;
    let admin = Actor::system();

    // Three connections within one flush window: a clean disconnect, a lost connection, and
    // one that is still open.
    let a = connect(&r, &secret, 1001).await;
    a.closing(DisconnectReason::ClientDisconnect);
    a.closing(DisconnectReason::ConnectionLost); // only the first reason counts
    drop(a);
    let b = connect(&r, &secret, 1002).await;
    drop(b); // no reason given
    let c = connect(&r, &secret, 1003).await;

    // Before the flush the device view is live already.
    let d = r.device(&admin, "t", "d1").await.unwrap();
    assert!(d.connectivity.online);
    assert_eq!(d.connectivity.remote_addr.as_deref(), Some("10.0.0.7:1003"));
    assert_eq!(d.connectivity.disconnect_reason, None);
    assert!(d.connectivity.last_disconnected_at.is_some());
    assert!(d.connectivity.last_connected_at >= d.connectivity.last_disconnected_at);

    r.flush_connectivity().await;
    let h = r
        .connectivity_history(&viewer("t"), "t", "d1", 100, None)
        .await
        .unwrap();
    let got: Vec<(ConnectivityEventKind, Option<&str>, Option<&str>)> = h
        .events
        .iter()
        .map(|e| (e.event, e.reason.as_deref(), e.remote_addr.as_deref()))
        .collect();
    use ConnectivityEventKind::{Connected, Disconnected};
    assert_eq!(
        got,
        vec![
            (Connected, None, Some("10.0.0.7:1003")),
            (Disconnected, None, Some("10.0.0.7:1002")),
            (Connected, None, Some("10.0.0.7:1002")),
            (
                Disconnected,
                Some("client_disconnect"),
                Some("10.0.0.7:1001")
            ),
            (Connected, None, Some("10.0.0.7:1001")),
        ]
    );
    assert!(
        h.events
            .iter()
            .all(|e| e.client_id.as_deref() == Some("d1") && e.protocol.as_deref() == Some("mqtt"))
    );
    assert_eq!(h.next, None);
    assert!(h.current.online);

    // Offline: the reason is kept; online again: it stays as history.
    c.closing(DisconnectReason::KeepAliveTimeout);
    drop(c);
    r.flush_connectivity().await;
    let d = r.device(&admin, "t", "d1").await.unwrap();
    assert!(!d.connectivity.online);
    assert_eq!(
        d.connectivity.disconnect_reason.as_deref(),
        Some("keep_alive_timeout")
    );
    let e = connect(&r, &secret, 1004).await;
    r.flush_connectivity().await;
    let d = r.device(&admin, "t", "d1").await.unwrap();
    assert!(d.connectivity.online);
    assert_eq!(
        d.connectivity.disconnect_reason.as_deref(),
        Some("keep_alive_timeout")
    );
    assert_eq!(d.connectivity.remote_addr.as_deref(), Some("10.0.0.7:1004"));

    // Paging: 7 events, pages of 3.
    let p1 = r
        .connectivity_history(&viewer("t"), "t", "d1", 3, None)
        .await
        .unwrap();
    assert_eq!(p1.events.len(), 3);
    let p2 = r
        .connectivity_history(&viewer("t"), "t", "d1", 3, p1.next)
        .await
        .unwrap();
    let p3 = r
        .connectivity_history(&viewer("t"), "t", "d1", 3, p2.next)
        .await
        .unwrap();
    assert_eq!(p3.events.len(), 1);
    assert_eq!(p3.next, None);
    assert_eq!(p1.events[1].reason.as_deref(), Some("keep_alive_timeout"));
    drop(e);

    // Scope: another tenant's viewer sees nothing; a missing device is not found.
    assert!(matches!(
        r.connectivity_history(&viewer("other"), "t", "d1", 10, None)
            .await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        r.connectivity_history(&viewer("t"), "t", "ghost", 10, None)
            .await,
        Err(RegistryError::NotFound(_))
    ));

    // Decommissioning deletes the history.
    r.flush_connectivity().await;
    r.delete_device(&admin, "t", "d1").await.unwrap();
    r.flush_connectivity().await;
    let rows = {
        use ferrohub_registry::RegistryStore;
        r.store()
            .connectivity_events("t", "d1", None, 100)
            .await
            .unwrap()
    };
    assert!(rows.is_empty(), "{rows:?}");
}

#[tokio::test]
async fn history_is_bounded_per_device_and_can_be_turned_off() {
    let (r, secret) = registry(RegistryConfig {
        connectivity_history: 4,
        ..Default::default()
    })
    .await;
    for port in 0..5 {
        let a = connect(&r, &secret, 2000 + port).await;
        a.closing(DisconnectReason::ConnectionLost);
    }
    r.flush_connectivity().await;
    let h = r
        .connectivity_history(&viewer("t"), "t", "d1", 100, None)
        .await
        .unwrap();
    assert_eq!(h.events.len(), 4);
    assert_eq!(h.events[0].remote_addr.as_deref(), Some("10.0.0.7:2004"));
    assert_eq!(h.events[0].event, ConnectivityEventKind::Disconnected);

    let (r, secret) = registry(RegistryConfig {
        connectivity_history: 0,
        ..Default::default()
    })
    .await;
    let a = connect(&r, &secret, 3000).await;
    a.closing(DisconnectReason::Kicked);
    drop(a);
    r.flush_connectivity().await;
    let h = r
        .connectivity_history(&viewer("t"), "t", "d1", 100, None)
        .await
        .unwrap();
    assert!(h.events.is_empty());
    assert_eq!(h.current.disconnect_reason.as_deref(), Some("kicked"));
    assert!(!h.current.online);
}
