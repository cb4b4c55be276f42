//! The embedded store of twins, their history and queued commands: one SQLite database in WAL
//! mode, written by one thread that commits in groups.
//!
//! Writes are *jobs* run on the writer thread inside one transaction per group (each job in its own
//! savepoint, so a failing job never takes its neighbours down); a job's answer is released only
//! after the group's commit has been synced (`synchronous = FULL`), so whatever a caller was told is
//! durable. The writer keeps recently used twin documents parsed in memory (bounded), so a
//! read-modify-write of a hot twin costs no parse. Scans (fleet queries, history, counts) run on
//! separate read connections and never wait for the writer (WAL readers see the last commit).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use hashbrown::HashMap;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::document::TwinDocument;

/// The schema version this build writes; a newer database is refused.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS twins (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc TEXT NOT NULL,
    desired TEXT GENERATED ALWAYS AS (json_extract(doc, '$.desired')) VIRTUAL,
    reported TEXT GENERATED ALWAYS AS (json_extract(doc, '$.reported')) VIRTUAL,
    tags TEXT GENERATED ALWAYS AS (json_extract(doc, '$.tags')) VIRTUAL,
    PRIMARY KEY (tenant, device, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS twin_history (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    section TEXT NOT NULL,
    patch TEXT NOT NULL,
    client_token TEXT,
    PRIMARY KEY (tenant, device, name, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commands (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    status INTEGER,
    response BLOB,
    error TEXT,
    actor TEXT NOT NULL,
    PRIMARY KEY (tenant, device, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS twin_history_by_age ON twin_history (at);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (tenant, device, seq);
CREATE INDEX IF NOT EXISTS commands_finished ON commands (updated_at)
    WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled');
CREATE INDEX IF NOT EXISTS commands_open ON commands (expires_at)
    WHERE state IN ('queued', 'sent', 'delivered');
";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("twin store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer Ferrohub.
    #[error(
        "the twin database {path} has schema version {found}, newer than this build's {SCHEMA_VERSION}: \
         run the Ferrohub version that wrote it, or restore a backup"
    )]
    NewerSchema {
        /// The file.
        path: String,
        /// Its version.
        found: i64,
    },
    /// A stored document could not be read.
    #[error("twin store: a stored document is unreadable: {0}")]
    Corrupt(String),
    /// The writer thread is gone (the hub is shutting down).
    #[error("twin store is closed")]
    Closed,
}

/// Identifies one twin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TwinKey {
    /// Tenant.
    pub tenant: Arc<str>,
    /// Device.
    pub device: Arc<str>,
    /// Twin name; empty for the default twin.
    pub name: Arc<str>,
}

/// What a writer job sees: the open transaction and the document cache.
pub struct WriteContext<'a> {
    /// The connection, inside the group's transaction (and the job's savepoint).
    pub conn: &'a Connection,
    cache: &'a mut DocCache,
    touched: &'a mut Vec<TwinKey>,
}

