//! Every receiver-side check: each malformed input gets the right error variant.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

mod common;

use bytes::BytesMut;
use common::decode_one;
use ferrohub_proto::mqtt::*;

use ProtocolVersion::{V5, V311};

/// The error kind, without its message.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Malformed,
    Protocol,
    TooLarge,
    Unsupported,
}

fn kind(bytes: &[u8], version: ProtocolVersion) -> Kind {
    match decode_one(bytes, version) {
        Ok(p) => panic!("{bytes:02X?} decoded to {p:?}"),
        Err(DecodeError::Malformed(_)) => Kind::Malformed,
        Err(DecodeError::Protocol(_)) => Kind::Protocol,
        Err(DecodeError::TooLarge { .. }) => Kind::TooLarge,
        Err(DecodeError::UnsupportedProtocol { .. }) => Kind::Unsupported,
    }
}

fn malformed(bytes: &[u8], version: ProtocolVersion) {
    assert_eq!(kind(bytes, version), Kind::Malformed, "{bytes:02X?}");
}

fn protocol(bytes: &[u8], version: ProtocolVersion) {
    assert_eq!(kind(bytes, version), Kind::Protocol, "{bytes:02X?}");
}

/// A v5 packet of type byte `first` whose body is `head`, a property block, then `tail`.
fn with_props(first: u8, head: &[u8], props: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut body = head.to_vec();
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(tail);
    let mut out = vec![first, body.len() as u8];
    out.extend(body);
    out
}

/// A v5 CONNECT with the given CONNECT properties.
fn connect_v5(props: &[u8]) -> Vec<u8> {
    with_props(
        0x10,
        &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0],
        props,
        &[0, 0],
    )
}

/// A v5 QoS 0 PUBLISH to "t" with the given properties.
fn publish_v5(props: &[u8]) -> Vec<u8> {
    with_props(0x30, &[0, 1, b't'], props, b"x")
}

/// A v5 SUBSCRIBE (id 1) to "t" with the given properties and options byte.
fn subscribe_v5(props: &[u8], options: u8) -> Vec<u8> {
    with_props(0x82, &[0, 1], props, &[0, 1, b't', options])
}

#[test]
fn remaining_length_over_four_bytes() {
    malformed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V311);
    // Even with the buffer ending there: the fifth byte is never needed.
    let mut buf = BytesMut::from(&[0xC0, 0x80, 0x80, 0x80, 0x80][..]);
    assert!(matches!(
        decode(&mut buf, V5, usize::MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn reserved_packet_type_and_flags() {
    malformed(&[0x00, 0x00], V311);
    malformed(&[0x60, 0x02, 0x00, 0x01], V311); // PUBREL must be 0010
    malformed(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00], V311);
    malformed(&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b't'], V311);
    malformed(&[0x41, 0x02, 0x00, 0x01], V311);
    malformed(&[0xC1, 0x00], V5);
    malformed(&[0xE8, 0x00], V5);
    malformed(&[0x12, 0x00], V311); // CONNECT flags
    malformed(&[0x22, 0x02, 0x00, 0x00], V311);
    malformed(&[0xF1, 0x00], V5);
}

#[test]
fn publish_flags() {
    malformed(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01], V311); // QoS 3
    malformed(&[0x38, 0x03, 0x00, 0x01, b't'], V311); // DUP on QoS 0
    malformed(&[0x3E, 0x05, 0x00, 0x01, b't', 0x00, 0x01], V5);
}

#[test]
fn connect_flags() {
    let connect = |flags: u8, tail: &[u8]| {
        let mut v = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 0, 0, 0];
        v.extend_from_slice(tail);
        v[1] = (v.len() - 2) as u8;
        v
    };
    let will = [0, 1, b'w', 0, 0];
    assert!(decode_one(&connect(0x00, &[]), V311).is_ok());
    malformed(&connect(0x01, &[]), V311); // reserved
    malformed(&connect(0x08, &[]), V311); // will QoS without will flag
    malformed(&connect(0x10, &[]), V311);
    malformed(&connect(0x20, &[]), V311); // will retain without will flag
    malformed(&connect(0x1C, &will), V311); // will QoS 3
    assert!(decode_one(&connect(0x2C, &will), V311).is_ok());
    malformed(&connect(0x40, &[0, 1, b'p']), V311); // password without user name
    malformed(&connect(0x00, &[0x00]), V311); // trailing byte
    malformed(&connect(0x80, &[]), V311); // user name flag, no user name

    // Password without user name is legal in v5.
    let v5 = with_props(
        0x10,
        &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x40, 0, 0],
        &[],
        &[0, 0, 0, 1, b'p'],
    );
    let Ok(Packet::Connect(c)) = decode_one(&v5, V311) else {
        panic!("v5 CONNECT with password only")
    };
    assert!(c.username.is_none() && c.password.is_some());
}

