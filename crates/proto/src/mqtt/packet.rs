//! The MQTT control packets as plain data.
//!
//! One struct per packet, with v5 properties in a per-packet properties struct (left at its
//! default under v3.1.1). Strings that travel on to subscribers (topics, user properties) are
//! `Arc<str>` so that fan-out never copies them; payloads are `Bytes` sliced from the read buffer.

use std::sync::Arc;

use bytes::Bytes;
use ferrohub_types::QoS;

/// A user property (MQTT 5): name and value.
pub type UserProperties = Vec<(Arc<str>, Arc<str>)>;

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3): decoded like 3.1.1.
    V31,
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl ProtocolVersion {
    /// True for MQTT 5.0.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client → server).
    Connect(Box<Connect>),
    /// CONNACK (server → client).
    ConnAck(ConnAck),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK: QoS 1 acknowledgement.
    PubAck(PubResponse),
    /// PUBREC: QoS 2, step 1.
    PubRec(PubResponse),
    /// PUBREL: QoS 2, step 2.
    PubRel(PubResponse),
    /// PUBCOMP: QoS 2, step 3.
    PubComp(PubResponse),
    /// SUBSCRIBE (client → server).
    Subscribe(Subscribe),
    /// SUBACK (server → client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client → server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server → client).
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (both directions in v5).
    Disconnect(Disconnect),
    /// AUTH (v5 only): enhanced authentication exchange.
    Auth(Auth),
}

impl Packet {
    /// The packet's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version requested (from the protocol name and level).
    pub protocol: ProtocolVersion,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    pub clean_start: bool,
    /// Keep Alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty (the server then assigns one, or refuses).
    pub client_id: String,
    /// Will message, if the Will Flag is set.
    pub will: Option<Will>,
    /// User Name, if its flag is set.
    pub username: Option<String>,
    /// Password, if its flag is set (binary data).
    pub password: Option<Bytes>,
    /// v5 CONNECT properties.
    pub properties: ConnectProperties,
}

/// CONNECT properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    /// Session Expiry Interval (seconds); absent means 0.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum: how many QoS 1/2 PUBLISHes the client accepts concurrently.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size the client accepts.
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum the client accepts from the server.
    pub topic_alias_maximum: Option<u16>,
    /// Request Response Information.
    pub request_response_information: Option<u8>,
    /// Request Problem Information.
    pub request_problem_information: Option<u8>,
    /// User properties.
    pub user_properties: UserProperties,
    /// Authentication Method (enhanced authentication).
    pub authentication_method: Option<String>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
}

/// A Will message carried in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic (validated by the broker, not the codec).
    pub topic: Arc<str>,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// v5 Will properties.
    pub properties: WillProperties,
}

/// Will properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    /// Will Delay Interval (seconds).
    pub delay_interval: Option<u32>,
    /// Payload Format Indicator (0 bytes, 1 UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (seconds).
    pub message_expiry_interval: Option<u32>,
    /// Content Type.
    pub content_type: Option<Arc<str>>,
    /// Response Topic.
    pub response_topic: Option<Arc<str>>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User properties.
    pub user_properties: UserProperties,
}

/// CONNACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// Reason code (v5) or return code (3.1.1: 0..=5). See [`crate::mqtt::reason`].
    pub code: u8,
    /// v5 CONNACK properties.
    pub properties: ConnAckProperties,
}

