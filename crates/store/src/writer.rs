//! The submission queue shared with submitters, and the writer thread that owns all file I/O.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{Semaphore, watch};

use crate::format::{self, HEADER_LEN, MAX_RECORD_LEN};
use crate::recovery::Opened;
use crate::state::LiveState;
use crate::{FsyncPolicy, StoreConfig, StoreError, StoreOp, StoreStats, codec};

/// Batches waiting for the writer.
#[derive(Default)]
pub(crate) struct Queue {
    batches: Vec<Vec<StoreOp>>,
    /// Sequence number of the last batch submitted (the first batch is 1).
    last_seq: u64,
    closing: bool,
    compact_requested: bool,
}

#[derive(Default)]
struct Counters {
    log_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    group_commits: AtomicU64,
    batches_written: AtomicU64,
    ops_written: AtomicU64,
    bytes_written: AtomicU64,
    fsyncs: AtomicU64,
    compactions: AtomicU64,
    last_commit_latency_ns: AtomicU64,
}

/// State shared by the store handles, the commit futures and the writer thread.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    /// One permit per batch that may wait for the writer (backpressure).
    permits: Semaphore,
    /// Every batch with a sequence number up to this one is durable.
    durable: AtomicU64,
    /// Commit futures waiting, by sequence number.
    waiters: Mutex<BTreeMap<u64, Waker>>,
    /// Set once when the writer stops after an error.
    failure: OnceLock<String>,
    /// Becomes true when the writer thread has released the files and the lock.
    stopped: watch::Sender<bool>,
    /// The writer thread is gone (stopped or never started) and will not take more work.
    dead: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn new(queue_capacity: usize) -> Shared {
        Shared {
            queue: Mutex::new(Queue::default()),
            wake_writer: Condvar::new(),
            permits: Semaphore::new(queue_capacity.clamp(1, Semaphore::MAX_PERMITS)),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(BTreeMap::new()),
            failure: OnceLock::new(),
            stopped: watch::Sender::new(false),
            dead: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    fn closed_error(&self) -> StoreError {
        match self.failure.get() {
            Some(m) => StoreError::Failed(m.clone()),
            None => StoreError::Closed,
        }
    }

    /// Queues a batch; returns its sequence number. With `compact`, the writer compacts after
    /// writing the group that contains it, before resolving it.
    pub(crate) async fn submit(&self, ops: Vec<StoreOp>, compact: bool) -> Result<u64, StoreError> {
        let bound = codec::batch_len_bound(&ops);
        if bound > MAX_RECORD_LEN {
            return Err(StoreError::BatchTooLarge {
                bytes: bound,
                max: MAX_RECORD_LEN,
            });
        }
        match self.permits.try_acquire() {
            Ok(p) => p.forget(),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(self.closed_error()),
            Err(tokio::sync::TryAcquireError::NoPermits) => match self.permits.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return Err(self.closed_error()),
            },
        }
        let seq = {
            let mut q = self.queue.lock();
            if q.closing {
                drop(q);
                self.permits.add_permits(1);
                return Err(self.closed_error());
            }
            q.batches.push(ops);
            q.compact_requested |= compact;
            q.last_seq += 1;
            q.last_seq
        };
        self.wake_writer.notify_one();
        Ok(seq)
    }

    /// Sequence number of the last batch submitted so far.
    pub(crate) fn last_submitted(&self) -> u64 {
        self.queue.lock().last_seq
    }

    /// Asks the writer to finish what is queued and stop.
    pub(crate) fn request_close(&self) {
        self.queue.lock().closing = true;
        self.permits.close();
        self.wake_writer.notify_one();
    }

    /// A receiver that sees `true` once the writer thread has stopped.
    pub(crate) fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// The writer's error, if it stopped because of one.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Polls for the durability of batch `seq`.
    pub(crate) fn poll_durable(
        &self,
        seq: u64,
        waker: &Waker,
    ) -> std::task::Poll<Result<(), StoreError>> {
        use std::task::Poll;
        if self.durable.load(Ordering::Acquire) >= seq {
            return Poll::Ready(Ok(()));
        }
        let mut w = self.waiters.lock();
        // Re-checked under the lock: the writer publishes `durable` before draining waiters.
        if self.durable.load(Ordering::Acquire) >= seq {
            return Poll::Ready(Ok(()));
        }
        if self.dead.load(Ordering::Acquire) {
            return Poll::Ready(Err(self.closed_error()));
        }
        match w.entry(seq) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if !e.get().will_wake(waker) {
                    e.insert(waker.clone());
                }
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(waker.clone());
            }
        }
        Poll::Pending
    }

    /// Whether batch `seq` is already durable.
    pub(crate) fn is_durable(&self, seq: u64) -> bool {
        self.durable.load(Ordering::Acquire) >= seq
    }

    /// Publishes that everything up to `seq` is durable and wakes those commits.
    fn resolve(&self, seq: u64) {
        self.durable.store(seq, Ordering::Release);
        let done = {
            let mut w = self.waiters.lock();
            if w.is_empty() {
                return;
            }
            let rest = w.split_off(&(seq + 1));
            std::mem::replace(&mut *w, rest)
        };
        for waker in done.into_values() {
            waker.wake();
        }
    }

    /// Marks the writer as gone (after `failure` was set, if any) and fails every waiter.
    fn mark_dead(&self) {
        {
            let mut q = self.queue.lock();
            q.closing = true;
            q.batches.clear();
        }
        self.permits.close();
        self.dead.store(true, Ordering::Release);
        let all = std::mem::take(&mut *self.waiters.lock());
        for waker in all.into_values() {
            waker.wake();
        }
    }

    /// Counter values.
    pub(crate) fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let last = self.last_submitted();
        let durable = self.durable.load(Ordering::Acquire);
        StoreStats {
            log_bytes: c.log_bytes.load(Ordering::Relaxed),
            snapshot_bytes: c.snapshot_bytes.load(Ordering::Relaxed),
            group_commits: c.group_commits.load(Ordering::Relaxed),
            batches_written: c.batches_written.load(Ordering::Relaxed),
            ops_written: c.ops_written.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            last_commit_latency: Duration::from_nanos(
                c.last_commit_latency_ns.load(Ordering::Relaxed),
            ),
            queued_batches: last.saturating_sub(durable),
        }
    }
}

