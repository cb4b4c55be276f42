//! Round trips through the store: submit, close, reopen, compare with the reference model.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::*;
use ferrohub_store::{
    BrokerStore, FsyncPolicy, QueuedFor, SessionRecord, StoreConfig, StoreError, StoreOp,
    SubscriptionRecord,
};
use ferrohub_types::{QoS, TenantId, TopicName};
use proptest::prelude::*;

fn varied_batches() -> Vec<Vec<StoreOp>> {
    let t2 = TenantId::new("acme");
    vec![
        vec![put_session("a"), put_session("b")],
        vec![
            StoreOp::PutSession(SessionRecord {
                tenant: t2.clone(),
                client_id: "a".into(),
                expiry_secs: u32::MAX,
                disconnected_at: Some(1_700_000_000_000),
            }),
            StoreOp::PutSubscription {
                tenant: tenant(),
                client_id: "a".into(),
                subscription: SubscriptionRecord {
                    filter: "sensors/#".into(),
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                    subscription_id: Some(268_435_455),
                },
            },
            StoreOp::PutSubscription {
                tenant: tenant(),
                client_id: "a".into(),
                subscription: SubscriptionRecord {
                    filter: "$share/g/x/+".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                },
            },
        ],
        vec![StoreOp::Enqueue {
            tenant: tenant(),
            message_id: 10,
            message: rich_message("sensors/t", b"{\"t\":21.5}"),
            recipients: vec![
                QueuedFor {
                    client_id: "a".into(),
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    subscription_ids: vec![1, 2],
                },
                QueuedFor {
                    client_id: "b".into(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: vec![],
                },
                QueuedFor {
                    client_id: "ghost".into(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: vec![],
                },
            ],
        }],
        vec![
            enqueue("a", 11, b"x"),
            enqueue("b", 12, &[0u8; 300]),
            StoreOp::Sent {
                tenant: tenant(),
                client_id: "a".into(),
                message_id: 10,
                packet_id: 7,
            },
            StoreOp::Released {
                tenant: tenant(),
                client_id: "a".into(),
                message_id: 10,
            },
            dequeue("b", 10),
            dequeue("b", 999),
            StoreOp::InboundQos2 {
                tenant: tenant(),
                client_id: "b".into(),
                packet_id: 65535,
            },
            StoreOp::InboundQos2 {
                tenant: tenant(),
                client_id: "b".into(),
                packet_id: 3,
            },
            StoreOp::InboundQos2Done {
                tenant: tenant(),
                client_id: "b".into(),
                packet_id: 3,
            },
        ],
        vec![],
        vec![
            StoreOp::PutRetained {
                tenant: tenant(),
                message: rich_message("status/1", b"on"),
            },
            StoreOp::PutRetained {
                tenant: t2.clone(),
                message: message("status/1", b"off"),
            },
            StoreOp::PutRetained {
                tenant: tenant(),
                message: message("status/2", b""),
            },
            StoreOp::DeleteRetained {
                tenant: tenant(),
                topic: TopicName::parse("status/2").unwrap(),
            },
            StoreOp::DeleteSubscription {
                tenant: tenant(),
                client_id: "a".into(),
                filter: "$share/g/x/+".into(),
            },
        ],
        vec![
            put_session("c"),
            enqueue("c", 13, b"gone"),
            StoreOp::DeleteSession {
                tenant: tenant(),
                client_id: "c".into(),
            },
            // Ops on a deleted session are ignored.
            enqueue("c", 14, b"ignored"),
        ],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varied_ops_survive_reopen_with_both_policies() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let batches = varied_batches();
        write_batches(dir.path(), config(policy), &batches).await;
        let (store, rec) = BrokerStore::open(dir.path(), config(policy)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        let expected = model_of(&batches);
        assert_eq!(rec, expected);
        assert_eq!(rec.next_message_id, 15);
        assert_eq!(rec.sessions.len(), 3);
        store.close().await.unwrap();

        // The same after a compaction, and once more from the snapshot alone.
        let (store, _) = BrokerStore::open(dir.path(), config(policy)).unwrap();
        store.compact().await.unwrap();
        assert_eq!(store.stats().compactions, 1);
        store.close().await.unwrap();
        let (store, rec) = BrokerStore::open(dir.path(), config(policy)).unwrap();
        assert_eq!(rec, expected);
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_message_id_never_goes_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.next_message_id, 1);
    store
        .submit(vec![put_session("a")])
        .await
        .unwrap()
        .await
        .unwrap();
    store
        .submit(vec![enqueue("a", 41, b"1")])
        .await
        .unwrap()
        .await
        .unwrap();
    store
        .submit(vec![dequeue("a", 41)])
        .await
        .unwrap()
        .await
        .unwrap();
    store.compact().await.unwrap();
    store.close().await.unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.next_message_id, 42);
    assert!(rec.sessions[0].pending.is_empty());
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_reclaims_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Never,
        compact_after_bytes: 64 * 1024,
        queue_capacity: 16,
    };
    let (store, _) = BrokerStore::open(dir.path(), cfg.clone()).unwrap();
    store
        .submit(vec![put_session("a")])
        .await
        .unwrap()
        .await
        .unwrap();
    let mut commits = Vec::new();
    for id in 1..=2000u64 {
        commits.push(
            store
                .submit(vec![enqueue("a", id, &[7u8; 1000])])
                .await
                .unwrap(),
        );
        commits.push(store.submit(vec![dequeue("a", id)]).await.unwrap());
    }
    for c in commits {
        c.await.unwrap();
    }
    store
        .submit(vec![enqueue("a", 5000, b"live")])
        .await
        .unwrap()
        .await
        .unwrap();
    let stats = store.stats();
    // Background compactions ran (the log may overshoot the threshold while one is running).
    assert!(stats.compactions >= 1, "{stats:?}");
    assert_eq!(stats.queued_batches, 0);
    assert_eq!(stats.ops_written, 4002);
    store.compact().await.unwrap();
    let stats = store.stats();
    assert_eq!(stats.log_bytes, 32, "{stats:?}");
    assert!(stats.snapshot_bytes < 4096, "{stats:?}");
    store.close().await.unwrap();
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk < 8 * 1024, "{on_disk} bytes on disk");
    let (store, rec) = BrokerStore::open(dir.path(), cfg).unwrap();
    assert!(rec.warnings.is_empty());
    assert_eq!(rec.sessions[0].pending.len(), 1);
    assert_eq!(rec.sessions[0].pending[0].message_id, 5000);
    assert_eq!(rec.next_message_id, 5001);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_is_locked_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    match BrokerStore::open(dir.path(), config(FsyncPolicy::Never)) {
        Err(StoreError::Locked(d)) => assert!(d.contains(&*dir.path().to_string_lossy())),
        other => panic!("expected Locked, got {other:?}"),
    }
    store.close().await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store.submit(vec![put_session("a")]).await,
        Err(StoreError::Closed)
    ));
    store.flush().await.unwrap();
    let (again, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    let commit = store.submit(vec![put_session("a")]).await.unwrap();
    drop(store);
    commit.await.unwrap();
    // The writer releases the lock shortly after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (store, rec) = loop {
        match BrokerStore::open(dir.path(), config(FsyncPolicy::Never)) {
            Ok(x) => break x,
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(rec.sessions.len(), 1);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_covers_unawaited_commits_and_backpressure_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Always,
        compact_after_bytes: u64::MAX,
        queue_capacity: 2,
    };
    let (store, _) = BrokerStore::open(dir.path(), cfg.clone()).unwrap();
    store
        .submit(vec![put_session("a")])
        .await
        .unwrap()
        .await
        .unwrap();
    let mut commits = Vec::new();
    for id in 1..=200u64 {
        commits.push(store.submit(vec![enqueue("a", id, b"p")]).await.unwrap());
        assert!(store.stats().queued_batches <= 200);
    }
    store.flush().await.unwrap();
    assert!(commits.iter().all(|c| c.is_durable()));
    let stats = store.stats();
    assert_eq!(stats.batches_written, 201);
    assert!(stats.group_commits <= 201 && stats.fsyncs == stats.group_commits);
    store.close().await.unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), cfg).unwrap();
    assert_eq!(rec.sessions[0].pending.len(), 200);
    store.close().await.unwrap();
}

