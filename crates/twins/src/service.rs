//! The twin service: validated, versioned, durable updates; reads; history; fleet queries; the
//! change stream; and pushing deltas to devices.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, oneshot};

use crate::TwinError;
use crate::document::{Limits, Section, TwinDocument};
use crate::link::DeviceLink;
use crate::query::{Filter, GroupKey};
use crate::store::{
    HistoryEntry, JobDone, SqliteTwinStore, StoreError, TwinKey, reply_after_commit,
};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Settings of the twin service (`[twins]` in the hub's configuration).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwinsConfig {
    /// Largest size of a section (desired, reported or tags) as compact JSON, in bytes.
    pub max_section_bytes: usize,
    /// Deepest nesting of a section (the section itself is level 1).
    pub max_depth: usize,
    /// Named twins per device (the default twin is not counted).
    pub max_named_twins: usize,
    /// History entries kept per twin (older ones are pruned as new ones arrive).
    pub history_per_twin: u64,
    /// History entries older than this are deleted (days; 0 keeps them until the per-twin cap).
    pub history_retention_days: u64,
    /// Parsed twin documents the writer keeps in memory.
    pub cache_entries: usize,
    /// Their total size as stored JSON, in MiB (parsed, they take a few times more).
    pub cache_mib: usize,
}

impl Default for TwinsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        TwinsConfig {
            max_section_bytes: limits.max_section_bytes,
            max_depth: limits.max_depth,
            max_named_twins: 16,
            history_per_twin: 1000,
            history_retention_days: 30,
            cache_entries: 100_000,
            cache_mib: 64,
        }
    }
}

impl TwinsConfig {
    /// The document limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_section_bytes: self.max_section_bytes,
            max_depth: self.max_depth,
        }
    }
}

/// A change to one section of a twin.
#[derive(Debug, Clone)]
pub struct TwinWrite {
    /// The section the patch applies to.
    pub section: Section,
    /// A JSON Merge Patch (RFC 7396) for the section; `None` when only rejections are sent.
    pub patch: Option<Value>,
    /// The whole-document version the writer last saw (optimistic concurrency).
    pub expected_version: Option<u64>,
    /// Echoed back to the writer.
    pub client_token: Option<String>,
    /// Who writes (`operator:…`, `device:…`, `rule:…`).
    pub actor: String,
    /// Desired keys the device cannot apply: `(dotted path, reason)`.
    pub rejections: Vec<(String, String)>,
    /// Also return the device's view before and after (for the `documents` topic).
    pub want_documents: bool,
}

/// The outcome of an accepted write.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The twin.
    pub key: TwinKey,
    /// The section written.
    pub section: Section,
    /// The document's version after the write.
    pub version: u64,
    /// The desired section's version after the write.
    pub desired_version: u64,
    /// The patch as applied.
    pub patch: Value,
    /// When.
    pub at: u64,
    /// The writer's token.
    pub client_token: Option<String>,
    /// The delta after the write, when a desired write changed it.
    pub delta: Option<Map<String, Value>>,
    /// The device's view before and after, when asked for.
    pub documents: Option<(Value, Value)>,
    /// Who wrote.
    pub actor: String,
    /// False when the write changed nothing (a rejection repeated with the same reason): no
    /// history entry, no change event.
    pub changed: bool,
}

/// A committed change, as streamed to watchers.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwinChange {
    /// Tenant.
    #[serde(skip)]
    pub tenant: Arc<str>,
    /// Device.
    pub device_id: String,
    /// Twin name (`default` for the default twin).
    pub name: String,
    /// Version after the change.
    pub version: u64,
    /// Section written.
    pub section: String,
    /// The patch.
    pub patch: Value,
    /// Who.
    pub actor: String,
    /// When.
    pub at: u64,
}

/// One page of a fleet query.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct QueryPage {
    /// Matching twins (operator views).
    pub items: Vec<Value>,
    /// Cursor for the next page, if there may be more.
    pub next: Option<String>,
}

