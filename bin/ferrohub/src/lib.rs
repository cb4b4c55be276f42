//! The Ferrohub binary's library half: configuration loading and the wiring that turns a
//! [`config::HubConfig`] into running servers ([`hub::Hub`]). `main.rs` adds the command line,
//! logging and signals; tests start a [`hub::Hub`] in-process on port 0.

pub mod broker_view;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod hub;
pub mod rules_link;
