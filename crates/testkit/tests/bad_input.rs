//! Bad input at the byte level: malformed packets and protocol violations after CONNECT close
//! only the offending connection (v5 with the right DISCONNECT reason code, 3.1.1 silently),
//! broken or missing CONNECT packets are refused, and floods of garbage leave the hub working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub_proto::mqtt::{Packet, ProtocolVersion};
use ferrohub_testkit::{RawClient, TestHub};
use rumqttc::QoS;

/// A packet with a one-byte Remaining Length.
fn pkt(header: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![header, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A length-prefixed string.
fn s(x: &[u8]) -> Vec<u8> {
    let mut v = (x.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(x);
    v
}

/// Property length 0, in v5 only.
fn props(v5: bool) -> Vec<u8> {
    if v5 { vec![0] } else { vec![] }
}

/// A PUBLISH body: topic, packet id (if any), empty properties (v5), payload.
fn publish_body(v5: bool, topic: &[u8], pid: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut b = s(topic);
    if let Some(pid) = pid {
        b.extend_from_slice(&pid.to_be_bytes());
    }
    b.extend(props(v5));
    b.extend_from_slice(payload);
    b
}

/// Two healthy clients that must keep working whatever the others do.
struct Bystanders {
    sub: V4,
    publ: V5,
    n: usize,
}

impl Bystanders {
    async fn new(hub: &TestHub) -> Bystanders {
        let mut sub = V4::connect(v4_opts(hub, &uid("bystander-sub"))).await;
        sub.subscribe("bystander/t", QoS::AtLeastOnce).await;
        let publ = V5::connect(v5_opts(hub, &uid("bystander-pub"))).await;
        Bystanders { sub, publ, n: 0 }
    }

    async fn still_work(&mut self) {
        self.n += 1;
        let payload = format!("still here {}", self.n);
        let ack = self
            .publ
            .publish(
                "bystander/t",
                m5::QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
        assert_eq!(ack, Some(m5::PubAckReason::Success));
        assert_eq!(
            self.sub.recv_publish().await.payload.as_ref(),
            payload.as_bytes()
        );
    }
}

/// Connects (v5 or 3.1.1), sends `bytes`, and expects the server to close the connection:
/// for v5 with a DISCONNECT whose reason code is one of `codes`, for 3.1.1 without any packet.
async fn expect_rejected(hub: &TestHub, v5: bool, bytes: &[u8], codes: &[u8], what: &str) {
    let version = if v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    };
    let (mut raw, _) = raw_connect(hub.mqtt, version, &uid("bad"), |_| {}).await;
    raw.send_bytes(bytes).await.unwrap();
    let seen = raw
        .expect_close(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{what} ({version:?}): connection not closed: {e}"));
    if v5 {
        let code = seen.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.code),
            _ => None,
        });
        assert!(
            code.is_some_and(|c| codes.contains(&c)),
            "{what} (v5): expected DISCONNECT with one of {codes:02x?}, got {seen:?}"
        );
    } else {
        assert!(
            seen.is_empty(),
            "{what} (3.1.1): expected a plain close, got {seen:?}"
        );
    }
}

const MALFORMED: &[u8] = &[0x81];
const PROTOCOL: &[u8] = &[0x82];
const MALFORMED_OR_PROTOCOL: &[u8] = &[0x81, 0x82];

macro_rules! rejected {
    ($(#[$m:meta])* $name:ident, $codes:expr, |$v5:ident| $bytes:expr) => {
        $(#[$m])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let hub = TestHub::start().await.unwrap();
            let mut bystanders = Bystanders::new(&hub).await;
            for $v5 in [true, false] {
                let bytes: Vec<u8> = $bytes;
                expect_rejected(&hub, $v5, &bytes, $codes, stringify!($name)).await;
                bystanders.still_work().await;
            }
            hub.stop().await;
        }
    };
}

rejected!(remaining_length_over_four_bytes, MALFORMED, |_v5| vec![
    0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01
]);

rejected!(publish_with_qos_3, MALFORMED, |v5| pkt(
    0x36,
    &publish_body(v5, b"a", Some(1), b"x")
));

rejected!(qos0_publish_with_dup, MALFORMED_OR_PROTOCOL, |v5| pkt(
    0x38,
    &publish_body(v5, b"a", None, b"x")
));

rejected!(subscribe_with_reserved_flags_wrong, MALFORMED, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    b.extend(s(b"a"));
    b.push(0);
    pkt(0x80, &b)
});

rejected!(unsubscribe_with_reserved_flags_wrong, MALFORMED, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    b.extend(s(b"a"));
    pkt(0xA0, &b)
});

