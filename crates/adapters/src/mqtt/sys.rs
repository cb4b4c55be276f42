//! `$SYS/broker/...` statistics, published as retained messages at a fixed interval in the
//! default tenant (the names follow Mosquitto's, which tools such as MQTT Explorer understand).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use ferrohub_types::TenantId;

use super::broker::Broker;

/// Starts the `$SYS` publisher; it stops with the broker's shutdown signal.
pub fn spawn_sys_publisher(broker: Arc<Broker>) -> Option<tokio::task::JoinHandle<()>> {
    let interval = broker.config.sys_interval_secs;
    if interval == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut shutdown = broker.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(interval));
        let tenant = TenantId::default_tenant();
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            let m = &broker.metrics;
            let stats: [(&str, String); 14] = [
                (
                    "$SYS/broker/version",
                    format!("ferrohub {}", env!("CARGO_PKG_VERSION")),
                ),
                (
                    "$SYS/broker/uptime",
                    format!("{} seconds", broker.started.elapsed().as_secs()),
                ),
                (
                    "$SYS/broker/clients/connected",
                    m.connections.load(Relaxed).to_string(),
                ),
                (
                    "$SYS/broker/clients/total",
                    broker.session_count().to_string(),
                ),
                (
                    "$SYS/broker/clients/maximum",
                    broker.config.max_connections.to_string(),
                ),
                (
                    "$SYS/broker/messages/received",
                    m.received_total().to_string(),
                ),
                ("$SYS/broker/messages/sent", m.sent_total().to_string()),
                (
                    "$SYS/broker/messages/dropped",
                    m.dropped_total().to_string(),
                ),
                (
                    "$SYS/broker/messages/inflight",
                    m.inflight.get().to_string(),
                ),
                ("$SYS/broker/messages/queued", m.queued.get().to_string()),
                (
                    "$SYS/broker/retained messages/count",
                    m.retained.load(Relaxed).to_string(),
                ),
                (
                    "$SYS/broker/subscriptions/count",
                    broker.router.subscription_count().to_string(),
                ),
                (
                    "$SYS/broker/bytes/received",
                    m.bytes_received.get().to_string(),
                ),
                ("$SYS/broker/bytes/sent", m.bytes_sent.get().to_string()),
            ];
            for (topic, value) in stats {
                broker
                    .publish_internal(&tenant, topic, Bytes::from(value), true)
                    .await;
            }
        }
    }))
}
