//! Where rules live: the [`RuleStore`] trait and its embedded SQLite implementation
//! ([`SqliteRuleStore`], `data/rules.db`), following the registry's store (WAL mode; every write
//! one transaction committed before the caller is answered; the schema version is checked at
//! open and a newer database is refused).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use crate::error::{Result, RulesError};
use crate::model::{RuleSpec, StoredRule};

/// Rules per tenant, versioned. A cluster deployment implements it on PostgreSQL.
#[async_trait::async_trait]
pub trait RuleStore: Send + Sync + 'static {
    /// Every rule of `tenant`, or of every tenant (`None`), by tenant then id.
    async fn list(&self, tenant: Option<&str>) -> Result<Vec<StoredRule>>;
    /// One rule.
    async fn get(&self, tenant: &str, id: &str) -> Result<Option<StoredRule>>;
    /// Creates a rule at version 1 ([`RulesError::Exists`] if the id is taken).
    async fn create(
        &self,
        tenant: &str,
        id: &str,
        spec: &RuleSpec,
        enabled: bool,
        now_ms: i64,
    ) -> Result<StoredRule>;
    /// Replaces the spec and/or the enabled flag, bumping the version; with `expected` the
    /// current version must equal it ([`RulesError::VersionMismatch`]).
    async fn update(
        &self,
        tenant: &str,
        id: &str,
        spec: Option<&RuleSpec>,
        enabled: Option<bool>,
        expected: Option<u64>,
        now_ms: i64,
    ) -> Result<StoredRule>;
    /// Deletes a rule; whether it existed.
    async fn delete(&self, tenant: &str, id: &str) -> Result<bool>;
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rules (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
);
";

/// The embedded store: one SQLite database.
#[derive(Clone)]
pub struct SqliteRuleStore {
    pool: SqlitePool,
}