impl WriteContext<'_> {
    /// The twin's document, from the cache or the database; `None` if it does not exist.
    pub fn load(&mut self, key: &TwinKey) -> Result<Option<&mut TwinDocument>, StoreError> {
        if !self.cache.contains(key) {
            let doc: Option<String> = self
                .conn
                .prepare_cached(
                    "SELECT doc FROM twins WHERE tenant = ?1 AND device = ?2 AND name = ?3",
                )?
                .query_row(params![&*key.tenant, &*key.device, &*key.name], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(doc) = doc else {
                return Ok(None);
            };
            let size = doc.len();
            let doc: TwinDocument =
                serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.cache.insert(key.clone(), doc, size);
        }
        Ok(self.cache.get_mut(key))
    }

    /// Puts a new document in the cache (it is written by [`WriteContext::save`]).
    pub fn create(&mut self, key: &TwinKey, doc: TwinDocument) {
        self.cache.insert(key.clone(), doc, 0);
    }

    /// Writes the cached document of `key` (after the job changed it) with a history entry.
    pub fn save(&mut self, key: &TwinKey, history: &HistoryEntry) -> Result<(), StoreError> {
        self.touched.push(key.clone());
        let Some(doc) = self.cache.get(key) else {
            return Ok(());
        };
        let text = serde_json::to_string(doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (version, updated_at) = (doc.version(), doc.updated_at());
        self.cache.set_size(key, text.len());
        self.conn
            .prepare_cached(
                "INSERT INTO twins (tenant, device, name, version, updated_at, doc) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (tenant, device, name) DO UPDATE SET \
                 version = excluded.version, updated_at = excluded.updated_at, doc = excluded.doc",
            )?
            .execute(params![
                &*key.tenant,
                &*key.device,
                &*key.name,
                version as i64,
                updated_at as i64,
                text
            ])?;
        self.conn
            .prepare_cached(
                "INSERT INTO twin_history \
                 (tenant, device, name, version, at, actor, section, patch, client_token) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                &*key.tenant,
                &*key.device,
                &*key.name,
                version as i64,
                history.at as i64,
                history.actor,
                history.section,
                history.patch.to_string(),
                history.client_token,
            ])?;
        Ok(())
    }

    /// Forgets cached documents of `tenant` (and `device`, if given) after deleting them.
    pub fn forget(&mut self, tenant: &str, device: Option<&str>) {
        self.cache
            .retain(|k| !(&*k.tenant == tenant && device.is_none_or(|d| &*k.device == d)));
    }

    /// Marks `key` as changed (its cached copy is dropped if the group fails to commit).
    pub fn touch(&mut self, key: &TwinKey) {
        self.touched.push(key.clone());
    }
}

/// One accepted change, as kept in a twin's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The document version this change produced.
    pub version: u64,
    /// When (ms since the epoch).
    pub at: u64,
    /// Who: `operator:{token name}`, `device:{id}`, `rule:{id}`, `system`.
    pub actor: String,
    /// `desired`, `reported`, `tags` or `acks`.
    pub section: String,
    /// The merge patch as applied (for `acks`: the rejections).
    pub patch: serde_json::Value,
    /// The writer's `clientToken`, if it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// Bounded cache of parsed documents, by count and by size (the stored JSON's bytes, which a
/// parsed document exceeds a few times): when either bound is passed, a slice of arbitrary
/// entries is evicted (cheap; the hot twins come back on their next write).
struct DocCache {
    map: HashMap<TwinKey, (TwinDocument, usize)>,
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
}

impl DocCache {
    fn contains(&self, key: &TwinKey) -> bool {
        self.map.contains_key(key)
    }

    fn get(&self, key: &TwinKey) -> Option<&TwinDocument> {
        self.map.get(key).map(|(d, _)| d)
    }

    fn get_mut(&mut self, key: &TwinKey) -> Option<&mut TwinDocument> {
        self.map.get_mut(key).map(|(d, _)| d)
    }

    fn remove(&mut self, key: &TwinKey) {
        if let Some((_, size)) = self.map.remove(key) {
            self.bytes -= size;
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&TwinKey) -> bool) {
        let mut freed = 0;
        self.map.retain(|k, (_, size)| {
            let kept = keep(k);
            if !kept {
                freed += *size;
            }
            kept
        });
        self.bytes -= freed;
    }

    fn set_size(&mut self, key: &TwinKey, size: usize) {
        if let Some((_, s)) = self.map.get_mut(key) {
            self.bytes = self.bytes - *s + size;
            *s = size;
        }
    }

