//! Shared helpers of the store's integration tests: a reference model of the op semantics
//! written independently of the store, and op constructors.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use ferrohub_store::{
    BrokerStore, FsyncPolicy, QueuedFor, RecoveredDelivery, RecoveredSession, RecoveredState,
    SessionRecord, StoreConfig, StoreOp, SubscriptionRecord,
};
use ferrohub_types::{Message, MessageProperties, QoS, TenantId, TopicName};

/// The obvious implementation of the op semantics documented in the crate docs: every delivery
/// holds its own copy of the message.
#[derive(Debug, Clone)]
pub struct RefModel {
    sessions: BTreeMap<(String, String), RefSession>,
    retained: BTreeMap<(String, String), (TenantId, Message)>,
    next_message_id: u64,
}

#[derive(Debug, Clone)]
struct RefSession {
    record: SessionRecord,
    subs: BTreeMap<String, SubscriptionRecord>,
    pending: BTreeMap<u64, RecoveredDelivery>,
    inbound: BTreeSet<u16>,
}

impl Default for RefModel {
    fn default() -> Self {
        RefModel {
            sessions: BTreeMap::new(),
            retained: BTreeMap::new(),
            next_message_id: 1,
        }
    }
}

fn key(t: &TenantId, c: &str) -> (String, String) {
    (t.as_str().to_owned(), c.to_owned())
}

impl RefModel {
    pub fn apply(&mut self, op: &StoreOp) {
        match op {
            StoreOp::PutSession(r) => {
                let k = key(&r.tenant, &r.client_id);
                match self.sessions.get_mut(&k) {
                    Some(s) => s.record = r.clone(),
                    None => {
                        self.sessions.insert(
                            k,
                            RefSession {
                                record: r.clone(),
                                subs: BTreeMap::new(),
                                pending: BTreeMap::new(),
                                inbound: BTreeSet::new(),
                            },
                        );
                    }
                }
            }
            StoreOp::DeleteSession { tenant, client_id } => {
                self.sessions.remove(&key(tenant, client_id));
            }
            StoreOp::PutSubscription {
                tenant,
                client_id,
                subscription,
            } => {
                if let Some(s) = self.sessions.get_mut(&key(tenant, client_id)) {
                    s.subs
                        .insert(subscription.filter.to_string(), subscription.clone());
                }
            }
            StoreOp::DeleteSubscription {
                tenant,
                client_id,
                filter,
            } => {
                if let Some(s) = self.sessions.get_mut(&key(tenant, client_id)) {
                    s.subs.remove(&**filter);
                }
            }
            StoreOp::Enqueue {
                tenant,
                message_id,
                message,
                recipients,
            } => {
                self.next_message_id = self.next_message_id.max(message_id + 1);
                // A live body is replaced everywhere it is referenced.
                for s in self.sessions.values_mut() {
                    if let Some(d) = s.pending.get_mut(message_id) {
                        d.message = message.clone();
                    }
                }
                for r in recipients {
                    if let Some(s) = self.sessions.get_mut(&key(tenant, &r.client_id)) {
                        s.pending.insert(
                            *message_id,
                            RecoveredDelivery {
                                message_id: *message_id,
                                message: message.clone(),
                                qos: r.qos,
                                retain: r.retain,
                                subscription_ids: r.subscription_ids.clone(),
                                packet_id: None,
                                released: false,
                            },
                        );
                    }
                }
            }
            StoreOp::Sent {
                tenant,
                client_id,
                message_id,
                packet_id,
            } => {
                if let Some(d) = self
                    .sessions
                    .get_mut(&key(tenant, client_id))
                    .and_then(|s| s.pending.get_mut(message_id))
                {
                    d.packet_id = Some(*packet_id);
                }
            }
            StoreOp::Released {
                tenant,
                client_id,
                message_id,
            } => {
                if let Some(d) = self
                    .sessions
                    .get_mut(&key(tenant, client_id))
                    .and_then(|s| s.pending.get_mut(message_id))
                {
                    d.released = true;
                }
            }
            StoreOp::Dequeue {
                tenant,
                client_id,
                message_id,
            } => {
                if let Some(s) = self.sessions.get_mut(&key(tenant, client_id)) {
                    s.pending.remove(message_id);
                }
            }
            StoreOp::PutRetained { tenant, message } => {
                self.retained.insert(
                    (tenant.as_str().to_owned(), message.topic.to_string()),
                    (tenant.clone(), message.clone()),
                );
            }
            StoreOp::DeleteRetained { tenant, topic } => {
                self.retained
                    .remove(&(tenant.as_str().to_owned(), topic.to_string()));
            }
            StoreOp::InboundQos2 {
                tenant,
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.sessions.get_mut(&key(tenant, client_id)) {
                    s.inbound.insert(*packet_id);
                }
            }
            StoreOp::InboundQos2Done {
                tenant,
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.sessions.get_mut(&key(tenant, client_id)) {
                    s.inbound.remove(packet_id);
                }
            }
        }
    }

