//! The registry service: operator actions (validated, audited, scoped by tenant) and the device
//! authentication and authorization that every adapter calls.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ferrohub_types::TenantId;
use ferrohub_types::auth::{
    Access, Admission, Authenticator, BoxFuture, Credentials, Grant, Refusal,
};
use ferrohub_types::lifecycle::DisconnectReason;
use hashbrown::{HashMap, HashSet};
use parking_lot::{Mutex, RwLock};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{Semaphore, mpsc};

use crate::error::{RegistryError, Result};
use crate::jwt::{self, TokenSigner, VerificationKey};
use crate::model::*;
use crate::password::{self, PasswordParams, VerifiedCache};
use crate::pki::{CertInfo, CertificateAuthority, IdentitySource, IssueRequest, TrustStore};
use crate::policy::{CertVars, CompiledPolicy, PolicyDocument, PolicyVars};
use crate::store::{
    ConnectivityEventRecord, ConnectivityUpdate, DocKind, RegistryStore, RevokedCert, SqliteStore,
};
use crate::throttle::{Backoff, BackoffConfig, TokenBucket};

/// Registry settings (the `[registry]` section of the hub's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// argon2id cost of device passwords.
    pub password: PasswordParams,
    /// Back-off after failed authentication, per source address and per device id.
    pub auth_backoff: BackoffConfig,
    /// Audit events older than this many days are deleted (0 keeps them forever).
    pub audit_retention_days: u32,
    /// Validity of certificates the hub issues, in days.
    pub cert_validity_days: u32,
    /// Clock skew allowed on device JWTs, in seconds.
    pub jwt_leeway_secs: u64,
    /// Password verifications (argon2id) running at once; further connects wait.
    pub max_concurrent_hashes: usize,
    /// Successful password checks remembered so that reconnects skip argon2id.
    pub verified_cache_entries: usize,
    /// Allow `http://` approval webhooks (default: https only).
    pub allow_http_webhooks: bool,
    /// Connects and disconnects kept per device in its connectivity history (the oldest go
    /// first); 0 keeps none.
    pub connectivity_history: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            password: PasswordParams::default(),
            auth_backoff: BackoffConfig::default(),
            audit_retention_days: 365,
            cert_validity_days: 365,
            jwt_leeway_secs: 60,
            max_concurrent_hashes: 4,
            verified_cache_entries: 200_000,
            allow_http_webhooks: false,
            connectivity_history: 100,
        }
    }
}

/// Who is acting on the registry: an operator token, or the hub itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Actor {
    /// `token:<id>`, `system`, `device:<tenant>/<id>`.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenant scope; `None` = platform-wide.
    pub tenant: Option<String>,
    /// Remote address.
    pub source: Option<String>,
}

impl Actor {
    /// The hub itself (bootstrap, just-in-time registration).
    pub fn system() -> Actor {
        Actor {
            name: "system".into(),
            role: Role::Admin,
            tenant: None,
            source: None,
        }
    }

    /// Fails unless the actor may act with `role` in `tenant`.
    pub fn require(&self, role: Role, tenant: Option<&str>) -> Result<()> {
        if self.role < role {
            return Err(RegistryError::Forbidden(format!(
                "this needs the {} role; the token has {}",
                role.as_str(),
                self.role.as_str()
            )));
        }
        match (&self.tenant, tenant) {
            (None, _) => Ok(()),
            (Some(mine), Some(t)) if mine == t => Ok(()),
            // Out-of-scope tenants look like missing ones: no oracle across tenants.
            (Some(_), Some(t)) => Err(RegistryError::NotFound(format!("tenant {t}"))),
            (Some(_), None) => Err(RegistryError::Forbidden(
                "this needs a platform-wide admin token".into(),
            )),
        }
    }
}

/// Counters exported to Prometheus.
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    /// Successful device authentications.
    pub auth_success: AtomicU64,
    /// Failed device authentications (bad or unknown credentials).
    pub auth_failure: AtomicU64,
    /// Connections refused while the source or device was backing off.
    pub auth_throttled: AtomicU64,
    /// Connections refused by the tenant connection quota.
    pub connection_quota_refused: AtomicU64,
    /// Publishes refused by a message or byte quota.
    pub publish_quota_refused: AtomicU64,
    /// Password checks that ran argon2id (cache misses).
    pub password_hashes: AtomicU64,
    /// Security audit events dropped because the audit queue was full.
    pub audit_dropped: AtomicU64,
    /// Connectivity history events dropped because too many waited for the next flush.
    pub connectivity_events_dropped: AtomicU64,
}

impl RegistryMetrics {
    /// Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ferrohub_auth_total Device authentications by result.\n# TYPE ferrohub_auth_total counter\n\
             ferrohub_auth_total{{result=\"success\"}} {}\nferrohub_auth_total{{result=\"failure\"}} {}\n\
             ferrohub_auth_total{{result=\"throttled\"}} {}",
            g(&self.auth_success),
            g(&self.auth_failure),
            g(&self.auth_throttled)
        );
        let _ = writeln!(
            out,
            "# HELP ferrohub_quota_exceeded_total Refusals by quota.\n# TYPE ferrohub_quota_exceeded_total counter\n\
             ferrohub_quota_exceeded_total{{quota=\"connections\"}} {}\nferrohub_quota_exceeded_total{{quota=\"publish_rate\"}} {}",
            g(&self.connection_quota_refused),
            g(&self.publish_quota_refused)
        );
        let _ = writeln!(
            out,
            "# HELP ferrohub_password_hashes_total argon2id verifications run (verified-cache misses).\n\
             # TYPE ferrohub_password_hashes_total counter\nferrohub_password_hashes_total {}",
            g(&self.password_hashes)
        );
        let _ = writeln!(
            out,
            "# HELP ferrohub_audit_dropped_total Security events not written because the audit queue was full.\n\
             # TYPE ferrohub_audit_dropped_total counter\nferrohub_audit_dropped_total {}",
            g(&self.audit_dropped)
        );
        let _ = writeln!(
            out,
            "# HELP ferrohub_connectivity_events_dropped_total Connectivity history events not written because too many waited for the next flush.\n\
             # TYPE ferrohub_connectivity_events_dropped_total counter\nferrohub_connectivity_events_dropped_total {}",
            g(&self.connectivity_events_dropped)
        );
    }
}

/// Runtime state of a tenant: settings, quota buckets, connection count, token keys.
struct TenantRuntime {
    tenant: Tenant,
    /// Shared across reloads of the tenant's settings (and held by live connections).
    limits: Arc<TenantLimits>,
    signer: Option<Arc<TokenSigner>>,
    jwt_keys: Vec<VerificationKey>,
}

/// A tenant's live limits: its connection count and its rate buckets. One per tenant for the
/// hub's life, so that changing settings neither resets the count nor refills the buckets, and
/// connected devices see new rates at once.
#[derive(Default)]
struct TenantLimits {
    connections: AtomicU32,
    /// Whether any tenant rate is set (read on every publish without touching the lock).
    limited: AtomicBool,
    buckets: RwLock<Option<Arc<RateBuckets>>>,
}

impl TenantLimits {
    fn set_rates(&self, rates: (u32, u64)) {
        let mut b = self.buckets.write();
        if b.as_ref().is_some_and(|b| b.rates == rates) {
            return;
        }
        *b = RateBuckets::new(rates).map(Arc::new);
        self.limited.store(b.is_some(), Ordering::Relaxed);
    }
}

/// Message and byte buckets for a rate pair `(messages/s, bytes/s)`; 0 = unlimited. A device's
/// are shared by its connections and kept across reconnects, so that reconnecting does not buy
/// a fresh burst.
struct RateBuckets {
    rates: (u32, u64),
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl RateBuckets {
    fn new(rates: (u32, u64)) -> Option<RateBuckets> {
        (rates != (0, 0)).then(|| RateBuckets {
            rates,
            messages: (rates.0 > 0).then(|| TokenBucket::per_second(u64::from(rates.0))),
            bytes: (rates.1 > 0).then(|| TokenBucket::per_second(rates.1)),
        })
    }
}

/// Takes from every bucket or from none (what was taken is given back on a refusal).
fn take_all(charges: &[(Option<&TokenBucket>, u64)]) -> bool {
    for (i, (bucket, units)) in charges.iter().enumerate() {
        if let Some(b) = bucket
            && !b.try_take(*units)
        {
            for (earlier, units) in &charges[..i] {
                if let Some(e) = earlier {
                    e.give_back(*units);
                }
            }
            return false;
        }
    }
    true
}

const DEVICE_QUOTAS_MAX: usize = 100_000;

/// What authentication needs to know about a device, cached.
struct DeviceAuth {
    device: Device,
    credentials: Vec<Credential>,
}

/// Stored hub signing key of a tenant.
#[derive(Serialize, Deserialize)]
struct SigningKeyDoc {
    private_pem: String,
}

/// Stored verification keys registered by a tenant.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug, utoipa::ToSchema)]
pub struct TokenKeyDoc {
    /// A PEM public key.
    pub pem: Option<String>,
    /// A JWK set (JSON).
    pub jwks: Option<String>,
}

const HUB_SIGNER: &str = "hub-signer";
const DEVICE_CACHE_MAX: usize = 100_000;
const AUDIT_QUEUE: usize = 10_000;
/// Connectivity events waiting for the next flush; beyond this the oldest are dropped (and
/// counted), so that a reconnect storm while the database is slow cannot exhaust memory.
const PENDING_EVENTS_MAX: usize = 100_000;

type LiveKey = (String, String);

/// Connectivity recorded in memory since the last flush.
#[derive(Default)]
struct PendingConnectivity {
    /// Per device, the changes to its [`Connectivity`] (see [`Connectivity::apply`]).
    states: HashMap<LiveKey, Connectivity>,
    /// History events, oldest first.
    events: VecDeque<PendingEvent>,
}

impl PendingConnectivity {
    fn forget(&mut self, matches: impl Fn(&LiveKey) -> bool) {
        self.states.retain(|k, _| !matches(k));
        self.events.retain(|e| !matches(&e.key));
    }
}

/// A connect or disconnect waiting for the next flush (compact: no strings but the key and the
/// client id).
struct PendingEvent {
    key: LiveKey,
    at: Millis,
    kind: ConnectivityEventKind,
    reason: Option<DisconnectReason>,
    client_id: String,
    peer: SocketAddr,
    protocol: &'static str,
}

impl PendingEvent {
    fn into_record(self) -> ConnectivityEventRecord {
        ConnectivityEventRecord {
            tenant: self.key.0,
            device_id: self.key.1,
            event: ConnectivityEvent {
                seq: 0,
                at: self.at,
                event: self.kind,
                reason: self.reason.map(|r| r.as_str().to_string()),
                client_id: Some(self.client_id),
                remote_addr: Some(self.peer.to_string()),
                protocol: Some(self.protocol.to_string()),
            },
        }
    }
}

/// The registry: one per hub.
pub struct Registry {
    store: SqliteStore,
    config: RegistryConfig,
    trust: Arc<TrustStore>,
    tenants: RwLock<HashMap<String, Arc<TenantRuntime>>>,
    devices: Mutex<HashMap<LiveKey, Arc<DeviceAuth>>>,
    verified: VerifiedCache,
    failures_by_addr: Backoff<IpAddr>,
    failures_by_device: Backoff<LiveKey>,
    revoked: RwLock<HashSet<LiveKey>>,
    live: Mutex<HashMap<LiveKey, Vec<Weak<DeviceAccess>>>>,
    pending_connectivity: Mutex<PendingConnectivity>,
    device_quotas: Mutex<HashMap<LiveKey, Arc<RateBuckets>>>,
    provisioning_in_flight: Mutex<HashSet<String>>,
    /// Bumped by every change that can invalidate a cached device or a connect in progress.
    cache_generation: AtomicU64,
    hashing: Semaphore,
    audit_tx: mpsc::Sender<AuditEvent>,
    audit_rx: Mutex<Option<mpsc::Receiver<AuditEvent>>>,
    kicker: OnceLock<Kicker>,
    purger: OnceLock<Purger>,
    ca_creation: tokio::sync::Mutex<()>,
    /// Itself, for the access objects it hands out (they report disconnections back).
    me: Weak<Registry>,
    /// Prometheus counters.
    pub metrics: RegistryMetrics,
}

/// Tells the broker to close a client's connection: `(tenant, client_id)`.
pub type Kicker = Arc<dyn Fn(&TenantId, &str) + Send + Sync>;

/// What the broker must forget when a device or a tenant goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// A decommissioned device: these client ids' sessions (closed, queued messages and all)
    /// and the retained messages under its topics.
    Device {
        /// The tenant.
        tenant: TenantId,
        /// The device id.
        device_id: String,
        /// Client ids whose sessions go.
        client_ids: Vec<String>,
        /// What the tenant does with a decommissioned device's telemetry.
        telemetry: TelemetryOnDecommission,
    },
    /// A deleted tenant: every session and retained message in it.
    Tenant(TenantId),
}

