//! Background upkeep: retention (drop whole day partitions, which frees their disk at once) and
//! compaction (merge a day's small parts into larger ones: longer chunks compress better, and one
//! part per day lets aggregate queries use its rollups without merging).
//!
//! Compaction policy: parts of a day are ordered by `seq` (precedence); only contiguous runs are
//! merged, so precedence stays right. A closed day (ended more than an hour ago) is merged into one
//! part; an open day merges runs of four parts of the same size class (×4 classes from 1 MiB), which
//! bounds write amplification to about log₄ of the day's size.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferrohub_types::TenantId;

use crate::catalog::SeriesId;
use crate::column::Values;
use crate::engine::{DAY_MS, Inner, Part, now_ms};
use crate::error::TsdbError;
use crate::merge::merge_sources;
use crate::part::{PartWriter, SeriesData};

const RETENTION_FILE: &str = "retention.json";

/// Loads per-tenant retention overrides.
pub(crate) fn load_retention(inner: &Inner) -> Result<(), TsdbError> {
    let path = inner.cfg.dir.join(RETENTION_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let map: BTreeMap<String, u32> = serde_json::from_slice(&bytes)
                .map_err(|e| TsdbError::Corrupt(format!("{}: {e}", path.display())))?;
            *inner.retention.lock() = map;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TsdbError::io("reading", &path, e)),
    }
}

/// Saves per-tenant retention overrides (atomically).
pub(crate) fn save_retention(inner: &Inner) -> Result<(), TsdbError> {
    let map = inner.retention.lock().clone();
    write_json_atomic(inner, RETENTION_FILE, &map)
}