    fn insert(&mut self, key: TwinKey, doc: TwinDocument, size: usize) {
        self.remove(&key);
        if self.map.len() >= self.capacity || self.bytes + size > self.max_bytes {
            let mut drop_n = (self.map.len() / 10).max(1);
            self.retain(|_| {
                if drop_n > 0 {
                    drop_n -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.bytes += size;
        self.map.insert(key, (doc, size));
    }
}

/// What a job tells the writer when it is done: whether its savepoint is kept, and what to run
/// once the group's commit outcome is known.
pub struct JobDone {
    /// Keep the job's writes (false rolls its savepoint back).
    pub keep: bool,
    /// Runs after the commit (with its outcome) or after the rollback.
    pub then: AfterCommit,
}

/// A unit of work for the writer thread.
pub type Job = Box<dyn FnOnce(&mut WriteContext<'_>) -> JobDone + Send>;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Database file; `None` keeps everything in memory (lost at exit).
    pub path: Option<PathBuf>,
    /// Parsed documents kept by the writer.
    pub cache_entries: usize,
    /// Their total size as stored JSON (parsed, they take a few times more).
    pub cache_bytes: usize,
    /// Jobs waiting for the writer before callers wait (backpressure).
    pub queue: usize,
    /// Sync every commit to disk (`synchronous = FULL`); off trades the last commits before a
    /// power loss for speed (a process crash still loses nothing).
    pub fsync: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            cache_entries: 100_000,
            cache_bytes: 64 << 20,
            queue: 65_536,
            fsync: true,
        }
    }
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Groups committed.
    pub commits: AtomicU64,
    /// Jobs run.
    pub jobs: AtomicU64,
    /// Total time spent committing (µs).
    pub commit_micros: AtomicU64,
}

/// The embedded twin/command store.
pub struct SqliteTwinStore {
    jobs: mpsc::Sender<Job>,
    // Scans at once (each holds a blocking thread and a connection); more wait their turn.
    scans: Arc<tokio::sync::Semaphore>,
    readers: Mutex<Vec<Connection>>,
    open_reader: Box<dyn Fn() -> rusqlite::Result<Connection> + Send + Sync>,
    /// Writer counters.
    pub metrics: Arc<StoreMetrics>,
    // Keeps a shared in-memory database alive while the store exists.
    _anchor: Option<Mutex<Connection>>,
}

impl SqliteTwinStore {
    /// Opens (creating if needed) the store and starts its writer thread.
    pub fn open(config: &StoreConfig) -> Result<SqliteTwinStore, StoreError> {
        let (uri, flags, anchor) = match &config.path {
            Some(p) => (
                p.to_string_lossy().into_owned(),
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
                None,
            ),
            None => {
                // A named shared-cache memory database, so that readers see the writer's data.
                let name = format!(
                    "file:ferrohub-twins-{:x}?mode=memory&cache=shared",
                    rand::random::<u64>()
                );
                let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_URI;
                let anchor = Connection::open_with_flags(&name, flags)?;
                (name, flags, Some(anchor))
            }
        };
        let writer = Connection::open_with_flags(&uri, flags)?;
        configure(&writer, config.path.is_some(), config.fsync)?;
        let found: i64 = writer.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { path: uri, found });
        }
        writer.execute_batch(SCHEMA)?;
        writer.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        let metrics = Arc::new(StoreMetrics::default());
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let cache = DocCache {
            map: HashMap::new(),
            bytes: 0,
            capacity: config.cache_entries.max(16),
            max_bytes: config.cache_bytes.max(1 << 20),
        };
        let m = metrics.clone();
        let wal = config
            .path
            .as_ref()
            .map(|p| PathBuf::from(format!("{}-wal", p.display())));
        std::thread::Builder::new()
            .name("twin-store".into())
            .spawn(move || writer_loop(writer, rx, cache, m, wal))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        if config.path.is_some() {
            let checkpoint_conn = Connection::open_with_flags(&uri, flags)?;
            configure(&checkpoint_conn, true, config.fsync)?;
            let alive = Arc::downgrade(&metrics);
            std::thread::Builder::new()
                .name("twin-checkpoint".into())
                .spawn(move || checkpointer(checkpoint_conn, alive))
                .map_err(|e| StoreError::Corrupt(format!("cannot start the checkpointer: {e}")))?;
        }
        let (persistent, fsync) = (config.path.is_some(), config.fsync);
        let open_reader = Box::new(move || {
            let c = Connection::open_with_flags(&uri, flags)?;
            configure(&c, persistent, fsync)?;
            Ok(c)
        });
        Ok(SqliteTwinStore {
            jobs: tx,
            scans: Arc::new(tokio::sync::Semaphore::new(4)),
            readers: Mutex::new(Vec::new()),
            open_reader,
            metrics,
            _anchor: anchor.map(Mutex::new),
        })
    }

