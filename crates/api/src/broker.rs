//! What the API reads and does in the MQTT broker, as a trait: the binary implements
//! [`BrokerView`] over its broker, so this crate does not depend on the adapters (and tests can
//! give it anything). The rows are the API's JSON objects (`/api/v1/tenants/{t}/broker/...`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A boxed future of a [`BrokerView`] action.
pub type ViewFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One MQTT session (online or offline).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionRow {
    /// MQTT client identifier.
    pub client_id: String,
    /// The registered device the client authenticated as (absent for anonymous clients and
    /// static users).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// A connection serves the session now.
    pub connected: bool,
    /// `3.1.1` or `5.0` (of the current or last connection; absent for a session restored from
    /// disk and not resumed since the hub started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `tcp`, `tls` or `ws`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The client's address (`ip:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<String>,
    /// When the current (or last) connection was accepted, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<u64>,
    /// When the last connection ended (offline sessions), ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<u64>,
    /// Keep-alive in force, seconds (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_secs: Option<u16>,
    /// The client asked for a clean start (3.1.1: clean session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_start: Option<bool>,
    /// Session Expiry Interval, seconds (0: the session ends with its connection).
    pub session_expiry_secs: u32,
    /// Subscriptions.
    pub subscriptions: u64,
    /// Messages queued for the client, not yet sent.
    pub queued: u64,
    /// QoS 1/2 deliveries sent and not yet acknowledged.
    pub inflight: u64,
    /// PUBLISH packets received from the client (since the session was created in this process).
    pub messages_in: u64,
    /// PUBLISH packets sent to the client (since the session was created in this process).
    pub messages_out: u64,
}

/// One subscription.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionRow {
    /// The subscribing client.
    pub client_id: String,
    /// Topic filter (without the `$share/{group}/` prefix).
    pub filter: String,
    /// Share group of a shared subscription (`$share/{group}/{filter}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_group: Option<String>,
    /// Maximum QoS granted (0, 1, 2).
    pub qos: u8,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling (0: send retained, 1: only for a new subscription, 2: never).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<u32>,
}

/// A session and its subscriptions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionDetail {
    /// The session.
    #[serde(flatten)]
    pub session: SessionRow,
    /// Its subscriptions, by filter.
    pub subscription_list: Vec<SubscriptionRow>,
}

/// A retained message as the broker holds it (rendered by the API: preview, base64).
#[derive(Debug, Clone)]
pub struct RetainedEntry {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    /// When it was published (ms since the epoch; kept across restarts).
    pub stored_at: u64,
    /// MQTT 5 Payload Format Indicator said UTF-8.
    pub payload_is_utf8: bool,
    /// MQTT 5 Content Type.
    pub content_type: Option<String>,
    /// MQTT 5 Response Topic.
    pub response_topic: Option<String>,
    /// MQTT 5 Message Expiry (absolute, ms since the epoch).
    pub expires_at: Option<u64>,
    /// MQTT 5 User Properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// A page of a listing; `next` is the cursor of the following page (pass it as `after`).
#[derive(Debug, Clone)]
pub struct ViewPage<T> {
    /// Rows.
    pub items: Vec<T>,
    /// Cursor of the next page; `None` on the last.
    pub next: Option<String>,
}

/// Connected clients of one protocol version over one transport.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ConnectionsBy {
    /// `3.1.1` or `5.0`.
    pub protocol: String,
    /// `tcp`, `tls` or `ws`.
    pub transport: String,
    /// Connected clients.
    pub count: u64,
}

/// A client among the tenant's busiest publishers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopTalker {
    /// Client identifier.
    pub client_id: String,
    /// Its registered device, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// PUBLISH packets received from it over the interval.
    pub messages_in: u64,
    /// The same per second.
    pub messages_in_per_sec: f64,
}

/// A tenant's broker figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct BrokerStats {
    /// PUBLISH packets received from the tenant's clients since the hub started.
    pub messages_in: u64,
    /// PUBLISH packets sent to the tenant's clients since the hub started.
    pub messages_out: u64,
    /// Received per second over the last interval.
    pub messages_in_per_sec: f64,
    /// Sent per second over the last interval.
    pub messages_out_per_sec: f64,
    /// The interval rates and top talkers cover (ms; figures are recomputed at most once a
    /// second per tenant).
    pub interval_ms: u64,
    /// Sessions (online and offline).
    pub sessions: u64,
    /// Connected clients.
    pub connected: u64,
    /// Connected clients by protocol and transport.
    pub connections: Vec<ConnectionsBy>,
    /// Subscriptions (plain, plus share-group memberships).
    pub subscriptions: u64,
    /// Retained messages.
    pub retained: u64,
    /// Up to 10 clients with the most messages in over the interval, busiest first.
    pub top_talkers: Vec<TopTalker>,
}

/// The hub-wide broker figures (what `$SYS/broker/...` publishes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
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
    /// Connection limit.
    pub clients_maximum: u64,
    /// Connections accepted since the start.
    pub connections_total: u64,
    /// Connections refused before a successful CONNACK.
    pub connections_refused: u64,
    /// PUBLISH packets received.
    pub messages_received: u64,
    /// PUBLISH packets sent.
    pub messages_sent: u64,
    /// Messages dropped (every reason; see `/metrics` for the breakdown).
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

/// The broker as the API sees it. Tenants are given as ids; every call stays inside the tenant
/// it names. Listings take a cursor (`after`: a previous page's `next`) and a limit (1 to 1000).
pub trait BrokerView: Send + Sync + 'static {
    /// Sessions whose client id starts with `prefix`, by client id.
    fn sessions(
        &self,
        tenant: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ViewPage<SessionRow>;
    /// One session and its subscriptions.
    fn session(&self, tenant: &str, client_id: &str) -> Option<SessionDetail>;
    /// Disconnects the client, keeping its session (v5: DISCONNECT 0x98). Whether one was
    /// connected.
    fn kick(&self, tenant: &str, client_id: &str) -> bool;
    /// Disconnects the client and deletes its session. Whether a session existed.
    fn discard<'a>(&'a self, tenant: &'a str, client_id: &'a str) -> ViewFuture<'a, bool>;
    /// Subscriptions whose filter starts with `filter_prefix`, by (filter, client id).
    fn subscriptions(
        &self,
        tenant: &str,
        filter_prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ViewPage<SubscriptionRow>;
    /// Retained messages matching the topic filter `filter`, by topic (`Err`: the filter is
    /// not valid, with the reason).
    fn retained(
        &self,
        tenant: &str,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ViewPage<RetainedEntry>, String>;
    /// The retained message of a topic (`Err`: the topic is not valid).
    fn retained_message(&self, tenant: &str, topic: &str) -> Result<Option<RetainedEntry>, String>;
    /// Deletes the retained message of a topic, durably (as an empty retained publication).
    /// Whether there was one.
    fn delete_retained<'a>(
        &'a self,
        tenant: &'a str,
        topic: &'a str,
    ) -> ViewFuture<'a, Result<bool, String>>;
    /// The tenant's figures.
    fn stats(&self, tenant: &str) -> BrokerStats;
    /// The hub-wide `$SYS` figures.
    fn sys(&self) -> SysFigures;
}

/// The broker view an [`crate::ApiState`] carries.
pub type BrokerViewRef = Arc<dyn BrokerView>;
