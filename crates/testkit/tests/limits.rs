//! Limits: CONNECT timeout, keep-alive enforcement (and Server Keep Alive), max_connections,
//! client identifier length and charset, topic length and levels, the session queue overflow
//! policy with its metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrohub_adapters::mqtt::ClientIdCharset;
use ferrohub_proto::mqtt::{Disconnect, Packet, ProtocolVersion};
use ferrohub_testkit::{RawClient, TestHub};
use ferrohub_types::QoS as FQoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_without_connect_is_closed_after_connect_timeout() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.connect_timeout_secs = 1)
        .await
        .unwrap();
    let started = Instant::now();
    let mut silent = RawClient::connect(hub.mqtt, ProtocolVersion::V311)
        .await
        .unwrap();
    // Half a CONNECT does not count either.
    let mut partial = RawClient::connect(hub.mqtt, ProtocolVersion::V311)
        .await
        .unwrap();
    partial
        .send_bytes(&[0x10, 0x20, 0x00, 0x04, b'M'])
        .await
        .unwrap();
    let seen = silent.expect_close(Duration::from_secs(4)).await.unwrap();
    assert!(seen.is_empty());
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_millis(3500),
        "closed too late: {elapsed:?}"
    );
    partial.expect_close(Duration::from_secs(2)).await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_enforced() {
    let hub = TestHub::start().await.unwrap();
    // v5: DISCONNECT 0x8D after 1.5 × keep-alive.
    let started = Instant::now();
    let (mut v5, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("ka5"), |c| {
        c.keep_alive = 1
    })
    .await;
    let (mut v3, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("ka3"), |c| {
        c.keep_alive = 1
    })
    .await;
    assert_eq!(
        raw_expect_disconnect(&mut v5, Duration::from_secs(4)).await,
        Some(0x8D)
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1200),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_millis(4000),
        "closed too late: {elapsed:?}"
    );
    let seen = v3.expect_close(Duration::from_secs(2)).await.unwrap();
    assert!(seen.is_empty(), "3.1.1 has no server DISCONNECT: {seen:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_the_connection_alive() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("pinger"), |c| {
        c.keep_alive = 1
    })
    .await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        raw.send(&Packet::PingReq).await.unwrap();
        match raw.recv(WAIT).await.unwrap() {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_is_enforced() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_keep_alive_secs = 1)
        .await
        .unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("ska"), |c| {
        c.keep_alive = 60
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    assert_eq!(
        raw_expect_disconnect(&mut raw, Duration::from_secs(4)).await,
        Some(0x8D)
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_timeout_publishes_the_will() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ka/will", rumqttc::QoS::AtLeastOnce).await;
    let (_raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("dead"), |c| {
        c.keep_alive = 1;
        c.will = Some(ferrohub_proto::mqtt::Will {
            topic: "ka/will".into(),
            payload: bytes::Bytes::from_static(b"timed out"),
            qos: FQoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
    })
    .await;
    // The socket stays open but silent: the broker must notice.
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"timed out");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_third() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_connections = 2)
        .await
        .unwrap();
    let mut a = V4::connect(v4_opts(&hub, &uid("a"))).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    wait_connections(&hub, 2).await;

    let mut third = RawClient::connect(hub.mqtt, ProtocolVersion::V5)
        .await
        .unwrap();
    third
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            &uid("c"),
        ))))
        .await
        .unwrap();
    let seen = third.expect_close(WAIT).await.unwrap();
    for p in &seen {
        match p {
            Packet::ConnAck(c) => assert_ne!(c.code, 0, "third connection accepted"),
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = V4::try_connect(v4_opts(&hub, &uid("c4"))).await;
    assert!(e.is_err(), "third (rumqttc) connection accepted");

    // The first two still work.
    a.subscribe("mc/t", rumqttc::QoS::AtLeastOnce).await;
    b.publish("mc/t", m5::QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(a.recv_publish().await.payload.as_ref(), b"x");
    let text = metrics(&hub).await;
    assert!(metric(&text, "ferrohub_mqtt_connections_refused_total").unwrap() >= 2.0);

    // A freed slot can be used again.
    b.disconnect().await;
    let deadline = Instant::now() + WAIT;
    loop {
        match V4::try_connect(v4_opts(&hub, &uid("d"))).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "slot never freed: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_length_and_charset() {
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.max_client_id_length = 8;
        cfg.mqtt.client_id_charset = ClientIdCharset::Strict;
    })
    .await
    .unwrap();
    for (id, ok) in [
        ("abcdefgh", true),
        ("a_.:-9Z", true),
        ("abcdefghi", false),
        ("has sp", false),
        ("é", false),
        ("a/b", false),
    ] {
        for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
            let (mut raw, ack) = raw_connect_with(hub.mqtt, connect_packet(version, id)).await;
            let expected = match (ok, version) {
                (true, _) => 0,
                (false, ProtocolVersion::V5) => 0x85,
                (false, _) => 2,
            };
            assert_eq!(ack.code, expected, "client id {id:?} under {version:?}");
            if !ok {
                raw.expect_close(WAIT).await.unwrap();
            }
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_needs_clean_session() {
    let hub = TestHub::start().await.unwrap();
    let mut c = connect_packet(ProtocolVersion::V311, "");
    c.clean_start = false;
    let (mut raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_eq!(ack.code, 2, "Identifier rejected [MQTT-3.1.3-8]");
    assert!(!ack.session_present);
    raw.expect_close(WAIT).await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_length_and_levels_are_limited() {
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.max_topic_length = 16;
        cfg.mqtt.max_topic_levels = 3;
    })
    .await
    .unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("tl"), |_| {}).await;
    assert_eq!(
        raw_subscribe(&mut raw, 1, "a/b/#", FQoS::AtMostOnce).await,
        vec![0]
    );
    assert_eq!(
        raw_subscribe(&mut raw, 2, "a/b/c/d", FQoS::AtMostOnce).await,
        vec![0x8F]
    );
    assert_eq!(
        raw_subscribe(&mut raw, 3, "a/b/c/#", FQoS::AtMostOnce).await,
        vec![0x8F]
    );
    assert_eq!(
        raw_subscribe(&mut raw, 4, &"x".repeat(17), FQoS::AtMostOnce).await,
        vec![0x8F]
    );
    assert_eq!(
        raw_subscribe(&mut raw, 5, &"x".repeat(16), FQoS::AtMostOnce).await,
        vec![0]
    );
    let (mut v3, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("tl3"), |_| {}).await;
    assert_eq!(
        raw_subscribe(&mut v3, 1, "a/b/c/d", FQoS::AtMostOnce).await,
        vec![0x80]
    );

    // Publishing to a topic within the limits works ...
    raw.send(&publish_packet("a/b/c", FQoS::AtLeastOnce, 1, b"ok"))
        .await
        .unwrap();
    raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    // ... beyond them it is a Topic Name invalid.
    raw.send(&publish_packet("a/b/c/d", FQoS::AtLeastOnce, 2, b"no"))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x90));
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("tl2"), |_| {}).await;
    raw.send(&publish_packet(&"y".repeat(17), FQoS::AtMostOnce, 0, b"no"))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x90));
    v3.send(&publish_packet("a/b/c/d", FQoS::AtLeastOnce, 2, b"no"))
        .await
        .unwrap();
    let seen = v3.expect_close(WAIT).await.unwrap();
    assert!(
        seen.iter().all(|p| !matches!(p, Packet::PubAck(_))),
        "{seen:?}"
    );
    hub.stop().await;
}

