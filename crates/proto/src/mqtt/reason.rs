//! MQTT 5 reason codes (and the 3.1.1 CONNACK return codes they map to).

/// Success / Normal disconnection / Granted QoS 0.
pub const SUCCESS: u8 = 0x00;
/// Granted QoS 1.
pub const GRANTED_QOS_1: u8 = 0x01;
/// Granted QoS 2.
pub const GRANTED_QOS_2: u8 = 0x02;
/// Disconnect with Will Message.
pub const DISCONNECT_WITH_WILL: u8 = 0x04;
/// No matching subscribers.
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
/// No subscription existed.
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
/// Continue authentication.
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
/// Re-authenticate.
pub const REAUTHENTICATE: u8 = 0x19;
/// Unspecified error.
pub const UNSPECIFIED_ERROR: u8 = 0x80;
/// Malformed Packet.
pub const MALFORMED_PACKET: u8 = 0x81;
/// Protocol Error.
pub const PROTOCOL_ERROR: u8 = 0x82;
/// Implementation specific error.
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
/// Unsupported Protocol Version.
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
/// Client Identifier not valid.
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
/// Bad User Name or Password.
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
/// Not authorized.
pub const NOT_AUTHORIZED: u8 = 0x87;
/// Server unavailable.
pub const SERVER_UNAVAILABLE: u8 = 0x88;
/// Server busy.
pub const SERVER_BUSY: u8 = 0x89;
/// Banned.
pub const BANNED: u8 = 0x8A;
/// Server shutting down.
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
/// Bad authentication method.
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
/// Keep Alive timeout.
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
/// Session taken over.
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
/// Topic Filter invalid.
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
/// Topic Name invalid.
pub const TOPIC_NAME_INVALID: u8 = 0x90;
/// Packet Identifier in use.
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
/// Packet Identifier not found.
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
/// Receive Maximum exceeded.
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
/// Topic Alias invalid.
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
/// Packet too large.
pub const PACKET_TOO_LARGE: u8 = 0x95;
/// Message rate too high.
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
/// Quota exceeded.
pub const QUOTA_EXCEEDED: u8 = 0x97;
/// Administrative action.
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
/// Payload format invalid.
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// Retain not supported.
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
/// QoS not supported.
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
/// Use another server.
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
/// Server moved.
pub const SERVER_MOVED: u8 = 0x9D;
/// Shared Subscriptions not supported.
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
/// Connection rate exceeded.
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
/// Maximum connect time.
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
/// Subscription Identifiers not supported.
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
/// Wildcard Subscriptions not supported.
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// 3.1.1 CONNACK: connection accepted.
pub const V3_ACCEPTED: u8 = 0;
/// 3.1.1 CONNACK: unacceptable protocol version.
pub const V3_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 1;
/// 3.1.1 CONNACK: identifier rejected.
pub const V3_IDENTIFIER_REJECTED: u8 = 2;
/// 3.1.1 CONNACK: server unavailable.
pub const V3_SERVER_UNAVAILABLE: u8 = 3;
/// 3.1.1 CONNACK: bad user name or password.
pub const V3_BAD_USER_NAME_OR_PASSWORD: u8 = 4;
/// 3.1.1 CONNACK: not authorized.
pub const V3_NOT_AUTHORIZED: u8 = 5;

/// The 3.1.1 CONNACK return code closest to a v5 CONNACK reason code.
pub fn connack_v3(v5_code: u8) -> u8 {
    match v5_code {
        SUCCESS => V3_ACCEPTED,
        UNSUPPORTED_PROTOCOL_VERSION => V3_UNACCEPTABLE_PROTOCOL_VERSION,
        CLIENT_IDENTIFIER_NOT_VALID => V3_IDENTIFIER_REJECTED,
        BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => V3_BAD_USER_NAME_OR_PASSWORD,
        NOT_AUTHORIZED | BANNED => V3_NOT_AUTHORIZED,
        _ => V3_SERVER_UNAVAILABLE,
    }
}

/// Human-readable name of a reason code, for logs and reason strings.
pub fn name(code: u8) -> &'static str {
    match code {
        SUCCESS => "Success",
        GRANTED_QOS_1 => "Granted QoS 1",
        GRANTED_QOS_2 => "Granted QoS 2",
        DISCONNECT_WITH_WILL => "Disconnect with Will Message",
        NO_MATCHING_SUBSCRIBERS => "No matching subscribers",
        NO_SUBSCRIPTION_EXISTED => "No subscription existed",
        CONTINUE_AUTHENTICATION => "Continue authentication",
        REAUTHENTICATE => "Re-authenticate",
        UNSPECIFIED_ERROR => "Unspecified error",
        MALFORMED_PACKET => "Malformed Packet",
        PROTOCOL_ERROR => "Protocol Error",
        IMPLEMENTATION_SPECIFIC_ERROR => "Implementation specific error",
        UNSUPPORTED_PROTOCOL_VERSION => "Unsupported Protocol Version",
        CLIENT_IDENTIFIER_NOT_VALID => "Client Identifier not valid",
        BAD_USER_NAME_OR_PASSWORD => "Bad User Name or Password",
        NOT_AUTHORIZED => "Not authorized",
        SERVER_UNAVAILABLE => "Server unavailable",
        SERVER_BUSY => "Server busy",
        BANNED => "Banned",
        SERVER_SHUTTING_DOWN => "Server shutting down",
        BAD_AUTHENTICATION_METHOD => "Bad authentication method",
        KEEP_ALIVE_TIMEOUT => "Keep Alive timeout",
        SESSION_TAKEN_OVER => "Session taken over",
        TOPIC_FILTER_INVALID => "Topic Filter invalid",
        TOPIC_NAME_INVALID => "Topic Name invalid",
        PACKET_IDENTIFIER_IN_USE => "Packet Identifier in use",
        PACKET_IDENTIFIER_NOT_FOUND => "Packet Identifier not found",
        RECEIVE_MAXIMUM_EXCEEDED => "Receive Maximum exceeded",
        TOPIC_ALIAS_INVALID => "Topic Alias invalid",
        PACKET_TOO_LARGE => "Packet too large",
        MESSAGE_RATE_TOO_HIGH => "Message rate too high",
        QUOTA_EXCEEDED => "Quota exceeded",
        ADMINISTRATIVE_ACTION => "Administrative action",
        PAYLOAD_FORMAT_INVALID => "Payload format invalid",
        RETAIN_NOT_SUPPORTED => "Retain not supported",
        QOS_NOT_SUPPORTED => "QoS not supported",
        USE_ANOTHER_SERVER => "Use another server",
        SERVER_MOVED => "Server moved",
        SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => "Shared Subscriptions not supported",
        CONNECTION_RATE_EXCEEDED => "Connection rate exceeded",
        MAXIMUM_CONNECT_TIME => "Maximum connect time",
        SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED => "Subscription Identifiers not supported",
        WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED => "Wildcard Subscriptions not supported",
        _ => "Unknown reason code",
    }
}