    /// Queues a job for the writer. The job runs in queue order: callers that need their writes
    /// applied in order (one device's updates) call this in order, then await the answers.
    pub async fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Runs `f` on a read connection on a blocking thread (for scans that must not hold up the
    /// writer).
    pub async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let me = self.clone();
        let permit = self
            .scans
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match me.readers.lock().pop() {
                Some(c) => c,
                None => (me.open_reader)()?,
            };
            let out = f(&conn);
            let mut readers = me.readers.lock();
            if readers.len() < 4 {
                readers.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("reader task failed: {e}")))?
    }
}

fn configure(c: &Connection, persistent: bool, fsync: bool) -> rusqlite::Result<()> {
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    // Small pages: a twin write dirties about one page of `twins` and one of `twin_history`, and
    // every dirty page is copied whole into the WAL at each group commit and back at each
    // checkpoint. 1 KiB pages move a quarter of the bytes of the default 4 KiB for the same
    // updates. (Takes effect when the database is created.)
    c.execute_batch("PRAGMA page_size = 1024;")?;
    if !persistent {
        // An in-memory database is shared between connections through SQLite's shared cache,
        // whose table locks would make a scan fail ("database table is locked") while the writer
        // holds a group open, and busy_timeout does not apply to them. Scans read uncommitted
        // instead: in memory nothing is durable anyway.
        c.execute_batch("PRAGMA read_uncommitted = 1;")?;
    }
    if persistent {
        // WAL: readers never block the writer. FULL: a commit is on disk when it returns, which
        // is what lets the hub acknowledge a twin update or a queued command.
        c.execute_batch(if fsync {
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
        } else {
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
        })?;
    }
    // A modest page cache: SQLite walks the whole cache at the end of some write transactions,
    // so a huge one costs more than it saves. The writer never checkpoints itself (a checkpoint
    // copies the WAL back into the database: slow, and it would stall every acknowledgement); a
    // separate thread does (see `checkpointer`).
    c.execute_batch(
        "PRAGMA foreign_keys = OFF; PRAGMA cache_size = -16384; PRAGMA wal_autocheckpoint = 0;",
    )?;
    Ok(())
}

/// Copies the WAL back into the database (passive: never waits for the writer or readers) five
/// times a second, so that the writer seldom has to. Stops when the store is dropped.
fn checkpointer(conn: Connection, alive: std::sync::Weak<StoreMetrics>) {
    while alive.strong_count() > 0 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
            tracing::warn!(error = %e, "twin store: checkpoint failed");
        }
    }
}

/// A WAL this large is rewound by the writer between two groups: a passive checkpoint cannot
/// rewind a WAL that is written all the time, but it has already copied nearly every frame, so
/// the writer's truncating checkpoint is short.
const WAL_REWIND_BYTES: u64 = 64 << 20;

/// Most jobs in one transaction: bounds the latency a large burst adds to its first job.
const MAX_GROUP: usize = 2048;

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    mut cache: DocCache,
    metrics: Arc<StoreMetrics>,
    wal: Option<PathBuf>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut done: Done = Vec::with_capacity(MAX_GROUP);
    let mut touched = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = run_group(&mut conn, &mut batch, &mut cache, &mut touched, &mut done);
        metrics.commits.fetch_add(1, Relaxed);
        metrics.jobs.fetch_add(done.len() as u64, Relaxed);
        metrics
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        let outcome = outcome.map_err(Arc::new);
        if outcome.is_err() {
            // Nothing of this group is on disk: drop what the cache learnt from it.
            for k in touched.drain(..) {
                cache.remove(&k);
            }
        }
        touched.clear();
        // Every job learns the group's outcome: writers whether they are durable, readers
        // whether what they read was (they answer only then: no read of an uncommitted write).
        for (_, then) in done.drain(..) {
            then(outcome.clone());
        }
        if let Some(wal) = &wal
            && std::fs::metadata(wal).is_ok_and(|m| m.len() > WAL_REWIND_BYTES)
            && let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        {
            tracing::warn!(error = %e, "twin store: checkpoint failed");
        }
    }
}

