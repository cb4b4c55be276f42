//! Telemetry vocabulary: what a device's measurement is once decoded.
//!
//! Payload decoders (JSON, CBOR, MessagePack, InfluxDB line protocol) turn bytes into [`Sample`]s;
//! the ingest service gives each a device and a timestamp, making a [`Point`]; the time-series
//! engine stores points per series, a series being (tenant, device, metric).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest metric name accepted, in bytes (longer names are refused by the decoders).
pub const MAX_METRIC_LEN: usize = 256;

/// The value of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A boolean (stored as such; aggregated as 0/1).
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float (never NaN or infinite: decoders refuse those).
    Float(f64),
    /// A string (not aggregated; only counted).
    Str(String),
}

impl Value {
    /// The kind of the value.
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Bool(_) => ValueKind::Bool,
            Value::Int(_) | Value::Float(_) => ValueKind::Numeric,
            Value::Str(_) => ValueKind::Str,
        }
    }

    /// The value as a float, for aggregation (`true` is 1, `false` 0); `None` for strings.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Str(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// What a series holds. Integers and floats share one kind (a series may mix them; it is stored
/// as integers while every value is one); a series never changes kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// Integers and floats.
    Numeric,
    /// Booleans.
    Bool,
    /// Strings.
    Str,
}

impl ValueKind {
    /// The name used in APIs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueKind::Numeric => "numeric",
            ValueKind::Bool => "bool",
            ValueKind::Str => "string",
        }
    }
}

/// One decoded measurement of a device: a metric, an optional device-supplied timestamp and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (e.g. `temperature`, `env.humidity`).
    pub metric: String,
    /// Timestamp the device gave, in milliseconds since the Unix epoch; `None` means "now".
    pub ts_ms: Option<i64>,
    /// The value.
    pub value: Value,
}

/// A sample that belongs to a device and has its final timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The device (registry id, or the MQTT client id for anonymous clients).
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
}
