//! MQTT 5 properties: identifiers, which packet may carry which, and their encoding.

use std::sync::Arc;

use bytes::Bytes;

use super::read::Reader;
use super::write::{Counter, Sink, prefixed, varint, varint_len};
use super::{DecodeError, EncodeError};
use crate::mqtt::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, UserProperties, WillProperties,
};

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// A set of property identifiers (all are below 64).
const fn mask(ids: &[u8]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << ids[i];
        i += 1;
    }
    m
}

/// The properties each packet may carry (v5 table 2-4).
const CONNECT: u64 = mask(&[
    SESSION_EXPIRY_INTERVAL,
    RECEIVE_MAXIMUM,
    MAXIMUM_PACKET_SIZE,
    TOPIC_ALIAS_MAXIMUM,
    REQUEST_RESPONSE_INFORMATION,
    REQUEST_PROBLEM_INFORMATION,
    USER_PROPERTY,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
]);
const WILL: u64 = mask(&[
    WILL_DELAY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
]);
const CONNACK: u64 = mask(&[
    SESSION_EXPIRY_INTERVAL,
    RECEIVE_MAXIMUM,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    MAXIMUM_PACKET_SIZE,
    ASSIGNED_CLIENT_IDENTIFIER,
    TOPIC_ALIAS_MAXIMUM,
    REASON_STRING,
    USER_PROPERTY,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
    SERVER_KEEP_ALIVE,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
]);
const PUBLISH: u64 = mask(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    TOPIC_ALIAS,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
    SUBSCRIPTION_IDENTIFIER,
    CONTENT_TYPE,
]);
const ACK: u64 = mask(&[REASON_STRING, USER_PROPERTY]);
const SUBSCRIBE: u64 = mask(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]);
const UNSUBSCRIBE: u64 = mask(&[USER_PROPERTY]);
const DISCONNECT: u64 = mask(&[
    SESSION_EXPIRY_INTERVAL,
    REASON_STRING,
    USER_PROPERTY,
    SERVER_REFERENCE,
]);
const AUTH: u64 = mask(&[
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REASON_STRING,
    USER_PROPERTY,
]);

/// Every property defined by MQTT 5.0.
const KNOWN: u64 = CONNECT | WILL | CONNACK | PUBLISH | SUBSCRIBE | DISCONNECT | AUTH;
/// A decoded property value, typed by its identifier.
enum Value<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    Str(&'a str),
    Bin(Bytes),
    Pair(&'a str, &'a str),
}

const NOT_ALLOWED: DecodeError = DecodeError::Malformed("property not allowed in this packet");

