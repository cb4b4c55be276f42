//! The broker core: the session registry, the publish path and session lifecycle (attach,
//! detach, takeover, expiry, wills, shared-subscription redispatch).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrohub_router::{Match, Router, Subscriber, SubscriberId, Subscription, TenantRouter};
use ferrohub_store::{
    BrokerStore, Commit, QueuedFor, RecoveredState, SessionRecord, StoreOp, SubscriptionRecord,
};
use ferrohub_types::lifecycle::DisconnectReason;
use ferrohub_types::{
    Message, MessageProperties, QoS, SharedFilter, TenantId, TopicName, parse_shared,
};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::auth::AuthConfig;
use super::config::MqttConfig;
use super::metrics::{BrokerMetrics, DropReason};
use super::session::{Attachment, Inflight, InflightState, Kick, Outgoing, PushOutcome, Session};
use crate::shutdown::Shutdown;

/// What offering a shared-subscription message to the rest of its group gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handing {
    /// A member took it.
    Handed,
    /// Members exist but none took it (full queues, or they were ending too).
    Refused,
    /// No other member.
    NoMember,
}
/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type SessionKey = (TenantId, Arc<str>);

/// Outcome of routing one publication.
#[derive(Default)]
pub(crate) struct Published {
    /// At least one subscriber matched.
    pub matched: bool,
    /// At least one QoS 1/2 recipient could not queue it.
    pub refused: bool,
    /// Resolves when the persisted part (queued copies for persistent sessions, retained
    /// message, extra ops) is durable; `None` when nothing had to be persisted.
    pub commit: Option<Commit>,
    /// Resolves when the message sink (telemetry) has stored what it took from the message.
    pub sink: Option<SinkWait>,
}

/// What a [`MessageSink`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkOutcome {
    /// Stored durably.
    Stored,
    /// The payload could not be used (MQTT 5 publishers get PUBACK 0x99 with the reason).
    Invalid(String),
    /// The sink is overloaded: refused like a full queue (0x97; a 3.1.1 publisher is disconnected
    /// unacknowledged so that it resends).
    Busy,
    /// Storing failed: the publisher's connection is closed without an acknowledgement.
    Failed(String),
}

/// Resolves with a [`SinkOutcome`]; the publisher's acknowledgement waits for it.
pub type SinkWait = std::pin::Pin<Box<dyn std::future::Future<Output = SinkOutcome> + Send>>;

/// Takes ordinary (non-`$`) publications a hub service stores (telemetry). Unlike a service
/// subscription it runs on the publisher's path, so that a QoS 1/2 publication is acknowledged
/// only once the sink has made it durable.
pub trait MessageSink: Send + Sync + 'static {
    /// Offers a message; `None` when the sink does not take its topic. Must not block.
    fn offer(&self, tenant: &TenantId, message: &Arc<Message>, origin: &Origin)
    -> Option<SinkWait>;
}

/// Watches ordinary (non-`$`) publications of clients without taking part in their
/// acknowledgement (the rules service). Called on the publisher's path: must not block; a tap
/// that cannot keep up drops and counts on its own side. Publications of the hub itself
/// (`publish_from_service`) are never shown to it.
pub trait MessageTap: Send + Sync + 'static {
    /// Sees one publication.
    fn observe(&self, tenant: &TenantId, message: &Arc<Message>, origin: &Origin);
}

/// A message for a hub service (provisioning, twins, commands, jobs), from any tenant.
#[derive(Debug, Clone)]
pub struct ServiceMessage {
    /// The tenant it was published in.
    pub tenant: TenantId,
    /// The message.
    pub message: Arc<Message>,
    /// Who published it.
    pub origin: Origin,
}

/// The client behind a publication a service receives.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Its MQTT client id.
    pub client_id: Option<Arc<str>>,
    /// The registered device it authenticated as; `None` for anonymous clients and static users,
    /// which the policy lets act for any device of their tenant.
    pub device_id: Option<Arc<str>>,
}

impl Origin {
    /// The device the client acts as: its registered device, else (anonymous clients and static
    /// users) the device named by its client id.
    pub fn acting_device(&self) -> Option<&Arc<str>> {
        self.device_id.as_ref().or(self.client_id.as_ref())
    }
}

/// What the broker tells session observers (connectivity, twins, commands).
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// A client connected (after CONNACK was queued).
    Connected {
        /// Tenant.
        tenant: TenantId,
        /// Who.
        origin: Origin,
        /// Whether it resumed a stored session.
        session_present: bool,
        /// When (ms).
        at: u64,
    },
    /// A client's connection ended.
    Disconnected {
        /// Tenant.
        tenant: TenantId,
        /// Who.
        origin: Origin,
        /// Why.
        reason: DisconnectReason,
        /// When (ms).
        at: u64,
    },
    /// A client acknowledged (PUBACK / PUBCOMP) a message on a topic a service asked receipts
    /// for ([`Broker::observe_deliveries`]).
    Delivered {
        /// Tenant.
        tenant: TenantId,
        /// Who acknowledged it.
        origin: Origin,
        /// The topic of the message.
        topic: Arc<str>,
    },
    /// A client subscribed to reserved (`$`-rooted) filters; sent after the subscriptions are in
    /// place, so that a service answering now reaches the client.
    Subscribed {
        /// Tenant.
        tenant: TenantId,
        /// Who.
        origin: Origin,
        /// The filters granted.
        filters: Vec<Arc<str>>,
    },
}

