//! Byte-level golden tests: packets written out by hand from the MQTT 3.1.1 and 5.0 specs,
//! decoded to the expected value and (for canonical encodings) encoded back to the same bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use common::{decode_one, encode_vec};
use ferrohub_proto::mqtt::*;
use ferrohub_types::QoS;

use ProtocolVersion::{V5, V31, V311};

/// Decodes `bytes` to `expected` and encodes `expected` back to `bytes`.
fn golden(bytes: &[u8], version: ProtocolVersion, expected: Packet) {
    assert_eq!(decode_one(bytes, version), Ok(expected.clone()), "decode");
    assert_eq!(encode_vec(&expected, version), bytes, "encode");
}

fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

#[test]
fn connect_v311_with_credentials() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 21,
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
        0x04,                               // level 4
        0xC2,                               // user name, password, clean session
        0x00, 0x3C,                         // keep alive 60
        0x00, 0x03, b'a', b'b', b'c',       // client id
        0x00, 0x01, b'u',                   // user name
        0x00, 0x01, b'p',                   // password
    ];
    let expected = Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "abc".into(),
        will: None,
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        properties: ConnectProperties::default(),
    };
    golden(&bytes, V311, Packet::Connect(Box::new(expected.clone())));
    // CONNECT describes itself: the connection's version argument does not matter.
    assert_eq!(
        decode_one(&bytes, V5),
        Ok(Packet::Connect(Box::new(expected)))
    );
}

#[test]
fn connect_v311_with_will() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 22,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        0x2E,                               // will retain, will QoS 1, will flag, clean
        0x00, 0x00,
        0x00, 0x00,                         // empty client id
        0x00, 0x03, b'w', b'/', b't',       // will topic
        0x00, 0x03, b'b', b'y', b'e',       // will payload
    ];
    golden(
        &bytes,
        V311,
        Packet::Connect(Box::new(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 0,
            client_id: String::new(),
            will: Some(Will {
                topic: arc("w/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties::default(),
            }),
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })),
    );
}

#[test]
fn connect_v31() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 16,
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03,
        0x02, 0x00, 0x0A,
        0x00, 0x02, b'c', b'1',
    ];
    golden(
        &bytes,
        V311,
        Packet::Connect(Box::new(Connect {
            protocol: V31,
            clean_start: true,
            keep_alive: 10,
            client_id: "c1".into(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })),
    );
}

#[test]
fn connect_v5_with_properties_and_will() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 40,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
        0x4C,                               // password (no user name: fine in v5), will QoS 1, will
        0x00, 0x1E,                         // keep alive 30
        0x08,                               // properties: 8 bytes
        0x11, 0x00, 0x00, 0x00, 0x0A,       //   Session Expiry Interval 10
        0x21, 0x00, 0x14,                   //   Receive Maximum 20
        0x00, 0x02, b'c', b'1',             // client id
        0x05,                               // will properties: 5 bytes
        0x18, 0x00, 0x00, 0x00, 0x05,       //   Will Delay Interval 5
        0x00, 0x01, b'w',                   // will topic
        0x00, 0x02, 0x01, 0x02,             // will payload
        0x00, 0x02, b'p', b'w',             // password
    ];
    golden(
        &bytes,
        V5,
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            clean_start: false,
            keep_alive: 30,
            client_id: "c1".into(),
            will: Some(Will {
                topic: arc("w"),
                payload: Bytes::from_static(&[1, 2]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties {
                    delay_interval: Some(5),
                    ..Default::default()
                },
            }),
            username: None,
            password: Some(Bytes::from_static(b"pw")),
            properties: ConnectProperties {
                session_expiry_interval: Some(10),
                receive_maximum: Some(20),
                ..Default::default()
            },
        })),
    );
}

#[test]
fn connack_v311() {
    golden(
        &[0x20, 0x02, 0x01, 0x00],
        V311,
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: ConnAckProperties::default(),
        }),
    );
    // A v3 return code is written as given.
    golden(
        &[0x20, 0x02, 0x00, 0x05],
        V311,
        Packet::ConnAck(ConnAck {
            code: reason::V3_NOT_AUTHORIZED,
            ..Default::default()
        }),
    );
}

