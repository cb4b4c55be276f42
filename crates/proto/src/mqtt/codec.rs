//! Encoding and decoding.
//!
//! Decoding splits the packet's bytes off the read buffer and parses them in place: payloads,
//! Correlation Data, passwords and Authentication Data are `Bytes` slices of that buffer, strings
//! are validated once and copied once. Encoding is two passes over the same generic writer code,
//! one counting ([`encoded_len`]) and one writing, so the two can never disagree.

mod decode;
mod encode;
mod props;
mod read;
mod write;

use bytes::BytesMut;
use thiserror::Error;

use super::{Packet, ProtocolVersion};

/// Why bytes could not be decoded into a packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The bytes violate the packet format (v5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well-formed but breaks a protocol rule (v5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The packet exceeds the maximum packet size (v5 reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Total packet size (fixed header included).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// CONNECT with a protocol name/level we do not speak (v5 reason 0x84).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name sent.
        name: String,
        /// Protocol level sent.
        level: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code to close the connection with.
    pub fn reason_code(&self) -> u8 {
        use super::reason::*;
        match self {
            DecodeError::Malformed(_) => MALFORMED_PACKET,
            DecodeError::Protocol(_) => PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol { .. } => UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The encoded packet would exceed the 268,435,455-byte protocol maximum.
    #[error("packet too large to encode")]
    TooLarge,
    /// A string or binary field exceeds 65,535 bytes.
    #[error("field {0} longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// The packet cannot be expressed in this protocol version (e.g. AUTH under 3.1.1).
    #[error("{0} cannot be sent under this protocol version")]
    NotInVersion(&'static str),
}

/// The largest Remaining Length a four-byte Variable Byte Integer can express.
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Decodes one packet from the front of `buf`; see the module docs.
///
/// Returns `Ok(None)`, consuming nothing, until a whole packet is buffered. On success exactly
/// the packet's bytes are consumed. After an error the buffer's contents are unspecified: every
/// decode error is fatal to the connection.
///
/// `version` is the connection's negotiated version; CONNECT ignores it and describes itself.
#[inline]
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    decode::decode(buf, version, max_packet_size)
}

/// Appends `packet` encoded for `version` to `buf`.
///
/// Fields the version cannot carry are dropped (v5 properties and reason codes under 3.1.1;
/// SUBACK failure codes become 0x80); CONNECT is encoded for its own `protocol`. v5 uses the
/// short forms (e.g. a 2-byte PUBACK for Success without properties). On error nothing is
/// appended: `FieldTooLong` for a string or binary field over 65,535 bytes, `TooLarge` past the
/// 268,435,455-byte Remaining Length (or for a Subscription Identifier no Variable Byte Integer
/// can hold), `NotInVersion` for AUTH, or a password without a user name, under 3.1.1.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode::encode(packet, version, buf)
}

/// The total encoded size of `packet` (fixed header included) under `version`.
///
/// Exactly the number of bytes [`encode`] appends, computed without allocating; it fails in the
/// same cases `encode` does.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    encode::encoded_len(packet, version)
}