#[test]
fn unsupported_protocols() {
    let connect = |name: &[u8], level: u8| {
        let mut v = vec![0x10, 0, 0, name.len() as u8];
        v.extend_from_slice(name);
        v.extend_from_slice(&[level, 0x02, 0, 0, 0, 0]);
        v[1] = (v.len() - 2) as u8;
        v
    };
    for (name, level) in [
        (&b"MQTT"[..], 3),
        (b"MQTT", 6),
        (b"MQIsdp", 4),
        (b"HTTP", 4),
    ] {
        let err = decode_one(&connect(name, level), V5).expect_err("unsupported");
        assert_eq!(
            err,
            DecodeError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level
            }
        );
        assert_eq!(err.reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    }
    assert!(decode_one(&connect(b"MQIsdp", 3), V311).is_ok());
}

#[test]
fn strings() {
    malformed(&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28], V311); // invalid UTF-8
    malformed(&[0x30, 0x04, 0x00, 0x02, 0xED, 0xA0], V311); // surrogate half
    malformed(&[0x30, 0x03, 0x00, 0x01, 0x00], V311); // U+0000
    malformed(&[0x30, 0x03, 0x00, 0x05, b't'], V311); // length past the packet
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00], V311); // NUL in a filter
    // Empty topic without alias: the broker's concern, not the codec's.
    assert!(decode_one(&[0x30, 0x02, 0x00, 0x00], V311).is_ok());
}

#[test]
fn packet_identifier_zero() {
    protocol(&[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00], V311);
    protocol(&[0x34, 0x05, 0x00, 0x01, b't', 0x00, 0x00], V311);
    protocol(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b't', 0x00], V311);
    protocol(&[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b't'], V311);
}

#[test]
fn empty_subscribe_and_unsubscribe() {
    protocol(&[0x82, 0x02, 0x00, 0x01], V311);
    protocol(&[0x82, 0x03, 0x00, 0x01, 0x00], V5);
    protocol(&[0xA2, 0x02, 0x00, 0x01], V311);
    protocol(&[0xA2, 0x03, 0x00, 0x01, 0x00], V5);
}

#[test]
fn subscription_options() {
    assert!(decode_one(&subscribe_v5(&[], 0x2E), V5).is_ok());
    malformed(&subscribe_v5(&[], 0x40), V5); // reserved bit 6
    malformed(&subscribe_v5(&[], 0x80), V5); // reserved bit 7
    malformed(&subscribe_v5(&[], 0x30), V5); // retain handling 3
    malformed(&subscribe_v5(&[], 0x03), V5); // QoS 3
    // 3.1.1: only the QoS bits exist.
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x04], V311);
    malformed(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x03], V311);
    malformed(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b't'], V311); // options byte missing
}

#[test]
fn properties_identity_and_placement() {
    malformed(&publish_v5(&[0x7F, 0x00]), V5); // unknown identifier
    malformed(&publish_v5(&[0x00]), V5);
    malformed(&publish_v5(&[0x80, 0x01]), V5); // multi-byte identifier: unknown
    malformed(&connect_v5(&[0x23, 0x00, 0x01]), V5); // Topic Alias in CONNECT
    malformed(&publish_v5(&[0x11, 0, 0, 0, 1]), V5); // Session Expiry in PUBLISH
    malformed(&subscribe_v5(&[0x1F, 0x00, 0x00], 0), V5); // Reason String in SUBSCRIBE
    malformed(&with_props(0x40, &[0, 1, 0], &[0x0B, 0x01], &[]), V5); // Subscription Identifier in PUBACK
    malformed(&[0xE0, 0x04, 0x00, 0x02, 0x21, 0x00], V5); // truncated value
}

#[test]
fn properties_repetition() {
    protocol(&publish_v5(&[0x01, 0x00, 0x01, 0x01]), V5);
    protocol(&connect_v5(&[0x21, 0x00, 0x01, 0x21, 0x00, 0x02]), V5);
    protocol(&subscribe_v5(&[0x0B, 0x01, 0x0B, 0x02], 0), V5);
    // User Property may repeat anywhere; Subscription Identifier in PUBLISH.
    let users = [0x26, 0, 1, b'a', 0, 0, 0x26, 0, 1, b'a', 0, 0];
    assert!(decode_one(&publish_v5(&users), V5).is_ok());
    assert!(decode_one(&connect_v5(&users), V5).is_ok());
    assert!(decode_one(&publish_v5(&[0x0B, 0x01, 0x0B, 0x02]), V5).is_ok());
}

