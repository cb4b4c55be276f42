//! Deleting a tenant's or one device's points, so that nothing comes back after a crash.
//!
//! A purge is recorded in `purges.json` (synced) before anything is forgotten, and the record is
//! removed only when the points are gone from every part and the WAL; opening the engine redoes a
//! recorded purge before the engine is returned, so a crash half-way never brings points back.
//! The catalog forgets the series first (queries stop finding them at once; a later write of the
//! same key makes a new series). Then the head is sealed, which drops forgotten series and deletes
//! the WAL segments that held them, and:
//! - a tenant's day directories are deleted, before the purge returns;
//! - a device's parts are rewritten without its series (same name, atomic rename; a part left
//!   empty is deleted) by the maintainer, which takes every pending device purge in one pass so
//!   that decommissioning many devices rewrites each part once.
//!
//! One caveat, documented for users: if the hub stops before the maintainer's pass and the device
//! was re-created under the same id and wrote again in that window, those new points go too (after
//! a restart old and new points of the same key can no longer be told apart).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferrohub_types::TenantId;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Inner, Part};
use crate::error::TsdbError;

const PURGES_FILE: &str = "purges.json";

/// A purge not finished yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingPurge {
    pub(crate) tenant: String,
    /// `None`: the whole tenant.
    pub(crate) device: Option<String>,
}

/// What finishing the recorded device purges removed from disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Device purges finished.
    pub devices: usize,
    /// Part files rewritten without the device's series (or deleted when nothing was left).
    pub parts_rewritten: usize,
    /// Bytes of part files freed.
    pub bytes_freed: u64,
}

/// Loads the purges a previous run did not finish.
pub(crate) fn load(inner: &Inner) -> Result<(), TsdbError> {
    let path = inner.cfg.dir.join(PURGES_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let list: Vec<PendingPurge> = serde_json::from_slice(&bytes)
                .map_err(|e| TsdbError::Corrupt(format!("{}: {e}", path.display())))?;
            *inner.purges.lock() = list;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TsdbError::io("reading", &path, e)),
    }
}

fn save(inner: &Inner) -> Result<(), TsdbError> {
    let list = inner.purges.lock().clone();
    crate::maintain::write_json_atomic(inner, PURGES_FILE, &list)
}

fn record(inner: &Inner, p: &PendingPurge) -> Result<(), TsdbError> {
    {
        let mut list = inner.purges.lock();
        if !list.contains(p) {
            list.push(p.clone());
        }
    }
    save(inner)
}

fn finish(inner: &Inner, p: &PendingPurge) -> Result<(), TsdbError> {
    inner.purges.lock().retain(|x| x != p);
    save(inner)
}

/// Redoes the purges recorded by a run that stopped before finishing them: a tenant's at once; a
/// device's series are forgotten again (hidden before anyone reads) and the maintainer rewrites
/// their parts.
pub(crate) fn resume(engine: &Engine) -> Result<(), TsdbError> {
    let pending = engine.inner.purges.lock().clone();
    for p in pending {
        let tenant = TenantId::new(&p.tenant);
        tracing::warn!(tenant = %tenant, device = ?p.device, "finishing an interrupted telemetry purge");
        match &p.device {
            Some(device) => {
                engine.inner.catalog.remove_device(&tenant, device);
            }
            None => purge_tenant(engine, &tenant)?,
        }
    }
    Ok(())
}

/// Deletes every point of a tenant (see the module doc).
pub(crate) fn purge_tenant(engine: &Engine, tenant: &TenantId) -> Result<(), TsdbError> {
    let inner = &engine.inner;
    let rec = PendingPurge {
        tenant: tenant.as_str().to_owned(),
        device: None,
    };
    record(inner, &rec)?;
    inner.catalog.remove_tenant(tenant);
    engine.flush_blocking()?;
    {
        let _guard = inner.maintenance.lock();
        inner.parts.write().remove(tenant);
        let dir = inner.parts_dir().join(crate::engine::tenant_dir(tenant));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TsdbError::io("deleting", &dir, e)),
        }
    }
    inner.retention.lock().remove(tenant.as_str());
    crate::maintain::save_retention(inner)?;
    finish(inner, &rec)
}

/// Forgets one device's points now (recorded first) and leaves their removal from disk to
/// [`finish_device_purges`]. Returns the number of series forgotten.
pub(crate) fn purge_device(
    inner: &Inner,
    tenant: &TenantId,
    device: &str,
) -> Result<usize, TsdbError> {
    record(
        inner,
        &PendingPurge {
            tenant: tenant.as_str().to_owned(),
            device: Some(device.to_owned()),
        },
    )?;
    Ok(inner.catalog.remove_device(tenant, device).len())
}

/// Removes the points of the recorded device purges from disk, all of them in one pass: seals the
/// head through `flush` (dropping their head points and the WAL segments holding them), rewrites
/// each part holding a forgotten series once, then drops the records.
pub(crate) fn finish_device_purges(
    inner: &Inner,
    flush: impl FnOnce() -> Result<(), TsdbError>,
) -> Result<PurgeOutcome, TsdbError> {
    // One pass at a time (the maintainer's and an explicit call): the second finds nothing left.
    let _pass = inner.purge_pass.lock();
    let batch: Vec<PendingPurge> = inner
        .purges
        .lock()
        .iter()
        .filter(|p| p.device.is_some())
        .cloned()
        .collect();
    let mut out = PurgeOutcome::default();
    if batch.is_empty() {
        return Ok(out);
    }
    flush()?;
    {
        let _guard = inner.maintenance.lock();
        let tenants: BTreeSet<&str> = batch.iter().map(|p| p.tenant.as_str()).collect();
        let holding: Vec<(TenantId, i64, Arc<Part>)> = {
            let parts = inner.parts.read();
            tenants
                .iter()
                .filter_map(|t| parts.get_key_value(&TenantId::new(t)))
                .flat_map(|(tenant, days)| {
                    days.iter().flat_map(move |(&day, list)| {
                        list.iter().map(move |p| (tenant.clone(), day, p.clone()))
                    })
                })
                .filter(|(_, _, p)| p.series.iter().any(|(id, _)| !inner.catalog.is_live(*id)))
                .collect()
        };
        for (tenant, day, part) in holding {
            let before = part.file.size();
            // A run of one part: rewritten under its own name without the forgotten series.
            let after =
                crate::maintain::merge_run(inner, &tenant, day, std::slice::from_ref(&part))?;
            out.parts_rewritten += 1;
            out.bytes_freed += before.saturating_sub(after);
        }
    }
    out.devices = batch.len();
    let st = &inner.stats;
    st.device_purges
        .fetch_add(out.devices as u64, Ordering::Relaxed);
    st.purge_bytes_freed
        .fetch_add(out.bytes_freed, Ordering::Relaxed);
    inner.purges.lock().retain(|p| !batch.contains(p));
    save(inner)?;
    Ok(out)
}
