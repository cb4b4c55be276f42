//! The live model of durable state: what replaying the log produces, kept up to date by the writer
//! so that it can be written out as a snapshot at any time.
//!
//! Semantics of ops (shared by recovery and the writer):
//! - ops naming a session that does not exist (no [`StoreOp::PutSession`] yet, or deleted) are
//!   ignored, as are [`StoreOp::Enqueue`] recipients without a session: nothing is kept for them;
//! - [`StoreOp::PutSession`] on an existing session replaces only its record;
//! - a message body is stored once and reference-counted by the deliveries that need it; it is
//!   dropped with its last delivery. An [`StoreOp::Enqueue`] whose id is already live replaces the
//!   body and adds (or replaces) the listed deliveries;
//! - `Sent`, `Released` and `Dequeue` of an id the session does not hold are no-ops;
//! - the next message id is one more than the largest id ever enqueued and never goes backwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::sync::Arc;

use ferrohub_types::{Message, QoS, TenantId, TopicName};

use crate::codec::{self, Dec, DecodeError};
use crate::format::{self, FileHeader, KIND_SNAPSHOT};
use crate::{
    RecoveredDelivery, RecoveredSession, RecoveredState, SessionRecord, StoreOp, SubscriptionRecord,
};

#[derive(Debug, Clone)]
struct Delivery {
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
    packet_id: Option<u16>,
    released: bool,
}

#[derive(Debug, Clone)]
struct SessionState {
    record: SessionRecord,
    subscriptions: BTreeMap<Arc<str>, SubscriptionRecord>,
    pending: BTreeMap<u64, Delivery>,
    inbound_qos2: BTreeSet<u16>,
}

#[derive(Debug, Clone, Default)]
struct TenantState {
    sessions: HashMap<Arc<str>, SessionState>,
    retained: HashMap<TopicName, Message>,
}

impl TenantState {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.retained.is_empty()
    }
}

#[derive(Debug, Clone)]
struct StoredMessage {
    message: Message,
    refs: usize,
}

/// Sessions, queued messages and retained messages of all tenants.
#[derive(Debug, Clone)]
pub(crate) struct LiveState {
    tenants: HashMap<TenantId, TenantState>,
    messages: HashMap<u64, StoredMessage>,
    next_message_id: u64,
}

impl Default for LiveState {
    fn default() -> Self {
        LiveState {
            tenants: HashMap::new(),
            messages: HashMap::new(),
            next_message_id: 1,
        }
    }
}

/// Drops one reference to a message body, freeing it with its last delivery.
fn release(messages: &mut HashMap<u64, StoredMessage>, id: u64) {
    if let Some(m) = messages.get_mut(&id) {
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            messages.remove(&id);
        }
    }
}

impl LiveState {
    /// The next message id to assign.
    pub(crate) fn next_message_id(&self) -> u64 {
        self.next_message_id
    }

    /// Raises the next message id to at least `floor`.
    pub(crate) fn raise_next_message_id(&mut self, floor: u64) {
        self.next_message_id = self.next_message_id.max(floor);
    }

    /// Number of message bodies held (for tests of memory proportionality).
    #[cfg(test)]
    pub(crate) fn message_count(&self) -> usize {
        self.messages.len()
    }

    fn session_mut(&mut self, tenant: &TenantId, client_id: &str) -> Option<&mut SessionState> {
        self.tenants.get_mut(tenant)?.sessions.get_mut(client_id)
    }

    fn drop_tenant_if_empty(&mut self, tenant: &TenantId) {
        if self.tenants.get(tenant).is_some_and(TenantState::is_empty) {
            self.tenants.remove(tenant);
        }
    }