/// What runs once a commit's outcome is known.
pub type AfterCommit = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;
type Done = Vec<(bool, AfterCommit)>;

fn run_group(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
    cache: &mut DocCache,
    touched: &mut Vec<TwinKey>,
    done: &mut Done,
) -> Result<(), StoreError> {
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            // Still run the jobs (without a transaction they cannot write) so callers get an
            // answer: each sees the failure.
            for job in batch.drain(..) {
                done.push((true, Box::new(|_| {})));
                drop(job);
            }
            return Err(e.into());
        }
    };
    // Set when SQLite rolled the whole transaction back (disk full, I/O error): the remaining
    // jobs must not run, or their statements would commit one by one outside the group.
    let mut broken = false;
    for job in batch.drain(..) {
        if broken {
            // The caller's answer channel closes: it is told the store failed.
            drop(job);
            continue;
        }
        let mut job_touched = Vec::new();
        let sp = match tx.savepoint() {
            Ok(sp) => sp,
            Err(e) => {
                tracing::error!(error = %e, "twin store: savepoint failed");
                drop(job);
                broken = true;
                continue;
            }
        };
        let result = {
            let mut ctx = WriteContext {
                conn: &sp,
                cache,
                touched: &mut job_touched,
            };
            job(&mut ctx)
        };
        if result.keep {
            match sp.commit() {
                Ok(()) => {
                    touched.extend(job_touched);
                    done.push((true, result.then));
                }
                Err(e) => {
                    tracing::error!(error = %e, "twin store: releasing a savepoint failed");
                    for k in job_touched {
                        cache.remove(&k);
                    }
                    (result.then)(Err(Arc::new(e.into())));
                }
            }
        } else {
            drop(sp);
            for k in job_touched {
                cache.remove(&k);
            }
            done.push((false, result.then));
        }
        if tx.is_autocommit() {
            tracing::error!("twin store: SQLite rolled the group's transaction back");
            broken = true;
        }
    }
    if broken {
        return Err(StoreError::Corrupt(
            "the group's transaction was rolled back (disk full or I/O error?)".into(),
        ));
    }
    tx.commit()?;
    Ok(())
}

/// A reply channel for jobs: the job's answer, released after its commit.
pub fn reply_after_commit<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, crate::TwinError>>,
    answer: Result<T, crate::TwinError>,
    keep: bool,
) -> JobDone {
    JobDone {
        keep,
        then: Box::new(move |committed| {
            let _ = tx.send(match committed {
                Err(e) if keep => Err(crate::TwinError::Store(e)),
                _ => answer,
            });
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> TwinKey {
        TwinKey {
            tenant: Arc::from("t"),
            device: Arc::from(format!("d{i}").as_str()),
            name: Arc::from(""),
        }
    }

    #[test]
    fn the_document_cache_is_bounded_by_count_and_by_bytes() {
        let mut c = DocCache {
            map: HashMap::new(),
            bytes: 0,
            capacity: 100,
            max_bytes: 10_000,
        };
        for i in 0..1000 {
            c.insert(key(i), TwinDocument::new(0), 500);
            assert!(c.bytes <= 10_000, "{} bytes", c.bytes);
            assert!(c.map.len() <= 100);
            assert_eq!(c.bytes, c.map.values().map(|(_, s)| s).sum::<usize>());
        }
        // Re-inserting and resizing keep the account exact.
        c.insert(key(999), TwinDocument::new(0), 100);
        c.set_size(&key(999), 700);
        c.remove(&key(998));
        c.retain(|k| &*k.device != "d997");
        assert_eq!(c.bytes, c.map.values().map(|(_, s)| s).sum::<usize>());
    }
}