/// The writer thread's state: the only owner of the files.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    log: File,
    log_len: u64,
    epoch: u64,
    state: LiveState,
    fsync: FsyncPolicy,
    compact_after: u64,
    /// Do not retry a failed compaction before the log reaches this length.
    compact_retry_at: u64,
    /// The thread writing a snapshot, if one is running; returns whether it succeeded.
    compaction: Option<std::thread::JoinHandle<bool>>,
    buf: Vec<u8>,
    taken: Vec<Vec<StoreOp>>,
    _lock: File,
}

/// Signals `stopped` when the writer thread ends, even by panic, after the writer (and with it the
/// directory lock) has been dropped.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if !self.0.dead.load(Ordering::Acquire) {
            if std::thread::panicking() {
                let _ = self
                    .0
                    .failure
                    .set("the store writer thread panicked".into());
            }
            self.0.mark_dead();
        }
        self.0.stopped.send_replace(true);
    }
}

/// Starts the writer thread over a recovered directory.
pub(crate) fn start(
    dir: PathBuf,
    opened: Opened,
    config: &StoreConfig,
) -> Result<Arc<Shared>, StoreError> {
    let shared = Arc::new(Shared::new(config.queue_capacity));
    shared
        .counters
        .log_bytes
        .store(opened.log_len, Ordering::Relaxed);
    shared
        .counters
        .snapshot_bytes
        .store(opened.snapshot_bytes, Ordering::Relaxed);
    let writer = Writer {
        shared: shared.clone(),
        log: opened.log,
        log_len: opened.log_len,
        epoch: opened.epoch,
        state: opened.state,
        fsync: config.fsync,
        compact_after: config.compact_after_bytes,
        compact_retry_at: 0,
        compaction: None,
        buf: Vec::new(),
        taken: Vec::new(),
        _lock: opened.lock,
        dir: dir.clone(),
    };
    std::thread::Builder::new()
        .name("ferrohub-store".into())
        .spawn(move || writer.run())
        .map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    Ok(shared)
}

