//! Hub lifecycle: graceful shutdown (v5 clients get DISCONNECT 0x8B before the socket closes)
//! and durability across an in-process restart on the same data directory (persistent sessions,
//! their subscriptions and queued QoS 1/2 messages, in-flight QoS 2 state, retained messages).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub_proto::mqtt::{Connect, Disconnect, Packet, ProtocolVersion, PubResponse};
use ferrohub_testkit::{TestHub, test_config};
use ferrohub_types::QoS as FQoS;

/// Stops `hub` gracefully and starts a new one on the same data directory.
/// The returned directory (if any) must be kept alive by the caller.
async fn restart(hub: TestHub) -> (TestHub, Option<tempfile::TempDir>) {
    restart_with(hub, |_| {}).await
}

/// [`restart`] with the test configuration adjusted by `f`.
async fn restart_with(
    hub: TestHub,
    f: impl FnOnce(&mut ferrohub::config::HubConfig),
) -> (TestHub, Option<tempfile::TempDir>) {
    let path = hub.data_dir.clone();
    let dir = tokio::time::timeout(Duration::from_secs(10), hub.stop())
        .await
        .expect("graceful shutdown took more than 10 s");
    let mut cfg = test_config(path);
    f(&mut cfg);
    let hub = TestHub::start_config(cfg)
        .await
        .expect("restart on the same data directory");
    (hub, dir)
}

