//! Format compatibility: `tests/fixtures/v1/` holds a snapshot and a log written by format
//! version 1. They must keep loading to the same state in every later version (invariant:
//! persisted formats are versioned; changing one adds a compatibility test).
//!
//! If `v1_encoding_is_unchanged` fails, the encoding changed: bump `FORMAT_VERSION`, keep
//! decoding version 1 files, and add a `v2` fixture (regenerate with
//! `FERROHUB_REGENERATE_FIXTURES=1 cargo test -p ferrohub-store --test compat -- --ignored`
//! after pointing `FIXTURE` at the new directory).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::RefModel;
use ferrohub_store::{
    BrokerStore, FsyncPolicy, QueuedFor, SessionRecord, StoreConfig, StoreOp, SubscriptionRecord,
};
use ferrohub_types::{Message, MessageProperties, QoS, TenantId, TopicName};

const FIXTURE: &str = "tests/fixtures/v1";
const FILES: [&str; 2] = ["snapshot.bin", "wal-0000000000000002.log"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

/// The ops of the fixture, spelled out (do not change: the fixture files encode them).
fn fixture_batches() -> Vec<Vec<StoreOp>> {
    let t = TenantId::new("default");
    let acme = TenantId::new("acme");
    let plain = Message {
        topic: TopicName::parse("sensors/1/temp").unwrap(),
        payload: Bytes::from_static(b"21.5"),
        qos: QoS::AtLeastOnce,
        retain: false,
        received_at: 1_700_000_000_000,
        properties: None,
    };
    let rich = Message {
        topic: TopicName::parse("cmd/réponse").unwrap(),
        payload: Bytes::from_static(b"\x00\x01\x02\xff"),
        qos: QoS::ExactlyOnce,
        retain: true,
        received_at: 1_700_000_000_500,
        properties: Some(Arc::new(MessageProperties {
            payload_is_utf8: false,
            expires_at: Some(1_700_000_060_000),
            content_type: Some("application/octet-stream".into()),
            response_topic: Some("replies/dev-1".into()),
            correlation_data: Some(Bytes::from_static(b"corr-1")),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        })),
    };
    let empty_props = Message {
        topic: TopicName::parse("status/dev-1").unwrap(),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: true,
        received_at: 0,
        properties: Some(Arc::new(MessageProperties::default())),
    };
    let rcpt = |c: &str, q: QoS, retain: bool, ids: Vec<u32>| QueuedFor {
        client_id: c.into(),
        qos: q,
        retain,
        subscription_ids: ids,
    };
    let session = |tenant: &TenantId, c: &str, expiry: u32, at: Option<u64>| {
        StoreOp::PutSession(SessionRecord {
            tenant: tenant.clone(),
            client_id: c.into(),
            expiry_secs: expiry,
            disconnected_at: at,
        })
    };
    vec![
        // Compacted into the snapshot (epoch 1):
        vec![
            session(&t, "dev-1", 3600, None),
            session(&t, "dev-2", u32::MAX, Some(1_699_999_999_000)),
            session(&acme, "dev-1", 60, None),
            StoreOp::PutSubscription {
                tenant: t.clone(),
                client_id: "dev-1".into(),
                subscription: SubscriptionRecord {
                    filter: "sensors/+/temp".into(),
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 1,
                    subscription_id: Some(42),
                },
            },
            StoreOp::PutSubscription {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                subscription: SubscriptionRecord {
                    filter: "$share/g/cmd/#".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                },
            },
        ],
        vec![
            StoreOp::Enqueue {
                tenant: t.clone(),
                message_id: 1,
                message: plain.clone(),
                recipients: vec![
                    rcpt("dev-1", QoS::AtLeastOnce, false, vec![42]),
                    rcpt("dev-2", QoS::AtLeastOnce, false, vec![]),
                ],
            },
            StoreOp::Enqueue {
                tenant: t.clone(),
                message_id: 2,
                message: rich.clone(),
                recipients: vec![rcpt("dev-1", QoS::ExactlyOnce, true, vec![42, 7])],
            },
            StoreOp::Sent {
                tenant: t.clone(),
                client_id: "dev-1".into(),
                message_id: 2,
                packet_id: 513,
            },
            StoreOp::Released {
                tenant: t.clone(),
                client_id: "dev-1".into(),
                message_id: 2,
            },
            StoreOp::InboundQos2 {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                packet_id: 9,
            },
            StoreOp::PutRetained {
                tenant: t.clone(),
                message: rich.clone(),
            },
            StoreOp::PutRetained {
                tenant: acme.clone(),
                message: empty_props.clone(),
            },
        ],
        vec![StoreOp::Enqueue {
            tenant: t.clone(),
            message_id: 3,
            message: plain.clone(),
            recipients: vec![rcpt("dev-2", QoS::AtLeastOnce, false, vec![])],
        }],
        // In the log (epoch 2):
        vec![
            StoreOp::Dequeue {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                message_id: 1,
            },
            StoreOp::Enqueue {
                tenant: t.clone(),
                message_id: 4,
                message: empty_props.clone(),
                recipients: vec![
                    rcpt("dev-2", QoS::ExactlyOnce, true, vec![1, 2, 268_435_455]),
                    rcpt("nobody", QoS::AtLeastOnce, false, vec![]),
                ],
            },
            StoreOp::Sent {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                message_id: 4,
                packet_id: 65535,
            },
            StoreOp::InboundQos2 {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                packet_id: 10,
            },
            StoreOp::InboundQos2Done {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                packet_id: 9,
            },
            StoreOp::DeleteSubscription {
                tenant: t.clone(),
                client_id: "dev-2".into(),
                filter: "$share/g/cmd/#".into(),
            },
        ],
        vec![
            StoreOp::DeleteSession {
                tenant: acme.clone(),
                client_id: "dev-1".into(),
            },
            StoreOp::DeleteRetained {
                tenant: t.clone(),
                topic: TopicName::parse("cmd/réponse").unwrap(),
            },
            StoreOp::PutRetained {
                tenant: t.clone(),
                message: plain,
            },
            StoreOp::Enqueue {
                tenant: t.clone(),
                message_id: 5,
                message: rich,
                recipients: vec![rcpt("dev-1", QoS::AtLeastOnce, false, vec![])],
            },
            StoreOp::Dequeue {
                tenant: t,
                client_id: "dev-1".into(),
                message_id: 5,
            },
        ],
    ]
}

/// Writes the fixture's files into `dir` the way they were produced.
async fn write_fixture(dir: &Path) {
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Never,
        compact_after_bytes: u64::MAX,
        queue_capacity: 16,
    };
    let (store, _) = BrokerStore::open(dir, cfg).unwrap();
    let batches = fixture_batches();
    for (i, b) in batches.into_iter().enumerate() {
        if i == 3 {
            store.compact().await.unwrap();
        }
        store.submit(b).await.unwrap().await.unwrap();
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fixture_recovers_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    for f in FILES {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    let (store, rec) = BrokerStore::open(dir.path(), StoreConfig::default()).unwrap();
    store.close().await.unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);

    let mut model = RefModel::default();
    for b in fixture_batches() {
        model.apply_all(&b);
    }
    assert_eq!(rec, model.expected());

    // A few facts spelled out, independent of the reference model.
    assert_eq!(rec.next_message_id, 6);
    assert_eq!(rec.sessions.len(), 2);
    let dev1 = &rec.sessions[0];
    assert_eq!(&*dev1.session.client_id, "dev-1");
    assert_eq!(dev1.pending.len(), 2);
    assert_eq!(dev1.pending[1].packet_id, Some(513));
    assert!(dev1.pending[1].released);
    let props = dev1.pending[1].message.properties.as_deref().unwrap();
    assert_eq!(props.user_properties.len(), 2);
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    let dev2 = &rec.sessions[1];
    assert_eq!(dev2.session.expiry_secs, u32::MAX);
    assert!(dev2.subscriptions.is_empty());
    assert_eq!(
        dev2.pending
            .iter()
            .map(|d| d.message_id)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(dev2.pending[1].subscription_ids, [1, 2, 268_435_455]);
    assert_eq!(dev2.inbound_qos2, [10]);
    assert_eq!(rec.retained.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_encoding_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).await;
    for f in FILES {
        let now = std::fs::read(dir.path().join(f)).unwrap();
        let then = std::fs::read(fixture_dir().join(f)).unwrap();
        assert!(
            now == then,
            "{f}: the on-disk encoding changed; bump FORMAT_VERSION, keep reading version 1 and add a new fixture"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the fixture files; run explicitly with FERROHUB_REGENERATE_FIXTURES=1"]
async fn regenerate_v1_fixture() {
    if std::env::var("FERROHUB_REGENERATE_FIXTURES").as_deref() != Ok("1") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).await;
    std::fs::create_dir_all(fixture_dir()).unwrap();
    for f in FILES {
        std::fs::copy(dir.path().join(f), fixture_dir().join(f)).unwrap();
    }
}
