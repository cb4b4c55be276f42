//! Identity and access: tenants, the device registry, credentials, PKI, authorization policies,
//! quotas and the audit log.
//!
//! Adapters ask this crate two questions — *who is this?* (authentication on CONNECT) and *may
//! they do that?* (authorization on CONNECT, PUBLISH, SUBSCRIBE and delivery) — and the operator
//! API manages what the answers are made of. Everything is keyed by tenant.

pub mod jwt;
pub mod password;
pub mod pki;
pub mod policy;
