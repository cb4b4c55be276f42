use std::sync::Arc;

use ferrohub_types::{Message, QoS, TenantId, TopicName, UnixMillis};

/// A session that outlives its connection (MQTT 5 Session Expiry Interval > 0, or a 3.1.1
/// client with Clean Session = 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The tenant the session belongs to.
    pub tenant: TenantId,
    /// Client identifier (unique per tenant).
    pub client_id: Arc<str>,
    /// Session Expiry Interval in seconds (`u32::MAX` = never expires).
    pub expiry_secs: u32,
    /// When the client last disconnected; `None` while connected.
    pub disconnected_at: Option<UnixMillis>,
}

/// A subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The filter exactly as subscribed (may be `$share/{group}/{filter}`).
    pub filter: Arc<str>,
    /// Maximum QoS granted.
    pub qos: QoS,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier.
    pub subscription_id: Option<u32>,
}

/// One recipient of an enqueued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedFor {
    /// The recipient session.
    pub client_id: Arc<str>,
    /// QoS of this delivery (1 or 2; QoS 0 deliveries are never persisted).
    pub qos: QoS,
    /// Retain flag to deliver with (Retain As Published).
    pub retain: bool,
    /// Subscription identifiers to deliver with.
    pub subscription_ids: Vec<u32>,
}

/// A change to durable broker state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Create or replace a session record.
    PutSession(SessionRecord),
    /// Delete a session with its subscriptions, queued messages and inbound QoS 2 state.
    DeleteSession {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
    },
    /// Create or replace a subscription (keyed by its filter string).
    PutSubscription {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// The subscription.
        subscription: SubscriptionRecord,
    },
    /// Remove a subscription.
    DeleteSubscription {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// The filter exactly as subscribed.
        filter: Arc<str>,
    },
    /// A QoS 1/2 message queued for one or more persistent sessions. Stored once, whatever the
    /// number of recipients.
    Enqueue {
        /// Tenant.
        tenant: TenantId,
        /// Broker-assigned id, strictly increasing across restarts (see [`RecoveredState::next_message_id`]).
        message_id: u64,
        /// The message.
        message: Message,
        /// Its recipients.
        recipients: Vec<QueuedFor>,
    },
    /// A QoS 1/2 delivery was sent with this packet identifier (so a redelivery after a restart
    /// reuses it, with DUP set).
    Sent {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// Message id from [`StoreOp::Enqueue`].
        message_id: u64,
        /// Packet identifier used.
        packet_id: u16,
    },
    /// A QoS 2 delivery got its PUBREC: only the PUBREL remains to be (re)sent.
    Released {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// Message id from [`StoreOp::Enqueue`].
        message_id: u64,
    },
    /// A delivery is finished (PUBACK / PUBCOMP received, expired, or dropped by policy) and the
    /// session no longer needs it. The message is forgotten once no recipient needs it.
    Dequeue {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// Message id from [`StoreOp::Enqueue`].
        message_id: u64,
    },
    /// Set the retained message of a topic.
    PutRetained {
        /// Tenant.
        tenant: TenantId,
        /// The retained message (its topic is the key).
        message: Message,
    },
    /// Clear the retained message of a topic.
    DeleteRetained {
        /// Tenant.
        tenant: TenantId,
        /// Topic.
        topic: TopicName,
    },
    /// An inbound QoS 2 PUBLISH was accepted (PUBREC sent); a retransmission must not be routed again.
    InboundQos2 {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// Packet identifier.
        packet_id: u16,
    },
    /// The inbound QoS 2 exchange completed (PUBREL received, PUBCOMP sent).
    InboundQos2Done {
        /// Tenant.
        tenant: TenantId,
        /// Client identifier.
        client_id: Arc<str>,
        /// Packet identifier.
        packet_id: u16,
    },
}

/// A message still owed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredDelivery {
    /// Message id.
    pub message_id: u64,
    /// The message.
    pub message: Message,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag to deliver with.
    pub retain: bool,
    /// Subscription identifiers.
    pub subscription_ids: Vec<u32>,
    /// Packet identifier of an earlier (QoS 2) send, if recorded.
    pub packet_id: Option<u16>,
    /// True when PUBREC was received: resend PUBREL, not the PUBLISH.
    pub released: bool,
}

/// One persistent session as recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    /// The record.
    pub session: SessionRecord,
    /// Its subscriptions.
    pub subscriptions: Vec<SubscriptionRecord>,
    /// Messages owed, in message-id (arrival) order.
    pub pending: Vec<RecoveredDelivery>,
    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
}

/// Everything replayed at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredState {
    /// Persistent sessions.
    pub sessions: Vec<RecoveredSession>,
    /// Retained messages.
    pub retained: Vec<(TenantId, Message)>,
    /// The next message id to assign (greater than any ever persisted).
    pub next_message_id: u64,
    /// Problems found and skipped during recovery (corrupted tail, unreadable snapshot), for the log.
    pub warnings: Vec<String>,
}

/// When the writer calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// After every group commit, before any commit of the group resolves (survives power loss).
    #[default]
    Always,
    /// Never explicitly: data reaches the OS before commits resolve (survives a hub crash or
    /// `kill -9`, not a kernel crash or power loss); the OS flushes in the background.
    Never,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// Rewrite the log as a compact snapshot once it grows past this many bytes.
    pub compact_after_bytes: u64,
    /// Maximum number of op batches waiting for the writer before `submit` waits (backpressure).
    pub queue_capacity: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            fsync: FsyncPolicy::Always,
            compact_after_bytes: 64 * 1024 * 1024,
            queue_capacity: 4096,
        }
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on the data directory.
    #[error("store I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The data directory is held by another hub process.
    #[error("data directory {0} is locked by another process")]
    Locked(String),
    /// The writer thread has stopped (after a fatal I/O error or shutdown).
    #[error("store writer is not running")]
    Closed,
    /// The writer thread stopped after an I/O error (the message says which); nothing submitted
    /// after it is durable. The hub should shut down: recovery at the next start repairs the files.
    #[error("store writer failed: {0}")]
    Failed(String),
    /// A batch too large to be written as one log record.
    #[error("batch of up to {bytes} bytes exceeds the {max}-byte record limit")]
    BatchTooLarge {
        /// Upper bound of the encoded size of the batch.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A store file written by a newer, incompatible version of Ferrohub.
    #[error("{path} has store format version {version}, which this build cannot read")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// Its format version.
        version: u16,
    },
}
