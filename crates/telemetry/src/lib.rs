//! Telemetry ingest: payload decoders, InfluxDB line protocol, and (later) the service that feeds
//! the time-series engine.
//!
//! [`decode`] turns a device's MQTT payload (JSON, CBOR or MessagePack) into
//! [`Sample`](ferrohub_types::telemetry::Sample)s; [`lineproto`] parses the body of an InfluxDB
//! v2 write request and maps its points onto Ferrohub series.

pub mod decode;
pub mod lineproto;
