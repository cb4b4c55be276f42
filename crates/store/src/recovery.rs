//! Start-up: lock the directory, load the snapshot, replay the log, repair what is damaged.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom};
use std::path::Path;

use crate::StoreError;
use crate::codec;
use crate::format::{
    self, HEADER_LEN, HeaderError, KIND_LOG, KIND_SNAPSHOT, LOCK_FILE, LOG_FILE, Next,
    RecordReader, SNAPSHOT_FILE,
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
    for name in [SNAPSHOT_FILE, LOG_FILE] {
        let tmp = format::tmp_path(dir, name);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(target: "ferrohub_store", "removed leftover {}", tmp.display())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }

    let mut warnings = Vec::new();
    let mut state = LiveState::default();
    let mut snapshot_epoch: Option<u64> = None;
    let mut snapshot_bytes = 0;
    let mut snapshot_lost = false;
    let mut max_epoch = 0u64;

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
                    max_epoch = epoch;
                }
                SnapshotLoad::Corrupt(reason) => {
                    drop(f);
                    set_aside(dir, SNAPSHOT_FILE, "snapshot", &reason, &mut warnings)?;
                    snapshot_lost = true;
                }
            }
        }
    }

    let log_path = format::path(dir, LOG_FILE);
    let mut log: Option<(File, u64, u64)> = None;
    let mut rebase = false;
    match OpenOptions::new().read(true).write(true).open(&log_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if snapshot_epoch.is_some() {
                warn(
                    &mut warnings,
                    format!(
                        "write-ahead log {} is missing: changes made after the last snapshot are lost",
                        log_path.display()
                    ),
                );
            }
        }
        Err(e) => return Err(io_err(&log_path)(e)),
        Ok(mut f) => {
            let len = f.metadata().map_err(io_err(&log_path))?.len();
            match format::read_header(&mut f, len, KIND_LOG).map_err(io_err(&log_path))? {
                Err(HeaderError::UnsupportedVersion(version)) => {
                    return Err(StoreError::UnsupportedVersion {
                        path: log_path.display().to_string(),
                        version,
                    });
                }
                Err(HeaderError::Corrupt(reason)) => {
                    drop(f);
                    set_aside(dir, LOG_FILE, "write-ahead log", &reason, &mut warnings)?;
                }
                Ok(h) => {
                    max_epoch = max_epoch.max(h.epoch);
                    let replay = match snapshot_epoch {
                        Some(se) => h.epoch > se,
                        None => true,
                    };
                    if !replay {
                        // Crash between writing a snapshot and starting the next log: the
                        // snapshot already contains all of it.
                        tracing::info!(
                            target: "ferrohub_store",
                            "write-ahead log epoch {} is covered by the snapshot; starting a new one",
                            h.epoch
                        );
                    } else {
                        // Replaying a log that does not directly follow a snapshot: write one
                        // right after, so that the warning is not repeated at every start.
                        rebase = snapshot_lost
                            || snapshot_epoch.map_or(h.epoch > 1, |se| h.epoch != se + 1);
                        match snapshot_epoch {
                            Some(se) if h.epoch != se + 1 => warn(
                                &mut warnings,
                                format!(
                                    "write-ahead log epoch {} does not follow snapshot epoch {se}: changes in between are lost",
                                    h.epoch
                                ),
                            ),
                            None if h.epoch > 1 && !snapshot_lost => warn(
                                &mut warnings,
                                format!(
                                    "write-ahead log epoch {} has no snapshot before it: state compacted earlier is lost",
                                    h.epoch
                                ),
                            ),
                            _ => {}
                        }
                        let good = replay_log(&log_path, &f, len, &mut state, &mut warnings)?;
                        if good < len {
                            f.set_len(good).map_err(io_err(&log_path))?;
                            f.sync_all().map_err(io_err(&log_path))?;
                        }
                        state.raise_next_message_id(h.next_message_id);
                        f.seek(SeekFrom::Start(good)).map_err(io_err(&log_path))?;
                        log = Some((f, good, h.epoch));
                    }
                }
            }
        }
    }

    if rebase && let Some((_, _, epoch)) = log {
        let snap_path = format::path(dir, SNAPSHOT_FILE);
        snapshot_bytes = state
            .write_snapshot_file(dir, epoch)
            .and_then(|n| format::sync_dir(dir).map(|()| n))
            .map_err(io_err(&snap_path))?;
        // The new log (epoch + 1) replaces the one just folded into the snapshot.
        log = None;
        max_epoch = epoch;
    }

    let (log, log_len, epoch) = match log {
        Some(l) => l,
        None => {
            let epoch = max_epoch + 1;
            let f = format::create_log(dir, epoch, state.next_message_id())
                .map_err(io_err(&log_path))?;
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
