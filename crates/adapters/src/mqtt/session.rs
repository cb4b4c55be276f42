//! Sessions: the state that outlives a connection.
//!
//! A [`Session`] is what the router delivers to (it implements [`Subscriber`]). It owns the
//! bounded queue of messages not yet sent and the in-flight window of QoS 1/2 deliveries awaiting
//! acknowledgement, so that both survive a disconnect of a persistent session. The connection task
//! of the session's current client drains it; publishers fill it from their own tasks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use ferrohub_router::{ShareKey, Subscriber, SubscriberId};
use ferrohub_store::SubscriptionRecord;
use ferrohub_types::{Message, QoS, TenantId, UnixMillis};
use hashbrown::{HashMap, HashSet};
use indexmap::IndexMap;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{Notify, oneshot};

use super::introspect::{ConnectionFacts, SessionCounters, TenantCounters};
use super::metrics::{BrokerMetrics, DropReason};

/// A message on its way to one session.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The shared message.
    pub message: Arc<Message>,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag to send.
    pub retain: bool,
    /// Subscription identifiers to send.
    pub subscription_ids: SmallVec<[u32; 1]>,
    /// Store id when the delivery is persisted (persistent session, QoS ≥ 1), else 0.
    pub message_id: u64,
    /// Set when it came through a shared subscription.
    pub share: Option<ShareKey>,
}

/// State of an unacknowledged outbound QoS 1/2 delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitingComp,
}

/// An unacknowledged delivery.
#[derive(Clone, Debug)]
pub struct Inflight {
    /// The delivery.
    pub out: Outgoing,
    /// Where it is in the handshake.
    pub state: InflightState,
}

/// Result of offering a message to a session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued.
    Queued,
    /// Not queued, and that is allowed (QoS 0): counted as dropped.
    Dropped,
    /// A QoS 1/2 message that cannot be queued: the publisher must be told.
    Refused,
}

/// Queue and in-flight window, behind one lock.
#[derive(Default)]
pub struct Outbox {
    /// Not yet sent, in arrival order.
    pub queue: VecDeque<Outgoing>,
    /// QoS 0 messages in `queue` (dropped first when it is full).
    pub qos0_queued: usize,
    /// Sent and unacknowledged, in send order, by packet identifier.
    pub inflight: IndexMap<u16, Inflight>,
    next_packet_id: u16,
    /// The session has ended (its shared-subscription messages were handed on): nothing may be
    /// queued any more. Set under this lock, so a publication that chose this session just before
    /// it ended is either moved on with the rest or given back by [`Session::offer`].
    pub ended: bool,
}

impl Outbox {
    /// A free packet identifier (1..=65535, skipping those in flight).
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_packet_id) {
                return Some(self.next_packet_id);
            }
        }
        None
    }
}

/// Things a connection is told by others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection took the session over (v5 DISCONNECT 0x8E).
    TakenOver,
    /// The server is shutting down (v5 DISCONNECT 0x8B).
    Shutdown,
    /// An operator disconnected the client (v5 DISCONNECT 0x98).
    Administrative,
    /// The device was disabled or its credential revoked (v5 DISCONNECT 0x87).
    NotAuthorized,
}

/// The link between a session and the connection currently serving it.
pub struct Attachment {
    /// Tell the connection to close.
    pub kick: oneshot::Sender<Kick>,
    /// Resolves when the connection has let go of the session.
    pub released: oneshot::Receiver<()>,
}

/// Parts of a session only touched on connect, subscribe and disconnect.
#[derive(Default)]
pub struct SessionControl {
    /// Subscriptions by filter as subscribed (`$share/...` included).
    pub subscriptions: HashMap<Arc<str>, SubscriptionRecord>,
    /// Inbound QoS 2 packet identifiers whose PUBREL has not arrived.
    pub inbound_qos2: HashSet<u16>,
    /// The connection serving the session, if any.
    pub attachment: Option<Attachment>,
    /// When the last connection ended (offline sessions).
    pub disconnected_at: Option<UnixMillis>,
    /// A Will Message waiting out its Will Delay Interval: published when the delay passes or the
    /// session ends, whichever comes first; cancelled when a client resumes the session.
    pub pending_will: Option<Box<Message>>,
    /// The connection serving the session, or the last one (operators' session view).
    pub connection: Option<Box<ConnectionFacts>>,
}

/// One MQTT session.
pub struct Session {
    id: SubscriberId,
    /// Tenant.
    pub tenant: TenantId,
    /// Client identifier.
    pub client_id: Arc<str>,
    /// Queue and in-flight window.
    pub outbox: Mutex<Outbox>,
    /// Wakes the connection task when something was queued.
    pub wake: Notify,
    /// True while a connection serves the session.
    pub online: AtomicBool,
    /// Session Expiry Interval in seconds (0: the session ends with its connection).
    pub expiry_secs: AtomicU32,
    /// Incremented on every attach, so that delayed work (will, expiry) scheduled for an earlier
    /// connection can tell it is stale.
    pub generation: AtomicU64,
    /// Connect/subscribe-time state.
    pub control: Mutex<SessionControl>,
    /// Messages in and out of this session (operators' session view, top talkers).
    pub counters: SessionCounters,
    /// The tenant's message counters.
    tenant_counters: Arc<TenantCounters>,
    max_queued: usize,
    queue_qos0_offline: bool,
    metrics: Arc<BrokerMetrics>,
}

