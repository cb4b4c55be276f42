//! The twin and command services over the embedded store (no broker): versions, conflicts,
//! history, fleet queries, grouped counts, persistence across reopen, queued-command states.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_twins::commands::{CommandResponse, CommandState, Commands, CommandsConfig};
use ferrohub_twins::document::Section;
use ferrohub_twins::link::{BoxFuture, Delivery, DeviceLink};
use ferrohub_twins::service::TwinWrite;
use ferrohub_twins::store::{SqliteTwinStore, StoreConfig, TwinKey};
use ferrohub_twins::{TwinError, Twins, TwinsConfig};
use ferrohub_types::MessageProperties;
use parking_lot::Mutex;
use serde_json::{Value, json};

fn key(device: &str, name: &str) -> TwinKey {
    TwinKey {
        tenant: Arc::from("t1"),
        device: Arc::from(device),
        name: Arc::from(name),
    }
}

fn write(section: Section, patch: Value) -> TwinWrite {
    TwinWrite {
        section,
        patch: Some(patch),
        expected_version: None,
        client_token: None,
        actor: "operator:test".into(),
        rejections: Vec::new(),
        want_documents: false,
    }
}

fn open(path: Option<std::path::PathBuf>) -> Arc<SqliteTwinStore> {
    Arc::new(
        SqliteTwinStore::open(&StoreConfig {
            path,
            ..StoreConfig::default()
        })
        .unwrap(),
    )
}

/// (tenant, topic, payload, properties) of one publication.
type Sent = (String, String, Bytes, Option<MessageProperties>);

/// Records what the services publish; online devices are listed.
#[derive(Default)]
struct FakeLink {
    sent: Mutex<Vec<Sent>>,
    online: AtomicBool,
}

impl DeviceLink for FakeLink {
    fn publish<'a>(
        &'a self,
        tenant: &'a str,
        topic: String,
        payload: Bytes,
        properties: Option<MessageProperties>,
    ) -> BoxFuture<'a, Delivery> {
        self.sent
            .lock()
            .push((tenant.to_string(), topic, payload, properties));
        Box::pin(async {
            Delivery {
                matched: true,
                refused: false,
            }
        })
    }

    fn is_online(&self, _tenant: &str, _device: &str) -> bool {
        self.online.load(Ordering::Relaxed)
    }
}