fn persistent(clean: bool) -> impl FnOnce(&mut Connect) {
    move |c: &mut Connect| {
        c.clean_start = clean;
        c.properties.session_expiry_interval = Some(300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sends_server_shutting_down() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw5, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw5"), |_| {}).await;
    let (mut raw3, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("raw3"), |_| {}).await;
    let mut client5 = V5::connect(v5_opts(&hub, &uid("rumqttc5"))).await;
    let mqtt = hub.mqtt;
    let stopping = tokio::spawn(hub.stop());
    assert_eq!(raw_expect_disconnect(&mut raw5, WAIT).await, Some(0x8B));
    let seen = raw3.expect_close(WAIT).await.unwrap();
    assert!(seen.is_empty(), "no DISCONNECT to a 3.1.1 client: {seen:?}");
    assert_eq!(
        server_disconnect_reason(client5.wait_closed(WAIT).await),
        Some(0x8B)
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown took more than 10 s")
        .unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(mqtt).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("durable");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "dur/#", FQoS::ExactlyOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    wait_connections(&hub, 0).await;

    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..5 {
        let qos = if i % 2 == 0 {
            m5::QoS::AtLeastOnce
        } else {
            m5::QoS::ExactlyOnce
        };
        let ack = publ
            .publish("dur/t", qos, false, format!("m{i}").as_bytes())
            .await;
        assert_eq!(ack, Some(m5::PubAckReason::Success));
    }
    publ.disconnect().await;

    let (hub, _dir) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present, "session restored after restart");
    let mut received = Vec::new();
    for i in 0..5 {
        let p = raw_recv_publish(&mut raw).await;
        assert_eq!(p.payload, format!("m{i}").into_bytes(), "message {i}");
        let expected = if i % 2 == 0 {
            FQoS::AtLeastOnce
        } else {
            FQoS::ExactlyOnce
        };
        assert_eq!(p.qos, expected);
        received.push(p);
    }
    let mut releases = 0;
    for p in &received {
        if p.qos == FQoS::AtLeastOnce {
            raw.send(&puback(p.packet_id)).await.unwrap();
        } else {
            raw.send(&Packet::PubRec(PubResponse {
                packet_id: p.packet_id,
                ..Default::default()
            }))
            .await
            .unwrap();
            releases += 1;
        }
    }
    for _ in 0..releases {
        match raw.recv(WAIT).await.unwrap() {
            Packet::PubRel(r) => raw
                .send(&Packet::PubComp(PubResponse {
                    packet_id: r.packet_id,
                    ..Default::default()
                }))
                .await
                .unwrap(),
            other => panic!("expected PUBREL, got {other:?}"),
        }
    }
    raw_expect_silence(&mut raw, QUIET).await;
    // The restored subscription routes new messages too.
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub2"))).await;
    publ.publish("dur/new", m5::QoS::AtLeastOnce, false, b"after")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.payload.as_ref(), b"after");
    raw.send(&puback(p.packet_id)).await.unwrap();
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    wait_connections(&hub, 1).await;

    // Acknowledged messages are gone for good: a second restart delivers nothing.
    drop(publ);
    let (hub, _dir2) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_subscriptions_queue_messages_published_after_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("v3durable");
    let mut o = v4_opts(&hub, &id);
    o.set_clean_session(false);
    let mut c = V4::connect(o).await;
    c.subscribe("dur3/t", rumqttc::QoS::AtLeastOnce).await;
    c.disconnect().await;
    let (hub, _dir) = restart(hub).await;
    // Published while the restored session is still offline.
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish(
        "dur3/t",
        rumqttc::QoS::AtLeastOnce,
        false,
        b"queued after restart",
    )
    .await;
    let mut o = v4_opts(&hub, &id);
    o.set_clean_session(false);
    let mut c = V4::connect(o).await;
    assert!(c.connack.session_present);
    assert_eq!(
        c.recv_publish().await.payload.as_ref(),
        b"queued after restart"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.sys_interval_secs = 0)
        .await
        .unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rdur/a", m5::QoS::AtLeastOnce, true, b"a1")
        .await;
    publ.publish("rdur/a", m5::QoS::AtLeastOnce, true, b"a2")
        .await;
    publ.publish("rdur/b", m5::QoS::AtMostOnce, true, b"b")
        .await;
    publ.publish("rdur/gone", m5::QoS::AtLeastOnce, true, b"x")
        .await;
    publ.publish("rdur/gone", m5::QoS::AtLeastOnce, true, b"")
        .await;
    let props = m5::PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publ.publish_props("rdur/props", m5::QoS::AtLeastOnce, true, b"p", Some(props))
        .await;
    publ.barrier().await;
    drop(publ);
    let (hub, _dir) = restart_with(hub, |cfg| cfg.mqtt.sys_interval_secs = 0).await;
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("rdur/#", m5::QoS::AtLeastOnce).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        assert!(p.retain);
        if topic5(&p) == "rdur/props" {
            let props = p.properties.clone().unwrap_or_default();
            assert_eq!(props.content_type.as_deref(), Some("text/plain"));
            assert_eq!(
                props.user_properties,
                vec![("k".to_string(), "v".to_string())]
            );
        }
        got.push((topic5(&p), String::from_utf8(p.payload.to_vec()).unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rdur/a".to_string(), "a2".to_string()),
            ("rdur/b".to_string(), "b".to_string()),
            ("rdur/props".to_string(), "p".to_string()),
        ]
    );
    sub.expect_no_publish(QUIET).await;
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_retained_messages"), Some(3.0));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_qos2_survives_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("q2");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "dur2/#", FQoS::ExactlyOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("dur2/rel", m5::QoS::ExactlyOnce, false, b"released")
        .await;
    publ.publish("dur2/unrec", m5::QoS::ExactlyOnce, false, b"unreceived")
        .await;
    // First: PUBREC sent, PUBREL received, no PUBCOMP. Second: no PUBREC.
    let p1 = raw_recv_publish(&mut raw).await;
    let p2 = raw_recv_publish(&mut raw).await;
    assert_eq!(p1.payload.as_ref(), b"released");
    raw.send(&Packet::PubRec(PubResponse {
        packet_id: p1.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw_wait(&mut raw, "PUBREL", |x| matches!(x, Packet::PubRel(_))).await;
    drop(raw);
    drop(publ);
    wait_connections(&hub, 0).await;

    let (hub, _dir) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    let mut saw_pubrel = false;
    let mut saw_publish = false;
    for _ in 0..2 {
        match raw.recv(WAIT).await.unwrap() {
            Packet::PubRel(r) => {
                assert_eq!(
                    r.packet_id, p1.packet_id,
                    "PUBREL with the original packet identifier"
                );
                saw_pubrel = true;
                raw.send(&Packet::PubComp(PubResponse {
                    packet_id: r.packet_id,
                    ..Default::default()
                }))
                .await
                .unwrap();
            }
            Packet::Publish(p) => {
                assert_eq!(p.payload.as_ref(), b"unreceived");
                assert_eq!(p.packet_id, p2.packet_id, "original packet identifier");
                assert!(p.dup, "re-delivery sets DUP");
                saw_publish = true;
                raw.send(&Packet::PubRec(PubResponse {
                    packet_id: p.packet_id,
                    ..Default::default()
                }))
                .await
                .unwrap();
                raw_wait(&mut raw, "PUBREL", |x| matches!(x, Packet::PubRel(_))).await;
                raw.send(&Packet::PubComp(PubResponse {
                    packet_id: p.packet_id,
                    ..Default::default()
                }))
                .await
                .unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_pubrel && saw_publish);
    // "released" must not be delivered again as a new PUBLISH.
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos1_is_resent_with_dup_after_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("q1");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "dur1/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("dur1/t", m5::QoS::AtLeastOnce, false, b"unacked")
        .await;
    let first = raw_recv_publish(&mut raw).await;
    drop(raw);
    drop(publ);
    wait_connections(&hub, 0).await;
    let (hub, _dir) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    let again = raw_recv_publish(&mut raw).await;
    assert_eq!(again.payload.as_ref(), b"unacked");
    assert!(
        again.dup,
        "[MQTT-4.4.0-1]: resent unacknowledged PUBLISH has DUP=1"
    );
    assert_eq!(
        again.packet_id, first.packet_id,
        "[MQTT-4.4.0-1]: original packet identifier"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_continues_after_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("short");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.properties.session_expiry_interval = Some(1);
    })
    .await;
    raw_subscribe(&mut raw, 1, "short/t", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    let (hub, _dir) = restart(hub).await;
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v == 0.0).await;
    let (_raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(1);
    })
    .await;
    assert!(!ack.session_present);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_state_survives_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("in2");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw.send(&publish_packet("din2/t", FQoS::ExactlyOnce, 9, b"once"))
        .await
        .unwrap();
    raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
    drop(raw);
    wait_connections(&hub, 0).await;
    let (hub, _dir) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    raw.send(&Packet::PubRel(PubResponse {
        packet_id: 9,
        ..Default::default()
    }))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await {
        Packet::PubComp(c) => assert_eq!(c.code, 0, "packet identifier 9 must still be known"),
        _ => unreachable!(),
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_survive_a_restart() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.sys_interval_secs = 0)
        .await
        .unwrap();
    let id = uid("opts");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw.send(&Packet::Subscribe(ferrohub_proto::mqtt::Subscribe {
        packet_id: 1,
        subscription_identifier: Some(42),
        user_properties: Vec::new(),
        filters: vec![
            ferrohub_proto::mqtt::SubscribeFilter {
                filter: "opt/nl".into(),
                options: ferrohub_proto::mqtt::SubscriptionOptions {
                    qos: FQoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 0,
                },
            },
            ferrohub_proto::mqtt::SubscribeFilter {
                filter: "$share/grp/opt/shared".into(),
                options: ferrohub_proto::mqtt::SubscriptionOptions {
                    qos: FQoS::AtMostOnce,
                    ..Default::default()
                },
            },
        ],
    }))
    .await
    .unwrap();
    match raw_wait(&mut raw, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await {
        Packet::SubAck(s) => assert_eq!(s.codes, vec![1, 0]),
        _ => unreachable!(),
    }
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();

    let (hub, _dir) = restart_with(hub, |cfg| cfg.mqtt.sys_interval_secs = 0).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    // No Local still applies to our own publications ...
    let mut own = publish_packet("opt/nl", FQoS::AtLeastOnce, 7, b"own");
    if let Packet::Publish(p) = &mut own {
        p.retain = true;
    }
    raw.send(&own).await.unwrap();
    match raw.recv(WAIT).await.unwrap() {
        Packet::PubAck(a) => assert_eq!(a.packet_id, 7),
        other => panic!("No Local lost in the restart? got {other:?}"),
    }
    raw_expect_silence(&mut raw, Duration::from_millis(300)).await;
    // ... others' come with the subscription identifier and the retain flag as published.
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("opt/nl", m5::QoS::AtLeastOnce, true, b"theirs")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.payload.as_ref(), b"theirs");
    assert_eq!(p.properties.subscription_identifiers, vec![42]);
    assert!(p.retain, "Retain As Published restored");
    raw.send(&puback(p.packet_id)).await.unwrap();
    // The shared subscription is restored too, at its QoS.
    publ.publish("opt/shared", m5::QoS::AtLeastOnce, false, b"shared")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.payload.as_ref(), b"shared");
    assert_eq!(p.qos, FQoS::AtMostOnce);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_retained_delivery_survives_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rdeliv/t", m5::QoS::AtLeastOnce, true, b"retained")
        .await;
    drop(publ);
    let id = uid("rd");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    let (_, mut early) = raw_subscribe_collect(&mut raw, 1, "rdeliv/t", FQoS::AtLeastOnce).await;
    let first = match early.pop() {
        Some(p) => p,
        None => raw_recv_publish(&mut raw).await,
    };
    assert!(first.retain);
    drop(raw); // never acknowledged: part of the session state [MQTT-4.1.0-1]
    wait_connections(&hub, 0).await;
    let (hub, _dir) = restart(hub).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    let again = raw_recv_publish(&mut raw).await;
    assert_eq!(again.payload.as_ref(), b"retained");
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_with_fsync_always() {
    let hub = TestHub::start_with(|cfg| cfg.storage.fsync = ferrohub::config::FsyncMode::Always)
        .await
        .unwrap();
    let id = uid("fsync");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "fsync/t", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    wait_connections(&hub, 0).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..3 {
        publ.publish(
            "fsync/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    publ.publish("fsync/r", m5::QoS::AtLeastOnce, true, b"kept")
        .await;
    drop(publ);
    let (hub, _dir) = restart_with(hub, |cfg| {
        cfg.storage.fsync = ferrohub::config::FsyncMode::Always;
    })
    .await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    for i in 0..3 {
        let p = raw_recv_publish(&mut raw).await;
        assert_eq!(p.payload, format!("{i}").into_bytes());
        raw.send(&puback(p.packet_id)).await.unwrap();
    }
    let (_, mut early) = raw_subscribe_collect(&mut raw, 2, "fsync/r", FQoS::AtLeastOnce).await;
    let p = match early.pop() {
        Some(p) => p,
        None => raw_recv_publish(&mut raw).await,
    };
    assert!(p.retain);
    assert_eq!(p.payload.as_ref(), b"kept");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistence_sessions_live_in_memory_only() {
    let hub = TestHub::start_with(|cfg| cfg.storage.persistence = false)
        .await
        .unwrap();
    let id = uid("mem");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "mem/t", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    wait_connections(&hub, 0).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("mem/t", m5::QoS::AtLeastOnce, false, b"in memory")
        .await;
    publ.publish("mem/r", m5::QoS::AtLeastOnce, true, b"retained")
        .await;
    drop(publ);
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(
        ack.session_present,
        "persistent sessions work without a disk"
    );
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.payload.as_ref(), b"in memory");
    raw.send(&puback(p.packet_id)).await.unwrap();
    drop(raw);
    let (hub, _dir) = restart_with(hub, |cfg| cfg.storage.persistence = false).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(
        !ack.session_present,
        "nothing survives a restart without persistence"
    );
    raw_subscribe(&mut raw, 1, "mem/r", FQoS::AtLeastOnce).await;
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_a_client_that_does_not_read() {
    let hub = TestHub::start().await.unwrap();
    let (mut stuck, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("stuck"), |_| {}).await;
    raw_subscribe(&mut stuck, 1, "stuck/t", FQoS::AtMostOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    // Far more than socket buffers hold; the stuck client never reads.
    for _ in 0..40 {
        publ.publish("stuck/t", m5::QoS::AtMostOnce, false, &[0u8; 64 * 1024])
            .await;
    }
    publ.barrier().await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), hub.stop())
        .await
        .expect("shutdown hung on a client that does not read");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    drop(stuck);
}

/// A lone shared-subscription member that drops its connection keeps its queued messages (nobody
/// else in the group can take them), and keeps them durably: they are delivered after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_shared_messages_kept_by_a_lone_member_survive_a_restart() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("lone");
    let (mut member, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        persistent(true)(c);
        c.properties.receive_maximum = Some(1);
    })
    .await;
    raw_subscribe(&mut member, 1, "$share/g/lone/t", FQoS::AtLeastOnce).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    for i in 0..3u8 {
        publ.publish("lone/t", rumqttc::QoS::AtLeastOnce, false, &[i])
            .await;
    }
    // One delivery in flight (Receive Maximum 1), two queued; then the socket just drops.
    assert_eq!(raw_recv_publish(&mut member).await.payload.as_ref(), &[0]);
    drop(member);
    wait_connections(&hub, 1).await;
    let (hub, _dir) = restart(hub).await;
    let (mut member, ack) =
        raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = raw_recv_publish(&mut member).await;
        got.push(p.payload[0]);
        member.send(&puback(p.packet_id)).await.unwrap();
    }
    got.sort();
    assert_eq!(got, vec![0, 1, 2]);
    hub.stop().await;
}
