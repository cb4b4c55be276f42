//! MQTT broker settings (`[mqtt]` in `ferrohub.toml`).

use serde::{Deserialize, Serialize};

/// Limits and behaviour of the MQTT broker. Every field has a default; see `docs/configuration.md`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet accepted from a client, in bytes (advertised as Maximum Packet Size).
    pub max_packet_size: u32,
    /// Messages queued per session beyond the in-flight window. When full, queued QoS 0 messages
    /// are dropped first; a QoS 1/2 message that cannot be queued is refused (PUBACK/PUBREC
    /// reason 0x97 Quota exceeded in v5; a 3.1.1 publisher is disconnected without an ack so that
    /// it retries) — an acknowledged message is never dropped silently.
    pub max_queued_messages: usize,
    /// Receive Maximum advertised to clients: unacknowledged QoS 1/2 PUBLISHes a client may send.
    pub max_inflight: u16,
    /// Cap on unacknowledged QoS 1/2 deliveries per client (the client's own Receive Maximum applies too).
    pub max_outbound_inflight: u16,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most `/`-separated levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Longest client identifier, in bytes.
    pub max_client_id_length: usize,
    /// `any` (any UTF-8 without control characters) or `strict` (`[0-9A-Za-z_.:-]` only).
    pub client_id_charset: ClientIdCharset,
    /// Seconds a new connection may take to send CONNECT before it is closed.
    pub connect_timeout_secs: u64,
    /// Maximum simultaneous connections across all MQTT listeners.
    pub max_connections: usize,
    /// Highest keep-alive accepted, in seconds; larger requests get Server Keep Alive (v5). 0 = no cap.
    pub max_keep_alive_secs: u16,
    /// Highest Session Expiry Interval granted, in seconds.
    pub max_session_expiry_secs: u32,
    /// Session expiry for 3.1.1 clients connecting with Clean Session = 0, in seconds.
    pub v3_persistent_session_expiry_secs: u32,
    /// Topic Alias Maximum accepted from clients (v5). 0 disables client topic aliases.
    pub topic_alias_maximum: u16,
    /// Queue QoS 0 messages for offline persistent sessions.
    pub queue_qos0_offline: bool,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Interval between `$SYS/broker/...` updates, in seconds (0 disables them).
    pub sys_interval_secs: u64,
}

/// Allowed characters in client identifiers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientIdCharset {
    /// Any UTF-8 except control characters.
    Any,
    /// `[0-9A-Za-z_.:-]` only.
    Strict,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            max_queued_messages: 1000,
            max_inflight: 1024,
            max_outbound_inflight: 1024,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_client_id_length: 256,
            client_id_charset: ClientIdCharset::Any,
            connect_timeout_secs: 10,
            max_connections: 1_000_000,
            max_keep_alive_secs: 0,
            max_session_expiry_secs: 7 * 24 * 3600,
            v3_persistent_session_expiry_secs: 7 * 24 * 3600,
            topic_alias_maximum: 64,
            queue_qos0_offline: false,
            retain_available: true,
            sys_interval_secs: 10,
        }
    }
}

impl MqttConfig {
    pub(crate) fn topic_limits(&self) -> ferrohub_types::TopicLimits {
        ferrohub_types::TopicLimits {
            max_len: self.max_topic_length,
            max_levels: self.max_topic_levels,
        }
    }

    pub(crate) fn client_id_ok(&self, id: &str) -> bool {
        id.len() <= self.max_client_id_length
            && match self.client_id_charset {
                ClientIdCharset::Any => !id.chars().any(char::is_control),
                ClientIdCharset::Strict => id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)),
            }
    }
}
