//! Device-facing protocol servers.
//!
//! Adapters turn a protocol's connections into router traffic: they authenticate clients, keep
//! per-connection and per-session state (keep-alive, packet identifiers, in-flight windows,
//! queued messages), publish into the router and deliver what it routes back. Every server takes an
//! already-bound listener and a shutdown signal; only the binary binds ports and reads config.
//!
//! - [`mqtt`]: the MQTT 3.1.1/5.0 broker over TCP, TLS and WebSocket.

pub mod mqtt;
pub mod shutdown;
