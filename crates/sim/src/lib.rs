//! Load generation for Ferrohub.
//!
//! * [`sim`](mod@sim): the device simulator behind `ferrohub sim`: fleets of virtual devices
//!   with realistic telemetry from profiles written as TOML data, against any MQTT broker;
//! * [`bench`](mod@bench): the MQTT benchmark harness behind `ferrohub bench`.
//!
//! Both speak raw MQTT 3.1.1/5.0 over tokio TCP, using `ferrohub-proto` as the client-side codec
//! (`bench::wire`), so that they can drive any broker (Ferrohub, Mosquitto, rumqttd, ...) hard
//! without becoming the bottleneck themselves.

pub mod bench;
pub mod sim;
