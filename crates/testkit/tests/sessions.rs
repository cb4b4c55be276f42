//! Sessions: clean vs persistent (3.1.1 Clean Session, v5 Clean Start + Session Expiry
//! Interval), Session Present, subscriptions kept, offline queueing of QoS 1/2 (and not QoS 0),
//! session expiry, takeover, redelivery of unacknowledged messages with DUP and the original
//! packet identifiers, QoS 2 state across reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub_proto::mqtt::{
    Disconnect, DisconnectProperties, Packet, ProtocolVersion, PubResponse,
};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use rumqttc::QoS;

fn persistent_v4(hub: &TestHub, id: &str) -> rumqttc::MqttOptions {
    let mut o = v4_opts(hub, id);
    o.set_clean_session(false);
    o
}

fn persistent_v5(hub: &TestHub, id: &str, expiry: u32) -> rumqttc::v5::MqttOptions {
    let mut o = v5_opts(hub, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_keeps_subscriptions_and_queues_qos1_qos2() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("p4");
    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    assert!(
        !c.connack.session_present,
        "first connection: no session yet"
    );
    c.subscribe("s4/#", QoS::ExactlyOnce).await;
    c.disconnect().await;
    wait_connections(&hub, 0).await;

    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("s4/a", QoS::AtMostOnce, false, b"q0-dropped")
        .await;
    publ.publish("s4/a", QoS::AtLeastOnce, false, b"q1").await;
    publ.publish("s4/b", QoS::ExactlyOnce, false, b"q2").await;
    publ.publish("s4/a", QoS::AtMostOnce, false, b"q0-dropped-too")
        .await;
    publ.barrier().await;

    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    assert!(c.connack.session_present, "Session Present after resuming");
    let p = c.recv_publish().await;
    assert_eq!((p.payload.as_ref(), p.qos), (&b"q1"[..], QoS::AtLeastOnce));
    let p = c.recv_publish().await;
    assert_eq!((p.payload.as_ref(), p.qos), (&b"q2"[..], QoS::ExactlyOnce));
    c.expect_no_publish(QUIET).await;

    // The subscription is still there without subscribing again.
    publ.publish("s4/c", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"live");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clean_session_discards_state() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("c4");
    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    c.subscribe("c4/#", QoS::AtLeastOnce).await;
    c.disconnect().await;

    // Clean Session = 1 discards the stored session.
    let mut c = V4::connect(v4_opts(&hub, &id)).await;
    assert!(!c.connack.session_present);
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("c4/x", QoS::AtLeastOnce, false, b"x").await;
    c.expect_no_publish(QUIET).await;
    c.subscribe("c4/#", QoS::AtLeastOnce).await;
    c.disconnect().await;

    // ... and a clean session does not outlive its connection.
    let c = V4::connect(persistent_v4(&hub, &id)).await;
    assert!(!c.connack.session_present);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clean_start_false_with_expiry_resumes() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("p5");
    let mut c = V5::connect(persistent_v5(&hub, &id, 60)).await;
    assert!(!c.connack.session_present);
    c.subscribe("s5/#", m5::QoS::AtLeastOnce).await;
    c.disconnect().await;
    wait_connections(&hub, 0).await;

    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..5 {
        publ.publish(
            "s5/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    publ.publish("s5/t", m5::QoS::AtMostOnce, false, b"qos0")
        .await;
    publ.barrier().await;

    let mut c = V5::connect(persistent_v5(&hub, &id, 60)).await;
    assert!(c.connack.session_present);
    for i in 0..5 {
        let p = c.recv_publish().await;
        assert_eq!(
            p.payload.as_ref(),
            format!("m{i}").as_bytes(),
            "queued messages in order"
        );
    }
    c.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_zero_session_expiry_ends_session_with_connection() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("z5");
    let mut o = v5_opts(&hub, &id);
    o.set_clean_start(false);
    let mut c = V5::connect(o.clone()).await;
    c.subscribe("z5/#", m5::QoS::AtLeastOnce).await;
    c.disconnect().await;
    let c = V5::connect(o).await;
    assert!(
        !c.connack.session_present,
        "expiry 0: session ended with the connection"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_is_queued_offline_only_when_configured() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.queue_qos0_offline = true)
        .await
        .unwrap();
    let id = uid("q0");
    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    c.subscribe("q0/t", QoS::AtMostOnce).await;
    c.disconnect().await;
    wait_connections(&hub, 0).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("q0/t", QoS::AtMostOnce, false, b"kept").await;
    publ.disconnect().await;
    wait_connections(&hub, 0).await;
    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    assert_eq!(c.recv_publish().await.payload.as_ref(), b"kept");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_removes_the_session() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("exp");
    let mut c = V5::connect(persistent_v5(&hub, &id, 1)).await;
    c.subscribe("exp/#", m5::QoS::AtLeastOnce).await;
    let sessions_before = metric(&metrics(&hub).await, "ferrohub_mqtt_sessions").unwrap();
    c.disconnect().await;
    // Gone once the interval has passed.
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v < sessions_before).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let ack = publ
        .publish("exp/t", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    assert_eq!(ack, Some(m5::PubAckReason::NoMatchingSubscribers));
    let mut c = V5::connect(persistent_v5(&hub, &id, 1)).await;
    assert!(!c.connack.session_present);
    c.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_until_its_expiry() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("keep");
    let mut c = V5::connect(persistent_v5(&hub, &id, 3)).await;
    c.subscribe("keep/#", m5::QoS::AtLeastOnce).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = V5::connect(persistent_v5(&hub, &id, 3)).await;
    assert!(
        c.connack.session_present,
        "expiry 3 s: still there after ~1 s"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_capped_and_reported() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_session_expiry_secs = 10)
        .await
        .unwrap();
    let c = V5::connect(persistent_v5(&hub, &uid("cap"), 100)).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(
        props.session_expiry_interval,
        Some(10),
        "CONNACK carries the granted expiry"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_can_shorten_the_session_expiry() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("short");
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    raw_subscribe(&mut raw, 1, "short/#", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect {
        code: 0,
        properties: DisconnectProperties {
            session_expiry_interval: Some(0),
            ..Default::default()
        },
    }))
    .await
    .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    let (_raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(
        !ack.session_present,
        "DISCONNECT with expiry 0 ended the session"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_setting_expiry_after_zero_is_a_protocol_error() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("pe"), |_| {}).await;
    raw.send(&Packet::Disconnect(Disconnect {
        code: 0,
        properties: DisconnectProperties {
            session_expiry_interval: Some(30),
            ..Default::default()
        },
    }))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x82));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_takeover_disconnects_the_first_client_with_0x8e() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("dup");
    let mut first = V5::connect(persistent_v5(&hub, &id, 60)).await;
    first.subscribe("take/#", m5::QoS::AtLeastOnce).await;
    let mut second = V5::connect(persistent_v5(&hub, &id, 60)).await;
    assert!(
        second.connack.session_present,
        "takeover keeps the persistent session"
    );
    let reason = server_disconnect_reason(first.wait_closed(WAIT).await);
    assert_eq!(reason, Some(0x8E), "Session taken over");
    // The second connection owns the session and its subscription.
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("take/x", m5::QoS::AtLeastOnce, false, b"to second")
        .await;
    assert_eq!(second.recv_publish().await.payload.as_ref(), b"to second");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_takeover_closes_the_first_connection() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("dup4");
    let (mut first, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &id, |_| {}).await;
    let mut second = V4::connect(v4_opts(&hub, &id)).await;
    let seen = first.expect_close(WAIT).await.unwrap();
    assert!(
        seen.iter().all(|p| !matches!(p, Packet::Disconnect(_))),
        "no DISCONNECT packets to a 3.1.1 client: {seen:?}"
    );
    second.subscribe("x", QoS::AtMostOnce).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_qos1_is_redelivered_with_dup_after_reconnect() {
    let hub = TestHub::start().await.unwrap();
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let id = uid("redeliver");
        let persistent = |clean: bool| {
            move |c: &mut ferrohub_proto::mqtt::Connect| {
                c.clean_start = clean;
                c.properties.session_expiry_interval = Some(60);
            }
        };
        // Clean Session = 0 / Clean Start = 0 + expiry: a persistent session from the start.
        let (mut raw, _) = raw_connect(hub.mqtt, version, &id, persistent(false)).await;
        raw_subscribe(&mut raw, 1, "redo/t", FQoS::AtLeastOnce).await;
        let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
        publ.publish("redo/t", m5::QoS::AtLeastOnce, false, b"ack me")
            .await;
        let first = raw_recv_publish(&mut raw).await;
        assert!(!first.dup);
        assert_eq!(first.qos, FQoS::AtLeastOnce);
        drop(raw); // no PUBACK

        let (mut raw, ack) = raw_connect(hub.mqtt, version, &id, persistent(false)).await;
        assert!(ack.session_present);
        let again = raw_recv_publish(&mut raw).await;
        assert!(again.dup, "{version:?}: redelivery must set DUP");
        assert_eq!(
            again.packet_id, first.packet_id,
            "original packet identifier"
        );
        assert_eq!(again.payload, first.payload);
        raw.send(&puback(again.packet_id)).await.unwrap();
        raw_expect_silence(&mut raw, QUIET).await;
        drop(raw);

        // Acknowledged: not sent a third time.
        let (mut raw, ack) = raw_connect(hub.mqtt, version, &id, persistent(false)).await;
        assert!(ack.session_present);
        raw_expect_silence(&mut raw, QUIET).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_pubrel_is_resent_after_reconnect() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("rel");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "rel/t", FQoS::ExactlyOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rel/t", m5::QoS::ExactlyOnce, false, b"two")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    raw.send(&Packet::PubRec(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw_wait(&mut raw, "PUBREL", |x| matches!(x, Packet::PubRel(_))).await;
    drop(raw); // no PUBCOMP

    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    match raw.recv(WAIT).await.unwrap() {
        Packet::PubRel(r) => assert_eq!(r.packet_id, p.packet_id),
        other => panic!("expected the PUBREL to be resent, got {other:?}"),
    }
    raw.send(&Packet::PubComp(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_state_survives_reconnect() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("in2/t", m5::QoS::ExactlyOnce).await;
    let id = uid("in2");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw.send(&publish_packet("in2/t", FQoS::ExactlyOnce, 42, b"once"))
        .await
        .unwrap();
    raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
    drop(raw);

    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    // The client resends the PUBLISH with DUP (it never saw a PUBREC? it did; it may still resend).
    let mut again = publish_packet("in2/t", FQoS::ExactlyOnce, 42, b"once");
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    raw.send(&again).await.unwrap();
    raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
    raw.send(&Packet::PubRel(PubResponse {
        packet_id: 42,
        ..Default::default()
    }))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await {
        Packet::PubComp(c) => assert_eq!(c.code, 0, "packet identifier known to the session"),
        _ => unreachable!(),
    }
    assert_eq!(sub.recv_publish().await.payload.as_ref(), b"once");
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_is_delivered_within_the_clients_receive_maximum() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("rm");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.receive_maximum = Some(3);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "rm/t", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    wait_connections(&hub, 0).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..20 {
        publ.publish(
            "rm/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    let mut next = 0;
    while next < 20 {
        let mut window = Vec::new();
        // Exactly 3 (or the rest) arrive, then nothing until we acknowledge.
        for _ in 0..3.min(20 - next) {
            let p = raw_recv_publish(&mut raw).await;
            assert_eq!(p.payload.as_ref(), format!("{next}").as_bytes());
            next += 1;
            window.push(p.packet_id);
        }
        raw_expect_silence(&mut raw, Duration::from_millis(200)).await;
        for pid in window {
            raw.send(&puback(pid)).await.unwrap();
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_sends_inflight_first_then_the_queue_in_order() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("order");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.receive_maximum = Some(2);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "ord/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..6 {
        publ.publish(
            "ord/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    let first = raw_recv_publish(&mut raw).await;
    let second = raw_recv_publish(&mut raw).await;
    drop(raw); // both unacknowledged
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    let r1 = raw_recv_publish(&mut raw).await;
    let r2 = raw_recv_publish(&mut raw).await;
    assert!(r1.dup && r2.dup);
    assert_eq!(
        (r1.packet_id, r1.payload.as_ref()),
        (first.packet_id, &b"0"[..])
    );
    assert_eq!(
        (r2.packet_id, r2.payload.as_ref()),
        (second.packet_id, &b"1"[..])
    );
    raw_expect_silence(&mut raw, Duration::from_millis(200)).await;
    let mut expected = 2;
    let mut window = vec![r1.packet_id, r2.packet_id];
    while expected < 6 {
        for pid in window.drain(..) {
            raw.send(&puback(pid)).await.unwrap();
        }
        for _ in 0..2 {
            let p = raw_recv_publish(&mut raw).await;
            assert!(!p.dup);
            assert_eq!(p.payload, format!("{expected}").into_bytes());
            expected += 1;
            window.push(p.packet_id);
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_respects_the_new_receive_maximum() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("shrink");
    let connect = |clean: bool, rm: u16| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.receive_maximum = Some(rm);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(true, 5)).await;
    raw_subscribe(&mut raw, 1, "shrink/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..5 {
        publ.publish(
            "shrink/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    for _ in 0..5 {
        raw_recv_publish(&mut raw).await;
    }
    drop(raw); // five unacknowledged

    // Reconnect allowing only 2 at a time [MQTT-3.3.4-9] — the resend counts too.
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(false, 2)).await;
    assert!(ack.session_present);
    let a = raw_recv_publish(&mut raw).await;
    let b = raw_recv_publish(&mut raw).await;
    assert!(a.dup && b.dup);
    raw_expect_silence(&mut raw, Duration::from_millis(300)).await;
    let mut got = vec![a.payload.clone(), b.payload.clone()];
    raw.send(&puback(a.packet_id)).await.unwrap();
    raw.send(&puback(b.packet_id)).await.unwrap();
    while got.len() < 5 {
        let p = raw_recv_publish(&mut raw).await;
        raw.send(&puback(p.packet_id)).await.unwrap();
        got.push(p.payload);
    }
    let got: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect();
    assert_eq!(got, vec!["0", "1", "2", "3", "4"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_client_identifier_can_resume_its_session() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, "", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    raw_subscribe(&mut raw, 1, "assigned/t", FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &assigned, |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(
        ack.session_present,
        "the session lives under the assigned identifier"
    );
    assert_eq!(ack.properties.assigned_client_identifier, None);
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("assigned/t", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    assert_eq!(raw_recv_publish(&mut raw).await.payload.as_ref(), b"x");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_counts_from_the_disconnect_and_restarts_on_resume() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("timer");
    let o = persistent_v5(&hub, &id, 3);
    let c = V5::connect(o.clone()).await;
    // Connected for longer than the interval: it only starts counting at the disconnect.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    c.disconnect().await;
    let c = V5::connect(o.clone()).await;
    assert!(
        c.connack.session_present,
        "expiry counts from the disconnect"
    );
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let c = V5::connect(o.clone()).await;
    assert!(c.connack.session_present);
    c.disconnect().await;
    // The timer of the second disconnect (3 s) has passed by now; the latest one has not.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let c = V5::connect(o).await;
    assert!(
        c.connack.session_present,
        "an earlier expiry timer must not end a resumed session"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_expiry_is_configurable() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.v3_persistent_session_expiry_secs = 1)
        .await
        .unwrap();
    let id = uid("v3exp");
    let mut c = V4::connect(persistent_v4(&hub, &id)).await;
    c.subscribe("v3exp/t", QoS::AtLeastOnce).await;
    let before = metric(&metrics(&hub).await, "ferrohub_mqtt_sessions").unwrap();
    c.disconnect().await;
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v < before).await;
    let c = V4::connect(persistent_v4(&hub, &id)).await;
    assert!(!c.connack.session_present);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_resends_what_the_old_connection_left_unacknowledged() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("handover");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
        }
    };
    let (mut old, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut old, 1, "handover/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("handover/t", m5::QoS::AtLeastOnce, false, b"in flight")
        .await;
    let first = raw_recv_publish(&mut old).await;
    // Take over while the old connection is still open and has not acknowledged.
    let (mut new, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    assert!(ack.session_present);
    assert_eq!(raw_expect_disconnect(&mut old, WAIT).await, Some(0x8E));
    let again = raw_recv_publish(&mut new).await;
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(again.payload.as_ref(), b"in flight");
    new.send(&puback(again.packet_id)).await.unwrap();
    publ.publish("handover/t", m5::QoS::AtLeastOnce, false, b"next")
        .await;
    assert_eq!(raw_recv_publish(&mut new).await.payload.as_ref(), b"next");
    hub.stop().await;
}