/// Carries out a [`Purge`] in the broker (wired by the hub); awaited before the registry
/// answers, so that nothing of a deleted device or tenant outlives the acknowledgement.
pub type Purger = Arc<dyn Fn(Purge) -> BoxFuture<'static, ()> + Send + Sync>;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn random_id(prefix: &str) -> String {
    let bytes: [u8; 8] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

fn identity_source(f: CertIdentityField) -> IdentitySource {
    match f {
        CertIdentityField::Cn => IdentitySource::CommonName,
        CertIdentityField::DnsSan => IdentitySource::DnsSan,
        CertIdentityField::UriSan => IdentitySource::UriSan,
    }
}

/// A provisioning request being handled; removes its mark when dropped.
pub(crate) struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// Seconds from an API request as milliseconds, capped at 100 years (no overflow).
fn secs_to_millis(secs: u64) -> Millis {
    const CAP: u64 = 100 * 365 * 86_400;
    (secs.min(CAP) as i64) * 1000
}

/// Splits an MQTT user name into tenant and device: `tenant/device`, or `device` in the default
/// tenant.
pub fn split_username(username: &str) -> (&str, &str) {
    match username.split_once('/') {
        Some((t, d)) => (t, d),
        None => (TenantId::DEFAULT, username),
    }
}