#[test]
fn property_length_past_the_packet() {
    // PUBLISH: property length 9, 1 byte left.
    malformed(&[0x30, 0x05, 0x00, 0x01, b't', 0x09, 0x01], V5);
    // PUBACK with a property length claiming more than the packet.
    malformed(&[0x40, 0x04, 0x00, 0x01, 0x00, 0x05], V5);
    // Property length that is not a valid varint.
    malformed(
        &[0x40, 0x08, 0x00, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        V5,
    );
    // A property value running past its block (block is 2 bytes, value needs 4).
    malformed(&with_props(0xE0, &[0], &[0x11, 0x00], &[0, 0, 0]), V5);
}

#[test]
fn property_values() {
    protocol(&connect_v5(&[0x21, 0x00, 0x00]), V5); // Receive Maximum 0
    protocol(&connect_v5(&[0x27, 0, 0, 0, 0]), V5); // Maximum Packet Size 0
    protocol(&publish_v5(&[0x23, 0x00, 0x00]), V5); // Topic Alias 0
    protocol(&subscribe_v5(&[0x0B, 0x00], 0), V5); // Subscription Identifier 0
    protocol(&publish_v5(&[0x0B, 0x00]), V5);
    protocol(&publish_v5(&[0x01, 0x02]), V5); // Payload Format Indicator 2
    protocol(&connect_v5(&[0x17, 0x02]), V5); // Request Problem Information 2
    protocol(&connect_v5(&[0x19, 0x02]), V5); // Request Response Information 2
    protocol(&with_props(0x20, &[0, 0], &[0x24, 0x02], &[]), V5); // Maximum QoS 2
    protocol(&connect_v5(&[0x16, 0x00, 0x01, 0x2A]), V5); // Authentication Data, no method
    // The edges that are fine.
    assert!(decode_one(&connect_v5(&[0x21, 0x00, 0x01, 0x17, 0x01, 0x19, 0x00]), V5).is_ok());
    assert!(decode_one(&connect_v5(&[0x22, 0x00, 0x00]), V5).is_ok()); // Topic Alias Maximum 0
}

#[test]
fn trailing_bytes() {
    malformed(&[0x40, 0x03, 0x00, 0x01, 0x00], V311); // PUBACK is exactly 2 in 3.1.1
    malformed(&[0x62, 0x03, 0x02, 0x00, 0x01], V311);
    malformed(&[0xC0, 0x01, 0x00], V311);
    malformed(&[0xD0, 0x01, 0x00], V5);
    malformed(&[0xE0, 0x01, 0x00], V311); // DISCONNECT is empty in 3.1.1
    malformed(&[0x20, 0x03, 0x00, 0x00, 0x00], V311);
    malformed(&[0x20, 0x04, 0x00, 0x00, 0x00, 0x00], V5);
    malformed(&[0xB0, 0x03, 0x00, 0x01, 0x00], V311);
    malformed(&[0x40, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00], V5);
    malformed(&[0xE0, 0x03, 0x00, 0x00, 0x00], V5);
    malformed(&[0xF0, 0x03, 0x00, 0x00, 0x00], V5);
    malformed(&[0x20, 0x01, 0x00], V311); // and too short
    malformed(&[0x40, 0x01, 0x00], V5);
}

#[test]
fn connack_and_suback_checks() {
    malformed(&[0x20, 0x02, 0x02, 0x00], V311); // reserved acknowledge flags
    malformed(&[0x20, 0x02, 0x00, 0x00], V5); // v5 property length missing
    protocol(&[0x90, 0x03, 0x00, 0x01, 0x03], V311); // reserved 3.1.1 return code
    // v5 reason codes are passed through for the client to interpret.
    assert!(decode_one(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x9E], V5).is_ok());
}

#[test]
fn auth_is_v5_only() {
    malformed(&[0xF0, 0x00], V311);
    malformed(&[0xF0, 0x00], ProtocolVersion::V31);
    assert_eq!(
        decode_one(&[0xF0, 0x00], V5),
        Ok(Packet::Auth(Auth::default()))
    );
    // A reason code without property length is tolerated.
    assert_eq!(
        decode_one(&[0xF0, 0x01, 0x19], V5),
        Ok(Packet::Auth(Auth {
            code: reason::REAUTHENTICATE,
            ..Default::default()
        }))
    );
}

#[test]
fn too_large_from_the_header_alone() {
    // A PUBLISH announcing 2,097,151 bytes; only the fixed header has arrived.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(
        decode(&mut buf, V5, 1024),
        Err(DecodeError::TooLarge {
            size: 1 + 3 + 2_097_151,
            max: 1024
        })
    );
    assert_eq!(buf.len(), 4, "nothing consumed");
    // Exactly at the limit is fine, one over is not.
    let packet = [0x30, 0x04, 0x00, 0x01, b't', b'x'];
    let mut buf = BytesMut::from(&packet[..]);
    assert!(matches!(decode(&mut buf, V311, 6), Ok(Some(_))));
    let mut buf = BytesMut::from(&packet[..2]);
    assert_eq!(
        decode(&mut buf, V311, 5),
        Err(DecodeError::TooLarge { size: 6, max: 5 })
    );
    assert_eq!(
        DecodeError::TooLarge { size: 6, max: 5 }.reason_code(),
        reason::PACKET_TOO_LARGE
    );
}

#[test]
fn incomplete_input_consumes_nothing() {
    for bytes in [
        &[][..],
        &[0x30],
        &[0x30, 0x80],
        &[0x30, 0x80, 0x80, 0x80],
        &[0x30, 0x05, 0x00, 0x01],
        &[0xE0],
    ] {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(decode(&mut buf, V5, usize::MAX), Ok(None), "{bytes:02X?}");
        assert_eq!(&buf[..], bytes);
    }
}

#[test]
fn reason_codes_of_errors() {
    assert_eq!(
        DecodeError::Malformed("x").reason_code(),
        reason::MALFORMED_PACKET
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        reason::PROTOCOL_ERROR
    );
}
