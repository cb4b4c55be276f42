//! What operators see of the broker (the console's broker page, `/api/v1/.../broker/...`):
//! sessions, subscriptions and retained messages of a tenant, per-tenant counters with top
//! talkers, and the hub-wide `$SYS` figures.
//!
//! Read-mostly and off the publish path: the only hot-path cost is two relaxed increments per
//! message (the session's own counter and the tenant's striped one). Listings walk one tenant's
//! session index (a `BTreeMap` by client id, so paging by client id is a range scan); the
//! per-tenant figures that need a walk over the tenant's sessions (connections by protocol and
//! transport, top talkers, rates) are computed at most once per second per tenant and shared.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ferrohub_types::{Message, QoS, TenantId, TopicError, TopicFilter, TopicName};
use hashbrown::HashMap;
use parking_lot::Mutex;

use super::broker::Broker;
use super::metrics::Striped;
use super::session::Session;

/// How long a tenant's computed figures (connections, rates, top talkers) are reused.
const FIGURES_REUSE: Duration = Duration::from_secs(1);
/// Top talkers kept per tenant.
pub const TOP_TALKERS: usize = 10;
/// Largest page any listing returns.
pub const MAX_PAGE: usize = 1000;

/// A tenant's message counters: striped, since every connection of the tenant bumps them.
#[derive(Debug, Default)]
pub struct TenantCounters {
    /// PUBLISH packets received from the tenant's clients.
    pub messages_in: Striped,
    /// PUBLISH packets sent to the tenant's clients.
    pub messages_out: Striped,
}

/// Per-session message counters (only the session's connection task writes them).
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// PUBLISH packets received from the client.
    pub messages_in: AtomicU64,
    /// PUBLISH packets sent to the client.
    pub messages_out: AtomicU64,
}

/// Facts about the connection serving a session (the last one, for an offline session).
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    /// `"3.1.1"` or `"5.0"`.
    pub protocol: &'static str,
    /// `"tcp"`, `"tls"` or `"ws"`.
    pub transport: &'static str,
    /// Remote address.
    pub remote: SocketAddr,
    /// When the CONNECT was accepted (ms since the epoch).
    pub connected_at: u64,
    /// Keep-alive in force (seconds; 0: none).
    pub keep_alive_secs: u16,
    /// The client asked for a clean start.
    pub clean_start: bool,
    /// The registered device it authenticated as.
    pub device_id: Option<Arc<str>>,
}

impl ConnectionFacts {
    /// The transport name for a listener's protocol name (`mqtt`, `mqtts`, `ws`).
    pub(crate) fn transport_of(listener_protocol: &str) -> &'static str {
        match listener_protocol {
            "mqtts" => "tls",
            "ws" => "ws",
            _ => "tcp",
        }
    }
}

/// One session as listed.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// Client identifier.
    pub client_id: Arc<str>,
    /// A connection serves it now.
    pub connected: bool,
    /// The current connection, else the last one since the hub started (`None` for a session
    /// restored from the store and not resumed yet).
    pub connection: Option<ConnectionFacts>,
    /// When its last connection ended (offline sessions).
    pub disconnected_at: Option<u64>,
    /// Session Expiry Interval (seconds; 0: ends with its connection).
    pub session_expiry_secs: u32,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages queued, not yet sent.
    pub queued: usize,
    /// QoS 1/2 deliveries awaiting acknowledgement.
    pub inflight: usize,
    /// PUBLISH packets received from the client since the session was created (this process).
    pub messages_in: u64,
    /// PUBLISH packets sent to it since the session was created (this process).
    pub messages_out: u64,
}

/// One subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionView {
    /// The subscribing client.
    pub client_id: Arc<str>,
    /// The topic filter (without the `$share/{group}/` prefix).
    pub filter: Arc<str>,
    /// The share group of a shared subscription.
    pub share_group: Option<Arc<str>>,
    /// Maximum QoS granted.
    pub qos: QoS,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling (0, 1, 2).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// A page of a listing and the cursor of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The rows.
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Connected clients of one protocol version over one transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionCount {
    /// `"3.1.1"` or `"5.0"`.
    pub protocol: &'static str,
    /// `"tcp"`, `"tls"` or `"ws"`.
    pub transport: &'static str,
    /// Connected clients.
    pub count: u64,
}

