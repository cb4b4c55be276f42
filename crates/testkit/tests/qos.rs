//! QoS 0/1/2 delivery: round trips with MQTT 3.1.1 and 5.0 clients, downgrade to the
//! subscription's QoS, overlapping subscriptions, per-publisher ordering, exactly-once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ferrohub_proto::mqtt::{Packet, ProtocolVersion, PubResponse};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_round_trip_each_qos() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    let codes = sub.subscribe("qos/rt", QoS::ExactlyOnce).await;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let payload = format!("m{i}");
        publ.publish("qos/rt", qos, false, payload.as_bytes()).await;
        let p = sub.recv_publish().await;
        assert_eq!(p.topic, "qos/rt");
        assert_eq!(p.payload.as_ref(), payload.as_bytes());
        assert_eq!(p.qos, qos, "delivered at the publish QoS");
        assert!(!p.retain);
        assert!(!p.dup);
    }
    sub.expect_no_publish(QUIET).await;
    publ.disconnect().await;
    sub.disconnect().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_round_trip_each_qos() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    let codes = sub.subscribe("qos/rt5", m5::QoS::ExactlyOnce).await;
    assert_eq!(
        codes,
        vec![m5::SubscribeReasonCode::Success(m5::QoS::ExactlyOnce)]
    );
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for (i, qos) in [
        m5::QoS::AtMostOnce,
        m5::QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let payload = format!("m{i}");
        let ack = publ
            .publish("qos/rt5", qos, false, payload.as_bytes())
            .await;
        if qos == m5::QoS::AtLeastOnce {
            assert_eq!(ack, Some(m5::PubAckReason::Success));
        }
        let p = sub.recv_publish().await;
        assert_eq!(topic5(&p), "qos/rt5");
        assert_eq!(p.payload.as_ref(), payload.as_bytes());
        assert_eq!(p.qos, qos);
        assert!(!p.retain);
    }
    sub.expect_no_publish(QUIET).await;
    publ.disconnect().await;
    sub.disconnect().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_is_downgraded_to_subscription_qos() {
    let hub = TestHub::start().await.unwrap();
    let mut s0 = V4::connect(v4_opts(&hub, &uid("s0"))).await;
    s0.subscribe("qos/down", QoS::AtMostOnce).await;
    let mut s1 = V4::connect(v4_opts(&hub, &uid("s1"))).await;
    s1.subscribe("qos/down", QoS::AtLeastOnce).await;
    let mut s2 = V5::connect(v5_opts(&hub, &uid("s2"))).await;
    s2.subscribe("qos/down", m5::QoS::ExactlyOnce).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;

    publ.publish("qos/down", QoS::ExactlyOnce, false, b"two")
        .await;
    assert_eq!(s0.recv_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(s1.recv_publish().await.qos, QoS::AtLeastOnce);
    assert_eq!(s2.recv_publish().await.qos, m5::QoS::ExactlyOnce);

    // Never upgraded above the publish QoS.
    publ.publish("qos/down", QoS::AtLeastOnce, false, b"one")
        .await;
    assert_eq!(s0.recv_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(s1.recv_publish().await.qos, QoS::AtLeastOnce);
    assert_eq!(s2.recv_publish().await.qos, m5::QoS::AtLeastOnce);

    publ.publish("qos/down", QoS::AtMostOnce, false, b"zero")
        .await;
    assert_eq!(s0.recv_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(s1.recv_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(s2.recv_publish().await.qos, m5::QoS::AtMostOnce);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_overlapping_subscriptions_one_copy_highest_qos_all_ids() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe_with_id("ov/+/x", m5::QoS::AtMostOnce, 7)
        .await;
    sub.subscribe_with_id("ov/#", m5::QoS::AtLeastOnce, 9).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("ov/a/x", m5::QoS::ExactlyOnce, false, b"hello")
        .await;
    let p = sub.recv_publish().await;
    assert_eq!(
        p.qos,
        m5::QoS::AtLeastOnce,
        "highest QoS of the matching subscriptions"
    );
    let mut ids = p
        .properties
        .clone()
        .unwrap_or_default()
        .subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![7, 9],
        "both subscription identifiers on the single copy"
    );
    sub.expect_no_publish(QUIET).await;

    // Only one of them matches: only its identifier.
    publ.publish("ov/b", m5::QoS::AtLeastOnce, false, b"one")
        .await;
    let p = sub.recv_publish().await;
    assert_eq!(
        p.properties.unwrap_or_default().subscription_identifiers,
        vec![9]
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_overlapping_subscriptions_deliver_at_highest_qos() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ov4/+", QoS::AtMostOnce).await;
    sub.subscribe("ov4/#", QoS::ExactlyOnce).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("ov4/a", QoS::ExactlyOnce, false, b"x").await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, QoS::ExactlyOnce);
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_preserved_per_publisher() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("order/#", QoS::ExactlyOnce).await;
    let mut opts = v4_opts(&hub, &uid("pub"));
    opts.set_inflight(20);
    let publ = V4::connect(opts).await;
    const N: usize = 200;
    for (topic, qos) in [
        ("order/q0", QoS::AtMostOnce),
        ("order/q1", QoS::AtLeastOnce),
        ("order/q2", QoS::ExactlyOnce),
    ] {
        for i in 0..N {
            publ.client
                .publish(topic, qos, false, i.to_string().into_bytes())
                .await
                .unwrap();
        }
        for i in 0..N {
            let p = sub.recv_publish().await;
            assert_eq!(p.topic, topic);
            assert_eq!(
                std::str::from_utf8(&p.payload).unwrap(),
                i.to_string(),
                "message {i} of {topic} out of order"
            );
            assert_eq!(p.qos, qos);
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_retransmitted_publish_is_delivered_once() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("qos2/once", m5::QoS::ExactlyOnce).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (mut raw, _) = raw_connect(hub.mqtt, version, &uid("raw"), |_| {}).await;
        let mut publish = publish_packet("qos2/once", FQoS::ExactlyOnce, 7, b"exactly");
        raw.send(&publish).await.unwrap();
        let rec = raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
        assert!(matches!(
            rec,
            Packet::PubRec(PubResponse {
                packet_id: 7,
                code: 0,
                ..
            })
        ));
        // Retransmission before PUBREL (DUP set): acknowledged again, not routed again.
        if let Packet::Publish(p) = &mut publish {
            p.dup = true;
        }
        raw.send(&publish).await.unwrap();
        let rec = raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
        assert!(matches!(
            rec,
            Packet::PubRec(PubResponse { packet_id: 7, .. })
        ));
        raw.send(&Packet::PubRel(PubResponse {
            packet_id: 7,
            ..Default::default()
        }))
        .await
        .unwrap();
        let comp = raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await;
        assert!(matches!(
            comp,
            Packet::PubComp(PubResponse {
                packet_id: 7,
                code: 0,
                ..
            })
        ));

        let p = sub.recv_publish().await;
        assert_eq!(p.payload.as_ref(), b"exactly");
        sub.expect_no_publish(QUIET).await;

        // The packet identifier is free again: a new message with it is a new message.
        raw.send(&publish_packet("qos2/once", FQoS::ExactlyOnce, 7, b"again"))
            .await
            .unwrap();
        raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
        raw.send(&Packet::PubRel(PubResponse {
            packet_id: 7,
            ..Default::default()
        }))
        .await
        .unwrap();
        raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await;
        assert_eq!(sub.recv_publish().await.payload.as_ref(), b"again");
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_outbound_handshake_at_byte_level() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |_| {}).await;
    assert_eq!(
        raw_subscribe(&mut raw, 1, "qos2/out", FQoS::ExactlyOnce).await,
        vec![2]
    );
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("qos2/out", m5::QoS::ExactlyOnce, false, b"x")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.qos, FQoS::ExactlyOnce);
    assert_ne!(p.packet_id, 0);
    raw.send(&Packet::PubRec(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    let rel = raw_wait(&mut raw, "PUBREL", |p| matches!(p, Packet::PubRel(_))).await;
    let Packet::PubRel(rel) = rel else {
        unreachable!()
    };
    assert_eq!(rel.packet_id, p.packet_id);
    assert_eq!(rel.code, 0);
    raw.send(&Packet::PubComp(PubResponse {
        packet_id: p.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    // Still healthy afterwards.
    raw.send(&Packet::PingReq).await.unwrap();
    raw_wait(&mut raw, "PINGRESP", |p| matches!(p, Packet::PingResp)).await;
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_round_trip_intact() {
    let hub = TestHub::start().await.unwrap();
    let mut o = v4_opts(&hub, &uid("sub"));
    o.set_max_packet_size(2 << 20, 2 << 20);
    let mut sub = V4::connect(o).await;
    sub.subscribe("large/t", QoS::AtLeastOnce).await;
    let mut o = v5_opts(&hub, &uid("pub"));
    o.set_max_packet_size(Some(2 << 20));
    let mut publ = V5::connect(o).await;
    for size in [0usize, 1, 127, 128, 16_383, 16_384, 300_000, 1_000_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let ack = publ
            .publish("large/t", m5::QoS::AtLeastOnce, false, &payload)
            .await;
        assert_eq!(ack, Some(m5::PubAckReason::Success), "size {size}");
        let p = sub.recv_publish().await;
        assert_eq!(p.payload.len(), size);
        assert!(
            p.payload.as_ref() == payload.as_slice(),
            "payload of {size} bytes corrupted"
        );
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_clients_are_served() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("v31/t", QoS::AtLeastOnce).await;
    // CONNECT "MQIsdp" level 3, clean session, keep-alive 30, client id.
    let id = b"mqtt-3.1-client";
    let mut body = vec![0x00, 0x06];
    body.extend_from_slice(b"MQIsdp");
    body.extend([3, 0x02, 0, 30]);
    body.extend((id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut bytes = vec![0x10, body.len() as u8];
    bytes.extend(body);
    let mut raw = ferrohub_testkit::RawClient::connect(hub.mqtt, ProtocolVersion::V31)
        .await
        .unwrap();
    raw.send_bytes(&bytes).await.unwrap();
    match raw.recv(WAIT).await.unwrap() {
        Packet::ConnAck(c) => assert_eq!(c.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw.send(&publish_packet(
        "v31/t",
        FQoS::AtLeastOnce,
        1,
        b"old protocol",
    ))
    .await
    .unwrap();
    raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    assert_eq!(sub.recv_publish().await.payload.as_ref(), b"old protocol");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_and_outbound_packet_identifiers_are_independent() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("both"), |_| {}).await;
    assert_eq!(
        raw_subscribe(&mut raw, 1, "both/t", FQoS::ExactlyOnce).await,
        vec![2]
    );
    // Our QoS 2 PUBLISH with id 1; the server's delivery of it to us may use id 1 as well.
    raw.send(&publish_packet("both/t", FQoS::ExactlyOnce, 1, b"loop"))
        .await
        .unwrap();
    let mut got_pubrec = false;
    let mut delivery = None;
    while !(got_pubrec && delivery.is_some()) {
        match raw.recv(WAIT).await.unwrap() {
            Packet::PubRec(r) => {
                assert_eq!(r.packet_id, 1);
                got_pubrec = true;
            }
            Packet::Publish(p) => delivery = Some(p),
            other => panic!("unexpected {other:?}"),
        }
    }
    let delivery = delivery.unwrap();
    // Interleave both exchanges.
    raw.send(&Packet::PubRec(PubResponse {
        packet_id: delivery.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw.send(&Packet::PubRel(PubResponse {
        packet_id: 1,
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut got_pubrel = false;
    let mut got_pubcomp = false;
    while !(got_pubrel && got_pubcomp) {
        match raw.recv(WAIT).await.unwrap() {
            Packet::PubRel(r) => {
                assert_eq!((r.packet_id, r.code), (delivery.packet_id, 0));
                got_pubrel = true;
            }
            Packet::PubComp(c) => {
                assert_eq!((c.packet_id, c.code), (1, 0));
                got_pubcomp = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    raw.send(&Packet::PubComp(PubResponse {
        packet_id: delivery.packet_id,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw_expect_silence(&mut raw, QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pubrel_gets_packet_identifier_not_found() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("rel"), |_| {}).await;
    raw.send(&Packet::PubRel(PubResponse {
        packet_id: 4242,
        ..Default::default()
    }))
    .await
    .unwrap();
    match raw.recv(WAIT).await.unwrap() {
        Packet::PubComp(c) => assert_eq!((c.packet_id, c.code), (4242, 0x92)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_identifiers_wrap_around_without_zero_or_reuse() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The publisher outruns the subscriber: give the subscriber's queue room for all of it
    // (otherwise the documented overflow policy disconnects the 3.1.1 publisher).
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_queued_messages = 100_000)
        .await
        .unwrap();
    let (mut sub, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("wrap-sub"), |_| {}).await;
    raw_subscribe(&mut sub, 1, "wrap/t", FQoS::AtLeastOnce).await;

    // A publisher on a plain socket: pipelined QoS 1 PUBLISHes, PUBACKs drained by a task.
    const N: u32 = 66_000;
    let stream = tokio::net::TcpStream::connect(hub.mqtt).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let mut out = bytes::BytesMut::new();
    let v = ProtocolVersion::V311;
    ferrohub_proto::mqtt::encode(
        &Packet::Connect(Box::new(connect_packet(v, &uid("wrap-pub")))),
        v,
        &mut out,
    )
    .unwrap();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let pid = (i % 65_535 + 1) as u16;
            ferrohub_proto::mqtt::encode(
                &publish_packet("wrap/t", FQoS::AtLeastOnce, pid, &i.to_be_bytes()),
                v,
                &mut out,
            )
            .unwrap();
            if out.len() > 32 * 1024 {
                wr.write_all(&out).await.unwrap();
                out.clear();
            }
        }
        wr.write_all(&out).await.unwrap();
        wr
    });

    let mut last: Option<u16> = None;
    let mut wrapped = false;
    let mut acks = bytes::BytesMut::new();
    for i in 0..N {
        let p = tokio::time::timeout(
            std::time::Duration::from_secs(8),
            raw_recv_publish(&mut sub),
        )
        .await
        .unwrap_or_else(|_| panic!("stalled after {i} messages"));
        assert_eq!(
            p.payload.as_ref(),
            &i.to_be_bytes(),
            "message {i} out of order"
        );
        assert_ne!(p.packet_id, 0, "packet identifier 0 is not allowed");
        if last.is_some_and(|prev| p.packet_id < prev) {
            wrapped = true;
        }
        last = Some(p.packet_id);
        ferrohub_proto::mqtt::encode(&puback(p.packet_id), v, &mut acks).unwrap();
        // Well within the server's outbound window (1024), or it would wait for us forever.
        if acks.len() >= 256 * 4 || i + 1 == N {
            sub.send_bytes(&acks).await.unwrap();
            acks.clear();
        }
    }
    assert!(wrapped, "packet identifiers never wrapped around");
    let _wr = writer.await.unwrap();
    drain.abort();
    hub.stop().await;
}
