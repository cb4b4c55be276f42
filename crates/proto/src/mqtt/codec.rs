//! Encoding and decoding (to be implemented).
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

/// Decodes one packet from the front of `buf`; see the module docs.
pub fn decode(
    _buf: &mut BytesMut,
    _version: ProtocolVersion,
    _max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    Err(DecodeError::Malformed("codec not implemented yet"))
}

/// Appends `packet` encoded for `version` to `buf`.
pub fn encode(
    _packet: &Packet,
    _version: ProtocolVersion,
    _buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    Err(EncodeError::TooLarge)
}

/// The total encoded size of `packet` (fixed header included) under `version`.
pub fn encoded_len(_packet: &Packet, _version: ProtocolVersion) -> Result<usize, EncodeError> {
    Err(EncodeError::TooLarge)
}
