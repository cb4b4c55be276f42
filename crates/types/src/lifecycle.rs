//! Connection lifecycle vocabulary shared by the adapters (which observe connections end) and the
//! services that record or react to it (connectivity, twins, commands).

use serde::{Deserialize, Serialize};

/// Why a device's connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed without a DISCONNECT (network loss, crash, power cut).
    ConnectionLost,
    /// Nothing arrived within 1.5 × the keep-alive interval.
    KeepAliveTimeout,
    /// Another connection with the same client id took the session over.
    TakenOver,
    /// An operator disconnected it.
    Kicked,
    /// The device was disabled, decommissioned or had its credential revoked.
    NotAuthorized,
    /// The hub shut down.
    ServerShutdown,
    /// The client broke the protocol (malformed packet, limit exceeded, …).
    ProtocolError,
}

impl DisconnectReason {
    /// Every reason, in a fixed order (see [`DisconnectReason::code`]).
    pub const ALL: [DisconnectReason; 8] = [
        DisconnectReason::ClientDisconnect,
        DisconnectReason::ConnectionLost,
        DisconnectReason::KeepAliveTimeout,
        DisconnectReason::TakenOver,
        DisconnectReason::Kicked,
        DisconnectReason::NotAuthorized,
        DisconnectReason::ServerShutdown,
        DisconnectReason::ProtocolError,
    ];

    /// A small non-zero number for the reason (its place in [`DisconnectReason::ALL`] plus one),
    /// for storing it in an atomic where 0 means "none yet".
    pub fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .map_or(0, |i| i as u8 + 1)
    }

    /// The reason of a [`DisconnectReason::code`]; `None` for 0 or an unknown code.
    pub fn from_code(code: u8) -> Option<DisconnectReason> {
        Self::ALL.get(usize::from(code.checked_sub(1)?)).copied()
    }

    /// The stable name used in lifecycle events, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientDisconnect => "client_disconnect",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::KeepAliveTimeout => "keep_alive_timeout",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::NotAuthorized => "not_authorized",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::ProtocolError => "protocol_error",
        }
    }

    /// Parses [`DisconnectReason::as_str`].
    pub fn parse(s: &str) -> Option<DisconnectReason> {
        Self::ALL.iter().find(|r| r.as_str() == s).copied()
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for r in DisconnectReason::ALL {
            assert_eq!(DisconnectReason::parse(r.as_str()), Some(r));
            assert_eq!(DisconnectReason::from_code(r.code()), Some(r));
            assert_ne!(r.code(), 0);
            let json = serde_json::to_string(&r).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(DisconnectReason::from_code(0), None);
        assert_eq!(DisconnectReason::from_code(9), None);
        assert_eq!(DisconnectReason::parse("nope"), None);
    }
}
