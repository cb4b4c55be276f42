//! The operator-facing HTTP server.
//!
//! It serves what operations tooling needs — `/healthz` (the process is alive), `/readyz`
//! (listeners are bound and recovered state is loaded) and `/metrics` (Prometheus text), all
//! unauthenticated — and the operator API under `/api/v1` (bearer tokens; see
//! `docs/http-api.md`), whose OpenAPI 3.1 document is served at `/api/v1/openapi.json`, and the
//! InfluxDB v2 write API at `/api/v2/write` ([`influx`]; in the same document).
//! Like every server in Ferrohub it takes an already-bound listener and a shutdown future.

pub mod error;
pub mod extract;
pub mod influx;
pub mod v1;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use ferrohub_registry::Registry;
use tokio::net::TcpListener;

use crate::error::ApiError;

/// Renders Prometheus text exposition into the buffer. `/metrics` calls it on a blocking thread
/// (`tokio::task::spawn_blocking`): the telemetry engine's summaries it includes walk every part
/// under the engine's lock, which must not hold up an async worker.
pub type MetricsRenderer = Arc<dyn Fn(&mut String) + Send + Sync>;

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Set once the hub is ready to serve.
    pub ready: Arc<AtomicBool>,
    /// Produces the metrics text.
    pub metrics: MetricsRenderer,
    /// The device registry behind `/api/v1`; `None` answers those routes with 503.
    pub registry: Option<Arc<Registry>>,
    /// The twin service; `None` answers its routes with 503.
    pub twins: Option<Arc<ferrohub_twins::Twins>>,
    /// The command service; `None` answers its routes with 503.
    pub commands: Option<Arc<ferrohub_twins::commands::Commands>>,
    /// The telemetry service; `None` answers its routes with 503.
    pub telemetry: Option<Arc<ferrohub_telemetry::service::Telemetry>>,
    /// The rules service; `None` answers its routes with 503.
    pub rules: Option<Arc<ferrohub_rules_service::RulesService>>,
}

/// The HTTP routes: health, readiness and metrics, the operator API under `/api/v1`, and the
/// InfluxDB v2 write API (`/api/v2/write`).
pub fn router(state: ApiState) -> Router {
    let (api, _openapi) = v1::build();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "there is no route {method} {}; the operator API is described at /api/v1/openapi.json",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not accept {method}; the methods of each route are in /api/v1/openapi.json",
            uri.path()
        ),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let render = state.metrics.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut out = String::with_capacity(8 * 1024);
        render(&mut out);
        out
    })
    .await
    .map_err(|e| ApiError::internal(&e))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

/// Serves `router` on `listener` until `shutdown` resolves. Handlers see the client's address
/// (`ConnectInfo<SocketAddr>`): API actions are audited with it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
