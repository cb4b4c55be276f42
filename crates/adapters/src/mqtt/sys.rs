//! `$SYS/broker/...` statistics, published as retained messages at a fixed interval in the
//! default tenant (the names follow Mosquitto's, which tools such as MQTT Explorer understand).

use std::sync::Arc;
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
            let f = broker.sys_figures();
            let stats: [(&str, String); 14] = [
                ("$SYS/broker/version", f.version),
                ("$SYS/broker/uptime", format!("{} seconds", f.uptime_secs)),
                (
                    "$SYS/broker/clients/connected",
                    f.clients_connected.to_string(),
                ),
                ("$SYS/broker/clients/total", f.clients_total.to_string()),
                ("$SYS/broker/clients/maximum", f.clients_maximum.to_string()),
                (
                    "$SYS/broker/messages/received",
                    f.messages_received.to_string(),
                ),
                ("$SYS/broker/messages/sent", f.messages_sent.to_string()),
                (
                    "$SYS/broker/messages/dropped",
                    f.messages_dropped.to_string(),
                ),
                (
                    "$SYS/broker/messages/inflight",
                    f.messages_inflight.to_string(),
                ),
                ("$SYS/broker/messages/queued", f.messages_queued.to_string()),
                (
                    "$SYS/broker/retained messages/count",
                    f.retained_count.to_string(),
                ),
                (
                    "$SYS/broker/subscriptions/count",
                    f.subscription_count.to_string(),
                ),
                ("$SYS/broker/bytes/received", f.bytes_received.to_string()),
                ("$SYS/broker/bytes/sent", f.bytes_sent.to_string()),
            ];
            for (topic, value) in stats {
                broker
                    .publish_internal(&tenant, topic, Bytes::from(value), true)
                    .await;
            }
        }
    }))
}