#[tokio::test]
async fn versions_conflicts_delta_and_history() {
    let twins = Twins::new(open(None), TwinsConfig::default());
    let link = Arc::new(FakeLink::default());
    twins.set_link(link.clone());
    let k = key("d1", "");
    // A fresh default twin reads as version 0.
    let v = twins.operator_view(k.clone()).await.unwrap();
    assert_eq!(v["version"], 0);
    let a = twins
        .update(
            k.clone(),
            write(Section::Desired, json!({"rate": 10, "mode": "eco"})),
        )
        .await
        .unwrap();
    assert_eq!(a.version, 1);
    assert_eq!(
        a.delta,
        Some(
            json!({"rate": 10, "mode": "eco"})
                .as_object()
                .cloned()
                .unwrap()
        )
    );
    // The delta went to the device (published by the ordered delta publisher).
    for _ in 0..200 {
        if !link.sent.lock().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = link.sent.lock().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, "$devices/d1/twin/delta");
    let body: Value = serde_json::from_slice(&sent[0].2).unwrap();
    assert_eq!(body["delta"], json!({"rate": 10, "mode": "eco"}));
    // Reported catches up on one key.
    let mut w = write(Section::Reported, json!({"rate": 10}));
    w.actor = "device:d1".into();
    twins.update(k.clone(), w).await.unwrap();
    let v = twins.operator_view(k.clone()).await.unwrap();
    assert_eq!(v["delta"], json!({"mode": "eco"}));
    assert_eq!(v["acks"]["rate"]["status"], "applied");
    assert_eq!(v["acks"]["mode"]["status"], "pending");
    // Optimistic concurrency.
    let mut w = write(Section::Desired, json!({"mode": "max"}));
    w.expected_version = Some(1);
    let err = twins.update(k.clone(), w).await.unwrap_err();
    assert!(
        matches!(
            err,
            TwinError::Conflict {
                expected: 1,
                current: 2
            }
        ),
        "{err}"
    );
    assert_eq!(err.status(), 409);
    let mut w = write(Section::Desired, json!({"mode": "max"}));
    w.expected_version = Some(2);
    assert_eq!(twins.update(k.clone(), w).await.unwrap().version, 3);
    // Tags do not reach the device view.
    twins
        .update(k.clone(), write(Section::Tags, json!({"site": "berlin"})))
        .await
        .unwrap();
    let dv = twins.device_view(k.clone()).await.unwrap();
    assert!(dv.get("tags").is_none());
    assert!(!dv.to_string().contains("berlin"));
    // A refused patch changes nothing and is not in the history.
    let err = twins
        .update(k.clone(), write(Section::Desired, json!({"$bad": 1})))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    let h = twins.history(k.clone(), 0, 100).await.unwrap();
    let versions: Vec<u64> = h.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert_eq!(h[1].actor, "device:d1");
    assert_eq!(h[1].section, "reported");
    assert_eq!(h[3].patch, json!({"site": "berlin"}));
    assert_eq!(twins.history(k.clone(), 2, 100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn named_twins_are_limited_and_missing_ones_are_404() {
    let twins = Twins::new(
        open(None),
        TwinsConfig {
            max_named_twins: 2,
            ..TwinsConfig::default()
        },
    );
    let err = twins.operator_view(key("d1", "fw")).await.unwrap_err();
    assert_eq!(err.status(), 404);
    for n in ["a", "b"] {
        twins
            .update(key("d1", n), write(Section::Desired, json!({"x": 1})))
            .await
            .unwrap();
    }
    let err = twins
        .update(key("d1", "c"), write(Section::Desired, json!({"x": 1})))
        .await
        .unwrap_err();
    assert!(matches!(err, TwinError::TooManyTwins { limit: 2 }));
    // A refused creation leaves no twin behind.
    assert_eq!(
        twins
            .operator_view(key("d1", "c"))
            .await
            .unwrap_err()
            .status(),
        404
    );
    let mut names = twins.names("t1", "d1").await.unwrap();
    names.sort();
    assert_eq!(names, vec!["a", "b"]);
}

#[tokio::test]
async fn fleet_query_and_grouped_counts() {
    let twins = Twins::new(open(None), TwinsConfig::default());
    for i in 0..30 {
        let k = key(&format!("dev-{i:02}"), "");
        twins
            .update(
                k.clone(),
                write(Section::Desired, json!({"firmware": "2.0"})),
            )
            .await
            .unwrap();
        let fw = if i % 3 == 0 { "2.0" } else { "1.9" };
        twins
            .update(
                k,
                write(
                    Section::Reported,
                    json!({"firmware": fw, "health": {"battery": i * 3}}),
                ),
            )
            .await
            .unwrap();
    }
    // Other tenants never show up.
    twins
        .update(
            TwinKey {
                tenant: Arc::from("t2"),
                device: Arc::from("other"),
                name: Arc::from(""),
            },
            write(Section::Reported, json!({"firmware": "1.9"})),
        )
        .await
        .unwrap();
    let page = twins
        .query(
            "t1",
            Some("reported.firmware != desired.firmware"),
            None,
            15,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 15);
    let next = page.next.clone().unwrap();
    let page2 = twins
        .query(
            "t1",
            Some("reported.firmware != desired.firmware"),
            Some(&next),
            15,
        )
        .await
        .unwrap();
    assert_eq!(page2.items.len(), 5);
    assert!(page2.next.is_none());
    let low = twins
        .query("t1", Some("reported.health.battery < 10"), None, 100)
        .await
        .unwrap();
    assert_eq!(low.items.len(), 4); // 0, 3, 6, 9
    let counts = twins
        .counts("t1", "reported.firmware", None, 10)
        .await
        .unwrap();
    assert_eq!(counts.len(), 2);
    assert_eq!(
        (counts[0].value.clone(), counts[0].count),
        (json!("1.9"), 20)
    );
    assert_eq!(
        (counts[1].value.clone(), counts[1].count),
        (json!("2.0"), 10)
    );
    let err = twins
        .query("t1", Some("reported.x = "), None, 10)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(twins.query("t1", None, Some("zz"), 10).await.is_err());
}

#[tokio::test]
async fn writes_survive_reopen_and_purge_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("twins.db");
    {
        let twins = Twins::new(open(Some(path.clone())), TwinsConfig::default());
        for v in 0..5 {
            twins
                .update(key("d1", ""), write(Section::Reported, json!({"v": v})))
                .await
                .unwrap();
        }
        twins
            .update(key("d2", ""), write(Section::Reported, json!({"v": 1})))
            .await
            .unwrap();
    }
    let twins = Twins::new(open(Some(path.clone())), TwinsConfig::default());
    let v = twins.operator_view(key("d1", "")).await.unwrap();
    assert_eq!(v["version"], 5);
    assert_eq!(v["reported"], json!({"v": 4}));
    twins.purge("t1", Some("d1")).await.unwrap();
    assert_eq!(
        twins.operator_view(key("d1", "")).await.unwrap()["version"],
        0
    );
    assert!(
        twins
            .history(key("d1", ""), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        twins.operator_view(key("d2", "")).await.unwrap()["version"],
        1
    );
}

#[tokio::test]
async fn ordered_writes_apply_in_order() {
    let twins = Twins::new(open(None), TwinsConfig::default());
    let mut pending = Vec::new();
    for v in 0..200 {
        pending.push(
            twins
                .enqueue(key("d1", ""), write(Section::Reported, json!({"seq": v})))
                .await
                .unwrap(),
        );
    }
    let mut last = 0;
    for p in pending {
        let a = p.await.unwrap().unwrap();
        assert!(a.version > last);
        last = a.version;
    }
    let v = twins.operator_view(key("d1", "")).await.unwrap();
    assert_eq!(v["reported"]["seq"], 199);
    assert_eq!(v["version"], 200);
}

#[tokio::test]
async fn queued_command_lifecycle() {
    let store = open(None);
    let commands = Commands::new(
        store,
        CommandsConfig {
            max_queued_per_device: 3,
            max_attempts: 2,
            ..CommandsConfig::default()
        },
    );
    let link = Arc::new(FakeLink::default());
    commands.set_link(link.clone());
    // Offline: queued, nothing sent; a direct command is refused at once.
    let c1 = commands
        .enqueue(
            "t1",
            "d1",
            "reboot",
            Bytes::from_static(b"{\"delay\":5}"),
            None,
            "operator:x",
        )
        .await
        .unwrap();
    assert_eq!(c1.state, CommandState::Queued);
    assert_eq!(c1.payload, json!({"delay": 5}));
    let err = commands
        .direct("t1", "d1", "ping", Bytes::new(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "device_offline");
    let c2 = commands
        .enqueue(
            "t1",
            "d1",
            "ping",
            Bytes::new(),
            Some(Duration::from_secs(1)),
            "operator:x",
        )
        .await
        .unwrap();
    commands
        .enqueue("t1", "d1", "ping", Bytes::new(), None, "operator:x")
        .await
        .unwrap();
    let err = commands
        .enqueue("t1", "d1", "ping", Bytes::new(), None, "operator:x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "queue_full");
    assert!(link.sent.lock().is_empty());
    // The device comes online: open commands are sent in order; the expired one is not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    link.online.store(true, Ordering::Relaxed);
    assert_eq!(commands.send_pending("t1", "d1", true).await.unwrap(), 2);
    let sent = link.sent.lock().clone();
    assert_eq!(
        sent[0].1,
        format!("$devices/d1/commands/req/reboot/{}", c1.id)
    );
    let props = sent[0].3.clone().unwrap();
    assert_eq!(
        props.response_topic.as_deref(),
        Some(format!("$devices/d1/commands/res/{}", c1.id).as_str())
    );
    assert_eq!(props.correlation_data.as_deref(), Some(c1.id.as_bytes()));
    assert_eq!(
        commands.get("t1", "d1", &c2.id).await.unwrap().state,
        CommandState::Expired
    );
    let got = commands.get("t1", "d1", &c1.id).await.unwrap();
    assert_eq!((got.state, got.attempts), (CommandState::Sent, 1));
    // Delivered (PUBACK), then answered.
    commands
        .on_delivered(
            "t1",
            "d1",
            &format!("$devices/d1/commands/req/reboot/{}", c1.id),
        )
        .await;
    assert_eq!(
        commands.get("t1", "d1", &c1.id).await.unwrap().state,
        CommandState::Delivered
    );
    // Another device cannot answer it.
    let resp = CommandResponse {
        status: 200,
        payload: Bytes::from_static(b"{\"ok\":true}"),
    };
    assert!(
        !commands
            .on_response("t1", "d2", &c1.id, resp.clone())
            .await
            .unwrap()
    );
    assert!(
        commands
            .on_response("t1", "d1", &c1.id, resp)
            .await
            .unwrap()
    );
    let done = commands.get("t1", "d1", &c1.id).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.status, Some(200));
    assert_eq!(done.response, Some(json!({"ok": true})));
    // Resent on each fresh session until the attempts are used up, then failed.
    let list = commands
        .list("t1", "d1", Some(CommandState::Sent), 10)
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    let c3 = list[0].id.clone();
    assert_eq!(commands.send_pending("t1", "d1", true).await.unwrap(), 1);
    assert_eq!(commands.get("t1", "d1", &c3).await.unwrap().attempts, 2);
    assert_eq!(commands.send_pending("t1", "d1", true).await.unwrap(), 0);
    let failed = commands.get("t1", "d1", &c3).await.unwrap();
    assert_eq!(failed.state, CommandState::Failed);
    // Cancelling a finished command is refused.
    assert!(commands.cancel("t1", "d1", &c3).await.is_err());
    assert_eq!(commands.list("t1", "d1", None, 10).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_repeated_rejection_changes_nothing_and_writes_no_history() {
    let twins = Twins::new(open(None), TwinsConfig::default());
    let k = key("d1", "");
    twins
        .update(k.clone(), write(Section::Desired, json!({"rate": 10})))
        .await
        .unwrap();
    let reject = || TwinWrite {
        section: Section::Reported,
        patch: None,
        expected_version: None,
        client_token: None,
        actor: "device:d1".into(),
        rejections: vec![("rate".into(), "too fast".into())],
        want_documents: false,
    };
    let a = twins.update(k.clone(), reject()).await.unwrap();
    assert!(a.changed);
    assert_eq!(a.version, 2);
    twins
        .update(k.clone(), write(Section::Tags, json!({"site": "x"})))
        .await
        .unwrap();
    let again = twins.update(k.clone(), reject()).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.version, 3);
    let h = twins.history(k, 0, 10).await.unwrap();
    let got: Vec<(u64, &str)> = h.iter().map(|e| (e.version, e.actor.as_str())).collect();
    assert_eq!(
        got,
        vec![(1, "operator:test"), (2, "device:d1"), (3, "operator:test")]
    );
}

#[tokio::test]
async fn a_patch_larger_than_a_section_is_refused_even_if_it_deletes() {
    let twins = Twins::new(open(None), TwinsConfig::default());
    let deletions: serde_json::Map<String, Value> = (0..2000)
        .map(|i| (format!("absent-key-number-{i:06}"), Value::Null))
        .collect();
    let err = twins
        .update(
            key("d1", ""),
            write(Section::Reported, Value::Object(deletions)),
        )
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (413, "too_large"), "{err}");
    assert!(err.to_string().contains("twins.max_section_bytes"));
}

#[tokio::test]
async fn an_abandoned_direct_command_leaves_no_waiter() {
    let commands = Commands::new(open(None), CommandsConfig::default());
    let link = Arc::new(FakeLink::default());
    link.online.store(true, Ordering::Relaxed);
    commands.set_link(link.clone());
    let c = commands.clone();
    let call = tokio::spawn(async move {
        c.direct("t1", "d1", "ping", Bytes::new(), Duration::from_secs(60))
            .await
    });
    for _ in 0..200 {
        if commands.waiting() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(commands.waiting(), 1);
    // The HTTP client goes away: the request future is dropped.
    call.abort();
    let _ = call.await;
    assert_eq!(commands.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_run_while_the_writer_writes_without_errors() {
    // In memory (a shared-cache database), readers must not trip over the writer's locks.
    scans_during_writes(open(None)).await;
    // On disk (WAL), neither.
    let dir = tempfile::tempdir().unwrap();
    scans_during_writes(open(Some(dir.path().join("twins.db")))).await;
}

async fn scans_during_writes(store: Arc<SqliteTwinStore>) {
    let twins = Twins::new(store, TwinsConfig::default());
    let writer = {
        let twins = twins.clone();
        tokio::spawn(async move {
            for i in 0..3000u64 {
                twins
                    .update(
                        key(&format!("d{}", i % 50), ""),
                        write(Section::Reported, json!({"n": i})),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut scans = 0;
    while !writer.is_finished() {
        twins.names("t1", "d1").await.unwrap();
        twins
            .query("t1", Some("reported.n > 10"), None, 10)
            .await
            .unwrap();
        twins.history(key("d2", ""), 0, 10).await.unwrap();
        scans += 1;
    }
    writer.await.unwrap();
    assert!(scans > 0);
}
