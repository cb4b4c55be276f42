//! Durable broker state.
//!
//! The MQTT session engine keeps its working state in memory and describes every change that must
//! survive a crash as a [`StoreOp`]. [`BrokerStore::submit`] hands a batch of ops to a single writer
//! thread that appends them to a write-ahead log with group commit; the returned [`Commit`] resolves
//! once the batch is durable under the configured [`FsyncPolicy`], and only then does the broker
//! acknowledge (PUBACK/PUBREC) a message that a persistent session must not lose. On start,
//! [`BrokerStore::open`] replays snapshot + log into a [`RecoveredState`].
//!
//! # Durability contract
//!
//! **What a resolved [`Commit`] means.** Its batch, and every batch submitted before it, has been
//! written to the log with one `write(2)` per group commit and:
//! - with [`FsyncPolicy::Always`] (the default), `fdatasync`ed: it survives `kill -9`, a kernel
//!   panic and power loss (as far as the disk honours flushes);
//! - with [`FsyncPolicy::Never`], handed to the OS page cache only: it survives `kill -9`, a panic
//!   or an OOM kill of the hub, but a kernel crash or power loss may lose the last seconds of
//!   commits (whatever the OS had not written back yet, about 30 s with Linux defaults). The
//!   files stay consistent: what was lost is a tail of the log, cut off at the next start.
//!
//! **Ordering and atomicity.** Batches become durable in submission order (the order in which
//! `submit` calls were admitted), and recovery always yields a prefix of that order: never a later
//! batch without an earlier one. A batch is one log record, so it is recovered entirely or not at
//! all. A batch whose `Commit` had not resolved at the crash may or may not be recovered.
//!
//! **What is fsynced, whatever the policy.** Creating a log (header written to a `.tmp` file,
//! fsynced, renamed, directory fsynced); the log being closed by a compaction (before anything
//! is written to the next one) and the snapshot (written to `snapshot.bin.tmp`, fsynced,
//! renamed, directory fsynced, and only then are the logs it contains deleted); the truncation of
//! a damaged tail at start-up; and the log on [`BrokerStore::close`].
//!
//! **Damage found at start-up never prevents starting**; each case adds a human-readable entry
//! to [`RecoveredState::warnings`] (also logged with `tracing::warn!`):
//! - a torn or corrupted log tail (incomplete record, length beyond the end of the file, CRC
//!   mismatch, undecodable payload): replay stops at the last good record, the file is truncated
//!   there, and everything before it is recovered. Records after the damage are dropped even if
//!   intact, since nothing after a hole can be trusted to be in order;
//! - an unreadable snapshot (bad header or CRC, undecodable or missing records, no end record):
//!   renamed to `snapshot.bin.bad-<unix millis>` and kept for inspection; the state is rebuilt
//!   from the log alone (what had been compacted into the snapshot is lost), message ids still do
//!   not go backwards (each log header records the next id), and a fresh snapshot of the
//!   recovered state is written at once so that the next start is clean;
//! - an unreadable log header: the log is renamed to `<log name>.bad-<unix millis>` and the
//!   store starts from what precedes it;
//! - damage in a log that is followed by other logs (only possible if the disk lost data): the
//!   later logs are set aside like an unreadable one, since they follow a hole;
//! - leftover `*.tmp` files of an interrupted compaction are deleted, and logs already contained
//!   in the snapshot (crash before the compaction deleted them) are deleted, not replayed.
//!
//! A file with a valid header of an unknown (newer) format version is not touched: `open` fails
//! with [`StoreError::UnsupportedVersion`]. An I/O error while writing stops the writer: every
//! commit not yet resolved and every later `submit` fail with [`StoreError::Failed`] (the hub
//! should stop; the next start repairs the files).
//!
//! # Architecture and file format (format version 1)
//!
//! The data directory holds `LOCK` (an exclusive `flock` held while open), the write-ahead logs
//! `wal-<epoch as 16 hex digits>.log` (normally one; two while a compaction is running) and,
//! after the first compaction, `snapshot.bin`. Both kinds of file start with a 32-byte header:
//! magic `FHSTORE1`, `u16` format version (1), kind (1 log, 2 snapshot), a reserved byte, `u64`
//! epoch, `u64` next message id, CRC-32 of the preceding 28 bytes (integers little-endian).
//! Records follow: `u32` payload length, `u32` CRC-32 of the payload, payload (at most 1 GiB).
//!
//! - A **log** record is one submitted batch: a varint op count then the ops, each a tag byte and
//!   its fields (varints, length-prefixed UTF-8 strings and byte strings, flag bytes; messages
//!   carry topic, payload, QoS, retain, receive time and every MQTT 5 property).
//! - A **snapshot** of epoch `e` contains the whole state after the logs of epochs up to `e`:
//!   every live message body once (by id), every session (record, subscriptions, inbound QoS 2
//!   ids, deliveries referring to bodies by id), every retained message, and an end record with
//!   the counts (a snapshot without it is damaged). Recovery loads the snapshot, then replays the
//!   logs of later epochs in order.
//!
//! One writer thread does all file I/O on the commit path. Submitters push batches to a
//! mutex-protected queue (bounded by [`StoreConfig::queue_capacity`]; `submit` waits for room)
//! and wake the writer; the writer takes everything queued, encodes it into one buffer, writes it,
//! fdatasyncs it (`Always`) and resolves all the commits of the group at once. It also applies the
//! ops to an in-memory model of the live state (message bodies stored once, reference-counted by
//! the deliveries needing them, freed with the last one). When the log exceeds
//! [`StoreConfig::compact_after_bytes`] (and the size of the last snapshot), the writer starts the
//! log of the next epoch and hands a copy of the model to a background thread, which writes it
//! as the snapshot of the previous epoch and deletes the logs it contains: commits only pause for
//! the copy and the creation of the new log, and disk use and restart time stay proportional to
//! the live state. [`BrokerStore::compact`] does the same synchronously.
//!
//! Changing the encoding requires a new format version, the old decoder kept, and a new fixture
//! next to `tests/fixtures/v1` checked by `tests/compat.rs`.
//!
//! # Semantics of ops
//!
//! - Ops naming a session that does not exist (no [`StoreOp::PutSession`] yet, or deleted) are
//!   ignored, and so are [`StoreOp::Enqueue`] recipients without a session: submit the
//!   `PutSession` first (in the same or an earlier batch).
//! - `PutSession` on an existing session replaces its record only (subscriptions, deliveries and
//!   inbound QoS 2 state are kept); `DeleteSession` removes all of it.
//! - A message body is stored once per message id, whatever the number of recipients, and
//!   forgotten when its last delivery is dequeued. An `Enqueue` of an id that is still live
//!   replaces the body and adds (or replaces) the listed deliveries.
//! - `Sent`, `Released` and `Dequeue` of an id the session does not hold are no-ops.
//! - [`RecoveredState::next_message_id`] is one more than the largest id ever enqueued (even if
//!   dequeued since) and never goes backwards.
//! - Recovered collections are sorted: sessions by (tenant, client id), subscriptions by filter,
//!   deliveries by message id, inbound QoS 2 ids ascending, retained messages by (tenant, topic).