rejected!(pubrel_with_reserved_flags_wrong, MALFORMED, |_v5| pkt(
    0x60,
    &[0, 1]
));

rejected!(pingreq_with_a_body, MALFORMED, |_v5| pkt(0xC0, &[0]));

rejected!(reserved_packet_type_0, MALFORMED_OR_PROTOCOL, |_v5| pkt(
    0x00,
    &[]
));

rejected!(invalid_utf8_topic, MALFORMED, |v5| pkt(
    0x30,
    &publish_body(v5, &[b'a', 0xC3, 0x28], None, b"x")
));

rejected!(topic_with_null_character, MALFORMED, |v5| pkt(
    0x30,
    &publish_body(v5, b"a\0b", None, b"x")
));

rejected!(topic_with_surrogate_encoding, MALFORMED, |v5| {
    // U+D800 encoded as UTF-8 (ED A0 80) is not well-formed UTF-8.
    pkt(
        0x30,
        &publish_body(v5, &[b'a', 0xED, 0xA0, 0x80], None, b"x"),
    )
});

rejected!(single_level_wildcard_in_publish_topic, &[0x90], |v5| pkt(
    0x30,
    &publish_body(v5, b"a/+/b", None, b"x")
));

rejected!(multi_level_wildcard_in_publish_topic, &[0x90], |v5| pkt(
    0x32,
    &publish_body(v5, b"a/#", Some(1), b"x")
));

rejected!(empty_topic_without_alias, &[0x82, 0x90], |v5| pkt(
    0x30,
    &publish_body(v5, b"", None, b"x")
));

rejected!(qos1_publish_with_packet_id_0, MALFORMED_OR_PROTOCOL, |v5| {
    pkt(0x32, &publish_body(v5, b"a", Some(0), b"x"))
});

rejected!(string_longer_than_the_packet, MALFORMED, |_v5| vec![
    0x30, 0x03, 0x00, 0x05, b'a'
]);

rejected!(second_connect, PROTOCOL, |v5| {
    let mut b = s(b"MQTT");
    b.extend([if v5 { 5 } else { 4 }, 0x02, 0, 30]);
    b.extend(props(v5));
    b.extend(s(b"again"));
    pkt(0x10, &b)
});

rejected!(connack_from_client, MALFORMED_OR_PROTOCOL, |v5| {
    let mut b = vec![0, 0];
    b.extend(props(v5));
    pkt(0x20, &b)
});

rejected!(suback_from_client, MALFORMED_OR_PROTOCOL, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    b.push(0);
    pkt(0x90, &b)
});

rejected!(subscribe_without_filters, MALFORMED_OR_PROTOCOL, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    pkt(0x82, &b)
});

rejected!(unsubscribe_without_filters, MALFORMED_OR_PROTOCOL, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    pkt(0xA2, &b)
});

rejected!(subscribe_with_qos_3, MALFORMED_OR_PROTOCOL, |v5| {
    let mut b = vec![0, 1];
    b.extend(props(v5));
    b.extend(s(b"a"));
    b.push(0x03);
    pkt(0x82, &b)
});

