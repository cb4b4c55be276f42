//! Hand-written binary encoding of [`StoreOp`] and [`Message`] (format version 1).
//!
//! Primitives:
//! - `varint`: unsigned LEB128, at most 10 bytes for a `u64`;
//! - `str` / `bytes`: varint length, then the bytes (strings must be valid UTF-8);
//! - `bool`: one byte, 0 or 1; flags: one byte whose unknown bits must be zero.
//!
//! Decoding never trusts a length: every read is bounds-checked against the record, so a corrupted
//! record yields a [`DecodeError`], never a panic or a huge allocation.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use ferrohub_types::{Message, MessageProperties, QoS, TenantId, TopicLimits, TopicName};

use crate::{QueuedFor, SessionRecord, StoreOp, SubscriptionRecord};

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError {
    /// What was being read.
    pub what: &'static str,
    /// Byte offset inside the record.
    pub offset: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} at byte {} of the record",
            self.what, self.offset
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(crate) fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

pub(crate) fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_bytes(buf, s.as_bytes());
}

fn put_opt_varint(buf: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => buf.push(0),
        Some(v) => {
            buf.push(1);
            put_varint(buf, v);
        }
    }
}

const MSG_RETAIN: u8 = 1 << 2;
const MSG_HAS_PROPS: u8 = 1 << 3;
const MSG_KNOWN: u8 = 0b11 | MSG_RETAIN | MSG_HAS_PROPS;

const PROP_UTF8: u8 = 1;
const PROP_EXPIRES: u8 = 1 << 1;
const PROP_CONTENT_TYPE: u8 = 1 << 2;
const PROP_RESPONSE_TOPIC: u8 = 1 << 3;
const PROP_CORRELATION: u8 = 1 << 4;
const PROP_USER: u8 = 1 << 5;
const PROP_KNOWN: u8 = 0b11_1111;

/// `str topic | bytes payload | u8 flags (qos:2, retain, has_props) | varint received_at | [props]`
pub(crate) fn put_message(buf: &mut Vec<u8>, m: &Message) {
    put_str(buf, m.topic.as_str());
    put_bytes(buf, &m.payload);
    let mut flags = m.qos.as_u8() & 0b11;
    if m.retain {
        flags |= MSG_RETAIN;
    }
    if m.properties.is_some() {
        flags |= MSG_HAS_PROPS;
    }
    buf.push(flags);
    put_varint(buf, m.received_at);
    if let Some(p) = m.properties.as_deref() {
        put_properties(buf, p);
    }
}

/// `u8 flags | [varint expires_at] | [str content_type] | [str response_topic] |
/// [bytes correlation] | [varint n, (str name, str value)*n]` (bracketed fields present per flag).
fn put_properties(buf: &mut Vec<u8>, p: &MessageProperties) {
    let mut flags = 0;
    if p.payload_is_utf8 {
        flags |= PROP_UTF8;
    }
    if p.expires_at.is_some() {
        flags |= PROP_EXPIRES;
    }
    if p.content_type.is_some() {
        flags |= PROP_CONTENT_TYPE;
    }
    if p.response_topic.is_some() {
        flags |= PROP_RESPONSE_TOPIC;
    }
    if p.correlation_data.is_some() {
        flags |= PROP_CORRELATION;
    }
    if !p.user_properties.is_empty() {
        flags |= PROP_USER;
    }
    buf.push(flags);
    if let Some(t) = p.expires_at {
        put_varint(buf, t);
    }
    if let Some(ct) = &p.content_type {
        put_str(buf, ct);
    }
    if let Some(rt) = &p.response_topic {
        put_str(buf, rt);
    }
    if let Some(cd) = &p.correlation_data {
        put_bytes(buf, cd);
    }
    if !p.user_properties.is_empty() {
        put_varint(buf, p.user_properties.len() as u64);
        for (k, v) in &p.user_properties {
            put_str(buf, k);
            put_str(buf, v);
        }
    }
}

/// `str tenant | str client_id | varint expiry_secs | opt-varint disconnected_at`
pub(crate) fn put_session_record(buf: &mut Vec<u8>, r: &SessionRecord) {
    put_str(buf, r.tenant.as_str());
    put_str(buf, &r.client_id);
    put_varint(buf, u64::from(r.expiry_secs));
    put_opt_varint(buf, r.disconnected_at);
}