impl Writer {
    fn run(self) {
        let guard = StopGuard(self.shared.clone());
        let mut w = self;
        let result = w.run_loop();
        // A snapshot being written must be finished before the lock is released.
        w.finish_compaction();
        // Closes the files and releases the directory lock before `stopped` is signalled.
        drop(w);
        match result {
            Ok(()) => guard.0.mark_dead(),
            Err(msg) => {
                tracing::error!(target: "ferrohub_store", "store writer stopped: {msg}");
                let _ = guard.0.failure.set(msg);
                guard.0.mark_dead();
            }
        }
    }

    fn run_loop(&mut self) -> Result<(), String> {
        loop {
            let (last_seq, closing, compact) = {
                let mut q = self.shared.queue.lock();
                while q.batches.is_empty() && !q.closing {
                    self.shared.wake_writer.wait(&mut q);
                }
                std::mem::swap(&mut q.batches, &mut self.taken);
                let compact = std::mem::take(&mut q.compact_requested);
                (q.last_seq, q.closing, compact)
            };
            self.commit_group(last_seq, compact)?;
            if closing {
                // Nothing can be queued any more: make everything durable, whatever the policy.
                self.log
                    .sync_all()
                    .map_err(|e| format!("fsync of {}: {e}", self.log_path()))?;
                return Ok(());
            }
        }
    }

    fn log_path(&self) -> String {
        format::path(&self.dir, &format::log_name(self.epoch))
            .display()
            .to_string()
    }

