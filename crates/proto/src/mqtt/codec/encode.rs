//! Packet encoders, generic over [`Sink`] so that sizing and writing share one code path.

use bytes::{BufMut, BytesMut};
use ferrohub_types::QoS;

use super::props::{self, Props, SubscribeProps, UnsubscribeProps};
use super::write::{Counter, Sink, prefixed, varint, varint_len};
use super::{EncodeError, MAX_REMAINING_LENGTH};
use crate::mqtt::{
    Auth, Connect, Disconnect, Packet, ProtocolVersion, PubResponse, Publish, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe,
};

/// See [`super::encode`].
#[inline]
pub(super) fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let remaining = remaining_len(packet, version)?;
    let start = buf.len();
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(first_byte(packet));
    let written = varint(buf, remaining).and_then(|()| body(packet, version, buf));
    if written.is_err() {
        // Unreachable after a successful sizing pass, but never leave half a packet behind.
        buf.truncate(start);
    }
    written
}

/// See [`super::encoded_len`].
pub(super) fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let remaining = remaining_len(packet, version)?;
    Ok(1 + varint_len(remaining) + remaining)
}

/// The Remaining Length, validating every field on the way.
#[inline]
fn remaining_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let mut c = Counter::default();
    body(packet, version, &mut c)?;
    if c.0 > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge);
    }
    Ok(c.0)
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            0x30 | (u8::from(p.dup) << 3) | (p.qos.as_u8() << 1) | u8::from(p.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// Everything after the fixed header.
#[inline]
fn body<S: Sink>(packet: &Packet, version: ProtocolVersion, s: &mut S) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Publish(p) => publish(p, v5, s),
        Packet::Connect(c) => connect(c, s),
        Packet::ConnAck(c) => {
            s.u8(u8::from(c.session_present));
            // Under 3.1.1 the code is written as given: the caller maps it (reason::connack_v3).
            s.u8(c.code);
            if v5 {
                props::write(s, &c.properties)?;
            }
            Ok(())
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            pub_response(r, v5, s)
        }
        Packet::Subscribe(sub) => subscribe(sub, v5, s),
        Packet::SubAck(a) => suback(a, v5, s),
        Packet::Unsubscribe(u) => unsubscribe(u, v5, s),
        Packet::UnsubAck(a) => unsuback(a, v5, s),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => disconnect(d, v5, s),
        Packet::Auth(a) => auth(a, v5, s),
    }
}

#[inline]
fn publish<S: Sink>(p: &Publish, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    prefixed(s, p.topic.as_bytes(), "topic")?;
    if p.qos != QoS::AtMostOnce {
        s.u16(p.packet_id);
    }
    if v5 {
        props::write(s, &p.properties)?;
    }
    s.slice(&p.payload);
    Ok(())
}

/// CONNECT is encoded for its own `protocol`, whatever the connection's version argument.
fn connect<S: Sink>(c: &Connect, s: &mut S) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    if c.password.is_some() && c.username.is_none() && !v5 {
        return Err(EncodeError::NotInVersion("a password without a user name"));
    }
    let name: &[u8] = match c.protocol {
        ProtocolVersion::V31 => b"MQIsdp",
        ProtocolVersion::V311 | ProtocolVersion::V5 => b"MQTT",
    };
    prefixed(s, name, "protocol name")?;
    s.u8(c.protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.as_u8() << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.u8(flags);
    s.u16(c.keep_alive);
    if v5 {
        props::write(s, &c.properties)?;
    }
    prefixed(s, c.client_id.as_bytes(), "client identifier")?;
    if let Some(w) = &c.will {
        if v5 {
            props::write(s, &w.properties)?;
        }
        prefixed(s, w.topic.as_bytes(), "will topic")?;
        prefixed(s, &w.payload, "will payload")?;
    }
    if let Some(u) = &c.username {
        prefixed(s, u.as_bytes(), "user name")?;
    }
    if let Some(p) = &c.password {
        prefixed(s, p, "password")?;
    }
    Ok(())
}

/// v5 uses the shortest form: no reason code when it is Success without properties, no
/// property length when there are no properties.
fn pub_response<S: Sink>(r: &PubResponse, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    s.u16(r.packet_id);
    if v5 {
        let no_props = r.properties.is_empty();
        if r.code != 0 || !no_props {
            s.u8(r.code);
        }
        if !no_props {
            props::write(s, &r.properties)?;
        }
    }
    Ok(())
}

fn options_byte(o: SubscriptionOptions, v5: bool) -> u8 {
    let mut b = o.qos.as_u8();
    if v5 {
        b |= (u8::from(o.no_local) << 2)
            | (u8::from(o.retain_as_published) << 3)
            | ((o.retain_handling & 0x03) << 4);
    }
    b
}

fn subscribe<S: Sink>(sub: &Subscribe, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    s.u16(sub.packet_id);
    if v5 {
        props::write(
            s,
            &SubscribeProps {
                id: sub.subscription_identifier,
                users: &sub.user_properties,
            },
        )?;
    }
    for f in &sub.filters {
        prefixed(s, f.filter.as_bytes(), "topic filter")?;
        s.u8(options_byte(f.options, v5));
    }
    Ok(())
}

fn suback<S: Sink>(a: &SubAck, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    s.u16(a.packet_id);
    if v5 {
        props::write(s, &a.properties)?;
        s.slice(&a.codes);
    } else {
        // 3.1.1 has a single failure code.
        for &c in &a.codes {
            s.u8(if c >= 0x80 { 0x80 } else { c });
        }
    }
    Ok(())
}

fn unsubscribe<S: Sink>(u: &Unsubscribe, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    s.u16(u.packet_id);
    if v5 {
        props::write(s, &UnsubscribeProps(&u.user_properties))?;
    }
    for f in &u.filters {
        prefixed(s, f.as_bytes(), "topic filter")?;
    }
    Ok(())
}

fn unsuback<S: Sink>(a: &UnsubAck, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    s.u16(a.packet_id);
    if v5 {
        props::write(s, &a.properties)?;
        s.slice(&a.codes);
    }
    Ok(())
}

/// Under 3.1.1 DISCONNECT is always empty. Under v5 it is empty for a normal disconnection
/// without properties, and otherwise carries code and property block: the one-byte form (code
/// only) is legal but some clients (rumqttc 0.25) fail to parse it, and it is not worth a byte.
fn disconnect<S: Sink>(d: &Disconnect, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    if v5 && (d.code != 0 || !d.properties.is_empty()) {
        s.u8(d.code);
        props::write(s, &d.properties)?;
    }
    Ok(())
}

/// AUTH: empty for Success without properties; otherwise code and property block (the spec
/// only allows omitting both together).
fn auth<S: Sink>(a: &Auth, v5: bool, s: &mut S) -> Result<(), EncodeError> {
    if !v5 {
        return Err(EncodeError::NotInVersion("AUTH"));
    }
    if a.code != 0 || !a.properties.is_empty() {
        s.u8(a.code);
        props::write(s, &a.properties)?;
    }
    Ok(())
}