/// Reads a property block (length + properties) and hands each property to `f`, after checking
/// that it is known, allowed in this packet (`allowed`), not repeated unless it may be
/// (`repeatable`), and that its value is in range.
fn each<'a>(
    r: &mut Reader<'a>,
    allowed: u64,
    repeatable: u64,
    mut f: impl FnMut(u8, Value<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = r.varint()?;
    if len == 0 {
        return Ok(());
    }
    let mut p = r.sub(len as usize)?;
    let mut seen = 0u64;
    while !p.is_empty() {
        // Identifiers are Variable Byte Integers, but all defined ones fit in one byte; a
        // continuation bit therefore means an unknown identifier.
        let id = p.u8()?;
        let bit = if id < 64 { 1u64 << id } else { 0 };
        if bit & KNOWN == 0 {
            return Err(DecodeError::Malformed("unknown property identifier"));
        }
        if bit & allowed == 0 {
            return Err(NOT_ALLOWED);
        }
        if seen & bit & !repeatable != 0 {
            return Err(DecodeError::Protocol("property included more than once"));
        }
        seen |= bit;
        let value = match id {
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE => {
                // Every byte-valued property is a flag or (Maximum QoS) 0 or 1.
                let b = p.u8()?;
                if b > 1 {
                    return Err(DecodeError::Protocol("property value must be 0 or 1"));
                }
                Value::Byte(b)
            }
            SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
                let v = p.u16()?;
                if v == 0 && id == RECEIVE_MAXIMUM {
                    return Err(DecodeError::Protocol("Receive Maximum of 0"));
                }
                if v == 0 && id == TOPIC_ALIAS {
                    return Err(DecodeError::Protocol("Topic Alias of 0"));
                }
                Value::U16(v)
            }
            MESSAGE_EXPIRY_INTERVAL
            | SESSION_EXPIRY_INTERVAL
            | WILL_DELAY_INTERVAL
            | MAXIMUM_PACKET_SIZE => {
                let v = p.u32()?;
                if v == 0 && id == MAXIMUM_PACKET_SIZE {
                    return Err(DecodeError::Protocol("Maximum Packet Size of 0"));
                }
                Value::U32(v)
            }
            SUBSCRIPTION_IDENTIFIER => {
                let v = p.varint()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("Subscription Identifier of 0"));
                }
                Value::U32(v)
            }
            CORRELATION_DATA | AUTHENTICATION_DATA => Value::Bin(p.binary()?),
            USER_PROPERTY => {
                let k = p.str()?;
                Value::Pair(k, p.str()?)
            }
            _ => Value::Str(p.str()?),
        };
        f(id, value)?;
    }
    Ok(())
}

fn user(v: &mut UserProperties, k: &str, val: &str) {
    v.push((Arc::from(k), Arc::from(val)));
}

/// CONNECT properties.
pub(super) fn connect(r: &mut Reader<'_>) -> Result<ConnectProperties, DecodeError> {
    let mut p = ConnectProperties::default();
    each(r, CONNECT, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => p.session_expiry_interval = Some(x),
            (RECEIVE_MAXIMUM, Value::U16(x)) => p.receive_maximum = Some(x),
            (MAXIMUM_PACKET_SIZE, Value::U32(x)) => p.maximum_packet_size = Some(x),
            (TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => p.topic_alias_maximum = Some(x),
            (REQUEST_RESPONSE_INFORMATION, Value::Byte(x)) => {
                p.request_response_information = Some(x)
            }
            (REQUEST_PROBLEM_INFORMATION, Value::Byte(x)) => {
                p.request_problem_information = Some(x)
            }
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            (AUTHENTICATION_METHOD, Value::Str(x)) => p.authentication_method = Some(x.into()),
            (AUTHENTICATION_DATA, Value::Bin(x)) => p.authentication_data = Some(x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "Authentication Data without Authentication Method",
        ));
    }
    Ok(p)
}