/// CONNACK properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    /// Session Expiry Interval the server uses, when it differs from the request.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum of the server.
    pub receive_maximum: Option<u16>,
    /// Maximum QoS the server supports (0 or 1; absent means 2).
    pub maximum_qos: Option<u8>,
    /// Retain Available (absent means yes).
    pub retain_available: Option<u8>,
    /// Maximum Packet Size the server accepts.
    pub maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier, when the client sent an empty one.
    pub assigned_client_identifier: Option<String>,
    /// Topic Alias Maximum the server accepts.
    pub topic_alias_maximum: Option<u16>,
    /// Reason String.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: UserProperties,
    /// Wildcard Subscription Available.
    pub wildcard_subscription_available: Option<u8>,
    /// Subscription Identifiers Available.
    pub subscription_identifiers_available: Option<u8>,
    /// Shared Subscription Available.
    pub shared_subscription_available: Option<u8>,
    /// Server Keep Alive, overriding the client's.
    pub server_keep_alive: Option<u16>,
    /// Response Information.
    pub response_information: Option<String>,
    /// Server Reference (redirection).
    pub server_reference: Option<String>,
    /// Authentication Method.
    pub authentication_method: Option<String>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: this is a redelivery.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; may be empty in v5 when a Topic Alias is given.
    pub topic: Arc<str>,
    /// Packet identifier; 0 for QoS 0.
    pub packet_id: u16,
    /// v5 PUBLISH properties.
    pub properties: PublishProperties,
    /// Application payload.
    pub payload: Bytes,
}

/// PUBLISH properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// Payload Format Indicator (0 bytes, 1 UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (seconds).
    pub message_expiry_interval: Option<u32>,
    /// Topic Alias.
    pub topic_alias: Option<u16>,
    /// Response Topic.
    pub response_topic: Option<Arc<str>>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User properties.
    pub user_properties: UserProperties,
    /// Subscription Identifiers (server → client only; may repeat).
    pub subscription_identifiers: Vec<u32>,
    /// Content Type.
    pub content_type: Option<Arc<str>>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share this shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PubResponse {
    /// Packet identifier being acknowledged.
    pub packet_id: u16,
    /// Reason code (v5; always 0 under 3.1.1).
    pub code: u8,
    /// v5 properties.
    pub properties: AckProperties,
}

/// The properties every acknowledgement may carry (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    /// Reason String.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: UserProperties,
}

/// Subscription options of one SUBSCRIBE entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (v5): do not deliver this connection's own publications.
    pub no_local: bool,
    /// Retain As Published (v5): keep the publisher's retain flag.
    pub retain_as_published: bool,
    /// Retain Handling (v5): 0 send retained on subscribe, 1 only if new, 2 never.
    pub retain_handling: u8,
}

/// One entry of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// The filter as sent (may be `$share/...`).
    pub filter: String,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// Subscription Identifier (v5).
    pub subscription_identifier: Option<u32>,
    /// User properties (v5).
    pub user_properties: UserProperties,
    /// The requested subscriptions (at least one).
    pub filters: Vec<SubscribeFilter>,
}

/// SUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier.
    pub packet_id: u16,
    /// One code per requested filter: granted QoS (0..=2) or a failure code (0x80 and, in v5, others).
    pub codes: Vec<u8>,
    /// v5 properties.
    pub properties: AckProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// User properties (v5).
    pub user_properties: UserProperties,
    /// Filters to remove (at least one).
    pub filters: Vec<String>,
}

/// UNSUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier.
    pub packet_id: u16,
    /// One reason code per filter (v5 only; empty under 3.1.1).
    pub codes: Vec<u8>,
    /// v5 properties.
    pub properties: AckProperties,
}

/// DISCONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason code (v5; 0 is a normal disconnection).
    pub code: u8,
    /// v5 properties.
    pub properties: DisconnectProperties,
}

/// DISCONNECT properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    /// Session Expiry Interval (client → server only).
    pub session_expiry_interval: Option<u32>,
    /// Reason String.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: UserProperties,
    /// Server Reference (server → client).
    pub server_reference: Option<String>,
}

/// AUTH (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// Reason code: 0x00 success, 0x18 continue, 0x19 re-authenticate.
    pub code: u8,
    /// v5 properties.
    pub properties: AuthProperties,
}

/// AUTH properties (v5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    /// Authentication Method.
    pub authentication_method: Option<String>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
    /// Reason String.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: UserProperties,
}
