//! Export of telemetry to open formats (Parquet, CSV) in a local folder or any S3-compatible
//! object store.
//!
//! A producer (the time-series engine's query side) fills a [`RowBatch`] with rows of one tenant,
//! hands it to [`Exporter::write`], clears it and fills it again; [`Exporter::finish`] completes
//! the files and returns an [`ExportSummary`]. Memory stays bounded by about one Parquet row group
//! whatever the size of the export; [`Exporter::progress`] reports the rows written so far.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferrohub_export::ExportError> {
//! use ferrohub_export::{Destination, ExportFormat, ExportOptions, Exporter, RowBatch};
//! use ferrohub_types::telemetry::Value;
//!
//! let dest: Destination = "s3://telemetry/acme/2026-05".parse()?; // credentials from AWS_* variables
//! let mut export =
//!     Exporter::create(dest, ExportFormat::Parquet, "temperatures", ExportOptions::new("acme")).await?;
//! let mut batch = RowBatch::new();
//! batch.push("sensor-1", "temp", 1_767_225_600_000, &Value::Float(21.5));
//! export.write(&batch).await?;
//! let summary = export.finish().await?;
//! println!("{} rows in {:?}", summary.rows, summary.files);
//! # Ok(()) }
//! ```
//!
//! # Files
//!
//! `{stem}.{ext}` first, then `{stem}-00001.{ext}`, `{stem}-00002.{ext}`… every
//! [`ExportOptions::max_rows_per_file`] rows. Existing files of the same names are replaced.
//!
//! # Parquet schema
//!
//! [`PARQUET_SCHEMA`]: the tenant, device and metric as dictionary-encoded UTF-8 strings, the
//! timestamp as INT64 with logical type TIMESTAMP(MILLIS, isAdjustedToUTC=true), and the value in
//! exactly one of four optional columns, by its type (the others are null). Compression is
//! SNAPPY (pure Rust, cheap to build); the crate's `zstd` feature makes it ZSTD.
//!
//! # CSV
//!
//! Header `tenant,device,metric,ts,value,type`; `ts` in RFC 3339 with milliseconds, UTC
//! (`2026-01-01T00:00:00.000Z`); `type` is `float`, `int`, `bool` or `string`; floats keep a
//! decimal point or an exponent (`21.0`, `1e-7`). Fields are quoted when they need it (RFC 4180).
//! Timestamps must lie in 1970..=9999, the range RFC 3339 and humantime cover.

mod batch;
mod destination;
mod encode;
mod error;
mod exporter;
mod sink;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use batch::{ExportRow, RowBatch, ValueRef};
pub use destination::{Destination, S3Destination, S3Options};
pub use error::ExportError;
pub use exporter::{ExportOptions, ExportSummary, Exporter, Progress, check_stem};

/// The Parquet schema of exported files, in the Parquet message-type syntax.
///
/// | column | type | |
/// |---|---|---|
/// | `tenant` | BYTE_ARRAY, STRING | required, dictionary |
/// | `device` | BYTE_ARRAY, STRING | required, dictionary |
/// | `metric` | BYTE_ARRAY, STRING | required, dictionary |
/// | `ts` | INT64, TIMESTAMP(MILLIS, isAdjustedToUTC=true) | required, DELTA_BINARY_PACKED |
/// | `value_float` | DOUBLE | optional: set for floats |
/// | `value_int` | INT64 | optional: set for integers, DELTA_BINARY_PACKED |
/// | `value_bool` | BOOLEAN | optional: set for booleans |
/// | `value_str` | BYTE_ARRAY, STRING | optional: set for strings, dictionary |
///
/// The file's key-value metadata has `ferrohub.schema = telemetry/1`.
pub const PARQUET_SCHEMA: &str = "message ferrohub_telemetry {
  required binary tenant (STRING);
  required binary device (STRING);
  required binary metric (STRING);
  required int64 ts (TIMESTAMP(MILLIS,true));
  optional double value_float;
  optional int64 value_int;
  optional boolean value_bool;
  optional binary value_str (STRING);
}";

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Apache Parquet (see [`PARQUET_SCHEMA`]).
    Parquet,
    /// Comma-separated values with a header row.
    Csv,
}

impl ExportFormat {
    /// The name: `parquet` or `csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Parquet => "parquet",
            ExportFormat::Csv => "csv",
        }
    }

    /// The file name extension (without the dot).
    pub fn extension(self) -> &'static str {
        self.as_str()
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportFormat {
    type Err = ExportError;

    /// `parquet` or `csv`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "parquet" => Ok(ExportFormat::Parquet),
            "csv" => Ok(ExportFormat::Csv),
            _ => Err(ExportError::UnknownFormat(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names() {
        for f in [ExportFormat::Parquet, ExportFormat::Csv] {
            assert_eq!(f.to_string().parse::<ExportFormat>().ok(), Some(f));
            assert_eq!(
                serde_json::to_string(&f).ok(),
                Some(format!("\"{}\"", f.as_str()))
            );
        }
        assert_eq!("CSV".parse::<ExportFormat>().ok(), Some(ExportFormat::Csv));
        let err = "xlsx".parse::<ExportFormat>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown export format `xlsx`: use `parquet` or `csv`")
        );
    }
}