/// What became of a service's publication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServicePublished {
    /// At least one subscriber matched.
    pub matched: bool,
    /// At least one QoS 1/2 recipient could not queue it (its queue was full).
    pub refused: bool,
}

/// A service's subscription to reserved `$`-topics across all tenants.
struct ServiceSubscription {
    filter: String,
    tx: mpsc::Sender<ServiceMessage>,
}

/// A Will Message waiting for its connection to end.
#[derive(Clone, Debug)]
pub(crate) struct PendingWill {
    pub message: Message,
    pub delay_secs: u32,
}

/// What a connection gets back from [`Broker::attach`].
pub(crate) struct Attached {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub kicked: oneshot::Receiver<Kick>,
    pub release: oneshot::Sender<()>,
    pub generation: u64,
}

/// Shared state of the MQTT broker; one per hub, shared by every listener and connection.
pub struct Broker {
    pub(crate) config: MqttConfig,
    pub(crate) router: Router<Session>,
    /// Lock order: this map, then a tenant's session index (`introspect.rs`).
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    /// Per-tenant operator views: counters, session index, figures (`introspect.rs`).
    pub(crate) tenant_states: RwLock<HashMap<TenantId, Arc<super::introspect::TenantState>>>,
    pub(crate) store: BrokerStore,
    next_message_id: AtomicU64,
    next_subscriber_id: AtomicU64,
    next_assigned_id: AtomicU64,
    /// Counters and gauges.
    pub metrics: Arc<BrokerMetrics>,
    pub(crate) auth: AuthConfig,
    pub(crate) started: Instant,
    pub(crate) connection_slots: Arc<Semaphore>,
    pub(crate) shutdown: Shutdown,
    /// Hub services listening on reserved topics.
    services: RwLock<Vec<ServiceSubscription>>,
    /// Services listening to connects, disconnects and reserved subscriptions.
    session_observers: RwLock<Vec<mpsc::Sender<SessionEvent>>>,
    /// Reserved topic filters whose acknowledged deliveries services hear of.
    delivery_filters: RwLock<Vec<String>>,
    /// The message sink (telemetry ingest), if one is installed.
    sink: std::sync::OnceLock<Arc<dyn MessageSink>>,
    /// The message tap (rules), if one is installed.
    tap: std::sync::OnceLock<Arc<dyn MessageTap>>,
    /// Live tails of single devices' traffic (see `watch.rs`).
    pub(crate) watches: Arc<super::watch::Watches>,
}

impl Broker {
    /// Builds the broker and restores the persisted state recovered from `store`.
    pub fn new(
        config: MqttConfig,
        auth: AuthConfig,
        store: BrokerStore,
        recovered: RecoveredState,
        shutdown: Shutdown,
    ) -> Arc<Broker> {
        let broker = Arc::new(Broker {
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            router: Router::new(),
            sessions: Mutex::new(HashMap::new()),
            tenant_states: RwLock::new(HashMap::new()),
            store,
            next_message_id: AtomicU64::new(recovered.next_message_id.max(1)),
            next_subscriber_id: AtomicU64::new(1),
            next_assigned_id: AtomicU64::new(now_millis()),
            metrics: Arc::new(BrokerMetrics::default()),
            auth,
            started: Instant::now(),
            shutdown,
            services: RwLock::new(Vec::new()),
            session_observers: RwLock::new(Vec::new()),
            delivery_filters: RwLock::new(Vec::new()),
            sink: std::sync::OnceLock::new(),
            tap: std::sync::OnceLock::new(),
            watches: Arc::default(),
        });
        broker.restore(recovered);
        broker
    }

    fn restore(self: &Arc<Self>, recovered: RecoveredState) {
        for (tenant, message) in recovered.retained {
            self.router.tenant(&tenant).retain(Arc::new(message));
        }
        self.metrics
            .retained
            .store(self.router.retained_count() as i64, Relaxed);
        let now = now_millis();
        for rs in recovered.sessions {
            let session = self.new_session(rs.session.tenant.clone(), rs.session.client_id.clone());
            session.expiry_secs.store(rs.session.expiry_secs, Relaxed);
            let tenant_router = self.router.tenant(&session.tenant);
            {
                let mut control = session.control.lock();
                control.disconnected_at = Some(rs.session.disconnected_at.unwrap_or(now));
                control.inbound_qos2.extend(rs.inbound_qos2);
                for sub in rs.subscriptions {
                    if let Some(s) = self.router_subscription(&sub) {
                        tenant_router.subscribe(&session, s);
                        control.subscriptions.insert(sub.filter.clone(), sub);
                    }
                }
            }
            {
                let mut ob = session.outbox.lock();
                for d in rs.pending {
                    let out = Outgoing {
                        message: Arc::new(d.message),
                        qos: d.qos,
                        retain: d.retain,
                        subscription_ids: d.subscription_ids.into_iter().collect(),
                        message_id: d.message_id,
                        share: None,
                    };
                    match (d.packet_id, d.released) {
                        (Some(pid), released) if d.qos != QoS::AtMostOnce => {
                            let state = if released {
                                InflightState::AwaitingComp
                            } else {
                                InflightState::AwaitingAck
                            };
                            ob.inflight.insert(pid, Inflight { out, state });
                            self.metrics.inflight.add(1);
                        }
                        _ => {
                            ob.queue.push_back(out);
                            self.metrics.queued.add(1);
                        }
                    }
                }
            }
            let elapsed = now.saturating_sub(rs.session.disconnected_at.unwrap_or(now)) / 1000;
            let remaining = u64::from(rs.session.expiry_secs).saturating_sub(elapsed);
            self.sessions.lock().insert(
                (session.tenant.clone(), session.client_id.clone()),
                session.clone(),
            );
            self.index_session(&session);
            self.metrics.persistent_sessions.fetch_add(1, Relaxed);
            self.schedule_expiry(&session, 0, Duration::from_secs(remaining));
        }
    }