impl Registry {
    /// Opens the registry on `store`, loads tenants, CAs and revocations, and makes sure the
    /// default tenant exists.
    pub async fn open(store: SqliteStore, config: RegistryConfig) -> Result<Arc<Registry>> {
        let (audit_tx, audit_rx) = mpsc::channel(AUDIT_QUEUE);
        let registry = Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            store,
            trust: Arc::new(TrustStore::new()),
            tenants: RwLock::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            verified: VerifiedCache::new(config.verified_cache_entries.max(1)),
            failures_by_addr: Backoff::new(config.auth_backoff),
            failures_by_device: Backoff::new(config.auth_backoff),
            revoked: RwLock::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            pending_connectivity: Mutex::new(PendingConnectivity::default()),
            device_quotas: Mutex::new(HashMap::new()),
            cache_generation: AtomicU64::new(0),
            provisioning_in_flight: Mutex::new(HashSet::new()),
            hashing: Semaphore::new(config.max_concurrent_hashes.max(1)),
            audit_tx,
            audit_rx: Mutex::new(Some(audit_rx)),
            kicker: OnceLock::new(),
            purger: OnceLock::new(),
            ca_creation: tokio::sync::Mutex::new(()),
            metrics: RegistryMetrics::default(),
            config,
        });
        if registry.store.tenant(TenantId::DEFAULT).await?.is_none() {
            registry
                .store
                .create_tenant(&Tenant {
                    id: TenantId::DEFAULT.into(),
                    name: "Default tenant".into(),
                    settings: TenantSettings::default(),
                    created_at: now_millis(),
                })
                .await?;
        }
        for t in registry.store.tenants().await? {
            registry.load_tenant(t).await?;
        }
        for (name, ca) in registry.store.docs::<CaRecord>(None, DocKind::Ca).await? {
            if let Err(e) = registry.trust.set(&ca.tenant, &name, &ca.cert_pem) {
                tracing::warn!(tenant = %ca.tenant, ca = %name, error = %e, "stored CA not loaded");
            }
        }
        let revoked = registry.store.revoked_certs().await?;
        registry
            .revoked
            .write()
            .extend(revoked.into_iter().map(|r| (r.tenant, r.fingerprint)));
        registry.store.reset_online().await?;
        // Fail at start, not on the first connect, when the password settings cannot hash (the
        // stand-in hash for unknown devices keeps their answers as slow as real ones).
        registry
            .config
            .password
            .validate()
            .map_err(|e| RegistryError::Invalid(format!("registry.password: {e}")))?;
        if registry.dummy_hash().await.is_empty() {
            return Err(RegistryError::Invalid(
                "registry.password: these argon2id parameters cannot hash".into(),
            ));
        }
        Ok(registry)
    }

    /// The settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Marks a provisioning request in flight; `None` when the same one already is. The mark
    /// goes when the returned guard is dropped.
    pub(crate) fn begin_provisioning(
        &self,
        tenant: &str,
        template: &str,
        client_id: &str,
    ) -> Option<InFlight<'_>> {
        let key = format!("{tenant}\u{0}{template}\u{0}{client_id}");
        self.provisioning_in_flight
            .lock()
            .insert(key.clone())
            .then_some(InFlight {
                set: &self.provisioning_in_flight,
                key,
            })
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The CAs trusted for device certificates, for the TLS listener's client verifier.
    pub fn trust_store(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// Sets how the registry closes connections (wired by the hub to the broker).
    pub fn set_kicker(&self, kicker: Kicker) {
        let _ = self.kicker.set(kicker);
    }

    /// Sets how the broker forgets decommissioned devices and deleted tenants (wired by the hub).
    pub fn set_purger(&self, purger: Purger) {
        let _ = self.purger.set(purger);
    }

    async fn purge(&self, purge: Purge) {
        if let Some(p) = self.purger.get() {
            p(purge).await;
        }
    }

    /// Marks connections revoked without kicking them: a purge closes them and waits.
    fn revoke_live_quietly(&self, matches: impl Fn(&LiveKey) -> bool) {
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        let live = self.live.lock();
        for (k, v) in live.iter() {
            if matches(k) {
                for a in v.iter().filter_map(Weak::upgrade) {
                    a.revoked.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Starts the background work: connectivity flushes, the security-audit writer and audit
    /// retention. Ends when `shutdown` resolves, after a last flush.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        let rx = self.audit_rx.lock().take();
        tokio::spawn(async move {
            let mut rx = rx;
            let mut flush = tokio::time::interval(Duration::from_secs(1));
            let mut retention = tokio::time::interval(Duration::from_secs(3600));
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = flush.tick() => registry.flush_connectivity().await,
                    _ = retention.tick() => registry.apply_audit_retention().await,
                    Some(first) = async {
                        match rx.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let mut batch = vec![first];
                        if let Some(rx) = rx.as_mut() {
                            while batch.len() < 1000 {
                                match rx.try_recv() {
                                    Ok(e) => batch.push(e),
                                    Err(_) => break,
                                }
                            }
                        }
                        if let Err(e) = registry.store.append_audit(&batch).await {
                            tracing::error!(error = %e, "writing security audit events failed");
                        }
                    }
                }
            }
            if let Some(rx) = rx.as_mut() {
                let mut batch = Vec::new();
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                let _ = registry.store.append_audit(&batch).await;
            }
            registry.flush_connectivity().await;
        })
    }

    /// Writes pending connectivity changes and history events (one transaction).
    pub async fn flush_connectivity(&self) {
        let (mut pending, events) = {
            let mut p = self.pending_connectivity.lock();
            let states: Vec<ConnectivityUpdate> = p
                .states
                .drain()
                .map(|((tenant, device_id), state)| ConnectivityUpdate {
                    tenant,
                    device_id,
                    state,
                })
                .collect();
            (states, std::mem::take(&mut p.events))
        };
        let events: Vec<ConnectivityEventRecord> =
            events.into_iter().map(PendingEvent::into_record).collect();
        // Online is whatever `live` says now: connects and disconnects of the same device may
        // have recorded their changes out of order.
        {
            let live = self.live.lock();
            for u in &mut pending {
                u.state.online = live
                    .get(&(u.tenant.clone(), u.device_id.clone()))
                    .is_some_and(|v| v.iter().any(|w| w.strong_count() > 0));
            }
        }
        if let Err(e) = self
            .store
            .record_connectivity(&pending, &events, self.config.connectivity_history)
            .await
        {
            tracing::warn!(error = %e, events = events.len(), "persisting device connectivity failed");
        }
    }

    async fn apply_audit_retention(&self) {
        if self.config.audit_retention_days == 0 {
            return;
        }
        let cutoff = now_millis() - i64::from(self.config.audit_retention_days) * 86_400_000;
        match self.store.purge_audit(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "audit retention applied"),
            Err(e) => tracing::warn!(error = %e, "audit retention failed"),
        }
    }

    async fn load_tenant(&self, t: Tenant) -> Result<Arc<TenantRuntime>> {
        let signer = match self
            .store
            .doc::<SigningKeyDoc>(&t.id, DocKind::TokenKey, HUB_SIGNER)
            .await?
        {
            Some(doc) => Some(Arc::new(
                TokenSigner::from_pkcs8_pem(&doc.private_pem)
                    .map_err(|e| RegistryError::Corrupt(e.to_string()))?,
            )),
            None => None,
        };
        let mut jwt_keys = Vec::new();
        for (name, doc) in self
            .store
            .docs::<serde_json::Value>(Some(&t.id), DocKind::TokenKey)
            .await?
        {
            if name == HUB_SIGNER {
                continue;
            }
            let Ok(doc) = serde_json::from_value::<TokenKeyDoc>(doc) else {
                continue;
            };
            jwt_keys.extend(parse_token_keys(&doc).unwrap_or_default());
        }
        let q = &t.settings.quotas;
        let limits = self
            .tenants
            .read()
            .get(&t.id)
            .map(|old| old.limits.clone())
            .unwrap_or_default();
        limits.set_rates((q.tenant_messages_per_sec, q.tenant_bytes_per_sec));
        let rt = Arc::new(TenantRuntime {
            limits,
            signer,
            jwt_keys,
            tenant: t,
        });
        self.tenants
            .write()
            .insert(rt.tenant.id.clone(), rt.clone());
        Ok(rt)
    }

    fn tenant_runtime(&self, tenant: &str) -> Option<Arc<TenantRuntime>> {
        self.tenants.read().get(tenant).cloned()
    }

    // ---- audit ------------------------------------------------------------------------------

    /// Records an administrative event (awaited: the action is not done until it is logged).
    pub async fn audit(
        &self,
        actor: &Actor,
        tenant: Option<&str>,
        action: &str,
        target: &str,
        result: AuditResult,
        detail: serde_json::Value,
    ) -> Result<()> {
        self.store
            .append_audit(&[AuditEvent {
                seq: 0,
                at: now_millis(),
                actor: actor.name.clone(),
                tenant: tenant.map(str::to_string),
                action: action.into(),
                target: target.into(),
                source: actor.source.clone(),
                result,
                detail,
            }])
            .await
    }

    /// Records a successful administrative action in a tenant, without details.
    async fn audit_ok(
        &self,
        actor: &Actor,
        tenant: &str,
        action: &str,
        target: &str,
    ) -> Result<()> {
        self.audit(
            actor,
            Some(tenant),
            action,
            target,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await
    }

    /// The named document, or `Invalid("{what} {name} does not exist")`: for references a
    /// request makes to a type, policy, group or template.
    async fn require_doc<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &str,
        kind: DocKind,
        what: &str,
        name: &str,
    ) -> Result<T> {
        self.store
            .doc(tenant, kind, name)
            .await?
            .ok_or_else(|| RegistryError::Invalid(format!("{what} {name} does not exist")))
    }

    /// The documents of a kind in a tenant.
    async fn docs_of<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &str,
        kind: DocKind,
    ) -> Result<Vec<T>> {
        Ok(self
            .store
            .docs(Some(tenant), kind)
            .await?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    /// Records a security event from the connect path without waiting (bounded queue).
    fn security_event(&self, tenant: &str, action: &str, target: &str, source: &str, detail: &str) {
        // Anyone can attempt a connect: only real tenants get the event in their log (others
        // land in the platform's), and what the client chose to send is cut short.
        let tenant = self.tenant_runtime(tenant).map(|_| tenant.to_string());
        let target: String = target.chars().take(128).collect();
        let event = AuditEvent {
            seq: 0,
            at: now_millis(),
            actor: format!("device:{}/{target}", tenant.as_deref().unwrap_or("?")),
            tenant,
            action: action.into(),
            target,
            source: Some(source.into()),
            result: AuditResult::Failure,
            detail: serde_json::json!({ "reason": detail }),
        };
        if self.audit_tx.try_send(event).is_err() {
            self.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queries the audit log.
    pub async fn query_audit(&self, actor: &Actor, mut q: AuditQuery) -> Result<Vec<AuditEvent>> {
        match &actor.tenant {
            Some(t) => {
                actor.require(Role::Viewer, Some(t))?;
                if q.tenant.as_ref().is_some_and(|qt| qt != t) {
                    return Err(RegistryError::NotFound(format!(
                        "tenant {}",
                        q.tenant.unwrap_or_default()
                    )));
                }
                q.tenant = Some(t.clone());
            }
            None => actor.require(Role::Viewer, None)?,
        }
        self.store.audit(&q).await
    }

    // ---- tokens -----------------------------------------------------------------------------

    /// Creates an API token; returns it with its secret (shown once).
    pub async fn create_token(
        &self,
        actor: &Actor,
        name: &str,
        role: Role,
        tenant: Option<&str>,
        ttl_secs: Option<u64>,
    ) -> Result<(ApiToken, String)> {
        actor.require(Role::Admin, tenant)?;
        if tenant.is_none() && role != Role::Admin {
            return Err(RegistryError::Invalid(
                "platform-wide tokens must be admin tokens; give a tenant for operator and viewer tokens".into(),
            ));
        }
        if let Some(t) = tenant
            && self.store.tenant(t).await?.is_none()
        {
            return Err(RegistryError::NotFound(format!("tenant {t}")));
        }
        let secret = format!("fh_{}", password::generate_secret());
        let token = ApiToken {
            id: random_id("tok_"),
            name: name.into(),
            role,
            tenant: tenant.map(str::to_string),
            created_at: now_millis(),
            expires_at: ttl_secs.map(|s| now_millis() + secs_to_millis(s)),
            revoked_at: None,
            created_by: Some(actor.name.clone()),
        };
        self.store
            .insert_token(&token, &sha256_hex(secret.as_bytes()))
            .await?;
        self.audit(
            actor,
            tenant,
            "token.create",
            &token.id,
            AuditResult::Success,
            serde_json::json!({ "role": role, "name": name }),
        )
        .await?;
        Ok((token, secret))
    }

    /// Creates the first platform admin token if there is none. With `secret`, that secret is
    /// used (e.g. from `FERROHUB_ADMIN_TOKEN`); otherwise one is generated and returned so that
    /// it can be printed once.
    pub async fn bootstrap_admin(&self, secret: Option<&str>) -> Result<Option<String>> {
        if let Some(s) = secret {
            if s.len() < 16 {
                return Err(RegistryError::Invalid(
                    "the admin token must be at least 16 characters".into(),
                ));
            }
            if self
                .store
                .token_by_hash(&sha256_hex(s.as_bytes()))
                .await?
                .is_some()
            {
                return Ok(None);
            }
        } else if !self.store.tokens(None).await?.is_empty() {
            return Ok(None);
        }
        let secret = match secret {
            Some(s) => s.to_string(),
            None => format!("fh_{}", password::generate_secret()),
        };
        let token = ApiToken {
            id: random_id("tok_"),
            name: "bootstrap admin".into(),
            role: Role::Admin,
            tenant: None,
            created_at: now_millis(),
            expires_at: None,
            revoked_at: None,
            created_by: Some("system".into()),
        };
        self.store
            .insert_token(&token, &sha256_hex(secret.as_bytes()))
            .await?;
        self.audit(
            &Actor::system(),
            None,
            "token.bootstrap",
            &token.id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await?;
        Ok(Some(secret))
    }

    /// Resolves a bearer token to an actor (`None` when unknown, expired or revoked).
    pub async fn actor_for_token(
        &self,
        secret: &str,
        source: Option<String>,
    ) -> Result<Option<Actor>> {
        let Some(t) = self
            .store
            .token_by_hash(&sha256_hex(secret.as_bytes()))
            .await?
        else {
            return Ok(None);
        };
        let now = now_millis();
        if t.revoked_at.is_some() || t.expires_at.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        Ok(Some(Actor {
            name: format!("token:{}", t.id),
            role: t.role,
            tenant: t.tenant,
            source,
        }))
    }

    /// Lists tokens in the actor's scope.
    pub async fn list_tokens(&self, actor: &Actor) -> Result<Vec<ApiToken>> {
        actor.require(Role::Admin, actor.tenant.as_deref())?;
        self.store.tokens(actor.tenant.as_deref()).await
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, actor: &Actor, id: &str) -> Result<()> {
        let t = self
            .store
            .token(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("token {id}")))?;
        // Another tenant's token looks like a missing one (its tenant is not named).
        if actor.tenant.is_some() && actor.tenant != t.tenant {
            return Err(RegistryError::NotFound(format!("token {id}")));
        }
        match &t.tenant {
            Some(tenant) => actor.require(Role::Admin, Some(tenant))?,
            None => actor.require(Role::Admin, None)?,
        }
        self.store.revoke_token(id).await?;
        self.audit(
            actor,
            t.tenant.as_deref(),
            "token.revoke",
            id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await
    }

    // ---- tenants ----------------------------------------------------------------------------

    /// Creates a tenant.
    pub async fn create_tenant(
        &self,
        actor: &Actor,
        id: &str,
        name: Option<&str>,
        settings: TenantSettings,
    ) -> Result<Tenant> {
        actor.require(Role::Admin, None)?;
        validate_id("tenant", id)?;
        let t = Tenant {
            id: id.into(),
            name: name.unwrap_or(id).into(),
            settings,
            created_at: now_millis(),
        };
        self.store.create_tenant(&t).await?;
        self.load_tenant(t.clone()).await?;
        self.audit(
            actor,
            Some(id),
            "tenant.create",
            id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await?;
        Ok(t)
    }

    /// A tenant.
    pub async fn tenant(&self, actor: &Actor, id: &str) -> Result<Tenant> {
        actor.require(Role::Viewer, Some(id))?;
        self.store
            .tenant(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {id}")))
    }

    /// Tenants in the actor's scope.
    pub async fn tenants(&self, actor: &Actor) -> Result<Vec<Tenant>> {
        match &actor.tenant {
            Some(t) => Ok(vec![self.tenant(actor, t).await?]),
            None => {
                actor.require(Role::Viewer, None)?;
                self.store.tenants().await
            }
        }
    }

    /// Changes a tenant's name or settings (quotas apply to new buckets at once).
    pub async fn update_tenant(
        &self,
        actor: &Actor,
        id: &str,
        name: Option<String>,
        settings: Option<TenantSettings>,
    ) -> Result<Tenant> {
        actor.require(Role::Admin, Some(id))?;
        let mut t = self.tenant(actor, id).await?;
        if let Some(n) = name {
            t.name = n;
        }
        if let Some(s) = settings {
            // Quotas protect the platform from the tenant: only a platform admin changes them.
            if s.quotas != t.settings.quotas && actor.tenant.is_some() {
                return Err(RegistryError::Forbidden(
                    "changing a tenant's quotas needs a platform-wide admin token".into(),
                ));
            }
            t.settings = s;
        }
        self.store.update_tenant(&t).await?;
        self.load_tenant(t.clone()).await?;
        self.audit(
            actor,
            Some(id),
            "tenant.update",
            id,
            AuditResult::Success,
            serde_json::to_value(&t.settings)?,
        )
        .await?;
        Ok(t)
    }

    /// Deletes a tenant with all its devices, credentials and tokens; connected devices are
    /// disconnected.
    pub async fn delete_tenant(&self, actor: &Actor, id: &str) -> Result<()> {
        actor.require(Role::Admin, None)?;
        if id == TenantId::DEFAULT {
            return Err(RegistryError::Invalid(
                "the default tenant cannot be deleted".into(),
            ));
        }
        if !self.store.delete_tenant(id).await? {
            return Err(RegistryError::NotFound(format!("tenant {id}")));
        }
        self.tenants.write().remove(id);
        for ca in self.trust.list() {
            if ca.tenant == id {
                self.trust.remove(id, &ca.ca_id);
            }
        }
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        self.devices.lock().retain(|(t, _), _| t != id);
        self.revoke_live_quietly(|(t, _)| t == id);
        // A tenant created later under the same id must start empty.
        self.purge(Purge::Tenant(TenantId::new(id))).await;
        self.pending_connectivity.lock().forget(|(t, _)| t == id);
        self.audit(
            actor,
            Some(id),
            "tenant.delete",
            id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await
    }

    // ---- devices ----------------------------------------------------------------------------

    async fn build_device(&self, tenant: &str, spec: DeviceSpec) -> Result<Device> {
        validate_id("device", &spec.id)?;
        validate_tags(&spec.tags)?;
        let mut tags = BTreeMap::new();
        let mut attributes = empty_object();
        let mut policy = spec.policy.clone().filter(|p| !p.is_empty());
        if let Some(t) = &spec.device_type {
            let ty: DeviceType = self
                .require_doc(tenant, DocKind::DeviceType, "device type", t)
                .await?;
            tags = ty.tags;
            attributes = ty.attributes;
        }
        tags.extend(spec.tags);
        if let Some(serde_json::Value::Object(extra)) = spec.attributes {
            if let serde_json::Value::Object(base) = &mut attributes {
                base.extend(extra);
            }
        } else if spec.attributes.is_some() {
            return Err(RegistryError::Invalid(
                "attributes must be a JSON object".into(),
            ));
        }
        if let Some(p) = &policy {
            self.require_doc::<NamedPolicy>(tenant, DocKind::Policy, "policy", p)
                .await?;
        }
        for g in &spec.groups {
            let group: Group = self.require_doc(tenant, DocKind::Group, "group", g).await?;
            if group.query.is_some() {
                return Err(RegistryError::Invalid(format!(
                    "group {g} is dynamic: membership follows its query, devices cannot join it"
                )));
            }
        }
        let now = now_millis();
        if policy.as_deref() == Some("") {
            policy = None;
        }
        Ok(Device {
            name: spec.name.unwrap_or_else(|| spec.id.clone()),
            id: spec.id,
            tenant: tenant.into(),
            device_type: spec.device_type,
            tags,
            attributes,
            status: spec.status.unwrap_or_default(),
            policy,
            groups: spec.groups,
            connectivity: Connectivity::default(),
            created_at: now,
            updated_at: now,
        })
    }

    /// Registers a device.
    pub async fn create_device(
        &self,
        actor: &Actor,
        tenant: &str,
        spec: DeviceSpec,
    ) -> Result<Device> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_tenant(tenant).await?;
        let device = self.build_device(tenant, spec).await?;
        let mut results = self
            .store
            .insert_devices(std::slice::from_ref(&device))
            .await?;
        results.pop().unwrap_or(Ok(()))?;
        self.audit_ok(actor, tenant, "device.create", &device.id)
            .await?;
        Ok(device)
    }

    /// Registers many devices, validating each; returns, per input row, the error if it was
    /// rejected. Rows are written in batches of 1,000, each in one transaction.
    pub async fn import_devices(
        &self,
        actor: &Actor,
        tenant: &str,
        specs: Vec<DeviceSpec>,
    ) -> Result<Vec<Option<String>>> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_tenant(tenant).await?;
        let mut report: Vec<Option<String>> = Vec::with_capacity(specs.len());
        let mut seen = HashSet::new();
        let mut batch: Vec<(usize, Device)> = Vec::new();
        let total = specs.len();
        let mut imported = 0usize;
        for spec in specs {
            let row = report.len();
            report.push(None);
            if !seen.insert(spec.id.clone()) {
                report[row] = Some(format!("device {} appears twice in the import", spec.id));
                continue;
            }
            match self.build_device(tenant, spec).await {
                Ok(d) => batch.push((row, d)),
                Err(e) => report[row] = Some(e.to_string()),
            }
            if batch.len() >= 1000 {
                imported += self.write_batch(&mut batch, &mut report).await?;
            }
        }
        imported += self.write_batch(&mut batch, &mut report).await?;
        self.audit(
            actor,
            Some(tenant),
            "device.import",
            &format!("{imported} devices"),
            AuditResult::Success,
            serde_json::json!({ "rows": total, "imported": imported, "rejected": total - imported }),
        )
        .await?;
        Ok(report)
    }

    async fn write_batch(
        &self,
        batch: &mut Vec<(usize, Device)>,
        report: &mut [Option<String>],
    ) -> Result<usize> {
        if batch.is_empty() {
            return Ok(0);
        }
        let devices: Vec<Device> = batch.iter().map(|(_, d)| d.clone()).collect();
        let results = self.store.insert_devices(&devices).await?;
        let mut ok = 0;
        for ((row, _), r) in batch.drain(..).zip(results) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => report[row] = Some(e.to_string()),
            }
        }
        Ok(ok)
    }

    async fn require_tenant(&self, tenant: &str) -> Result<()> {
        if self.tenant_runtime(tenant).is_none() {
            return Err(RegistryError::NotFound(format!("tenant {tenant}")));
        }
        Ok(())
    }

    /// A device.
    pub async fn device(&self, actor: &Actor, tenant: &str, id: &str) -> Result<Device> {
        actor.require(Role::Viewer, Some(tenant))?;
        let mut d = self
            .store
            .device(tenant, id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
        self.overlay_connectivity(&mut d);
        Ok(d)
    }

    /// Live connectivity is in memory and flushed every second; show the freshest.
    fn overlay_connectivity(&self, d: &mut Device) {
        if let Some(c) = self
            .pending_connectivity
            .lock()
            .states
            .get(&(d.tenant.clone(), d.id.clone()))
        {
            d.connectivity.apply(c);
        }
        // Whether it is connected is exact in memory; what was flushed may lag behind it.
        d.connectivity.online = self.is_online(&d.tenant, &d.id);
    }

    /// A device's connectivity now and a page of its connectivity history, newest first:
    /// `limit` events (1–1000) older than `before` (the `next` of the previous page).
    pub async fn connectivity_history(
        &self,
        actor: &Actor,
        tenant: &str,
        device_id: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<ConnectivityHistory> {
        // Access is checked first; the events are read before the device's current state so
        // that a connectivity flush landing between the two reads can only make `current`
        // newer than the events, never older (it was the other way round: a page whose newest
        // event was a disconnect with a `current` still showing the connect before it).
        self.device(actor, tenant, device_id).await?;
        let limit = limit.clamp(1, 1000);
        let mut events = self
            .store
            .connectivity_events(tenant, device_id, before, limit + 1)
            .await?;
        let d = self.device(actor, tenant, device_id).await?;
        let next = if events.len() > limit as usize {
            events.truncate(limit as usize);
            events.last().map(|e| e.seq)
        } else {
            None
        };
        Ok(ConnectivityHistory {
            current: d.connectivity,
            events,
            next,
        })
    }

    /// A page of devices.
    pub async fn list_devices(
        &self,
        actor: &Actor,
        tenant: &str,
        mut listing: DeviceListing,
    ) -> Result<Page<Device>> {
        actor.require(Role::Viewer, Some(tenant))?;
        let mut static_group = None;
        if let Some(g) = listing.group.clone() {
            let group: Group = self
                .store
                .doc(tenant, DocKind::Group, &g)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("group {g}")))?;
            match group.query {
                Some(q) => merge_query(&mut listing.query, q)?,
                None => static_group = Some(g),
            }
        }
        let mut page = self
            .store
            .list_devices(tenant, &listing, static_group.as_deref())
            .await?;
        for d in &mut page.items {
            self.overlay_connectivity(d);
        }
        Ok(page)
    }

    /// Changes a device. Disabling it closes its connections at once; changes to its type, tags
    /// or policy apply to connected sessions immediately.
    pub async fn update_device(
        self: &Arc<Self>,
        actor: &Actor,
        tenant: &str,
        id: &str,
        patch: DevicePatch,
    ) -> Result<Device> {
        actor.require(Role::Operator, Some(tenant))?;
        let mut d = self
            .store
            .device(tenant, id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device {id}")))?;
        let was = d.status;
        if let Some(n) = patch.name {
            d.name = n;
        }
        if let Some(t) = patch.device_type {
            if t.is_empty() {
                d.device_type = None;
            } else {
                self.require_doc::<DeviceType>(tenant, DocKind::DeviceType, "device type", &t)
                    .await?;
                d.device_type = Some(t);
            }
        }
        if let Some(tags) = patch.tags {
            for (k, v) in tags {
                match v {
                    Some(v) => d.tags.insert(k, v),
                    None => d.tags.remove(&k),
                };
            }
            validate_tags(&d.tags)?;
        }
        if let Some(a) = patch.attributes {
            if !a.is_object() {
                return Err(RegistryError::Invalid(
                    "attributes must be a JSON object".into(),
                ));
            }
            d.attributes = a;
        }
        if let Some(s) = patch.status {
            d.status = s;
        }
        if let Some(p) = patch.policy {
            if p.is_empty() {
                d.policy = None;
            } else {
                self.require_doc::<NamedPolicy>(tenant, DocKind::Policy, "policy", &p)
                    .await?;
                d.policy = Some(p);
            }
        }
        let read_at = d.updated_at;
        // Strictly later than what was read, so a concurrent writer's check fails.
        d.updated_at = now_millis().max(read_at + 1);
        self.store.update_device(&d, read_at).await?;
        self.forget_device(tenant, id);
        let action = match (was, d.status) {
            (DeviceStatus::Enabled, DeviceStatus::Disabled) => {
                let key = (tenant.to_string(), id.to_string());
                self.revoke_live(|k, _| *k == key);
                "device.disable"
            }
            (DeviceStatus::Disabled, DeviceStatus::Enabled) => "device.enable",
            _ => {
                self.refresh_live(tenant, Some(id)).await;
                "device.update"
            }
        };
        self.audit(
            actor,
            Some(tenant),
            action,
            id,
            AuditResult::Success,
            serde_json::json!({}),
        )
        .await?;
        self.overlay_connectivity(&mut d);
        Ok(d)
    }

    /// Decommissions a device: its credentials, memberships and record are deleted, its
    /// connections closed, and its broker sessions (with their queued messages) and retained
    /// messages under `devices/{id}/` and `$devices/{id}/` purged before this returns. The
    /// result is the tenant's choice for the device's telemetry (kept or purged).
    pub async fn delete_device(
        &self,
        actor: &Actor,
        tenant: &str,
        id: &str,
    ) -> Result<TelemetryOnDecommission> {
        actor.require(Role::Operator, Some(tenant))?;
        if !self.store.delete_device(tenant, id).await? {
            return Err(RegistryError::NotFound(format!("device {id}")));
        }
        self.forget_device(tenant, id);
        let key = (tenant.to_string(), id.to_string());
        // Sessions go too: the one named after the device (the default policy's client id) and
        // any other client id the device is connected with now.
        let mut client_ids: Vec<String> = self
            .live
            .lock()
            .get(&key)
            .map(|v| {
                v.iter()
                    .filter_map(Weak::upgrade)
                    .map(|a| a.client_id.clone())
                    .collect()
            })
            .unwrap_or_default();
        client_ids.push(id.to_string());
        client_ids.sort();
        client_ids.dedup();
        self.revoke_live_quietly(|k| *k == key);
        let telemetry = self
            .tenant_runtime(tenant)
            .map(|t| t.tenant.settings.telemetry_on_decommission)
            .unwrap_or_default();
        self.purge(Purge::Device {
            tenant: TenantId::new(tenant),
            device_id: id.to_string(),
            client_ids,
            telemetry,
        })
        .await;
        self.pending_connectivity.lock().forget(|k| *k == key);
        self.audit_ok(actor, tenant, "device.decommission", id)
            .await?;
        Ok(telemetry)
    }

    fn forget_device(&self, tenant: &str, id: &str) {
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        self.devices
            .lock()
            .remove(&(tenant.to_string(), id.to_string()));
        self.verified.forget_prefix(&format!("{tenant}/{id}/"));
    }

    // ---- groups, types, policies ------------------------------------------------------------

    /// Creates or replaces a group.
    pub async fn put_group(&self, actor: &Actor, tenant: &str, group: Group) -> Result<Group> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_tenant(tenant).await?;
        validate_id("group", &group.name)?;
        if let Some(q) = &group.query {
            validate_tags(&q.tags)?;
        }
        self.store
            .put_doc(tenant, DocKind::Group, &group.name, &group)
            .await?;
        self.audit(
            actor,
            Some(tenant),
            "group.put",
            &group.name,
            AuditResult::Success,
            serde_json::to_value(&group)?,
        )
        .await?;
        Ok(group)
    }

    /// Groups of a tenant.
    pub async fn groups(&self, actor: &Actor, tenant: &str) -> Result<Vec<Group>> {
        actor.require(Role::Viewer, Some(tenant))?;
        self.docs_of(tenant, DocKind::Group).await
    }

    /// Deletes a group (devices stay).
    pub async fn delete_group(&self, actor: &Actor, tenant: &str, name: &str) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        if !self.store.delete_doc(tenant, DocKind::Group, name).await? {
            return Err(RegistryError::NotFound(format!("group {name}")));
        }
        self.audit_ok(actor, tenant, "group.delete", name).await
    }

    /// Adds a device to a static group.
    pub async fn add_to_group(
        &self,
        actor: &Actor,
        tenant: &str,
        group: &str,
        device: &str,
    ) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        let g: Group = self
            .store
            .doc(tenant, DocKind::Group, group)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("group {group}")))?;
        if g.query.is_some() {
            return Err(RegistryError::Invalid(format!("group {group} is dynamic")));
        }
        if self.store.device(tenant, device).await?.is_none() {
            return Err(RegistryError::NotFound(format!("device {device}")));
        }
        self.store.add_member(tenant, group, device).await?;
        self.audit(
            actor,
            Some(tenant),
            "group.add_member",
            group,
            AuditResult::Success,
            serde_json::json!({ "device": device }),
        )
        .await
    }

    /// Removes a device from a static group.
    pub async fn remove_from_group(
        &self,
        actor: &Actor,
        tenant: &str,
        group: &str,
        device: &str,
    ) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        if !self.store.remove_member(tenant, group, device).await? {
            return Err(RegistryError::NotFound(format!(
                "member {device} of group {group}"
            )));
        }
        self.audit(
            actor,
            Some(tenant),
            "group.remove_member",
            group,
            AuditResult::Success,
            serde_json::json!({ "device": device }),
        )
        .await
    }

    /// Creates or replaces a device type.
    pub async fn put_device_type(
        self: &Arc<Self>,
        actor: &Actor,
        tenant: &str,
        ty: DeviceType,
    ) -> Result<DeviceType> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_tenant(tenant).await?;
        validate_id("device type", &ty.name)?;
        validate_tags(&ty.tags)?;
        if !ty.attributes.is_object() {
            return Err(RegistryError::Invalid(
                "attributes must be a JSON object".into(),
            ));
        }
        if let Some(p) = &ty.policy {
            self.require_doc::<NamedPolicy>(tenant, DocKind::Policy, "policy", p)
                .await?;
        }
        self.store
            .put_doc(tenant, DocKind::DeviceType, &ty.name, &ty)
            .await?;
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        self.devices.lock().retain(|(t, _), _| t != tenant);
        self.refresh_live(tenant, None).await;
        self.audit_ok(actor, tenant, "device_type.put", &ty.name)
            .await?;
        Ok(ty)
    }

    /// Device types of a tenant.
    pub async fn device_types(&self, actor: &Actor, tenant: &str) -> Result<Vec<DeviceType>> {
        actor.require(Role::Viewer, Some(tenant))?;
        self.docs_of(tenant, DocKind::DeviceType).await
    }

    /// Deletes a device type (its devices keep their tags and attributes).
    pub async fn delete_device_type(&self, actor: &Actor, tenant: &str, name: &str) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        if !self
            .store
            .delete_doc(tenant, DocKind::DeviceType, name)
            .await?
        {
            return Err(RegistryError::NotFound(format!("device type {name}")));
        }
        // Devices of the type lose its policy: connected ones get theirs at once.
        self.refresh_live(tenant, None).await;
        self.audit_ok(actor, tenant, "device_type.delete", name)
            .await
    }

    /// Creates or replaces a named policy; connected devices under it get it at once.
    pub async fn put_policy(
        self: &Arc<Self>,
        actor: &Actor,
        tenant: &str,
        name: &str,
        document: PolicyDocument,
    ) -> Result<NamedPolicy> {
        actor.require(Role::Admin, Some(tenant))?;
        self.require_tenant(tenant).await?;
        validate_id("policy", name)?;
        document
            .validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let p = NamedPolicy {
            name: name.into(),
            document,
            updated_at: now_millis(),
        };
        self.store
            .put_doc(tenant, DocKind::Policy, name, &p)
            .await?;
        self.refresh_live(tenant, None).await;
        self.audit(
            actor,
            Some(tenant),
            "policy.put",
            name,
            AuditResult::Success,
            serde_json::to_value(&p.document)?,
        )
        .await?;
        Ok(p)
    }

    /// Policies of a tenant.
    pub async fn policies(&self, actor: &Actor, tenant: &str) -> Result<Vec<NamedPolicy>> {
        actor.require(Role::Viewer, Some(tenant))?;
        self.docs_of(tenant, DocKind::Policy).await
    }

    /// Deletes a policy; devices that named it fall back to the default policy.
    pub async fn delete_policy(
        self: &Arc<Self>,
        actor: &Actor,
        tenant: &str,
        name: &str,
    ) -> Result<()> {
        actor.require(Role::Admin, Some(tenant))?;
        if !self.store.delete_doc(tenant, DocKind::Policy, name).await? {
            return Err(RegistryError::NotFound(format!("policy {name}")));
        }
        self.refresh_live(tenant, None).await;
        self.audit_ok(actor, tenant, "policy.delete", name).await
    }

    /// The device's own policy, else its type's, else the default policy (a named policy that
    /// was deleted counts as absent).
    async fn policy_documents(&self, device: &Device) -> Result<Vec<PolicyDocument>> {
        let mut names = Vec::new();
        names.extend(device.policy.clone());
        if let Some(t) = &device.device_type
            && let Some(ty) = self
                .store
                .doc::<DeviceType>(&device.tenant, DocKind::DeviceType, t)
                .await?
        {
            names.extend(ty.policy);
        }
        for n in names {
            if let Some(p) = self
                .store
                .doc::<NamedPolicy>(&device.tenant, DocKind::Policy, &n)
                .await?
            {
                return Ok(vec![p.document]);
            }
        }
        Ok(vec![PolicyDocument::default_device()])
    }

    // ---- credentials ------------------------------------------------------------------------

    /// Adds a password credential; with `secret` absent one is generated. Returns the credential
    /// and the secret (shown once). `overlap_secs` sets when the device's other passwords stop
    /// working (rotation); `None` leaves them.
    pub async fn add_password(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        secret: Option<String>,
        overlap_secs: Option<u64>,
    ) -> Result<(Credential, String)> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_device(tenant, device).await?;
        // A secret the hub generates (256 random bits) cannot be guessed, so it is stored as a
        // SHA-256 and checked in microseconds; one an operator chooses gets argon2id.
        let (secret, phc) = match secret {
            None => {
                let secret = password::generate_secret();
                let stored = password::hash_generated_secret(&secret);
                (secret, stored)
            }
            Some(secret) => {
                if secret.len() < 8 || secret.len() > 1024 {
                    return Err(RegistryError::Invalid(
                        "passwords are 8 to 1024 bytes".into(),
                    ));
                }
                let params = self.config.password;
                let to_hash = secret.clone();
                let phc = tokio::task::spawn_blocking(move || {
                    password::hash_password(to_hash.as_bytes(), &params)
                })
                .await
                .map_err(|e| RegistryError::Crypto(e.to_string()))?
                .map_err(|e| RegistryError::Crypto(e.to_string()))?;
                (secret, phc)
            }
        };
        let c = Credential {
            id: random_id("cred_"),
            device_id: device.into(),
            kind: CredentialKind::Password,
            label: "password".into(),
            fingerprint: None,
            serial: None,
            expires_at: None,
            created_at: now_millis(),
            revoked_at: None,
            secret: phc,
        };
        self.rotate_others(tenant, device, CredentialKind::Password, overlap_secs)
            .await?;
        self.store.insert_credential(tenant, &c).await?;
        self.forget_device(tenant, device);
        self.audit(
            actor,
            Some(tenant),
            "credential.create",
            device,
            AuditResult::Success,
            serde_json::json!({ "id": c.id, "kind": "password" }),
        )
        .await?;
        Ok((c, secret))
    }

    async fn rotate_others(
        &self,
        tenant: &str,
        device: &str,
        kind: CredentialKind,
        overlap_secs: Option<u64>,
    ) -> Result<()> {
        let Some(secs) = overlap_secs else {
            return Ok(());
        };
        let at = now_millis() + secs_to_millis(secs);
        for old in self.store.credentials(tenant, device).await? {
            if old.kind == kind && old.is_active(now_millis()) {
                self.store
                    .expire_credential(tenant, device, &old.id, at)
                    .await?;
            }
        }
        Ok(())
    }

    async fn require_device(&self, tenant: &str, device: &str) -> Result<Device> {
        self.store
            .device(tenant, device)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("device {device}")))
    }

    /// Issues a certificate from the tenant's built-in CA (created on first use), pins it as a
    /// credential and returns it (with the private key when no CSR was given).
    pub async fn issue_certificate(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        csr_pem: Option<String>,
        overlap_secs: Option<u64>,
    ) -> Result<(Credential, crate::pki::IssuedCertificate)> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_device(tenant, device).await?;
        let issued = self
            .issue_for(tenant, device, csr_pem, self.config.cert_validity_days)
            .await?;
        let c = self
            .pin_certificate(tenant, device, &issued.info, overlap_secs)
            .await?;
        self.audit(actor, Some(tenant), "credential.create", device, AuditResult::Success, serde_json::json!({ "id": c.id, "kind": "certificate", "serial": issued.info.serial_hex }))
            .await?;
        Ok((c, issued))
    }

    async fn issue_for(
        &self,
        tenant: &str,
        device: &str,
        csr_pem: Option<String>,
        days: u32,
    ) -> Result<crate::pki::IssuedCertificate> {
        let ca = self.builtin_ca(tenant).await?;
        let mut req = IssueRequest::new(tenant, device, days);
        if let Some(csr) = csr_pem {
            req = req.with_csr(csr);
        }
        ca.issue(req)
            .map_err(|e| RegistryError::Invalid(e.to_string()))
    }

    /// Issues and pins a certificate for a device being provisioned; returns it with the CA PEM.
    pub(crate) async fn issue_provisioned_certificate(
        &self,
        tenant: &str,
        device: &str,
        csr_pem: Option<String>,
        days: u32,
    ) -> Result<(crate::pki::IssuedCertificate, String)> {
        let issued = self.issue_for(tenant, device, csr_pem, days).await?;
        self.pin_certificate(tenant, device, &issued.info, None)
            .await?;
        let ca = self.builtin_ca(tenant).await?.cert_pem().to_string();
        Ok((issued, ca))
    }

    async fn pin_certificate(
        &self,
        tenant: &str,
        device: &str,
        info: &CertInfo,
        overlap_secs: Option<u64>,
    ) -> Result<Credential> {
        let c = Credential {
            id: random_id("cred_"),
            device_id: device.into(),
            kind: CredentialKind::Certificate,
            label: info.subject_dn.clone(),
            fingerprint: Some(info.fingerprint_sha256.clone()),
            serial: Some(info.serial_hex.clone()),
            expires_at: Some(info.not_after * 1000),
            created_at: now_millis(),
            revoked_at: None,
            secret: String::new(),
        };
        self.rotate_others(tenant, device, CredentialKind::Certificate, overlap_secs)
            .await?;
        self.store.insert_credential(tenant, &c).await?;
        self.forget_device(tenant, device);
        Ok(c)
    }

    /// Pins an externally issued certificate (PEM) to a device: from then on only pinned
    /// certificates are accepted for it.
    pub async fn pin_external_certificate(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        cert_pem: &str,
    ) -> Result<Credential> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_device(tenant, device).await?;
        let chain = crate::pki::parse_pem_chain(cert_pem)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| RegistryError::Invalid("no certificate in the PEM".into()))?;
        let info = crate::pki::parse_certificate(leaf.as_ref())
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let c = self.pin_certificate(tenant, device, &info, None).await?;
        self.audit(actor, Some(tenant), "credential.create", device, AuditResult::Success, serde_json::json!({ "id": c.id, "kind": "certificate", "fingerprint": info.fingerprint_sha256 }))
            .await?;
        Ok(c)
    }

    /// Registers a public key or JWK set that verifies the device's own JWTs.
    pub async fn add_jwt_key(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        key: TokenKeyDoc,
    ) -> Result<Credential> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_device(tenant, device).await?;
        parse_token_keys(&key)?;
        let c = Credential {
            id: random_id("cred_"),
            device_id: device.into(),
            kind: CredentialKind::JwtKey,
            label: "jwt key".into(),
            fingerprint: None,
            serial: None,
            expires_at: None,
            created_at: now_millis(),
            revoked_at: None,
            secret: serde_json::to_string(&key)?,
        };
        self.store.insert_credential(tenant, &c).await?;
        self.forget_device(tenant, device);
        self.audit(
            actor,
            Some(tenant),
            "credential.create",
            device,
            AuditResult::Success,
            serde_json::json!({ "id": c.id, "kind": "jwt_key" }),
        )
        .await?;
        Ok(c)
    }

    /// Issues a hub-signed JWT for a device (Ed25519, tenant key created on first use).
    pub async fn issue_device_token(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        ttl_secs: u64,
    ) -> Result<String> {
        actor.require(Role::Operator, Some(tenant))?;
        self.require_device(tenant, device).await?;
        let signer = self.tenant_signer(tenant).await?;
        let now = now_millis() / 1000;
        let claims = jwt::DeviceClaims::new(
            device,
            Some(tenant.to_string()),
            now,
            ttl_secs.clamp(60, 30 * 86_400) as i64,
        );
        let token = signer
            .issue(&claims)
            .map_err(|e| RegistryError::Crypto(e.to_string()))?;
        self.audit(
            actor,
            Some(tenant),
            "credential.issue_token",
            device,
            AuditResult::Success,
            serde_json::json!({ "exp": claims.exp }),
        )
        .await?;
        Ok(token)
    }

    async fn tenant_signer(&self, tenant: &str) -> Result<Arc<TokenSigner>> {
        let rt = self
            .tenant_runtime(tenant)
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {tenant}")))?;
        if let Some(s) = &rt.signer {
            return Ok(s.clone());
        }
        let signer = TokenSigner::generate().map_err(|e| RegistryError::Crypto(e.to_string()))?;
        self.store
            .put_doc(
                tenant,
                DocKind::TokenKey,
                HUB_SIGNER,
                &SigningKeyDoc {
                    private_pem: signer.to_pkcs8_pem(),
                },
            )
            .await?;
        let rt = self.load_tenant(rt.tenant.clone()).await?;
        rt.signer
            .clone()
            .ok_or_else(|| RegistryError::Crypto("signing key not loaded".into()))
    }

    /// Registers a tenant-wide token verification key (PEM or JWKS) by name.
    pub async fn put_tenant_token_key(
        &self,
        actor: &Actor,
        tenant: &str,
        name: &str,
        key: TokenKeyDoc,
    ) -> Result<()> {
        actor.require(Role::Admin, Some(tenant))?;
        validate_id("key", name)?;
        if name == HUB_SIGNER {
            return Err(RegistryError::Invalid(format!("{HUB_SIGNER} is reserved")));
        }
        parse_token_keys(&key)?;
        self.store
            .put_doc(tenant, DocKind::TokenKey, name, &key)
            .await?;
        let rt = self
            .tenant_runtime(tenant)
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {tenant}")))?;
        self.load_tenant(rt.tenant.clone()).await?;
        self.audit_ok(actor, tenant, "token_key.put", name).await
    }

    /// A device's credentials (secrets withheld).
    pub async fn credentials(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
    ) -> Result<Vec<Credential>> {
        actor.require(Role::Viewer, Some(tenant))?;
        self.require_device(tenant, device).await?;
        self.store.credentials(tenant, device).await
    }

    /// Revokes a credential; connections that used the device are closed. A revoked certificate
    /// is also refused for every device of the tenant.
    pub async fn revoke_credential(
        &self,
        actor: &Actor,
        tenant: &str,
        device: &str,
        id: &str,
    ) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        let creds = self.store.credentials(tenant, device).await?;
        let c = creds
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| RegistryError::NotFound(format!("credential {id}")))?;
        self.store.revoke_credential(tenant, device, id).await?;
        if let Some(fp) = &c.fingerprint {
            self.revoke_cert_fingerprint(tenant, fp, c.serial.clone(), "credential revoked")
                .await?;
        }
        self.forget_device(tenant, device);
        let key = (tenant.to_string(), device.to_string());
        self.revoke_live(|k, _| *k == key);
        self.audit(
            actor,
            Some(tenant),
            "credential.revoke",
            device,
            AuditResult::Success,
            serde_json::json!({ "id": id }),
        )
        .await
    }

    async fn revoke_cert_fingerprint(
        &self,
        tenant: &str,
        fp: &str,
        serial: Option<String>,
        reason: &str,
    ) -> Result<()> {
        self.store
            .revoke_cert(&RevokedCert {
                tenant: tenant.into(),
                fingerprint: fp.into(),
                serial,
                revoked_at: now_millis(),
                reason: reason.into(),
            })
            .await?;
        self.revoked.write().insert((tenant.into(), fp.into()));
        Ok(())
    }

    /// Revokes a certificate by fingerprint (e.g. one registered by just-in-time registration).
    pub async fn revoke_certificate(
        &self,
        actor: &Actor,
        tenant: &str,
        fingerprint: &str,
        reason: &str,
    ) -> Result<()> {
        actor.require(Role::Operator, Some(tenant))?;
        let fp = fingerprint.to_ascii_lowercase().replace(':', "");
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::Invalid(
                "a fingerprint is 64 hex digits (SHA-256)".into(),
            ));
        }
        self.revoke_cert_fingerprint(tenant, &fp, None, reason)
            .await?;
        // Only the connections that presented this certificate.
        self.revoke_live(|(t, _), a| {
            t == tenant && a.cert.as_ref().is_some_and(|c| c.fingerprint == fp)
        });
        self.audit(
            actor,
            Some(tenant),
            "certificate.revoke",
            &fp,
            AuditResult::Success,
            serde_json::json!({ "reason": reason }),
        )
        .await
    }

    // ---- certificate authorities ------------------------------------------------------------

    async fn builtin_ca(&self, tenant: &str) -> Result<CertificateAuthority> {
        // Two first issues at once must not create two CAs (the second would replace the first
        // in the trust store, orphaning the certificate the first one signed).
        let _creating = self.ca_creation.lock().await;
        if let Some(rec) = self
            .store
            .doc::<StoredCa>(tenant, DocKind::Ca, "builtin")
            .await?
            && let Some(key) = &rec.key_pem
        {
            return CertificateAuthority::from_pem(&rec.cert_pem, key)
                .map_err(|e| RegistryError::Corrupt(e.to_string()));
        }
        self.require_tenant(tenant).await?;
        let ca = CertificateAuthority::generate(tenant, 3650)
            .map_err(|e| RegistryError::Crypto(e.to_string()))?;
        let rec = CaRecord {
            id: "builtin".into(),
            tenant: tenant.into(),
            cert_pem: ca.cert_pem().to_string(),
            subject: ca.info().subject_dn.clone(),
            not_after: ca.info().not_after * 1000,
            jitr: false,
            jitr_template: None,
            builtin: true,
            key_pem: Some(ca.key_pem()),
        };
        self.store
            .put_doc(tenant, DocKind::Ca, "builtin", &StoredCa::from(&rec))
            .await?;
        self.trust
            .set(tenant, "builtin", ca.cert_pem())
            .map_err(|e| RegistryError::Crypto(e.to_string()))?;
        Ok(ca)
    }

    /// The tenant's built-in CA certificate (created on first use), for devices to trust.
    pub async fn builtin_ca_pem(&self, actor: &Actor, tenant: &str) -> Result<String> {
        actor.require(Role::Viewer, Some(tenant))?;
        Ok(self.builtin_ca(tenant).await?.cert_pem().to_string())
    }

    /// Registers an external CA whose device certificates the tenant trusts.
    pub async fn register_ca(
        &self,
        actor: &Actor,
        tenant: &str,
        id: &str,
        cert_pem: &str,
        jitr: bool,
        jitr_template: Option<String>,
    ) -> Result<CaRecord> {
        // A CA certificate is public (devices send it in every handshake) and registering one
        // proves no control of its key: a tenant admin could claim another tenant's CA and
        // capture its devices. Until registration asks for proof of possession, only a
        // platform admin registers external CAs.
        actor.require(Role::Admin, Some(tenant))?;
        if actor.tenant.is_some() {
            return Err(RegistryError::Forbidden(
                "registering an external CA needs a platform-wide admin token (a CA certificate \
                 is public, so the platform operator vouches for who controls it)"
                    .into(),
            ));
        }
        self.require_tenant(tenant).await?;
        validate_id("CA", id)?;
        if id == "builtin" {
            return Err(RegistryError::Invalid(
                "the CA id builtin is reserved".into(),
            ));
        }
        if let Some(t) = &jitr_template {
            self.require_doc::<ProvisioningTemplate>(
                tenant,
                DocKind::Template,
                "provisioning template",
                t,
            )
            .await?;
        }
        self.trust
            .set(tenant, id, cert_pem)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let info = self
            .trust
            .list()
            .into_iter()
            .find(|c| c.tenant == tenant && c.ca_id == id)
            .map(|c| c.info)
            .ok_or_else(|| RegistryError::Invalid("CA not loaded".into()))?;
        let rec = CaRecord {
            id: id.into(),
            tenant: tenant.into(),
            cert_pem: cert_pem.into(),
            subject: info.subject_dn.clone(),
            not_after: info.not_after * 1000,
            jitr,
            jitr_template,
            builtin: false,
            key_pem: None,
        };
        self.store
            .put_doc(tenant, DocKind::Ca, id, &StoredCa::from(&rec))
            .await?;
        self.audit(
            actor,
            Some(tenant),
            "ca.register",
            id,
            AuditResult::Success,
            serde_json::json!({ "subject": info.subject_dn, "jitr": jitr }),
        )
        .await?;
        Ok(rec)
    }

    /// CAs of a tenant.
    pub async fn cas(&self, actor: &Actor, tenant: &str) -> Result<Vec<CaRecord>> {
        actor.require(Role::Viewer, Some(tenant))?;
        Ok(self
            .store
            .docs::<StoredCa>(Some(tenant), DocKind::Ca)
            .await?
            .into_iter()
            .map(|(_, c)| c.into())
            .collect())
    }

    /// Removes a registered CA: its certificates are refused from the next handshake on.
    pub async fn delete_ca(&self, actor: &Actor, tenant: &str, id: &str) -> Result<()> {
        actor.require(Role::Admin, Some(tenant))?;
        if !self.store.delete_doc(tenant, DocKind::Ca, id).await? {
            return Err(RegistryError::NotFound(format!("CA {id}")));
        }
        self.trust.remove(tenant, id);
        self.audit_ok(actor, tenant, "ca.delete", id).await
    }

    /// Creates or replaces a provisioning template.
    pub async fn put_template(
        &self,
        actor: &Actor,
        tenant: &str,
        t: ProvisioningTemplate,
    ) -> Result<ProvisioningTemplate> {
        actor.require(Role::Admin, Some(tenant))?;
        self.require_tenant(tenant).await?;
        validate_id("template", &t.name)?;
        validate_tags(&t.tags)?;
        if let Some(url) = &t.approval_webhook {
            self.check_webhook_url(url)?;
        }
        self.store
            .put_doc(tenant, DocKind::Template, &t.name, &t)
            .await?;
        self.audit_ok(actor, tenant, "template.put", &t.name)
            .await?;
        Ok(t)
    }

    /// Provisioning templates of a tenant.
    pub async fn templates(
        &self,
        actor: &Actor,
        tenant: &str,
    ) -> Result<Vec<ProvisioningTemplate>> {
        actor.require(Role::Viewer, Some(tenant))?;
        self.docs_of(tenant, DocKind::Template).await
    }

    /// Registers a device from a template (claim provisioning, just-in-time registration).
    pub async fn register_from_template(
        &self,
        tenant: &str,
        device_id: &str,
        template: Option<&str>,
        source: &str,
    ) -> Result<Device> {
        let t = match template {
            Some(name) => {
                self.store
                    .doc::<ProvisioningTemplate>(tenant, DocKind::Template, name)
                    .await?
            }
            None => None,
        };
        let spec = DeviceSpec {
            id: device_id.into(),
            device_type: t.as_ref().and_then(|t| t.device_type.clone()),
            tags: t.as_ref().map(|t| t.tags.clone()).unwrap_or_default(),
            policy: t.as_ref().and_then(|t| t.policy.clone()),
            groups: t.as_ref().map(|t| t.groups.clone()).unwrap_or_default(),
            ..DeviceSpec::default()
        };
        let device = self.build_device(tenant, spec).await?;
        let mut r = self
            .store
            .insert_devices(std::slice::from_ref(&device))
            .await?;
        r.pop().unwrap_or(Ok(()))?;
        let actor = Actor {
            source: Some(source.into()),
            ..Actor::system()
        };
        self.audit(
            &actor,
            Some(tenant),
            "device.provision",
            device_id,
            AuditResult::Success,
            serde_json::json!({ "template": template }),
        )
        .await?;
        Ok(device)
    }

    // ---- live connections -------------------------------------------------------------------

    fn revoke_live(&self, matches: impl Fn(&LiveKey, &DeviceAccess) -> bool) {
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        let victims: Vec<Arc<DeviceAccess>> = {
            let live = self.live.lock();
            live.iter()
                .flat_map(|(k, v)| {
                    v.iter()
                        .filter_map(Weak::upgrade)
                        .filter(|a| matches(k, a))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        for a in victims {
            a.revoked.store(true, Ordering::Relaxed);
            if let Some(kick) = self.kicker.get() {
                kick(&a.tenant_id, &a.client_id);
            }
        }
    }

    /// Recompiles the policies of connected devices (one, or all of a tenant) after a change.
    async fn refresh_live(&self, tenant: &str, device: Option<&str>) {
        let targets: Vec<Arc<DeviceAccess>> = {
            let live = self.live.lock();
            live.iter()
                .filter(|((t, d), _)| t == tenant && device.is_none_or(|x| x == d))
                .flat_map(|(_, v)| v.iter().filter_map(Weak::upgrade))
                .collect()
        };
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
        for a in targets {
            self.devices
                .lock()
                .remove(&(tenant.to_string(), a.device_id.clone()));
            match self.store.device(tenant, &a.device_id).await {
                Ok(Some(d)) if d.status == DeviceStatus::Enabled => {
                    match self.policy_documents(&d).await {
                        Ok(docs) => {
                            let compiled = compile(&docs, &d, &a.client_id, a.cert.as_ref());
                            *a.policy.write() = Arc::new(compiled);
                            a.check_deliveries.store(true, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "recompiling a policy failed"),
                    }
                }
                // Gone or disabled: a connection that slipped past a revocation ends here.
                _ => {
                    a.revoked.store(true, Ordering::Relaxed);
                    if let Some(kick) = self.kicker.get() {
                        kick(&a.tenant_id, &a.client_id);
                    }
                }
            }
        }
    }

    /// Devices connected now (by live access objects) in a tenant.
    pub fn online_count(&self, tenant: &str) -> u32 {
        self.tenant_runtime(tenant)
            .map_or(0, |t| t.limits.connections.load(Ordering::Relaxed))
    }

    /// Whether `device` of `tenant` has a live connection now (exact: follows the connections'
    /// access objects, not the connectivity flushed to the database).
    pub fn is_online(&self, tenant: &str, device: &str) -> bool {
        let key = (tenant.to_string(), device.to_string());
        self.live
            .lock()
            .get(&key)
            .is_some_and(|v| v.iter().any(|w| w.strong_count() > 0))
    }

    // ---- authentication ---------------------------------------------------------------------

    async fn device_auth(&self, tenant: &str, id: &str) -> Result<Option<Arc<DeviceAuth>>> {
        let key = (tenant.to_string(), id.to_string());
        if let Some(d) = self.devices.lock().get(&key) {
            return Ok(Some(d.clone()));
        }
        let generation = self.cache_generation.load(Ordering::SeqCst);
        let Some(device) = self.store.device(tenant, id).await? else {
            return Ok(None);
        };
        let credentials = self.store.credentials(tenant, id).await?;
        let auth = Arc::new(DeviceAuth {
            device,
            credentials,
        });
        let mut cache = self.devices.lock();
        // Something changed while this was loading: use the record, do not cache it.
        if self.cache_generation.load(Ordering::SeqCst) == generation {
            if cache.len() >= DEVICE_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, auth.clone());
        }
        Ok(Some(auth))
    }

    fn fail(&self, peer: IpAddr, key: &LiveKey, reason: &str, source: &str) -> Refusal {
        self.metrics.auth_failure.fetch_add(1, Ordering::Relaxed);
        self.failures_by_addr.failure(&peer);
        self.failures_by_device.failure(key);
        self.security_event(&key.0, "auth.failure", &key.1, source, reason);
        Refusal::BadCredentials
    }

    /// Checks a password against the device's active password credentials; returns the id of
    /// the one it matched. With `cache_only`, only remembered successes count (no argon2id): a
    /// throttled device id still lets its legitimate, recently verified password in.
    async fn check_password(
        &self,
        tenant: &str,
        auth: Option<&DeviceAuth>,
        password: &[u8],
        cache_only: bool,
    ) -> Option<String> {
        let now = now_millis();
        let candidates: Vec<&Credential> = auth
            .map(|a| {
                a.credentials
                    .iter()
                    .filter(|c| c.kind == CredentialKind::Password && c.is_active(now))
                    .collect()
            })
            .unwrap_or_default();
        for c in &candidates {
            // Hub-generated secrets: a SHA-256, cheap enough to check right here.
            if password::is_generated_hash(&c.secret) {
                if password::verify_password(&c.secret, password) {
                    return Some(c.id.clone());
                }
                continue;
            }
            let key = format!("{tenant}/{}/{}", c.device_id, c.id);
            if self.verified.check(&key, &c.secret, password) == Some(true) {
                return Some(c.id.clone());
            }
        }
        if cache_only {
            return None;
        }
        let candidates: Vec<&Credential> = candidates
            .into_iter()
            .filter(|c| !password::is_generated_hash(&c.secret))
            .collect();
        if candidates.is_empty()
            && auth.is_some_and(|a| {
                a.credentials
                    .iter()
                    .any(|c| password::is_generated_hash(&c.secret))
            })
        {
            // Only generated secrets and none matched: there is no slow hash to run. (A refusal is
            // then faster than for an unknown device; the back-off bounds what that can tell.)
            return None;
        }
        let Ok(_slot) = self.hashing.acquire().await else {
            return None;
        };
        if candidates.is_empty() {
            // Spend the same time as a real check: response time must not tell whether the
            // device exists.
            let phc = self.dummy_hash().await;
            let pw = password.to_vec();
            let _ = tokio::task::spawn_blocking(move || password::verify_password(&phc, &pw)).await;
            return None;
        }
        for c in candidates {
            self.metrics.password_hashes.fetch_add(1, Ordering::Relaxed);
            let phc = c.secret.clone();
            let pw = password.to_vec();
            let ok = tokio::task::spawn_blocking(move || password::verify_password(&phc, &pw))
                .await
                .unwrap_or(false);
            if ok {
                let key = format!("{tenant}/{}/{}", c.device_id, c.id);
                self.verified.remember(&key, &c.secret, password);
                return Some(c.id.clone());
            }
        }
        None
    }

    async fn dummy_hash(&self) -> String {
        static DUMMY: OnceLock<String> = OnceLock::new();
        if let Some(h) = DUMMY.get() {
            return h.clone();
        }
        let params = self.config.password;
        let h = tokio::task::spawn_blocking(move || {
            password::hash_password(b"not a device password", &params)
        })
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
        DUMMY.get_or_init(|| h).clone()
    }

    fn check_token(
        &self,
        tenant: &str,
        device: &str,
        auth: Option<&DeviceAuth>,
        token: &[u8],
    ) -> bool {
        let Ok(token) = std::str::from_utf8(token) else {
            return false;
        };
        let Some(rt) = self.tenant_runtime(tenant) else {
            return false;
        };
        let mut keys: Vec<VerificationKey> = rt.jwt_keys.clone();
        if let Some(s) = &rt.signer {
            keys.push(s.verification_key());
        }
        let now = now_millis();
        if let Some(a) = auth {
            for c in a
                .credentials
                .iter()
                .filter(|c| c.kind == CredentialKind::JwtKey && c.is_active(now))
            {
                if let Ok(doc) = serde_json::from_str::<TokenKeyDoc>(&c.secret) {
                    keys.extend(parse_token_keys(&doc).unwrap_or_default());
                }
            }
        }
        match jwt::verify(token, &keys, now / 1000, self.config.jwt_leeway_secs) {
            Ok(claims) => {
                claims.sub == device
                    && claims.tenant.as_deref().is_none_or(|t| t == tenant)
                    // A token from before the device was (re)registered belongs to an earlier
                    // device of that id: a decommissioned device's tokens die with it.
                    && auth.is_none_or(|a| claims.iat.saturating_add(1) * 1000 >= a.device.created_at)
            }
            Err(e) => {
                tracing::debug!(tenant, device, error = %e, "device token refused");
                false
            }
        }
    }

    /// Authenticates a connecting client. Used through the [`Authenticator`] implementation.
    pub async fn authenticate_device(&self, c: Credentials<'_>) -> Result<Grant, Refusal> {
        let peer = c.peer.ip();
        let source = c.peer.to_string();
        if self.failures_by_addr.blocked(&peer).is_some() {
            self.metrics.auth_throttled.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::BadCredentials);
        }
        // Any invalidation (disable, revoke, delete) from here on is re-checked at the end.
        let generation = self.cache_generation.load(Ordering::SeqCst);
        let mut used_credential: Option<String> = None;
        let mut cert_info = None;
        let (tenant, device_id, auth) = if let Some(certs) = c.certificates {
            let chain: Vec<CertificateDer<'_>> = certs
                .chain
                .iter()
                .map(|d| CertificateDer::from(d.as_slice()))
                .collect();
            let Some((tenant, ca_id, leaf)) = self.trust.identify(&chain) else {
                self.metrics.auth_failure.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::BadCredentials);
            };
            let rt = self
                .tenant_runtime(&tenant)
                .ok_or(Refusal::BadCredentials)?;
            if self
                .revoked
                .read()
                .contains(&(tenant.clone(), leaf.fingerprint_sha256.clone()))
            {
                self.security_event(
                    &tenant,
                    "auth.revoked_certificate",
                    leaf.subject_cn.as_deref().unwrap_or(""),
                    &source,
                    &leaf.fingerprint_sha256,
                );
                self.metrics.auth_failure.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::NotAuthorized);
            }
            let Some(id) = leaf
                .identity(identity_source(rt.tenant.settings.cert_identity))
                .map(str::to_string)
            else {
                self.metrics.auth_failure.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::BadCredentials);
            };
            if validate_id("device", &id).is_err() {
                return Err(Refusal::BadCredentials);
            }
            let auth = match self.device_auth(&tenant, &id).await {
                Ok(Some(a)) => a,
                Ok(None) => {
                    // Just-in-time registration for CAs that allow it.
                    let ca: Option<StoredCa> = self
                        .store
                        .doc(&tenant, DocKind::Ca, &ca_id)
                        .await
                        .ok()
                        .flatten();
                    let Some(ca) = ca.filter(|c| c.jitr) else {
                        return Err(self.fail(
                            peer,
                            &(tenant.clone(), id.clone()),
                            "unknown device",
                            &source,
                        ));
                    };
                    if let Err(e) = self
                        .register_from_template(&tenant, &id, ca.jitr_template.as_deref(), &source)
                        .await
                    {
                        tracing::warn!(tenant, device = %id, error = %e, "just-in-time registration failed");
                        return Err(Refusal::NotAuthorized);
                    }
                    match self.device_auth(&tenant, &id).await {
                        Ok(Some(a)) => a,
                        _ => return Err(Refusal::Unavailable),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "registry lookup failed");
                    return Err(Refusal::Unavailable);
                }
            };
            // Pinning: a device with certificate credentials accepts only those certificates.
            let now = now_millis();
            let pinned: Vec<&Credential> = auth
                .credentials
                .iter()
                .filter(|c| c.kind == CredentialKind::Certificate)
                .collect();
            if !pinned.is_empty()
                && !pinned.iter().any(|c| {
                    c.is_active(now)
                        && c.fingerprint.as_deref() == Some(leaf.fingerprint_sha256.as_str())
                })
            {
                return Err(self.fail(
                    peer,
                    &(tenant.clone(), id.clone()),
                    "certificate not pinned to the device",
                    &source,
                ));
            }
            cert_info = Some(leaf);
            (tenant, id, auth)
        } else {
            let Some(username) = c.username else {
                self.metrics.auth_failure.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::BadCredentials);
            };
            let (tenant, device) = split_username(username);
            let key = (tenant.to_string(), device.to_string());
            // A throttled device id still admits proof that costs nothing to check (a valid
            // signature, a recently verified password), so that guessing cannot lock a device out.
            let throttled = self.failures_by_device.blocked(&key).is_some();
            let password = c.password.unwrap_or_default();
            let auth = match self.device_auth(tenant, device).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "registry lookup failed");
                    return Err(Refusal::Unavailable);
                }
            };
            let ok = if jwt::looks_like_jwt(password) {
                // Verified even for unknown devices: the time taken must not tell them apart.
                let valid = self.check_token(tenant, device, auth.as_deref(), password);
                valid && auth.is_some()
            } else {
                used_credential = self
                    .check_password(tenant, auth.as_deref(), password, throttled)
                    .await;
                used_credential.is_some()
            };
            if !ok && throttled {
                self.metrics.auth_throttled.fetch_add(1, Ordering::Relaxed);
                self.failures_by_addr.failure(&peer);
                return Err(Refusal::BadCredentials);
            }
            let Some(auth) = auth.filter(|_| ok) else {
                return Err(self.fail(peer, &key, "bad credentials", &source));
            };
            (key.0, key.1, auth)
        };
        let key = (tenant.clone(), device_id.clone());
        // The source address's count is not cleared: one valid credential (say a shared claim
        // credential) must not reset the back-off of an address that is guessing others.
        self.failures_by_device.success(&key);
        if auth.device.status == DeviceStatus::Disabled {
            self.security_event(
                &tenant,
                "auth.disabled_device",
                &device_id,
                &source,
                "device is disabled",
            );
            return Err(Refusal::NotAuthorized);
        }
        let docs = match self.policy_documents(&auth.device).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "loading policy failed");
                return Err(Refusal::Unavailable);
            }
        };
        let cert = cert_info.map(|i| OwnedCertVars {
            cn: i.subject_cn.unwrap_or_default(),
            serial: i.serial_hex,
            fingerprint: i.fingerprint_sha256,
        });
        let policy = compile(&docs, &auth.device, c.client_id, cert.as_ref());
        if !policy.can_connect(c.client_id) {
            self.security_event(
                &tenant,
                "auth.client_id_refused",
                &device_id,
                &source,
                c.client_id,
            );
            return Err(Refusal::NotAuthorized);
        }
        let rt = self
            .tenant_runtime(&tenant)
            .ok_or(Refusal::BadCredentials)?;
        let quotas = &rt.tenant.settings.quotas;
        let count = rt.limits.connections.fetch_add(1, Ordering::Relaxed) + 1;
        // A reconnect that takes over the device's own session frees the slot it needs, so it
        // is not refused (the count is briefly one over while the old connection closes).
        let takes_over = || {
            self.live.lock().get(&key).is_some_and(|v| {
                v.iter()
                    .filter_map(Weak::upgrade)
                    .any(|a| a.client_id == c.client_id)
            })
        };
        if quotas.max_connections > 0 && count > quotas.max_connections && !takes_over() {
            rt.limits.connections.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .connection_quota_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::QuotaExceeded);
        }
        self.metrics.auth_success.fetch_add(1, Ordering::Relaxed);
        let narrower = policy.receive_narrower_than_subscribe();
        let access = Arc::new(DeviceAccess {
            registry: self.me.clone(),
            tenant_id: TenantId::new(&tenant),
            device_id: device_id.clone(),
            client_id: c.client_id.to_string(),
            policy: RwLock::new(Arc::new(policy)),
            cert,
            check_deliveries: AtomicBool::new(narrower),
            revoked: AtomicBool::new(false),
            device_quota: self.device_quota(&key, quotas),
            tenant_limits: rt.limits.clone(),
            peer: c.peer,
            protocol: c.protocol,
            recorded: AtomicBool::new(false),
            closing_reason: AtomicU8::new(0),
        });
        {
            let mut live = self.live.lock();
            let v = live.entry(key.clone()).or_default();
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&access));
        }
        // A disable, revocation or deletion that landed while this connect was being checked
        // did not see it in `live`: check again against the database.
        if self.cache_generation.load(Ordering::SeqCst) != generation
            && !self
                .still_valid(
                    &key,
                    used_credential.as_deref(),
                    access.cert.as_ref().map(|c| c.fingerprint.as_str()),
                )
                .await
        {
            access.revoked.store(true, Ordering::Relaxed);
            return Err(Refusal::NotAuthorized);
        }
        self.connected(key, &access, source);
        Ok(Grant {
            tenant: access.tenant_id.clone(),
            access: Some(access),
        })
    }

    fn device_quota(&self, key: &LiveKey, quotas: &Quotas) -> Option<Arc<RateBuckets>> {
        let rates = (quotas.device_messages_per_sec, quotas.device_bytes_per_sec);
        let mut map = self.device_quotas.lock();
        if let Some(q) = map.get(key).filter(|q| q.rates == rates) {
            return Some(q.clone());
        }
        let q = Arc::new(RateBuckets::new(rates)?);
        if map.len() >= DEVICE_QUOTAS_MAX {
            // Bounded: forget the buckets of devices not connected now.
            map.retain(|_, q| Arc::strong_count(q) > 1);
        }
        map.insert(key.clone(), q.clone());
        Some(q)
    }

    /// Re-reads the device (bypassing the cache): it exists, is enabled, and the credential or
    /// certificate it used is still good.
    async fn still_valid(
        &self,
        key: &LiveKey,
        credential: Option<&str>,
        cert: Option<&str>,
    ) -> bool {
        match self.store.device(&key.0, &key.1).await {
            Ok(Some(d)) if d.status == DeviceStatus::Enabled => {}
            _ => return false,
        }
        if let Some(fp) = cert
            && self
                .revoked
                .read()
                .contains(&(key.0.clone(), fp.to_string()))
        {
            return false;
        }
        match credential {
            None => true,
            Some(id) => self
                .store
                .credentials(&key.0, &key.1)
                .await
                .is_ok_and(|cs| cs.iter().any(|c| c.id == id && c.is_active(now_millis()))),
        }
    }

    /// Records an accepted connection.
    fn connected(&self, key: LiveKey, access: &DeviceAccess, source: String) {
        let mut p = self.pending_connectivity.lock();
        let now = now_millis();
        access.recorded.store(true, Ordering::Relaxed);
        if self.config.connectivity_history > 0 {
            self.push_event(
                &mut p,
                PendingEvent {
                    key: key.clone(),
                    at: now,
                    kind: ConnectivityEventKind::Connected,
                    reason: None,
                    client_id: access.client_id.clone(),
                    peer: access.peer,
                    protocol: access.protocol,
                },
            );
        }
        let state = p.states.entry(key).or_default();
        state.online = true;
        state.last_seen = Some(now);
        state.last_connected_at = Some(now);
        state.remote_addr = Some(source);
        state.protocol = Some(access.protocol.into());
    }

    fn push_event(&self, p: &mut PendingConnectivity, e: PendingEvent) {
        if p.events.len() >= PENDING_EVENTS_MAX {
            p.events.pop_front();
            self.metrics
                .connectivity_events_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        p.events.push_back(e);
    }

    fn disconnected(&self, access: &DeviceAccess) {
        let key = (
            access.tenant_id.as_str().to_string(),
            access.device_id.clone(),
        );
        let still_online = {
            let mut live = self.live.lock();
            match live.get_mut(&key) {
                Some(v) => {
                    v.retain(|w| w.strong_count() > 0);
                    let online = !v.is_empty();
                    if !online {
                        live.remove(&key);
                    }
                    online
                }
                None => false,
            }
        };
        // A connect refused before it was recorded (revoked while being checked) leaves no
        // trace.
        if !access.recorded.load(Ordering::Relaxed) {
            return;
        }
        let reason = DisconnectReason::from_code(access.closing_reason.load(Ordering::Relaxed));
        let mut p = self.pending_connectivity.lock();
        let now = now_millis();
        if self.config.connectivity_history > 0 {
            self.push_event(
                &mut p,
                PendingEvent {
                    key: key.clone(),
                    at: now,
                    kind: ConnectivityEventKind::Disconnected,
                    reason,
                    client_id: access.client_id.clone(),
                    peer: access.peer,
                    protocol: access.protocol,
                },
            );
        }
        // Every connection's end is recorded (a device may have several, and a takeover ends
        // one while the other stays); `online` says whether any is left.
        let state = p.states.entry(key).or_default();
        state.online = still_online;
        state.last_seen = Some(now);
        state.last_disconnected_at = Some(now);
        state.disconnect_reason = reason.map(|r| r.as_str().to_string());
    }
}

