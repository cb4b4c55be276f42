//! Telemetry ingest: payload decoders, InfluxDB line protocol, and the service that feeds the
//! time-series engine (`ferrohub-tsdb`).
//!
//! [`decode`] turns a device's MQTT payload (JSON, CBOR or MessagePack) into
//! [`Sample`](ferrohub_types::telemetry::Sample)s; [`lineproto`] parses the body of an InfluxDB
//! v2 write request and maps its points onto Ferrohub series; [`service`] is the
//! [`Telemetry`](service::Telemetry) service: MQTT ingest on the publisher's path (acknowledged
//! once durable), HTTP writes and per-tenant settings; [`export`] runs export jobs (Parquet, CSV;
//! a local folder or S3) with progress.

pub mod decode;
pub mod export;
pub mod lineproto;
pub mod service;
