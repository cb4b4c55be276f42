//! The MQTT 3.1.1 / 5.0 broker.
//!
//! - [`Broker`]: sessions, the publish path and session lifecycle, shared by all listeners.
//! - [`run_listener`]: TCP, TLS and WebSocket accept loops.
//! - [`auth`]: who may connect and what they may do (the registry, a static list in development
//!   mode; the enhanced-auth hook).
//! - [`MqttConfig`]: limits and behaviour; every key is documented in `docs/configuration.md`.
//!
//! Durability: QoS 1/2 messages queued for persistent sessions, their subscriptions and retained
//! messages are written through the store before the PUBACK/PUBREC/SUBACK that acknowledges them.

pub mod auth;
mod broker;
mod config;
mod connection;
mod introspect;
mod metrics;
mod session;
mod sys;
mod transport;
mod watch;

pub use auth::{
    Access, Admission, AuthConfig, Authenticator, Credentials, Grant, PeerCertificates, Refusal,
    StaticUsers,
};
pub use broker::{
    Broker, MessageSink, MessageTap, Origin, ServiceMessage, ServicePublished, SessionEvent,
    SinkOutcome, SinkWait,
};
pub use config::{ClientIdCharset, MqttConfig};
pub use introspect::{
    ConnectionCount, ConnectionFacts, MAX_PAGE, Page, RetainedQueryError, SessionView,
    SubscriptionView, SysFigures, TOP_TALKERS, Talker, TenantFigures,
};
pub use metrics::{BrokerMetrics, DropReason};
pub use session::Kick;
pub use sys::spawn_sys_publisher;
pub use transport::{
    TlsSetupError, Transport, WsIo, run_listener, tls_acceptor, tls_acceptor_with_verifier,
};
pub use watch::{
    Direction, MAX_WATCHERS, WATCH_PAYLOAD_CAP, WatchError, WatchGuard, WatchReceiver,
    WatchedMessage,
};

impl Broker {
    /// Graceful shutdown: tells every client (v5: DISCONNECT 0x8B Server shutting down), waits up
    /// to `grace` for connections to close and their sessions to be persisted, then flushes and
    /// closes the store.
    pub async fn shutdown_gracefully(&self, grace: std::time::Duration) {
        self.kick_all(Kick::Shutdown);
        let deadline = tokio::time::Instant::now() + grace;
        while self
            .metrics
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "closing the store failed");
        }
    }

    /// Prometheus text for the broker's metrics.
    pub fn render_metrics(&self, out: &mut String) {
        self.metrics
            .render_prometheus(out, self.router.subscription_count());
        self.watches.render(out);
    }
}