/// One group of a grouped count.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct GroupCount {
    /// The value of the grouping field (`null` when absent).
    pub value: Value,
    /// How many twins have it.
    pub count: u64,
}

/// The twin service.
pub struct Twins {
    store: Arc<SqliteTwinStore>,
    config: TwinsConfig,
    changes: broadcast::Sender<TwinChange>,
    deltas: DeltaQueues,
}

/// A delta on its way to a device.
struct DeltaOut {
    key: TwinKey,
    body: String,
}

/// Deltas leave in commit order: the writer thread queues them (from the commit callback) to one
/// of a few publisher tasks chosen by the twin, each publishing its queue in order. So a device
/// never receives an older delta after a newer one, while different twins publish in parallel.
/// Queues are bounded; a full one makes the writer wait (backpressure), never drops.
struct DeltaQueues {
    senders: Vec<tokio::sync::mpsc::Sender<DeltaOut>>,
    receivers: parking_lot::Mutex<Vec<tokio::sync::mpsc::Receiver<DeltaOut>>>,
    linked: Arc<std::sync::atomic::AtomicBool>,
}

impl DeltaQueues {
    const SHARDS: usize = 8;

    fn new() -> DeltaQueues {
        let (senders, receivers) = (0..Self::SHARDS)
            .map(|_| tokio::sync::mpsc::channel(8192))
            .unzip();
        DeltaQueues {
            senders,
            receivers: parking_lot::Mutex::new(receivers),
            linked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// A sender for the writer thread (`None` until the service is linked to the devices).
    fn sender_for(&self, key: &TwinKey) -> Option<tokio::sync::mpsc::Sender<DeltaOut>> {
        use std::hash::{BuildHasher, Hash, Hasher};
        if !self.linked.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut h = hashbrown::DefaultHashBuilder::default().build_hasher();
        key.device.hash(&mut h);
        key.name.hash(&mut h);
        let i = (h.finish() as usize) % self.senders.len();
        self.senders.get(i).cloned()
    }
}

/// Queues `body` from the writer thread (after a commit), waiting if the queue is full.
fn queue_delta(tx: Option<tokio::sync::mpsc::Sender<DeltaOut>>, key: TwinKey, body: String) {
    if let Some(tx) = tx {
        let _ = tx.blocking_send(DeltaOut { key, body });
    }
}

/// Validates a twin name from a topic or URL (`default` and the empty name mean the default
/// twin) and returns its stored form.
pub fn twin_name(name: &str) -> Result<&str, TwinError> {
    if name.is_empty() || name == "default" {
        return Ok("");
    }
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(TwinError::Invalid(format!(
            "twin name {name:?} is not valid: use 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    Ok(name)
}

/// How a twin name is shown (`default` for the default twin).
pub fn display_name(stored: &str) -> &str {
    if stored.is_empty() { "default" } else { stored }
}

impl Twins {
    /// The service over `store`.
    pub fn new(store: Arc<SqliteTwinStore>, config: TwinsConfig) -> Arc<Twins> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(Twins {
            store,
            config,
            changes,
            deltas: DeltaQueues::new(),
        })
    }

    /// Appends the twin store's Prometheus metrics to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let m = &self.store.metrics;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, kind, value) in [
            (
                "ferrohub_twin_store_commits_total",
                "Group commits of the twin store.",
                "counter",
                g(&m.commits) as f64,
            ),
            (
                "ferrohub_twin_store_jobs_total",
                "Writes and reads run by the twin store's writer.",
                "counter",
                g(&m.jobs) as f64,
            ),
            (
                "ferrohub_twin_store_busy_seconds_total",
                "Time the writer spent running groups.",
                "counter",
                g(&m.commit_micros) as f64 / 1e6,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }

    /// Connects the service to the devices (the broker), so that desired changes reach them.
    /// Must be called inside a tokio runtime: it starts the delta publishers.
    pub fn set_link(&self, link: Arc<dyn DeviceLink>) {
        for mut rx in self.deltas.receivers.lock().drain(..) {
            let link = link.clone();
            tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    let topic = crate::topics::delta(&d.key.device, &d.key.name);
                    link.publish(&d.key.tenant, topic, d.body.into(), None)
                        .await;
                }
            });
        }
        self.deltas
            .linked
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A stream of committed changes (lossy for watchers that fall behind: they get a `Lagged`
    /// error and can catch up from the history).
    pub fn watch(&self) -> broadcast::Receiver<TwinChange> {
        self.changes.subscribe()
    }

    /// Queues a write; the returned receiver answers once the write is durable (or refused).
    /// Writes queued in order are applied in order.
    pub async fn enqueue(
        &self,
        key: TwinKey,
        write: TwinWrite,
    ) -> Result<oneshot::Receiver<Result<Applied, TwinError>>, TwinError> {
        let (tx, rx) = oneshot::channel();
        let limits = self.config.limits();
        if let Some(p) = &write.patch {
            // A patch that deletes thousands of absent keys leaves the section small but would
            // still be stored in the history and echoed: bound the patch itself too.
            let size = serde_json::to_string(p).map_or(0, |t| t.len());
            if size > limits.max_section_bytes {
                return Err(TwinError::PatchTooLarge {
                    size,
                    limit: limits.max_section_bytes,
                });
            }
        }
        let max_named = self.config.max_named_twins;
        let keep_history = self.config.history_per_twin;
        let delta_tx = self.deltas.sender_for(&key);
        let changes = self.changes.clone();
        self.store
            .submit(Box::new(move |ctx| {
                let answer = apply_write(ctx, &key, write, &limits, max_named, keep_history);
                let keep = answer.is_ok();
                let delta = match &answer {
                    Ok(a) => a
                        .delta
                        .as_ref()
                        .filter(|d| !d.is_empty())
                        .map(|d| (a.key.clone(), delta_message(a.desired_version, d, a.at))),
                    Err(_) => None,
                };
                // Built only when someone watches (it copies the patch).
                let change = match &answer {
                    Ok(a) if a.changed && changes.receiver_count() > 0 => Some(TwinChange {
                        tenant: a.key.tenant.clone(),
                        device_id: a.key.device.to_string(),
                        name: display_name(&a.key.name).to_string(),
                        version: a.version,
                        section: a.section.as_str().to_string(),
                        patch: a.patch.clone(),
                        actor: a.actor.clone(),
                        at: a.at,
                    }),
                    _ => None,
                };
                let reply = reply_after_commit(tx, answer, keep);
                JobDone {
                    keep,
                    // On the writer thread, in commit order, whatever became of the caller: the
                    // device's delta and the change stream.
                    then: Box::new(move |committed| {
                        if committed.is_ok() {
                            if let Some((key, body)) = delta {
                                queue_delta(delta_tx, key, body);
                            }
                            if let Some(change) = change {
                                let _ = changes.send(change);
                            }
                        }
                        (reply.then)(committed);
                    }),
                }
            }))
            .await?;
        Ok(rx)
    }

    /// Applies a write and waits until it is durable. Watchers and, for desired changes, the
    /// device hear of it from the commit itself (in commit order, even if the caller goes away).
    pub async fn update(&self, key: TwinKey, write: TwinWrite) -> Result<Applied, TwinError> {
        let rx = self.enqueue(key, write).await?;
        let applied = rx.await.map_err(|_| StoreError::Closed)??;
        Ok(applied)
    }

    /// Sends the device the current delta of a twin (if not empty), in order with the deltas of
    /// committed changes.
    pub async fn send_delta(&self, key: TwinKey) -> Result<(), TwinError> {
        let delta_tx = self.deltas.sender_for(&key);
        self.store
            .submit(Box::new(move |ctx| {
                let body = match ctx.load(&key) {
                    Ok(Some(doc)) => {
                        let delta = doc.delta();
                        (!delta.is_empty()).then(|| {
                            delta_message(
                                doc.section_version(Section::Desired),
                                &delta,
                                doc.updated_at(),
                            )
                        })
                    }
                    _ => None,
                };
                JobDone {
                    keep: false,
                    then: Box::new(move |committed| {
                        if committed.is_ok()
                            && let Some(body) = body
                        {
                            queue_delta(delta_tx, key, body);
                        }
                    }),
                }
            }))
            .await?;
        Ok(())
    }

    /// Reads a twin through the writer (so that it reflects every acknowledged write) and
    /// renders it with `render`. `None` when the twin does not exist.
    pub async fn read<T, F>(&self, key: TwinKey, render: F) -> Result<Option<T>, TwinError>
    where
        T: Send + 'static,
        F: FnOnce(&TwinDocument) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.store
            .submit(Box::new(move |ctx| {
                let out = ctx.load(&key).map(|d| d.map(|d| render(d)));
                // Answered after the group's commit, so a read never shows a write that could
                // still be lost.
                JobDone {
                    keep: false,
                    then: Box::new(move |committed| {
                        let _ = tx.send(match committed {
                            Ok(()) => out.map_err(TwinError::from),
                            Err(e) => Err(TwinError::Store(e)),
                        });
                    }),
                }
            }))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The operator's view of a twin; the default twin of an existing device reads as an empty
    /// document (version 0) before its first write.
    pub async fn operator_view(&self, key: TwinKey) -> Result<Value, TwinError> {
        let (device, name) = (key.device.clone(), key.name.clone());
        let (d2, n2) = (device.clone(), name.clone());
        match self
            .read(key, move |doc| doc.operator_view(&d2, display_name(&n2)))
            .await?
        {
            Some(v) => Ok(v),
            None if name.is_empty() => {
                Ok(TwinDocument::new(0).operator_view(&device, display_name(&name)))
            }
            None => Err(TwinError::NotFound(format!(
                "device {device} has no twin named {name}"
            ))),
        }
    }

    /// The device's view of a twin (no tags); like [`Twins::operator_view`] for a missing twin.
    pub async fn device_view(&self, key: TwinKey) -> Result<Value, TwinError> {
        let (device, name) = (key.device.clone(), key.name.clone());
        match self.read(key, |doc| doc.device_view()).await? {
            Some(v) => Ok(v),
            None if name.is_empty() => Ok(TwinDocument::new(0).device_view()),
            None => Err(TwinError::NotFound(format!(
                "device {device} has no twin named {name}"
            ))),
        }
    }

    /// The names of a device's twins (stored form; empty = default).
    pub async fn names(&self, tenant: &str, device: &str) -> Result<Vec<String>, TwinError> {
        let (t, d) = (tenant.to_string(), device.to_string());
        Ok(self
            .store
            .read(move |c| {
                let mut st =
                    c.prepare_cached("SELECT name FROM twins WHERE tenant = ?1 AND device = ?2")?;
                let rows = st.query_map(rusqlite::params![t, d], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }

    /// A twin's change history in version order, starting after `after`.
    pub async fn history(
        &self,
        key: TwinKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, TwinError> {
        let limit = limit.clamp(1, 1000) as i64;
        Ok(self
            .store
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT version, at, actor, section, patch, client_token FROM twin_history \
                     WHERE tenant = ?1 AND device = ?2 AND name = ?3 AND version > ?4 \
                     ORDER BY version LIMIT ?5",
                )?;
                let rows = st.query_map(
                    rusqlite::params![&*key.tenant, &*key.device, &*key.name, after as i64, limit],
                    |r| {
                        let patch: String = r.get(4)?;
                        Ok(HistoryEntry {
                            version: r.get::<_, i64>(0)? as u64,
                            at: r.get::<_, i64>(1)? as u64,
                            actor: r.get(2)?,
                            section: r.get(3)?,
                            patch: serde_json::from_str(&patch).unwrap_or(Value::Null),
                            client_token: r.get(5)?,
                        })
                    },
                )?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }

    /// Twins of `tenant` matching `filter` (see [`crate::query`]), in (device, name) order, after
    /// the cursor of a previous page.
    pub async fn query(
        &self,
        tenant: &str,
        filter: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<QueryPage, TwinError> {
        let compiled = match filter.filter(|f| !f.trim().is_empty()) {
            Some(f) => Some(Filter::parse(f)?.to_sql()),
            None => None,
        };
        let after = match cursor {
            Some(c) => Some(decode_cursor(c)?),
            None => None,
        };
        let limit = limit.clamp(1, 1000);
        let tenant = tenant.to_string();
        let rows: Vec<(String, String, String)> = self
            .store
            .read(move |c| {
                let mut sql = String::from("SELECT device, name, doc FROM twins WHERE tenant = ?");
                let mut params: Vec<rusqlite::types::Value> = vec![tenant.into()];
                if let Some((d, n)) = after {
                    sql.push_str(" AND (device, name) > (?, ?)");
                    params.push(d.into());
                    params.push(n.into());
                }
                if let Some(f) = compiled {
                    sql.push_str(" AND ");
                    sql.push_str(&f.sql);
                    params.extend(f.params);
                }
                sql.push_str(" ORDER BY device, name LIMIT ?");
                params.push((limit as i64 + 1).into());
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?;
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(rows.len().min(limit));
        let mut last = None;
        for (device, name, doc) in rows.into_iter().take(limit) {
            let doc: TwinDocument = serde_json::from_str(&doc)
                .map_err(|e| StoreError::Corrupt(format!("twin {device}/{name}: {e}")))?;
            items.push(doc.operator_view(&device, display_name(&name)));
            last = Some((device, name));
        }
        Ok(QueryPage {
            items,
            next: if more {
                last.map(|(d, n)| encode_cursor(&d, &n))
            } else {
                None
            },
        })
    }

    /// Counts twins of `tenant` matching `filter`, grouped by the value of `by`, largest groups
    /// first.
    pub async fn counts(
        &self,
        tenant: &str,
        by: &str,
        filter: Option<&str>,
        limit: usize,
    ) -> Result<Vec<GroupCount>, TwinError> {
        let key = GroupKey::parse(by)?.to_sql();
        let compiled = match filter.filter(|f| !f.trim().is_empty()) {
            Some(f) => Some(Filter::parse(f)?.to_sql()),
            None => None,
        };
        let limit = limit.clamp(1, 10_000) as i64;
        let tenant = tenant.to_string();
        Ok(self
            .store
            .read(move |c| {
                let mut sql = format!("SELECT {key} AS k, count(*) FROM twins WHERE tenant = ?");
                let mut params: Vec<rusqlite::types::Value> = vec![tenant.into()];
                if let Some(f) = compiled {
                    sql.push_str(" AND ");
                    sql.push_str(&f.sql);
                    params.extend(f.params);
                }
                sql.push_str(" GROUP BY k ORDER BY count(*) DESC, k LIMIT ?");
                params.push(limit.into());
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
                    let v: rusqlite::types::Value = r.get(0)?;
                    Ok(GroupCount {
                        value: sql_to_json(v),
                        count: r.get::<_, i64>(1)? as u64,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }

    /// Deletes every twin (and its history and commands) of a device, or of a whole tenant when
    /// `device` is `None`. Durable when it returns.
    pub async fn purge(&self, tenant: &str, device: Option<&str>) -> Result<(), TwinError> {
        let (tx, rx) = oneshot::channel();
        let (t, d) = (tenant.to_string(), device.map(str::to_string));
        self.store
            .submit(Box::new(move |ctx| {
                let result = (|| -> Result<(), StoreError> {
                    for table in ["twins", "twin_history", "commands"] {
                        match &d {
                            Some(d) => ctx.conn.execute(
                                &format!("DELETE FROM {table} WHERE tenant = ?1 AND device = ?2"),
                                rusqlite::params![t, d],
                            )?,
                            None => ctx.conn.execute(
                                &format!("DELETE FROM {table} WHERE tenant = ?1"),
                                rusqlite::params![t],
                            )?,
                        };
                    }
                    ctx.forget(&t, d.as_deref());
                    Ok(())
                })();
                let keep = result.is_ok();
                reply_after_commit(tx, result.map_err(TwinError::from), keep)
            }))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes the history entries older than `twins.history_retention_days` (none when it is
    /// 0), 10,000 per writer job so that twin writes go on in between. Returns how many went.
    pub async fn apply_history_retention(&self) -> Result<usize, TwinError> {
        const BATCH: usize = 10_000;
        let days = self.config.history_retention_days;
        if days == 0 {
            return Ok(0);
        }
        let cutoff = now_millis().saturating_sub(days * 86_400_000);
        let mut total = 0;
        loop {
            let n = self.prune_history(cutoff, BATCH).await?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }

    /// Deletes history entries older than `cutoff` (ms), at most `batch` of them; returns how
    /// many went.
    async fn prune_history(&self, cutoff: u64, batch: usize) -> Result<usize, TwinError> {
        let (tx, rx) = oneshot::channel();
        self.store
            .submit(Box::new(move |ctx| {
                let result = ctx
                    .conn
                    .execute(
                        "DELETE FROM twin_history WHERE (tenant, device, name, version) IN \
                         (SELECT tenant, device, name, version FROM twin_history \
                          WHERE at < ?1 LIMIT ?2)",
                        rusqlite::params![cutoff as i64, batch as i64],
                    )
                    .map_err(|e| TwinError::from(StoreError::from(e)));
                let keep = result.is_ok();
                reply_after_commit(tx, result, keep)
            }))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// The body of a `delta` message.
pub fn delta_message(desired_version: u64, delta: &Map<String, Value>, at: u64) -> String {
    json!({"version": desired_version, "delta": delta, "timestamp": at}).to_string()
}

/// Runs one write on the writer thread.
fn apply_write(
    ctx: &mut crate::store::WriteContext<'_>,
    key: &TwinKey,
    write: TwinWrite,
    limits: &Limits,
    max_named: usize,
    keep_history: u64,
) -> Result<Applied, TwinError> {
    let now = now_millis();
    // Any failure below evicts the cached copy, so a half-applied change is never seen.
    ctx.touch(key);
    if ctx.load(key)?.is_none() {
        if let Some(expected) = write.expected_version
            && expected != 0
        {
            return Err(TwinError::Conflict {
                expected,
                current: 0,
            });
        }
        if !key.name.is_empty() {
            let named: i64 = ctx
                .conn
                .prepare_cached(
                    "SELECT count(*) FROM twins WHERE tenant = ?1 AND device = ?2 AND name != ''",
                )
                .and_then(|mut s| {
                    s.query_row(rusqlite::params![&*key.tenant, &*key.device], |r| r.get(0))
                })
                .map_err(StoreError::from)?;
            if named as usize >= max_named {
                return Err(TwinError::TooManyTwins { limit: max_named });
            }
        }
        ctx.create(key, TwinDocument::new(now));
    }
    // Just loaded or created above.
    let Some(doc) = ctx.load(key)? else {
        return Err(TwinError::NotFound("twin vanished".into()));
    };
    if let Some(expected) = write.expected_version
        && expected != doc.version()
    {
        return Err(TwinError::Conflict {
            expected,
            current: doc.version(),
        });
    }
    let before = write.want_documents.then(|| doc.device_view());
    let mut delta = None;
    let section = write.section;
    let patch_given = write.patch.is_some();
    let patch = write.patch.unwrap_or(Value::Object(Map::new()));
    if patch_given || write.rejections.is_empty() {
        let outcome = doc.apply_patch(section, &patch, now, limits)?;
        if section == Section::Desired && outcome.delta_changed {
            delta = Some(doc.delta());
        }
    }
    let mut changed = patch_given || write.rejections.is_empty();
    for (path, reason) in &write.rejections {
        changed |= doc.reject(path, reason, now)?;
    }
    let after = write.want_documents.then(|| doc.device_view());
    let history_patch = if write.rejections.is_empty() {
        patch.clone()
    } else {
        json!({"patch": patch, "rejected": write.rejections.iter().map(|(p, r)| (p.clone(), Value::from(r.clone()))).collect::<Map<_, _>>()})
    };
    let applied = Applied {
        key: key.clone(),
        section,
        version: doc.version(),
        desired_version: doc.section_version(Section::Desired),
        patch,
        at: now,
        client_token: write.client_token.clone(),
        delta,
        documents: before.zip(after),
        actor: write.actor.clone(),
        changed,
    };
    if !changed {
        return Ok(applied);
    }
    let entry = HistoryEntry {
        version: applied.version,
        at: now,
        actor: write.actor,
        section: section.as_str().to_string(),
        patch: history_patch,
        client_token: write.client_token,
    };
    ctx.save(key, &entry)?;
    // Pruned when the version crosses a multiple of 64 (a write may advance it by more than one).
    let previous = applied.version.saturating_sub(1);
    if keep_history > 0 && applied.version / 64 != previous / 64 && applied.version > keep_history {
        ctx.conn
            .prepare_cached(
                "DELETE FROM twin_history WHERE tenant = ?1 AND device = ?2 AND name = ?3 AND version <= ?4",
            )
            .and_then(|mut s| {
                s.execute(rusqlite::params![
                    &*key.tenant,
                    &*key.device,
                    &*key.name,
                    (applied.version - keep_history) as i64
                ])
            })
            .map_err(StoreError::from)?;
    }
    Ok(applied)
}

fn encode_cursor(device: &str, name: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for b in device.bytes().chain([0u8]).chain(name.bytes()) {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn decode_cursor(c: &str) -> Result<(String, String), TwinError> {
    let bad = || {
        TwinError::Invalid(
            "the cursor is not valid: pass the `next` value of the previous page".into(),
        )
    };
    if !c.len().is_multiple_of(2) || c.len() > 1024 {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let mut parts = bytes.splitn(2, |b| *b == 0);
    let d = parts.next().ok_or_else(bad)?;
    let n = parts.next().ok_or_else(bad)?;
    Ok((
        String::from_utf8(d.to_vec()).map_err(|_| bad())?,
        String::from_utf8(n.to_vec()).map_err(|_| bad())?,
    ))
}

fn sql_to_json(v: rusqlite::types::Value) -> Value {
    use rusqlite::types::Value as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::from(i),
        V::Real(f) => Value::from(f),
        V::Text(t) => serde_json::from_str::<Value>(&t)
            .ok()
            .filter(|v| v.is_object() || v.is_array())
            .unwrap_or(Value::String(t)),
        V::Blob(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = encode_cursor("dev-1", "cfg");
        assert_eq!(decode_cursor(&c).ok(), Some(("dev-1".into(), "cfg".into())));
        assert!(decode_cursor("zz").is_err());
        assert!(decode_cursor("abc").is_err());
    }

    #[test]
    fn twin_names() {
        assert_eq!(twin_name("default").ok(), Some(""));
        assert_eq!(twin_name("").ok(), Some(""));
        assert_eq!(twin_name("fw-1").ok(), Some("fw-1"));
        assert!(twin_name("a/b").is_err());
        assert!(twin_name(&"x".repeat(65)).is_err());
    }
}
