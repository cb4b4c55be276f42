//! The operator API's view of the broker ([`ferrohub_api::broker::BrokerView`]) over the
//! running [`Broker`]: the adapters' introspection types turned into the API's rows.

use std::sync::Arc;

use ferrohub_adapters::mqtt::{
    Broker, Kick, Page, SessionView, SubscriptionView, SysFigures, TenantFigures,
};
use ferrohub_api::broker::{
    BrokerStats, BrokerView, ConnectionsBy, RetainedEntry, SessionDetail, SessionRow,
    SubscriptionRow, TopTalker, ViewFuture, ViewPage,
};
use ferrohub_types::{Message, TenantId};

/// [`BrokerView`] over the hub's broker.
pub struct HubBrokerView(pub Arc<Broker>);

fn page<T, U>(p: Page<T>, f: impl Fn(T) -> U) -> ViewPage<U> {
    ViewPage {
        items: p.items.into_iter().map(f).collect(),
        next: p.next,
    }
}

fn session_row(v: SessionView) -> SessionRow {
    let c = v.connection;
    SessionRow {
        client_id: v.client_id.to_string(),
        device_id: c
            .as_ref()
            .and_then(|c| c.device_id.as_deref().map(str::to_string)),
        connected: v.connected,
        protocol: c.as_ref().map(|c| c.protocol.to_string()),
        transport: c.as_ref().map(|c| c.transport.to_string()),
        remote_address: c.as_ref().map(|c| c.remote.to_string()),
        connected_at: c.as_ref().map(|c| c.connected_at),
        disconnected_at: v.disconnected_at.filter(|_| !v.connected),
        keep_alive_secs: c.as_ref().map(|c| c.keep_alive_secs),
        clean_start: c.as_ref().map(|c| c.clean_start),
        session_expiry_secs: v.session_expiry_secs,
        subscriptions: v.subscriptions as u64,
        queued: v.queued as u64,
        inflight: v.inflight as u64,
        messages_in: v.messages_in,
        messages_out: v.messages_out,
    }
}

fn subscription_row(v: SubscriptionView) -> SubscriptionRow {
    SubscriptionRow {
        client_id: v.client_id.to_string(),
        filter: v.filter.to_string(),
        share_group: v.share_group.map(|g| g.to_string()),
        qos: v.qos as u8,
        no_local: v.no_local,
        retain_as_published: v.retain_as_published,
        retain_handling: v.retain_handling,
        subscription_id: v.subscription_id,
    }
}

fn retained_entry(m: &Message) -> RetainedEntry {
    let p = m.properties.as_deref();
    RetainedEntry {
        topic: m.topic.as_str().to_string(),
        payload: m.payload.clone(),
        qos: m.qos as u8,
        stored_at: m.received_at,
        payload_is_utf8: p.is_some_and(|p| p.payload_is_utf8),
        content_type: p.and_then(|p| p.content_type.as_deref().map(str::to_string)),
        response_topic: p.and_then(|p| p.response_topic.as_deref().map(str::to_string)),
        expires_at: p.and_then(|p| p.expires_at),
        user_properties: p
            .map(|p| {
                p.user_properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn stats(f: TenantFigures) -> BrokerStats {
    BrokerStats {
        messages_in: f.messages_in,
        messages_out: f.messages_out,
        messages_in_per_sec: f.messages_in_per_sec,
        messages_out_per_sec: f.messages_out_per_sec,
        interval_ms: f.interval_ms,
        sessions: f.sessions,
        connected: f.connected,
        connections: f
            .connections
            .into_iter()
            .map(|c| ConnectionsBy {
                protocol: c.protocol.to_string(),
                transport: c.transport.to_string(),
                count: c.count,
            })
            .collect(),
        subscriptions: f.subscriptions,
        retained: f.retained,
        top_talkers: f
            .top_talkers
            .into_iter()
            .map(|t| TopTalker {
                client_id: t.client_id.to_string(),
                device_id: t.device_id.map(|d| d.to_string()),
                messages_in: t.messages_in,
                messages_in_per_sec: t.messages_in_per_sec,
            })
            .collect(),
    }
}

fn sys(f: SysFigures) -> ferrohub_api::broker::SysFigures {
    ferrohub_api::broker::SysFigures {
        version: f.version,
        uptime_secs: f.uptime_secs,
        clients_connected: f.clients_connected,
        clients_total: f.clients_total,
        clients_persistent: f.clients_persistent,
        clients_maximum: f.clients_maximum,
        connections_total: f.connections_total,
        connections_refused: f.connections_refused,
        messages_received: f.messages_received,
        messages_sent: f.messages_sent,
        messages_dropped: f.messages_dropped,
        messages_inflight: f.messages_inflight,
        messages_queued: f.messages_queued,
        retained_count: f.retained_count,
        subscription_count: f.subscription_count,
        bytes_received: f.bytes_received,
        bytes_sent: f.bytes_sent,
    }
}

impl BrokerView for HubBrokerView {
    fn sessions(
        &self,
        tenant: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ViewPage<SessionRow> {
        page(
            self.0
                .sessions_page(&TenantId::new(tenant), prefix, after, limit),
            session_row,
        )
    }

    fn session(&self, tenant: &str, client_id: &str) -> Option<SessionDetail> {
        let (view, subs) = self.0.session_view(&TenantId::new(tenant), client_id)?;
        Some(SessionDetail {
            session: session_row(view),
            subscription_list: subs.into_iter().map(subscription_row).collect(),
        })
    }

    fn kick(&self, tenant: &str, client_id: &str) -> bool {
        self.0
            .kick_client(&TenantId::new(tenant), client_id, Kick::Administrative)
    }

    fn discard<'a>(&'a self, tenant: &'a str, client_id: &'a str) -> ViewFuture<'a, bool> {
        Box::pin(async move {
            self.0
                .discard_session(&TenantId::new(tenant), client_id)
                .await
        })
    }

    fn subscriptions(
        &self,
        tenant: &str,
        filter_prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ViewPage<SubscriptionRow> {
        page(
            self.0
                .subscriptions_page(&TenantId::new(tenant), filter_prefix, after, limit),
            subscription_row,
        )
    }

    fn retained(
        &self,
        tenant: &str,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ViewPage<RetainedEntry>, String> {
        self.0
            .retained_page(&TenantId::new(tenant), filter, after, limit)
            .map(|p| page(p, |m| retained_entry(&m)))
            .map_err(|e| e.to_string())
    }

    fn retained_message(&self, tenant: &str, topic: &str) -> Result<Option<RetainedEntry>, String> {
        self.0
            .retained_message(&TenantId::new(tenant), topic)
            .map(|m| m.map(|m| retained_entry(&m)))
            .map_err(|e| e.to_string())
    }

    fn delete_retained<'a>(
        &'a self,
        tenant: &'a str,
        topic: &'a str,
    ) -> ViewFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            self.0
                .delete_retained(&TenantId::new(tenant), topic)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn stats(&self, tenant: &str) -> BrokerStats {
        stats(self.0.tenant_figures(&TenantId::new(tenant)))
    }

    fn sys(&self) -> ferrohub_api::broker::SysFigures {
        sys(self.0.sys_figures())
    }
}