#[test]
fn connack_v5_with_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x20, 11,
        0x00, 0x00,                         // no session, success
        0x08,                               // properties: 8 bytes
        0x12, 0x00, 0x02, b'i', b'd',       //   Assigned Client Identifier "id"
        0x22, 0x00, 0x0A,                   //   Topic Alias Maximum 10
    ];
    golden(
        &bytes,
        V5,
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            properties: ConnAckProperties {
                assigned_client_identifier: Some("id".into()),
                topic_alias_maximum: Some(10),
                ..Default::default()
            },
        }),
    );
}

#[test]
fn publish_v311_qos1() {
    let bytes = [
        0x32, 9, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
    ];
    golden(
        &bytes,
        V311,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: arc("a/b"),
            packet_id: 10,
            properties: PublishProperties::default(),
            payload: Bytes::from_static(b"hi"),
        }),
    );
}

#[test]
fn publish_v311_qos0_retained_and_qos2_dup() {
    golden(
        &[0x31, 4, 0x00, 0x01, b't', b'x'],
        V311,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: arc("t"),
            packet_id: 0,
            properties: PublishProperties::default(),
            payload: Bytes::from_static(b"x"),
        }),
    );
    golden(
        &[0x3C, 5, 0x00, 0x01, b't', 0xFF, 0xFF],
        V311,
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: arc("t"),
            packet_id: 0xFFFF,
            properties: PublishProperties::default(),
            payload: Bytes::new(),
        }),
    );
}

#[test]
fn publish_v5_with_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x32, 29,
        0x00, 0x03, b'a', b'/', b'b',
        0x00, 0x0A,                         // packet id 10
        19,                                 // properties: 19 bytes
        0x01, 0x01,                         //   Payload Format Indicator: UTF-8
        0x23, 0x00, 0x05,                   //   Topic Alias 5
        0x09, 0x00, 0x02, 0xCA, 0xFE,       //   Correlation Data
        0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // User Property k=v
        0x0B, 0x07,                         //   Subscription Identifier 7
        b'h', b'i',                         // payload
    ];
    golden(
        &bytes,
        V5,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: arc("a/b"),
            packet_id: 10,
            properties: PublishProperties {
                payload_format_indicator: Some(1),
                topic_alias: Some(5),
                correlation_data: Some(Bytes::from_static(&[0xCA, 0xFE])),
                user_properties: vec![(arc("k"), arc("v"))],
                subscription_identifiers: vec![7],
                ..Default::default()
            },
            payload: Bytes::from_static(b"hi"),
        }),
    );
}

#[test]
fn publish_v5_empty_topic_with_alias() {
    golden(
        &[0x30, 6, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01],
        V5,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: arc(""),
            packet_id: 0,
            properties: PublishProperties {
                topic_alias: Some(1),
                ..Default::default()
            },
            payload: Bytes::new(),
        }),
    );
}

#[test]
fn publish_payload_is_zero_copy() {
    let bytes = [0x30, 7, 0x00, 0x01, b't', b'a', b'b', b'c', b'd'];
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V311, 1024) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(&p.payload[..], b"abcd");
    assert_eq!(p.payload.as_ptr() as usize, base + 5, "payload was copied");
}

#[test]
fn subscribe_v311() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 12,
        0x00, 0x01,
        0x00, 0x03, b'a', b'/', b'b', 0x01,
        0x00, 0x01, b'#', 0x02,
    ];
    let opts = |q| SubscriptionOptions {
        qos: q,
        ..Default::default()
    };
    golden(
        &bytes,
        V311,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscription_identifier: None,
            user_properties: vec![],
            filters: vec![
                SubscribeFilter {
                    filter: "a/b".into(),
                    options: opts(QoS::AtLeastOnce),
                },
                SubscribeFilter {
                    filter: "#".into(),
                    options: opts(QoS::ExactlyOnce),
                },
            ],
        }),
    );
}

#[test]
fn subscribe_v5_with_options() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 25,
        0x00, 0x02,
        0x03, 0x0B, 0x80, 0x01,             // Subscription Identifier 128 (two-byte varint)
        0x00, 0x03, b'a', b'/', b'+',
        0x2D,                               // retain handling 2, RAP, no local, QoS 1
        0x00, 0x0A, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b'x',
        0x00,
    ];
    golden(
        &bytes,
        V5,
        Packet::Subscribe(Subscribe {
            packet_id: 2,
            subscription_identifier: Some(128),
            user_properties: vec![],
            filters: vec![
                SubscribeFilter {
                    filter: "a/+".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                },
                SubscribeFilter {
                    filter: "$share/g/x".into(),
                    options: SubscriptionOptions::default(),
                },
            ],
        }),
    );
}

