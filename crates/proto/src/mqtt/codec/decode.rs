//! Packet decoders.

use bytes::{Buf, Bytes, BytesMut};
use ferrohub_types::QoS;

use super::read::{Header, Reader, TRUNCATED, fixed_header};
use super::{DecodeError, props};
use crate::mqtt::{
    Auth, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PubResponse, Publish, SubAck,
    Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// See [`super::decode`].
///
/// Everything on the PUBLISH and acknowledgement paths is inlined into this one function so that
/// the 224-byte `Packet` is built in place rather than copied through each `Result` layer (which
/// otherwise costs more than the parsing).
#[inline(always)]
pub(super) fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // The type byte is checked first so that garbage fails fast, before any length is trusted.
    check_type_byte(first, version)?;
    let (remaining, header_len) = match fixed_header(buf)? {
        Header::Incomplete => return Ok(None),
        Header::Complete {
            remaining,
            header_len,
        } => (remaining, header_len),
    };
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let ty = first >> 4;
    let flags = first & 0x0F;
    let v5 = version.is_v5();
    let packet = match ty {
        // Packets with binary fields are frozen so those fields can be zero-copy slices.
        PUBLISH | CONNECT | CONNACK | AUTH => {
            let frame = buf.split_to(total).freeze();
            match ty {
                PUBLISH => Packet::Publish(publish(flags, frame, header_len, v5)?),
                CONNECT => Packet::Connect(Box::new(connect(&frame, header_len)?)),
                CONNACK => Packet::ConnAck(connack(&frame, header_len, v5)?),
                _ => Packet::Auth(auth(&frame, header_len)?),
            }
        }
        // The rest are parsed in place and skipped: no reference counting at all.
        _ => {
            let packet = {
                let body = buf.get(..total).ok_or(TRUNCATED)?;
                let mut r = Reader::new(body, header_len, None);
                other(ty, &mut r, v5)?
            };
            buf.advance(total);
            packet
        }
    };
    Ok(Some(packet))
}

/// Validates the packet type and the fixed-header flags that the spec fixes.
#[inline]
fn check_type_byte(first: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let flags = first & 0x0F;
    match first >> 4 {
        0 => Err(DecodeError::Malformed("reserved packet type 0")),
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                Err(DecodeError::Malformed("PUBLISH with QoS 3"))
            } else if qos == 0 && flags & 0x08 != 0 {
                Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"))
            } else {
                Ok(())
            }
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags != 0b0010 => {
            Err(DecodeError::Malformed("fixed header flags must be 0010"))
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Ok(()),
        AUTH if !version.is_v5() => Err(DecodeError::Malformed("AUTH is an MQTT 5 packet")),
        _ if flags != 0 => Err(DecodeError::Malformed("reserved fixed header flags set")),
        _ => Ok(()),
    }
}

/// PUBLISH: the hot path. One UTF-8 check and one allocation (the topic); the payload is the
/// rest of the frame, reused as is.
#[inline(always)]
fn publish(
    flags: u8,
    mut frame: Bytes,
    header_len: usize,
    v5: bool,
) -> Result<Publish, DecodeError> {
    let qos =
        QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    let (topic, packet_id, properties, offset) = {
        let mut r = Reader::new(&frame, header_len, Some(&frame));
        let topic = r.arc_str()?;
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            nonzero_id(r.u16()?, "PUBLISH with packet identifier 0")?
        };
        let properties = if v5 {
            props::publish(&mut r)?
        } else {
            Default::default()
        };
        (topic, packet_id, properties, r.position())
    };
    // `offset` is a reader position, hence within the frame.
    frame.advance(offset);
    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties,
        payload: frame,
    })
}

fn nonzero_id(id: u16, what: &'static str) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(DecodeError::Protocol(what))
    } else {
        Ok(id)
    }
}

/// CONNECT, which names its own protocol version.
fn connect(frame: &Bytes, header_len: usize) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(frame, header_len, Some(frame));
    let name_len = r.u16()?;
    let name = r.take(usize::from(name_len))?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        _ => {
            return Err(DecodeError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            });
        }
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "Will QoS or Retain set without the Will Flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("Will QoS 3"))?;
    if has_password && !has_username && !v5 {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        props::connect(&mut r)?
    } else {
        Default::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 {
            props::will(&mut r)?
        } else {
            Default::default()
        };
        let topic = r.arc_str()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// CONNACK.
fn connack(frame: &Bytes, header_len: usize, v5: bool) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(frame, header_len, Some(frame));
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags set"));
    }
    let code = r.u8()?;
    let properties = if v5 {
        props::connack(&mut r)?
    } else {
        Default::default()
    };
    r.finish()?;
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        code,
        properties,
    })
}

