//! The SQLite alarm store across a restart: alarms, history and channels survive a drop and
//! reopen; the dedup of an open key holds across it; a newer schema is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrohub_alarms::{
    AlarmQuery, AlarmService, AlarmState, AlarmStore, AlarmsConfig, ChannelKind, ChannelSpec,
    EventKind, RaiseAlarm, Severity, SqliteAlarmStore, WebhookChannel,
};
use serde_json::json;

fn raise(key: &str, severity: Severity) -> RaiseAlarm {
    RaiseAlarm {
        key: key.into(),
        severity,
        device: Some("dev-1".into()),
        message: format!("{key} is on"),
        details: json!({"temp": 91.5}),
        source: "api".into(),
    }
}

#[tokio::test]
async fn reopen_keeps_alarms_history_and_channels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alarms.db");
    let (a, b) = {
        let store = SqliteAlarmStore::open(&path, true).await.unwrap();
        let s = AlarmService::open(Arc::new(store.clone()), AlarmsConfig::default())
            .await
            .unwrap();
        let a = s
            .raise("t1", raise("hot:1", Severity::Major))
            .await
            .unwrap();
        s.raise("t1", raise("hot:1", Severity::Critical))
            .await
            .unwrap();
        s.acknowledge("t1", &a.id, "token:op", Some("looking".into()))
            .await
            .unwrap();
        let b = s
            .raise("t1", raise("cold:1", Severity::Info))
            .await
            .unwrap();
        s.clear("t1", &b.id, "token:op", None).await.unwrap();
        s.put_channel(
            "t1",
            "ops",
            ChannelSpec {
                kind: ChannelKind::Webhook(WebhookChannel {
                    url: "http://127.0.0.1:9/{{ alarm.key }}".into(),
                    method: "POST".into(),
                    headers: BTreeMap::new(),
                    body: Some("{{ alarm.message }}".into()),
                    timeout_ms: 1000,
                    max_attempts: 2,
                    backoff_ms: 10,
                }),
                min_severity: Severity::Major,
                events: vec![EventKind::Raised],
                rate_limit_s: 60,
                enabled: true,
                description: "ops room".into(),
            },
        )
        .await
        .unwrap();
        drop(s);
        store.close().await;
        (a, b)
    };

    let store = SqliteAlarmStore::open(&path, true).await.unwrap();
    let s = AlarmService::open(Arc::new(store), AlarmsConfig::default())
        .await
        .unwrap();
    let got = s.get("t1", &a.id).await.unwrap();
    assert_eq!(
        (got.state, got.severity, got.count),
        (AlarmState::Acknowledged, Severity::Critical, 2)
    );
    assert_eq!(got.details, json!({"temp": 91.5}));
    let h = s.history("t1", &a.id).await.unwrap();
    assert_eq!(
        h.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::Raised,
            EventKind::Updated,
            EventKind::Acknowledged
        ]
    );
    assert_eq!(h[2].note.as_deref(), Some("looking"));
    assert!(h.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(s.get("t1", &b.id).await.unwrap().state, AlarmState::Cleared);
    let counts = s.counts("t1").await.unwrap();
    assert_eq!(
        (counts.total, counts.critical, counts.unacknowledged),
        (1, 1, 0)
    );
    // Still deduplicated after the restart.
    let again = s
        .raise("t1", raise("hot:1", Severity::Minor))
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), again.count), (a.id.as_str(), 3));
    let ch = s.channel("t1", "ops").unwrap();
    assert_eq!(ch.spec.description, "ops room");
    assert_eq!(ch.spec.min_severity, Severity::Major);
    let all = s.list("t1", &AlarmQuery::default()).await.unwrap();
    assert_eq!(all.items.len(), 2);

    // A deleted tenant leaves nothing behind.
    s.forget_tenant("t1").await.unwrap();
    assert!(
        s.list("t1", &AlarmQuery::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(s.channels("t1").is_empty());
    assert!(s.history("t1", &a.id).await.is_err());
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alarms.db");
    let store = SqliteAlarmStore::open(&path, false).await.unwrap();
    // Closing the last connection checkpoints the WAL into the main file.
    store.close().await;
    // Pretend a newer binary wrote it: `user_version` is the header's big-endian u32 at 60.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60..64].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = SqliteAlarmStore::open(&path, false).await.err().unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[tokio::test]
async fn open_total_counts_every_tenant() {
    let store = SqliteAlarmStore::in_memory().await.unwrap();
    let now = 1_700_000_000_000;
    store
        .raise("t1", &raise("a", Severity::Info), "01A", now, 10)
        .await
        .unwrap();
    store
        .raise("t2", &raise("a", Severity::Info), "01B", now, 10)
        .await
        .unwrap();
    assert_eq!(store.open_total().await.unwrap(), 2);
}