#[test]
fn suback_unsubscribe_unsuback() {
    golden(
        &[0x90, 0x04, 0x00, 0x01, 0x01, 0x80],
        V311,
        Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![1, 0x80],
            properties: AckProperties::default(),
        }),
    );
    golden(
        &[0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0x87],
        V5,
        Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![1, reason::NOT_AUTHORIZED],
            properties: AckProperties::default(),
        }),
    );
    golden(
        &[0xA2, 0x05, 0x00, 0x07, 0x00, 0x01, b'#'],
        V311,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 7,
            user_properties: vec![],
            filters: vec!["#".into()],
        }),
    );
    golden(
        &[0xA2, 0x06, 0x00, 0x07, 0x00, 0x00, 0x01, b'#'],
        V5,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 7,
            user_properties: vec![],
            filters: vec!["#".into()],
        }),
    );
    golden(
        &[0xB0, 0x02, 0x00, 0x07],
        V311,
        Packet::UnsubAck(UnsubAck {
            packet_id: 7,
            ..Default::default()
        }),
    );
    golden(
        &[0xB0, 0x04, 0x00, 0x07, 0x00, 0x11],
        V5,
        Packet::UnsubAck(UnsubAck {
            packet_id: 7,
            codes: vec![reason::NO_SUBSCRIPTION_EXISTED],
            properties: AckProperties::default(),
        }),
    );
}

#[test]
fn puback_v5_short_forms() {
    let ack = |code| {
        Packet::PubAck(PubResponse {
            packet_id: 10,
            code,
            properties: AckProperties::default(),
        })
    };
    // Remaining Length 2: reason code omitted, meaning Success.
    golden(&[0x40, 0x02, 0x00, 0x0A], V5, ack(0));
    // Remaining Length 3: reason code without a property length.
    golden(&[0x40, 0x03, 0x00, 0x0A, 0x10], V5, ack(0x10));
    // Remaining Length 4 with an empty property block is accepted (and re-encoded shorter).
    assert_eq!(
        decode_one(&[0x40, 0x04, 0x00, 0x0A, 0x00, 0x00], V5),
        Ok(ack(0))
    );
    // With a Reason String.
    golden(
        &[
            0x40, 0x09, 0x00, 0x0A, 0x10, 0x05, 0x1F, 0x00, 0x02, b'n', b'o',
        ],
        V5,
        Packet::PubAck(PubResponse {
            packet_id: 10,
            code: 0x10,
            properties: AckProperties {
                reason_string: Some("no".into()),
                user_properties: vec![],
            },
        }),
    );
    // PUBREL keeps its 0010 flags; PUBREC and PUBCOMP share the shape.
    golden(
        &[0x62, 0x02, 0x00, 0x0A],
        V5,
        Packet::PubRel(PubResponse {
            packet_id: 10,
            ..Default::default()
        }),
    );
    golden(
        &[0x50, 0x03, 0x00, 0x0A, 0x80],
        V5,
        Packet::PubRec(PubResponse {
            packet_id: 10,
            code: 0x80,
            ..Default::default()
        }),
    );
    golden(
        &[0x70, 0x02, 0x00, 0x0A],
        V311,
        Packet::PubComp(PubResponse {
            packet_id: 10,
            ..Default::default()
        }),
    );
}

#[test]
fn disconnect_forms() {
    golden(
        &[0xE0, 0x00],
        V311,
        Packet::Disconnect(Disconnect::default()),
    );
    golden(&[0xE0, 0x00], V5, Packet::Disconnect(Disconnect::default()));
    let with_will = Packet::Disconnect(Disconnect {
        code: reason::DISCONNECT_WITH_WILL,
        ..Default::default()
    });
    // A reason code without property length decodes; it is encoded with an empty property block
    // for the clients that cannot parse the one-byte form.
    assert_eq!(decode_one(&[0xE0, 0x01, 0x04], V5), Ok(with_will.clone()));
    golden(&[0xE0, 0x02, 0x04, 0x00], V5, with_will);
    golden(
        &[0xE0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x3C],
        V5,
        Packet::Disconnect(Disconnect {
            code: 0,
            properties: DisconnectProperties {
                session_expiry_interval: Some(60),
                ..Default::default()
            },
        }),
    );
}

