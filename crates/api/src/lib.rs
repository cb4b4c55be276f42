//! The operator-facing HTTP server.
//!
//! Today it serves what operations tooling needs from day one: `/healthz` (the process is alive),
//! `/readyz` (listeners are bound and recovered state is loaded) and `/metrics` (Prometheus text).
//! The `/api/v1` operator API, its OpenAPI document and the console are added here by later work.
//! Like every server in Ferrohub it takes an already-bound listener and a shutdown future.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

/// Renders Prometheus text exposition into the buffer.
pub type MetricsRenderer = Arc<dyn Fn(&mut String) + Send + Sync>;

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Set once the hub is ready to serve.
    pub ready: Arc<AtomicBool>,
    /// Produces the metrics text.
    pub metrics: MetricsRenderer,
}

/// The HTTP routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let mut out = String::with_capacity(8 * 1024);
    (state.metrics)(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