impl Session {
    /// A new, offline session.
    pub fn new(
        id: SubscriberId,
        tenant: TenantId,
        client_id: Arc<str>,
        max_queued: usize,
        queue_qos0_offline: bool,
        metrics: Arc<BrokerMetrics>,
        tenant_counters: Arc<TenantCounters>,
    ) -> Session {
        Session {
            id,
            tenant,
            client_id,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            online: AtomicBool::new(false),
            expiry_secs: AtomicU32::new(0),
            generation: AtomicU64::new(0),
            control: Mutex::new(SessionControl::default()),
            counters: SessionCounters::default(),
            tenant_counters,
            max_queued,
            queue_qos0_offline,
            metrics,
        }
    }

    /// Counts a PUBLISH received from the client (session and tenant counters).
    #[inline]
    pub fn count_in(&self) {
        self.counters.messages_in.fetch_add(1, Relaxed);
        self.tenant_counters.messages_in.add(1);
    }

    /// Counts a PUBLISH sent to the client (session and tenant counters).
    #[inline]
    pub fn count_out(&self) {
        self.counters.messages_out.fetch_add(1, Relaxed);
        self.tenant_counters.messages_out.add(1);
    }

    /// Whether QoS 1/2 deliveries to this session must be persisted.
    pub fn is_persistent(&self) -> bool {
        self.expiry_secs.load(Relaxed) > 0
    }

    /// Offers a message to the queue under the documented overflow policy: QoS 0 is dropped
    /// (for offline sessions unless configured otherwise, and whenever the queue is full); a full
    /// queue makes room for QoS 1/2 by dropping its oldest QoS 0 message; with no QoS 0 to drop,
    /// a QoS 1/2 message is refused.
    pub fn push(&self, out: Outgoing) -> PushOutcome {
        match self.offer(out) {
            Ok(outcome) => outcome,
            Err(_) => {
                self.metrics.drop_message(DropReason::SessionEnded);
                PushOutcome::Dropped
            }
        }
    }

    /// [`Session::push`], except that a session that has ended gives the message back (`Err`), so
    /// that a shared-subscription message can go to another member of its group.
    pub fn offer(&self, out: Outgoing) -> Result<PushOutcome, Outgoing> {
        let online = self.online.load(Relaxed);
        if out.qos == QoS::AtMostOnce && !online && !self.queue_qos0_offline {
            self.metrics.drop_message(DropReason::OfflineQos0);
            return Ok(PushOutcome::Dropped);
        }
        let mut ob = self.outbox.lock();
        if ob.ended {
            return Err(out);
        }
        if ob.queue.len() >= self.max_queued {
            if out.qos == QoS::AtMostOnce {
                drop(ob);
                self.metrics.drop_message(DropReason::QueueFull);
                return Ok(PushOutcome::Dropped);
            }
            if ob.qos0_queued == 0 {
                drop(ob);
                self.metrics.drop_message(DropReason::QuotaRefused);
                return Ok(PushOutcome::Refused);
            }
            if let Some(pos) = ob.queue.iter().position(|o| o.qos == QoS::AtMostOnce) {
                ob.queue.remove(pos);
                ob.qos0_queued -= 1;
                self.metrics.queued.sub(1);
                self.metrics.drop_message(DropReason::QueueFull);
            }
        }
        if out.qos == QoS::AtMostOnce {
            ob.qos0_queued += 1;
        }
        let was_empty = ob.queue.is_empty();
        ob.queue.push_back(out);
        drop(ob);
        self.metrics.queued.add(1);
        if was_empty && online {
            self.wake.notify_one();
        }
        Ok(PushOutcome::Queued)
    }

    /// Empties queue and in-flight window (session end), returning what was in them.
    pub fn drain_all(&self) -> Vec<Outgoing> {
        let mut ob = self.outbox.lock();
        let queued = ob.queue.len();
        let inflight = ob.inflight.len();
        let mut all: Vec<Outgoing> = ob.inflight.drain(..).map(|(_, i)| i.out).collect();
        all.extend(ob.queue.drain(..));
        ob.qos0_queued = 0;
        drop(ob);
        self.metrics.queued.sub(queued as i64);
        self.metrics.inflight.sub(inflight as i64);
        all
    }
}

impl Subscriber for Session {
    fn id(&self) -> SubscriberId {
        self.id
    }

    fn is_available(&self) -> bool {
        self.online.load(Relaxed) && self.outbox.lock().queue.len() < self.max_queued
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferrohub_types::{Message, TopicLimits, TopicName};

    fn outgoing(qos: QoS) -> Outgoing {
        Outgoing {
            message: Arc::new(Message {
                topic: TopicName::new("t", &TopicLimits::default()).unwrap(),
                payload: bytes::Bytes::from_static(b"x"),
                qos,
                retain: false,
                received_at: 0,
                properties: None,
            }),
            qos,
            retain: false,
            subscription_ids: SmallVec::new(),
            message_id: 0,
            share: None,
        }
    }

    #[test]
    fn an_ended_session_gives_messages_back() {
        let metrics = Arc::new(BrokerMetrics::default());
        let s = Session::new(
            1,
            TenantId::new("t"),
            "c".into(),
            10,
            true,
            metrics.clone(),
            Arc::default(),
        );
        assert_eq!(
            s.offer(outgoing(QoS::AtLeastOnce)).ok(),
            Some(PushOutcome::Queued)
        );
        s.outbox.lock().ended = true;
        // A publication that chose this session before it ended comes back to its publisher
        // (which hands a shared-subscription message to another member) ...
        assert!(s.offer(outgoing(QoS::AtLeastOnce)).is_err());
        // ... and `push` counts it as dropped with the session, never queues it.
        assert_eq!(s.push(outgoing(QoS::AtLeastOnce)), PushOutcome::Dropped);
        assert_eq!(metrics.dropped(DropReason::SessionEnded), 1);
        assert_eq!(s.outbox.lock().queue.len(), 1);
    }
}
