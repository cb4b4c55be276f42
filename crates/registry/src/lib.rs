//! Identity and access: tenants, the device registry, credentials, PKI, authorization policies,
//! quotas and the audit log.
//!
//! Adapters ask this crate two questions — *who is this?* (authentication on CONNECT) and *may
//! they do that?* (authorization on CONNECT, PUBLISH, SUBSCRIBE and delivery) — and the operator
//! API manages what the answers are made of. Everything is keyed by tenant.

pub mod error;
pub mod jwt;
pub mod model;
pub mod password;
pub mod pki;
pub mod policy;
pub mod provisioning;
pub mod service;
pub mod store;
pub mod throttle;

pub use error::RegistryError;
pub use service::{
    Actor, Kicker, Purge, Purger, Registry, RegistryConfig, RegistryMetrics, split_username,
};
pub use store::{RegistryStore, SqliteOptions, SqliteStore};
