//! Wiring: opens the store, builds the broker and binds every listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ferrohub_adapters::mqtt::{
    AuthConfig, Authenticator, Broker, Credentials, Grant, Kick, Refusal, ServiceMessage,
    SessionEvent, StaticUsers, Transport, run_listener, spawn_sys_publisher,
    tls_acceptor_with_verifier,
};
use ferrohub_adapters::shutdown::{Shutdown, ShutdownTrigger};
use ferrohub_registry::model::TelemetryOnDecommission;
use ferrohub_registry::{Purge, Registry, SqliteOptions, SqliteStore};
use ferrohub_store::{BrokerStore, FsyncPolicy, RecoveredState, StoreConfig};
use ferrohub_telemetry::service::{IngestOutcome, Offer, Telemetry};
use ferrohub_twins::Twins;
use ferrohub_twins::commands::Commands;
use ferrohub_twins::device_api::{DeviceApi, DeviceMessage};
use ferrohub_twins::link::{Delivery, DeviceLink};
use ferrohub_types::TenantId;
use ferrohub_types::auth::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{FsyncMode, HubConfig};

/// A running hub.
pub struct Hub {
    /// Bound MQTT/TCP address.
    pub mqtt_addr: Option<SocketAddr>,
    /// Bound MQTT/TLS address.
    pub mqtts_addr: Option<SocketAddr>,
    /// Bound MQTT/WebSocket address.
    pub ws_addr: Option<SocketAddr>,
    /// Bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The broker.
    pub broker: Arc<Broker>,
    /// The device registry.
    pub registry: Arc<Registry>,
    /// The twin service.
    pub twins: Arc<Twins>,
    /// The command service.
    pub commands: Arc<Commands>,
    /// The telemetry service (`None` when `telemetry.enabled` is false).
    pub telemetry: Option<Arc<Telemetry>>,
    /// The rules service.
    pub rules: Arc<ferrohub_rules_service::RulesService>,
    /// The alarms service.
    pub alarms: Arc<ferrohub_alarms::AlarmService>,
    /// The admin token generated at first start (shown once), if one was.
    pub bootstrap_token: Option<String>,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<()>>,
}

/// Opens the time-series engine in `data_dir/telemetry` (replaying its WAL) and starts the
/// telemetry service.
async fn open_telemetry(config: &HubConfig) -> Result<Arc<Telemetry>> {
    let dir = config.data_dir.join("telemetry");
    let t = &config.telemetry;
    let mut ecfg = ferrohub_tsdb::EngineConfig::new(&dir);
    ecfg.fsync = config.storage.fsync == FsyncMode::Always;
    ecfg.flush_interval = Duration::from_secs(t.flush_interval_secs.max(1));
    ecfg.head_max_points = t.head_max_points.max(1);
    ecfg.default_retention_days = (t.retention_days > 0).then_some(t.retention_days);
    let started = std::time::Instant::now();
    let engine = tokio::task::spawn_blocking(move || ferrohub_tsdb::Engine::open(ecfg))
        .await
        .context("opening the telemetry engine")?
        .with_context(|| format!("opening the telemetry engine in {}", dir.display()))?;
    let r = engine.recovery();
    tracing::info!(
        parts = r.parts,
        wal_segments = r.wal_segments,
        replayed_points = r.wal_points,
        millis = started.elapsed().as_millis() as u64,
        "telemetry engine open"
    );
    for d in &r.wal_damage {
        tracing::warn!(segment = %d.segment, offset = d.offset, skipped_bytes = d.skipped_bytes, reason = %d.reason,
            "telemetry WAL: damaged tail skipped (points after it were never acknowledged)");
    }
    for p in &r.corrupt_parts {
        tracing::error!(part = %p, "telemetry part unreadable: renamed to .corrupt and skipped");
    }
    Telemetry::start(engine, t.clone(), dir.join("settings.json"))
        .context("starting the telemetry service")
}

