//! Typed errors of the engine.

use std::path::PathBuf;

/// What can go wrong in the time-series engine.
#[derive(Debug, thiserror::Error)]
pub enum TsdbError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Persisted bytes did not decode (checksum, truncation, unknown version).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A value's kind differs from its series' kind (a series never changes kind).
    #[error("metric {metric:?} of device {device:?} holds {expected} values, got {got}")]
    KindConflict {
        /// Device.
        device: String,
        /// Metric.
        metric: String,
        /// The series' kind.
        expected: &'static str,
        /// The rejected value's kind.
        got: &'static str,
    },
    /// The engine is shutting down or its writer stopped.
    #[error("the time-series engine is shut down")]
    Closed,
    /// A query was refused (bad range, bucket, limit).
    #[error("{0}")]
    BadQuery(String),
    /// The column codec failed.
    #[error("codec: {0}")]
    Codec(String),
}

impl TsdbError {
    /// Wraps an I/O error with what was done and to which path.
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TsdbError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

impl From<pco::errors::PcoError> for TsdbError {
    fn from(e: pco::errors::PcoError) -> Self {
        TsdbError::Codec(e.to_string())
    }
}
