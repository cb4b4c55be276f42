//! Typed errors of the rules service.

use ferrohub_rules::RuleError;

/// What went wrong with a rules operation.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// No rule with that id in the tenant.
    #[error("rule `{0}` not found")]
    NotFound(String),
    /// A rule with that id already exists (create).
    #[error("rule `{0}` already exists; update it instead")]
    Exists(String),
    /// `If-Match` named a version that is not the current one.
    #[error("rule `{id}` is at version {current}, not {expected}; reload it and retry")]
    VersionMismatch {
        /// The rule.
        id: String,
        /// The version the caller expected.
        expected: u64,
        /// The stored version.
        current: u64,
    },
    /// The rule's SQL does not compile.
    #[error("the rule does not compile: {0}")]
    Compile(#[from] RuleError),
    /// Something else about the rule is invalid (id, actions, templates).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("rules store: {0}")]
    Storage(String),
}

impl From<sqlx::Error> for RulesError {
    fn from(e: sqlx::Error) -> Self {
        RulesError::Storage(e.to_string())
    }
}

impl From<serde_json::Error> for RulesError {
    fn from(e: serde_json::Error) -> Self {
        RulesError::Storage(format!("a stored rule does not decode: {e}"))
    }
}

/// Result of the rules service.
pub type Result<T, E = RulesError> = std::result::Result<T, E>;
