//! The operator HTTP API against a real hub, over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

mod audit;
mod auth;
mod connectivity;
mod credentials;
mod devices;
mod import;
mod isolation;
mod registry_regressions;
mod telemetry;