impl Authenticator for Registry {
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(self.authenticate_device(credentials))
    }
}

fn merge_query(into: &mut DeviceQuery, q: DeviceQuery) -> Result<()> {
    for (k, v) in q.tags {
        if into.tags.get(&k).is_some_and(|x| *x != v) {
            // Contradictory: nothing can match; keep the stricter (empty) result.
            into.online = Some(true);
            into.status = Some(DeviceStatus::Enabled);
            into.name_prefix = Some("\u{10FFFF}".into());
        }
        into.tags.insert(k, v);
    }
    if q.device_type.is_some() {
        into.device_type = q.device_type;
    }
    if q.status.is_some() {
        into.status = q.status;
    }
    if q.name_prefix.is_some() {
        into.name_prefix = q.name_prefix;
    }
    if q.online.is_some() {
        into.online = q.online;
    }
    Ok(())
}

fn parse_token_keys(doc: &TokenKeyDoc) -> Result<Vec<VerificationKey>> {
    let mut keys = Vec::new();
    if let Some(pem) = &doc.pem {
        keys.push(
            VerificationKey::from_pem(pem, None)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?,
        );
    }
    if let Some(jwks) = &doc.jwks {
        keys.extend(
            VerificationKey::from_jwks(jwks).map_err(|e| RegistryError::Invalid(e.to_string()))?,
        );
    }
    if keys.is_empty() {
        return Err(RegistryError::Invalid(
            "give a PEM public key (pem) or a JWK set (jwks)".into(),
        ));
    }
    Ok(keys)
}