/// Writes `value` as JSON to `name` in the engine's directory: a synced temporary file renamed
/// over the old one, then the directory synced.
pub(crate) fn write_json_atomic(
    inner: &Inner,
    name: &str,
    value: &impl serde::Serialize,
) -> Result<(), TsdbError> {
    let path = inner.cfg.dir.join(name);
    let tmp = inner.cfg.dir.join(format!("{name}.tmp"));
    let json = serde_json::to_vec_pretty(value).map_err(|e| TsdbError::Codec(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| TsdbError::io("writing", &tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| TsdbError::io("syncing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TsdbError::io("renaming", &path, e))?;
    crate::part::sync_dir(&inner.cfg.dir)
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Day partitions deleted.
    pub partitions: u64,
    /// Bytes of part files deleted.
    pub bytes: u64,
}

/// Deletes the day partitions older than each tenant's retention.
pub(crate) fn enforce_retention(inner: &Inner) -> Result<RetentionOutcome, TsdbError> {
    let _guard = inner.maintenance.lock();
    let mut doomed: Vec<(TenantId, i64, u64)> = Vec::new();
    {
        let mut parts = inner.parts.write();
        for (tenant, days) in parts.iter_mut() {
            let first_kept = inner.first_kept_day(tenant);
            let old: Vec<i64> = days.range(..first_kept).map(|(d, _)| *d).collect();
            for d in old {
                if let Some(list) = days.remove(&d) {
                    doomed.push((tenant.clone(), d, list.iter().map(|p| p.file.size()).sum()));
                }
            }
        }
        parts.retain(|_, days| !days.is_empty());
    }
    let mut out = RetentionOutcome::default();
    for (tenant, day, bytes) in doomed {
        let dir = inner.partition_dir(&tenant, day);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TsdbError::io("deleting partition", &dir, e)),
        }
        tracing::info!(tenant = %tenant, day = %crate::engine::day_name(day), bytes,
            "telemetry partition past retention deleted");
        out.partitions += 1;
        out.bytes += bytes;
    }
    inner
        .stats
        .retention_partitions_deleted
        .fetch_add(out.partitions, Ordering::Relaxed);
    inner
        .stats
        .retention_bytes_freed
        .fetch_add(out.bytes, Ordering::Relaxed);
    Ok(out)
}

fn size_class(bytes: u64) -> u32 {
    let mib = (bytes >> 20).max(1);
    (63 - mib.leading_zeros()) / 2
}

/// Picks the run of parts to merge in one day, if any.
fn pick_run(list: &[Arc<Part>], closed: bool, force: bool) -> Option<std::ops::Range<usize>> {
    if list.len() < 2 {
        return None;
    }
    if closed || force {
        return Some(0..list.len());
    }
    let classes: Vec<u32> = list.iter().map(|p| size_class(p.file.size())).collect();
    let mut start = 0;
    for i in 1..=classes.len() {
        if i == classes.len() || classes[i] != classes[start] {
            if i - start >= 4 {
                return Some(start..i);
            }
            start = i;
        }
    }
    None
}

/// Runs compaction until no partition has a run to merge. `force` merges every day to one part.
/// Returns the number of merges.
pub(crate) fn compact(inner: &Inner, force: bool) -> Result<u64, TsdbError> {
    let _guard = inner.maintenance.lock();
    let mut merges = 0;
    loop {
        let now_day_end = now_ms() - 3_600_000;
        let candidate = {
            let parts = inner.parts.read();
            parts.iter().find_map(|(tenant, days)| {
                days.iter().find_map(|(&day, list)| {
                    let closed = (day + 1) * DAY_MS <= now_day_end;
                    pick_run(list, closed, force).map(|r| (tenant.clone(), day, list[r].to_vec()))
                })
            })
        };
        let Some((tenant, day, run)) = candidate else {
            return Ok(merges);
        };
        merge_run(inner, &tenant, day, &run)?;
        merges += 1;
    }
}

/// Merges `run` (contiguous by seq) into one part named after the run's highest seq (the rename
/// replaces that part's file atomically), then swaps it in and deletes the others. Series no
/// longer live (purged) are left out; when nothing is left, every part of the run is deleted.
/// Returns the merged part's size (0 when deleted).
pub(crate) fn merge_run(
    inner: &Inner,
    tenant: &TenantId,
    day: i64,
    run: &[Arc<Part>],
) -> Result<u64, TsdbError> {
    let Some(last) = run.last() else {
        return Ok(0);
    };
    let seq = last.seq;
    let path = last.file.path().to_owned();
    let mut ids: BTreeMap<SeriesId, ()> = BTreeMap::new();
    for p in run {
        for (id, _) in &p.series {
            ids.insert(*id, ());
        }
    }
    let mut order: Vec<(Arc<str>, Arc<str>, SeriesId)> = ids
        .keys()
        .filter(|&&id| inner.catalog.is_live(id))
        .filter_map(|&id| {
            inner
                .catalog
                .get(id)
                .map(|s| (s.device.clone(), s.metric.clone(), id))
        })
        .collect();
    order.sort();
    let mut w = PartWriter::create(&path, inner.cfg.fsync)?;
    let mut sealed = Vec::with_capacity(order.len());
    for (device, metric, id) in order {
        let mut sources: Vec<(Vec<i64>, Values)> = Vec::new();
        for p in run {
            let Some(meta) = p.find(id) else { continue };
            let mut ts = Vec::with_capacity(meta.count as usize);
            let mut vals: Option<Values> = None;
            for c in &meta.chunks {
                let (t, v) = p.file.read_chunk(c)?;
                ts.extend_from_slice(&t);
                match &mut vals {
                    None => vals = Some(v),
                    Some(acc) => append(acc, &v),
                }
            }
            if let Some(v) = vals {
                sources.push((ts, v));
            }
        }
        let (ts, values) = merge_sources(sources);
        if ts.is_empty() {
            continue;
        }
        w.add(&SeriesData {
            device,
            metric,
            ts,
            values,
        })?;
        sealed.push(id);
    }
    if w.series() == 0 {
        drop(w);
        {
            let mut parts = inner.parts.write();
            if let Some(list) = parts.get_mut(tenant).and_then(|d| d.get_mut(&day)) {
                list.retain(|p| !run.iter().any(|r| r.seq == p.seq));
            }
        }
        for p in run {
            let path = p.file.path();
            std::fs::remove_file(path).map_err(|e| TsdbError::io("deleting part", path, e))?;
        }
        return Ok(0);
    }
    let size = w.finish()?;
    let merged = Arc::new(inner.load_part(tenant, day, seq, &path, Some(&sealed))?);
    {
        let mut parts = inner.parts.write();
        if let Some(list) = parts.get_mut(tenant).and_then(|d| d.get_mut(&day)) {
            list.retain(|p| !run.iter().any(|r| r.seq == p.seq));
            list.push(merged);
            list.sort_by_key(|p| p.seq);
        }
    }
    for p in &run[..run.len() - 1] {
        let _ = std::fs::remove_file(p.file.path());
    }
    inner.stats.compactions.fetch_add(1, Ordering::Relaxed);
    inner.stats.parts_written.fetch_add(1, Ordering::Relaxed);
    Ok(size)
}

/// Appends every value of `other` to `acc`.
pub(crate) fn append(acc: &mut Values, other: &Values) {
    match (&mut *acc, other) {
        (Values::Int(a), Values::Int(b)) => a.extend_from_slice(b),
        (Values::Float(a), Values::Float(b)) => a.extend_from_slice(b),
        (Values::Bool(a), Values::Bool(b)) => a.extend_from_slice(b),
        (Values::Str(a), Values::Str(b)) => a.extend_from_slice(b),
        _ => {
            for i in 0..other.len() {
                acc.push(other.get(i));
            }
        }
    }
}