#[test]
fn in_memory_store_resolves_immediately_and_writes_nothing() {
    let rt = runtime();
    let store = BrokerStore::in_memory();
    assert!(!store.is_persistent());
    let mut cx = Context::from_waker(Waker::noop());
    let mut submit = pin!(store.submit(vec![put_session("a"), enqueue("a", 1, b"x")]));
    let Poll::Ready(Ok(commit)) = submit.as_mut().poll(&mut cx) else {
        panic!("in-memory submit must not wait");
    };
    assert!(commit.is_durable());
    let mut commit = pin!(commit);
    assert!(matches!(commit.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    rt.block_on(async {
        store.flush().await.unwrap();
        store.compact().await.unwrap();
        assert_eq!(store.stats(), Default::default());
        store.close().await.unwrap();
        assert!(matches!(
            store.submit(vec![]).await,
            Err(StoreError::Closed)
        ));
    });
}

#[test]
fn commits_are_send_unpin_static() {
    fn check<T: Send + Unpin + 'static>() {}
    check::<ferrohub_store::Commit>();
    fn check_clone<T: Clone + Send + Sync + 'static>() {}
    check_clone::<BrokerStore>();
}

// ---------------------------------------------------------------------------------------------
// Property test: random op sequences against the reference model, across compactions and reopens.

const FILTERS: [&str; 3] = ["a/#", "b/+", "$share/g/c"];
const TOPICS: [&str; 3] = ["a/1", "a/2", "b/x"];

#[derive(Debug, Clone)]
enum Step {
    Op(OpSpec),
    EndBatch,
    Reopen,
    Compact,
}

#[derive(Debug, Clone)]
enum OpSpec {
    PutSession(usize, usize, u32, Option<u64>),
    DeleteSession(usize, usize),
    PutSub(usize, usize, usize, u8, bool, Option<u32>),
    DeleteSub(usize, usize, usize),
    /// tenant, recipients (client index 3 = no session), reuse an earlier id, message.
    Enqueue(usize, Vec<(usize, u8, Vec<u32>)>, bool, MsgSpec),
    Sent(usize, usize, u64, u16),
    Released(usize, usize, u64),
    Dequeue(usize, usize, u64),
    /// Sent (0), Released (1) or Dequeue (2) of the n-th live delivery of the model.
    Live(u8, usize, u16),
    PutRetained(usize, MsgSpec),
    DeleteRetained(usize, usize),
    Inbound(usize, usize, u16, bool),
}

/// payload_is_utf8, expires_at, content type, correlation data, user properties.
type PropsSpec = (
    bool,
    Option<u64>,
    Option<String>,
    Option<Vec<u8>>,
    Vec<(String, String)>,
);

#[derive(Debug, Clone)]
struct MsgSpec {
    topic: usize,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    received_at: u64,
    props: Option<PropsSpec>,
}

fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    (
        0..3usize,
        proptest::collection::vec(any::<u8>(), 0..40),
        0..3u8,
        any::<bool>(),
        any::<u64>(),
        proptest::option::of((
            any::<bool>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of("[a-z/]{0,8}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::collection::vec(("[a-zé]{0,4}", "\\PC{0,4}"), 0..3),
        )),
    )
        .prop_map(
            |(topic, payload, qos, retain, received_at, props)| MsgSpec {
                topic,
                payload,
                qos,
                retain,
                received_at,
                props,
            },
        )
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    // Mostly the default tenant, so that ops meet the sessions they name.
    let t = prop_oneof![4 => Just(0usize), 1 => Just(1usize)];
    let c = 0..3usize;
    // Message ids are chosen as an offset back from the last id enqueued.
    let id = 0..4u64;
    prop_oneof![
        3 => (t.clone(), c.clone(), any::<u32>(), proptest::option::of(any::<u64>()))
            .prop_map(|(t, c, e, d)| OpSpec::PutSession(t, c, e, d)),
        1 => (t.clone(), c.clone()).prop_map(|(t, c)| OpSpec::DeleteSession(t, c)),
        2 => (t.clone(), c.clone(), 0..3usize, 0..3u8, any::<bool>(), proptest::option::of(1..1000u32))
            .prop_map(|(t, c, f, q, b, id)| OpSpec::PutSub(t, c, f, q, b, id)),
        1 => (t.clone(), c.clone(), 0..3usize).prop_map(|(t, c, f)| OpSpec::DeleteSub(t, c, f)),
        6 => (
            t.clone(),
            proptest::collection::vec((0..4usize, 1..3u8, proptest::collection::vec(1..100u32, 0..3)), 0..4),
            proptest::bool::weighted(0.1),
            msg_spec(),
        )
            .prop_map(|(t, r, reuse, m)| OpSpec::Enqueue(t, r, reuse, m)),
        3 => (t.clone(), c.clone(), id.clone(), any::<u16>()).prop_map(|(t, c, i, p)| OpSpec::Sent(t, c, i, p)),
        3 => (t.clone(), c.clone(), id.clone()).prop_map(|(t, c, i)| OpSpec::Released(t, c, i)),
        4 => (t.clone(), c.clone(), id).prop_map(|(t, c, i)| OpSpec::Dequeue(t, c, i)),
        2 => (t.clone(), msg_spec()).prop_map(|(t, m)| OpSpec::PutRetained(t, m)),
        1 => (t.clone(), 0..3usize).prop_map(|(t, x)| OpSpec::DeleteRetained(t, x)),
        2 => (t, c, 0..4u16, any::<bool>()).prop_map(|(t, c, p, d)| OpSpec::Inbound(t, c, p, d)),
        6 => (0..3u8, any::<usize>(), any::<u16>()).prop_map(|(k, n, p)| OpSpec::Live(k, n, p)),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            30 => op_spec().prop_map(Step::Op),
            8 => Just(Step::EndBatch),
            1 => Just(Step::Reopen),
            1 => Just(Step::Compact),
        ],
        0..160,
    )
}

fn tenant_of(i: usize) -> TenantId {
    TenantId::new(["default", "t2"][i])
}

fn build_message(m: &MsgSpec) -> ferrohub_types::Message {
    ferrohub_types::Message {
        topic: TopicName::parse(TOPICS[m.topic]).unwrap(),
        payload: bytes::Bytes::from(m.payload.clone()),
        qos: QoS::from_u8(m.qos).unwrap(),
        retain: m.retain,
        received_at: m.received_at,
        properties: m.props.as_ref().map(|(utf8, exp, ct, cd, up)| {
            std::sync::Arc::new(ferrohub_types::MessageProperties {
                payload_is_utf8: *utf8,
                expires_at: *exp,
                content_type: ct.as_deref().map(Into::into),
                response_topic: ct.as_deref().map(|s| format!("r/{s}").into()),
                correlation_data: cd.clone().map(bytes::Bytes::from),
                user_properties: up
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                    .collect(),
            })
        }),
    }
}

fn build_op(spec: &OpSpec, next_id: &mut u64, model: &RefModel) -> StoreOp {
    let last = *next_id;
    let back = |k: &u64| last.saturating_sub(1 + *k);
    let client = |c: usize| -> std::sync::Arc<str> { ["c0", "c1", "c2", "nobody"][c].into() };
    match spec {
        OpSpec::PutSession(t, c, e, d) => StoreOp::PutSession(SessionRecord {
            tenant: tenant_of(*t),
            client_id: client(*c),
            expiry_secs: *e,
            disconnected_at: *d,
        }),
        OpSpec::DeleteSession(t, c) => StoreOp::DeleteSession {
            tenant: tenant_of(*t),
            client_id: client(*c),
        },
        OpSpec::PutSub(t, c, f, q, b, id) => StoreOp::PutSubscription {
            tenant: tenant_of(*t),
            client_id: client(*c),
            subscription: SubscriptionRecord {
                filter: FILTERS[*f].into(),
                qos: QoS::from_u8(*q).unwrap(),
                no_local: *b,
                retain_as_published: !*b,
                retain_handling: *q,
                subscription_id: *id,
            },
        },
        OpSpec::DeleteSub(t, c, f) => StoreOp::DeleteSubscription {
            tenant: tenant_of(*t),
            client_id: client(*c),
            filter: FILTERS[*f].into(),
        },
        OpSpec::Enqueue(t, recipients, reuse, m) => {
            let id = if *reuse && *next_id > 1 {
                *next_id - 1
            } else {
                *next_id += 1;
                *next_id - 1
            };
            StoreOp::Enqueue {
                tenant: tenant_of(*t),
                message_id: id,
                message: build_message(m),
                recipients: recipients
                    .iter()
                    .map(|(c, q, ids)| QueuedFor {
                        client_id: client(*c),
                        qos: QoS::from_u8(*q).unwrap(),
                        retain: *q == 2,
                        subscription_ids: ids.clone(),
                    })
                    .collect(),
            }
        }
        OpSpec::Sent(t, c, i, p) => StoreOp::Sent {
            tenant: tenant_of(*t),
            client_id: client(*c),
            message_id: back(i),
            packet_id: *p,
        },
        OpSpec::Released(t, c, i) => StoreOp::Released {
            tenant: tenant_of(*t),
            client_id: client(*c),
            message_id: back(i),
        },
        OpSpec::Dequeue(t, c, i) => StoreOp::Dequeue {
            tenant: tenant_of(*t),
            client_id: client(*c),
            message_id: back(i),
        },
        OpSpec::PutRetained(t, m) => StoreOp::PutRetained {
            tenant: tenant_of(*t),
            message: build_message(m),
        },
        OpSpec::DeleteRetained(t, x) => StoreOp::DeleteRetained {
            tenant: tenant_of(*t),
            topic: TopicName::parse(TOPICS[*x]).unwrap(),
        },
        OpSpec::Live(kind, n, p) => {
            let live = model.live_deliveries();
            let (tenant, client_id, message_id) = if live.is_empty() {
                (tenant_of(0), client(0), last)
            } else {
                live[n % live.len()].clone()
            };
            match kind {
                0 => StoreOp::Sent {
                    tenant,
                    client_id,
                    message_id,
                    packet_id: *p,
                },
                1 => StoreOp::Released {
                    tenant,
                    client_id,
                    message_id,
                },
                _ => StoreOp::Dequeue {
                    tenant,
                    client_id,
                    message_id,
                },
            }
        }
        OpSpec::Inbound(t, c, p, done) => {
            if *done {
                StoreOp::InboundQos2Done {
                    tenant: tenant_of(*t),
                    client_id: client(*c),
                    packet_id: *p,
                }
            } else {
                StoreOp::InboundQos2 {
                    tenant: tenant_of(*t),
                    client_id: client(*c),
                    packet_id: *p,
                }
            }
        }
    }
}

async fn run_steps(steps: &[Step]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        fsync: FsyncPolicy::Never,
        compact_after_bytes: 700,
        queue_capacity: 3,
    };
    let mut model = RefModel::default();
    let mut next_id = 1u64;
    let (mut store, rec) = BrokerStore::open(dir.path(), cfg.clone()).unwrap();
    prop_assert_eq!(rec, model.expected());
    let mut batch = Vec::new();
    let mut commits = Vec::new();
    for step in steps {
        match step {
            Step::Op(spec) => {
                let op = build_op(spec, &mut next_id, &model);
                model.apply(&op);
                batch.push(op);
            }
            Step::EndBatch => {
                commits.push(store.submit(std::mem::take(&mut batch)).await.unwrap());
            }
            Step::Compact => {
                commits.push(store.submit(std::mem::take(&mut batch)).await.unwrap());
                store.compact().await.unwrap();
            }
            Step::Reopen => {
                commits.push(store.submit(std::mem::take(&mut batch)).await.unwrap());
                for c in commits.drain(..) {
                    c.await.unwrap();
                }
                store.close().await.unwrap();
                let (s, rec) = BrokerStore::open(dir.path(), cfg.clone()).unwrap();
                prop_assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
                prop_assert_eq!(rec, model.expected());
                store = s;
            }
        }
    }
    commits.push(store.submit(batch).await.unwrap());
    for c in commits {
        c.await.unwrap();
    }
    store.close().await.unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), cfg).unwrap();
    prop_assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    prop_assert_eq!(rec, model.expected());
    store.close().await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_match_the_reference_model(steps in steps()) {
        let rt = runtime();
        rt.block_on(run_steps(&steps))?;
    }
}