/// A client among the tenant's busiest publishers over the last interval.
#[derive(Debug, Clone)]
pub struct Talker {
    /// Client identifier.
    pub client_id: Arc<str>,
    /// Its registered device, if any.
    pub device_id: Option<Arc<str>>,
    /// PUBLISH packets received from it in the interval.
    pub messages_in: u64,
    /// The same per second.
    pub messages_in_per_sec: f64,
}

/// A tenant's broker figures.
#[derive(Debug, Clone, Default)]
pub struct TenantFigures {
    /// PUBLISH packets received from the tenant's clients since the hub started.
    pub messages_in: u64,
    /// PUBLISH packets sent to them since the hub started.
    pub messages_out: u64,
    /// Received per second over the last interval.
    pub messages_in_per_sec: f64,
    /// Sent per second over the last interval.
    pub messages_out_per_sec: f64,
    /// The interval the rates and talkers cover (ms).
    pub interval_ms: u64,
    /// Sessions (online and offline).
    pub sessions: u64,
    /// Connected clients.
    pub connected: u64,
    /// Connected clients by protocol version and transport (only non-zero rows).
    pub connections: Vec<ConnectionCount>,
    /// Subscriptions (plain, plus share-group memberships).
    pub subscriptions: u64,
    /// Retained messages.
    pub retained: u64,
    /// At most [`TOP_TALKERS`] clients with the most messages in over the interval (busiest first;
    /// only clients that published).
    pub top_talkers: Vec<Talker>,
}

/// The hub-wide figures `$SYS/broker/...` publishes.
#[derive(Debug, Clone, Default)]
pub struct SysFigures {
    /// `ferrohub {version}`.
    pub version: String,
    /// Seconds since the broker started.
    pub uptime_secs: u64,
    /// Connected clients.
    pub clients_connected: u64,
    /// Sessions (online and offline).
    pub clients_total: u64,
    /// Persistent sessions.
    pub clients_persistent: u64,
    /// Configured connection limit.
    pub clients_maximum: u64,
    /// Connections ever accepted.
    pub connections_total: u64,
    /// Connections refused before CONNACK success.
    pub connections_refused: u64,
    /// PUBLISH packets received.
    pub messages_received: u64,
    /// PUBLISH packets sent.
    pub messages_sent: u64,
    /// Messages dropped (all reasons).
    pub messages_dropped: u64,
    /// QoS 1/2 deliveries awaiting acknowledgement.
    pub messages_inflight: u64,
    /// Messages waiting in session queues.
    pub messages_queued: u64,
    /// Retained messages.
    pub retained_count: u64,
    /// Subscriptions.
    pub subscription_count: u64,
    /// Bytes read from clients.
    pub bytes_received: u64,
    /// Bytes written to clients.
    pub bytes_sent: u64,
}

/// Why a retained-message request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetainedQueryError {
    /// The topic filter or name is not valid.
    #[error("{what} {given:?} is not valid: {error}")]
    Invalid {
        /// "topic filter" or "topic".
        what: &'static str,
        /// What was given.
        given: String,
        /// Why.
        error: TopicError,
    },
}

/// The last computed figures of a tenant and what the next computation diffs against.
struct Computed {
    at: Instant,
    figures: TenantFigures,
    /// `messages_in` of every session at `at`, for the talkers of the next interval.
    session_in: HashMap<Arc<str>, u64>,
}

/// One tenant's broker state for operators: counters, a session index, computed figures.
pub(crate) struct TenantState {
    pub(crate) counters: Arc<TenantCounters>,
    sessions: Mutex<BTreeMap<Arc<str>, Arc<Session>>>,
    computed: Mutex<Option<Computed>>,
    created: Instant,
}

impl TenantState {
    fn new() -> TenantState {
        TenantState {
            counters: Arc::default(),
            sessions: Mutex::new(BTreeMap::new()),
            computed: Mutex::new(None),
            created: Instant::now(),
        }
    }

    fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }
}

fn cap(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE)
}

/// Joins a composite cursor: U+0000 cannot appear in MQTT strings, so it separates safely.
fn cursor(a: &str, b: &str) -> String {
    format!("{a}\u{0}{b}")
}

