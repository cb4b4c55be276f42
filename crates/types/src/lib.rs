//! Ferrohub's shared vocabulary.
//!
//! Everything here is plain data with validation: tenants, topic names, topic filters (and their
//! matching rules), quality of service and the [`Message`] that flows through the router. This crate
//! does no I/O and knows nothing of tokio, sockets or storage; every other crate builds on it.

pub mod auth;
pub mod id;
pub mod lifecycle;
mod message;
mod qos;
pub mod telemetry;
mod tenant;
mod topic;

pub use message::{Message, MessageProperties, UserProperty};
pub use qos::QoS;
pub use tenant::TenantId;
pub use topic::{
    SharedFilter, TopicError, TopicFilter, TopicLimits, TopicName, filter_matches, parse_shared,
};

/// Milliseconds since the Unix epoch, the one timestamp unit used across Ferrohub.
pub type UnixMillis = u64;
