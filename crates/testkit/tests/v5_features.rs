//! MQTT 5 features: forwarded PUBLISH properties, payload format validation, message expiry,
//! topic aliases both ways, subscription identifiers, No Local, Receive Maximum both ways,
//! Maximum Packet Size both ways, assigned client identifiers, Server Keep Alive, and the
//! reason codes of acknowledgements and refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrohub_proto::mqtt::{
    Packet, ProtocolVersion, PubResponse, Publish, PublishProperties, Subscribe, SubscribeFilter,
    SubscriptionOptions, Unsubscribe,
};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;

fn raw_publish(
    topic: &str,
    qos: FQoS,
    pid: u16,
    payload: &[u8],
    props: PublishProperties,
) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Arc::from(topic),
        packet_id: pid,
        properties: props,
        payload: Bytes::copy_from_slice(payload),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_are_forwarded() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("props/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let props = m5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ],
        ..Default::default()
    };
    let ack = publ
        .publish_props(
            "props/t",
            m5::QoS::AtLeastOnce,
            false,
            b"{\"x\":1}",
            Some(props.clone()),
        )
        .await;
    assert_eq!(ack, Some(m5::PubAckReason::Success));
    let p = sub.recv_publish().await;
    let got = p.properties.expect("properties forwarded");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type, props.content_type);
    assert_eq!(got.response_topic, props.response_topic);
    assert_eq!(got.correlation_data, props.correlation_data);
    assert_eq!(
        got.user_properties, props.user_properties,
        "order and duplicates kept"
    );
    assert_eq!(got.message_expiry_interval, None);

    // A 3.1.1 subscriber gets the message without properties (and the codec does not choke).
    let mut v4 = V4::connect(v4_opts(&hub, &uid("v4"))).await;
    v4.subscribe("props/t", rumqttc::QoS::AtLeastOnce).await;
    publ.publish_props("props/t", m5::QoS::AtLeastOnce, false, b"{}", Some(props))
        .await;
    assert_eq!(v4.recv_publish().await.payload.as_ref(), b"{}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_round_trip() {
    let hub = TestHub::start().await.unwrap();
    let mut responder = V5::connect(v5_opts(&hub, &uid("responder"))).await;
    responder.subscribe("rr/req", m5::QoS::AtLeastOnce).await;
    let mut requester = V5::connect(v5_opts(&hub, &uid("requester"))).await;
    requester
        .subscribe("rr/resp/me", m5::QoS::AtLeastOnce)
        .await;
    let props = m5::PublishProperties {
        response_topic: Some("rr/resp/me".into()),
        correlation_data: Some(Bytes::from_static(b"id-17")),
        ..Default::default()
    };
    requester
        .publish_props("rr/req", m5::QoS::AtLeastOnce, false, b"ping", Some(props))
        .await;
    let req = responder.recv_publish().await;
    let rp = req.properties.unwrap();
    let reply = m5::PublishProperties {
        correlation_data: rp.correlation_data.clone(),
        ..Default::default()
    };
    responder
        .publish_props(
            &rp.response_topic.unwrap(),
            m5::QoS::AtLeastOnce,
            false,
            b"pong",
            Some(reply),
        )
        .await;
    let resp = requester.recv_publish().await;
    assert_eq!(resp.payload.as_ref(), b"pong");
    assert_eq!(
        resp.properties.unwrap().correlation_data.as_deref(),
        Some(&b"id-17"[..])
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_with_payload_format_indicator_is_refused() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("pfi/t", m5::QoS::AtLeastOnce).await;
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |_| {}).await;
    let pfi = PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    raw.send(&raw_publish(
        "pfi/t",
        FQoS::AtLeastOnce,
        1,
        &[0xC3, 0x28],
        pfi.clone(),
    ))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.code), (1, 0x99)),
        _ => unreachable!(),
    }
    raw.send(&raw_publish(
        "pfi/t",
        FQoS::ExactlyOnce,
        2,
        &[0xFF],
        pfi.clone(),
    ))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await {
        Packet::PubRec(a) => assert_eq!((a.packet_id, a.code), (2, 0x99)),
        _ => unreachable!(),
    }
    sub.expect_no_publish(QUIET).await;
    // The connection is still usable and valid UTF-8 passes.
    raw.send(&raw_publish(
        "pfi/t",
        FQoS::AtLeastOnce,
        3,
        "héllo".as_bytes(),
        pfi,
    ))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.code), (3, 0)),
        _ => unreachable!(),
    }
    assert_eq!(
        sub.recv_publish().await.payload.as_ref(),
        "héllo".as_bytes()
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_expires_and_remaining_interval_is_forwarded() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("exp");
    let mut o = v5_opts(&hub, &id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let mut c = V5::connect(o.clone()).await;
    c.subscribe("mexp/t", m5::QoS::AtLeastOnce).await;
    c.disconnect().await;
    wait_connections(&hub, 0).await;

    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for (payload, secs) in [("short", 1), ("long", 10)] {
        let props = m5::PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        };
        publ.publish_props(
            "mexp/t",
            m5::QoS::AtLeastOnce,
            false,
            payload.as_bytes(),
            Some(props),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = V5::connect(o).await;
    assert!(c.connack.session_present);
    let p = c.recv_publish().await;
    assert_eq!(
        p.payload.as_ref(),
        b"long",
        "the expired message is not delivered"
    );
    let left = p.properties.unwrap().message_expiry_interval;
    assert!(
        matches!(left, Some(1..=9)),
        "forwarded expiry must be decremented by the time spent queued, got {left:?}"
    );
    c.expect_no_publish(QUIET).await;
    let text = metrics(&hub).await;
    assert!(
        metric(
            &text,
            "ferrohub_mqtt_messages_dropped_total{reason=\"expired\"}"
        )
        .unwrap()
            >= 1.0
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_from_client_is_resolved() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("alias/#", m5::QoS::AtLeastOnce).await;
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |_| {}).await;
    let max = ack
        .properties
        .topic_alias_maximum
        .expect("server advertises Topic Alias Maximum");
    assert!(max >= 2);
    let with_alias = |alias: u16| PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    };
    // Establish alias 1, then use it alone.
    raw.send(&raw_publish(
        "alias/one",
        FQoS::AtLeastOnce,
        1,
        b"a",
        with_alias(1),
    ))
    .await
    .unwrap();
    raw.send(&raw_publish("", FQoS::AtLeastOnce, 2, b"b", with_alias(1)))
        .await
        .unwrap();
    // Re-map alias 1 to another topic.
    raw.send(&raw_publish(
        "alias/two",
        FQoS::AtLeastOnce,
        3,
        b"c",
        with_alias(1),
    ))
    .await
    .unwrap();
    raw.send(&raw_publish("", FQoS::AtLeastOnce, 4, b"d", with_alias(1)))
        .await
        .unwrap();
    for (topic, payload) in [
        ("alias/one", "a"),
        ("alias/one", "b"),
        ("alias/two", "c"),
        ("alias/two", "d"),
    ] {
        let p = sub.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            (topic, payload.as_bytes())
        );
    }
    // Alias above the maximum: DISCONNECT 0x94.
    raw.send(&raw_publish(
        "alias/x",
        FQoS::AtMostOnce,
        0,
        b"x",
        with_alias(max + 1),
    ))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x94));

    // An alias never established: protocol error.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw2"), |_| {}).await;
    raw.send(&raw_publish("", FQoS::AtMostOnce, 0, b"x", with_alias(2)))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x82));
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_zero_is_refused() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |_| {}).await;
    raw.send(&raw_publish(
        "alias/z",
        FQoS::AtMostOnce,
        0,
        b"x",
        PublishProperties {
            topic_alias: Some(0),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    // Topic Alias 0 is never valid [MQTT-3.3.2-8]: Protocol Error or Topic Alias invalid.
    let code = raw_expect_disconnect(&mut raw, WAIT).await;
    assert!(matches!(code, Some(0x82 | 0x94)), "got {code:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_uses_topic_aliases_when_the_client_allows() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |c| {
        c.properties.topic_alias_maximum = Some(2);
    })
    .await;
    raw_subscribe(&mut raw, 1, "sa/#", FQoS::AtMostOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let mut aliases = std::collections::HashMap::new();
    for (topic, payload) in [
        ("sa/x", "1"),
        ("sa/x", "2"),
        ("sa/y", "3"),
        ("sa/z", "4"),
        ("sa/y", "5"),
    ] {
        publ.publish(topic, m5::QoS::AtMostOnce, false, payload.as_bytes())
            .await;
        let p = raw_recv_publish(&mut raw).await;
        assert_eq!(p.payload.as_ref(), payload.as_bytes());
        let resolved: String = match (p.topic.is_empty(), p.properties.topic_alias) {
            (false, Some(a)) => {
                assert!((1..=2).contains(&a), "alias {a} above the client's maximum");
                aliases.insert(a, p.topic.to_string());
                p.topic.to_string()
            }
            (false, None) => p.topic.to_string(),
            (true, Some(a)) => aliases
                .get(&a)
                .cloned()
                .unwrap_or_else(|| panic!("unknown alias {a}")),
            (true, None) => panic!("empty topic without alias"),
        };
        assert_eq!(resolved, topic);
    }
    // The second delivery to sa/x used the alias with an empty topic.
    assert!(aliases.values().any(|t| t == "sa/x"));

    // A client that does not allow aliases never gets one.
    let mut plain = V5::connect(v5_opts(&hub, &uid("plain"))).await;
    plain.subscribe("sa/#", m5::QoS::AtMostOnce).await;
    let (mut raw2, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("noalias"), |_| {}).await;
    raw_subscribe(&mut raw2, 1, "sa/#", FQoS::AtMostOnce).await;
    for _ in 0..2 {
        publ.publish("sa/x", m5::QoS::AtMostOnce, false, b"p").await;
        let p = raw_recv_publish(&mut raw2).await;
        assert_eq!(&*p.topic, "sa/x");
        assert_eq!(p.properties.topic_alias, None);
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_delivery_does_not_consume_a_topic_alias() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |c| {
        c.properties.topic_alias_maximum = Some(5);
        c.properties.maximum_packet_size = Some(200);
    })
    .await;
    raw_subscribe(&mut raw, 1, "big/t", FQoS::AtMostOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("big/t", m5::QoS::AtMostOnce, false, &[b'x'; 500])
        .await;
    publ.publish("big/t", m5::QoS::AtMostOnce, false, b"small")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(p.payload.as_ref(), b"small", "the oversized one is dropped");
    assert_eq!(
        &*p.topic, "big/t",
        "the client never saw the alias of the dropped packet, so the topic must be sent"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifiers_are_delivered() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("sid/r", m5::QoS::AtLeastOnce, true, b"retained")
        .await;
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe_with_id("sid/#", m5::QoS::AtLeastOnce, 268_435_455)
        .await;
    let p = sub.recv_publish().await;
    assert!(p.retain);
    assert_eq!(
        p.properties.unwrap().subscription_identifiers,
        vec![268_435_455]
    );
    sub.subscribe("sid/plain", m5::QoS::AtLeastOnce).await;
    publ.publish("sid/plain", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    let p = sub.recv_publish().await;
    assert_eq!(
        p.properties.unwrap().subscription_identifiers,
        vec![268_435_455]
    );
    // Replacing the subscription without an identifier removes it.
    sub.subscribe("sid/#", m5::QoS::AtLeastOnce).await;
    sub.recv_publish().await; // retained again
    publ.publish("sid/other", m5::QoS::AtLeastOnce, false, b"y")
        .await;
    let p = sub.recv_publish().await;
    assert!(
        p.properties
            .unwrap_or_default()
            .subscription_identifiers
            .is_empty()
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifier_zero_is_a_protocol_error() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |_| {}).await;
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscription_identifier: Some(0),
        user_properties: Vec::new(),
        filters: vec![SubscribeFilter {
            filter: "x".into(),
            options: SubscriptionOptions::default(),
        }],
    }))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x82));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_suppresses_own_messages() {
    let hub = TestHub::start().await.unwrap();
    let mut me = V5::connect(v5_opts(&hub, &uid("me"))).await;
    let mut f = m5::Filter::new("nl/t", m5::QoS::AtLeastOnce);
    f.nolocal = true;
    me.subscribe_filter(f, None).await;
    me.publish("nl/t", m5::QoS::AtLeastOnce, false, b"mine")
        .await;
    me.expect_no_publish(QUIET).await;
    let mut other = V5::connect(v5_opts(&hub, &uid("other"))).await;
    other
        .publish("nl/t", m5::QoS::AtLeastOnce, false, b"theirs")
        .await;
    assert_eq!(me.recv_publish().await.payload.as_ref(), b"theirs");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_respects_the_clients_receive_maximum() {
    let hub = TestHub::start().await.unwrap();
    for qos in [FQoS::AtLeastOnce, FQoS::ExactlyOnce] {
        let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("rm"), |c| {
            c.properties.receive_maximum = Some(2);
        })
        .await;
        raw_subscribe(&mut raw, 1, "rmax/t", qos).await;
        let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
        for i in 0..6 {
            publ.publish(
                "rmax/t",
                m5::QoS::ExactlyOnce,
                false,
                format!("{i}").as_bytes(),
            )
            .await;
        }
        let mut received = 0;
        while received < 6 {
            let a = raw_recv_publish(&mut raw).await;
            let b = raw_recv_publish(&mut raw).await;
            assert_eq!(a.payload, format!("{received}").into_bytes());
            assert_eq!(b.payload, format!("{}", received + 1).into_bytes());
            received += 2;
            // Never a third unacknowledged delivery.
            raw_expect_silence(&mut raw, Duration::from_millis(250)).await;
            if qos == FQoS::AtLeastOnce {
                raw.send(&puback(a.packet_id)).await.unwrap();
                raw.send(&puback(b.packet_id)).await.unwrap();
            } else {
                for p in [&a, &b] {
                    raw.send(&Packet::PubRec(PubResponse {
                        packet_id: p.packet_id,
                        ..Default::default()
                    }))
                    .await
                    .unwrap();
                    match raw.recv(WAIT).await.unwrap() {
                        Packet::PubRel(r) => assert_eq!(r.packet_id, p.packet_id),
                        other => panic!("expected PUBREL, got {other:?}"),
                    }
                }
                // Both awaiting PUBCOMP: the quota is not returned by PUBREC [MQTT 4.9].
                raw_expect_silence(&mut raw, Duration::from_millis(250)).await;
                for p in [&a, &b] {
                    raw.send(&Packet::PubComp(PubResponse {
                        packet_id: p.packet_id,
                        ..Default::default()
                    }))
                    .await
                    .unwrap();
                }
            }
        }
        raw_expect_silence(&mut raw, QUIET).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_exceeding_receive_maximum_is_disconnected() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_inflight = 2)
        .await
        .unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("greedy"), |_| {}).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for pid in 1..=2 {
        raw.send(&publish_packet("greedy/t", FQoS::ExactlyOnce, pid, b"x"))
            .await
            .unwrap();
        raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
    }
    // Two QoS 2 exchanges open (no PUBREL): a third PUBLISH exceeds Receive Maximum.
    raw.send(&publish_packet("greedy/t", FQoS::ExactlyOnce, 3, b"x"))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x93));

    // Completing exchanges frees the quota.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("polite"), |_| {}).await;
    for pid in 1..=5u16 {
        raw.send(&publish_packet("polite/t", FQoS::ExactlyOnce, pid, b"x"))
            .await
            .unwrap();
        raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await;
        raw.send(&Packet::PubRel(PubResponse {
            packet_id: pid,
            ..Default::default()
        }))
        .await
        .unwrap();
        raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_from_client_is_respected() {
    let hub = TestHub::start().await.unwrap();
    let mut o = v5_opts(&hub, &uid("small"));
    o.set_max_packet_size(Some(128));
    let mut small = V5::connect(o).await;
    small.subscribe("mps/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("mps/t", m5::QoS::AtLeastOnce, false, &[b'x'; 200])
        .await;
    publ.publish("mps/t", m5::QoS::AtLeastOnce, false, b"fits")
        .await;
    let p = small.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"fits");
    small.expect_no_publish(QUIET).await;
    let text = metrics(&hub).await;
    assert_eq!(
        metric(
            &text,
            "ferrohub_mqtt_messages_dropped_total{reason=\"too_large_for_client\"}"
        ),
        Some(1.0)
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_larger_than_server_maximum_is_disconnected_with_0x95() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_packet_size = 1024)
        .await
        .unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("big"), |_| {}).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    raw.send(&publish_packet("big/t", FQoS::AtLeastOnce, 1, &[0u8; 2000]))
        .await
        .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x95));
    // Only the header arrived before the verdict? Then a 3.1.1 client is closed as well.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("big4"), |_| {}).await;
    raw.send(&publish_packet("big/t", FQoS::AtLeastOnce, 1, &[0u8; 2000]))
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
async fn empty_client_id_gets_an_assigned_identifier() {
    let hub = TestHub::start().await.unwrap();
    let (_a, ack_a) = raw_connect(hub.mqtt, ProtocolVersion::V5, "", |_| {}).await;
    let (_b, ack_b) = raw_connect(hub.mqtt, ProtocolVersion::V5, "", |_| {}).await;
    let a = ack_a
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    let b = ack_b
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    assert!(!a.is_empty());
    assert_ne!(a, b);
    // A client with its own identifier is not assigned one.
    let (_c, ack_c) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("own"), |_| {}).await;
    assert_eq!(ack_c.properties.assigned_client_identifier, None);
    // 3.1.1 with Clean Session = 1 may use an empty identifier too.
    let (_d, ack_d) = raw_connect(hub.mqtt, ProtocolVersion::V311, "", |_| {}).await;
    assert_eq!(ack_d.code, 0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_caps_the_clients() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_keep_alive_secs = 5)
        .await
        .unwrap();
    let (_a, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("ka60"), |c| {
        c.keep_alive = 60
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, Some(5));
    let (_b, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("ka0"), |c| {
        c.keep_alive = 0
    })
    .await;
    assert_eq!(
        ack.properties.server_keep_alive,
        Some(5),
        "0 (no keep-alive) is above any cap"
    );
    let (_c, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("ka3"), |c| {
        c.keep_alive = 3
    })
    .await;
    assert!(matches!(ack.properties.server_keep_alive, None | Some(3)));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgement_reason_codes() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("rc"), |_| {}).await;
    // PUBACK 0x10 No matching subscribers.
    raw.send(&publish_packet(
        "nobody/listens",
        FQoS::AtLeastOnce,
        1,
        b"x",
    ))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
        Packet::PubAck(a) => assert_eq!(a.code, 0x10),
        _ => unreachable!(),
    }
    // PUBREC 0x10 too.
    raw.send(&publish_packet(
        "nobody/listens",
        FQoS::ExactlyOnce,
        2,
        b"x",
    ))
    .await
    .unwrap();
    match raw_wait(&mut raw, "PUBREC", |p| matches!(p, Packet::PubRec(_))).await {
        Packet::PubRec(a) => assert_eq!(a.code, 0x10),
        _ => unreachable!(),
    }
    raw.send(&Packet::PubRel(PubResponse {
        packet_id: 2,
        ..Default::default()
    }))
    .await
    .unwrap();
    raw_wait(&mut raw, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await;
    // SUBACK: granted QoS per filter, 0x8F for an invalid filter.
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 3,
        subscription_identifier: None,
        user_properties: Vec::new(),
        filters: ["ok/+", "bad/#/x", "ok2/#", "bad+/x"]
            .into_iter()
            .zip([
                FQoS::ExactlyOnce,
                FQoS::AtLeastOnce,
                FQoS::AtMostOnce,
                FQoS::AtMostOnce,
            ])
            .map(|(f, qos)| SubscribeFilter {
                filter: f.into(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            })
            .collect(),
    }))
    .await
    .unwrap();
    match raw_wait(&mut raw, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await {
        Packet::SubAck(s) => assert_eq!(s.codes, vec![2, 0x8F, 0, 0x8F]),
        _ => unreachable!(),
    }
    // UNSUBACK: 0x00 for an existing subscription, 0x11 otherwise.
    raw.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 4,
        user_properties: Vec::new(),
        filters: vec!["ok/+".into(), "never/subscribed".into()],
    }))
    .await
    .unwrap();
    match raw_wait(&mut raw, "UNSUBACK", |p| matches!(p, Packet::UnsubAck(_))).await {
        Packet::UnsubAck(u) => {
            assert_eq!(u.packet_id, 4);
            assert_eq!(u.codes, vec![0x00, 0x11]);
        }
        _ => unreachable!(),
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_authentication_method_is_refused_with_0x8c() {
    let hub = TestHub::start().await.unwrap();
    let mut c = connect_packet(ProtocolVersion::V5, &uid("auth"));
    c.properties.authentication_method = Some("SCRAM-SHA-512".into());
    c.properties.authentication_data = Some(Bytes::from_static(b"client-first"));
    let (mut raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_eq!(ack.code, 0x8C);
    raw.expect_close(WAIT).await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_advertises_capabilities() {
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.max_inflight = 77;
        cfg.mqtt.max_packet_size = 4096;
        cfg.mqtt.topic_alias_maximum = 9;
    })
    .await
    .unwrap();
    let c = V5::connect(v5_opts(&hub, &uid("caps"))).await;
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(77));
    assert_eq!(p.max_packet_size, Some(4096));
    assert_eq!(p.topic_alias_max, Some(9));
    assert!(matches!(p.max_qos, None | Some(2)));
    assert!(matches!(p.retain_available, None | Some(1)));
    assert!(matches!(p.shared_subscription_available, None | Some(1)));
    assert!(matches!(
        p.subscription_identifiers_available,
        None | Some(1)
    ));
    assert!(matches!(p.wildcard_subscription_available, None | Some(1)));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_string_only_when_problem_information_is_requested() {
    let hub = TestHub::start().await.unwrap();
    // Default (problem information requested): a reason string explains the DISCONNECT.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("rs"), |_| {}).await;
    raw.send(&publish_packet("a/+/b", FQoS::AtMostOnce, 0, b"x"))
        .await
        .unwrap();
    let seen = raw.expect_close(WAIT).await.unwrap();
    let disconnect = seen.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.clone()),
        _ => None,
    });
    assert_eq!(disconnect.as_ref().map(|d| d.code), Some(0x90));
    // Request Problem Information = 0: no reason string.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("rs0"), |c| {
        c.properties.request_problem_information = Some(0);
    })
    .await;
    raw.send(&publish_packet("a/+/b", FQoS::AtMostOnce, 0, b"x"))
        .await
        .unwrap();
    let seen = raw.expect_close(WAIT).await.unwrap();
    for p in seen {
        if let Packet::Disconnect(d) = p {
            assert_eq!(d.code, 0x90);
            assert_eq!(d.properties.reason_string, None);
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_not_available() {
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.retain_available = false;
        cfg.mqtt.sys_interval_secs = 0;
    })
    .await
    .unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("r"), |_| {}).await;
    assert_eq!(ack.properties.retain_available, Some(0));
    let mut p = publish_packet("nr/t", FQoS::AtLeastOnce, 1, b"x");
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    raw.send(&p).await.unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x9A));
    // A will with retain is refused at CONNECT.
    let mut c = ferrohub_proto::mqtt::Connect {
        will: Some(ferrohub_proto::mqtt::Will {
            topic: Arc::from("nr/will"),
            payload: Bytes::from_static(b"w"),
            qos: FQoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
        }),
        ..connect_packet(ProtocolVersion::V5, &uid("w"))
    };
    let (_raw, ack) = raw_connect_with(hub.mqtt, c.clone()).await;
    assert_eq!(ack.code, 0x9A);
    c.protocol = ProtocolVersion::V311;
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_ne!(ack.code, 0, "3.1.1 will retain refused too");
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_retained_messages"), Some(0.0));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_topic_aliases_disabled_by_config() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.topic_alias_maximum = 0)
        .await
        .unwrap();
    let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("noalias"), |_| {}).await;
    assert!(matches!(ack.properties.topic_alias_maximum, None | Some(0)));
    raw.send(&raw_publish(
        "na/t",
        FQoS::AtMostOnce,
        0,
        b"x",
        PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x94));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_do_not_survive_a_reconnect() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("alias-reconnect");
    let persistent = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.topic_alias_maximum = Some(4);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(true)).await;
    raw_subscribe(&mut raw, 1, "ar/t", FQoS::AtMostOnce).await;
    raw.send(&raw_publish(
        "ar/t",
        FQoS::AtMostOnce,
        0,
        b"set",
        PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(&*p.topic, "ar/t");
    drop(raw);
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, persistent(false)).await;
    // Server → client: a fresh connection gets the topic again.
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("ar/t", m5::QoS::AtMostOnce, false, b"again")
        .await;
    let p = raw_recv_publish(&mut raw).await;
    assert_eq!(&*p.topic, "ar/t", "alias mappings are per connection");
    // Client → server: the old mapping is gone.
    raw.send(&raw_publish(
        "",
        FQoS::AtMostOnce,
        0,
        b"stale",
        PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x82));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outbound_inflight_cap_applies_to_every_client() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_outbound_inflight = 2)
        .await
        .unwrap();
    // 3.1.1 has no Receive Maximum: the server's own cap still applies.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("cap"), |_| {}).await;
    raw_subscribe(&mut raw, 1, "cap/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..4 {
        publ.publish(
            "cap/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    let a = raw_recv_publish(&mut raw).await;
    let b = raw_recv_publish(&mut raw).await;
    raw_expect_silence(&mut raw, Duration::from_millis(300)).await;
    raw.send(&puback(a.packet_id)).await.unwrap();
    raw.send(&puback(b.packet_id)).await.unwrap();
    assert_eq!(raw_recv_publish(&mut raw).await.payload.as_ref(), b"2");
    assert_eq!(raw_recv_publish(&mut raw).await.payload.as_ref(), b"3");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_never_pushes_a_packet_over_the_clients_maximum() {
    let hub = TestHub::start().await.unwrap();
    // Without an alias the PUBLISH is exactly 100 bytes: 1 + 1 + (2 + 1) + 1 + 94.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("tight"), |c| {
        c.properties.maximum_packet_size = Some(100);
        c.properties.topic_alias_maximum = Some(5);
    })
    .await;
    raw_subscribe(&mut raw, 1, "t", FQoS::AtMostOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let payload = [b'x'; 94];
    let plain = publish_packet("t", FQoS::AtMostOnce, 0, &payload);
    assert_eq!(
        ferrohub_proto::mqtt::encoded_len(&plain, ProtocolVersion::V5).unwrap(),
        100
    );
    publ.publish("t", m5::QoS::AtMostOnce, false, &payload)
        .await;
    let p = raw_recv_publish(&mut raw).await;
    let len = ferrohub_proto::mqtt::encoded_len(&Packet::Publish(p), ProtocolVersion::V5).unwrap();
    assert!(
        len <= 100,
        "sent a {len}-byte PUBLISH to a client whose maximum is 100"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_strings_respect_the_clients_maximum_packet_size() {
    let hub = TestHub::start().await.unwrap();
    // [MQTT-3.14.2-3]: no Reason String if it would make the DISCONNECT too large.
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("tiny"), |c| {
        c.properties.maximum_packet_size = Some(16);
    })
    .await;
    raw.send(&publish_packet("a/+", FQoS::AtMostOnce, 0, b"x"))
        .await
        .unwrap();
    let seen = raw.expect_close(WAIT).await.unwrap();
    let mut saw_disconnect = false;
    for p in seen {
        let len = ferrohub_proto::mqtt::encoded_len(&p, ProtocolVersion::V5).unwrap();
        assert!(
            len <= 16,
            "sent a {len}-byte {} to a client whose maximum is 16: {p:?}",
            p.name()
        );
        saw_disconnect |= matches!(p, Packet::Disconnect(ref d) if d.code == 0x90);
    }
    assert!(
        saw_disconnect,
        "the DISCONNECT itself (without reason string) still fits"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_after_reconnect_respects_the_new_maximum_packet_size() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("shrinking");
    let connect = |clean: bool, max: Option<u32>| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.maximum_packet_size = max;
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(true, None)).await;
    raw_subscribe(&mut raw, 1, "shrinkmax/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("shrinkmax/t", m5::QoS::AtLeastOnce, false, &[b'x'; 500])
        .await;
    raw_recv_publish(&mut raw).await;
    drop(raw); // unacknowledged
    let (mut raw, ack) = raw_connect(
        hub.mqtt,
        ProtocolVersion::V5,
        &id,
        connect(false, Some(200)),
    )
    .await;
    assert!(ack.session_present);
    publ.publish("shrinkmax/t", m5::QoS::AtLeastOnce, false, b"small")
        .await;
    // [MQTT-3.1.2-24]: nothing above 200 bytes, even a resend.
    loop {
        match raw.recv_or_close(QUIET).await {
            Ok(Some(p)) => {
                let len = ferrohub_proto::mqtt::encoded_len(&p, ProtocolVersion::V5).unwrap();
                assert!(
                    len <= 200,
                    "sent a {len}-byte packet to a client whose maximum is 200"
                );
                if let Packet::Publish(p) = p {
                    raw.send(&puback(p.packet_id)).await.unwrap();
                }
            }
            Ok(None) => panic!("closed"),
            Err(_) => break,
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_with_an_overlapping_plain_subscription() {
    let hub = TestHub::start().await.unwrap();
    let mut me = V5::connect(v5_opts(&hub, &uid("me"))).await;
    let mut nl = m5::Filter::new("nlo/#", m5::QoS::AtLeastOnce);
    nl.nolocal = true;
    me.subscribe_filter(
        nl,
        Some(m5::SubscribeProperties {
            id: Some(1),
            user_properties: Vec::new(),
        }),
    )
    .await;
    me.subscribe_with_id("nlo/t", m5::QoS::AtMostOnce, 2).await;
    me.publish("nlo/t", m5::QoS::AtLeastOnce, false, b"mine")
        .await;
    let p = me.recv_publish().await;
    assert_eq!(
        p.qos,
        m5::QoS::AtMostOnce,
        "only the plain subscription matched"
    );
    assert_eq!(
        p.properties.unwrap_or_default().subscription_identifiers,
        vec![2]
    );
    me.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_delivers_its_subscription_identifier() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    a.subscribe_with_id("$share/g/sid/t", m5::QoS::AtLeastOnce, 77)
        .await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("sid/t", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    let p = a.recv_publish().await;
    assert_eq!(
        p.properties.unwrap_or_default().subscription_identifiers,
        vec![77]
    );
    hub.stop().await;
}