/// Opens `data_dir/alarms.db` (in memory without persistence) and the alarms service.
async fn open_alarms(config: &HubConfig) -> Result<Arc<ferrohub_alarms::AlarmService>> {
    let store = if config.storage.persistence {
        let path = config.data_dir.join("alarms.db");
        ferrohub_alarms::SqliteAlarmStore::open(&path, config.storage.fsync == FsyncMode::Always)
            .await
            .with_context(|| format!("opening the alarms database {}", path.display()))?
    } else {
        ferrohub_alarms::SqliteAlarmStore::in_memory()
            .await
            .context("opening the in-memory alarms store")?
    };
    ferrohub_alarms::AlarmService::open(Arc::new(store), config.alarms.service_config())
        .await
        .context("starting the alarms service")
}

/// The broker's message sink: telemetry publications go to the telemetry service on the
/// publisher's path, and their QoS 1/2 acknowledgement waits for the engine's commit.
struct TelemetrySink(Arc<Telemetry>);

impl ferrohub_adapters::mqtt::MessageSink for TelemetrySink {
    fn offer(
        &self,
        tenant: &TenantId,
        message: &Arc<ferrohub_types::Message>,
        origin: &ferrohub_adapters::mqtt::Origin,
    ) -> Option<ferrohub_adapters::mqtt::SinkWait> {
        use ferrohub_adapters::mqtt::SinkOutcome;
        let content_type = message
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref());
        let fallback = origin.device_id.as_deref().or(origin.client_id.as_deref());
        let map = |o: IngestOutcome| match o {
            IngestOutcome::Stored => SinkOutcome::Stored,
            IngestOutcome::Invalid(why) => SinkOutcome::Invalid(why),
            IngestOutcome::Busy => SinkOutcome::Busy,
            IngestOutcome::Failed(why) => SinkOutcome::Failed(why),
        };
        match self.0.offer(
            tenant,
            message.topic.as_str(),
            &message.payload,
            content_type,
            fallback,
            message.received_at as i64,
        )? {
            Offer::Ready(o) => {
                let o = map(o);
                Some(Box::pin(async move { o }))
            }
            Offer::Pending(rx) => Some(Box::pin(async move {
                match rx.await {
                    Ok(o) => map(o),
                    Err(_) => SinkOutcome::Failed("the telemetry service stopped".into()),
                }
            })),
        }
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr} (in use? try --{what}-listen 127.0.0.1:0)")
    })?;
    let local = listener.local_addr()?;
    tracing::info!(protocol = what, addr = %local, "listening");
    Ok(listener)
}

/// The static user list first (development mode, service accounts), then the device registry.
struct HubAuthenticator {
    users: StaticUsers,
    registry: Arc<Registry>,
}

impl Authenticator for HubAuthenticator {
    fn authenticate<'a>(&'a self, c: Credentials<'a>) -> BoxFuture<'a, Result<Grant, Refusal>> {
        // A client certificate always names a registered device.
        if c.certificates.is_none() {
            match self.users.check(c.username, c.password) {
                Some(true) => {
                    return Box::pin(std::future::ready(Ok(Grant {
                        tenant: TenantId::default_tenant(),
                        access: None,
                    })));
                }
                Some(false) => return Box::pin(std::future::ready(Err(Refusal::BadCredentials))),
                None => {}
            }
        }
        self.registry.authenticate(c)
    }
}

/// Makes the broker forget a decommissioned device or a deleted tenant: sessions (closing their
/// connections and dropping what was queued) and retained messages.
async fn purge_from_broker(broker: &Arc<Broker>, purge: Purge) {
    match purge {
        Purge::Device {
            tenant,
            device_id,
            client_ids,
            ..
        } => {
            for c in client_ids {
                broker.discard_session(&tenant, &c).await;
            }
            for filter in [
                format!("devices/{device_id}/#"),
                format!("$devices/{device_id}/#"),
            ] {
                broker.purge_retained(&tenant, &filter).await;
            }
        }
        Purge::Tenant(tenant) => {
            for c in broker.client_ids_in(&tenant) {
                broker.discard_session(&tenant, &c).await;
            }
            // `#` does not match `$`-topics: the reserved roots are named.
            for filter in ["#", "$devices/#", "$provisioning/#"] {
                broker.purge_retained(&tenant, filter).await;
            }
        }
    }
}