#[test]
fn ping_and_auth() {
    golden(&[0xC0, 0x00], V311, Packet::PingReq);
    golden(&[0xD0, 0x00], V5, Packet::PingResp);
    golden(&[0xF0, 0x00], V5, Packet::Auth(Auth::default()));
    #[rustfmt::skip]
    let bytes = [
        0xF0, 13,
        0x18,                               // Continue authentication
        11,
        0x15, 0x00, 0x04, b'S', b'C', b'R', b'A',
        0x16, 0x00, 0x01, 0x2A,
    ];
    golden(
        &bytes,
        V5,
        Packet::Auth(Auth {
            code: reason::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some("SCRA".into()),
                authentication_data: Some(Bytes::from_static(&[0x2A])),
                ..Default::default()
            },
        }),
    );
}

/// Under 3.1.1, v5-only fields are dropped on encode.
#[test]
fn v5_fields_dropped_under_v311() {
    let puback = Packet::PubAck(PubResponse {
        packet_id: 3,
        code: 0x10,
        properties: AckProperties {
            reason_string: Some("x".into()),
            user_properties: vec![],
        },
    });
    assert_eq!(encode_vec(&puback, V311), [0x40, 0x02, 0x00, 0x03]);

    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 3,
        codes: vec![0, 0x11],
        properties: AckProperties::default(),
    });
    assert_eq!(encode_vec(&unsuback, V311), [0xB0, 0x02, 0x00, 0x03]);

    let disconnect = Packet::Disconnect(Disconnect {
        code: reason::SERVER_SHUTTING_DOWN,
        properties: DisconnectProperties {
            reason_string: Some("bye".into()),
            ..Default::default()
        },
    });
    assert_eq!(encode_vec(&disconnect, V311), [0xE0, 0x00]);

    let suback = Packet::SubAck(SubAck {
        packet_id: 3,
        codes: vec![1, reason::NOT_AUTHORIZED],
        properties: AckProperties::default(),
    });
    assert_eq!(
        encode_vec(&suback, V311),
        [0x90, 0x04, 0x00, 0x03, 0x01, 0x80]
    );

    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: arc("t"),
        packet_id: 0,
        properties: PublishProperties {
            message_expiry_interval: Some(5),
            ..Default::default()
        },
        payload: Bytes::from_static(b"p"),
    });
    assert_eq!(
        encode_vec(&publish, V311),
        [0x30, 0x04, 0x00, 0x01, b't', b'p']
    );
}

#[test]
fn encode_errors() {
    let mut buf = BytesMut::new();
    let auth = Packet::Auth(Auth::default());
    assert_eq!(
        encode(&auth, V311, &mut buf),
        Err(EncodeError::NotInVersion("AUTH"))
    );
    assert_eq!(
        encoded_len(&auth, V311),
        Err(EncodeError::NotInVersion("AUTH"))
    );

    let long = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Arc::from("x".repeat(65_536)),
        packet_id: 0,
        properties: PublishProperties::default(),
        payload: Bytes::new(),
    });
    assert_eq!(
        encode(&long, V5, &mut buf),
        Err(EncodeError::FieldTooLong("topic"))
    );
    assert!(buf.is_empty(), "nothing is written on error");

    // 65,535 bytes is still fine.
    let Packet::Publish(mut p) = long else {
        unreachable!()
    };
    p.topic = Arc::from("x".repeat(65_535));
    assert_eq!(
        encoded_len(&Packet::Publish(p.clone()), V5),
        Ok(1 + 3 + 2 + 65_535 + 1)
    );

    // Remaining Length over 268,435,455. `vec![0; n]` is calloc'd, so this costs no memory.
    p.topic = Arc::from("t");
    p.payload = Bytes::from(vec![0u8; 268_435_455]);
    let huge = Packet::Publish(p);
    assert_eq!(encoded_len(&huge, V311), Err(EncodeError::TooLarge));
    assert_eq!(encode(&huge, V311, &mut buf), Err(EncodeError::TooLarge));
    assert!(buf.is_empty());
}

/// The largest encodable packet is sized right (4-byte Remaining Length).
#[test]
fn encoded_len_at_the_limit() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: arc("t"),
        packet_id: 0,
        properties: PublishProperties::default(),
        payload: Bytes::from(vec![0u8; 268_435_455 - 3]),
    });
    assert_eq!(encoded_len(&p, V311), Ok(1 + 4 + 268_435_455));
}
