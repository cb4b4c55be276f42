//! The registry's error type.

/// What can go wrong in the registry. The messages are meant for operators: they say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or violates a rule.
    #[error("{0}")]
    Invalid(String),
    /// The object does not exist (or is outside the caller's scope).
    #[error("{0} not found")]
    NotFound(String),
    /// The object exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// The object changed since it was read; the change was not applied.
    #[error("{0}")]
    Stale(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The database failed.
    #[error("registry database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored record could not be decoded.
    #[error("registry record is corrupt: {0}")]
    Corrupt(String),
    /// A certificate or key operation failed.
    #[error("{0}")]
    Crypto(String),
}

impl From<serde_json::Error> for RegistryError {
    fn from(e: serde_json::Error) -> Self {
        RegistryError::Corrupt(e.to_string())
    }
}

/// Shorthand.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