    pub fn apply_all<'a>(&mut self, ops: impl IntoIterator<Item = &'a StoreOp>) {
        for op in ops {
            self.apply(op);
        }
    }

    /// Every (tenant, client id, message id) still pending, in order.
    pub fn live_deliveries(&self) -> Vec<(TenantId, Arc<str>, u64)> {
        self.sessions
            .values()
            .flat_map(|s| {
                s.pending
                    .keys()
                    .map(|id| (s.record.tenant.clone(), s.record.client_id.clone(), *id))
            })
            .collect()
    }

    /// The expected recovered state (without warnings).
    pub fn expected(&self) -> RecoveredState {
        RecoveredState {
            sessions: self
                .sessions
                .values()
                .map(|s| RecoveredSession {
                    session: s.record.clone(),
                    subscriptions: s.subs.values().cloned().collect(),
                    pending: s.pending.values().cloned().collect(),
                    inbound_qos2: s.inbound.iter().copied().collect(),
                })
                .collect(),
            retained: self.retained.values().cloned().collect(),
            next_message_id: self.next_message_id,
            warnings: Vec::new(),
        }
    }
}

/// The recovered state without its warnings.
pub fn without_warnings(mut s: RecoveredState) -> RecoveredState {
    s.warnings.clear();
    s
}

pub fn tenant() -> TenantId {
    TenantId::default()
}

pub fn message(topic: &str, payload: &[u8]) -> Message {
    Message {
        topic: TopicName::parse(topic).unwrap(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        received_at: 1_700_000_000_000,
        properties: None,
    }
}

/// A message with every property set.
pub fn rich_message(topic: &str, payload: &[u8]) -> Message {
    Message {
        topic: TopicName::parse(topic).unwrap(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::ExactlyOnce,
        retain: true,
        received_at: 1_700_000_000_123,
        properties: Some(Arc::new(MessageProperties {
            payload_is_utf8: true,
            expires_at: Some(1_700_000_360_000),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/42".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
            user_properties: vec![("k1".into(), "v1".into()), ("k1".into(), "v2".into())],
        })),
    }
}

pub fn put_session(client: &str) -> StoreOp {
    StoreOp::PutSession(SessionRecord {
        tenant: tenant(),
        client_id: client.into(),
        expiry_secs: 3600,
        disconnected_at: None,
    })
}

pub fn enqueue(client: &str, id: u64, payload: &[u8]) -> StoreOp {
    StoreOp::Enqueue {
        tenant: tenant(),
        message_id: id,
        message: message("sensors/t", payload),
        recipients: vec![QueuedFor {
            client_id: client.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
        }],
    }
}

pub fn dequeue(client: &str, id: u64) -> StoreOp {
    StoreOp::Dequeue {
        tenant: tenant(),
        client_id: client.into(),
        message_id: id,
    }
}

pub fn config(fsync: FsyncPolicy) -> StoreConfig {
    StoreConfig {
        fsync,
        ..StoreConfig::default()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Opens, submits each batch awaiting its commit, and closes.
pub async fn write_batches(dir: &Path, cfg: StoreConfig, batches: &[Vec<StoreOp>]) {
    let (store, _) = BrokerStore::open(dir, cfg).unwrap();
    for b in batches {
        store.submit(b.clone()).await.unwrap().await.unwrap();
    }
    store.close().await.unwrap();
}

/// Reference state after `batches`.
pub fn model_of(batches: &[Vec<StoreOp>]) -> RecoveredState {
    let mut m = RefModel::default();
    for b in batches {
        m.apply_all(b);
    }
    m.expected()
}