/// The twin and command services' way to devices: the broker, with the registry's exact
/// online state (anonymous clients count as online when a session named after the device is
/// connected).
struct BrokerLink {
    broker: std::sync::Weak<Broker>,
    registry: Arc<Registry>,
}

impl DeviceLink for BrokerLink {
    fn publish<'a>(
        &'a self,
        tenant: &'a str,
        topic: String,
        payload: bytes::Bytes,
        properties: Option<ferrohub_types::MessageProperties>,
    ) -> ferrohub_twins::link::BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let Some(broker) = self.broker.upgrade() else {
                return Delivery::default();
            };
            let p = broker
                .publish_from_service_with(
                    &TenantId::new(tenant),
                    &topic,
                    payload,
                    ferrohub_types::QoS::AtLeastOnce,
                    properties,
                )
                .await;
            Delivery {
                matched: p.matched,
                refused: p.refused,
            }
        })
    }

    fn is_online(&self, tenant: &str, device: &str) -> bool {
        self.registry.is_online(tenant, device)
            || self
                .broker
                .upgrade()
                .is_some_and(|b| b.is_connected(&TenantId::new(tenant), device))
    }

    fn has_subscribers(&self, tenant: &str, topic: &str) -> bool {
        self.broker
            .upgrade()
            .is_some_and(|b| b.has_subscribers(&TenantId::new(tenant), topic))
    }
}

/// The twin and command services' device side: what devices publish on `$devices/+/twin/#` and
/// `$devices/+/commands/res/#` (handled in arrival order, so that one device's updates apply in
/// order), and connects, subscriptions and deliveries (deltas and queued commands go out).
fn spawn_device_services(
    broker: &Arc<Broker>,
    api: Arc<DeviceApi>,
    mut shutdown: ferrohub_adapters::shutdown::Shutdown,
) -> JoinHandle<()> {
    let (tx, mut messages) = tokio::sync::mpsc::channel::<ServiceMessage>(65_536);
    broker.subscribe_service("$devices/+/twin/#", tx.clone());
    broker.subscribe_service("$devices/+/commands/res/#", tx);
    let (tx, mut events) = tokio::sync::mpsc::channel::<SessionEvent>(65_536);
    broker.observe_sessions(tx);
    broker.observe_deliveries("$devices/+/commands/req/#");
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    // Events in their own task: connect storms never hold up device requests, and the other
    // way round.
    let events_api = api.clone();
    let mut events_shutdown = shutdown.clone();
    let events_task = tokio::spawn(async move {
        loop {
            let e = tokio::select! {
                _ = events_shutdown.wait() => break,
                e = events.recv() => match e { Some(e) => e, None => break },
            };
            // Recorded in arrival order (before any of the device's subscriptions): whether
            // the device's current session is a fresh one decides whether commands sent to an
            // earlier session are sent again.
            if let SessionEvent::Connected {
                tenant,
                origin,
                session_present,
                ..
            } = &e
                && let Some(d) = origin.acting_device()
            {
                events_api.session_started(tenant.as_str(), d, *session_present);
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let api = events_api.clone();
            tokio::spawn(async move {
                match e {
                    SessionEvent::Connected {
                        tenant,
                        origin,
                        session_present,
                        ..
                    } => {
                        if let Some(d) = origin.acting_device() {
                            api.on_connected(tenant.as_str(), d, session_present).await;
                        }
                    }
                    SessionEvent::Subscribed {
                        tenant,
                        origin,
                        filters,
                    } => {
                        if let Some(d) = origin.acting_device() {
                            api.on_subscribed(tenant.as_str(), d, &filters).await;
                        }
                    }
                    SessionEvent::Delivered {
                        tenant,
                        origin,
                        topic,
                    } => {
                        if let Some(d) = origin.acting_device() {
                            api.on_delivered(tenant.as_str(), d, &topic).await;
                        }
                    }
                    SessionEvent::Disconnected { .. } => {}
                }
                drop(slot);
            });
        }
    });
    // Device requests in arrival order: `handle` only parses and queues (to the twin store's
    // ordered writer), answers are published by spawned tasks.
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                _ = shutdown.wait() => break,
                m = messages.recv() => match m { Some(m) => m, None => break },
            };
            api.handle(DeviceMessage {
                tenant: Arc::from(m.tenant.as_str()),
                origin_device: m.origin.device_id.clone(),
                origin_client: m.origin.client_id.clone(),
                topic: m.message.topic.as_arc().clone(),
                payload: m.message.payload.clone(),
                properties: m.message.properties.clone(),
            })
            .await;
        }
        events_task.abort();
    })
}

