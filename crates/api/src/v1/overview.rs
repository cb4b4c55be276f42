//! `/tenants/{tenant}/overview` and `/tenants/{tenant}/overview/stream`: the fleet overview of
//! the console — device counts, the tenant's broker figures (rates, connections by protocol,
//! top talkers) and its open alarms by severity — now, once or as a Server-Sent Events stream.
//!
//! The stream is bounded: at most [`MAX_OVERVIEW_STREAMS`] are open in the process (more: 429),
//! each sends one figure every `interval` seconds (1 to 60), and all end when the server shuts
//! down ([`crate::Closing`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use ferrohub_alarms::{AlarmCounts, AlarmService};
use ferrohub_registry::model::Role;
use ferrohub_registry::{Actor, Registry, RegistryStore};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::broker::{BrokerStats, BrokerViewRef};
use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, ApiQuery, Caller};
use crate::{ApiState, BrokerFiguresSource, Closing};

/// How many overview streams may be open at once in the process.
pub const MAX_OVERVIEW_STREAMS: usize = 256;

static OPEN_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Device counts of a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceCounts {
    /// Registered devices.
    pub total: u64,
    /// Devices with a live connection now.
    pub online: u64,
    /// Registered devices without a live connection.
    pub offline: u64,
}

/// Hub-wide broker figures (all tenants), for platform-wide tokens only.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HubFigures {
    /// Open MQTT connections.
    pub connections: u64,
    /// PUBLISH packets received since the hub started.
    pub messages_received: u64,
    /// PUBLISH packets sent since the hub started.
    pub messages_sent: u64,
    /// Received per second since the stream's previous event (absent in the first and in
    /// `GET …/overview`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_in_per_sec: Option<f64>,
    /// Sent per second since the stream's previous event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_out_per_sec: Option<f64>,
}

/// The fleet overview of a tenant at one moment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Overview {
    /// The tenant.
    pub tenant: String,
    /// When the figures were taken (ms since the epoch).
    pub at: u64,
    /// Device counts.
    pub devices: DeviceCounts,
    /// Hub-wide broker figures: only for platform-wide tokens (they span every tenant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubFigures>,
    /// The tenant's broker figures: messages in/out per second, connections by protocol and
    /// transport, top talkers (absent when the hub has no broker view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStats>,
    /// The tenant's open alarms by severity (absent when the hub has no alarms service, or
    /// when counting failed: the figures above still come).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub alarms: Option<AlarmCounts>,
}

/// How long a tenant's device total and open-alarm counts are reused: counting is a scan (of
/// the tenant's device index: about 50 ms at 200,000 devices in a debug build; of its open
/// alarms: about 20 ms at 37,500 in a release build), so streams share one count a second
/// instead of each counting every tick.
const COUNT_REUSE: Duration = Duration::from_secs(1);

/// Per-tenant figures taken at most once per [`COUNT_REUSE`] and shared by every caller.
struct Reused<T>(OnceLock<Mutex<HashMap<String, (Instant, T)>>>);

impl<T: Clone> Reused<T> {
    const fn new() -> Self {
        Self(OnceLock::new())
    }

    async fn get<E>(
        &self,
        tenant: &str,
        take: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let lock = || {
            self.0
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let reused = lock()
            .get(tenant)
            .filter(|(at, _)| at.elapsed() < COUNT_REUSE)
            .map(|(_, v)| v.clone());
        if let Some(v) = reused {
            return Ok(v);
        }
        let v = take.await?;
        lock().insert(tenant.to_string(), (Instant::now(), v.clone()));
        Ok(v)
    }
}

async fn device_total(registry: &Registry, tenant: &str) -> Result<u64, ApiError> {
    static TOTALS: Reused<u64> = Reused::new();
    TOTALS
        .get(tenant, async {
            registry
                .store()
                .count_devices(tenant)
                .await
                .map_err(|e| ApiError::internal(&e))
        })
        .await
}

async fn open_alarms(alarms: &AlarmService, tenant: &str) -> Option<AlarmCounts> {
    static COUNTS: Reused<AlarmCounts> = Reused::new();
    COUNTS
        .get(tenant, alarms.counts(tenant))
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "counting open alarms failed"))
        .ok()
}