/// AUTH (only reached under v5). Remaining Length 0 means Success without properties.
fn auth(frame: &Bytes, header_len: usize) -> Result<Auth, DecodeError> {
    let mut r = Reader::new(frame, header_len, Some(frame));
    let mut out = Auth::default();
    if !r.is_empty() {
        out.code = r.u8()?;
        // Tolerate a reason code without a property length, as DISCONNECT allows.
        if !r.is_empty() {
            out.properties = props::auth(&mut r)?;
        }
    }
    r.finish()?;
    Ok(out)
}

/// Packets without binary fields.
#[inline(always)]
fn other(ty: u8, r: &mut Reader<'_>, v5: bool) -> Result<Packet, DecodeError> {
    Ok(match ty {
        PUBACK => Packet::PubAck(pub_response(r, v5)?),
        PUBREC => Packet::PubRec(pub_response(r, v5)?),
        PUBREL => Packet::PubRel(pub_response(r, v5)?),
        PUBCOMP => Packet::PubComp(pub_response(r, v5)?),
        SUBSCRIBE => Packet::Subscribe(subscribe(r, v5)?),
        SUBACK => Packet::SubAck(suback(r, v5)?),
        UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(r, v5)?),
        UNSUBACK => Packet::UnsubAck(unsuback(r, v5)?),
        PINGREQ => {
            r.finish()?;
            Packet::PingReq
        }
        PINGRESP => {
            r.finish()?;
            Packet::PingResp
        }
        DISCONNECT => Packet::Disconnect(disconnect(r, v5)?),
        // The type byte was validated before; this is only a safe fallback.
        _ => return Err(DecodeError::Malformed("unknown packet type")),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. In v5 the reason code and property length may each be
/// omitted (Remaining Length 2 or 3).
#[inline(always)]
fn pub_response(r: &mut Reader<'_>, v5: bool) -> Result<PubResponse, DecodeError> {
    let mut out = PubResponse {
        packet_id: r.u16()?,
        ..Default::default()
    };
    if v5 && !r.is_empty() {
        out.code = r.u8()?;
        if !r.is_empty() {
            out.properties = props::ack(r)?;
        }
    }
    r.finish()?;
    Ok(out)
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = nonzero_id(r.u16()?, "SUBSCRIBE with packet identifier 0")?;
    let (subscription_identifier, user_properties) = if v5 {
        props::subscribe(r)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = options(r.u8()?, v5)?;
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        subscription_identifier,
        user_properties,
        filters,
    })
}

/// A Subscription Options byte (v5) or Requested QoS byte (3.1.1).
fn options(o: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if v5 { 0xC0 } else { 0xFC };
    if o & reserved != 0 {
        return Err(DecodeError::Malformed(
            "reserved subscription option bits set",
        ));
    }
    let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
    let retain_handling = (o >> 4) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::Malformed("Retain Handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: o & 0x04 != 0,
        retain_as_published: o & 0x08 != 0,
        retain_handling,
    })
}

fn suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.u16()?;
    let properties = if v5 {
        props::ack(r)?
    } else {
        Default::default()
    };
    let codes = r.rest().to_vec();
    if !v5 && codes.iter().any(|c| !matches!(c, 0 | 1 | 2 | 0x80)) {
        return Err(DecodeError::Protocol("reserved SUBACK return code"));
    }
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = nonzero_id(r.u16()?, "UNSUBSCRIBE with packet identifier 0")?;
    let user_properties = if v5 {
        props::unsubscribe(r)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
    let mut out = UnsubAck {
        packet_id: r.u16()?,
        ..Default::default()
    };
    if v5 {
        out.properties = props::ack(r)?;
        out.codes = r.rest().to_vec();
    }
    r.finish()?;
    Ok(out)
}

/// DISCONNECT. In v5, Remaining Length 0 means Normal disconnection and 1 means a reason code
/// without properties; in 3.1.1 it has no variable header.
fn disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut out = Disconnect::default();
    if v5 && !r.is_empty() {
        out.code = r.u8()?;
        if !r.is_empty() {
            out.properties = props::disconnect(r)?;
        }
    }
    r.finish()?;
    Ok(out)
}
