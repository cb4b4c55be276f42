//! Device twins and device commands.
//!
//! A twin is a JSON document per device (a default twin and any number of named twins) with a
//! `desired` section written by operators and rules, a `reported` section written by the device,
//! operator-only `tags`, versions, per-key timestamps and acknowledgements, and a computed
//! `delta`. Commands are requests to a device, either direct (the caller waits for the answer)
//! or queued (durable, delivered when the device comes online).
//!
//! Layout: [`document`] (the pure document model), [`query`] (the fleet query language),
//! [`store`] (the embedded SQLite store with its group-committing writer), [`service`] (the twin
//! service), [`commands`] (the command service), [`device_api`] (what devices publish on reserved
//! topics), [`topics`] (those topics), [`link`] (how services reach devices).

pub mod commands;
pub mod device_api;
pub mod document;
mod error;
pub mod link;
pub mod query;
pub mod service;
pub mod store;
pub mod topics;

pub use error::TwinError;
pub use service::{Twins, TwinsConfig};
