//! Device twins and device commands.
//!
//! A twin is a JSON document per device (a default twin and any number of named twins) with a
//! `desired` section written by operators and rules, a `reported` section written by the device,
//! operator-only `tags`, versions, per-key timestamps and acknowledgements, and a computed
//! `delta`. Commands are requests to a device, either direct (the caller waits for the answer)
//! or queued (durable, delivered when the device comes online).

pub mod document;
pub mod query;
