//! Typed errors of the alarms service.

/// What went wrong with an alarms operation.
#[derive(Debug, thiserror::Error)]
pub enum AlarmError {
    /// No such alarm or channel in the tenant.
    #[error("{0} not found")]
    NotFound(String),
    /// The operation does not fit the alarm's state (e.g. clearing a cleared alarm).
    #[error("{0}")]
    Conflict(String),
    /// The input is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A channel's template does not parse.
    #[error("{field}: template error at line {line}: {message}")]
    Template {
        /// Which template (`url`, `body`, `headers.<name>`).
        field: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error("alarms store: {0}")]
    Storage(String),
}

impl From<sqlx::Error> for AlarmError {
    fn from(e: sqlx::Error) -> Self {
        AlarmError::Storage(e.to_string())
    }
}

impl From<serde_json::Error> for AlarmError {
    fn from(e: serde_json::Error) -> Self {
        AlarmError::Storage(format!("a stored record does not decode: {e}"))
    }
}

/// Result of the alarms service.
pub type Result<T, E = AlarmError> = std::result::Result<T, E>;
