//! Errors of the twin and command services, with the stable codes the API and the device topics
//! report.

use std::sync::Arc;

use crate::document::PatchError;
use crate::query::QueryError;
use crate::store::StoreError;

/// What went wrong with a twin or command request.
#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// The twin (or command) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// The patch was refused (keys, depth, size).
    #[error(transparent)]
    Patch(#[from] PatchError),
    /// The fleet query does not parse.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The patch itself is larger than a section may be.
    #[error("the patch is {size} bytes; the limit is {limit} bytes (twins.max_section_bytes)")]
    PatchTooLarge {
        /// Its size as compact JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Optimistic concurrency: the caller's version is not the current one.
    #[error(
        "version conflict: the twin is at version {current}, the update expected {expected}; \
         read the twin again and retry with its current version"
    )]
    Conflict {
        /// What the caller sent.
        expected: u64,
        /// What the twin is at.
        current: u64,
    },
    /// A device may not create more named twins.
    #[error("the device already has {limit} named twins, the most allowed (twins.max_named_twins)")]
    TooManyTwins {
        /// The limit.
        limit: usize,
    },
    /// The device is not connected (direct commands need it online).
    #[error(
        "device {0} is offline: direct commands need a connected device; queue the command instead (mode=queued)"
    )]
    Offline(String),
    /// The device is connected but does not listen for commands.
    #[error(
        "device {0} is connected but not subscribed to its command topic ($devices/{0}/commands/req/#)"
    )]
    NotListening(String),
    /// The device did not answer in time.
    #[error("device {device} did not answer command {name} within {timeout_secs} s")]
    Timeout {
        /// Device.
        device: String,
        /// Command name.
        name: String,
        /// The timeout.
        timeout_secs: u64,
    },
    /// The device's command queue is full.
    #[error(
        "device {device} already has {limit} pending commands (commands.max_queued_per_device); \
         wait for them to complete or expire, or cancel some"
    )]
    QueueFull {
        /// Device.
        device: String,
        /// The limit.
        limit: usize,
    },
    /// Too many requests in progress in the hub.
    #[error("the hub is busy: {0}; retry shortly")]
    Busy(&'static str),
    /// Storage failed.
    #[error("{0}")]
    Store(Arc<StoreError>),
}

impl From<StoreError> for TwinError {
    fn from(e: StoreError) -> Self {
        TwinError::Store(Arc::new(e))
    }
}

impl TwinError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            TwinError::NotFound(_) => "not_found",
            TwinError::Invalid(_) => "invalid_request",
            TwinError::Patch(PatchError::TooLarge { .. }) | TwinError::PatchTooLarge { .. } => {
                "too_large"
            }
            TwinError::Patch(_) => "invalid_patch",
            TwinError::Query(_) => "invalid_query",
            TwinError::Conflict { .. } => "version_conflict",
            TwinError::TooManyTwins { .. } => "too_many_twins",
            TwinError::Offline(_) => "device_offline",
            TwinError::NotListening(_) => "device_not_listening",
            TwinError::Timeout { .. } => "command_timeout",
            TwinError::QueueFull { .. } => "queue_full",
            TwinError::Busy(_) => "busy",
            TwinError::Store(_) => "storage_error",
        }
    }

    /// The HTTP status that fits (also reported to devices in `rejected` messages).
    pub fn status(&self) -> u16 {
        match self {
            TwinError::NotFound(_) => 404,
            TwinError::Patch(PatchError::TooLarge { .. }) | TwinError::PatchTooLarge { .. } => 413,
            TwinError::Invalid(_) | TwinError::Patch(_) | TwinError::Query(_) => 400,
            TwinError::Conflict { .. } => 409,
            TwinError::TooManyTwins { .. } | TwinError::QueueFull { .. } => 429,
            TwinError::Offline(_) | TwinError::NotListening(_) => 409,
            TwinError::Timeout { .. } => 504,
            TwinError::Busy(_) => 503,
            TwinError::Store(_) => 500,
        }
    }
}