/// A CA record as stored (with the key of a built-in CA).
#[derive(Serialize, Deserialize)]
struct StoredCa {
    #[serde(flatten)]
    record: CaRecord,
    key_pem: Option<String>,
}

impl StoredCa {
    fn from(r: &CaRecord) -> StoredCa {
        StoredCa {
            record: r.clone(),
            key_pem: r.key_pem.clone(),
        }
    }
}

impl std::ops::Deref for StoredCa {
    type Target = CaRecord;
    fn deref(&self) -> &CaRecord {
        &self.record
    }
}

impl From<StoredCa> for CaRecord {
    fn from(s: StoredCa) -> CaRecord {
        CaRecord {
            key_pem: s.key_pem,
            ..s.record
        }
    }
}

/// Certificate fields kept for recompiling a policy.
#[derive(Debug, Clone)]
struct OwnedCertVars {
    cn: String,
    serial: String,
    fingerprint: String,
}

fn compile(
    docs: &[PolicyDocument],
    d: &Device,
    client_id: &str,
    cert: Option<&OwnedCertVars>,
) -> CompiledPolicy {
    let mut vars = PolicyVars::new(&d.tenant, &d.id, client_id).with_tags(&d.tags);
    if let Some(t) = &d.device_type {
        vars = vars.with_device_type(t);
    }
    if let Some(c) = cert {
        vars = vars.with_cert(CertVars {
            cn: &c.cn,
            serial: &c.serial,
            fingerprint: &c.fingerprint,
        });
    }
    let refs: Vec<&PolicyDocument> = docs.iter().collect();
    CompiledPolicy::from_documents(&refs, &vars)
}