const SUB_NO_LOCAL: u8 = 1 << 2;
const SUB_RAP: u8 = 1 << 3;
const SUB_HAS_ID: u8 = 1 << 4;
const SUB_KNOWN: u8 = 0b11 | SUB_NO_LOCAL | SUB_RAP | SUB_HAS_ID;

/// `str filter | u8 flags (qos:2, no_local, rap, has_id) | u8 retain_handling | [varint id]`
pub(crate) fn put_subscription(buf: &mut Vec<u8>, s: &SubscriptionRecord) {
    put_str(buf, &s.filter);
    let mut flags = s.qos.as_u8() & 0b11;
    if s.no_local {
        flags |= SUB_NO_LOCAL;
    }
    if s.retain_as_published {
        flags |= SUB_RAP;
    }
    if s.subscription_id.is_some() {
        flags |= SUB_HAS_ID;
    }
    buf.push(flags);
    buf.push(s.retain_handling);
    if let Some(id) = s.subscription_id {
        put_varint(buf, u64::from(id));
    }
}

pub(crate) fn put_u32_list(buf: &mut Vec<u8>, ids: &[u32]) {
    put_varint(buf, ids.len() as u64);
    for &id in ids {
        put_varint(buf, u64::from(id));
    }
}

const OP_PUT_SESSION: u8 = 1;
const OP_DELETE_SESSION: u8 = 2;
const OP_PUT_SUBSCRIPTION: u8 = 3;
const OP_DELETE_SUBSCRIPTION: u8 = 4;
const OP_ENQUEUE: u8 = 5;
const OP_SENT: u8 = 6;
const OP_RELEASED: u8 = 7;
const OP_DEQUEUE: u8 = 8;
const OP_PUT_RETAINED: u8 = 9;
const OP_DELETE_RETAINED: u8 = 10;
const OP_INBOUND_QOS2: u8 = 11;
const OP_INBOUND_QOS2_DONE: u8 = 12;

const RCPT_RETAIN: u8 = 1 << 2;
const RCPT_KNOWN: u8 = 0b11 | RCPT_RETAIN;

/// One op: `u8 tag`, then the fields of the variant in declaration order.
pub(crate) fn put_op(buf: &mut Vec<u8>, op: &StoreOp) {
    match op {
        StoreOp::PutSession(r) => {
            buf.push(OP_PUT_SESSION);
            put_session_record(buf, r);
        }
        StoreOp::DeleteSession { tenant, client_id } => {
            buf.push(OP_DELETE_SESSION);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
        }
        StoreOp::PutSubscription {
            tenant,
            client_id,
            subscription,
        } => {
            buf.push(OP_PUT_SUBSCRIPTION);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_subscription(buf, subscription);
        }
        StoreOp::DeleteSubscription {
            tenant,
            client_id,
            filter,
        } => {
            buf.push(OP_DELETE_SUBSCRIPTION);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_str(buf, filter);
        }
        StoreOp::Enqueue {
            tenant,
            message_id,
            message,
            recipients,
        } => {
            buf.push(OP_ENQUEUE);
            put_str(buf, tenant.as_str());
            put_varint(buf, *message_id);
            put_message(buf, message);
            put_varint(buf, recipients.len() as u64);
            for r in recipients {
                put_str(buf, &r.client_id);
                let mut flags = r.qos.as_u8() & 0b11;
                if r.retain {
                    flags |= RCPT_RETAIN;
                }
                buf.push(flags);
                put_u32_list(buf, &r.subscription_ids);
            }
        }
        StoreOp::Sent {
            tenant,
            client_id,
            message_id,
            packet_id,
        } => {
            buf.push(OP_SENT);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_varint(buf, *message_id);
            put_varint(buf, u64::from(*packet_id));
        }
        StoreOp::Released {
            tenant,
            client_id,
            message_id,
        } => {
            buf.push(OP_RELEASED);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_varint(buf, *message_id);
        }
        StoreOp::Dequeue {
            tenant,
            client_id,
            message_id,
        } => {
            buf.push(OP_DEQUEUE);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_varint(buf, *message_id);
        }
        StoreOp::PutRetained { tenant, message } => {
            buf.push(OP_PUT_RETAINED);
            put_str(buf, tenant.as_str());
            put_message(buf, message);
        }
        StoreOp::DeleteRetained { tenant, topic } => {
            buf.push(OP_DELETE_RETAINED);
            put_str(buf, tenant.as_str());
            put_str(buf, topic.as_str());
        }
        StoreOp::InboundQos2 {
            tenant,
            client_id,
            packet_id,
        } => {
            buf.push(OP_INBOUND_QOS2);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_varint(buf, u64::from(*packet_id));
        }
        StoreOp::InboundQos2Done {
            tenant,
            client_id,
            packet_id,
        } => {
            buf.push(OP_INBOUND_QOS2_DONE);
            put_str(buf, tenant.as_str());
            put_str(buf, client_id);
            put_varint(buf, u64::from(*packet_id));
        }
    }
}