    /// Writes everything taken from the queue as one write (and one fdatasync), then resolves it.
    fn commit_group(&mut self, last_seq: u64, compact: bool) -> Result<(), String> {
        let start = Instant::now();
        let n_batches = self.taken.len();
        let mut n_ops = 0usize;
        self.buf.clear();
        for ops in self.taken.drain(..) {
            if ops.is_empty() {
                continue;
            }
            n_ops += ops.len();
            format::put_record(&mut self.buf, |b| codec::put_batch(b, &ops));
            for op in ops {
                self.state.apply(op);
            }
        }
        if n_batches > 0 {
            // The ops are now bytes in `buf`: make room for more while this group is written.
            self.shared.permits.add_permits(n_batches);
        }
        let shared = self.shared.clone();
        let c = &shared.counters;
        if !self.buf.is_empty() {
            self.log
                .write_all(&self.buf)
                .map_err(|e| format!("append to {}: {e}", self.log_path()))?;
            self.log_len += self.buf.len() as u64;
            if self.fsync == FsyncPolicy::Always {
                self.log
                    .sync_data()
                    .map_err(|e| format!("fdatasync of {}: {e}", self.log_path()))?;
                c.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
            c.group_commits.fetch_add(1, Ordering::Relaxed);
            c.batches_written
                .fetch_add(n_batches as u64, Ordering::Relaxed);
            c.ops_written.fetch_add(n_ops as u64, Ordering::Relaxed);
            c.bytes_written
                .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            c.log_bytes.store(self.log_len, Ordering::Relaxed);
        }
        if self.buf.capacity() > 16 << 20 {
            self.buf = Vec::new();
        }
        if compact {
            self.compact(true)?;
        }
        if self
            .compaction
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            self.finish_compaction();
        }
        c.last_commit_latency_ns.store(
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.shared.resolve(last_seq);
        if !compact
            && self.compaction.is_none()
            && self.log_len > self.compact_after
            && self.log_len > c.snapshot_bytes.load(Ordering::Relaxed)
            && self.log_len >= self.compact_retry_at
        {
            self.compact(false)?;
        }
        Ok(())
    }

    /// Waits for the snapshot being written, if any.
    fn finish_compaction(&mut self) {
        if let Some(h) = self.compaction.take() {
            let ok = h.join().unwrap_or(false);
            if !ok {
                self.compact_retry_at =
                    self.log_len.saturating_add(self.compact_after.max(1 << 20));
            }
        }
    }

    /// Starts a new log and writes a snapshot of the state as of the end of the previous one:
    /// in a background thread (`requested == false`: the writer goes on committing into the new
    /// log meanwhile), or before returning (`requested`, for [`crate::BrokerStore::compact`]).
    ///
    /// Log files have one name per epoch, so every step is crash-safe: until the snapshot of
    /// epoch `e` is in place, recovery replays the logs of epochs `e` and `e + 1` after the
    /// previous snapshot; once it is, the logs up to `e` are deleted.
    fn compact(&mut self, requested: bool) -> Result<(), String> {
        self.finish_compaction();
        let started = Instant::now();
        let old_epoch = self.epoch;
        if self.fsync == FsyncPolicy::Never {
            // The new log must never hold changes that follow a hole in the old one.
            self.log
                .sync_data()
                .map_err(|e| format!("fdatasync of {}: {e}", self.log_path()))?;
        }
        let new_epoch = old_epoch + 1;
        match format::create_log(&self.dir, new_epoch, self.state.next_message_id()) {
            Ok(log) => self.log = log,
            Err(e) => {
                // The current log stays valid: keep appending to it and retry later.
                self.compact_retry_at =
                    self.log_len.saturating_add(self.compact_after.max(1 << 20));
                tracing::warn!(
                    target: "ferrohub_store",
                    "compaction postponed: cannot start log epoch {new_epoch} in {}: {e}",
                    self.dir.display()
                );
                return Ok(());
            }
        }
        let old_len = self.log_len;
        self.epoch = new_epoch;
        self.log_len = HEADER_LEN as u64;
        self.shared
            .counters
            .log_bytes
            .store(self.log_len, Ordering::Relaxed);
        let frozen = self.state.clone();
        let dir = self.dir.clone();
        let shared = self.shared.clone();
        let job = move || {
            let res = frozen
                .write_snapshot_file(&dir, old_epoch)
                .and_then(|n| format::sync_dir(&dir).map(|()| n))
                .and_then(|n| format::delete_logs_up_to(&dir, old_epoch).map(|()| n));
            match res {
                Ok(bytes) => {
                    let c = &shared.counters;
                    c.compactions.fetch_add(1, Ordering::Relaxed);
                    c.snapshot_bytes.store(bytes, Ordering::Relaxed);
                    tracing::debug!(
                        target: "ferrohub_store",
                        epoch = old_epoch,
                        log_bytes = old_len,
                        snapshot_bytes = bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "compacted the write-ahead log into a snapshot"
                    );
                    true
                }
                Err(e) => {
                    // Nothing is lost: recovery replays the logs the snapshot would have replaced.
                    tracing::warn!(
                        target: "ferrohub_store",
                        "compaction failed, will retry: snapshot of epoch {old_epoch} in {}: {e}",
                        dir.display()
                    );
                    false
                }
            }
        };
        if requested {
            if !job() {
                self.compact_retry_at =
                    self.log_len.saturating_add(self.compact_after.max(1 << 20));
            }
        } else {
            match std::thread::Builder::new()
                .name("ferrohub-store-compact".into())
                .spawn(job)
            {
                Ok(h) => self.compaction = Some(h),
                Err(e) => tracing::warn!(
                    target: "ferrohub_store",
                    "compaction skipped: cannot start its thread: {e}"
                ),
            }
        }
        Ok(())
    }
}