/// What one connected device may do; the adapter holds it for the connection's life.
pub struct DeviceAccess {
    registry: Weak<Registry>,
    tenant_id: TenantId,
    device_id: String,
    client_id: String,
    policy: RwLock<Arc<CompiledPolicy>>,
    cert: Option<OwnedCertVars>,
    /// Set when the policy restricts receiving beyond subscribing, or changed since connect.
    check_deliveries: AtomicBool,
    revoked: AtomicBool,
    device_quota: Option<Arc<RateBuckets>>,
    tenant_limits: Arc<TenantLimits>,
    /// Remote address and protocol, for the connectivity history.
    peer: SocketAddr,
    protocol: &'static str,
    /// The connect was recorded (so its end is too).
    recorded: AtomicBool,
    /// Why the connection is ending ([`DisconnectReason::code`]; 0 = not said).
    closing_reason: AtomicU8,
}

impl Access for DeviceAccess {
    fn device_id(&self) -> &str {
        &self.device_id
    }
    fn can_publish(&self, topic: &str) -> bool {
        !self.revoked.load(Ordering::Relaxed) && self.policy.read().can_publish(topic)
    }
    fn can_subscribe(&self, filter: &str) -> bool {
        !self.revoked.load(Ordering::Relaxed) && self.policy.read().can_subscribe(filter)
    }
    fn can_receive(&self, topic: &str) -> bool {
        !self.revoked.load(Ordering::Relaxed) && self.policy.read().can_receive(topic)
    }
    fn check_deliveries(&self) -> bool {
        self.check_deliveries.load(Ordering::Relaxed) || self.revoked.load(Ordering::Relaxed)
    }
    fn session_resumed(&self) {
        self.check_deliveries.store(true, Ordering::Relaxed);
    }
    fn admit(&self, payload_bytes: usize) -> Admission {
        let bytes = payload_bytes as u64;
        let tenant = if self.tenant_limits.limited.load(Ordering::Relaxed) {
            self.tenant_limits.buckets.read().clone()
        } else {
            None
        };
        let device = self.device_quota.as_deref();
        let tenant = tenant.as_deref();
        let ok = (device.is_none() && tenant.is_none())
            || take_all(&[
                (tenant.and_then(|t| t.messages.as_ref()), 1),
                (tenant.and_then(|t| t.bytes.as_ref()), bytes),
                (device.and_then(|d| d.messages.as_ref()), 1),
                (device.and_then(|d| d.bytes.as_ref()), bytes),
            ]);
        if ok {
            Admission::Admit
        } else {
            if let Some(r) = self.registry.upgrade() {
                r.metrics
                    .publish_quota_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
            Admission::QuotaExceeded
        }
    }
    fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }
    fn closing(&self, reason: DisconnectReason) {
        // The first reason given counts.
        let _ = self.closing_reason.compare_exchange(
            0,
            reason.code(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl Drop for DeviceAccess {
    fn drop(&mut self) {
        self.tenant_limits
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(r) = self.registry.upgrade() {
            r.disconnected(self);
        }
    }
}
