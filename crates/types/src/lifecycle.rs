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
        Some(match s {
            "client_disconnect" => DisconnectReason::ClientDisconnect,
            "connection_lost" => DisconnectReason::ConnectionLost,
            "keep_alive_timeout" => DisconnectReason::KeepAliveTimeout,
            "taken_over" => DisconnectReason::TakenOver,
            "kicked" => DisconnectReason::Kicked,
            "not_authorized" => DisconnectReason::NotAuthorized,
            "server_shutdown" => DisconnectReason::ServerShutdown,
            "protocol_error" => DisconnectReason::ProtocolError,
            _ => return None,
        })
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
    fn names_round_trip() {
        for r in [
            DisconnectReason::ClientDisconnect,
            DisconnectReason::ConnectionLost,
            DisconnectReason::KeepAliveTimeout,
            DisconnectReason::TakenOver,
            DisconnectReason::Kicked,
            DisconnectReason::NotAuthorized,
            DisconnectReason::ServerShutdown,
            DisconnectReason::ProtocolError,
        ] {
            assert_eq!(DisconnectReason::parse(r.as_str()), Some(r));
            let json = serde_json::to_string(&r).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(DisconnectReason::parse("nope"), None);
    }
}
