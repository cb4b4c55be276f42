//! Where the registry's records live: the [`RegistryStore`] trait and its embedded SQLite
//! implementation ([`SqliteStore`]), which needs no external service.
//!
//! Devices, their tags, group memberships, credentials, API tokens, revoked certificates and the
//! audit log have their own tables and indexes (they are large and queried); the small
//! per-tenant documents — device types, groups, policies, CAs, provisioning templates, signing
//! keys — share one `documents` table. A cluster deployment implements the same trait on
//! PostgreSQL; the SQL here sticks to what both accept.
//!
//! Durability: every write is one SQLite transaction in WAL mode. With `synchronous = NORMAL`
//! (the default, `fsync = never`) a committed write survives the hub being killed; with
//! `synchronous = FULL` (`fsync = always`) it also survives a power cut.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use serde::{Serialize, de::DeserializeOwned};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
// Dynamic SQL here only splices constant table and column names, never input.

use crate::error::{RegistryError, Result};
use crate::model::*;

/// Kinds of small per-tenant documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// [`DeviceType`].
    DeviceType,
    /// [`Group`].
    Group,
    /// Named policies ([`NamedPolicy`]).
    Policy,
    /// [`CaRecord`].
    Ca,
    /// [`ProvisioningTemplate`].
    Template,
    /// Hub JWT signing keys and the tenant's registered verification keys.
    TokenKey,
}

impl DocKind {
    fn as_str(self) -> &'static str {
        match self {
            DocKind::DeviceType => "device_type",
            DocKind::Group => "group",
            DocKind::Policy => "policy",
            DocKind::Ca => "ca",
            DocKind::Template => "template",
            DocKind::TokenKey => "token_key",
        }
    }
}

/// A certificate revoked in a tenant (checked on every TLS connect).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RevokedCert {
    /// Tenant.
    pub tenant: String,
    /// SHA-256 fingerprint (hex).
    pub fingerprint: String,
    /// Serial (hex), if known.
    pub serial: Option<String>,
    /// When.
    pub revoked_at: Millis,
    /// Why.
    pub reason: String,
}

/// A connectivity change to persist.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectivityUpdate {
    /// Tenant.
    pub tenant: String,
    /// Device.
    pub device_id: String,
    /// The change: `online` is written; of the other fields, those that are `None` are left as
    /// they are, except `disconnect_reason`, which is written whenever `last_disconnected_at` is
    /// (see [`Connectivity::apply`]).
    pub state: Connectivity,
}

/// A connectivity event to append to a device's history.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectivityEventRecord {
    /// Tenant.
    pub tenant: String,
    /// Device.
    pub device_id: String,
    /// The event; its `seq` is assigned by the store.
    pub event: ConnectivityEvent,
}

/// The registry's storage. Every method is one atomic transaction.
#[allow(async_fn_in_trait)]
pub trait RegistryStore: Send + Sync + 'static {
    // Tenants.
    /// Creates a tenant.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// A tenant.
    async fn tenant(&self, id: &str) -> Result<Option<Tenant>>;
    /// All tenants.
    async fn tenants(&self) -> Result<Vec<Tenant>>;
    /// Replaces a tenant's name and settings.
    async fn update_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// Deletes a tenant and everything in it.
    async fn delete_tenant(&self, id: &str) -> Result<bool>;

    // Devices.
    /// Inserts devices (with their tags and static-group memberships); one result per device,
    /// `Conflict` for ids that exist. All rows are written in one transaction.
    async fn insert_devices(&self, devices: &[Device]) -> Result<Vec<Result<()>>>;
    /// A device.
    async fn device(&self, tenant: &str, id: &str) -> Result<Option<Device>>;
    /// Replaces a device's fields, tags and memberships — only if it still has the
    /// `updated_at` it was read with (otherwise `Conflict`: a concurrent change would be undone).
    async fn update_device(&self, device: &Device, read_at: Millis) -> Result<()>;
    /// Deletes a device with its tags, memberships and credentials.
    async fn delete_device(&self, tenant: &str, id: &str) -> Result<bool>;
    /// A page of devices; `static_group` restricts to members of a static group.
    async fn list_devices(
        &self,
        tenant: &str,
        listing: &DeviceListing,
        static_group: Option<&str>,
    ) -> Result<Page<Device>>;
    /// How many devices a tenant has.
    async fn count_devices(&self, tenant: &str) -> Result<u64>;
    /// Persists connectivity changes (batched by the caller).
    async fn set_connectivity(&self, updates: &[ConnectivityUpdate]) -> Result<()>;
    /// Persists connectivity changes and appends history events, in one transaction. Events of
    /// devices that do not exist (any more) are skipped; afterwards each device that got events
    /// keeps only its `keep` newest ones.
    async fn record_connectivity(
        &self,
        updates: &[ConnectivityUpdate],
        events: &[ConnectivityEventRecord],
        keep: u32,
    ) -> Result<()>;
    /// A device's connectivity events older than `before` (a `seq`; `None`: from the newest),
    /// newest first, at most `limit` (1–1000).
    async fn connectivity_events(
        &self,
        tenant: &str,
        device_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ConnectivityEvent>>;
    /// Marks every device offline (at start: nobody is connected yet).
    async fn reset_online(&self) -> Result<()>;
    /// Adds a device to a static group.
    async fn add_member(&self, tenant: &str, group: &str, device_id: &str) -> Result<()>;
    /// Removes a device from a static group.
    async fn remove_member(&self, tenant: &str, group: &str, device_id: &str) -> Result<bool>;

    // Documents.
    /// Creates or replaces a document.
    async fn put_doc<T: Serialize + Sync>(
        &self,
        tenant: &str,
        kind: DocKind,
        name: &str,
        doc: &T,
    ) -> Result<()>;
    /// A document.
    async fn doc<T: DeserializeOwned>(
        &self,
        tenant: &str,
        kind: DocKind,
        name: &str,
    ) -> Result<Option<T>>;
    /// All documents of a kind in a tenant (`None`: in every tenant), by name.
    async fn docs<T: DeserializeOwned>(
        &self,
        tenant: Option<&str>,
        kind: DocKind,
    ) -> Result<Vec<(String, T)>>;
    /// Deletes a document.
    async fn delete_doc(&self, tenant: &str, kind: DocKind, name: &str) -> Result<bool>;

    // Credentials.
    /// Stores a credential.
    async fn insert_credential(&self, tenant: &str, credential: &Credential) -> Result<()>;
    /// A device's credentials, newest first.
    async fn credentials(&self, tenant: &str, device_id: &str) -> Result<Vec<Credential>>;
    /// Marks a credential revoked.
    async fn revoke_credential(&self, tenant: &str, device_id: &str, id: &str) -> Result<bool>;
    /// Sets when a credential stops working (rotation overlap).
    async fn expire_credential(
        &self,
        tenant: &str,
        device_id: &str,
        id: &str,
        at: Millis,
    ) -> Result<bool>;

    // Revoked certificates.
    /// Revokes a certificate.
    async fn revoke_cert(&self, cert: &RevokedCert) -> Result<()>;
    /// Every revoked certificate (loaded into memory at start).
    async fn revoked_certs(&self) -> Result<Vec<RevokedCert>>;

    // API tokens.
    /// Stores a token by the hash of its secret.
    async fn insert_token(&self, token: &ApiToken, secret_hash: &str) -> Result<()>;
    /// The token whose secret hashes to this.
    async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<ApiToken>>;
    /// Tokens (of a tenant, or all).
    async fn tokens(&self, tenant: Option<&str>) -> Result<Vec<ApiToken>>;
    /// A token by id.
    async fn token(&self, id: &str) -> Result<Option<ApiToken>>;
    /// Revokes a token.
    async fn revoke_token(&self, id: &str) -> Result<bool>;

    // Audit.
    /// Appends events; their `seq` is assigned by the store.
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<()>;
    /// Events matching the query, newest first.
    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;
    /// Deletes events older than `before`; returns how many.
    async fn purge_audit(&self, before: Millis) -> Result<u64>;
}

