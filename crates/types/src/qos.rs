use serde::{Deserialize, Serialize};

/// MQTT quality of service: how hard the hub tries to deliver a message.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum QoS {
    /// At most once: fire and forget.
    #[default]
    AtMostOnce = 0,
    /// At least once: acknowledged with PUBACK, may be duplicated.
    AtLeastOnce = 1,
    /// Exactly once: the PUBREC/PUBREL/PUBCOMP handshake.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value 0..=2, or `None` for anything else (a protocol error).
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}
