//! The API's error responses: every failure is `{"code": "...", "message": "..."}` with a stable,
//! machine-readable `code` and a `message` that says what to do.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferrohub_registry::RegistryError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code: `invalid`, `unauthenticated`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `conflict`, `payload_too_large`, `unsupported_media_type`, `internal`, `unavailable`.
    #[schema(example = "not_found")]
    pub code: String,
    /// What went wrong and what to do about it.
    #[schema(example = "device d1 not found")]
    pub message: String,
}

/// An error answered by the API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (see [`ErrorBody::code`]).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 503 `unavailable`: the registry is not wired into this hub.
    pub fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the operator API is not available on this hub (no device registry is configured); \
             retry later or check the hub's configuration",
        )
    }

    /// 500 `internal`; the cause is logged, not shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "operator API request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the hub failed to carry out the request; the cause is in the hub's log — retry, \
             and report it if it persists",
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Invalid(_) => ApiError::invalid(e.to_string()),
            RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
            RegistryError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            RegistryError::Stale(_) => {
                ApiError::new(StatusCode::CONFLICT, "changed_concurrently", e.to_string())
            }
            RegistryError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            RegistryError::Database(_) | RegistryError::Corrupt(_) | RegistryError::Crypto(_) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.into(),
            message: self.message,
        };
        let mut res = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferrohub\""),
            );
        }
        res
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// The error responses every authenticated operation may give (for the OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum CommonErrors {
    /// The request is malformed or violates a rule (`invalid`).
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// No token, or an unknown, expired or revoked one (`unauthenticated`).
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// The token's role does not allow this (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The object does not exist or is outside the token's tenant (`not_found`).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The object exists already (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The hub failed (`internal`); details are in its log.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The registry is not available on this hub (`unavailable`).
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
