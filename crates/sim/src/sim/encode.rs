//! Payloads: samples as JSON, CBOR or MessagePack, in the shape the hub's telemetry ingest reads.
//!
//! One sample is an object with its timestamp first: `{"ts": 1767225600000, "temperature": 21.37,
//! "humidity": 48.2}`; a batch (a profile's `batch` above 1) is an array of such objects. CBOR and
//! MessagePack carry the same maps (string keys, integer `ts`).

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use thiserror::Error;

use super::generate::{Sample, Value};
use super::profile::{Format, Profile};

/// A payload could not be encoded (never expected: every value is a plain scalar).
#[derive(Debug, Error)]
#[error("encoding a {format} payload: {message}")]
pub struct EncodeError {
    format: &'static str,
    message: String,
}

struct One<'a> {
    profile: &'a Profile,
    sample: &'a Sample,
}

impl Serialize for One<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.sample.values.len() + 1))?;
        map.serialize_entry("ts", &self.sample.ts_ms)?;
        for (m, v) in self.profile.metrics.iter().zip(&self.sample.values) {
            map.serialize_entry(&*m.name, v)?;
        }
        map.end()
    }
}

struct Batch<'a> {
    profile: &'a Profile,
    samples: &'a [Sample],
}

impl Serialize for Batch<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.samples.len()))?;
        for sample in self.samples {
            seq.serialize_element(&One {
                profile: self.profile,
                sample,
            })?;
        }
        seq.end()
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Float(v) => s.serialize_f64(*v),
            Value::Int(v) => s.serialize_i64(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
        }
    }
}

/// Appends the payload of `samples` (one object if there is one sample, else an array) to `out`.
pub fn encode(
    format: Format,
    profile: &Profile,
    samples: &[Sample],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let fail = |message: String| EncodeError {
        format: format.name(),
        message,
    };
    match (samples, format) {
        ([one], Format::Json) => serde_json::to_writer(
            &mut *out,
            &One {
                profile,
                sample: one,
            },
        )
        .map_err(|e| fail(e.to_string())),
        ([one], Format::Cbor) => ciborium::into_writer(
            &One {
                profile,
                sample: one,
            },
            &mut *out,
        )
        .map_err(|e| fail(e.to_string())),
        ([one], Format::Msgpack) => rmp_serde::encode::write(
            &mut *out,
            &One {
                profile,
                sample: one,
            },
        )
        .map_err(|e| fail(e.to_string())),
        (many, Format::Json) => serde_json::to_writer(
            &mut *out,
            &Batch {
                profile,
                samples: many,
            },
        )
        .map_err(|e| fail(e.to_string())),
        (many, Format::Cbor) => ciborium::into_writer(
            &Batch {
                profile,
                samples: many,
            },
            &mut *out,
        )
        .map_err(|e| fail(e.to_string())),
        (many, Format::Msgpack) => rmp_serde::encode::write(
            &mut *out,
            &Batch {
                profile,
                samples: many,
            },
        )
        .map_err(|e| fail(e.to_string())),
    }
}
