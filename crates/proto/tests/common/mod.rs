//! Shared test helpers: proptest strategies for every packet, restricted to what each protocol
//! version can represent (so that encode → decode must give back the same value).

#![allow(dead_code)]

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::*;
use ferrohub_types::QoS;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

/// Decodes exactly one packet from `bytes`, which must hold exactly that packet.
pub fn decode_one(bytes: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, version, usize::MAX)?;
    let p = p.expect("complete packet");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    Ok(p)
}

/// Encodes one packet.
pub fn encode_vec(p: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf).expect("encodable");
    assert_eq!(encoded_len(p, version).expect("encodable"), buf.len());
    buf.to_vec()
}

/// A UTF-8 string without U+0000 (which MQTT forbids).
pub fn text() -> impl Strategy<Value = String> {
    "[^\\x00]{0,8}"
}

fn arc() -> impl Strategy<Value = Arc<str>> {
    text().prop_map(Arc::from)
}

fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn users() -> impl Strategy<Value = UserProperties> {
    vec((arc(), arc()), 0..3)
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    of(0u8..=1)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn sub_id() -> impl Strategy<Value = u32> {
    1u32..=268_435_455
}

fn connect_props() -> impl Strategy<Value = ConnectProperties> {
    (
        of(any::<u32>()),
        of(1u16..),
        of(1u32..),
        of(any::<u16>()),
        flag(),
        flag(),
        users(),
        of(text()),
        of(bin()),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i)| ConnectProperties {
            session_expiry_interval: a,
            receive_maximum: b,
            maximum_packet_size: c,
            topic_alias_maximum: d,
            request_response_information: e,
            request_problem_information: f,
            user_properties: g,
            // Authentication Data without a method is a protocol error.
            authentication_data: h.as_ref().and(i),
            authentication_method: h,
        })
}

fn will_props() -> impl Strategy<Value = WillProperties> {
    (
        of(any::<u32>()),
        flag(),
        of(any::<u32>()),
        of(arc()),
        of(arc()),
        of(bin()),
        users(),
    )
        .prop_map(|(a, b, c, d, e, f, g)| WillProperties {
            delay_interval: a,
            payload_format_indicator: b,
            message_expiry_interval: c,
            content_type: d,
            response_topic: e,
            correlation_data: f,
            user_properties: g,
        })
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Connect> {
    let v5 = version.is_v5();
    let protocol = if v5 {
        Just(ProtocolVersion::V5).boxed()
    } else {
        prop_oneof![Just(ProtocolVersion::V311), Just(ProtocolVersion::V31)].boxed()
    };
    let will_props = if v5 {
        will_props().boxed()
    } else {
        Just(WillProperties::default()).boxed()
    };
    let will = of((arc(), bin(), qos(), any::<bool>(), will_props).prop_map(
        |(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        },
    ));
    let props = if v5 {
        connect_props().boxed()
    } else {
        Just(ConnectProperties::default()).boxed()
    };
    (
        protocol,
        any::<bool>(),
        any::<u16>(),
        text(),
        will,
        of(text()),
        of(bin()),
        props,
    )
        .prop_map(
            move |(
                protocol,
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                properties,
            )| {
                // 3.1.1 cannot carry a password without a user name.
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }
            },
        )
}

fn connack_props() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            of(any::<u32>()),
            of(1u16..),
            flag(),
            flag(),
            of(1u32..),
            of(text()),
            of(any::<u16>()),
            of(text()),
            users(),
        ),
        (
            flag(),
            flag(),
            flag(),
            of(any::<u16>()),
            of(text()),
            of(text()),
            of(text()),
            of(bin()),
        ),
    )
        .prop_map(|((a, b, c, d, e, f, g, h, i), (j, k, l, m, n, o, p, q))| {
            ConnAckProperties {
                session_expiry_interval: a,
                receive_maximum: b,
                maximum_qos: c,
                retain_available: d,
                maximum_packet_size: e,
                assigned_client_identifier: f,
                topic_alias_maximum: g,
                reason_string: h,
                user_properties: i,
                wildcard_subscription_available: j,
                subscription_identifiers_available: k,
                shared_subscription_available: l,
                server_keep_alive: m,
                response_information: n,
                server_reference: o,
                authentication_method: p,
                authentication_data: q,
            }
        })
}

fn connack(v5: bool) -> impl Strategy<Value = ConnAck> {
    let props = if v5 {
        connack_props().boxed()
    } else {
        Just(ConnAckProperties::default()).boxed()
    };
    (any::<bool>(), any::<u8>(), props).prop_map(|(session_present, code, properties)| ConnAck {
        session_present,
        code,
        properties,
    })
}

fn publish_props() -> impl Strategy<Value = PublishProperties> {
    (
        flag(),
        of(any::<u32>()),
        of(1u16..),
        of(arc()),
        of(bin()),
        users(),
        vec(sub_id(), 0..3),
        of(arc()),
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| PublishProperties {
            payload_format_indicator: a,
            message_expiry_interval: b,
            topic_alias: c,
            response_topic: d,
            correlation_data: e,
            user_properties: f,
            subscription_identifiers: g,
            content_type: h,
        })
}

