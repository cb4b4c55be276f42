//! The operator-facing HTTP server.
//!
//! It serves what operations tooling needs — `/healthz` (the process is alive), `/readyz`
//! (listeners are bound and recovered state is loaded) and `/metrics` (Prometheus text), all
//! unauthenticated — and the operator API under `/api/v1` (bearer tokens; see
//! `docs/http-api.md`), whose OpenAPI 3.1 document is served at `/api/v1/openapi.json`, and the
//! InfluxDB v2 write API at `/api/v2/write` ([`influx`]; in the same document), and the embedded
//! operator console at `/` ([`console`]).
//! Like every server in Ferrohub it takes an already-bound listener and a shutdown future.

pub mod broker;
pub mod console;
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

/// Hub-wide broker counters for the fleet overview (not per tenant: shown to platform tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerFigures {
    /// Open MQTT connections, all tenants.
    pub connections: u64,
    /// PUBLISH packets received since the start.
    pub messages_received: u64,
    /// PUBLISH packets sent since the start.
    pub messages_sent: u64,
}

/// Reads [`BrokerFigures`] (cheap: a few atomic loads).
pub type BrokerFiguresSource = Arc<dyn Fn() -> BrokerFigures + Send + Sync>;

/// One message of a device's live tail ([`DeviceTails`]).
#[derive(Debug, Clone)]
pub struct TailMessage {
    /// The topic.
    pub topic: Arc<str>,
    /// The payload's first bytes (the broker keeps up to 4 KiB).
    pub payload: axum::body::Bytes,
    /// The payload's full size in bytes.
    pub size: usize,
    /// QoS (0, 1 or 2).
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// Published by the device (`true`) or delivered to it.
    pub inbound: bool,
    /// When (ms since the epoch).
    pub at: u64,
    /// Copies dropped since the previous message because the tail's queue was full.
    pub skipped_before: u64,
}

/// A device's live tail: its messages until the stream is dropped (which ends the watch).
pub type TailStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = TailMessage> + Send>>;

/// Why a tail could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailRefused {
    /// The hub's cap on open tails is reached.
    TooMany(usize),
}

/// Live copies of one device's MQTT traffic (the binary implements it over the broker).
pub trait DeviceTails: Send + Sync + 'static {
    /// Starts watching `device` of `tenant` with a queue of `capacity` messages.
    fn watch(&self, tenant: &str, device: &str, capacity: usize)
    -> Result<TailStream, TailRefused>;
}

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
    /// The broker's counters for the fleet overview; `None` leaves them out.
    pub broker: Option<BrokerFiguresSource>,
    /// The rules service; `None` answers its routes with 503.
    pub rules: Option<Arc<ferrohub_rules_service::RulesService>>,
    /// The alarms service; `None` answers its routes with 503.
    pub alarms: Option<Arc<ferrohub_alarms::AlarmService>>,
    /// Live device message tails; `None` answers `…/messages/stream` with 503.
    pub tails: Option<Arc<dyn DeviceTails>>,
    /// The broker's sessions, subscriptions, retained messages and figures; `None` answers the
    /// `/broker` routes with 503 and leaves the overview's per-tenant broker figures out.
    pub broker_view: Option<broker::BrokerViewRef>,
}

/// The HTTP routes: health, readiness and metrics, the operator API under `/api/v1`, the
/// InfluxDB v2 write API (`/api/v2/write`) and the operator console (`/`, `/console/{file}`, and
/// its shell for any other path outside `/api`).
pub fn router(state: ApiState) -> Router {
    let (api, _openapi) = v1::build();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(console::shell))
        .route("/console/{file}", get(console::asset))
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn no_route(
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    // The console routes on the client: a reload or bookmark of one of its pages gets the shell.
    if (method == Method::GET || method == Method::HEAD) && console::is_console_path(uri.path()) {
        return console::shell(method, headers).await;
    }
    ApiError::not_found(format!(
        "there is no route {method} {}; the operator API is described at /api/v1/openapi.json",
        uri.path()
    ))
    .into_response()
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

/// Tells long-lived responses (Server-Sent Events streams) that the server is shutting down, so
/// that they end and graceful shutdown does not wait for clients to hang up. [`serve`] adds it to
/// every request; a router served otherwise has none, and its streams end with their client.
#[derive(Clone)]
pub struct Closing(pub tokio::sync::watch::Receiver<bool>);

impl Closing {
    /// Resolves once the server is shutting down (at once if it already is).
    pub async fn wait(mut self) {
        // An error means the sender is gone, which also means the server is stopping.
        let _ = self.0.wait_for(|closing| *closing).await;
    }
}

/// Serves `router` on `listener` until `shutdown` resolves. Handlers see the client's address
/// (`ConnectInfo<SocketAddr>`): API actions are audited with it. When `shutdown` resolves, open
/// event streams are ended (see [`Closing`]) before graceful shutdown waits for requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let router = router.layer(axum::Extension(Closing(closing_rx)));
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    })
    .await
}