mod codec;
mod format;
mod model;
mod recovery;
mod state;
mod writer;

pub use model::*;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use writer::Shared;

/// Handle to the broker's durable state. Cheap to clone; all clones share one writer.
///
/// Dropping the last handle asks the writer to finish the queued batches and stop in the
/// background; call [`BrokerStore::close`] to wait for that (and for the directory lock to be
/// released).
#[derive(Clone)]
pub struct BrokerStore {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Memory(Arc<AtomicBool>),
    Disk(Arc<Handle>),
}

/// Owned by the store handles only (not by commits or the writer), so that dropping the last
/// handle stops the writer.
struct Handle {
    shared: Arc<Shared>,
    dir: String,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.request_close();
    }
}

impl fmt::Debug for BrokerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Memory(_) => f.write_str("BrokerStore(in memory)"),
            Inner::Disk(h) => write!(f, "BrokerStore({})", h.dir),
        }
    }
}

/// Counters for metrics, from [`BrokerStore::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Current size of the write-ahead log in bytes (header included).
    pub log_bytes: u64,
    /// Size of the current snapshot in bytes (0 if none).
    pub snapshot_bytes: u64,
    /// Group commits done (each one `write` and, with [`FsyncPolicy::Always`], one fdatasync).
    pub group_commits: u64,
    /// Batches written.
    pub batches_written: u64,
    /// Ops written.
    pub ops_written: u64,
    /// Bytes appended to logs since open.
    pub bytes_written: u64,
    /// fdatasync calls on the commit path.
    pub fsyncs: u64,
    /// Compactions (snapshot + new log) since open.
    pub compactions: u64,
    /// Duration of the last group commit (encode, write, fsync, and compaction if requested).
    pub last_commit_latency: Duration,
    /// Batches submitted and not yet durable.
    pub queued_batches: u64,
}

impl BrokerStore {
    /// Opens (creating if needed) the store in `dir`, takes an exclusive lock on it
    /// ([`StoreError::Locked`] if another process, or another open store in this process, holds
    /// it), replays snapshot + log, and starts the writer thread.
    ///
    /// Damaged content never makes this fail: see the crate documentation. Errors are I/O errors
    /// on the directory, the lock, and files of an unsupported format version.
    pub fn open(
        dir: &Path,
        config: StoreConfig,
    ) -> Result<(BrokerStore, RecoveredState), StoreError> {
        let opened = recovery::open_dir(dir)?;
        let mut recovered = opened.state.to_recovered();
        recovered.warnings = opened.warnings.clone();
        let shared = writer::start(dir.to_path_buf(), opened, &config)?;
        let store = BrokerStore {
            inner: Inner::Disk(Arc::new(Handle {
                shared,
                dir: dir.display().to_string(),
            })),
        };
        Ok((store, recovered))
    }

    /// A store that persists nothing: `submit` resolves immediately. For tests and
    /// `persistence = false`.
    pub fn in_memory() -> BrokerStore {
        BrokerStore {
            inner: Inner::Memory(Arc::new(AtomicBool::new(false))),
        }
    }