/// A PUBLISH representable in the given version.
pub fn publish(v5: bool) -> impl Strategy<Value = Publish> {
    let props = if v5 {
        publish_props().boxed()
    } else {
        Just(PublishProperties::default()).boxed()
    };
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        arc(),
        1u16..,
        props,
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: if at_most_once { 0 } else { id },
                properties,
                payload: Bytes::from(payload),
            }
        })
}

fn ack_props(v5: bool) -> BoxedStrategy<AckProperties> {
    if v5 {
        (of(text()), users())
            .prop_map(|(reason_string, user_properties)| AckProperties {
                reason_string,
                user_properties,
            })
            .boxed()
    } else {
        Just(AckProperties::default()).boxed()
    }
}

fn pub_response(v5: bool) -> impl Strategy<Value = PubResponse> {
    let code = if v5 {
        any::<u8>().boxed()
    } else {
        Just(0).boxed()
    };
    (any::<u16>(), code, ack_props(v5)).prop_map(|(packet_id, code, properties)| PubResponse {
        packet_id,
        code,
        properties,
    })
}

fn options(v5: bool) -> BoxedStrategy<SubscriptionOptions> {
    if v5 {
        (qos(), any::<bool>(), any::<bool>(), 0u8..=2)
            .prop_map(
                |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                },
            )
            .boxed()
    } else {
        qos()
            .prop_map(|qos| SubscriptionOptions {
                qos,
                ..Default::default()
            })
            .boxed()
    }
}

fn subscribe(v5: bool) -> impl Strategy<Value = Subscribe> {
    let props = if v5 {
        (of(sub_id()), users()).boxed()
    } else {
        Just((None, Vec::new())).boxed()
    };
    (
        1u16..,
        props,
        vec(
            (text(), options(v5)).prop_map(|(filter, options)| SubscribeFilter { filter, options }),
            1..4,
        ),
    )
        .prop_map(
            |(packet_id, (subscription_identifier, user_properties), filters)| Subscribe {
                packet_id,
                subscription_identifier,
                user_properties,
                filters,
            },
        )
}

fn suback(v5: bool) -> impl Strategy<Value = SubAck> {
    let codes = if v5 {
        vec(any::<u8>(), 0..5).boxed()
    } else {
        vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 0..5).boxed()
    };
    (any::<u16>(), codes, ack_props(v5)).prop_map(|(packet_id, codes, properties)| SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Unsubscribe> {
    let users = if v5 {
        users().boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (1u16.., users, vec(text(), 1..4)).prop_map(|(packet_id, user_properties, filters)| {
        Unsubscribe {
            packet_id,
            user_properties,
            filters,
        }
    })
}

fn unsuback(v5: bool) -> impl Strategy<Value = UnsubAck> {
    let codes = if v5 {
        vec(any::<u8>(), 0..5).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (any::<u16>(), codes, ack_props(v5)).prop_map(|(packet_id, codes, properties)| UnsubAck {
        packet_id,
        codes,
        properties,
    })
}

fn disconnect(v5: bool) -> BoxedStrategy<Disconnect> {
    if !v5 {
        return Just(Disconnect::default()).boxed();
    }
    (
        any::<u8>(),
        of(any::<u32>()),
        of(text()),
        users(),
        of(text()),
    )
        .prop_map(|(code, a, b, c, d)| Disconnect {
            code,
            properties: DisconnectProperties {
                session_expiry_interval: a,
                reason_string: b,
                user_properties: c,
                server_reference: d,
            },
        })
        .boxed()
}

fn auth() -> impl Strategy<Value = Auth> {
    (any::<u8>(), of(text()), of(bin()), of(text()), users()).prop_map(|(code, a, b, c, d)| Auth {
        code,
        properties: AuthProperties {
            authentication_method: a,
            authentication_data: b,
            reason_string: c,
            user_properties: d,
        },
    })
}

/// Any packet representable under `version`.
pub fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let common = prop_oneof![
        connect(version).prop_map(|c| Packet::Connect(Box::new(c))),
        connack(v5).prop_map(Packet::ConnAck),
        publish(v5).prop_map(Packet::Publish),
        pub_response(v5).prop_map(Packet::PubAck),
        pub_response(v5).prop_map(Packet::PubRec),
        pub_response(v5).prop_map(Packet::PubRel),
        pub_response(v5).prop_map(Packet::PubComp),
        subscribe(v5).prop_map(Packet::Subscribe),
        suback(v5).prop_map(Packet::SubAck),
        unsubscribe(v5).prop_map(Packet::Unsubscribe),
        unsuback(v5).prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(v5).prop_map(Packet::Disconnect),
    ];
    if v5 {
        prop_oneof![14 => common, 1 => auth().prop_map(Packet::Auth)].boxed()
    } else {
        common.boxed()
    }
}