/// A log record's payload: `varint n | op*n`.
pub(crate) fn put_batch(buf: &mut Vec<u8>, ops: &[StoreOp]) {
    put_varint(buf, ops.len() as u64);
    for op in ops {
        put_op(buf, op);
    }
}

// ---------------------------------------------------------------------------------------------
// Size bounds (cheap, computed by submitters to refuse batches too large for one record)

const VARINT_MAX: usize = 10;

/// Decoded counts pre-allocate at most this many items: a corrupted count fails when the items
/// run out, without a large allocation first.
const PREALLOC_MAX: usize = 1024;

fn str_bound(len: usize) -> usize {
    VARINT_MAX + len
}

fn message_bound(m: &Message) -> usize {
    let mut n = str_bound(m.topic.len()) + str_bound(m.payload.len()) + 1 + VARINT_MAX;
    if let Some(p) = m.properties.as_deref() {
        n += 1 + VARINT_MAX;
        n += p.content_type.as_deref().map_or(0, |s| str_bound(s.len()));
        n += p
            .response_topic
            .as_deref()
            .map_or(0, |s| str_bound(s.len()));
        n += p
            .correlation_data
            .as_ref()
            .map_or(0, |b| str_bound(b.len()));
        n += VARINT_MAX;
        for (k, v) in &p.user_properties {
            n += str_bound(k.len()) + str_bound(v.len());
        }
    }
    n
}