/// Will properties (in the CONNECT payload).
pub(super) fn will(r: &mut Reader<'_>) -> Result<WillProperties, DecodeError> {
    let mut p = WillProperties::default();
    each(r, WILL, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (WILL_DELAY_INTERVAL, Value::U32(x)) => p.delay_interval = Some(x),
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => p.payload_format_indicator = Some(x),
            (MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => p.message_expiry_interval = Some(x),
            (CONTENT_TYPE, Value::Str(x)) => p.content_type = Some(x.into()),
            (RESPONSE_TOPIC, Value::Str(x)) => p.response_topic = Some(x.into()),
            (CORRELATION_DATA, Value::Bin(x)) => p.correlation_data = Some(x),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(p)
}

/// CONNACK properties.
pub(super) fn connack(r: &mut Reader<'_>) -> Result<ConnAckProperties, DecodeError> {
    let mut p = ConnAckProperties::default();
    each(r, CONNACK, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => p.session_expiry_interval = Some(x),
            (RECEIVE_MAXIMUM, Value::U16(x)) => p.receive_maximum = Some(x),
            (MAXIMUM_QOS, Value::Byte(x)) => p.maximum_qos = Some(x),
            (RETAIN_AVAILABLE, Value::Byte(x)) => p.retain_available = Some(x),
            (MAXIMUM_PACKET_SIZE, Value::U32(x)) => p.maximum_packet_size = Some(x),
            (ASSIGNED_CLIENT_IDENTIFIER, Value::Str(x)) => {
                p.assigned_client_identifier = Some(x.into())
            }
            (TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => p.topic_alias_maximum = Some(x),
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x.into()),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            (WILDCARD_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                p.wildcard_subscription_available = Some(x)
            }
            (SUBSCRIPTION_IDENTIFIER_AVAILABLE, Value::Byte(x)) => {
                p.subscription_identifiers_available = Some(x)
            }
            (SHARED_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                p.shared_subscription_available = Some(x)
            }
            (SERVER_KEEP_ALIVE, Value::U16(x)) => p.server_keep_alive = Some(x),
            (RESPONSE_INFORMATION, Value::Str(x)) => p.response_information = Some(x.into()),
            (SERVER_REFERENCE, Value::Str(x)) => p.server_reference = Some(x.into()),
            (AUTHENTICATION_METHOD, Value::Str(x)) => p.authentication_method = Some(x.into()),
            (AUTHENTICATION_DATA, Value::Bin(x)) => p.authentication_data = Some(x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(p)
}

/// PUBLISH properties. The common case, an empty block, costs one byte read.
#[inline]
pub(super) fn publish(r: &mut Reader<'_>) -> Result<PublishProperties, DecodeError> {
    let mut p = PublishProperties::default();
    each(
        r,
        PUBLISH,
        (1 << USER_PROPERTY) | (1 << SUBSCRIPTION_IDENTIFIER),
        |id, v| {
            match (id, v) {
                (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => p.payload_format_indicator = Some(x),
                (MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => p.message_expiry_interval = Some(x),
                (TOPIC_ALIAS, Value::U16(x)) => p.topic_alias = Some(x),
                (RESPONSE_TOPIC, Value::Str(x)) => p.response_topic = Some(x.into()),
                (CORRELATION_DATA, Value::Bin(x)) => p.correlation_data = Some(x),
                (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
                (SUBSCRIPTION_IDENTIFIER, Value::U32(x)) => p.subscription_identifiers.push(x),
                (CONTENT_TYPE, Value::Str(x)) => p.content_type = Some(x.into()),
                _ => return Err(NOT_ALLOWED),
            }
            Ok(())
        },
    )?;
    Ok(p)
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(super) fn ack(r: &mut Reader<'_>) -> Result<AckProperties, DecodeError> {
    let mut p = AckProperties::default();
    each(r, ACK, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x.into()),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(p)
}

/// SUBSCRIBE properties: Subscription Identifier and user properties.
pub(super) fn subscribe(r: &mut Reader<'_>) -> Result<(Option<u32>, UserProperties), DecodeError> {
    let mut id_out = None;
    let mut users = UserProperties::new();
    each(r, SUBSCRIBE, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (SUBSCRIPTION_IDENTIFIER, Value::U32(x)) => id_out = Some(x),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut users, k, x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok((id_out, users))
}

/// UNSUBSCRIBE properties: user properties only.
pub(super) fn unsubscribe(r: &mut Reader<'_>) -> Result<UserProperties, DecodeError> {
    let mut users = UserProperties::new();
    each(r, UNSUBSCRIBE, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut users, k, x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(users)
}

/// DISCONNECT properties.
pub(super) fn disconnect(r: &mut Reader<'_>) -> Result<DisconnectProperties, DecodeError> {
    let mut p = DisconnectProperties::default();
    each(r, DISCONNECT, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => p.session_expiry_interval = Some(x),
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x.into()),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            (SERVER_REFERENCE, Value::Str(x)) => p.server_reference = Some(x.into()),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(p)
}

/// AUTH properties.
pub(super) fn auth(r: &mut Reader<'_>) -> Result<AuthProperties, DecodeError> {
    let mut p = AuthProperties::default();
    each(r, AUTH, 1 << USER_PROPERTY, |id, v| {
        match (id, v) {
            (AUTHENTICATION_METHOD, Value::Str(x)) => p.authentication_method = Some(x.into()),
            (AUTHENTICATION_DATA, Value::Bin(x)) => p.authentication_data = Some(x),
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x.into()),
            (USER_PROPERTY, Value::Pair(k, x)) => user(&mut p.user_properties, k, x),
            _ => return Err(NOT_ALLOWED),
        }
        Ok(())
    })?;
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// A property set that can be written (without its length prefix).
pub(super) trait Props {
    /// Writes every property that is set.
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError>;

    /// True when no property is set, so the block is a single 0 byte.
    fn is_empty(&self) -> bool;
}

/// Writes a property block: its length, then the properties.
pub(super) fn write<S: Sink, P: Props>(s: &mut S, p: &P) -> Result<(), EncodeError> {
    if p.is_empty() {
        s.u8(0);
        return Ok(());
    }
    let mut c = Counter::default();
    p.emit(&mut c)?;
    if S::COUNTING {
        // The counting pass above already knows the size: no need to count twice.
        if c.0 > super::MAX_REMAINING_LENGTH {
            return Err(EncodeError::TooLarge);
        }
        s.skip(varint_len(c.0) + c.0);
        return Ok(());
    }
    varint(s, c.0)?;
    p.emit(s)
}

fn byte<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.u8(id);
        s.u8(v);
    }
}

fn two<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.u8(id);
        s.u16(v);
    }
}

fn four<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.u8(id);
        s.u32(v);
    }
}

fn text<S: Sink>(
    s: &mut S,
    id: u8,
    v: Option<&str>,
    field: &'static str,
) -> Result<(), EncodeError> {
    if let Some(v) = v {
        s.u8(id);
        prefixed(s, v.as_bytes(), field)?;
    }
    Ok(())
}

fn bin<S: Sink>(
    s: &mut S,
    id: u8,
    v: Option<&Bytes>,
    field: &'static str,
) -> Result<(), EncodeError> {
    if let Some(v) = v {
        s.u8(id);
        prefixed(s, v, field)?;
    }
    Ok(())
}

fn users<S: Sink>(s: &mut S, v: &UserProperties) -> Result<(), EncodeError> {
    for (k, val) in v {
        s.u8(USER_PROPERTY);
        prefixed(s, k.as_bytes(), "user property name")?;
        prefixed(s, val.as_bytes(), "user property value")?;
    }
    Ok(())
}

fn sub_id<S: Sink>(s: &mut S, v: u32) -> Result<(), EncodeError> {
    s.u8(SUBSCRIPTION_IDENTIFIER);
    varint(s, v as usize)
}

impl Props for ConnectProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        four(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        two(s, RECEIVE_MAXIMUM, self.receive_maximum);
        four(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        two(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        byte(
            s,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        byte(
            s,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        users(s, &self.user_properties)?;
        text(
            s,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
            "authentication method",
        )?;
        bin(
            s,
            AUTHENTICATION_DATA,
            self.authentication_data.as_ref(),
            "authentication data",
        )
    }

    fn is_empty(&self) -> bool {
        *self == ConnectProperties::default()
    }
}

impl Props for WillProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        four(s, WILL_DELAY_INTERVAL, self.delay_interval);
        byte(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        four(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        text(
            s,
            CONTENT_TYPE,
            self.content_type.as_deref(),
            "content type",
        )?;
        text(
            s,
            RESPONSE_TOPIC,
            self.response_topic.as_deref(),
            "response topic",
        )?;
        bin(
            s,
            CORRELATION_DATA,
            self.correlation_data.as_ref(),
            "correlation data",
        )?;
        users(s, &self.user_properties)
    }

    fn is_empty(&self) -> bool {
        *self == WillProperties::default()
    }
}

impl Props for ConnAckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        four(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        two(s, RECEIVE_MAXIMUM, self.receive_maximum);
        byte(s, MAXIMUM_QOS, self.maximum_qos);
        byte(s, RETAIN_AVAILABLE, self.retain_available);
        four(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        text(
            s,
            ASSIGNED_CLIENT_IDENTIFIER,
            self.assigned_client_identifier.as_deref(),
            "assigned client identifier",
        )?;
        two(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        text(
            s,
            REASON_STRING,
            self.reason_string.as_deref(),
            "reason string",
        )?;
        users(s, &self.user_properties)?;
        byte(
            s,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        byte(
            s,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        byte(
            s,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        two(s, SERVER_KEEP_ALIVE, self.server_keep_alive);
        text(
            s,
            RESPONSE_INFORMATION,
            self.response_information.as_deref(),
            "response information",
        )?;
        text(
            s,
            SERVER_REFERENCE,
            self.server_reference.as_deref(),
            "server reference",
        )?;
        text(
            s,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
            "authentication method",
        )?;
        bin(
            s,
            AUTHENTICATION_DATA,
            self.authentication_data.as_ref(),
            "authentication data",
        )
    }

    fn is_empty(&self) -> bool {
        *self == ConnAckProperties::default()
    }
}

impl Props for PublishProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        byte(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        four(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        two(s, TOPIC_ALIAS, self.topic_alias);
        text(
            s,
            RESPONSE_TOPIC,
            self.response_topic.as_deref(),
            "response topic",
        )?;
        bin(
            s,
            CORRELATION_DATA,
            self.correlation_data.as_ref(),
            "correlation data",
        )?;
        users(s, &self.user_properties)?;
        for &id in &self.subscription_identifiers {
            sub_id(s, id)?;
        }
        text(
            s,
            CONTENT_TYPE,
            self.content_type.as_deref(),
            "content type",
        )
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.topic_alias.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
            && self.subscription_identifiers.is_empty()
            && self.content_type.is_none()
    }
}

impl Props for AckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        text(
            s,
            REASON_STRING,
            self.reason_string.as_deref(),
            "reason string",
        )?;
        users(s, &self.user_properties)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

/// SUBSCRIBE's properties, which live directly in [`crate::mqtt::Subscribe`].
pub(super) struct SubscribeProps<'a> {
    /// Subscription Identifier.
    pub(super) id: Option<u32>,
    /// User properties.
    pub(super) users: &'a UserProperties,
}

impl Props for SubscribeProps<'_> {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        if let Some(id) = self.id {
            sub_id(s, id)?;
        }
        users(s, self.users)
    }

    fn is_empty(&self) -> bool {
        self.id.is_none() && self.users.is_empty()
    }
}

/// UNSUBSCRIBE's properties: user properties only.
pub(super) struct UnsubscribeProps<'a>(pub(super) &'a UserProperties);

impl Props for UnsubscribeProps<'_> {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        users(s, self.0)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Props for DisconnectProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        four(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        text(
            s,
            REASON_STRING,
            self.reason_string.as_deref(),
            "reason string",
        )?;
        users(s, &self.user_properties)?;
        text(
            s,
            SERVER_REFERENCE,
            self.server_reference.as_deref(),
            "server reference",
        )
    }

    fn is_empty(&self) -> bool {
        *self == DisconnectProperties::default()
    }
}

impl Props for AuthProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        text(
            s,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
            "authentication method",
        )?;
        bin(
            s,
            AUTHENTICATION_DATA,
            self.authentication_data.as_ref(),
            "authentication data",
        )?;
        text(
            s,
            REASON_STRING,
            self.reason_string.as_deref(),
            "reason string",
        )?;
        users(s, &self.user_properties)
    }

    fn is_empty(&self) -> bool {
        *self == AuthProperties::default()
    }
}