impl SqliteRuleStore {
    /// Opens (creating if needed) the database at `path`; `fsync`: `synchronous = FULL`.
    pub async fn open(path: &Path, fsync: bool) -> Result<SqliteRuleStore> {
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
    pub async fn in_memory() -> Result<SqliteRuleStore> {
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

    async fn init(pool: SqlitePool) -> Result<SqliteRuleStore> {
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        if version > SCHEMA_VERSION {
            return Err(RulesError::Storage(format!(
                "the rules database has schema version {version}, newer than this binary \
                 understands ({SCHEMA_VERSION}); run a newer ferrohub"
            )));
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        sqlx::raw_sql("PRAGMA user_version = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(SqliteRuleStore { pool })
    }

    /// Closes the pool (flushes the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn row_to_rule(row: &SqliteRow) -> Result<StoredRule> {
    let spec: String = row.try_get("spec")?;
    Ok(StoredRule {
        tenant: row.try_get("tenant")?,
        id: row.try_get("id")?,
        version: row.try_get::<i64, _>("version")?.max(0) as u64,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        spec: serde_json::from_str(&spec)?,
    })
}

#[async_trait::async_trait]
impl RuleStore for SqliteRuleStore {
    async fn list(&self, tenant: Option<&str>) -> Result<Vec<StoredRule>> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query("SELECT tenant, id, version, enabled, created_ms, updated_ms, spec FROM rules WHERE tenant = ?1 ORDER BY id")
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT tenant, id, version, enabled, created_ms, updated_ms, spec FROM rules ORDER BY tenant, id")
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(row_to_rule).collect()
    }

    async fn get(&self, tenant: &str, id: &str) -> Result<Option<StoredRule>> {
        let row = sqlx::query(
            "SELECT tenant, id, version, enabled, created_ms, updated_ms, spec FROM rules WHERE tenant = ?1 AND id = ?2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_rule).transpose()
    }

    async fn create(
        &self,
        tenant: &str,
        id: &str,
        spec: &RuleSpec,
        enabled: bool,
        now_ms: i64,
    ) -> Result<StoredRule> {
        let json = serde_json::to_string(spec)?;
        let done = sqlx::query(
            "INSERT INTO rules (tenant, id, version, enabled, created_ms, updated_ms, spec)
             VALUES (?1, ?2, 1, ?3, ?4, ?4, ?5) ON CONFLICT (tenant, id) DO NOTHING",
        )
        .bind(tenant)
        .bind(id)
        .bind(enabled as i64)
        .bind(now_ms)
        .bind(json)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(RulesError::Exists(id.to_string()));
        }
        Ok(StoredRule {
            tenant: tenant.to_string(),
            id: id.to_string(),
            version: 1,
            enabled,
            created_ms: now_ms,
            updated_ms: now_ms,
            spec: spec.clone(),
        })
    }

    async fn update(
        &self,
        tenant: &str,
        id: &str,
        spec: Option<&RuleSpec>,
        enabled: Option<bool>,
        expected: Option<u64>,
        now_ms: i64,
    ) -> Result<StoredRule> {
        let json = spec.map(serde_json::to_string).transpose()?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT tenant, id, version, enabled, created_ms, updated_ms, spec FROM rules WHERE tenant = ?1 AND id = ?2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(RulesError::NotFound(id.to_string()));
        };
        let mut rule = row_to_rule(&row)?;
        if let Some(expected) = expected
            && expected != rule.version
        {
            return Err(RulesError::VersionMismatch {
                id: id.to_string(),
                expected,
                current: rule.version,
            });
        }
        rule.version += 1;
        rule.updated_ms = now_ms;
        if let Some(e) = enabled {
            rule.enabled = e;
        }
        if let Some(s) = spec {
            rule.spec = s.clone();
        }
        sqlx::query(
            "UPDATE rules SET version = ?3, enabled = ?4, updated_ms = ?5, spec = COALESCE(?6, spec)
             WHERE tenant = ?1 AND id = ?2",
        )
        .bind(tenant)
        .bind(id)
        .bind(rule.version as i64)
        .bind(rule.enabled as i64)
        .bind(now_ms)
        .bind(json)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rule)
    }

    async fn delete(&self, tenant: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM rules WHERE tenant = ?1 AND id = ?2")
            .bind(tenant)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ActionSpec;

    fn spec(sql: &str) -> RuleSpec {
        RuleSpec {
            sql: sql.into(),
            description: String::new(),
            actions: vec![ActionSpec::Republish {
                topic: "out/${topic(2)}".into(),
                qos: 1,
                payload: None,
            }],
            error_action: None,
        }
    }

    #[tokio::test]
    async fn versions_conflicts_and_restart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| RulesError::Storage(e.to_string()))?;
        let path = dir.path().join("rules.db");
        let store = SqliteRuleStore::open(&path, false).await?;
        let a = spec("SELECT * FROM 'a/#'");
        let r = store.create("t1", "r1", &a, true, 10).await?;
        assert_eq!(r.version, 1);
        assert!(matches!(
            store.create("t1", "r1", &a, true, 11).await,
            Err(RulesError::Exists(_))
        ));
        // Same id in another tenant is another rule.
        store.create("t2", "r1", &a, false, 12).await?;
        let b = spec("SELECT x FROM 'b/#'");
        let r = store
            .update("t1", "r1", Some(&b), None, Some(1), 20)
            .await?;
        assert_eq!(
            (r.version, r.enabled, r.spec.sql.as_str()),
            (2, true, b.sql.as_str())
        );
        assert!(matches!(
            store
                .update("t1", "r1", None, Some(false), Some(1), 21)
                .await,
            Err(RulesError::VersionMismatch { current: 2, .. })
        ));
        let r = store
            .update("t1", "r1", None, Some(false), None, 22)
            .await?;
        assert_eq!((r.version, r.enabled), (3, false));
        assert!(matches!(
            store
                .update("t1", "nope", None, Some(false), None, 22)
                .await,
            Err(RulesError::NotFound(_))
        ));
        store.close().await;

        let store = SqliteRuleStore::open(&path, false).await?;
        let all = store.list(None).await?;
        assert_eq!(all.len(), 2);
        let r = store
            .get("t1", "r1")
            .await?
            .ok_or(RulesError::NotFound("r1".into()))?;
        assert_eq!((r.version, r.enabled, r.spec), (3, false, b));
        assert_eq!(store.list(Some("t2")).await?.len(), 1);
        assert!(store.delete("t2", "r1").await?);
        assert!(!store.delete("t2", "r1").await?);
        assert!(store.list(Some("t2")).await?.is_empty());
        Ok(())
    }
}