/// Connects a persistent v5 session subscribed to `filter` at QoS 1, then disconnects it.
async fn offline_subscriber(hub: &TestHub, id: &str, filter: &str) {
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, id, |c| {
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    raw_subscribe(&mut raw, 1, filter, FQoS::AtLeastOnce).await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_drops_qos0_first_then_refuses_qos1() {
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.max_queued_messages = 5;
        cfg.mqtt.queue_qos0_offline = true;
    })
    .await
    .unwrap();
    let id = uid("slow");
    offline_subscriber(&hub, &id, "ovf/t").await;
    wait_connections(&hub, 0).await;

    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..3 {
        publ.publish(
            "ovf/t",
            m5::QoS::AtMostOnce,
            false,
            format!("q0-{i}").as_bytes(),
        )
        .await;
    }
    // Queue: 3 × QoS 0. Five QoS 1 fit: the last three push the QoS 0 messages out.
    for i in 0..5 {
        let ack = publ
            .publish(
                "ovf/t",
                m5::QoS::AtLeastOnce,
                false,
                format!("q1-{i}").as_bytes(),
            )
            .await;
        assert_eq!(ack, Some(m5::PubAckReason::Success), "q1-{i}");
    }
    // Full of QoS 1: refused with Quota exceeded, never dropped silently.
    let ack = publ
        .publish("ovf/t", m5::QoS::AtLeastOnce, false, b"refused")
        .await;
    assert_eq!(ack, Some(m5::PubAckReason::QuotaExceeded));
    // QoS 0 while full: dropped.
    publ.publish("ovf/t", m5::QoS::AtMostOnce, false, b"q0-late")
        .await;
    publ.barrier().await;

    let text = metrics(&hub).await;
    let queue_full = metric(
        &text,
        "ferrohub_mqtt_messages_dropped_total{reason=\"queue_full\"}",
    )
    .unwrap();
    let refused = metric(
        &text,
        "ferrohub_mqtt_messages_dropped_total{reason=\"quota_refused\"}",
    )
    .unwrap();
    assert_eq!(
        queue_full, 4.0,
        "3 QoS 0 pushed out + 1 QoS 0 dropped at the door"
    );
    assert_eq!(refused, 1.0);

    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(ack.session_present);
    for i in 0..5 {
        let p = raw_recv_publish(&mut raw).await;
        assert_eq!(p.payload, format!("q1-{i}").into_bytes());
        raw.send(&puback(p.packet_id)).await.unwrap();
    }
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_with_a_subscriber_that_never_reads() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_queued_messages = 5)
        .await
        .unwrap();
    // Online, Receive Maximum 1, never acknowledges (and never reads its socket).
    let (mut stuck, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("stuck"), |c| {
        c.properties.receive_maximum = Some(1);
    })
    .await;
    raw_subscribe(&mut stuck, 1, "ovf2/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    // 1 in flight + 5 queued.
    for i in 0..6 {
        let ack = publ
            .publish(
                "ovf2/t",
                m5::QoS::AtLeastOnce,
                false,
                format!("{i}").as_bytes(),
            )
            .await;
        assert_eq!(ack, Some(m5::PubAckReason::Success), "message {i}");
    }
    let ack = publ
        .publish("ovf2/t", m5::QoS::AtLeastOnce, false, b"7th")
        .await;
    assert_eq!(ack, Some(m5::PubAckReason::QuotaExceeded));
    // Other subscribers are not affected by the slow one.
    let mut fast = V5::connect(v5_opts(&hub, &uid("fast"))).await;
    fast.subscribe("ovf2/t", m5::QoS::AtLeastOnce).await;
    let ack = publ
        .publish("ovf2/t", m5::QoS::AtLeastOnce, false, b"8th")
        .await;
    assert_eq!(
        ack,
        Some(m5::PubAckReason::QuotaExceeded),
        "still full for the slow one"
    );
    assert_eq!(
        fast.recv_publish().await.payload.as_ref(),
        b"8th",
        "the fast one still gets it"
    );
    drop(stuck);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publisher_to_a_full_queue_is_disconnected_without_ack() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_queued_messages = 2)
        .await
        .unwrap();
    let id = uid("slow");
    offline_subscriber(&hub, &id, "ovf3/t").await;
    wait_connections(&hub, 0).await;
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("pub3"), |_| {}).await;
    for pid in 1..=2 {
        raw.send(&publish_packet("ovf3/t", FQoS::AtLeastOnce, pid, b"fits"))
            .await
            .unwrap();
        raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }
    raw.send(&publish_packet("ovf3/t", FQoS::AtLeastOnce, 3, b"no room"))
        .await
        .unwrap();
    let seen = raw.expect_close(WAIT).await.unwrap();
    assert!(
        seen.iter().all(|p| !matches!(p, Packet::PubAck(_))),
        "{seen:?}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bytes_are_not_a_control_packet_for_keep_alive() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("trickle"), |c| {
        c.keep_alive = 1
    })
    .await;
    // A PUBLISH announcing 100 bytes, sent one byte at a time: no complete Control Packet ever
    // arrives, so the keep-alive must still expire [MQTT-3.1.2-22].
    let started = Instant::now();
    let mut bytes = vec![0x30u8, 100, 0x00, 0x01, b't', 0x00];
    bytes.resize(102, b'x');
    let mut closed = None;
    for b in bytes {
        if raw.send_bytes(&[b]).await.is_err() {
            break;
        }
        match raw.recv_or_close(Duration::from_millis(400)).await {
            Ok(Some(Packet::Disconnect(d))) => {
                closed = Some(d.code);
                break;
            }
            Ok(None) => break,
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    assert_eq!(
        closed,
        Some(0x8D),
        "still open after {:?} of trickling",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_boundaries() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_packet_size = 1024)
        .await
        .unwrap();
    let v = ProtocolVersion::V5;
    // 1 + 2 (remaining length) + 2 + 1 (topic) + 2 (packet id) + 1 (properties) + payload.
    let exact = publish_packet("b", FQoS::AtLeastOnce, 1, &[0u8; 1015]);
    assert_eq!(ferrohub_proto::mqtt::encoded_len(&exact, v).unwrap(), 1024);
    let (mut raw, _) = raw_connect(hub.mqtt, v, &uid("edge"), |_| {}).await;
    raw.send(&exact).await.unwrap();
    raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    raw.send(&publish_packet("b", FQoS::AtLeastOnce, 2, &[0u8; 1016]))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x95));

    // Outbound: exactly the client's maximum is delivered, one byte more is not.
    let (mut sub, _) = raw_connect(hub.mqtt, v, &uid("edge-sub"), |c| {
        c.properties.maximum_packet_size = Some(100);
    })
    .await;
    raw_subscribe(&mut sub, 1, "b", FQoS::AtMostOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("b", m5::QoS::AtMostOnce, false, &[1u8; 95])
        .await; // 101 bytes
    publ.publish("b", m5::QoS::AtMostOnce, false, &[2u8; 94])
        .await; // 100 bytes
    let p = raw_recv_publish(&mut sub).await;
    assert_eq!(p.payload.len(), 94);
    raw_expect_silence(&mut sub, QUIET).await;
    hub.stop().await;
}