impl Broker {
    /// The operator-facing state of `tenant`, created on first use.
    pub(crate) fn tenant_state(&self, tenant: &TenantId) -> Arc<TenantState> {
        if let Some(t) = self.tenant_states.read().get(tenant) {
            return t.clone();
        }
        self.tenant_states
            .write()
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(TenantState::new()))
            .clone()
    }

    /// Adds a session to its tenant's index (it was just put into the session map).
    pub(crate) fn index_session(&self, session: &Arc<Session>) {
        self.tenant_state(&session.tenant)
            .sessions
            .lock()
            .insert(session.client_id.clone(), session.clone());
    }

    /// Removes a session from its tenant's index (it was just removed from the session map).
    pub(crate) fn unindex_session(&self, session: &Arc<Session>) {
        let state = self.tenant_state(&session.tenant);
        let mut index = state.sessions.lock();
        if index
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            index.remove(&session.client_id);
        }
    }

    fn view_of(session: &Session) -> SessionView {
        let (connected, connection, disconnected_at, subscriptions) = {
            let control = session.control.lock();
            (
                control.attachment.is_some(),
                control.connection.as_deref().cloned(),
                control.disconnected_at,
                control.subscriptions.len(),
            )
        };
        let (queued, inflight) = {
            let ob = session.outbox.lock();
            (ob.queue.len(), ob.inflight.len())
        };
        SessionView {
            client_id: session.client_id.clone(),
            connected,
            connection,
            disconnected_at,
            session_expiry_secs: session.expiry_secs.load(Relaxed),
            subscriptions,
            queued,
            inflight,
            messages_in: session.counters.messages_in.load(Relaxed),
            messages_out: session.counters.messages_out.load(Relaxed),
        }
    }

    fn subscriptions_of(session: &Session) -> Vec<SubscriptionView> {
        let control = session.control.lock();
        let mut subs: Vec<SubscriptionView> = control
            .subscriptions
            .values()
            .map(|r| {
                let (group, filter) = match r.filter.strip_prefix("$share/") {
                    Some(rest) => match rest.split_once('/') {
                        Some((g, f)) => (Some(Arc::from(g)), Arc::from(f)),
                        None => (None, r.filter.clone()),
                    },
                    None => (None, r.filter.clone()),
                };
                SubscriptionView {
                    client_id: session.client_id.clone(),
                    filter,
                    share_group: group,
                    qos: r.qos,
                    no_local: r.no_local,
                    retain_as_published: r.retain_as_published,
                    retain_handling: r.retain_handling,
                    subscription_id: r.subscription_id,
                }
            })
            .collect();
        drop(control);
        subs.sort_by(|a, b| (&a.filter, &a.share_group).cmp(&(&b.filter, &b.share_group)));
        subs
    }

    /// A page of `tenant`'s sessions by client id: those starting with `prefix`, after the
    /// client id `after`, at most `limit` (1 to [`MAX_PAGE`]).
    pub fn sessions_page(
        &self,
        tenant: &TenantId,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Page<SessionView> {
        let limit = cap(limit);
        let state = self.tenant_state(tenant);
        let picked: Vec<Arc<Session>> = {
            let index = state.sessions.lock();
            let start = match after {
                Some(a) if a >= prefix => Bound::Excluded(a),
                _ => Bound::Included(prefix),
            };
            index
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit + 1)
                .map(|(_, s)| s.clone())
                .collect()
        };
        let more = picked.len() > limit;
        let items: Vec<SessionView> = picked
            .iter()
            .take(limit)
            .map(|s| Self::view_of(s))
            .collect();
        let next = more
            .then(|| items.last().map(|s| s.client_id.to_string()))
            .flatten();
        Page { items, next }
    }

    /// One session of `tenant` and its subscriptions.
    pub fn session_view(
        &self,
        tenant: &TenantId,
        client_id: &str,
    ) -> Option<(SessionView, Vec<SubscriptionView>)> {
        let session = self
            .tenant_state(tenant)
            .sessions
            .lock()
            .get(client_id)
            .cloned()?;
        Some((Self::view_of(&session), Self::subscriptions_of(&session)))
    }

    /// A page of `tenant`'s subscriptions ordered by (filter, client id): those whose filter
    /// starts with `filter_prefix`, after the cursor `after` (a previous page's `next`). Walks the
    /// tenant's sessions: an operator's listing, not for hot paths.
    pub fn subscriptions_page(
        &self,
        tenant: &TenantId,
        filter_prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Page<SubscriptionView> {
        let limit = cap(limit);
        let (after_filter, after_client) = match after {
            Some(c) => c.split_once('\u{0}').unwrap_or((c, "")),
            None => ("", ""),
        };
        let mut rows: Vec<SubscriptionView> = self
            .tenant_state(tenant)
            .all_sessions()
            .iter()
            .flat_map(|s| Self::subscriptions_of(s))
            .filter(|v| v.filter.starts_with(filter_prefix))
            .filter(|v| {
                after.is_none() || (&*v.filter, &*v.client_id) > (after_filter, after_client)
            })
            .collect();
        rows.sort_by(|a, b| (&a.filter, &a.client_id).cmp(&(&b.filter, &b.client_id)));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = more
            .then(|| rows.last().map(|v| cursor(&v.filter, &v.client_id)))
            .flatten();
        Page { items: rows, next }
    }

    /// A page of `tenant`'s retained messages matching `filter` (default `#`; `$`-topics need a
    /// filter that names them), ordered by topic, after the topic `after`.
    pub fn retained_page(
        &self,
        tenant: &TenantId,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Arc<Message>>, RetainedQueryError> {
        TopicFilter::new(filter, &self.config.topic_limits()).map_err(|error| {
            RetainedQueryError::Invalid {
                what: "topic filter",
                given: filter.to_string(),
                error,
            }
        })?;
        let limit = cap(limit);
        let mut found = Vec::new();
        self.router
            .tenant(tenant)
            .retained_matching(filter, &mut found);
        if let Some(a) = after {
            found.retain(|m| m.topic.as_str() > a);
        }
        found.sort_by(|a, b| a.topic.as_str().cmp(b.topic.as_str()));
        let more = found.len() > limit;
        found.truncate(limit);
        let next = more
            .then(|| found.last().map(|m| m.topic.as_str().to_string()))
            .flatten();
        Ok(Page { items: found, next })
    }

    fn retained_topic(&self, topic: &str) -> Result<TopicName, RetainedQueryError> {
        TopicName::new(topic, &self.config.topic_limits()).map_err(|error| {
            RetainedQueryError::Invalid {
                what: "topic",
                given: topic.to_string(),
                error,
            }
        })
    }

    /// The retained message of `topic` in `tenant`.
    pub fn retained_message(
        &self,
        tenant: &TenantId,
        topic: &str,
    ) -> Result<Option<Arc<Message>>, RetainedQueryError> {
        let topic = self.retained_topic(topic)?;
        let mut found = Vec::new();
        // A topic name has no wildcards: as a filter it matches itself only.
        self.router
            .tenant(tenant)
            .retained_matching(topic.as_str(), &mut found);
        Ok(found.pop())
    }

    /// Deletes the retained message of `topic` in `tenant` as an empty retained publication
    /// would (persisted before this returns). Returns whether there was one.
    pub async fn delete_retained(
        &self,
        tenant: &TenantId,
        topic: &str,
    ) -> Result<bool, RetainedQueryError> {
        let topic = self.retained_topic(topic)?;
        Ok(self.purge_retained(tenant, topic.as_str()).await > 0)
    }

    /// `tenant`'s figures: counters now; connections, rates and top talkers as computed at most
    /// [`FIGURES_REUSE`] ago (a walk over the tenant's sessions, shared by every caller).
    pub fn tenant_figures(&self, tenant: &TenantId) -> TenantFigures {
        let state = self.tenant_state(tenant);
        let mut computed = state.computed.lock();
        let fresh = computed
            .as_ref()
            .is_some_and(|c| c.at.elapsed() < FIGURES_REUSE);
        if !fresh {
            *computed = Some(self.compute_figures(tenant, &state, computed.take()));
        }
        let mut figures = computed
            .as_ref()
            .map(|c| c.figures.clone())
            .unwrap_or_default();
        drop(computed);
        figures.messages_in = state.counters.messages_in.get().max(0) as u64;
        figures.messages_out = state.counters.messages_out.get().max(0) as u64;
        figures
    }

    fn compute_figures(
        &self,
        tenant: &TenantId,
        state: &TenantState,
        previous: Option<Computed>,
    ) -> Computed {
        let now = Instant::now();
        let since = previous.as_ref().map_or(state.created, |p| p.at);
        let interval = now.duration_since(since).max(Duration::from_millis(1));
        let secs = interval.as_secs_f64();
        let (prev_in, prev_out, prev_sessions) = match previous {
            Some(p) => (p.figures.messages_in, p.figures.messages_out, p.session_in),
            None => (0, 0, HashMap::new()),
        };
        let sessions = state.all_sessions();
        let mut session_in = HashMap::with_capacity(sessions.len());
        let mut talkers = Vec::new();
        let mut by_kind: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
        let mut connected = 0;
        for s in &sessions {
            let count = s.counters.messages_in.load(Relaxed);
            let before = prev_sessions.get(&s.client_id).copied().unwrap_or(0);
            // A newer session under the same client id starts from zero again.
            let delta = if count >= before {
                count - before
            } else {
                count
            };
            session_in.insert(s.client_id.clone(), count);
            let (attached, facts) = {
                let control = s.control.lock();
                (
                    control.attachment.is_some(),
                    control
                        .connection
                        .as_ref()
                        .map(|c| (c.protocol, c.transport, c.device_id.clone())),
                )
            };
            if attached {
                connected += 1;
                if let Some((protocol, transport, _)) = &facts {
                    *by_kind.entry((protocol, transport)).or_default() += 1;
                }
            }
            if delta > 0 {
                talkers.push(Talker {
                    client_id: s.client_id.clone(),
                    device_id: facts.and_then(|(_, _, d)| d),
                    messages_in: delta,
                    messages_in_per_sec: delta as f64 / secs,
                });
            }
        }
        talkers.sort_by(|a, b| {
            b.messages_in
                .cmp(&a.messages_in)
                .then_with(|| a.client_id.cmp(&b.client_id))
        });
        talkers.truncate(TOP_TALKERS);
        let messages_in = state.counters.messages_in.get().max(0) as u64;
        let messages_out = state.counters.messages_out.get().max(0) as u64;
        let router = self.router.tenant(tenant);
        Computed {
            at: now,
            session_in,
            figures: TenantFigures {
                messages_in,
                messages_out,
                messages_in_per_sec: messages_in.saturating_sub(prev_in) as f64 / secs,
                messages_out_per_sec: messages_out.saturating_sub(prev_out) as f64 / secs,
                interval_ms: interval.as_millis() as u64,
                sessions: sessions.len() as u64,
                connected,
                connections: by_kind
                    .into_iter()
                    .map(|((protocol, transport), count)| ConnectionCount {
                        protocol,
                        transport,
                        count,
                    })
                    .collect(),
                subscriptions: router.subscription_count() as u64,
                retained: router.retained_count() as u64,
                top_talkers: talkers,
            },
        }
    }

    /// The hub-wide figures (what `$SYS/broker/...` publishes, and more).
    pub fn sys_figures(&self) -> SysFigures {
        let m = &self.metrics;
        let non_negative = |v: i64| v.max(0) as u64;
        SysFigures {
            version: format!("ferrohub {}", env!("CARGO_PKG_VERSION")),
            uptime_secs: self.started.elapsed().as_secs(),
            clients_connected: non_negative(m.connections.load(Relaxed)),
            clients_total: self.session_count() as u64,
            clients_persistent: non_negative(m.persistent_sessions.load(Relaxed)),
            clients_maximum: self.config.max_connections as u64,
            connections_total: m.connections_total.load(Relaxed),
            connections_refused: m.connections_refused.load(Relaxed),
            messages_received: m.received_total(),
            messages_sent: m.sent_total(),
            messages_dropped: m.dropped_total(),
            messages_inflight: non_negative(m.inflight.get()),
            messages_queued: non_negative(m.queued.get()),
            retained_count: non_negative(m.retained.load(Relaxed)),
            subscription_count: self.router.subscription_count() as u64,
            bytes_received: non_negative(m.bytes_received.get()),
            bytes_sent: non_negative(m.bytes_sent.get()),
        }
    }
}