    /// Applies one op.
    pub(crate) fn apply(&mut self, op: StoreOp) {
        match op {
            StoreOp::PutSession(record) => {
                let t = self.tenants.entry(record.tenant.clone()).or_default();
                match t.sessions.get_mut(&record.client_id) {
                    Some(s) => s.record = record,
                    None => {
                        t.sessions.insert(
                            record.client_id.clone(),
                            SessionState {
                                record,
                                subscriptions: BTreeMap::new(),
                                pending: BTreeMap::new(),
                                inbound_qos2: BTreeSet::new(),
                            },
                        );
                    }
                }
            }
            StoreOp::DeleteSession { tenant, client_id } => {
                let Some(t) = self.tenants.get_mut(&tenant) else {
                    return;
                };
                if let Some(s) = t.sessions.remove(&client_id) {
                    for id in s.pending.keys() {
                        release(&mut self.messages, *id);
                    }
                }
                self.drop_tenant_if_empty(&tenant);
            }
            StoreOp::PutSubscription {
                tenant,
                client_id,
                subscription,
            } => {
                if let Some(s) = self.session_mut(&tenant, &client_id) {
                    s.subscriptions
                        .insert(subscription.filter.clone(), subscription);
                }
            }
            StoreOp::DeleteSubscription {
                tenant,
                client_id,
                filter,
            } => {
                if let Some(s) = self.session_mut(&tenant, &client_id) {
                    s.subscriptions.remove(&filter);
                }
            }
            StoreOp::Enqueue {
                tenant,
                message_id,
                message,
                recipients,
            } => {
                self.raise_next_message_id(message_id.saturating_add(1));
                let mut added = 0;
                if let Some(t) = self.tenants.get_mut(&tenant) {
                    for r in recipients {
                        let Some(s) = t.sessions.get_mut(&r.client_id) else {
                            continue;
                        };
                        let d = Delivery {
                            qos: r.qos,
                            retain: r.retain,
                            subscription_ids: r.subscription_ids,
                            packet_id: None,
                            released: false,
                        };
                        if s.pending.insert(message_id, d).is_none() {
                            added += 1;
                        }
                    }
                }
                match self.messages.get_mut(&message_id) {
                    Some(m) => {
                        m.message = message;
                        m.refs += added;
                    }
                    None if added > 0 => {
                        self.messages.insert(
                            message_id,
                            StoredMessage {
                                message,
                                refs: added,
                            },
                        );
                    }
                    None => {}
                }
            }
            StoreOp::Sent {
                tenant,
                client_id,
                message_id,
                packet_id,
            } => {
                if let Some(d) = self
                    .session_mut(&tenant, &client_id)
                    .and_then(|s| s.pending.get_mut(&message_id))
                {
                    d.packet_id = Some(packet_id);
                }
            }
            StoreOp::Released {
                tenant,
                client_id,
                message_id,
            } => {
                if let Some(d) = self
                    .session_mut(&tenant, &client_id)
                    .and_then(|s| s.pending.get_mut(&message_id))
                {
                    d.released = true;
                }
            }
            StoreOp::Dequeue {
                tenant,
                client_id,
                message_id,
            } => {
                let removed = self
                    .session_mut(&tenant, &client_id)
                    .and_then(|s| s.pending.remove(&message_id))
                    .is_some();
                if removed {
                    release(&mut self.messages, message_id);
                }
            }
            StoreOp::PutRetained { tenant, message } => {
                self.tenants
                    .entry(tenant)
                    .or_default()
                    .retained
                    .insert(message.topic.clone(), message);
            }
            StoreOp::DeleteRetained { tenant, topic } => {
                if let Some(t) = self.tenants.get_mut(&tenant) {
                    t.retained.remove(&topic);
                }
                self.drop_tenant_if_empty(&tenant);
            }
            StoreOp::InboundQos2 {
                tenant,
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.session_mut(&tenant, &client_id) {
                    s.inbound_qos2.insert(packet_id);
                }
            }
            StoreOp::InboundQos2Done {
                tenant,
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.session_mut(&tenant, &client_id) {
                    s.inbound_qos2.remove(&packet_id);
                }
            }
        }
    }

    fn sorted_tenants(&self) -> Vec<(&TenantId, &TenantState)> {
        let mut v: Vec<_> = self.tenants.iter().collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        v
    }

    fn sorted_sessions(t: &TenantState) -> Vec<(&Arc<str>, &SessionState)> {
        let mut v: Vec<_> = t.sessions.iter().collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        v
    }

    fn sorted_retained(t: &TenantState) -> Vec<&Message> {
        let mut v: Vec<_> = t.retained.values().collect();
        v.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
        v
    }

