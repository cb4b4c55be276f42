//! Extractors: the authenticated caller, and JSON bodies, paths and query strings whose
//! rejections are answered in the API's JSON error format instead of axum's plain text.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use ferrohub_registry::{Actor, Registry};
use serde::de::DeserializeOwned;

use crate::ApiState;
use crate::error::ApiError;

/// An authenticated operator: the registry and who is calling.
///
/// Extracting it checks the API token (`Authorization: Bearer <token>`, or InfluxDB's
/// `Authorization: Token <token>`), and, on routes under `/tenants/{tenant}`, that the
/// tenant exists and is in the token's scope. A tenant outside the scope is answered exactly like
/// a missing one (404), so a token cannot probe other tenants.
pub struct Caller {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The token's identity, role and tenant scope.
    pub actor: Actor,
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthenticated(
            "send an API token in the header `Authorization: Bearer <token>` (the bootstrap admin \
             token is printed at the hub's first start, or set with FERROHUB_ADMIN_TOKEN)",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("the Authorization header is not valid text"))?;
    let (scheme, secret) = value.trim().split_once(' ').ok_or_else(|| {
        ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
    })?;
    // `Token` is InfluxDB's scheme (Telegraf, InfluxDB client libraries): the same API tokens.
    if !scheme.eq_ignore_ascii_case("bearer") && !scheme.eq_ignore_ascii_case("token") {
        return Err(ApiError::unauthenticated(
            "the Authorization header must use the Bearer scheme: `Authorization: Bearer <token>` \
             (or InfluxDB's `Authorization: Token <token>`)",
        ));
    }
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(ApiError::unauthenticated(
            "the bearer token is empty: `Authorization: Bearer <token>`",
        ));
    }
    Ok(secret)
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Caller, ApiError> {
        let registry = state.registry.clone().ok_or_else(ApiError::unavailable)?;
        let secret = bearer(&parts.headers)?;
        let source = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.to_string());
        let Some(actor) = registry.actor_for_token(secret, source).await? else {
            return Err(ApiError::unauthenticated(
                "the API token is unknown, expired or revoked; create a new one with \
                 POST /api/v1/tokens (as an admin)",
            ));
        };
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        if let Some((_, tenant)) = params.iter().find(|(k, _)| *k == "tenant") {
            if actor.tenant.as_deref().is_some_and(|mine| mine != tenant) {
                return Err(ApiError::not_found(format!("tenant {tenant} not found")));
            }
            // Answers 404 for a tenant that does not exist (listings would otherwise be empty).
            registry.tenant(&actor, tenant).await?;
        }
        Ok(Caller { registry, actor })
    }
}

/// The request body, with the body-limit and read errors answered as JSON.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Body(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large (2 MiB at most; 4 MiB for telemetry writes, 64 MiB \
                 for device imports): split it into smaller requests",
            )),
            Err(e) => Err(ApiError::invalid(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))),
        }
    }
}

/// A JSON object as request body. Any content type is accepted; the body must parse as `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<ApiJson<T>, ApiError> {
        let Body(bytes) = Body::from_request(req, state).await?;
        // serde would read a struct from an array too (`["d1"]` as `{"id": "d1"}`): every JSON
        // body of this API is an object, so anything else is refused.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') {
            return Err(ApiError::invalid(
                "the request body must be a JSON object ({...}); see /api/v1/openapi.json",
            ));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body, with an error that says where it is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty: send a JSON document (see /api/v1/openapi.json)",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the JSON body is not valid: {e}")))
}

/// Path parameters.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ApiPath<T>, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|e| ApiError::invalid(format!("the URL path is not valid: {}", e.body_text())))
    }
}

/// A query string parsed into `T` (use `#[serde(deny_unknown_fields)]` to refuse typos).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<ApiQuery<T>, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| {
                ApiError::invalid(format!(
                    "the query string {query:?} is not valid: {}",
                    e.body_text()
                ))
            })
    }
}

/// Reads `If-Match: "7"` (or `W/"7"`; `*` and no header: `None`) as the version the caller
/// saw; `resource` names the GET whose ETag to send (`"…/twins/{name}"`) in the error.
pub(crate) fn if_match(headers: &HeaderMap, resource: &str) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::invalid("If-Match is not valid text"))?
        .trim();
    if v == "*" {
        return Ok(None);
    }
    v.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| {
            ApiError::invalid(format!(
                "If-Match {v:?} is not an ETag of this API: send the ETag of GET {resource}, e.g. \"7\""
            ))
        })
}
