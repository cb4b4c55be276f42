//! MQTT 3.1.1 (protocol level 4) and 5.0 (protocol level 5).
//!
//! [`decode`] takes whatever bytes have arrived and returns a complete [`Packet`] (consuming its
//! bytes) or `Ok(None)` when more are needed; it refuses a packet larger than the limit as soon as
//! its fixed header is read, before the body arrives. [`encode`] appends a packet to a buffer.
//! Both take the connection's [`ProtocolVersion`], because v5 packets carry properties and reason
//! codes that v3.1.1 packets do not; CONNECT is self-describing and decodes under either.

mod codec;
mod packet;
pub mod reason;

pub use codec::{DecodeError, EncodeError, decode, encode, encoded_len};
pub use packet::*;