    /// The state as handed to the broker: sessions by (tenant, client id), subscriptions by
    /// filter, deliveries by message id, inbound ids ascending, retained by (tenant, topic).
    pub(crate) fn to_recovered(&self) -> RecoveredState {
        let mut sessions = Vec::new();
        let mut retained = Vec::new();
        for (tenant, t) in self.sorted_tenants() {
            for (_, s) in Self::sorted_sessions(t) {
                let pending = s
                    .pending
                    .iter()
                    .filter_map(|(id, d)| {
                        let m = self.messages.get(id)?;
                        Some(RecoveredDelivery {
                            message_id: *id,
                            message: m.message.clone(),
                            qos: d.qos,
                            retain: d.retain,
                            subscription_ids: d.subscription_ids.clone(),
                            packet_id: d.packet_id,
                            released: d.released,
                        })
                    })
                    .collect();
                sessions.push(RecoveredSession {
                    session: s.record.clone(),
                    subscriptions: s.subscriptions.values().cloned().collect(),
                    pending,
                    inbound_qos2: s.inbound_qos2.iter().copied().collect(),
                });
            }
            for m in Self::sorted_retained(t) {
                retained.push((tenant.clone(), m.clone()));
            }
        }
        RecoveredState {
            sessions,
            retained,
            next_message_id: self.next_message_id,
            warnings: Vec::new(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Snapshot

    /// Writes the snapshot file body (header + records) to `w`; returns the bytes written.
    ///
    /// Records: every live message body (`SNAP_MESSAGE`, by id), every session with its
    /// subscriptions, inbound QoS 2 ids and deliveries (`SNAP_SESSION`), every retained message
    /// (`SNAP_RETAINED`), then `SNAP_END` with the three counts.
    pub(crate) fn write_snapshot(&self, w: &mut impl Write, epoch: u64) -> io::Result<u64> {
        const CHUNK: usize = 1 << 20;
        let header = format::encode_header(&FileHeader {
            kind: KIND_SNAPSHOT,
            epoch,
            next_message_id: self.next_message_id,
        });
        w.write_all(&header)?;
        let mut written = header.len() as u64;
        let mut buf = Vec::with_capacity(CHUNK + 4096);
        let mut flush = |buf: &mut Vec<u8>, force: bool| -> io::Result<()> {
            if force || buf.len() >= CHUNK {
                w.write_all(buf)?;
                written += buf.len() as u64;
                buf.clear();
            }
            Ok(())
        };

        let mut ids: Vec<u64> = self.messages.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            if let Some(m) = self.messages.get(id) {
                format::put_record(&mut buf, |b| {
                    b.push(SNAP_MESSAGE);
                    codec::put_varint(b, *id);
                    codec::put_message(b, &m.message);
                });
                flush(&mut buf, false)?;
            }
        }
        let mut n_sessions = 0u64;
        let mut n_retained = 0u64;
        for (_, t) in self.sorted_tenants() {
            for (_, s) in Self::sorted_sessions(t) {
                n_sessions += 1;
                format::put_record(&mut buf, |b| put_snapshot_session(b, s));
                flush(&mut buf, false)?;
            }
        }
        for (tenant, t) in self.sorted_tenants() {
            for m in Self::sorted_retained(t) {
                n_retained += 1;
                format::put_record(&mut buf, |b| {
                    b.push(SNAP_RETAINED);
                    codec::put_str(b, tenant.as_str());
                    codec::put_message(b, m);
                });
                flush(&mut buf, false)?;
            }
        }
        format::put_record(&mut buf, |b| {
            b.push(SNAP_END);
            codec::put_varint(b, ids.len() as u64);
            codec::put_varint(b, n_sessions);
            codec::put_varint(b, n_retained);
        });
        flush(&mut buf, true)?;
        Ok(written)
    }

    /// Writes the snapshot to `snapshot.bin.tmp`, fsyncs it and renames it over `snapshot.bin`.
    /// Returns its size. The caller must fsync the directory before starting the next log.
    /// On error, `snapshot.bin` is untouched.
    pub(crate) fn write_snapshot_file(&self, dir: &std::path::Path, epoch: u64) -> io::Result<u64> {
        let snap = format::path(dir, format::SNAPSHOT_FILE);
        let tmp = format::tmp_path(dir, format::SNAPSHOT_FILE);
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            let n = self.write_snapshot(&mut f, epoch)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &snap)?;
            Ok(n)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Builds the state from a snapshot's records (in file order), after its header.
    pub(crate) fn from_snapshot_records(
        header: &FileHeader,
        mut next: impl FnMut() -> Result<Option<Vec<u8>>, String>,
    ) -> Result<LiveState, String> {
        let mut state = LiveState {
            next_message_id: header.next_message_id.max(1),
            ..LiveState::default()
        };
        let (mut n_msgs, mut n_sessions, mut n_retained) = (0u64, 0u64, 0u64);
        loop {
            let Some(rec) = next()? else {
                return Err("snapshot ends without its end record".into());
            };
            let mut d = Dec::new(&rec);
            let tag = d.u8("snapshot record tag").map_err(|e| e.to_string())?;
            let res: Result<(), DecodeError> = (|| {
                match tag {
                    SNAP_MESSAGE => {
                        let id = d.varint("message id")?;
                        let message = codec::get_message(&mut d)?;
                        state
                            .messages
                            .insert(id, StoredMessage { message, refs: 0 });
                        n_msgs += 1;
                    }
                    SNAP_SESSION => {
                        state.load_session(&mut d)?;
                        n_sessions += 1;
                    }
                    SNAP_RETAINED => {
                        let tenant = d.tenant()?;
                        let message = codec::get_message(&mut d)?;
                        state
                            .tenants
                            .entry(tenant)
                            .or_default()
                            .retained
                            .insert(message.topic.clone(), message);
                        n_retained += 1;
                    }
                    SNAP_END => {
                        let counts = (
                            d.varint("message count")?,
                            d.varint("session count")?,
                            d.varint("retained count")?,
                        );
                        if counts != (n_msgs, n_sessions, n_retained) {
                            return Err(DecodeError {
                                what: "end record counts",
                                offset: 0,
                            });
                        }
                    }
                    _ => {
                        return Err(DecodeError {
                            what: "snapshot record tag",
                            offset: 0,
                        });
                    }
                }
                if !d.is_empty() {
                    return Err(DecodeError {
                        what: "trailing bytes",
                        offset: rec.len() - d.remaining(),
                    });
                }
                Ok(())
            })();
            res.map_err(|e| e.to_string())?;
            if tag == SNAP_END {
                if next()?.is_some() {
                    return Err("records after the snapshot's end record".into());
                }
                break;
            }
        }
        // Bodies nobody references any more (cannot happen in snapshots we write) are dropped.
        state.messages.retain(|_, m| m.refs > 0);
        if let Some(max) = state.messages.keys().max() {
            state.raise_next_message_id(max.saturating_add(1));
        }
        Ok(state)
    }

    fn load_session(&mut self, d: &mut Dec<'_>) -> Result<(), DecodeError> {
        let record = codec::get_session_record(d)?;
        let n = d.count("subscription count")?;
        let mut subscriptions = BTreeMap::new();
        for _ in 0..n {
            let s = codec::get_subscription(d)?;
            subscriptions.insert(s.filter.clone(), s);
        }
        let n = d.count("inbound count")?;
        let mut inbound_qos2 = BTreeSet::new();
        for _ in 0..n {
            inbound_qos2.insert(d.u16("inbound packet id")?);
        }
        let n = d.count("delivery count")?;
        let mut pending = BTreeMap::new();
        for _ in 0..n {
            let id = d.varint("message id")?;
            let at = d.pos();
            let flags = d.flags("delivery flags", DLV_KNOWN)?;
            let qos = codec::qos_bits(flags, "delivery qos", at)?;
            let packet_id = if flags & DLV_HAS_PACKET_ID != 0 {
                Some(d.u16("packet id")?)
            } else {
                None
            };
            let subscription_ids = d.u32_list("subscription ids")?;
            let Some(m) = self.messages.get_mut(&id) else {
                return Err(DecodeError {
                    what: "delivery of an unknown message",
                    offset: 0,
                });
            };
            let dlv = Delivery {
                qos,
                retain: flags & DLV_RETAIN != 0,
                subscription_ids,
                packet_id,
                released: flags & DLV_RELEASED != 0,
            };
            if pending.insert(id, dlv).is_none() {
                m.refs += 1;
            }
        }
        let t = self.tenants.entry(record.tenant.clone()).or_default();
        let s = SessionState {
            record,
            subscriptions,
            pending,
            inbound_qos2,
        };
        if let Some(old) = t.sessions.insert(s.record.client_id.clone(), s) {
            // A duplicate session record: keep the later one, release the earlier's references.
            for id in old.pending.keys() {
                release(&mut self.messages, *id);
            }
        }
        Ok(())
    }
}

const SNAP_MESSAGE: u8 = 1;
const SNAP_SESSION: u8 = 2;
const SNAP_RETAINED: u8 = 3;
const SNAP_END: u8 = 0xff;

const DLV_RETAIN: u8 = 1 << 2;
const DLV_RELEASED: u8 = 1 << 3;
const DLV_HAS_PACKET_ID: u8 = 1 << 4;
const DLV_KNOWN: u8 = 0b11 | DLV_RETAIN | DLV_RELEASED | DLV_HAS_PACKET_ID;

/// `u8 SNAP_SESSION | session record | varint n, subscription*n | varint n, varint packet id*n |
/// varint n, (varint message id | u8 flags (qos:2, retain, released, has_packet_id) |
/// [varint packet id] | varint n, varint subscription id*n)*n`
fn put_snapshot_session(b: &mut Vec<u8>, s: &SessionState) {
    b.push(SNAP_SESSION);
    codec::put_session_record(b, &s.record);
    codec::put_varint(b, s.subscriptions.len() as u64);
    for sub in s.subscriptions.values() {
        codec::put_subscription(b, sub);
    }
    codec::put_varint(b, s.inbound_qos2.len() as u64);
    for p in &s.inbound_qos2 {
        codec::put_varint(b, u64::from(*p));
    }
    codec::put_varint(b, s.pending.len() as u64);
    for (id, d) in &s.pending {
        codec::put_varint(b, *id);
        let mut flags = d.qos.as_u8() & 0b11;
        if d.retain {
            flags |= DLV_RETAIN;
        }
        if d.released {
            flags |= DLV_RELEASED;
        }
        if d.packet_id.is_some() {
            flags |= DLV_HAS_PACKET_ID;
        }
        b.push(flags);
        if let Some(p) = d.packet_id {
            codec::put_varint(b, u64::from(p));
        }
        codec::put_u32_list(b, &d.subscription_ids);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::QueuedFor;
    use bytes::Bytes;

    fn msg(topic: &str) -> Message {
        Message {
            topic: TopicName::parse(topic).unwrap(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            received_at: 1,
            properties: None,
        }
    }

    fn session(c: &str) -> StoreOp {
        StoreOp::PutSession(SessionRecord {
            tenant: TenantId::default(),
            client_id: c.into(),
            expiry_secs: 60,
            disconnected_at: None,
        })
    }

    fn enqueue(id: u64, to: &[&str]) -> StoreOp {
        StoreOp::Enqueue {
            tenant: TenantId::default(),
            message_id: id,
            message: msg("t"),
            recipients: to
                .iter()
                .map(|c| QueuedFor {
                    client_id: (*c).into(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: vec![],
                })
                .collect(),
        }
    }

    fn dequeue(c: &str, id: u64) -> StoreOp {
        StoreOp::Dequeue {
            tenant: TenantId::default(),
            client_id: c.into(),
            message_id: id,
        }
    }

    #[test]
    fn bodies_are_shared_and_freed() {
        let mut s = LiveState::default();
        s.apply(session("a"));
        s.apply(session("b"));
        s.apply(enqueue(1, &["a", "b", "nobody"]));
        s.apply(enqueue(2, &["nobody"]));
        assert_eq!(s.message_count(), 1);
        assert_eq!(s.next_message_id(), 3);
        s.apply(dequeue("a", 1));
        s.apply(dequeue("a", 1));
        assert_eq!(s.message_count(), 1);
        s.apply(dequeue("b", 1));
        assert_eq!(s.message_count(), 0);
        // Duplicate enqueue to the same recipient counts once.
        s.apply(enqueue(5, &["a", "a"]));
        s.apply(enqueue(5, &["a"]));
        s.apply(dequeue("a", 5));
        assert_eq!(s.message_count(), 0);
        s.apply(enqueue(6, &["a", "b"]));
        s.apply(StoreOp::DeleteSession {
            tenant: TenantId::default(),
            client_id: "a".into(),
        });
        assert_eq!(s.message_count(), 1);
        s.apply(StoreOp::DeleteSession {
            tenant: TenantId::default(),
            client_id: "b".into(),
        });
        assert_eq!(s.message_count(), 0);
        assert!(s.tenants.is_empty());
        assert_eq!(s.next_message_id(), 7);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = LiveState::default();
        s.apply(session("a"));
        s.apply(enqueue(3, &["a"]));
        s.apply(StoreOp::PutRetained {
            tenant: TenantId::new("x"),
            message: msg("r/1"),
        });
        s.apply(enqueue(9, &[]));
        let mut out = Vec::new();
        s.write_snapshot(&mut out, 4).unwrap();
        let header =
            format::decode_header(out[..format::HEADER_LEN].try_into().unwrap(), KIND_SNAPSHOT)
                .unwrap();
        assert_eq!(header.epoch, 4);
        let recs = split_records(&out[format::HEADER_LEN..]);
        let mut it = recs.into_iter();
        let loaded = LiveState::from_snapshot_records(&header, || Ok(it.next())).unwrap();
        assert_eq!(loaded.to_recovered(), s.to_recovered());
        assert_eq!(loaded.next_message_id(), 10);
    }

    fn split_records(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
            v.push(b[8..8 + len].to_vec());
            b = &b[8 + len..];
        }
        v
    }
}