/// An upper bound of the encoded size of `ops` as one record payload.
pub(crate) fn batch_len_bound(ops: &[StoreOp]) -> usize {
    let mut n = VARINT_MAX;
    for op in ops {
        // tag + tenant + client id / topic + up to three integers, plus variant-specific parts.
        n += 1 + 3 * VARINT_MAX + 4;
        n = n.saturating_add(match op {
            StoreOp::PutSession(r) => {
                str_bound(r.tenant.as_str().len()) + str_bound(r.client_id.len()) + 1
            }
            StoreOp::DeleteSession { tenant, client_id }
            | StoreOp::Sent {
                tenant, client_id, ..
            }
            | StoreOp::Released {
                tenant, client_id, ..
            }
            | StoreOp::Dequeue {
                tenant, client_id, ..
            }
            | StoreOp::InboundQos2 {
                tenant, client_id, ..
            }
            | StoreOp::InboundQos2Done {
                tenant, client_id, ..
            } => str_bound(tenant.as_str().len()) + str_bound(client_id.len()),
            StoreOp::PutSubscription {
                tenant,
                client_id,
                subscription,
            } => {
                str_bound(tenant.as_str().len())
                    + str_bound(client_id.len())
                    + str_bound(subscription.filter.len())
            }
            StoreOp::DeleteSubscription {
                tenant,
                client_id,
                filter,
            } => {
                str_bound(tenant.as_str().len())
                    + str_bound(client_id.len())
                    + str_bound(filter.len())
            }
            StoreOp::Enqueue {
                tenant,
                message,
                recipients,
                ..
            } => {
                let mut n = str_bound(tenant.as_str().len()) + message_bound(message);
                for r in recipients {
                    n += str_bound(r.client_id.len())
                        + 1
                        + VARINT_MAX
                        + r.subscription_ids.len() * VARINT_MAX;
                }
                n
            }
            StoreOp::PutRetained { tenant, message } => {
                str_bound(tenant.as_str().len()) + message_bound(message)
            }
            StoreOp::DeleteRetained { tenant, topic } => {
                str_bound(tenant.as_str().len()) + str_bound(topic.len())
            }
        });
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A bounds-checked cursor over one record payload.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }

    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError {
            what,
            offset: self.pos,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(self.err(what)),
        }
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..VARINT_MAX {
            let Some(&b) = self.buf.get(self.pos) else {
                self.pos = start;
                return Err(self.err(what));
            };
            self.pos += 1;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                self.pos = start;
                return Err(self.err(what));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        self.pos = start;
        Err(self.err(what))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let at = self.pos;
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| DecodeError { what, offset: at })
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let at = self.pos;
        let v = self.varint(what)?;
        u16::try_from(v).map_err(|_| DecodeError { what, offset: at })
    }

    /// A count of items that each take at least one byte: larger than what remains is corruption.
    pub(crate) fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.varint(what)?;
        match usize::try_from(v) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(DecodeError { what, offset: at }),
        }
    }

    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let len = self.count(what)?;
        let s = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        debug_assert!(self.pos >= at);
        Ok(s)
    }

    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let b = self.bytes(what)?;
        std::str::from_utf8(b).map_err(|_| DecodeError { what, offset: at })
    }

    pub(crate) fn arc_str(&mut self, what: &'static str) -> Result<Arc<str>, DecodeError> {
        self.str(what).map(Arc::from)
    }

    pub(crate) fn tenant(&mut self) -> Result<TenantId, DecodeError> {
        self.str("tenant").map(TenantId::new)
    }

    pub(crate) fn flags(&mut self, what: &'static str, known: u8) -> Result<u8, DecodeError> {
        let at = self.pos;
        let f = self.u8(what)?;
        if f & !known != 0 {
            return Err(DecodeError { what, offset: at });
        }
        Ok(f)
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError { what, offset: at }),
        }
    }

    fn opt_varint(&mut self, what: &'static str) -> Result<Option<u64>, DecodeError> {
        if self.bool(what)? {
            self.varint(what).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn u32_list(&mut self, what: &'static str) -> Result<Vec<u32>, DecodeError> {
        let n = self.count(what)?;
        let mut v = Vec::with_capacity(n.min(PREALLOC_MAX));
        for _ in 0..n {
            v.push(self.u32(what)?);
        }
        Ok(v)
    }
}

/// QoS from the low two bits of a flags byte.
pub(crate) fn qos_bits(flags: u8, what: &'static str, offset: usize) -> Result<QoS, DecodeError> {
    QoS::from_u8(flags & 0b11).ok_or(DecodeError { what, offset })
}

/// Topics are re-validated on decode, with no length or level limit: a name accepted under any
/// configured limits must load.
fn topic_limits() -> TopicLimits {
    TopicLimits {
        max_len: usize::MAX,
        max_levels: usize::MAX,
    }
}

pub(crate) fn get_topic(d: &mut Dec<'_>) -> Result<TopicName, DecodeError> {
    let at = d.pos;
    let s = d.str("topic")?;
    TopicName::new(s, &topic_limits()).map_err(|_| DecodeError {
        what: "topic",
        offset: at,
    })
}

/// Bytes are copied out of the file buffer so that live state never pins a whole read buffer.
fn get_owned_bytes(d: &mut Dec<'_>, what: &'static str) -> Result<Bytes, DecodeError> {
    d.bytes(what).map(Bytes::copy_from_slice)
}

pub(crate) fn get_message(d: &mut Dec<'_>) -> Result<Message, DecodeError> {
    let topic = get_topic(d)?;
    let payload = get_owned_bytes(d, "payload")?;
    let at = d.pos;
    let flags = d.flags("message flags", MSG_KNOWN)?;
    let qos = qos_bits(flags, "message qos", at)?;
    let received_at = d.varint("received_at")?;
    let properties = if flags & MSG_HAS_PROPS != 0 {
        Some(Arc::new(get_properties(d)?))
    } else {
        None
    };
    Ok(Message {
        topic,
        payload,
        qos,
        retain: flags & MSG_RETAIN != 0,
        received_at,
        properties,
    })
}

fn get_properties(d: &mut Dec<'_>) -> Result<MessageProperties, DecodeError> {
    let flags = d.flags("property flags", PROP_KNOWN)?;
    let mut p = MessageProperties {
        payload_is_utf8: flags & PROP_UTF8 != 0,
        ..MessageProperties::default()
    };
    if flags & PROP_EXPIRES != 0 {
        p.expires_at = Some(d.varint("expires_at")?);
    }
    if flags & PROP_CONTENT_TYPE != 0 {
        p.content_type = Some(d.arc_str("content type")?);
    }
    if flags & PROP_RESPONSE_TOPIC != 0 {
        p.response_topic = Some(d.arc_str("response topic")?);
    }
    if flags & PROP_CORRELATION != 0 {
        p.correlation_data = Some(get_owned_bytes(d, "correlation data")?);
    }
    if flags & PROP_USER != 0 {
        let n = d.count("user property count")?;
        let mut v = Vec::with_capacity(n.min(PREALLOC_MAX));
        for _ in 0..n {
            let k = d.arc_str("user property name")?;
            let val = d.arc_str("user property value")?;
            v.push((k, val));
        }
        p.user_properties = v;
    }
    Ok(p)
}

pub(crate) fn get_session_record(d: &mut Dec<'_>) -> Result<SessionRecord, DecodeError> {
    Ok(SessionRecord {
        tenant: d.tenant()?,
        client_id: d.arc_str("client id")?,
        expiry_secs: d.u32("expiry")?,
        disconnected_at: d.opt_varint("disconnected_at")?,
    })
}

pub(crate) fn get_subscription(d: &mut Dec<'_>) -> Result<SubscriptionRecord, DecodeError> {
    let filter = d.arc_str("filter")?;
    let at = d.pos;
    let flags = d.flags("subscription flags", SUB_KNOWN)?;
    let qos = qos_bits(flags, "subscription qos", at)?;
    let retain_handling = d.u8("retain handling")?;
    let subscription_id = if flags & SUB_HAS_ID != 0 {
        Some(d.u32("subscription id")?)
    } else {
        None
    };
    Ok(SubscriptionRecord {
        filter,
        qos,
        no_local: flags & SUB_NO_LOCAL != 0,
        retain_as_published: flags & SUB_RAP != 0,
        retain_handling,
        subscription_id,
    })
}

pub(crate) fn get_op(d: &mut Dec<'_>) -> Result<StoreOp, DecodeError> {
    let at = d.pos;
    let tag = d.u8("op tag")?;
    let op = match tag {
        OP_PUT_SESSION => StoreOp::PutSession(get_session_record(d)?),
        OP_DELETE_SESSION => StoreOp::DeleteSession {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
        },
        OP_PUT_SUBSCRIPTION => StoreOp::PutSubscription {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            subscription: get_subscription(d)?,
        },
        OP_DELETE_SUBSCRIPTION => StoreOp::DeleteSubscription {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            filter: d.arc_str("filter")?,
        },
        OP_ENQUEUE => {
            let tenant = d.tenant()?;
            let message_id = d.varint("message id")?;
            let message = get_message(d)?;
            let n = d.count("recipient count")?;
            let mut recipients = Vec::with_capacity(n.min(PREALLOC_MAX));
            for _ in 0..n {
                let client_id = d.arc_str("recipient")?;
                let fat = d.pos;
                let flags = d.flags("recipient flags", RCPT_KNOWN)?;
                let qos = qos_bits(flags, "recipient qos", fat)?;
                let subscription_ids = d.u32_list("subscription ids")?;
                recipients.push(QueuedFor {
                    client_id,
                    qos,
                    retain: flags & RCPT_RETAIN != 0,
                    subscription_ids,
                });
            }
            StoreOp::Enqueue {
                tenant,
                message_id,
                message,
                recipients,
            }
        }
        OP_SENT => StoreOp::Sent {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            message_id: d.varint("message id")?,
            packet_id: d.u16("packet id")?,
        },
        OP_RELEASED => StoreOp::Released {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            message_id: d.varint("message id")?,
        },
        OP_DEQUEUE => StoreOp::Dequeue {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            message_id: d.varint("message id")?,
        },
        OP_PUT_RETAINED => StoreOp::PutRetained {
            tenant: d.tenant()?,
            message: get_message(d)?,
        },
        OP_DELETE_RETAINED => StoreOp::DeleteRetained {
            tenant: d.tenant()?,
            topic: get_topic(d)?,
        },
        OP_INBOUND_QOS2 => StoreOp::InboundQos2 {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            packet_id: d.u16("packet id")?,
        },
        OP_INBOUND_QOS2_DONE => StoreOp::InboundQos2Done {
            tenant: d.tenant()?,
            client_id: d.arc_str("client id")?,
            packet_id: d.u16("packet id")?,
        },
        _ => {
            return Err(DecodeError {
                what: "op tag",
                offset: at,
            });
        }
    };
    Ok(op)
}

/// Decodes a whole log record payload; trailing bytes are corruption.
pub(crate) fn get_batch(payload: &[u8]) -> Result<Vec<StoreOp>, DecodeError> {
    let mut d = Dec::new(payload);
    let n = d.count("op count")?;
    let mut ops = Vec::with_capacity(n.min(PREALLOC_MAX));
    for _ in 0..n {
        ops.push(get_op(&mut d)?);
    }
    if !d.is_empty() {
        return Err(d.err("trailing bytes"));
    }
    Ok(ops)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_limits() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert!(b.len() <= VARINT_MAX);
            let mut d = Dec::new(&b);
            assert_eq!(d.varint("v"), Ok(v));
            assert!(d.is_empty());
        }
        // 11-byte and overflowing varints are refused.
        let mut d = Dec::new(&[0xff; 11]);
        assert!(d.varint("v").is_err());
        let mut d = Dec::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert!(d.varint("v").is_err());
        let mut d = Dec::new(&[0x80]);
        assert!(d.varint("v").is_err());
    }

    #[test]
    fn lengths_are_bounds_checked() {
        let mut b = Vec::new();
        put_varint(&mut b, 1 << 40);
        b.extend_from_slice(b"abc");
        let mut d = Dec::new(&b);
        assert!(d.bytes("x").is_err());
        assert!(get_batch(&b).is_err());
    }

    #[test]
    fn every_prefix_of_a_batch_fails_cleanly() {
        let props = MessageProperties {
            payload_is_utf8: true,
            expires_at: Some(99),
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into())],
        };
        let msg = Message {
            topic: TopicName::parse("a/b").unwrap(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            received_at: 123_456,
            properties: Some(Arc::new(props)),
        };
        let ops = vec![
            StoreOp::Enqueue {
                tenant: TenantId::default(),
                message_id: 7,
                message: msg.clone(),
                recipients: vec![QueuedFor {
                    client_id: "c".into(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: vec![1, 70_000],
                }],
            },
            StoreOp::PutRetained {
                tenant: TenantId::new("t"),
                message: msg,
            },
        ];
        let mut b = Vec::new();
        put_batch(&mut b, &ops);
        assert!(b.len() <= batch_len_bound(&ops));
        assert_eq!(get_batch(&b), Ok(ops));
        for cut in 0..b.len() {
            assert!(get_batch(&b[..cut]).is_err(), "prefix {cut} decoded");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = get_batch(&data);
            let mut d = Dec::new(&data);
            let _ = get_message(&mut d);
        }

        #[test]
        fn mutated_batches_never_panic(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..4)) {
            let ops = vec![StoreOp::PutRetained {
                tenant: TenantId::default(),
                message: Message {
                    topic: TopicName::parse("x/y").unwrap(),
                    payload: Bytes::from_static(b"payload"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    received_at: 5,
                    properties: Some(Arc::new(MessageProperties {
                        user_properties: vec![("a".into(), "b".into())],
                        ..MessageProperties::default()
                    })),
                },
            }];
            let mut b = Vec::new();
            put_batch(&mut b, &ops);
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let _ = get_batch(&b);
        }
    }
}