    fn new_session(&self, tenant: TenantId, client_id: Arc<str>) -> Arc<Session> {
        self.metrics.sessions.fetch_add(1, Relaxed);
        let tenant_counters = self.tenant_state(&tenant).counters.clone();
        Arc::new(Session::new(
            self.next_subscriber_id.fetch_add(1, Relaxed),
            tenant,
            client_id,
            self.config.max_queued_messages,
            self.config.queue_qos0_offline,
            self.metrics.clone(),
            tenant_counters,
        ))
    }

    /// The router subscription for a stored/requested subscription, or `None` if its filter is invalid.
    pub(crate) fn router_subscription(&self, sub: &SubscriptionRecord) -> Option<Subscription> {
        let parsed = self.parse_filter(&sub.filter)?;
        Some(Subscription {
            filter: parsed.filter,
            share_group: parsed.group,
            qos: sub.qos,
            no_local: sub.no_local,
            retain_as_published: sub.retain_as_published,
            subscription_id: sub.subscription_id,
        })
    }

    /// A new store message id (strictly increasing across restarts).
    pub(crate) fn allocate_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Relaxed)
    }

    /// A fresh client identifier for clients that connect with an empty one.
    pub(crate) fn assign_client_id(&self) -> String {
        format!("ferrohub-{:x}", self.next_assigned_id.fetch_add(1, Relaxed))
    }

    /// Number of sessions (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Attaches a connection to the session of `client_id`, taking it over from any connection
    /// that holds it, and creating a fresh session when asked to (`clean_start`) or when none
    /// survives.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        tenant: &TenantId,
        client_id: &Arc<str>,
        clean_start: bool,
        expiry_secs: u32,
    ) -> Attached {
        let key = (tenant.clone(), client_id.clone());
        loop {
            let existing = self.sessions.lock().get(&key).cloned();
            if let Some(old) = &existing {
                let attachment = old.control.lock().attachment.take();
                if let Some(att) = attachment {
                    let _ = att.kick.send(Kick::TakenOver);
                    // A connection that does not let go within the grace period is abandoned.
                    let _ = tokio::time::timeout(Duration::from_secs(5), att.released).await;
                    continue;
                }
            }
            let (kick_tx, kick_rx) = oneshot::channel();
            let (release_tx, release_rx) = oneshot::channel();
            let attachment = Attachment {
                kick: kick_tx,
                released: release_rx,
            };
            let resumable = existing
                .as_ref()
                .is_some_and(|s| !clean_start && s.is_persistent());
            let session = match existing {
                Some(old) if resumable => old,
                other => {
                    if let Some(old) = other {
                        self.end_session(&old).await;
                    }
                    let s = self.new_session(tenant.clone(), client_id.clone());
                    let mut map = self.sessions.lock();
                    if map.contains_key(&key) {
                        // Another connection attached meanwhile; take it over in the next round.
                        drop(map);
                        self.metrics.sessions.fetch_sub(1, Relaxed);
                        continue;
                    }
                    map.insert(key.clone(), s.clone());
                    // Under the map's lock, so that the index never misses a session the map has.
                    self.index_session(&s);
                    s
                }
            };
            let was_persistent = session.is_persistent();
            session.expiry_secs.store(expiry_secs, Relaxed);
            let generation = session.generation.fetch_add(1, Relaxed) + 1;
            {
                let mut control = session.control.lock();
                if control.attachment.is_some() {
                    continue;
                }
                control.attachment = Some(attachment);
                control.disconnected_at = None;
                // Resuming within the Will Delay Interval cancels the will.
                control.pending_will = None;
            }
            session.online.store(true, Relaxed);
            match (was_persistent, expiry_secs > 0) {
                (false, true) => {
                    self.metrics.persistent_sessions.fetch_add(1, Relaxed);
                }
                (true, false) => {
                    self.metrics.persistent_sessions.fetch_sub(1, Relaxed);
                }
                _ => {}
            }
            if expiry_secs > 0 {
                self.persist_session(&session, None).await;
            } else if was_persistent {
                self.submit(vec![StoreOp::DeleteSession {
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                }])
                .await;
            }
            return Attached {
                session,
                session_present: resumable,
                kicked: kick_rx,
                release: release_tx,
                generation,
            };
        }
    }

    async fn persist_session(&self, session: &Session, disconnected_at: Option<u64>) {
        self.submit(vec![StoreOp::PutSession(SessionRecord {
            tenant: session.tenant.clone(),
            client_id: session.client_id.clone(),
            expiry_secs: session.expiry_secs.load(Relaxed),
            disconnected_at,
        })])
        .await;
    }

    /// Submits ops whose durability nobody waits for (the order still holds).
    pub(crate) async fn submit(&self, ops: Vec<StoreOp>) {
        if ops.is_empty() || !self.store.is_persistent() {
            return;
        }
        if let Err(e) = self.store.submit(ops).await {
            tracing::error!(error = %e, "persisting broker state failed");
        }
    }

    /// Called by a connection when it ends. `will` is the Will Message still armed (cleared by a
    /// normal DISCONNECT). Ends the session if it does not outlive its connection.
    pub(crate) async fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        generation: u64,
        kicked: Option<Kick>,
        will: Option<PendingWill>,
        release: oneshot::Sender<()>,
    ) {
        let current = session.generation.load(Relaxed) == generation;
        if current {
            session.online.store(false, Relaxed);
        }
        let expiry = session.expiry_secs.load(Relaxed);
        if let Some(will) = will {
            let delay = will.delay_secs.min(expiry);
            if delay == 0 {
                self.publish_will(&session.tenant, will.message).await;
            } else {
                session.control.lock().pending_will = Some(Box::new(will.message));
                let broker = self.clone();
                let s = session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(delay.into())).await;
                    let due = {
                        let mut control = s.control.lock();
                        if s.generation.load(Relaxed) == generation {
                            control.pending_will.take()
                        } else {
                            None
                        }
                    };
                    if let Some(message) = due {
                        broker.publish_will(&s.tenant, *message).await;
                    }
                });
            }
        }
        // A session taken over lives on with the new connection, which decides its fate; one
        // already ended (a purge) must not be persisted again.
        let in_map = || {
            self.sessions
                .lock()
                .get(&(session.tenant.clone(), session.client_id.clone()))
                .is_some_and(|s| Arc::ptr_eq(s, session))
        };
        if current && kicked != Some(Kick::TakenOver) && in_map() {
            let now = now_millis();
            session.control.lock().attachment = None;
            if expiry == 0 {
                self.end_session(session).await;
            } else {
                session.control.lock().disconnected_at = Some(now);
                self.persist_session(session, Some(now)).await;
                self.redispatch_shared(session, false).await;
                self.schedule_expiry(session, generation, Duration::from_secs(expiry.into()));
            }
        }
        let _ = release.send(());
    }

    fn schedule_expiry(self: &Arc<Self>, session: &Arc<Session>, generation: u64, after: Duration) {
        let broker = self.clone();
        let s = session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if s.generation.load(Relaxed) == generation && !s.online.load(Relaxed) {
                broker.end_session(&s).await;
            }
        });
    }

    /// Ends a session: removes it and its subscriptions, hands shared-subscription messages to
    /// the rest of their groups and forgets the rest.
    async fn end_session(self: &Arc<Self>, session: &Arc<Session>) {
        let key = (session.tenant.clone(), session.client_id.clone());
        {
            let mut map = self.sessions.lock();
            match map.get(&key) {
                Some(s) if Arc::ptr_eq(s, session) => {
                    map.remove(&key);
                    self.unindex_session(session);
                }
                _ => return,
            }
        }
        self.metrics.sessions.fetch_sub(1, Relaxed);
        let was_persistent = session.is_persistent();
        if was_persistent {
            self.metrics.persistent_sessions.fetch_sub(1, Relaxed);
        }
        let pending_will = session.control.lock().pending_will.take();
        if let Some(will) = pending_will {
            self.publish_will(&session.tenant, *will).await;
        }
        let tenant_router = self.router.tenant(&session.tenant);
        let subs: Vec<_> = session.control.lock().subscriptions.drain().collect();
        for (filter, _) in subs {
            if let Some(parsed) = self.parse_filter(&filter) {
                tenant_router.unsubscribe(
                    session.id(),
                    parsed.filter.as_str(),
                    parsed.group.as_deref(),
                );
            }
        }
        self.redispatch_shared(session, true).await;
        for _ in session.drain_all() {
            self.metrics.drop_message(DropReason::SessionEnded);
        }
        if was_persistent {
            self.submit(vec![StoreOp::DeleteSession {
                tenant: session.tenant.clone(),
                client_id: session.client_id.clone(),
            }])
            .await;
        }
    }

    /// Moves messages a session received through shared subscriptions (queued, and in flight when
    /// the session is ending) to other members of their groups.
    async fn redispatch_shared(self: &Arc<Self>, session: &Arc<Session>, include_inflight: bool) {
        let moved: Vec<Outgoing> = {
            let mut ob = session.outbox.lock();
            if include_inflight {
                // Ending: from here on a publication that picked this session is given back
                // (Session::offer) and handed to another member by the publisher.
                ob.ended = true;
            }
            let mut moved = Vec::new();
            let mut kept = std::collections::VecDeque::with_capacity(ob.queue.len());
            for out in ob.queue.drain(..) {
                if out.share.is_some() {
                    moved.push(out);
                } else {
                    kept.push_back(out);
                }
            }
            ob.queue = kept;
            ob.qos0_queued = ob.queue.iter().filter(|o| o.qos == QoS::AtMostOnce).count();
            self.metrics.queued.sub(moved.len() as i64);
            if include_inflight {
                let pids: Vec<u16> = ob
                    .inflight
                    .iter()
                    .filter(|(_, i)| i.out.share.is_some() && i.state == InflightState::AwaitingAck)
                    .map(|(pid, _)| *pid)
                    .collect();
                for pid in pids {
                    if let Some(i) = ob.inflight.shift_remove(&pid) {
                        self.metrics.inflight.sub(1);
                        moved.push(i.out);
                    }
                }
            }
            moved
        };
        if moved.is_empty() {
            return;
        }
        // Dequeues of this session's copies, logged only for messages that really left it.
        let mut ops = Vec::new();
        let mut kept = Vec::new();
        for out in moved {
            let handed =
                self.hand_to_group(&session.tenant, session, &out).await == Handing::Handed;
            if !handed && !include_inflight {
                // Nobody else can take it: it stays with this (persistent) session.
                kept.push(out);
                continue;
            }
            if !handed {
                self.metrics.drop_message(DropReason::SessionEnded);
            }
            if out.message_id != 0 {
                ops.push(StoreOp::Dequeue {
                    tenant: session.tenant.clone(),
                    client_id: session.client_id.clone(),
                    message_id: out.message_id,
                });
            }
        }
        if !kept.is_empty() {
            // Back where they were, in their order, ahead of anything queued since.
            let mut ob = session.outbox.lock();
            self.metrics.queued.add(kept.len() as i64);
            for out in kept.into_iter().rev() {
                if out.qos == QoS::AtMostOnce {
                    ob.qos0_queued += 1;
                }
                ob.queue.push_front(out);
            }
        }
        self.submit(ops).await;
    }

    /// A message that `ended` (a session that has just ended) was to get: through a shared
    /// subscription, it goes to another member of the group; otherwise it is dropped like any
    /// message of an ended session. A QoS 1/2 message that members exist for but none could take
    /// is refused (the publisher is told), never dropped silently.
    async fn hand_to_another_member(
        &self,
        tenant: &TenantId,
        ended: &Arc<Session>,
        out: Outgoing,
    ) -> PushOutcome {
        match self.hand_to_group(tenant, ended, &out).await {
            Handing::Handed => PushOutcome::Queued,
            Handing::Refused if out.qos != QoS::AtMostOnce => PushOutcome::Refused,
            Handing::Refused | Handing::NoMember => {
                self.metrics.drop_message(DropReason::SessionEnded);
                PushOutcome::Dropped
            }
        }
    }

    /// Offers `out` (a shared-subscription message of `from`) to other members of its group: a
    /// few tries, since members can be leaving at the same time.
    async fn hand_to_group(
        &self,
        tenant: &TenantId,
        from: &Arc<Session>,
        out: &Outgoing,
    ) -> Handing {
        let Some(share) = &out.share else {
            return Handing::NoMember;
        };
        let tenant_router = self.router.tenant(tenant);
        let mut result = Handing::NoMember;
        for _ in 0..4 {
            let Some((member, qos)) = tenant_router.redispatch(share, from.id()) else {
                break;
            };
            if self.hand_over(tenant, &member, qos, out).await {
                return Handing::Handed;
            }
            result = Handing::Refused;
        }
        result
    }

    /// Gives a copy of `out` to another share-group member, persisting it first when the member's
    /// session is persistent (so that the member's acknowledgement is always logged after it).
    /// Returns false when the member refused it (its queue is full).
    async fn hand_over(
        &self,
        tenant: &TenantId,
        member: &Arc<Session>,
        qos: QoS,
        out: &Outgoing,
    ) -> bool {
        let mut copy = out.clone();
        copy.qos = qos.min(out.message.qos);
        copy.message_id = 0;
        let persisted =
            member.is_persistent() && copy.qos != QoS::AtMostOnce && self.store.is_persistent();
        if persisted {
            copy.message_id = self.allocate_message_id();
            self.submit(vec![StoreOp::Enqueue {
                tenant: tenant.clone(),
                message_id: copy.message_id,
                message: (*copy.message).clone(),
                recipients: vec![QueuedFor {
                    client_id: member.client_id.clone(),
                    qos: copy.qos,
                    retain: copy.retain,
                    subscription_ids: copy.subscription_ids.to_vec(),
                }],
            }])
            .await;
        }
        let message_id = copy.message_id;
        match member.offer(copy) {
            Ok(PushOutcome::Refused) => {}
            Ok(_) => return true,
            // The member ended after it was chosen: it handed its messages on already, so this
            // copy is not delivered by it.
            Err(_) => {}
        }
        if persisted {
            self.submit(vec![StoreOp::Dequeue {
                tenant: tenant.clone(),
                client_id: member.client_id.clone(),
                message_id,
            }])
            .await;
        }
        false
    }

    async fn publish_will(self: &Arc<Self>, tenant: &TenantId, mut message: Message) {
        message.received_at = now_millis();
        let tenant_router = self.router.tenant(tenant);
        let mut scratch = Vec::new();
        let _ = self
            .publish(
                &tenant_router,
                0,
                None,
                Arc::new(message),
                Vec::new(),
                &mut scratch,
            )
            .await;
    }

    /// Routes a message: updates the retained store, queues it for every matching session,
    /// persists what persistent sessions must not lose, and reports what the publisher should be
    /// told. `extra_ops` are persisted in the same commit (e.g. inbound QoS 2 state).
    pub(crate) async fn publish(
        &self,
        tenant_router: &TenantRouter<Session>,
        publisher: SubscriberId,
        origin: Option<&Origin>,
        message: Arc<Message>,
        mut ops: Vec<StoreOp>,
        scratch: &mut Vec<Match<Session>>,
    ) -> Published {
        let persistent_store = self.store.is_persistent();
        let tenant = tenant_router.tenant();
        if message.retain {
            let count = tenant_router.retain(message.clone());
            self.metrics.retained.store(count as i64, Relaxed);
            // `$SYS` statistics are re-published after a restart anyway; persisting them is waste.
            if persistent_store && !message.topic.starts_with("$SYS/") {
                ops.push(if message.payload.is_empty() {
                    StoreOp::DeleteRetained {
                        tenant: tenant.clone(),
                        topic: message.topic.clone(),
                    }
                } else {
                    StoreOp::PutRetained {
                        tenant: tenant.clone(),
                        message: (*message).clone(),
                    }
                });
            }
        }
        tenant_router.route(publisher, &message, scratch);
        // Services listen on reserved `$`-topics only, so ordinary traffic skips the lookup.
        let (to_service, service_refused) =
            if message.topic.as_str().starts_with('$') && publisher != 0 {
                self.deliver_to_services(tenant, &message, origin)
            } else {
                (false, false)
            };
        if publisher != 0
            && !message.topic.as_str().starts_with('$')
            && let Some(tap) = self.tap.get()
        {
            tap.observe(tenant, &message, origin.unwrap_or(&Origin::default()));
        }
        let sink = match self.sink.get() {
            Some(sink) if publisher != 0 && !message.topic.as_str().starts_with('$') => {
                sink.offer(tenant, &message, origin.unwrap_or(&Origin::default()))
            }
            _ => None,
        };
        let mut result = Published {
            matched: !scratch.is_empty() || to_service || sink.is_some(),
            sink,
            // A service that cannot take a QoS 1/2 message refuses it like a full queue: the
            // publisher is never told it was accepted (MQTT 5: 0x97).
            refused: service_refused && message.qos != QoS::AtMostOnce,
            ..Published::default()
        };
        let mut message_id = 0;
        if persistent_store && message.qos != QoS::AtMostOnce {
            let mut recipients = Vec::new();
            for m in scratch.iter() {
                if m.qos != QoS::AtMostOnce && m.subscriber.is_persistent() {
                    recipients.push(QueuedFor {
                        client_id: m.subscriber.client_id.clone(),
                        qos: m.qos,
                        retain: m.retain,
                        subscription_ids: m.subscription_ids.to_vec(),
                    });
                }
            }
            if !recipients.is_empty() {
                message_id = self.next_message_id.fetch_add(1, Relaxed);
                ops.push(StoreOp::Enqueue {
                    tenant: tenant.clone(),
                    message_id,
                    message: (*message).clone(),
                    recipients,
                });
            }
        }
        // Persist before queueing, so that a subscriber's acknowledgement (which dequeues) is
        // always logged after the enqueue it refers to.
        if !ops.is_empty() && persistent_store {
            match self.store.submit(ops).await {
                Ok(commit) => result.commit = Some(commit),
                Err(e) => {
                    tracing::error!(error = %e, "persisting a publication failed");
                    result.refused = true;
                    scratch.clear();
                    return result;
                }
            }
        }
        let mut undo = Vec::new();
        for m in scratch.drain(..) {
            let persisted =
                message_id != 0 && m.qos != QoS::AtMostOnce && m.subscriber.is_persistent();
            let client_id = persisted.then(|| m.subscriber.client_id.clone());
            let offered = m.subscriber.offer(Outgoing {
                message: message.clone(),
                qos: m.qos,
                retain: m.retain,
                subscription_ids: m.subscription_ids,
                message_id: if persisted { message_id } else { 0 },
                share: m.share,
            });
            let outcome = match offered {
                Ok(outcome) => outcome,
                Err(out) => {
                    // The subscriber's session ended between routing and now. Its copy in the
                    // store goes; a shared-subscription message goes to another member.
                    if let Some(client_id) = client_id.clone() {
                        undo.push(StoreOp::Dequeue {
                            tenant: tenant.clone(),
                            client_id,
                            message_id,
                        });
                    }
                    self.hand_to_another_member(tenant, &m.subscriber, out)
                        .await
                }
            };
            if outcome == PushOutcome::Refused {
                result.refused = true;
                if let Some(client_id) = client_id {
                    undo.push(StoreOp::Dequeue {
                        tenant: tenant.clone(),
                        client_id,
                        message_id,
                    });
                }
            }
        }
        self.submit(undo).await;
        result
    }

    /// Subscribes a hub service to a reserved topic filter (it must start with `$`) in every
    /// tenant. Messages that devices publish there are handed to `tx` at most once; when the
    /// service's queue is full the message is dropped and counted
    /// (`dropped_total{reason="service_busy"}`) and a QoS 1/2 publisher is refused (MQTT 5
    /// PUBACK 0x97; a 3.1.1 publisher is disconnected unacknowledged, so it resends), so a slow
    /// service never stalls publishers and never loses an acknowledged message.
    pub fn subscribe_service(&self, filter: &str, tx: mpsc::Sender<ServiceMessage>) {
        self.services.write().push(ServiceSubscription {
            filter: filter.to_string(),
            tx,
        });
    }

    /// Installs the message sink (once; later calls are ignored and return false).
    pub fn set_sink(&self, sink: Arc<dyn MessageSink>) -> bool {
        self.sink.set(sink).is_ok()
    }

    /// Installs the message tap (once; later calls are ignored and return false).
    pub fn set_tap(&self, tap: Arc<dyn MessageTap>) -> bool {
        self.tap.set(tap).is_ok()
    }

    /// Whether a message sink or tap is installed (connections then pass the publisher's origin).
    pub(crate) fn has_sink(&self) -> bool {
        self.sink.get().is_some() || self.tap.get().is_some()
    }

    fn deliver_to_services(
        &self,
        tenant: &TenantId,
        message: &Arc<Message>,
        origin: Option<&Origin>,
    ) -> (bool, bool) {
        let services = self.services.read();
        let mut matched = false;
        let mut refused = false;
        for s in services.iter() {
            if ferrohub_types::filter_matches(&s.filter, message.topic.as_str()) {
                matched = true;
                let m = ServiceMessage {
                    tenant: tenant.clone(),
                    message: message.clone(),
                    origin: origin.cloned().unwrap_or_default(),
                };
                if s.tx.try_send(m).is_err() {
                    self.metrics.drop_message(DropReason::ServiceBusy);
                    refused = true;
                }
            }
        }
        (matched, refused)
    }

    /// Publishes a message from a hub service to a tenant's subscribers.
    pub async fn publish_from_service(
        &self,
        tenant: &TenantId,
        topic: &str,
        payload: Bytes,
        qos: QoS,
    ) {
        self.publish_from_hub(tenant, topic, payload, qos, false, None)
            .await;
    }

    /// Publishes a message from a hub service with MQTT 5 properties (e.g. Response Topic and
    /// Correlation Data for a command), and says whether anyone took it. For QoS 1/2 it returns
    /// once the copies queued for persistent sessions are durable.
    pub async fn publish_from_service_with(
        &self,
        tenant: &TenantId,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        properties: Option<MessageProperties>,
    ) -> ServicePublished {
        self.publish_from_hub(
            tenant,
            topic,
            payload,
            qos,
            false,
            properties.filter(|p| !p.is_empty()).map(Arc::new),
        )
        .await
    }

    /// Subscribes a service to session events (connects, disconnects, reserved subscriptions)
    /// in every tenant. Events are handed over at most once: when the service's queue is full the
    /// event is dropped and counted (`dropped_total{reason="service_busy"}`).
    pub fn observe_sessions(&self, tx: mpsc::Sender<SessionEvent>) {
        self.session_observers.write().push(tx);
    }

    /// Asks for [`SessionEvent::Delivered`] when a client acknowledges a message on a topic
    /// matching `filter` (a reserved `$` filter, e.g. the command service's requests).
    pub fn observe_deliveries(&self, filter: &str) {
        self.delivery_filters.write().push(filter.to_string());
    }

    /// Whether acknowledging a delivery on `topic` is to be reported (only reserved topics
    /// are looked at, so ordinary traffic pays one byte comparison).
    pub(crate) fn wants_receipt(&self, topic: &str) -> bool {
        topic.starts_with('$')
            && self
                .delivery_filters
                .read()
                .iter()
                .any(|f| ferrohub_types::filter_matches(f, topic))
    }

    /// Hands `event` to every session observer (dropped and counted where one is full).
    pub(crate) fn notify_observers(&self, event: SessionEvent) {
        let observers = self.session_observers.read();
        for tx in observers.iter() {
            if tx.try_send(event.clone()).is_err() {
                self.metrics.drop_message(DropReason::ServiceBusy);
            }
        }
    }

    /// Tells session observers about `event`, and publishes connects and disconnects of
    /// registered devices as lifecycle events (QoS 1, JSON) on
    /// `$events/devices/{device}/connected|disconnected` in the device's tenant.
    pub(crate) async fn session_event(&self, event: SessionEvent) {
        let lifecycle = match &event {
            SessionEvent::Connected {
                tenant,
                origin,
                session_present,
                at,
            } => origin.device_id.as_ref().map(|d| {
                (
                    tenant.clone(),
                    format!("$events/devices/{d}/connected"),
                    serde_json::json!({
                        "event": "connected",
                        "deviceId": &**d,
                        "clientId": origin.client_id.as_deref(),
                        "sessionPresent": session_present,
                        "at": at,
                    }),
                )
            }),
            SessionEvent::Disconnected {
                tenant,
                origin,
                reason,
                at,
            } => origin.device_id.as_ref().map(|d| {
                (
                    tenant.clone(),
                    format!("$events/devices/{d}/disconnected"),
                    serde_json::json!({
                        "event": "disconnected",
                        "deviceId": &**d,
                        "clientId": origin.client_id.as_deref(),
                        "reason": reason.as_str(),
                        "at": at,
                    }),
                )
            }),
            SessionEvent::Subscribed { .. } | SessionEvent::Delivered { .. } => None,
        };
        self.notify_observers(event);
        if let Some((tenant, topic, body)) = lifecycle {
            self.publish_from_hub(
                &tenant,
                &topic,
                Bytes::from(body.to_string()),
                QoS::AtLeastOnce,
                false,
                None,
            )
            .await;
        }
    }

    /// Publishes a message from the hub itself (`$SYS`, services) to a tenant.
    pub async fn publish_internal(
        &self,
        tenant: &TenantId,
        topic: &str,
        payload: Bytes,
        retain: bool,
    ) {
        self.publish_from_hub(tenant, topic, payload, QoS::AtMostOnce, retain, None)
            .await;
    }

    /// A publication with no client behind it (publisher id 0, so services never hear it).
    async fn publish_from_hub(
        &self,
        tenant: &TenantId,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<Arc<MessageProperties>>,
    ) -> ServicePublished {
        let Ok(topic) = TopicName::new(topic, &ferrohub_types::TopicLimits::default()) else {
            return ServicePublished::default();
        };
        let message = Arc::new(Message {
            topic,
            payload,
            qos,
            retain,
            received_at: now_millis(),
            properties,
        });
        let tenant_router = self.router.tenant(tenant);
        let mut scratch = Vec::new();
        let published = self
            .publish(&tenant_router, 0, None, message, Vec::new(), &mut scratch)
            .await;
        let mut refused = published.refused;
        if let Some(commit) = published.commit {
            refused |= commit.await.is_err();
        }
        ServicePublished {
            matched: published.matched,
            refused,
        }
    }

    /// Tells every connected client to disconnect (server shutdown).
    pub(crate) fn kick_all(&self, kick: Kick) {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        for s in sessions {
            if let Some(att) = s.control.lock().attachment.take() {
                let _ = att.kick.send(kick);
                // The connection task releases on its own; nobody waits for `released` here.
                drop(att.released);
            }
        }
    }

    /// Disconnects the connection attached to `client_id` in `tenant`, if any. Returns whether
    /// one was told to go.
    pub fn kick_client(&self, tenant: &TenantId, client_id: &str, kick: Kick) -> bool {
        let key = (tenant.clone(), Arc::<str>::from(client_id));
        let Some(session) = self.sessions.lock().get(&key).cloned() else {
            return false;
        };
        let Some(att) = session.control.lock().attachment.take() else {
            return false;
        };
        let told = att.kick.send(kick).is_ok();
        drop(att.released);
        told
    }

    /// Ends the session of `client_id` in `tenant` for good — its connection is closed (v5:
    /// DISCONNECT 0x87), its subscriptions, queued and in-flight messages and persisted state are
    /// deleted. Used when a device is decommissioned. Returns whether a session existed.
    pub async fn discard_session(self: &Arc<Self>, tenant: &TenantId, client_id: &str) -> bool {
        let key = (tenant.clone(), Arc::<str>::from(client_id));
        for _ in 0..3 {
            let Some(session) = self.sessions.lock().get(&key).cloned() else {
                return false;
            };
            let attachment = session.control.lock().attachment.take();
            match attachment {
                Some(att) => {
                    let _ = att.kick.send(Kick::NotAuthorized);
                    let _ = tokio::time::timeout(Duration::from_secs(5), att.released).await;
                }
                None => {
                    self.end_session(&session).await;
                    return true;
                }
            }
        }
        false
    }

    /// Whether `client_id` of `tenant` has a connection attached now.
    pub fn is_connected(&self, tenant: &TenantId, client_id: &str) -> bool {
        let key = (tenant.clone(), Arc::<str>::from(client_id));
        let session = self.sessions.lock().get(&key).cloned();
        session.is_some_and(|s| s.control.lock().attachment.is_some())
    }

    /// Whether any client subscribes to `topic` in `tenant` (so that a service can skip building
    /// a message nobody would receive).
    pub fn has_subscribers(&self, tenant: &TenantId, topic: &str) -> bool {
        self.router.tenant(tenant).has_match(topic)
    }

    /// The client ids of every session (online or not) in `tenant`.
    pub fn client_ids_in(&self, tenant: &TenantId) -> Vec<String> {
        self.sessions
            .lock()
            .keys()
            .filter(|(t, _)| t == tenant)
            .map(|(_, c)| c.to_string())
            .collect()
    }

    /// Deletes the retained messages matching `filter` in `tenant` (persisted deletions, as if
    /// an empty retained message had been published on each topic). Returns how many.
    pub async fn purge_retained(&self, tenant: &TenantId, filter: &str) -> usize {
        let mut found = Vec::new();
        self.router
            .tenant(tenant)
            .retained_matching(filter, &mut found);
        for m in &found {
            self.publish_from_hub(
                tenant,
                m.topic.as_str(),
                Bytes::new(),
                QoS::AtMostOnce,
                true,
                None,
            )
            .await;
        }
        found.len()
    }

    /// Validates a subscription filter (plain or `$share/{group}/…`) under the configured limits.
    pub(crate) fn parse_filter(&self, filter: &str) -> Option<SharedFilter> {
        parse_shared(filter, &self.config.topic_limits()).ok()
    }
}

/// Live tails of one device's messages (the console's device page).
impl Broker {
    /// Watches `device` of `tenant`: the receiver gets a copy of every PUBLISH its connection
    /// sends and of every message delivered to it, while the guard lives. A registered device is
    /// matched on the device it authenticated as, any other client on its client id. The queue
    /// holds `capacity` copies (1 to 4096); copies that do not fit are dropped and counted
    /// ([`super::watch::WatchReceiver::take_skipped`]). At most 64 watchers per hub.
    pub fn watch_device(
        &self,
        tenant: &TenantId,
        device: &str,
        capacity: usize,
    ) -> Result<(super::watch::WatchReceiver, super::watch::WatchGuard), super::watch::WatchError>
    {
        self.watches.watch(tenant, device, capacity)
    }

    /// Map lookups the message path has made for watches (zero while nobody ever watched).
    pub fn watch_lookups(&self) -> u64 {
        self.watches.lookups()
    }
}