/// Version 1: the base schema ([`SCHEMA`]). Version 2: device connect/disconnect times and
/// reason, and the connectivity history ([`migrate_v2`]).
const SCHEMA_VERSION: i64 = 2;

/// The version 1 schema, created first on a new database; migrations bring it up to date.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT,
    status TEXT NOT NULL,
    tags TEXT NOT NULL,
    attributes TEXT NOT NULL,
    policy TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER NOT NULL DEFAULT 0,
    remote_addr TEXT,
    protocol TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS devices_by_name ON devices (tenant, name, id);
CREATE INDEX IF NOT EXISTS devices_by_created ON devices (tenant, created_at, id);
CREATE INDEX IF NOT EXISTS devices_by_last_seen ON devices (tenant, last_seen, id);
CREATE INDEX IF NOT EXISTS devices_by_type ON devices (tenant, type, id);
-- The console's connection and status filters, in each sort order: an equality then the order,
-- so a page is an index range whatever share of the fleet matches. (Without them a filter that
-- matches few devices walks the whole tenant: 2.7 s for online=true sorted by name at 1,000,000
-- devices.) Created on open, so existing databases get them too.
CREATE INDEX IF NOT EXISTS devices_by_online ON devices (tenant, online, id);
CREATE INDEX IF NOT EXISTS devices_by_online_name ON devices (tenant, online, name, id);
CREATE INDEX IF NOT EXISTS devices_by_online_created ON devices (tenant, online, created_at, id);
CREATE INDEX IF NOT EXISTS devices_by_online_last_seen ON devices (tenant, online, last_seen, id);
CREATE INDEX IF NOT EXISTS devices_by_status ON devices (tenant, status, id);
CREATE INDEX IF NOT EXISTS devices_by_status_name ON devices (tenant, status, name, id);
CREATE INDEX IF NOT EXISTS devices_by_status_created ON devices (tenant, status, created_at, id);
CREATE INDEX IF NOT EXISTS devices_by_status_last_seen ON devices (tenant, status, last_seen, id);
CREATE TABLE IF NOT EXISTS device_tags (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (tenant, key, value, device_id)
) WITHOUT ROWID;
-- Replacing or deleting a device's tags looks them up by device.
CREATE INDEX IF NOT EXISTS device_tags_by_device ON device_tags (tenant, device_id);
CREATE TABLE IF NOT EXISTS group_members (
    tenant TEXT NOT NULL,
    group_name TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (tenant, group_name, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_by_device ON group_members (tenant, device_id);
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY NOT NULL,
    tenant TEXT NOT NULL,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    secret TEXT NOT NULL,
    fingerprint TEXT,
    serial TEXT,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS credentials_by_device ON credentials (tenant, device_id);
CREATE TABLE IF NOT EXISTS revoked_certs (
    tenant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    serial TEXT,
    revoked_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (tenant, fingerprint)
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    created_by TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    tenant TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    source TEXT,
    result TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant, seq);
CREATE TRIGGER IF NOT EXISTS audit_is_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#;

/// The embedded store: one SQLite database file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

/// Options of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `synchronous = FULL`: committed writes survive a power cut, not only a crash.
    pub fsync: bool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore> {
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.fsync {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-65536");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(connect)
            .await?;
        Self::init(pool).await
    }

    /// A private in-memory database (tests, `storage.persistence = false`).
    pub async fn in_memory() -> Result<SqliteStore> {
        let connect = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: every connection to `:memory:` is a different database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect)
            .await?;
        Self::init(pool).await
    }

    async fn init(pool: SqlitePool) -> Result<SqliteStore> {
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        if version > SCHEMA_VERSION {
            return Err(RegistryError::Corrupt(format!(
                "the registry database has schema version {version}, newer than this binary \
                 understands ({SCHEMA_VERSION}); run a newer ferrohub"
            )));
        }
        // Each step is one transaction (SQLite's DDL and user_version are transactional), so a
        // crash during an upgrade leaves the database at the previous version.
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        if version < 1 {
            sqlx::raw_sql("PRAGMA user_version = 1")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if version < 2 {
            let mut tx = pool.begin().await?;
            migrate_v2(&mut tx).await?;
            sqlx::raw_sql("PRAGMA user_version = 2")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(SqliteStore { pool })
    }

    /// Closes the pool (flushes the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Version 2: when the device last connected and disconnected and why, and the bounded history
/// of connects and disconnects. Columns already there (a half-applied upgrade by hand) are kept.
async fn migrate_v2(tx: &mut sqlx::SqliteConnection) -> Result<()> {
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('devices')")
        .fetch_all(&mut *tx)
        .await?;
    for (column, ty) in [
        ("last_connected_at", "INTEGER"),
        ("last_disconnected_at", "INTEGER"),
        ("disconnect_reason", "TEXT"),
    ] {
        if !columns.iter().any(|c| c == column) {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE devices ADD COLUMN {column} {ty}"
            )))
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS connectivity_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL,
            device_id TEXT NOT NULL,
            at INTEGER NOT NULL,
            event TEXT NOT NULL,
            reason TEXT,
            client_id TEXT,
            remote_addr TEXT,
            protocol TEXT
        );
        CREATE INDEX IF NOT EXISTS connectivity_events_by_device
            ON connectivity_events (tenant, device_id, seq);",
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| RegistryError::Invalid(e.to_string()))
}

fn unjson<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn opt_millis(v: i64) -> Option<Millis> {
    (v > 0).then_some(v)
}

const DEVICE_COLUMNS: &str = "d.tenant, d.id, d.name, d.type, d.status, d.tags, d.attributes, \
     d.policy, d.online, d.last_seen, d.remote_addr, d.protocol, d.last_connected_at, \
     d.last_disconnected_at, d.disconnect_reason, d.created_at, d.updated_at";

fn device_from_row(row: &SqliteRow) -> Result<Device> {
    Ok(Device {
        tenant: row.try_get("tenant")?,
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        device_type: row.try_get("type")?,
        status: DeviceStatus::parse(row.try_get::<&str, _>("status")?),
        tags: unjson(row.try_get("tags")?)?,
        attributes: unjson(row.try_get("attributes")?)?,
        policy: row.try_get("policy")?,
        groups: Vec::new(),
        connectivity: Connectivity {
            online: row.try_get::<i64, _>("online")? != 0,
            last_seen: opt_millis(row.try_get("last_seen")?),
            remote_addr: row.try_get("remote_addr")?,
            protocol: row.try_get("protocol")?,
            last_connected_at: row.try_get("last_connected_at")?,
            last_disconnected_at: row.try_get("last_disconnected_at")?,
            disconnect_reason: row.try_get("disconnect_reason")?,
        },
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn connectivity_event_from_row(row: &SqliteRow) -> Result<ConnectivityEvent> {
    let event: &str = row.try_get("event")?;
    Ok(ConnectivityEvent {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        event: ConnectivityEventKind::parse(event)
            .ok_or_else(|| RegistryError::Corrupt(format!("connectivity event {event}")))?,
        reason: row.try_get("reason")?,
        client_id: row.try_get("client_id")?,
        remote_addr: row.try_get("remote_addr")?,
        protocol: row.try_get("protocol")?,
    })
}

fn credential_from_row(row: &SqliteRow) -> Result<Credential> {
    let kind: &str = row.try_get("kind")?;
    Ok(Credential {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        kind: CredentialKind::parse(kind)
            .ok_or_else(|| RegistryError::Corrupt(format!("credential kind {kind}")))?,
        label: row.try_get("label")?,
        secret: row.try_get("secret")?,
        fingerprint: row.try_get("fingerprint")?,
        serial: row.try_get("serial")?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn token_from_row(row: &SqliteRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(row.try_get::<&str, _>("role")?),
        tenant: row.try_get("tenant")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_by: row.try_get("created_by")?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        tenant: row.try_get("tenant")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        source: row.try_get("source")?,
        result: if row.try_get::<&str, _>("result")? == "success" {
            AuditResult::Success
        } else {
            AuditResult::Failure
        },
        detail: unjson(row.try_get("detail")?)?,
    })
}

/// The sort column of a listing, as SQL, and the cursor value of a device for it.
fn sort_column(sort: SortKey) -> &'static str {
    match sort {
        SortKey::Id => "d.id",
        SortKey::Name => "d.name",
        SortKey::CreatedAt => "d.created_at",
        SortKey::LastSeen => "d.last_seen",
    }
}

#[derive(Serialize, serde::Deserialize)]
#[serde(untagged)]
enum CursorValue {
    Int(i64),
    Text(String),
}

fn encode_cursor(sort: SortKey, d: &Device) -> String {
    let value = match sort {
        SortKey::Id => CursorValue::Text(String::new()),
        SortKey::Name => CursorValue::Text(d.name.clone()),
        SortKey::CreatedAt => CursorValue::Int(d.created_at),
        SortKey::LastSeen => CursorValue::Int(d.connectivity.last_seen.unwrap_or(0)),
    };
    let raw = serde_json::to_vec(&(value, &d.id)).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Result<(CursorValue, String)> {
    let bad = || RegistryError::Invalid("cursor is not valid: pass next_cursor unchanged".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    serde_json::from_slice(&raw).map_err(|_| bad())
}

async fn load_groups(
    conn: &mut sqlx::SqliteConnection,
    tenant: &str,
    devices: &mut [Device],
) -> Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut qb: QueryBuilder<Sqlite> =
        QueryBuilder::new("SELECT device_id, group_name FROM group_members WHERE tenant = ");
    qb.push_bind(tenant);
    qb.push(" AND device_id IN (");
    let mut sep = qb.separated(", ");
    for d in devices.iter() {
        sep.push_bind(&d.id);
    }
    qb.push(") ORDER BY group_name");
    let rows = qb.build().fetch_all(&mut *conn).await?;
    let mut by_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in rows {
        by_device
            .entry(row.try_get("device_id")?)
            .or_default()
            .push(row.try_get("group_name")?);
    }
    for d in devices {
        if let Some(g) = by_device.remove(&d.id) {
            d.groups = g;
        }
    }
    Ok(())
}

/// Writes a device's tags and static-group memberships; `fresh` devices have none to replace.
async fn write_device_children(
    tx: &mut sqlx::SqliteConnection,
    device: &Device,
    fresh: bool,
) -> Result<(), sqlx::Error> {
    if !fresh {
        sqlx::query("DELETE FROM device_tags WHERE tenant = $1 AND device_id = $2")
            .bind(&device.tenant)
            .bind(&device.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM group_members WHERE tenant = $1 AND device_id = $2")
            .bind(&device.tenant)
            .bind(&device.id)
            .execute(&mut *tx)
            .await?;
    }
    for (k, v) in &device.tags {
        sqlx::query(
            "INSERT INTO device_tags (tenant, key, value, device_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(&device.tenant)
        .bind(k)
        .bind(v)
        .bind(&device.id)
        .execute(&mut *tx)
        .await?;
    }
    for g in &device.groups {
        sqlx::query(
            "INSERT OR IGNORE INTO group_members (tenant, group_name, device_id) VALUES ($1, $2, $3)",
        )
        .bind(&device.tenant)
        .bind(g)
        .bind(&device.id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl RegistryStore for SqliteStore {
    async fn create_tenant(&self, t: &Tenant) -> Result<()> {
        let r = sqlx::query(
            "INSERT INTO tenants (id, name, settings, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(json(&t.settings)?)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(RegistryError::Conflict(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, name, settings, created_at FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| tenant_from_row(&r)).transpose()
    }

    async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name, settings, created_at FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn update_tenant(&self, t: &Tenant) -> Result<()> {
        let r = sqlx::query("UPDATE tenants SET name = $2, settings = $3 WHERE id = $1")
            .bind(&t.id)
            .bind(&t.name)
            .bind(json(&t.settings)?)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        for table in [
            "devices",
            "device_tags",
            "group_members",
            "documents",
            "credentials",
            "revoked_certs",
            "connectivity_events",
        ] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE tenant = $1"
            )))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE api_tokens SET revoked_at = $2 WHERE tenant = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        let r = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn insert_devices(&self, devices: &[Device]) -> Result<Vec<Result<()>>> {
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(devices.len());
        for d in devices {
            let r = sqlx::query(
                "INSERT INTO devices (tenant, id, name, type, status, tags, attributes, policy, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (tenant, id) DO NOTHING",
            )
            .bind(&d.tenant)
            .bind(&d.id)
            .bind(&d.name)
            .bind(&d.device_type)
            .bind(d.status.as_str())
            .bind(json(&d.tags)?)
            .bind(json(&d.attributes)?)
            .bind(&d.policy)
            .bind(d.created_at)
            .bind(d.updated_at)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() == 0 {
                results.push(Err(RegistryError::Conflict(format!("device {}", d.id))));
                continue;
            }
            write_device_children(&mut tx, d, true).await?;
            results.push(Ok(()));
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn device(&self, tenant: &str, id: &str) -> Result<Option<Device>> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.tenant = $1 AND d.id = $2"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut d = [device_from_row(&row)?];
        load_groups(&mut conn, tenant, &mut d).await?;
        let [d] = d;
        Ok(Some(d))
    }

    async fn update_device(&self, d: &Device, read_at: Millis) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE devices SET name = $3, type = $4, status = $5, tags = $6, attributes = $7, \
             policy = $8, updated_at = $9 WHERE tenant = $1 AND id = $2 AND updated_at = $10",
        )
        .bind(&d.tenant)
        .bind(&d.id)
        .bind(&d.name)
        .bind(&d.device_type)
        .bind(d.status.as_str())
        .bind(json(&d.tags)?)
        .bind(json(&d.attributes)?)
        .bind(&d.policy)
        .bind(d.updated_at)
        .bind(read_at)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT updated_at FROM devices WHERE tenant = $1 AND id = $2")
                    .bind(&d.tenant)
                    .bind(&d.id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Err(match exists {
                Some(_) => RegistryError::Stale(format!(
                    "device {} was changed by someone else meanwhile; read it again and retry",
                    d.id
                )),
                None => RegistryError::NotFound(format!("device {}", d.id)),
            });
        }
        write_device_children(&mut tx, d, false).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_device(&self, tenant: &str, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        for table in [
            "device_tags",
            "group_members",
            "credentials",
            "connectivity_events",
        ] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE tenant = $1 AND device_id = $2"
            )))
            .bind(tenant)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let r = sqlx::query("DELETE FROM devices WHERE tenant = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn list_devices(
        &self,
        tenant: &str,
        listing: &DeviceListing,
        static_group: Option<&str>,
    ) -> Result<Page<Device>> {
        let limit = listing.limit.clamp(1, 1000);
        let q = &listing.query;
        let col = sort_column(listing.sort);
        let (cmp, order) = if listing.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let mut conn = self.pool.acquire().await?;
        let mut tags: Vec<(&String, &String)> = q.tags.iter().collect();
        // With a tag filter and id order, walk the tag index of the rarest tag: it yields matching
        // ids in order, so a page costs the page (plus the devices skipped by the other filters),
        // however rare or common the tag. Without that, SQLite (which has no statistics per tag
        // value) may walk the devices in id order and probe each one's tags: a rare tag then
        // scans the whole tenant.
        let driving_tag = if listing.sort == SortKey::Id && !tags.is_empty() {
            // The rarest tag, estimated on each tag's first TAG_PROBE index entries: a tag with
            // fewer is rarer than any with more, and among those with more, the one whose
            // TAG_PROBE-th device id comes latest is the sparsest (device ids spread over the
            // same range for every tag). Each estimate is one short index range walk.
            const TAG_PROBE: i64 = 2000;
            let mut best: Option<(i64, String, usize)> = None;
            if tags.len() > 1 {
                for (i, (k, v)) in tags.iter().enumerate() {
                    let (n, last): (i64, Option<String>) = sqlx::query_as(
                        "SELECT COUNT(*), MAX(device_id) FROM (SELECT device_id FROM device_tags \
                         WHERE tenant = $1 AND key = $2 AND value = $3 ORDER BY device_id \
                         LIMIT $4)",
                    )
                    .bind(tenant)
                    .bind(k)
                    .bind(v)
                    .bind(TAG_PROBE)
                    .fetch_one(&mut *conn)
                    .await?;
                    let last = if n < TAG_PROBE {
                        String::new()
                    } else {
                        last.unwrap_or_default()
                    };
                    let rarer = match &best {
                        None => true,
                        Some((bn, _, _)) if n < TAG_PROBE || *bn < TAG_PROBE => n < *bn,
                        Some((_, blast, _)) => last > *blast,
                    };
                    if rarer {
                        best = Some((n, last, i));
                    }
                }
            }
            Some(tags.remove(best.map_or(0, |(_, _, i)| i)))
        } else {
            None
        };
        // The device id column to filter, compare and order by: the tag index's when it drives.
        let id_col = if driving_tag.is_some() {
            "t0.device_id"
        } else {
            "d.id"
        };
        // Without a driving tag, the page's keys are found first — on the sort index, which also
        // holds the id, so filters such as a tag's EXISTS probe are checked without reading the
        // device row — and only the page's rows are read afterwards. (Selecting the full row in
        // one query makes SQLite read every row it examines, matching or not.)
        let late_rows = driving_tag.is_none();
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(if late_rows {
            format!(
                "SELECT {DEVICE_COLUMNS} FROM (SELECT d.tenant AS k_tenant, d.id AS k_id, \
                 {col} AS k_sort "
            )
        } else {
            format!("SELECT {DEVICE_COLUMNS} ")
        });
        match driving_tag {
            Some((k, v)) => {
                // CROSS JOIN keeps the tag index as the outer loop (SQLite never reorders it).
                qb.push(
                    "FROM device_tags t0 CROSS JOIN devices d WHERE d.tenant = t0.tenant \
                     AND d.id = t0.device_id AND t0.tenant = ",
                );
                qb.push_bind(tenant);
                qb.push(" AND t0.key = ");
                qb.push_bind(k);
                qb.push(" AND t0.value = ");
                qb.push_bind(v);
            }
            None => {
                qb.push("FROM devices d WHERE d.tenant = ");
                qb.push_bind(tenant);
            }
        }
        for (k, v) in tags {
            // Written on the driving id, so that other tags are checked before the device row is
            // read.
            qb.push(format!(
                " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.tenant = {tcol} \
                 AND t.device_id = {id_col} AND t.key = ",
                tcol = if driving_tag.is_some() {
                    "t0.tenant"
                } else {
                    "d.tenant"
                },
            ));
            qb.push_bind(k);
            qb.push(" AND t.value = ");
            qb.push_bind(v);
            qb.push(")");
        }
        if let Some(t) = &q.device_type {
            qb.push(" AND d.type = ");
            qb.push_bind(t);
        }
        if let Some(s) = q.status {
            qb.push(" AND d.status = ");
            qb.push_bind(s.as_str());
        }
        if let Some(p) = &q.name_prefix {
            // Range on the name index instead of LIKE (which would need escaping and a scan).
            qb.push(" AND d.name >= ");
            qb.push_bind(p);
            qb.push(" AND d.name < ");
            qb.push_bind(format!("{p}\u{10FFFF}"));
        }
        if let Some(p) = &q.id_prefix {
            qb.push(" AND d.id >= ");
            qb.push_bind(p);
            qb.push(" AND d.id < ");
            qb.push_bind(format!("{p}\u{10FFFF}"));
        }
        if let Some(o) = q.online {
            qb.push(" AND d.online = ");
            qb.push_bind(i64::from(o));
        }
        if let Some(g) = static_group {
            qb.push(
                " AND EXISTS (SELECT 1 FROM group_members g WHERE g.tenant = d.tenant \
                 AND g.device_id = d.id AND g.group_name = ",
            );
            qb.push_bind(g);
            qb.push(")");
        }
        if let Some(cursor) = &listing.cursor {
            let (value, id) = decode_cursor(cursor)?;
            match (listing.sort, value) {
                (SortKey::Id, _) => {
                    qb.push(format!(" AND {id_col} {cmp} "));
                    qb.push_bind(id);
                }
                (SortKey::Name, CursorValue::Text(v)) => {
                    qb.push(format!(" AND ({col}, d.id) {cmp} ("));
                    qb.push_bind(v);
                    qb.push(", ");
                    qb.push_bind(id);
                    qb.push(")");
                }
                (SortKey::CreatedAt | SortKey::LastSeen, CursorValue::Int(v)) => {
                    qb.push(format!(" AND ({col}, d.id) {cmp} ("));
                    qb.push_bind(v);
                    qb.push(", ");
                    qb.push_bind(id);
                    qb.push(")");
                }
                _ => {
                    return Err(RegistryError::Invalid(
                        "cursor belongs to a listing with another sort order".into(),
                    ));
                }
            }
        }
        if listing.sort == SortKey::Id {
            qb.push(format!(" ORDER BY {id_col} {order}"));
        } else {
            qb.push(format!(" ORDER BY {col} {order}, d.id {order}"));
        }
        qb.push(" LIMIT ");
        qb.push_bind(i64::from(limit) + 1);
        if late_rows {
            qb.push(format!(
                ") k CROSS JOIN devices d ON d.tenant = k.k_tenant AND d.id = k.k_id \
                 ORDER BY k.k_sort {order}, k.k_id {order}"
            ));
        }
        let rows = qb.build().fetch_all(&mut *conn).await?;
        let mut items = rows
            .iter()
            .map(device_from_row)
            .collect::<Result<Vec<_>>>()?;
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        load_groups(&mut conn, tenant, &mut items).await?;
        let next_cursor = if more {
            items.last().map(|d| encode_cursor(listing.sort, d))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn count_devices(&self, tenant: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn set_connectivity(&self, updates: &[ConnectivityUpdate]) -> Result<()> {
        self.record_connectivity(updates, &[], 0).await
    }

    async fn record_connectivity(
        &self,
        updates: &[ConnectivityUpdate],
        events: &[ConnectivityEventRecord],
        keep: u32,
    ) -> Result<()> {
        let events = if keep == 0 { &[][..] } else { events };
        if updates.is_empty() && events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for u in updates {
            let s = &u.state;
            sqlx::query(
                "UPDATE devices SET online = $3, last_seen = COALESCE($4, last_seen), \
                 remote_addr = COALESCE($5, remote_addr), protocol = COALESCE($6, protocol), \
                 last_connected_at = COALESCE($7, last_connected_at), \
                 disconnect_reason = CASE WHEN $8 IS NULL THEN disconnect_reason ELSE $9 END, \
                 last_disconnected_at = COALESCE($8, last_disconnected_at) \
                 WHERE tenant = $1 AND id = $2",
            )
            .bind(&u.tenant)
            .bind(&u.device_id)
            .bind(i64::from(s.online))
            .bind(s.last_seen)
            .bind(&s.remote_addr)
            .bind(&s.protocol)
            .bind(s.last_connected_at)
            .bind(s.last_disconnected_at)
            .bind(&s.disconnect_reason)
            .execute(&mut *tx)
            .await?;
        }
        let mut touched: Vec<(&str, &str)> = Vec::new();
        for e in events {
            let ev = &e.event;
            // A device deleted meanwhile gets no history back (the deletion and this flush are
            // serialized by SQLite: whichever commits second sees the other).
            sqlx::query(
                "INSERT INTO connectivity_events (tenant, device_id, at, event, reason, client_id, \
                 remote_addr, protocol) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE EXISTS (SELECT 1 FROM devices WHERE tenant = $1 AND id = $2)",
            )
            .bind(&e.tenant)
            .bind(&e.device_id)
            .bind(ev.at)
            .bind(ev.event.as_str())
            .bind(&ev.reason)
            .bind(&ev.client_id)
            .bind(&ev.remote_addr)
            .bind(&ev.protocol)
            .execute(&mut *tx)
            .await?;
            touched.push((&e.tenant, &e.device_id));
        }
        touched.sort_unstable();
        touched.dedup();
        // Bounded history: drop what is older than the `keep`-th newest event of each device
        // that got events now (an index walk of `keep` entries per device).
        for (tenant, device_id) in touched {
            sqlx::query(
                "DELETE FROM connectivity_events WHERE tenant = $1 AND device_id = $2 \
                 AND seq <= (SELECT seq FROM connectivity_events WHERE tenant = $1 \
                 AND device_id = $2 ORDER BY seq DESC LIMIT 1 OFFSET $3)",
            )
            .bind(tenant)
            .bind(device_id)
            .bind(i64::from(keep))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connectivity_events(
        &self,
        tenant: &str,
        device_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ConnectivityEvent>> {
        let rows = sqlx::query(
            "SELECT seq, at, event, reason, client_id, remote_addr, protocol \
             FROM connectivity_events WHERE tenant = $1 AND device_id = $2 AND seq < $3 \
             ORDER BY seq DESC LIMIT $4",
        )
        .bind(tenant)
        .bind(device_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(connectivity_event_from_row).collect()
    }

    async fn reset_online(&self) -> Result<()> {
        sqlx::query("UPDATE devices SET online = 0 WHERE online != 0")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn add_member(&self, tenant: &str, group: &str, device_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO group_members (tenant, group_name, device_id) VALUES ($1, $2, $3)",
        )
        .bind(tenant)
        .bind(group)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_member(&self, tenant: &str, group: &str, device_id: &str) -> Result<bool> {
        let r = sqlx::query(
            "DELETE FROM group_members WHERE tenant = $1 AND group_name = $2 AND device_id = $3",
        )
        .bind(tenant)
        .bind(group)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn put_doc<T: Serialize + Sync>(
        &self,
        tenant: &str,
        kind: DocKind,
        name: &str,
        doc: &T,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO documents (tenant, kind, name, body, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant, kind, name) DO UPDATE SET body = excluded.body, \
             updated_at = excluded.updated_at",
        )
        .bind(tenant)
        .bind(kind.as_str())
        .bind(name)
        .bind(json(doc)?)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn doc<T: DeserializeOwned>(
        &self,
        tenant: &str,
        kind: DocKind,
        name: &str,
    ) -> Result<Option<T>> {
        let body: Option<String> = sqlx::query_scalar(
            "SELECT body FROM documents WHERE tenant = $1 AND kind = $2 AND name = $3",
        )
        .bind(tenant)
        .bind(kind.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        body.map(|b| unjson(&b)).transpose()
    }

    async fn docs<T: DeserializeOwned>(
        &self,
        tenant: Option<&str>,
        kind: DocKind,
    ) -> Result<Vec<(String, T)>> {
        let rows = sqlx::query(
            "SELECT tenant, name, body FROM documents WHERE kind = $1 \
             AND ($2 IS NULL OR tenant = $2) ORDER BY tenant, name",
        )
        .bind(kind.as_str())
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, unjson(r.try_get("body")?)?)))
            .collect()
    }

    async fn delete_doc(&self, tenant: &str, kind: DocKind, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM documents WHERE tenant = $1 AND kind = $2 AND name = $3")
            .bind(tenant)
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if kind == DocKind::Group {
            // A group's memberships go with it: a new group of the same name starts empty.
            sqlx::query("DELETE FROM group_members WHERE tenant = $1 AND group_name = $2")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn insert_credential(&self, tenant: &str, c: &Credential) -> Result<()> {
        sqlx::query(
            "INSERT INTO credentials (id, tenant, device_id, kind, label, secret, fingerprint, \
             serial, expires_at, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&c.id)
        .bind(tenant)
        .bind(&c.device_id)
        .bind(c.kind.as_str())
        .bind(&c.label)
        .bind(&c.secret)
        .bind(&c.fingerprint)
        .bind(&c.serial)
        .bind(c.expires_at)
        .bind(c.created_at)
        .bind(c.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn credentials(&self, tenant: &str, device_id: &str) -> Result<Vec<Credential>> {
        let rows = sqlx::query(
            "SELECT * FROM credentials WHERE tenant = $1 AND device_id = $2 \
             ORDER BY created_at DESC, id",
        )
        .bind(tenant)
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_from_row).collect()
    }

    async fn revoke_credential(&self, tenant: &str, device_id: &str, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE credentials SET revoked_at = $4 WHERE tenant = $1 AND device_id = $2 \
             AND id = $3 AND revoked_at IS NULL",
        )
        .bind(tenant)
        .bind(device_id)
        .bind(id)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn expire_credential(
        &self,
        tenant: &str,
        device_id: &str,
        id: &str,
        at: Millis,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE credentials SET expires_at = $4 WHERE tenant = $1 AND device_id = $2 \
             AND id = $3 AND (expires_at IS NULL OR expires_at > $4)",
        )
        .bind(tenant)
        .bind(device_id)
        .bind(id)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn revoke_cert(&self, c: &RevokedCert) -> Result<()> {
        sqlx::query(
            "INSERT INTO revoked_certs (tenant, fingerprint, serial, revoked_at, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, fingerprint) DO NOTHING",
        )
        .bind(&c.tenant)
        .bind(&c.fingerprint)
        .bind(&c.serial)
        .bind(c.revoked_at)
        .bind(&c.reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoked_certs(&self) -> Result<Vec<RevokedCert>> {
        let rows = sqlx::query("SELECT * FROM revoked_certs")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RevokedCert {
                    tenant: r.try_get("tenant")?,
                    fingerprint: r.try_get("fingerprint")?,
                    serial: r.try_get("serial")?,
                    revoked_at: r.try_get("revoked_at")?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    async fn insert_token(&self, t: &ApiToken, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, secret_hash, name, role, tenant, created_at, expires_at, \
             revoked_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.id)
        .bind(secret_hash)
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.tenant)
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(&t.created_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE secret_hash = $1")
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| token_from_row(&r)).transpose()
    }

    async fn tokens(&self, tenant: Option<&str>) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query(
            "SELECT * FROM api_tokens WHERE ($1 IS NULL OR tenant = $1) ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn token(&self, id: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| token_from_row(&r)).transpose()
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for e in events {
            sqlx::query(
                "INSERT INTO audit (at, actor, tenant, action, target, source, result, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.tenant)
            .bind(&e.action)
            .bind(&e.target)
            .bind(&e.source)
            .bind(match e.result {
                AuditResult::Success => "success",
                AuditResult::Failure => "failure",
            })
            .bind(json(&e.detail)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT * FROM audit WHERE 1 = 1");
        if let Some(t) = &q.tenant {
            qb.push(" AND tenant = ");
            qb.push_bind(t);
        }
        if let Some(a) = &q.action {
            qb.push(" AND action >= ");
            qb.push_bind(a);
            qb.push(" AND action < ");
            qb.push_bind(format!("{a}\u{10FFFF}"));
        }
        if let Some(a) = &q.actor {
            qb.push(" AND actor = ");
            qb.push_bind(a);
        }
        if let Some(t) = &q.target {
            qb.push(" AND target = ");
            qb.push_bind(t);
        }
        if let Some(r) = q.result {
            qb.push(" AND result = ");
            qb.push_bind(match r {
                AuditResult::Success => "success",
                AuditResult::Failure => "failure",
            });
        }
        if let Some(s) = q.since {
            qb.push(" AND at >= ");
            qb.push_bind(s);
        }
        if let Some(u) = q.until {
            qb.push(" AND at < ");
            qb.push_bind(u);
        }
        if let Some(b) = q.before_seq {
            qb.push(" AND seq < ");
            qb.push_bind(b);
        }
        qb.push(" ORDER BY seq DESC LIMIT ");
        qb.push_bind(i64::from(q.limit.unwrap_or(100).clamp(1, 1000)));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn purge_audit(&self, before: Millis) -> Result<u64> {
        let r = sqlx::query("DELETE FROM audit WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

fn tenant_from_row(r: &SqliteRow) -> Result<Tenant> {
    Ok(Tenant {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        settings: unjson(r.try_get("settings")?)?,
        created_at: r.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(i: usize) -> Device {
        let mut tags = BTreeMap::new();
        tags.insert("site".to_string(), format!("s{}", i % 5));
        if i.is_multiple_of(10) {
            tags.insert("rare".to_string(), "yes".to_string());
        }
        Device {
            id: format!("d{i:04}"),
            tenant: "t".into(),
            // Names collide on purpose: the id breaks ties.
            name: format!("n{}", (i * 7) % 50),
            device_type: (i.is_multiple_of(3)).then(|| "meter".to_string()),
            tags,
            attributes: empty_object(),
            status: if i.is_multiple_of(4) {
                DeviceStatus::Disabled
            } else {
                DeviceStatus::Enabled
            },
            policy: None,
            groups: if i.is_multiple_of(2) {
                vec!["even".into()]
            } else {
                vec![]
            },
            connectivity: Connectivity::default(),
            created_at: 1_000 + ((i * 13) % 97) as i64,
            updated_at: 0,
        }
    }

    async fn seeded() -> (SqliteStore, Vec<Device>) {
        let s = SqliteStore::in_memory().await.unwrap();
        let devices: Vec<Device> = (0..300).map(device).collect();
        let r = s.insert_devices(&devices).await.unwrap();
        assert!(r.iter().all(Result::is_ok));
        // Connectivity for a third of them.
        let updates: Vec<ConnectivityUpdate> = devices
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 1)
            .map(|(i, d)| ConnectivityUpdate {
                tenant: "t".into(),
                device_id: d.id.clone(),
                state: Connectivity {
                    online: i.is_multiple_of(2),
                    last_seen: Some(5_000 + ((i * 31) % 71) as i64),
                    remote_addr: Some("127.0.0.1:1".into()),
                    protocol: Some("mqtt".into()),
                    ..Default::default()
                },
            })
            .collect();
        s.set_connectivity(&updates).await.unwrap();
        let mut expected = Vec::new();
        for d in devices {
            expected.push(s.device("t", &d.id).await.unwrap().unwrap());
        }
        (s, expected)
    }

    async fn walk(s: &SqliteStore, mut listing: DeviceListing, group: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let page = s.list_devices("t", &listing, group).await.unwrap();
            assert!(page.items.len() <= listing.limit as usize);
            out.extend(page.items.into_iter().map(|d| d.id));
            match page.next_cursor {
                Some(c) => listing.cursor = Some(c),
                None => return out,
            }
        }
        panic!("pagination did not end");
    }

    #[tokio::test]
    async fn every_sort_and_filter_pages_through_exactly_the_matching_devices_in_order() {
        let (s, all) = seeded().await;
        let queries = [
            DeviceQuery::default(),
            DeviceQuery {
                tags: [("site".to_string(), "s2".to_string())].into(),
                ..Default::default()
            },
            DeviceQuery {
                tags: [
                    ("site".to_string(), "s0".to_string()),
                    ("rare".to_string(), "yes".to_string()),
                ]
                .into(),
                ..Default::default()
            },
            DeviceQuery {
                device_type: Some("meter".into()),
                status: Some(DeviceStatus::Enabled),
                ..Default::default()
            },
            DeviceQuery {
                name_prefix: Some("n1".into()),
                ..Default::default()
            },
            DeviceQuery {
                online: Some(true),
                ..Default::default()
            },
        ];
        for q in &queries {
            for group in [None, Some("even")] {
                for sort in [
                    SortKey::Id,
                    SortKey::Name,
                    SortKey::CreatedAt,
                    SortKey::LastSeen,
                ] {
                    for descending in [false, true] {
                        let mut want: Vec<&Device> = all
                            .iter()
                            .filter(|d| q.matches(d))
                            .filter(|d| group.is_none_or(|g| d.groups.iter().any(|x| x == g)))
                            .collect();
                        want.sort_by(|a, b| {
                            let key = |d: &Device| match sort {
                                SortKey::Id => (String::new(), 0, d.id.clone()),
                                SortKey::Name => (d.name.clone(), 0, d.id.clone()),
                                SortKey::CreatedAt => (String::new(), d.created_at, d.id.clone()),
                                SortKey::LastSeen => (
                                    String::new(),
                                    d.connectivity.last_seen.unwrap_or(0),
                                    d.id.clone(),
                                ),
                            };
                            key(a).cmp(&key(b))
                        });
                        if descending {
                            want.reverse();
                        }
                        let want: Vec<String> = want.iter().map(|d| d.id.clone()).collect();
                        let got = walk(
                            &s,
                            DeviceListing {
                                query: q.clone(),
                                sort,
                                descending,
                                limit: 7,
                                ..Default::default()
                            },
                            group,
                        )
                        .await;
                        assert_eq!(
                            got, want,
                            "{q:?} group={group:?} {sort:?} desc={descending}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_cursor_from_another_sort_or_garbage_is_refused() {
        let (s, _) = seeded().await;
        let page = s
            .list_devices(
                "t",
                &DeviceListing {
                    sort: SortKey::Name,
                    limit: 5,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let listing = DeviceListing {
            sort: SortKey::CreatedAt,
            limit: 5,
            cursor: page.next_cursor,
            ..Default::default()
        };
        assert!(matches!(
            s.list_devices("t", &listing, None).await,
            Err(RegistryError::Invalid(_))
        ));
        let listing = DeviceListing {
            limit: 5,
            cursor: Some("%%%".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.list_devices("t", &listing, None).await,
            Err(RegistryError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn duplicates_conflict_and_deletion_removes_tags_memberships_and_credentials() {
        let (s, _) = seeded().await;
        let r = s.insert_devices(&[device(1), device(999)]).await.unwrap();
        assert!(matches!(r[0], Err(RegistryError::Conflict(_))));
        assert!(r[1].is_ok());
        let c = Credential {
            id: "c1".into(),
            device_id: "d0000".into(),
            kind: CredentialKind::Password,
            label: "p".into(),
            fingerprint: None,
            serial: None,
            expires_at: None,
            created_at: 1,
            revoked_at: None,
            secret: "phc".into(),
        };
        s.insert_credential("t", &c).await.unwrap();
        assert!(s.delete_device("t", "d0000").await.unwrap());
        assert!(s.credentials("t", "d0000").await.unwrap().is_empty());
        let listing = DeviceListing {
            query: DeviceQuery {
                tags: [("rare".to_string(), "yes".to_string())].into(),
                ..Default::default()
            },
            limit: 1000,
            ..Default::default()
        };
        let ids = walk(&s, listing, Some("even")).await;
        assert!(!ids.contains(&"d0000".to_string()));
        // Other tenants see nothing.
        let other = s
            .list_devices(
                "u",
                &DeviceListing {
                    limit: 10,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        assert!(other.items.is_empty());
    }

    #[tokio::test]
    async fn the_audit_log_is_append_only() {
        let s = SqliteStore::in_memory().await.unwrap();
        let e = AuditEvent {
            seq: 0,
            at: 10,
            actor: "system".into(),
            tenant: Some("t".into()),
            action: "device.create".into(),
            target: "d1".into(),
            source: None,
            result: AuditResult::Success,
            detail: serde_json::json!({}),
        };
        s.append_audit(&[
            e.clone(),
            AuditEvent {
                at: 20,
                ..e.clone()
            },
        ])
        .await
        .unwrap();
        let got = s.audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].seq > got[1].seq, "newest first");
        let update = sqlx::query("UPDATE audit SET actor = 'mallory'")
            .execute(&s.pool)
            .await;
        assert!(update.is_err(), "the trigger refuses updates");
        assert_eq!(s.purge_audit(15).await.unwrap(), 1);
        let q = AuditQuery {
            action: Some("device.".into()),
            ..Default::default()
        };
        assert_eq!(s.audit(&q).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_database_from_a_newer_version_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let s = SqliteStore::open(&path, SqliteOptions { fsync: false })
            .await
            .unwrap();
        sqlx::raw_sql("PRAGMA user_version = 99")
            .execute(&s.pool)
            .await
            .unwrap();
        s.close().await;
        let err = SqliteStore::open(&path, SqliteOptions { fsync: false })
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    fn event(
        tenant: &str,
        device: &str,
        at: Millis,
        kind: ConnectivityEventKind,
        reason: Option<&str>,
    ) -> ConnectivityEventRecord {
        ConnectivityEventRecord {
            tenant: tenant.into(),
            device_id: device.into(),
            event: ConnectivityEvent {
                seq: 0,
                at,
                event: kind,
                reason: reason.map(str::to_string),
                client_id: Some(device.into()),
                remote_addr: Some("10.0.0.1:4000".into()),
                protocol: Some("mqtt".into()),
            },
        }
    }

    #[tokio::test]
    async fn connectivity_history_is_bounded_paged_newest_first_and_goes_with_the_device() {
        let s = SqliteStore::in_memory().await.unwrap();
        let mut u = device(1);
        u.tenant = "u".into();
        let r = s
            .insert_devices(&[device(1), device(2), u.clone()])
            .await
            .unwrap();
        assert!(r.iter().all(Result::is_ok));
        let (connected, disconnected) = (
            ConnectivityEventKind::Connected,
            ConnectivityEventKind::Disconnected,
        );
        // Ten events for d0001 in two flushes, two for d0002, one for a device that does not
        // exist, one in another tenant; keep 4.
        let first: Vec<_> = (0..6)
            .map(|i| {
                if i % 2 == 0 {
                    event("t", "d0001", 100 + i, connected, None)
                } else {
                    event("t", "d0001", 100 + i, disconnected, Some("connection_lost"))
                }
            })
            .chain([
                event("t", "d0002", 50, connected, None),
                event("t", "ghost", 51, connected, None),
                event("u", "d0001", 52, connected, None),
            ])
            .collect();
        s.record_connectivity(&[], &first, 4).await.unwrap();
        let second: Vec<_> = (6..10)
            .map(|i| {
                event(
                    "t",
                    "d0001",
                    100 + i,
                    disconnected,
                    Some("client_disconnect"),
                )
            })
            .chain([event("t", "d0002", 60, disconnected, Some("kicked"))])
            .collect();
        s.record_connectivity(&[], &second, 4).await.unwrap();

        let all = s
            .connectivity_events("t", "d0001", None, 100)
            .await
            .unwrap();
        let ats: Vec<Millis> = all.iter().map(|e| e.at).collect();
        assert_eq!(ats, vec![109, 108, 107, 106], "the 4 newest, newest first");
        assert!(all.windows(2).all(|w| w[0].seq > w[1].seq));
        assert_eq!(all[0].reason.as_deref(), Some("client_disconnect"));
        assert_eq!(all[0].client_id.as_deref(), Some("d0001"));
        // Paging.
        let page = s.connectivity_events("t", "d0001", None, 3).await.unwrap();
        assert_eq!(page.len(), 3);
        let rest = s
            .connectivity_events("t", "d0001", Some(page[2].seq), 3)
            .await
            .unwrap();
        assert_eq!(rest.iter().map(|e| e.at).collect::<Vec<_>>(), vec![106]);
        let d2 = s.connectivity_events("t", "d0002", None, 10).await.unwrap();
        assert_eq!(d2.len(), 2);
        assert_eq!(d2[0].event, disconnected);
        assert_eq!(d2[1].event, connected);
        assert_eq!(d2[1].reason, None);
        assert!(
            s.connectivity_events("t", "ghost", None, 10)
                .await
                .unwrap()
                .is_empty(),
            "no history for devices that do not exist"
        );
        assert_eq!(
            s.connectivity_events("u", "d0001", None, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        // keep = 0: no history is written.
        s.record_connectivity(&[], &[event("t", "d0002", 70, connected, None)], 0)
            .await
            .unwrap();
        assert_eq!(
            s.connectivity_events("t", "d0002", None, 10)
                .await
                .unwrap()
                .len(),
            2
        );
        // Deleting the device deletes its history; deleting the tenant deletes the tenant's.
        assert!(s.delete_device("t", "d0001").await.unwrap());
        assert!(
            s.connectivity_events("t", "d0001", None, 10)
                .await
                .unwrap()
                .is_empty()
        );
        s.insert_devices(&[device(1)]).await.unwrap();
        assert!(
            s.connectivity_events("t", "d0001", None, 10)
                .await
                .unwrap()
                .is_empty(),
            "a device registered again under the id starts without history"
        );
        s.create_tenant(&Tenant {
            id: "u".into(),
            name: "u".into(),
            settings: TenantSettings::default(),
            created_at: 1,
        })
        .await
        .unwrap();
        assert!(s.delete_tenant("u").await.unwrap());
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM connectivity_events WHERE tenant = 'u'")
                .fetch_one(&s.pool)
                .await
                .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn connectivity_updates_change_only_what_they_set() {
        let s = SqliteStore::in_memory().await.unwrap();
        s.insert_devices(&[device(1)]).await.unwrap();
        let update = |state: Connectivity| ConnectivityUpdate {
            tenant: "t".into(),
            device_id: "d0001".into(),
            state,
        };
        s.set_connectivity(&[update(Connectivity {
            online: true,
            last_seen: Some(10),
            remote_addr: Some("10.0.0.1:1".into()),
            protocol: Some("mqtts".into()),
            last_connected_at: Some(10),
            ..Default::default()
        })])
        .await
        .unwrap();
        s.set_connectivity(&[update(Connectivity {
            online: false,
            last_seen: Some(20),
            last_disconnected_at: Some(20),
            disconnect_reason: Some("keep_alive_timeout".into()),
            ..Default::default()
        })])
        .await
        .unwrap();
        let c = s.device("t", "d0001").await.unwrap().unwrap().connectivity;
        assert_eq!(
            c,
            Connectivity {
                online: false,
                last_seen: Some(20),
                remote_addr: Some("10.0.0.1:1".into()),
                protocol: Some("mqtts".into()),
                last_connected_at: Some(10),
                last_disconnected_at: Some(20),
                disconnect_reason: Some("keep_alive_timeout".into()),
            }
        );
        // Connected again: the last disconnect stays (history); a disconnect without a reason
        // clears the reason.
        s.set_connectivity(&[update(Connectivity {
            online: true,
            last_seen: Some(30),
            last_connected_at: Some(30),
            ..Default::default()
        })])
        .await
        .unwrap();
        let c = s.device("t", "d0001").await.unwrap().unwrap().connectivity;
        assert!(c.online);
        assert_eq!(c.last_connected_at, Some(30));
        assert_eq!(c.disconnect_reason.as_deref(), Some("keep_alive_timeout"));
        s.set_connectivity(&[update(Connectivity {
            online: false,
            last_disconnected_at: Some(40),
            ..Default::default()
        })])
        .await
        .unwrap();
        let c = s.device("t", "d0001").await.unwrap().unwrap().connectivity;
        assert_eq!(c.last_disconnected_at, Some(40));
        assert_eq!(c.disconnect_reason, None);
        assert_eq!(c.last_seen, Some(30));
    }

    #[tokio::test]
    async fn a_version_1_database_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            // A database as version 1 wrote it, with a device that was seen.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true),
                )
                .await
                .unwrap();
            sqlx::raw_sql(include_str!("../tests/fixtures/registry_schema_v1.sql"))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::raw_sql(
                "PRAGMA user_version = 1;
                 INSERT INTO tenants (id, name, settings, created_at) VALUES ('t', 'T', '{}', 1);
                 INSERT INTO devices (tenant, id, name, type, status, tags, attributes, policy,
                     online, last_seen, remote_addr, protocol, created_at, updated_at)
                 VALUES ('t', 'd1', 'D1', NULL, 'enabled', '{\"site\":\"a\"}', '{}', NULL,
                     1, 5000, '10.0.0.9:1883', 'mqtt', 2, 3);",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let s = SqliteStore::open(&path, SqliteOptions { fsync: false })
            .await
            .unwrap();
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let d = s.device("t", "d1").await.unwrap().unwrap();
        assert_eq!(d.tags.get("site").map(String::as_str), Some("a"));
        assert_eq!(
            d.connectivity,
            Connectivity {
                online: true,
                last_seen: Some(5000),
                remote_addr: Some("10.0.0.9:1883".into()),
                protocol: Some("mqtt".into()),
                ..Default::default()
            }
        );
        s.record_connectivity(
            &[ConnectivityUpdate {
                tenant: "t".into(),
                device_id: "d1".into(),
                state: Connectivity {
                    online: false,
                    last_seen: Some(6000),
                    last_disconnected_at: Some(6000),
                    disconnect_reason: Some("connection_lost".into()),
                    ..Default::default()
                },
            }],
            &[event(
                "t",
                "d1",
                6000,
                ConnectivityEventKind::Disconnected,
                Some("connection_lost"),
            )],
            100,
        )
        .await
        .unwrap();
        let d = s.device("t", "d1").await.unwrap().unwrap();
        assert_eq!(
            d.connectivity.disconnect_reason.as_deref(),
            Some("connection_lost")
        );
        assert_eq!(
            s.connectivity_events("t", "d1", None, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        s.close().await;
        // Opening again is a no-op; the data stays.
        let s = SqliteStore::open(&path, SqliteOptions { fsync: false })
            .await
            .unwrap();
        let d = s.device("t", "d1").await.unwrap().unwrap();
        assert_eq!(d.connectivity.last_disconnected_at, Some(6000));
        assert_eq!(
            s.connectivity_events("t", "d1", None, 10)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_new_database_has_the_same_schema_as_an_upgraded_one() {
        let s = SqliteStore::in_memory().await.unwrap();
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('devices')")
                .fetch_all(&s.pool)
                .await
                .unwrap();
        for c in [
            "last_connected_at",
            "last_disconnected_at",
            "disconnect_reason",
        ] {
            assert!(columns.iter().any(|x| x == c), "{c} missing: {columns:?}");
        }
    }
}
