//! Where alarms live: the [`AlarmStore`] trait and its embedded SQLite implementation
//! ([`SqliteAlarmStore`], `data/alarms.db`), following the rules store (WAL mode; every write one
//! transaction committed before the caller is answered; the schema version is checked at open
//! and a newer database is refused).
//!
//! Dedup is enforced by the database too: a unique partial index allows one not-cleared alarm
//! per `(tenant, key)`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};

use crate::error::{AlarmError, Result};
use crate::model::{
    Alarm, AlarmCounts, AlarmEvent, AlarmPage, AlarmQuery, AlarmState, Channel, ChannelSpec,
    EventKind, MAX_PAGE, RaiseAlarm, Severity, StateFilter,
};

/// Which alarm an acknowledge or clear is about.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// By id (any state).
    Id(&'a str),
    /// The not-cleared alarm with this dedup key.
    Key(&'a str),
}

/// A lifecycle step after raising.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// active → acknowledged.
    Acknowledge,
    /// active or acknowledged → cleared.
    Clear,
}

/// Alarms, their history and notification channels, per tenant. A cluster deployment
/// implements it on PostgreSQL.
#[async_trait::async_trait]
pub trait AlarmStore: Send + Sync + 'static {
    /// Raises: folds into the tenant's not-cleared alarm with the same key, or opens a new one
    /// with id `new_id`; records the event, keeping the alarm's last `keep_events`.
    async fn raise(
        &self,
        tenant: &str,
        raise: &RaiseAlarm,
        new_id: &str,
        now_ms: i64,
        keep_events: usize,
    ) -> Result<AlarmEvent>;
    /// Acknowledges or clears. By id: [`AlarmError::NotFound`] or [`AlarmError::Conflict`] when
    /// the state does not allow it. By key: `None` when no alarm with the key is open.
    #[allow(clippy::too_many_arguments)]
    async fn transition(
        &self,
        tenant: &str,
        target: Target<'_>,
        step: Transition,
        by: &str,
        note: Option<&str>,
        now_ms: i64,
        keep_events: usize,
    ) -> Result<Option<AlarmEvent>>;
    /// One alarm.
    async fn get(&self, tenant: &str, id: &str) -> Result<Option<Alarm>>;
    /// A page of alarms, newest first.
    async fn list(&self, tenant: &str, query: &AlarmQuery) -> Result<AlarmPage>;
    /// An alarm's history, oldest first.
    async fn history(&self, tenant: &str, id: &str) -> Result<Vec<AlarmEvent>>;
    /// Open alarms by severity.
    async fn counts(&self, tenant: &str) -> Result<AlarmCounts>;
    /// Open alarms of every tenant (the gauge's value at start).
    async fn open_total(&self) -> Result<u64>;
    /// Creates or replaces a channel.
    async fn put_channel(&self, channel: &Channel) -> Result<()>;
    /// Channels of a tenant, or of every tenant (`None`), by tenant then id.
    async fn list_channels(&self, tenant: Option<&str>) -> Result<Vec<Channel>>;
    /// Deletes a channel; whether it existed.
    async fn delete_channel(&self, tenant: &str, id: &str) -> Result<bool>;
    /// Deletes a tenant's alarms, history and channels; how many of its alarms were open.
    async fn delete_tenant(&self, tenant: &str) -> Result<u64>;
    /// Deletes alarms (of every tenant) cleared before `before_ms`, with their history; at most
    /// `limit` per call (so one sweep never holds the writer long); how many were deleted.
    async fn delete_cleared_before(&self, before_ms: i64, limit: usize) -> Result<u64>;
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alarms (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    severity INTEGER NOT NULL,
    state TEXT NOT NULL,
    device TEXT,
    message TEXT NOT NULL,
    details TEXT NOT NULL,
    source TEXT NOT NULL,
    count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    last_raised_ms INTEGER NOT NULL,
    acknowledged_ms INTEGER,
    acknowledged_by TEXT,
    cleared_ms INTEGER,
    cleared_by TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS alarms_open_key ON alarms (tenant, key) WHERE state <> 'cleared';
CREATE INDEX IF NOT EXISTS alarms_created ON alarms (tenant, created_ms, id);
CREATE INDEX IF NOT EXISTS alarms_state ON alarms (tenant, state, created_ms, id);
CREATE INDEX IF NOT EXISTS alarms_device ON alarms (tenant, device, created_ms, id);
CREATE INDEX IF NOT EXISTS alarms_key ON alarms (tenant, key, created_ms, id);
CREATE INDEX IF NOT EXISTS alarms_cleared ON alarms (cleared_ms) WHERE state = 'cleared';
CREATE TABLE IF NOT EXISTS alarm_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    alarm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    note TEXT,
    alarm TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarm_events_alarm ON alarm_events (tenant, alarm_id, seq);
CREATE TABLE IF NOT EXISTS alarm_channels (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    spec TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);
";

const COLUMNS: &str = "tenant, id, key, severity, state, device, message, details, source, count, \
     created_ms, updated_ms, last_raised_ms, acknowledged_ms, acknowledged_by, cleared_ms, cleared_by";

/// The embedded store: one SQLite database.
#[derive(Clone)]
pub struct SqliteAlarmStore {
    pool: SqlitePool,
}

impl SqliteAlarmStore {
    /// Opens (creating if needed) the database at `path`; `fsync`: `synchronous = FULL`.
    pub async fn open(path: &Path, fsync: bool) -> Result<SqliteAlarmStore> {
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if fsync {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(connect)
            .await?;
        Self::init(pool).await
    }

    /// A private in-memory database (tests, `storage.persistence = false`).
    pub async fn in_memory() -> Result<SqliteAlarmStore> {
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

    async fn init(pool: SqlitePool) -> Result<SqliteAlarmStore> {
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        if version > SCHEMA_VERSION {
            return Err(AlarmError::Storage(format!(
                "the alarms database has schema version {version}, newer than this binary \
                 understands ({SCHEMA_VERSION}); run a newer ferrohub"
            )));
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        sqlx::raw_sql("PRAGMA user_version = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(SqliteAlarmStore { pool })
    }

    /// Closes the pool (flushes the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn row_to_alarm(row: &SqliteRow) -> Result<Alarm> {
    let rank: i64 = row.try_get("severity")?;
    let state: String = row.try_get("state")?;
    let details: String = row.try_get("details")?;
    Ok(Alarm {
        tenant: row.try_get("tenant")?,
        id: row.try_get("id")?,
        key: row.try_get("key")?,
        severity: Severity::from_rank(rank)
            .ok_or_else(|| AlarmError::Storage(format!("stored severity {rank} is unknown")))?,
        state: AlarmState::parse(&state)
            .map_err(|_| AlarmError::Storage(format!("stored state `{state}` is unknown")))?,
        device: row.try_get("device")?,
        message: row.try_get("message")?,
        details: serde_json::from_str(&details)?,
        source: row.try_get("source")?,
        count: row.try_get::<i64, _>("count")?.max(0) as u64,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        last_raised_ms: row.try_get("last_raised_ms")?,
        acknowledged_ms: row.try_get("acknowledged_ms")?,
        acknowledged_by: row.try_get("acknowledged_by")?,
        cleared_ms: row.try_get("cleared_ms")?,
        cleared_by: row.try_get("cleared_by")?,
    })
}

fn row_to_event(row: &SqliteRow) -> Result<AlarmEvent> {
    let kind: String = row.try_get("kind")?;
    let alarm: String = row.try_get("alarm")?;
    Ok(AlarmEvent {
        seq: row.try_get("seq")?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| AlarmError::Storage(format!("stored event kind `{kind}` is unknown")))?,
        alarm: serde_json::from_str(&alarm)?,
        at_ms: row.try_get("at_ms")?,
        by: row.try_get("actor")?,
        note: row.try_get("note")?,
    })
}

/// Writes every column of `a` (insert or replace of the row).
async fn write_alarm(tx: &mut sqlx::SqliteConnection, a: &Alarm) -> Result<()> {
    sqlx::query(
        "INSERT INTO alarms (tenant, id, key, severity, state, device, message, details, source,
             count, created_ms, updated_ms, last_raised_ms, acknowledged_ms, acknowledged_by,
             cleared_ms, cleared_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
         ON CONFLICT (tenant, id) DO UPDATE SET severity = ?4, state = ?5, device = ?6,
             message = ?7, details = ?8, source = ?9, count = ?10, updated_ms = ?12,
             last_raised_ms = ?13, acknowledged_ms = ?14, acknowledged_by = ?15,
             cleared_ms = ?16, cleared_by = ?17",
    )
    .bind(&a.tenant)
    .bind(&a.id)
    .bind(&a.key)
    .bind(a.severity.rank())
    .bind(a.state.as_str())
    .bind(&a.device)
    .bind(&a.message)
    .bind(serde_json::to_string(&a.details)?)
    .bind(&a.source)
    .bind(a.count as i64)
    .bind(a.created_ms)
    .bind(a.updated_ms)
    .bind(a.last_raised_ms)
    .bind(a.acknowledged_ms)
    .bind(&a.acknowledged_by)
    .bind(a.cleared_ms)
    .bind(&a.cleared_by)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Appends a history row and trims the alarm's history to its last `keep` rows.
async fn record(
    tx: &mut sqlx::SqliteConnection,
    kind: EventKind,
    alarm: Alarm,
    at_ms: i64,
    by: &str,
    note: Option<&str>,
    keep: usize,
) -> Result<AlarmEvent> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO alarm_events (tenant, alarm_id, kind, at_ms, actor, note, alarm)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING seq",
    )
    .bind(&alarm.tenant)
    .bind(&alarm.id)
    .bind(kind.as_str())
    .bind(at_ms)
    .bind(by)
    .bind(note)
    .bind(serde_json::to_string(&alarm)?)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM alarm_events WHERE tenant = ?1 AND alarm_id = ?2 AND seq <= (
             SELECT seq FROM alarm_events WHERE tenant = ?1 AND alarm_id = ?2
             ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
    )
    .bind(&alarm.tenant)
    .bind(&alarm.id)
    .bind(keep.max(1) as i64)
    .execute(&mut *tx)
    .await?;
    Ok(AlarmEvent {
        seq,
        kind,
        alarm,
        at_ms,
        by: by.to_string(),
        note: note.map(str::to_string),
    })
}

fn parse_cursor(c: &str) -> Result<(i64, String)> {
    c.split_once(':')
        .and_then(|(ms, id)| Some((ms.parse().ok()?, id.to_string())))
        .ok_or_else(|| {
            AlarmError::Invalid(format!(
                "cursor `{c}` is not one this API gave; give a page's next_cursor as it is"
            ))
        })
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "an unknown time".into(), |ms| format!("{ms} (Unix ms)"))
}

#[async_trait::async_trait]
impl AlarmStore for SqliteAlarmStore {
    async fn raise(
        &self,
        tenant: &str,
        raise: &RaiseAlarm,
        new_id: &str,
        now_ms: i64,
        keep_events: usize,
    ) -> Result<AlarmEvent> {
        let mut tx = self.pool.begin().await?;
        let open = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM alarms WHERE tenant = ?1 AND key = ?2 AND state <> 'cleared'"
        )))
        .bind(tenant)
        .bind(&raise.key)
        .fetch_optional(&mut *tx)
        .await?;
        let (kind, alarm) = match open {
            Some(row) => {
                let mut a = row_to_alarm(&row)?;
                a.count += 1;
                a.severity = a.severity.max(raise.severity);
                a.message = raise.message.clone();
                a.details = raise.details.clone();
                a.source = raise.source.clone();
                if raise.device.is_some() {
                    a.device = raise.device.clone();
                }
                a.updated_ms = now_ms;
                a.last_raised_ms = now_ms;
                (EventKind::Updated, a)
            }
            None => (
                EventKind::Raised,
                Alarm {
                    tenant: tenant.to_string(),
                    id: new_id.to_string(),
                    key: raise.key.clone(),
                    severity: raise.severity,
                    state: AlarmState::Active,
                    device: raise.device.clone(),
                    message: raise.message.clone(),
                    details: raise.details.clone(),
                    source: raise.source.clone(),
                    count: 1,
                    created_ms: now_ms,
                    updated_ms: now_ms,
                    last_raised_ms: now_ms,
                    acknowledged_ms: None,
                    acknowledged_by: None,
                    cleared_ms: None,
                    cleared_by: None,
                },
            ),
        };
        write_alarm(&mut tx, &alarm).await?;
        let by = alarm.source.clone();
        let event = record(&mut tx, kind, alarm, now_ms, &by, None, keep_events).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn transition(
        &self,
        tenant: &str,
        target: Target<'_>,
        step: Transition,
        by: &str,
        note: Option<&str>,
        now_ms: i64,
        keep_events: usize,
    ) -> Result<Option<AlarmEvent>> {
        let mut tx = self.pool.begin().await?;
        let row = match target {
            Target::Id(id) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM alarms WHERE tenant = ?1 AND id = ?2"
                )))
                .bind(tenant)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
            }
            Target::Key(key) => sqlx::query(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM alarms WHERE tenant = ?1 AND key = ?2 AND state <> 'cleared'"
            )))
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?,
        };
        let Some(row) = row else {
            return match target {
                Target::Id(id) => Err(AlarmError::NotFound(format!("alarm `{id}`"))),
                Target::Key(_) => Ok(None),
            };
        };
        let mut a = row_to_alarm(&row)?;
        let kind = match (step, a.state) {
            (_, AlarmState::Cleared) => {
                return Err(AlarmError::Conflict(format!(
                    "alarm `{}` was already cleared by {} at {}; a cleared alarm is closed \
                     (raising its key again opens a new one)",
                    a.id,
                    a.cleared_by.as_deref().unwrap_or("someone"),
                    when(a.cleared_ms)
                )));
            }
            (Transition::Acknowledge, AlarmState::Acknowledged) => {
                return Err(AlarmError::Conflict(format!(
                    "alarm `{}` was already acknowledged by {} at {}",
                    a.id,
                    a.acknowledged_by.as_deref().unwrap_or("someone"),
                    when(a.acknowledged_ms)
                )));
            }
            (Transition::Acknowledge, AlarmState::Active) => {
                a.state = AlarmState::Acknowledged;
                a.acknowledged_ms = Some(now_ms);
                a.acknowledged_by = Some(by.to_string());
                EventKind::Acknowledged
            }
            (Transition::Clear, _) => {
                a.state = AlarmState::Cleared;
                a.cleared_ms = Some(now_ms);
                a.cleared_by = Some(by.to_string());
                EventKind::Cleared
            }
        };
        a.updated_ms = now_ms;
        write_alarm(&mut tx, &a).await?;
        let event = record(&mut tx, kind, a, now_ms, by, note, keep_events).await?;
        tx.commit().await?;
        Ok(Some(event))
    }

    async fn get(&self, tenant: &str, id: &str) -> Result<Option<Alarm>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM alarms WHERE tenant = ?1 AND id = ?2"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_alarm).transpose()
    }

    async fn list(&self, tenant: &str, q: &AlarmQuery) -> Result<AlarmPage> {
        let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
        let mut b =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM alarms WHERE tenant = "));
        b.push_bind(tenant);
        match q.state {
            Some(StateFilter::Is(s)) => {
                b.push(" AND state = ").push_bind(s.as_str());
            }
            Some(StateFilter::Open) => {
                b.push(" AND state IN ('active', 'acknowledged')");
            }
            None => {}
        }
        if let Some(s) = q.severity {
            b.push(" AND severity = ").push_bind(s.rank());
        }
        if let Some(d) = &q.device {
            b.push(" AND device = ").push_bind(d.clone());
        }
        if let Some(k) = &q.key {
            b.push(" AND key = ").push_bind(k.clone());
        }
        if let Some(s) = q.since_ms {
            b.push(" AND created_ms >= ").push_bind(s);
        }
        if let Some(u) = q.until_ms {
            b.push(" AND created_ms < ").push_bind(u);
        }
        if let Some(c) = &q.cursor {
            let (ms, id) = parse_cursor(c)?;
            b.push(" AND (created_ms < ")
                .push_bind(ms)
                .push(" OR (created_ms = ")
                .push_bind(ms)
                .push(" AND id < ")
                .push_bind(id)
                .push("))");
        }
        b.push(" ORDER BY created_ms DESC, id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let rows = b.build().fetch_all(&self.pool).await?;
        let mut items = rows.iter().map(row_to_alarm).collect::<Result<Vec<_>>>()?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|a| format!("{}:{}", a.created_ms, a.id))
        } else {
            None
        };
        Ok(AlarmPage { items, next_cursor })
    }

    async fn history(&self, tenant: &str, id: &str) -> Result<Vec<AlarmEvent>> {
        let rows = sqlx::query(
            "SELECT seq, kind, at_ms, actor, note, alarm FROM alarm_events
             WHERE tenant = ?1 AND alarm_id = ?2 ORDER BY seq",
        )
        .bind(tenant)
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_event).collect()
    }

    async fn counts(&self, tenant: &str) -> Result<AlarmCounts> {
        let rows = sqlx::query(
            "SELECT severity, state, COUNT(*) AS n FROM alarms
             WHERE tenant = ?1 AND state IN ('active', 'acknowledged') GROUP BY severity, state",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = AlarmCounts::default();
        for row in rows {
            let rank: i64 = row.try_get("severity")?;
            let state: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            if let Some(s) = Severity::from_rank(rank) {
                counts.add(s, state == "acknowledged", n.max(0) as u64);
            }
        }
        Ok(counts)
    }

    async fn open_total(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM alarms WHERE state IN ('active', 'acknowledged')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn put_channel(&self, c: &Channel) -> Result<()> {
        sqlx::query(
            "INSERT INTO alarm_channels (tenant, id, spec, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant, id) DO UPDATE SET spec = ?3, updated_ms = ?4",
        )
        .bind(&c.tenant)
        .bind(&c.id)
        .bind(serde_json::to_string(&c.spec)?)
        .bind(c.updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_channels(&self, tenant: Option<&str>) -> Result<Vec<Channel>> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query(
                    "SELECT tenant, id, spec, updated_ms FROM alarm_channels WHERE tenant = ?1 ORDER BY id",
                )
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT tenant, id, spec, updated_ms FROM alarm_channels ORDER BY tenant, id",
                )
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                let spec: String = row.try_get("spec")?;
                Ok(Channel {
                    tenant: row.try_get("tenant")?,
                    id: row.try_get("id")?,
                    spec: serde_json::from_str::<ChannelSpec>(&spec)?,
                    updated_ms: row.try_get("updated_ms")?,
                })
            })
            .collect()
    }

    async fn delete_channel(&self, tenant: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM alarm_channels WHERE tenant = ?1 AND id = ?2")
            .bind(tenant)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_tenant(&self, tenant: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM alarms WHERE tenant = ?1 AND state IN ('active', 'acknowledged')",
        )
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
        for table in ["alarms", "alarm_events", "alarm_channels"] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE tenant = ?1"
            )))
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(open.max(0) as u64)
    }

    async fn delete_cleared_before(&self, before_ms: i64, limit: usize) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT tenant, id FROM alarms WHERE state = 'cleared' AND cleared_ms < ?1 LIMIT ?2",
        )
        .bind(before_ms)
        .bind(limit.max(1) as i64)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let (tenant, id): (String, String) = (row.try_get("tenant")?, row.try_get("id")?);
            sqlx::query("DELETE FROM alarm_events WHERE tenant = ?1 AND alarm_id = ?2")
                .bind(&tenant)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM alarms WHERE tenant = ?1 AND id = ?2")
                .bind(&tenant)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }
}