/// The figures now; `previous` (the stream's last event) gives the per-second rates.
async fn take(
    registry: &Registry,
    actor: &Actor,
    broker: Option<&BrokerFiguresSource>,
    view: Option<&BrokerViewRef>,
    alarms: Option<&Arc<AlarmService>>,
    tenant: &str,
    previous: Option<&Overview>,
) -> Result<Overview, ApiError> {
    let total = device_total(registry, tenant).await?;
    // Static `[[users]]` and anonymous clients count as connections too: never more than total.
    let online = u64::from(registry.online_count(tenant)).min(total);
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let hub = broker.filter(|_| actor.tenant.is_none()).map(|read| {
        let now = read();
        let rate = |current: u64, before: Option<u64>| {
            let (prev_at, before) = (previous?.at, before?);
            let secs = at.checked_sub(prev_at).filter(|ms| *ms > 0)? as f64 / 1000.0;
            Some(current.saturating_sub(before) as f64 / secs)
        };
        let prev = previous.and_then(|p| p.hub.as_ref());
        HubFigures {
            connections: now.connections,
            messages_received: now.messages_received,
            messages_sent: now.messages_sent,
            messages_in_per_sec: rate(now.messages_received, prev.map(|p| p.messages_received)),
            messages_out_per_sec: rate(now.messages_sent, prev.map(|p| p.messages_sent)),
        }
    });
    Ok(Overview {
        tenant: tenant.to_string(),
        at,
        devices: DeviceCounts {
            total,
            online,
            offline: total - online,
        },
        hub,
        broker: view.map(|v| v.stats(tenant)),
        alarms: match alarms {
            Some(a) => open_alarms(a, tenant).await,
            None => None,
        },
    })
}

/// The fleet overview now.
#[utoipa::path(get, path = "/tenants/{tenant}/overview", tag = "overview",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The overview", body = Overview), CommonErrors))]
pub async fn get_overview(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Overview>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(
        take(
            &c.registry,
            &c.actor,
            state.broker.as_ref(),
            state.broker_view.as_ref(),
            state.alarms.as_ref(),
            &tenant,
            None,
        )
        .await?,
    ))
}

/// Query of the overview stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Seconds between two figures, 1 to 60 (default 2).
    pub interval: Option<u64>,
}

/// What a stream reads its figures from, and its previous figures (for rates).
struct Source {
    registry: Arc<Registry>,
    actor: Actor,
    broker: Option<BrokerFiguresSource>,
    view: Option<BrokerViewRef>,
    alarms: Option<Arc<AlarmService>>,
    tenant: Arc<str>,
    previous: Option<Overview>,
}

/// Decrements the open-stream count when a stream ends (client gone, or shutdown).
struct StreamSlot;

impl StreamSlot {
    fn claim() -> Option<StreamSlot> {
        OPEN_STREAMS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_OVERVIEW_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The fleet overview as a Server-Sent Events stream: an `overview` event at once and then every
/// `interval` seconds (data: the same object as `GET …/overview`). It ends when the hub shuts
/// down; browsers' `EventSource` reconnects by itself. At most 256 streams are open at once
/// (429 `too_many_streams`).
#[utoipa::path(get, path = "/tenants/{tenant}/overview/stream", tag = "overview",
    params(("tenant" = String, Path, description = "Tenant id"), StreamParams),
    responses(
        (status = 200, description = "`text/event-stream` of `overview` events", content_type = "text/event-stream", body = String),
        (status = 429, description = "Too many open overview streams", body = crate::error::ErrorBody),
        CommonErrors))]
pub async fn overview_stream(
    c: Caller,
    State(state): State<ApiState>,
    closing: Option<Extension<Closing>>,
    ApiPath(tenant): ApiPath<String>,
    ApiQuery(p): ApiQuery<StreamParams>,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let every = p.interval.unwrap_or(2);
    if !(1..=60).contains(&every) {
        return Err(ApiError::invalid(format!(
            "interval={every}: give the seconds between figures, 1 to 60"
        )));
    }
    let slot = StreamSlot::claim().ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "{MAX_OVERVIEW_STREAMS} overview streams are open; close one or poll \
                 GET /api/v1/tenants/{tenant}/overview instead"
            ),
        )
    })?;
    let registry = c.registry.clone();
    let tenant: Arc<str> = Arc::from(tenant.as_str());
    let closing = Box::pin(async move {
        match closing {
            Some(Extension(c)) => c.wait().await,
            None => std::future::pending().await,
        }
    });
    let mut ticker = tokio::time::interval(Duration::from_secs(every));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let source = Source {
        registry,
        actor: c.actor,
        broker: state.broker,
        view: state.broker_view,
        alarms: state.alarms,
        tenant,
        previous: None,
    };
    let s = (source, ticker, closing, slot);
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        let (source, ticker, closing, _) = &mut s;
        tokio::select! {
            () = closing.as_mut() => return None,
            _ = ticker.tick() => {}
        }
        let taken = take(
            &source.registry,
            &source.actor,
            source.broker.as_ref(),
            source.view.as_ref(),
            source.alarms.as_ref(),
            &source.tenant,
            source.previous.as_ref(),
        )
        .await;
        let event = match taken {
            Ok(o) => {
                let event = serde_json::to_string(&o)
                    .map(|data| Event::default().event("overview").data(data))
                    .unwrap_or_else(|_| Event::default().comment("unserialisable"));
                source.previous = Some(o);
                event
            }
            Err(e) => Event::default().event("error").data(e.message),
        };
        Some((Ok(event), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