rejected!(
    subscribe_with_reserved_option_bits,
    MALFORMED_OR_PROTOCOL,
    |v5| {
        let mut b = vec![0, 1];
        b.extend(props(v5));
        b.extend(s(b"a"));
        b.push(0xC1);
        pkt(0x82, &b)
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_only_violations() {
    let hub = TestHub::start().await.unwrap();
    let mut bystanders = Bystanders::new(&hub).await;
    let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        (
            "retain handling 3",
            {
                let mut b = vec![0, 1, 0];
                b.extend(s(b"a"));
                b.push(0x31);
                pkt(0x82, &b)
            },
            MALFORMED_OR_PROTOCOL,
        ),
        (
            "duplicate payload format indicator",
            {
                let mut b = s(b"a");
                b.extend([4, 0x01, 0x01, 0x01, 0x01]);
                b.push(b'x');
                pkt(0x30, &b)
            },
            PROTOCOL,
        ),
        (
            "unknown property identifier",
            {
                let mut b = s(b"a");
                b.extend([2, 0x7F, 0x00]);
                b.push(b'x');
                pkt(0x30, &b)
            },
            MALFORMED_OR_PROTOCOL,
        ),
        (
            "subscription identifier in a client PUBLISH",
            {
                let mut b = s(b"a");
                b.extend([2, 0x0B, 0x05]);
                b.push(b'x');
                pkt(0x30, &b)
            },
            PROTOCOL,
        ),
        (
            "property length beyond the packet",
            {
                let mut b = s(b"a");
                b.extend([40, 0x01, 0x01]);
                pkt(0x30, &b)
            },
            MALFORMED,
        ),
        (
            "AUTH without an authentication method",
            pkt(0xF0, &[0x18, 0]),
            PROTOCOL,
        ),
        (
            "response topic with a wildcard",
            {
                let mut b = s(b"a");
                let rt = s(b"r/#");
                b.push((1 + rt.len()) as u8);
                b.push(0x08);
                b.extend(rt);
                b.push(b'x');
                pkt(0x30, &b)
            },
            PROTOCOL,
        ),
        (
            "DISCONNECT with reserved flags",
            vec![0xE1, 0x00],
            MALFORMED,
        ),
    ];
    for (what, bytes, codes) in cases {
        expect_rejected(&hub, true, &bytes, codes, what).await;
        bystanders.still_work().await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_auth_packet_is_rejected() {
    let hub = TestHub::start().await.unwrap();
    let mut bystanders = Bystanders::new(&hub).await;
    expect_rejected(&hub, false, &pkt(0xF0, &[0x00]), &[], "AUTH under 3.1.1").await;
    expect_rejected(&hub, false, &[0xF0, 0x00], &[], "empty AUTH under 3.1.1").await;
    bystanders.still_work().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_acknowledgements_are_harmless() {
    let hub = TestHub::start().await.unwrap();
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (mut raw, _) = raw_connect(hub.mqtt, version, &uid("stray"), |_| {}).await;
        raw.send(&puback(999)).await.unwrap();
        raw.send(&Packet::PubComp(ferrohub_proto::mqtt::PubResponse {
            packet_id: 998,
            ..Default::default()
        }))
        .await
        .unwrap();
        raw.send(&Packet::PingReq).await.unwrap();
        raw_wait(&mut raw, "PINGRESP", |p| matches!(p, Packet::PingResp)).await;
    }
    hub.stop().await;
}

/// Sends `bytes` as the very first thing on a fresh TCP connection and expects the server to
/// close it without a successful CONNACK; returns what it sent.
async fn expect_refused_before_connect(hub: &TestHub, bytes: &[u8], what: &str) -> Vec<Packet> {
    let mut raw = RawClient::connect(hub.mqtt, ProtocolVersion::V311)
        .await
        .unwrap();
    raw.send_bytes(bytes).await.unwrap();
    let seen = raw
        .expect_close(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{what}: not closed: {e}"));
    for p in &seen {
        match p {
            Packet::ConnAck(c) => assert_ne!(c.code, 0, "{what}: accepted"),
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
    seen
}

fn connect_bytes(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut b = s(name);
    b.extend([level, flags, 0, 30]);
    if level == 5 {
        b.push(0);
    }
    b.extend_from_slice(rest);
    pkt(0x10, &b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_or_missing_connect_is_refused() {
    let hub = TestHub::start().await.unwrap();
    let mut bystanders = Bystanders::new(&hub).await;
    let id = s(b"cid");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PINGREQ first", vec![0xC0, 0x00]),
        (
            "PUBLISH first",
            pkt(0x30, &publish_body(false, b"a", None, b"x")),
        ),
        ("SUBSCRIBE first", {
            let mut b = vec![0, 1];
            b.extend(s(b"#"));
            b.push(0);
            pkt(0x82, &b)
        }),
        ("CONNECT with reserved flags in the fixed header", {
            let mut v = connect_bytes(b"MQTT", 4, 0x02, &id);
            v[0] = 0x11;
            v
        }),
        ("wrong protocol name", connect_bytes(b"MQTX", 4, 0x02, &id)),
        (
            "reserved connect flag",
            connect_bytes(b"MQTT", 4, 0x03, &id),
        ),
        (
            "will QoS without will flag",
            connect_bytes(b"MQTT", 4, 0x0A, &id),
        ),
        (
            "will retain without will flag",
            connect_bytes(b"MQTT", 4, 0x22, &id),
        ),
        ("will QoS 3", {
            let mut rest = id.clone();
            rest.extend(s(b"w"));
            rest.extend(s(b"m"));
            connect_bytes(b"MQTT", 4, 0x1E, &rest)
        }),
        ("3.1.1 password without user name", {
            let mut rest = id.clone();
            rest.extend(s(b"secret"));
            connect_bytes(b"MQTT", 4, 0x42, &rest)
        }),
        (
            "invalid UTF-8 client id",
            connect_bytes(b"MQTT", 4, 0x02, &s(&[0xC3, 0x28])),
        ),
        (
            "truncated CONNECT",
            vec![0x10, 0x04, 0x00, 0x04, b'M', b'Q'],
        ),
        ("huge remaining length", vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F]),
    ];
    for (what, bytes) in cases {
        expect_refused_before_connect(&hub, &bytes, what).await;
        bystanders.still_work().await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_gets_connack_refusal() {
    let hub = TestHub::start().await.unwrap();
    // 3.1.1 [MQTT-3.1.2-2]: CONNACK 0x01 then close.
    let seen =
        expect_refused_before_connect(&hub, &connect_bytes(b"MQTT", 6, 0x02, &s(b"x")), "level 6")
            .await;
    assert!(
        matches!(seen.as_slice(), [Packet::ConnAck(c)] if c.code == 0x01 || c.code == 0x84),
        "{seen:?}"
    );
    let seen =
        expect_refused_before_connect(&hub, &connect_bytes(b"MQTT", 2, 0x02, &s(b"x")), "level 2")
            .await;
    assert!(
        matches!(seen.as_slice(), [Packet::ConnAck(c)] if c.code == 0x01),
        "{seen:?}"
    );
    hub.stop().await;
}

/// A deterministic byte generator (xorshift).
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_floods_do_not_hurt_the_hub() {
    let hub = TestHub::start().await.unwrap();
    let mut bystanders = Bystanders::new(&hub).await;
    let mut tasks = Vec::new();
    for seed in 0..16u64 {
        let addr = hub.mqtt;
        tasks.push(tokio::spawn(async move {
            let mut raw = RawClient::connect(addr, ProtocolVersion::V5).await.unwrap();
            if seed % 2 == 0 {
                // After a valid CONNECT.
                let c = connect_packet(ProtocolVersion::V5, &format!("garbage-{seed}"));
                raw.send(&Packet::Connect(Box::new(c))).await.unwrap();
            }
            for chunk in 0..16 {
                // The server may close at any point: write errors are expected.
                if raw
                    .send_bytes(&garbage(seed * 1000 + chunk, 16 * 1024))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Whatever it answered, it must close the connection.
            let _ = raw.expect_close(Duration::from_secs(8)).await;
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(9), t)
            .await
            .expect("flood connection not closed")
            .unwrap();
    }
    bystanders.still_work().await;
    // Nothing leaked: only the two bystanders are connected.
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 2.0).await;
    let (status, _) = http_get(&hub, "/healthz").await;
    assert_eq!(status, 200);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connect_properties_with_forbidden_values_are_refused() {
    let hub = TestHub::start().await.unwrap();
    let mut bystanders = Bystanders::new(&hub).await;
    // [MQTT-3.1.2.11.3] Receive Maximum 0 and [MQTT-3.1.2.11.4] Maximum Packet Size 0 are
    // Protocol Errors; accepting them would leave the session unable to receive anything.
    for (what, f) in [
        (
            "Receive Maximum 0",
            Box::new(|c: &mut ferrohub_proto::mqtt::Connect| c.properties.receive_maximum = Some(0))
                as Box<dyn Fn(&mut ferrohub_proto::mqtt::Connect)>,
        ),
        (
            "Maximum Packet Size 0",
            Box::new(|c: &mut ferrohub_proto::mqtt::Connect| {
                c.properties.maximum_packet_size = Some(0)
            }),
        ),
    ] {
        let mut c = connect_packet(ProtocolVersion::V5, &uid("forbidden"));
        f(&mut c);
        let mut raw = RawClient::connect(hub.mqtt, ProtocolVersion::V5)
            .await
            .unwrap();
        raw.send(&Packet::Connect(Box::new(c))).await.unwrap();
        let seen = raw
            .expect_close(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: connection not closed: {e}"));
        for p in &seen {
            match p {
                Packet::ConnAck(c) => assert!(c.code >= 0x80, "{what}: accepted"),
                Packet::Disconnect(_) => {}
                other => panic!("{what}: unexpected {other:?}"),
            }
        }
        bystanders.still_work().await;
    }
    hub.stop().await;
}
