//! Start-up: lock the directory, load the snapshot, replay the log, repair what is damaged.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::path::Path;

use crate::StoreError;
use crate::codec;
use crate::format::{
    self, HEADER_LEN, HeaderError, KIND_LOG, KIND_SNAPSHOT, LOCK_FILE, Next, RecordReader,
    SNAPSHOT_FILE,
};
use crate::state::LiveState;

/// What [`open_dir`] hands to the writer.
pub(crate) struct Opened {
    pub state: LiveState,
    /// The log, positioned at its end.
    pub log: File,
    pub log_len: u64,
    pub epoch: u64,
    pub snapshot_bytes: u64,
    /// Holds the directory's exclusive lock while open.
    pub lock: File,
    pub warnings: Vec<String>,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn warn(warnings: &mut Vec<String>, msg: String) {
    tracing::warn!(target: "ferrohub_store", "{msg}");
    warnings.push(msg);
}

/// Renames an unreadable file to `{name}.bad-{unix millis}` so that it is kept for inspection.
fn set_aside(
    dir: &Path,
    name: &str,
    what: &str,
    reason: &str,
    warnings: &mut Vec<String>,
) -> Result<(), StoreError> {
    let from = format::path(dir, name);
    let to = dir.join(format!("{name}.bad-{}", format::now_millis()));
    std::fs::rename(&from, &to).map_err(io_err(&from))?;
    format::sync_dir(dir).map_err(io_err(dir))?;
    warn(
        warnings,
        format!(
            "{what} {} is unreadable ({reason}); moved it to {} and continued without it",
            from.display(),
            to.display()
        ),
    );
    Ok(())
}

enum SnapshotLoad {
    Loaded(LiveState, u64, u64),
    Corrupt(String),
}

fn load_snapshot(path: &Path, file: &mut File, len: u64) -> Result<SnapshotLoad, StoreError> {
    let header = match format::read_header(file, len, KIND_SNAPSHOT).map_err(io_err(path))? {
        Ok(h) => h,
        Err(HeaderError::Corrupt(r)) => return Ok(SnapshotLoad::Corrupt(r)),
        Err(HeaderError::UnsupportedVersion(version)) => {
            return Err(StoreError::UnsupportedVersion {
                path: path.display().to_string(),
                version,
            });
        }
    };
    let clone = file.try_clone().map_err(io_err(path))?;
    let mut reader = RecordReader::new(clone, len);
    let mut io_error = None;
    let res = LiveState::from_snapshot_records(&header, || match reader.next() {
        Ok(Next::Record(r)) => Ok(Some(r.to_vec())),
        Ok(Next::End) => Ok(None),
        Ok(Next::Damaged(r)) => Err(r),
        Err(e) => {
            let msg = e.to_string();
            io_error = Some(e);
            Err(msg)
        }
    });
    if let Some(e) = io_error {
        return Err(io_err(path)(e));
    }
    Ok(match res {
        Ok(state) => SnapshotLoad::Loaded(state, header.epoch, len),
        Err(reason) => SnapshotLoad::Corrupt(reason),
    })
}

/// Opens (creating) `dir`, locks it and recovers its state. Never fails because of damaged
/// content: damage is repaired and reported in `warnings`.
pub(crate) fn open_dir(dir: &Path) -> Result<Opened, StoreError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = format::path(dir, LOCK_FILE);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(StoreError::Locked(dir.display().to_string())),
        Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
    }

    // Leftovers of an interrupted compaction or log creation.
    for p in format::remove_tmp_files(dir).map_err(io_err(dir))? {
        tracing::info!(target: "ferrohub_store", "removed leftover {}", p.display());
    }

    let mut warnings = Vec::new();
    let mut state = LiveState::default();
    let mut snapshot_epoch: Option<u64> = None;
    let mut snapshot_bytes = 0;
    let mut snapshot_lost = false;

    let snap_path = format::path(dir, SNAPSHOT_FILE);
    match File::open(&snap_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&snap_path)(e)),
        Ok(mut f) => {
            let len = f.metadata().map_err(io_err(&snap_path))?.len();
            match load_snapshot(&snap_path, &mut f, len)? {
                SnapshotLoad::Loaded(s, epoch, bytes) => {
                    state = s;
                    snapshot_epoch = Some(epoch);
                    snapshot_bytes = bytes;
                }
                SnapshotLoad::Corrupt(reason) => {
                    drop(f);
                    set_aside(dir, SNAPSHOT_FILE, "snapshot", &reason, &mut warnings)?;
                    snapshot_lost = true;
                }
            }
        }
    }

    let epochs = format::list_logs(dir).map_err(io_err(dir))?;
    let mut max_epoch = snapshot_epoch
        .unwrap_or(0)
        .max(epochs.last().copied().unwrap_or(0));
    let mut to_replay = Vec::new();
    for e in epochs {
        if snapshot_epoch.is_some_and(|se| e <= se) {
            // Contained in the snapshot: left over from a crash before a compaction deleted it.
            let p = format::path(dir, &format::log_name(e));
            std::fs::remove_file(&p).map_err(io_err(&p))?;
            tracing::info!(target: "ferrohub_store", "removed {}, contained in the snapshot", p.display());
        } else {
            to_replay.push(e);
        }
    }
    if to_replay.is_empty()
        && let Some(se) = snapshot_epoch
    {
        warn(
            &mut warnings,
            format!(
                "no write-ahead log follows snapshot epoch {se} in {}: changes made after the snapshot are lost",
                dir.display()
            ),
        );
    }

    // Replaying a chain of logs that does not directly follow a snapshot: write one right after,
    // so that the warning is not repeated at every start.
    let mut rebase = snapshot_lost && !to_replay.is_empty();
    let mut expected = snapshot_epoch.map_or(1, |se| se + 1);
    let mut active: Option<(File, u64, u64)> = None;
    // Once set, the remaining logs come after a hole and are set aside.
    let mut hole: Option<String> = None;
    for (i, e) in to_replay.into_iter().enumerate() {
        let name = format::log_name(e);
        let log_path = format::path(dir, &name);
        if let Some(h) = &hole {
            set_aside(
                dir,
                &name,
                "write-ahead log",
                &format!("it follows {h}"),
                &mut warnings,
            )?;
            continue;
        }
        if e != expected && !(snapshot_lost && i == 0) {
            warn(
                &mut warnings,
                format!(
                    "write-ahead log epoch {e} found where epoch {expected} was expected: changes in between are lost"
                ),
            );
            rebase = true;
        }
        expected = e + 1;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let len = f.metadata().map_err(io_err(&log_path))?.len();
        let header = match format::read_header(&mut f, len, KIND_LOG).map_err(io_err(&log_path))? {
            Err(HeaderError::UnsupportedVersion(version)) => {
                return Err(StoreError::UnsupportedVersion {
                    path: log_path.display().to_string(),
                    version,
                });
            }
            Ok(h) if h.epoch == e => Ok(h),
            Ok(h) => Err(format!("its header says epoch {}", h.epoch)),
            Err(HeaderError::Corrupt(reason)) => Err(reason),
        };
        let h = match header {
            Ok(h) => h,
            Err(reason) => {
                drop(f);
                set_aside(dir, &name, "write-ahead log", &reason, &mut warnings)?;
                hole = Some(format!("the unreadable log of epoch {e}"));
                active = None;
                rebase = true;
                continue;
            }
        };
        let good = replay_log(&log_path, &f, len, &mut state, &mut warnings)?;
        if good < len {
            f.set_len(good).map_err(io_err(&log_path))?;
            f.sync_all().map_err(io_err(&log_path))?;
            hole = Some(format!("the damaged end of the log of epoch {e}"));
        }
        state.raise_next_message_id(h.next_message_id);
        f.seek(SeekFrom::Start(good)).map_err(io_err(&log_path))?;
        active = Some((f, good, e));
    }
    if hole.is_some() && active.is_none() {
        rebase = true;
    }
    max_epoch = max_epoch.max(active.as_ref().map_or(0, |a| a.2));

    let (log, log_len, epoch) = match active {
        Some(a) if !rebase => a,
        _ => {
            // A new log after everything seen, then (if needed) a snapshot containing all the
            // logs before it: the order keeps a crash in between recoverable.
            let epoch = max_epoch + 1;
            let new_path = format::path(dir, &format::log_name(epoch));
            let f = format::create_log(dir, epoch, state.next_message_id())
                .map_err(io_err(&new_path))?;
            if rebase {
                snapshot_bytes = state
                    .write_snapshot_file(dir, max_epoch)
                    .and_then(|n| format::sync_dir(dir).map(|()| n))
                    .map_err(io_err(&snap_path))?;
                format::delete_logs_up_to(dir, max_epoch).map_err(io_err(dir))?;
            }
            (f, HEADER_LEN as u64, epoch)
        }
    };
    Ok(Opened {
        state,
        log,
        log_len,
        epoch,
        snapshot_bytes,
        lock,
        warnings,
    })
}

/// Applies the records of the log; returns the length of its good prefix.
fn replay_log(
    path: &Path,
    file: &File,
    len: u64,
    state: &mut LiveState,
    warnings: &mut Vec<String>,
) -> Result<u64, StoreError> {
    let clone = file.try_clone().map_err(io_err(path))?;
    let mut reader = RecordReader::new(clone, len);
    let mut records = 0u64;
    let damage = loop {
        let before = reader.good_len();
        match reader.next().map_err(io_err(path))? {
            Next::End => break None,
            Next::Damaged(reason) => break Some((before, reason)),
            Next::Record(payload) => match codec::get_batch(payload) {
                Ok(ops) => {
                    records += 1;
                    for op in ops {
                        state.apply(op);
                    }
                }
                Err(e) => {
                    break Some((
                        before,
                        format!("undecodable record at offset {before}: {e}"),
                    ));
                }
            },
        }
    };
    if let Some((good, reason)) = damage {
        warn(
            warnings,
            format!(
                "write-ahead log {}: {reason}; recovered the {records} records before it and cut off the last {} bytes",
                path.display(),
                len - good
            ),
        );
        return Ok(good);
    }
    Ok(len)
}