/// Housekeeping of twins and commands: expire queued commands past their TTL (every 5 s), delete
/// finished commands and old twin history (hourly).
fn spawn_twin_sweeper(
    twins: Arc<Twins>,
    commands: Arc<Commands>,
    mut shutdown: ferrohub_adapters::shutdown::Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = commands.sweep().await {
                tracing::warn!(error = %e, "expiring queued commands failed");
            }
            n += 1;
            // Hourly (and at start).
            if n % 720 == 1
                && let Err(e) = twins.apply_history_retention().await
            {
                tracing::warn!(error = %e, "pruning twin history failed");
            }
        }
    })
}

/// The claim-provisioning service: requests arrive on `$provisioning/+/request/+` in any
/// tenant; at most 16 are handled at once, the rest wait in a bounded queue.
fn spawn_provisioning(
    broker: Arc<Broker>,
    registry: Arc<Registry>,
    mut shutdown: ferrohub_adapters::shutdown::Shutdown,
) -> JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ServiceMessage>(1024);
    broker.subscribe_service(ferrohub_registry::provisioning::REQUEST_FILTER, tx);
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    tokio::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = shutdown.wait() => break,
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (broker, registry) = (broker.clone(), registry.clone());
            tokio::spawn(async move {
                let m = &request.message;
                if let Some((topic, answer)) = registry
                    .handle_provisioning(request.tenant.as_str(), m.topic.as_str(), &m.payload)
                    .await
                {
                    match serde_json::to_vec(&answer) {
                        Ok(payload) => {
                            broker
                                .publish_from_service(
                                    &request.tenant,
                                    &topic,
                                    payload.into(),
                                    ferrohub_types::QoS::AtLeastOnce,
                                )
                                .await
                        }
                        Err(e) => tracing::error!(error = %e, "encoding a provisioning answer"),
                    }
                }
                drop(slot);
            });
        }
    })
}