    /// False for [`BrokerStore::in_memory`].
    pub fn is_persistent(&self) -> bool {
        matches!(self.inner, Inner::Disk(_))
    }

    /// Queues a batch of ops, to be applied atomically after every batch submitted before it.
    ///
    /// This does no I/O: it waits only when [`StoreConfig::queue_capacity`] batches are already
    /// waiting for the writer (backpressure). The returned [`Commit`] resolves once the whole
    /// batch is durable under the fsync policy; it need not be awaited for the batch to be written.
    /// Fails with [`StoreError::Closed`] after [`BrokerStore::close`], [`StoreError::Failed`]
    /// after a write error, and [`StoreError::BatchTooLarge`] for a batch over 1 GiB.
    pub async fn submit(&self, ops: Vec<StoreOp>) -> Result<Commit, StoreError> {
        match &self.inner {
            Inner::Memory(closed) => {
                if closed.load(Ordering::Acquire) {
                    Err(StoreError::Closed)
                } else {
                    Ok(Commit::ready(Ok(())))
                }
            }
            Inner::Disk(h) => {
                let seq = h.shared.submit(ops, false).await?;
                Ok(Commit::waiting(h.shared.clone(), seq))
            }
        }
    }

    /// Resolves when everything submitted before the call is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Memory(_) => Ok(()),
            Inner::Disk(h) => {
                let seq = h.shared.last_submitted();
                Commit::waiting(h.shared.clone(), seq).await
            }
        }
    }

    /// Writes a snapshot and starts a new log now (after everything submitted before the call),
    /// instead of waiting for the log to reach [`StoreConfig::compact_after_bytes`]. Resolves when
    /// done. A compaction that fails to write the snapshot is logged and skipped (the log stays
    /// valid), so success does not guarantee that a snapshot was written.
    pub async fn compact(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Memory(closed) => {
                if closed.load(Ordering::Acquire) {
                    Err(StoreError::Closed)
                } else {
                    Ok(())
                }
            }
            Inner::Disk(h) => {
                // An empty batch flagged for compaction: the writer compacts before resolving it.
                let seq = h.shared.submit(Vec::new(), true).await?;
                Commit::waiting(h.shared.clone(), seq).await
            }
        }
    }

    /// Flushes, fsyncs and stops the writer thread, releasing the directory lock. Idempotent;
    /// later `submit`s return [`StoreError::Closed`]. Returns [`StoreError::Failed`] if the
    /// writer had stopped on an error.
    pub async fn close(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Memory(closed) => {
                closed.store(true, Ordering::Release);
                Ok(())
            }
            Inner::Disk(h) => {
                h.shared.request_close();
                let mut stopped = h.shared.stopped();
                // The sender lives in `Shared`, which we hold: this cannot fail.
                let _ = stopped.wait_for(|s| *s).await;
                match h.shared.failure() {
                    Some(m) => Err(StoreError::Failed(m.to_owned())),
                    None => Ok(()),
                }
            }
        }
    }

    /// Counters for metrics (all zero for an in-memory store).
    pub fn stats(&self) -> StoreStats {
        match &self.inner {
            Inner::Memory(_) => StoreStats::default(),
            Inner::Disk(h) => h.shared.stats(),
        }
    }
}

/// Resolves to `Ok(())` once a submitted batch is durable, or to the error that prevented it.
///
/// `Send + Unpin + 'static`; dropping it does not cancel the batch. Polling it costs an atomic
/// load once the batch is durable.
#[must_use = "the batch is written anyway, but only awaiting its commit tells when it is durable"]
pub struct Commit {
    state: CommitState,
}

enum CommitState {
    Ready(Option<Result<(), StoreError>>),
    Waiting { shared: Arc<Shared>, seq: u64 },
}

impl Commit {
    fn ready(result: Result<(), StoreError>) -> Commit {
        Commit {
            state: CommitState::Ready(Some(result)),
        }
    }

    fn waiting(shared: Arc<Shared>, seq: u64) -> Commit {
        Commit {
            state: CommitState::Waiting { shared, seq },
        }
    }

    /// True when the batch is known to be durable (without waiting).
    pub fn is_durable(&self) -> bool {
        match &self.state {
            CommitState::Ready(r) => matches!(r, Some(Ok(()))),
            CommitState::Waiting { shared, seq } => shared.is_durable(*seq),
        }
    }
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            CommitState::Ready(r) => f.debug_tuple("Commit").field(r).finish(),
            CommitState::Waiting { seq, .. } => write!(f, "Commit(batch {seq})"),
        }
    }
}

impl Future for Commit {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            // Polled again after completion: report success rather than panic.
            CommitState::Ready(r) => Poll::Ready(r.take().unwrap_or(Ok(()))),
            CommitState::Waiting { shared, seq } => {
                let res = shared.poll_durable(*seq, cx.waker());
                if res.is_ready() {
                    this.state = CommitState::Ready(None);
                }
                res
            }
        }
    }
}
