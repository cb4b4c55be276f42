//! Load generation for Ferrohub.
//!
//! Today this crate is the MQTT benchmark harness behind `ferrohub bench` ([`bench`](mod@bench)): raw MQTT
//! 3.1.1/5.0 over tokio TCP, using `ferrohub-proto` as the client-side codec, so that it can drive
//! any broker (Ferrohub, Mosquitto, rumqttd, ...) hard without becoming the bottleneck itself. Later
//! it will also host the device simulator (fleets of simulated devices with realistic behaviour).

pub mod bench;