impl Hub {
    /// Starts everything `config` asks for.
    pub async fn start(config: HubConfig) -> Result<Hub> {
        if config.demo && HubConfig::addr("mqtt", &config.listeners.mqtt)?.is_none() {
            anyhow::bail!(
                "demo mode (--demo, demo = true, FERROHUB_DEMO) needs the MQTT/TCP listener: its \
                 simulated devices connect to it; set listeners.mqtt (e.g. --mqtt-listen \
                 127.0.0.1:1883) or turn demo mode off"
            );
        }
        let (store, recovered) = if config.storage.persistence {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
            let store_config = StoreConfig {
                fsync: match config.storage.fsync {
                    FsyncMode::Always => FsyncPolicy::Always,
                    FsyncMode::Never => FsyncPolicy::Never,
                },
                compact_after_bytes: config.storage.compact_after_bytes,
                ..StoreConfig::default()
            };
            let dir = config.data_dir.join("broker");
            let (store, recovered) = BrokerStore::open(&dir, store_config)
                .with_context(|| format!("opening broker state in {}", dir.display()))?;
            for w in &recovered.warnings {
                tracing::warn!(warning = %w, "broker state recovery");
            }
            tracing::info!(
                sessions = recovered.sessions.len(),
                retained = recovered.retained.len(),
                "recovered broker state"
            );
            (store, recovered)
        } else {
            tracing::warn!(
                "persistence is off: sessions and retained messages are lost on restart"
            );
            (BrokerStore::in_memory(), RecoveredState::default())
        };
        if config.allow_anonymous {
            tracing::warn!(
                "anonymous access is on (development mode): any client may connect without credentials"
            );
        }
        let registry_store = if config.storage.persistence {
            let path = config.data_dir.join("registry.db");
            SqliteStore::open(
                &path,
                SqliteOptions {
                    fsync: config.storage.fsync == FsyncMode::Always,
                },
            )
            .await
            .with_context(|| format!("opening the registry database {}", path.display()))?
        } else {
            SqliteStore::in_memory()
                .await
                .context("opening the in-memory registry")?
        };
        let registry = Registry::open(registry_store, config.registry.clone())
            .await
            .context("loading the registry")?;
        let secret = (!config.admin_token.is_empty()).then_some(config.admin_token.as_str());
        let bootstrap_token = registry
            .bootstrap_admin(secret)
            .await
            .context("creating the first admin token")?
            .filter(|_| secret.is_none());
        // Demo mode: the tenant, devices and credentials (the fleet starts once MQTT listens).
        let demo_fleet = if config.demo {
            Some(crate::demo::prepare(&registry, &config.data_dir).await?)
        } else {
            None
        };
        let auth = AuthConfig {
            authenticator: Arc::new(HubAuthenticator {
                users: StaticUsers::new(
                    config
                        .users
                        .iter()
                        .map(|u| (u.username.clone(), u.password.clone())),
                    config.allow_anonymous,
                ),
                registry: registry.clone(),
            }),
            methods: Vec::new(),
        };
        let twin_store =
            ferrohub_twins::store::SqliteTwinStore::open(&ferrohub_twins::store::StoreConfig {
                path: config
                    .storage
                    .persistence
                    .then(|| config.data_dir.join("twins.db")),
                cache_entries: config.twins.cache_entries,
                cache_bytes: config.twins.cache_mib << 20,
                fsync: config.storage.fsync == FsyncMode::Always,
                ..Default::default()
            })
            .with_context(|| {
                format!(
                    "opening the twin database {}",
                    config.data_dir.join("twins.db").display()
                )
            })?;
        let twin_store = Arc::new(twin_store);
        let twins = Twins::new(twin_store.clone(), config.twins.clone());
        let commands = Commands::new(twin_store, config.commands.clone());
        let telemetry = if config.telemetry.enabled {
            Some(open_telemetry(&config).await?)
        } else {
            None
        };
        let (trigger, shutdown) = Shutdown::new();
        let broker = Broker::new(
            config.mqtt.clone(),
            auth,
            store,
            recovered,
            shutdown.clone(),
        );
        let rules_store = if config.storage.persistence {
            let path = config.data_dir.join("rules.db");
            ferrohub_rules_service::SqliteRuleStore::open(
                &path,
                config.storage.fsync == FsyncMode::Always,
            )
            .await
            .with_context(|| format!("opening the rules database {}", path.display()))?
        } else {
            ferrohub_rules_service::SqliteRuleStore::in_memory()
                .await
                .context("opening the in-memory rules store")?
        };
        let alarms = open_alarms(&config).await?;
        let rules_hub = Arc::new(crate::rules_link::RulesHub {
            broker: Arc::downgrade(&broker),
            registry: registry.clone(),
            twins: twins.clone(),
            commands: commands.clone(),
            telemetry: telemetry.clone(),
            alarms: alarms.clone(),
        });
        let rules = ferrohub_rules_service::RulesService::new(
            Arc::new(rules_store),
            rules_hub.clone(),
            config.rules.service_config(),
        );
        broker.set_tap(Arc::new(crate::rules_link::RulesTap(rules.clone())));
        crate::rules_link::forget_changed_twins(&twins, rules.clone());
        {
            let b = Arc::downgrade(&broker);
            registry.set_kicker(Arc::new(move |tenant: &TenantId, client_id: &str| {
                if let Some(b) = b.upgrade() {
                    b.kick_client(tenant, client_id, Kick::NotAuthorized);
                }
            }));
            let b = Arc::downgrade(&broker);
            let t = twins.clone();
            let tm = telemetry.clone();
            let rl = rules.clone();
            let al = alarms.clone();
            registry.set_purger(Arc::new(move |purge: Purge| {
                let b = b.upgrade();
                let t = t.clone();
                let tm = tm.clone();
                let rl = rl.clone();
                let al = al.clone();
                Box::pin(async move {
                    // A deleted tenant's alarms, history and channels go with it.
                    if let Purge::Tenant(tenant) = &purge
                        && let Err(e) = al.forget_tenant(tenant.as_str()).await
                    {
                        tracing::error!(error = %e, "deleting a tenant's alarms failed");
                    }
                    // A deleted tenant's rules stop and go (a tenant created later under the
                    // same id starts with none).
                    if let Purge::Tenant(tenant) = &purge
                        && let Err(e) = rl.forget_tenant(tenant.as_str()).await
                    {
                        tracing::error!(error = %e, "deleting a tenant's rules failed");
                    }
                    // A decommissioned device's telemetry goes with it when its tenant says
                    // so (hidden at once, deleted from disk by the engine's maintainer); kept
                    // points stay until the tenant's retention deletes their days.
                    if let (
                        Purge::Device {
                            tenant,
                            device_id,
                            telemetry: TelemetryOnDecommission::Purge,
                            ..
                        },
                        Some(tm),
                    ) = (&purge, &tm)
                    {
                        let engine = tm.engine().clone();
                        let (tenant, device) = (tenant.clone(), device_id.clone());
                        let r = tokio::task::spawn_blocking(move || engine.purge_device(&tenant, &device)).await;
                        if !matches!(r, Ok(Ok(_))) {
                            tracing::error!(result = ?r, "deleting a decommissioned device's telemetry failed");
                        }
                    }
                    // A deleted tenant's telemetry goes with it.
                    if let (Purge::Tenant(tenant), Some(tm)) = (&purge, tm) {
                        if let Err(e) = tm.forget_tenant(tenant) {
                            tracing::error!(error = %e, "deleting a tenant's telemetry settings failed");
                        }
                        let engine = tm.engine().clone();
                        let tenant = tenant.clone();
                        let r = tokio::task::spawn_blocking(move || engine.purge_tenant(&tenant)).await;
                        if !matches!(r, Ok(Ok(()))) {
                            tracing::error!(result = ?r, "deleting a tenant's telemetry failed");
                        }
                    }
                    let (tenant, device) = match &purge {
                        Purge::Device {
                            tenant, device_id, ..
                        } => (tenant.as_str().to_string(), Some(device_id.clone())),
                        Purge::Tenant(tenant) => (tenant.as_str().to_string(), None),
                    };
                    // Sessions first: once the device's connections are gone it cannot write
                    // its twin again behind the purge.
                    if let Some(b) = b {
                        purge_from_broker(&b, purge).await;
                    }
                    if let Err(e) = t.purge(&tenant, device.as_deref()).await {
                        tracing::error!(error = %e, tenant, device, "deleting twins and commands failed");
                    }
                })
            }));
        }
        if let Some(t) = &telemetry {
            broker.set_sink(Arc::new(TelemetrySink(t.clone())));
        }
        let link: Arc<dyn DeviceLink> = Arc::new(BrokerLink {
            broker: Arc::downgrade(&broker),
            registry: registry.clone(),
        });
        twins.set_link(link.clone());
        commands.set_link(link.clone());
        let mut tasks = Vec::new();
        {
            let mut sd = shutdown.clone();
            tasks.push(
                rules
                    .start(async move { sd.wait().await })
                    .await
                    .context("starting the rules service")?,
            );
        }
        {
            let mut sd = shutdown.clone();
            tasks.push(alarms.start(async move { sd.wait().await }));
        }
        {
            let mut sd = shutdown.clone();
            tasks.push(registry.spawn_background(async move { sd.wait().await }));
        }
        let device_api = DeviceApi::new(twins.clone(), commands.clone(), link);
        tasks.push(spawn_device_services(
            &broker,
            device_api.clone(),
            shutdown.clone(),
        ));
        tasks.push(spawn_twin_sweeper(
            twins.clone(),
            commands.clone(),
            shutdown.clone(),
        ));
        tasks.push(spawn_provisioning(
            broker.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
        let l = &config.listeners;
        let mut hub_addrs = [None; 4];
        if let Some(addr) = HubConfig::addr("mqtt", &l.mqtt)? {
            let listener = bind("mqtt", addr).await?;
            hub_addrs[0] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::Tcp,
            )));
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file)
            && let Some(addr) = HubConfig::addr("mqtts", &l.mqtts)?
        {
            let cert_pem = std::fs::read(cert)
                .with_context(|| format!("reading tls.cert_file {}", cert.display()))?;
            let key_pem = std::fs::read(key)
                .with_context(|| format!("reading tls.key_file {}", key.display()))?;
            let ca_pem = match &config.tls.client_ca_file {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("reading tls.client_ca_file {}", p.display()))?,
                ),
                None => None,
            };
            if let Some(ca_pem) = &ca_pem {
                let ca_pem =
                    std::str::from_utf8(ca_pem).context("tls.client_ca_file is not PEM")?;
                // A bundle: every certificate in it is a trusted CA of the default tenant.
                const END: &str = "-----END CERTIFICATE-----";
                let blocks: Vec<&str> = ca_pem
                    .split_inclusive(END)
                    .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
                    .collect();
                anyhow::ensure!(
                    !blocks.is_empty(),
                    "tls.client_ca_file holds no PEM certificate"
                );
                for (i, block) in blocks.iter().enumerate() {
                    registry
                        .trust_store()
                        .set(TenantId::DEFAULT, &format!("config-client-ca-{i}"), block)
                        .with_context(|| {
                            format!("loading certificate {} of tls.client_ca_file", i + 1)
                        })?;
                }
            }
            let verifier = registry
                .trust_store()
                .client_verifier(config.tls.require_client_cert);
            let acceptor = tls_acceptor_with_verifier(&cert_pem, &key_pem, verifier)
                .context("building the TLS configuration")?;
            let listener = bind("mqtts", addr).await?;
            hub_addrs[1] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::Tls(acceptor),
            )));
        }
        if let Some(addr) = HubConfig::addr("ws", &l.ws)? {
            let listener = bind("ws", addr).await?;
            hub_addrs[2] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::WebSocket,
            )));
        }
        let ready = Arc::new(AtomicBool::new(false));
        if let Some(addr) = HubConfig::addr("http", &l.http)? {
            let listener = bind("http", addr).await?;
            hub_addrs[3] = Some(listener.local_addr()?);
            let b = broker.clone();
            let state = ferrohub_api::ApiState {
                registry: Some(registry.clone()),
                twins: Some(twins.clone()),
                commands: Some(commands.clone()),
                telemetry: telemetry.clone(),
                broker: {
                    let m = broker.metrics.clone();
                    Some(Arc::new(move || ferrohub_api::BrokerFigures {
                        connections: m.connections.load(Ordering::Relaxed).max(0) as u64,
                        messages_received: m.received_total(),
                        messages_sent: m.sent_total(),
                    }))
                },
                rules: Some(rules.clone()),
                alarms: Some(alarms.clone()),
                tails: Some(Arc::new(BrokerTails(broker.clone()))),
                broker_view: Some(Arc::new(crate::broker_view::HubBrokerView(broker.clone()))),
                ready: ready.clone(),
                metrics: {
                    let r = registry.clone();
                    let (t, c, d) = (twins.clone(), commands.clone(), device_api.clone());
                    let tm = telemetry.clone();
                    let rl = rules.clone();
                    let al = alarms.clone();
                    Arc::new(move |out: &mut String| {
                        rl.render_metrics(out);
                        al.render_metrics(out);
                        b.render_metrics(out);
                        r.metrics.render(out);
                        t.render_metrics(out);
                        c.render_metrics(out);
                        if let Some(tm) = &tm {
                            tm.render_metrics(out);
                        }
                        use std::fmt::Write;
                        let _ = writeln!(
                            out,
                            "# HELP ferrohub_device_requests_dropped_total Twin and command requests from devices dropped because too many were in progress.\n\
                             # TYPE ferrohub_device_requests_dropped_total counter\n\
                             ferrohub_device_requests_dropped_total {}",
                            d.dropped()
                        );
                    })
                },
            };
            let mut sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) =
                    ferrohub_api::serve(listener, ferrohub_api::router(state), async move {
                        sd.wait().await
                    })
                    .await
                {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }));
        }
        if let Some(t) = spawn_sys_publisher(broker.clone()) {
            tasks.push(t);
        }
        if let (Some(fleet_file), Some(mqtt)) = (demo_fleet, hub_addrs[0]) {
            tasks.push(crate::demo::spawn(mqtt, fleet_file, shutdown.clone())?);
        }
        ready.store(true, Ordering::Relaxed);
        Ok(Hub {
            mqtt_addr: hub_addrs[0],
            mqtts_addr: hub_addrs[1],
            ws_addr: hub_addrs[2],
            http_addr: hub_addrs[3],
            broker,
            registry,
            twins,
            commands,
            telemetry,
            rules,
            alarms,
            bootstrap_token,
            trigger,
            tasks,
        })
    }

    /// Graceful shutdown: stop accepting, disconnect clients (v5: reason Server shutting down),
    /// persist state, stop every task.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.trigger.trigger();
        self.broker
            .shutdown_gracefully(Duration::from_secs(5))
            .await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // The disconnects of the shutdown itself (reason server_shutdown) happened after the
        // registry's background flush stopped.
        self.registry.flush_connectivity().await;
        if let Some(t) = self.telemetry {
            // Seal the head into parts so the next start has no WAL to replay.
            let engine = t.engine().clone();
            drop(t);
            let _ = tokio::task::spawn_blocking(move || engine.close()).await;
        }
        tracing::info!("stopped");
    }
}

/// The console's device message tails over the broker's per-device watches.
struct BrokerTails(Arc<Broker>);

impl ferrohub_api::DeviceTails for BrokerTails {
    fn watch(
        &self,
        tenant: &str,
        device: &str,
        capacity: usize,
    ) -> Result<ferrohub_api::TailStream, ferrohub_api::TailRefused> {
        let (rx, guard) = self
            .0
            .watch_device(&TenantId::new(tenant), device, capacity)
            .map_err(|_| {
                ferrohub_api::TailRefused::TooMany(ferrohub_adapters::mqtt::MAX_WATCHERS)
            })?;
        // The guard lives in the stream: the watch ends when the HTTP response is dropped.
        let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let m = rx.recv().await?;
            let skipped_before = rx.take_skipped();
            let message = ferrohub_api::TailMessage {
                topic: m.topic,
                payload: m.payload,
                size: m.size,
                qos: m.qos as u8,
                retain: m.retain,
                inbound: m.direction == ferrohub_adapters::mqtt::Direction::In,
                at: m.at,
                skipped_before,
            };
            Some((message, (rx, guard)))
        });
        Ok(Box::pin(stream))
    }
}
