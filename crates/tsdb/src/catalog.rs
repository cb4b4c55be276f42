//! The series catalog: (tenant, device, metric) → a dense series id, the series' kind and its
//! latest point.
//!
//! Ids are private to one process run (parts name series by their keys; WAL segments define the
//! ids they use), so the catalog is rebuilt at open and never persisted on its own.

use std::sync::Arc;

use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Value, ValueKind};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};

/// A series' dense id.
pub type SeriesId = u32;

/// What the engine knows about one series.
#[derive(Debug)]
pub struct SeriesInfo {
    /// Dense id.
    pub id: SeriesId,
    /// Tenant.
    pub tenant: TenantId,
    /// Device.
    pub device: Arc<str>,
    /// Metric.
    pub metric: Arc<str>,
    /// Kind (fixed by the first point ever stored).
    pub kind: ValueKind,
    /// The latest point (largest timestamp) seen.
    pub latest: Mutex<Option<(i64, Value)>>,
}

impl SeriesInfo {
    /// Records a point as the latest if it is not older than the current one.
    pub fn observe(&self, ts: i64, value: &Value) {
        let mut l = self.latest.lock();
        if l.as_ref().is_none_or(|(t, _)| ts >= *t) {
            *l = Some((ts, value.clone()));
        }
    }
}

type DeviceSeries = HashMap<Arc<str>, SeriesId>;

/// The catalog.
#[derive(Debug, Default)]
pub struct Catalog {
    /// tenant → device → metric → id.
    keys: RwLock<HashMap<TenantId, HashMap<Arc<str>, DeviceSeries>>>,
    /// id → series.
    by_id: RwLock<Vec<Arc<SeriesInfo>>>,
}

impl Catalog {
    /// The id of a series, if it exists.
    pub fn find(&self, tenant: &TenantId, device: &str, metric: &str) -> Option<SeriesId> {
        self.keys
            .read()
            .get(tenant)?
            .get(device)?
            .get(metric)
            .copied()
    }

    /// The id of a series, created with `kind` if new. Returns the id and the series' kind (which
    /// differs from `kind` if the series already holds another kind).
    pub fn resolve(
        &self,
        tenant: &TenantId,
        device: &str,
        metric: &str,
        kind: ValueKind,
    ) -> (SeriesId, ValueKind) {
        if let Some(id) = self.find(tenant, device, metric) {
            return (id, self.by_id.read()[id as usize].kind);
        }
        let mut keys = self.keys.write();
        let devices = keys.entry(tenant.clone()).or_default();
        let metrics = match devices.get_mut(device) {
            Some(m) => m,
            None => devices.entry(Arc::from(device)).or_default(),
        };
        if let Some(&id) = metrics.get(metric) {
            return (id, self.by_id.read()[id as usize].kind);
        }
        let mut by_id = self.by_id.write();
        let id = by_id.len() as SeriesId;
        let device: Arc<str> = Arc::from(device);
        let metric: Arc<str> = Arc::from(metric);
        metrics.insert(metric.clone(), id);
        by_id.push(Arc::new(SeriesInfo {
            id,
            tenant: tenant.clone(),
            device,
            metric,
            kind,
            latest: Mutex::new(None),
        }));
        (id, kind)
    }

    /// The series with id `id`.
    pub fn get(&self, id: SeriesId) -> Option<Arc<SeriesInfo>> {
        self.by_id.read().get(id as usize).cloned()
    }

    /// Number of series.
    pub fn len(&self) -> usize {
        self.by_id.read().len()
    }

    /// Whether there are no series.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Series of a tenant (of one device if given), sorted by device then metric.
    pub fn list(&self, tenant: &TenantId, device: Option<&str>) -> Vec<Arc<SeriesInfo>> {
        let keys = self.keys.read();
        let Some(devices) = keys.get(tenant) else {
            return Vec::new();
        };
        let by_id = self.by_id.read();
        let mut out: Vec<Arc<SeriesInfo>> = match device {
            Some(d) => devices
                .get(d)
                .map(|m| m.values().map(|&id| by_id[id as usize].clone()).collect())
                .unwrap_or_default(),
            None => devices
                .values()
                .flat_map(|m| m.values())
                .map(|&id| by_id[id as usize].clone())
                .collect(),
        };
        out.sort_by(|a, b| (&a.device, &a.metric).cmp(&(&b.device, &b.metric)));
        out
    }

    /// Forgets a tenant's series: they are no longer found, and a flush drops their head points
    /// (ids stay allocated; a later write of the same key gets a new id).
    pub fn remove_tenant(&self, tenant: &TenantId) {
        self.keys.write().remove(tenant);
    }

    /// Forgets one device's series (as [`Catalog::remove_tenant`] does a tenant's); returns their
    /// ids.
    pub fn remove_device(&self, tenant: &TenantId, device: &str) -> Vec<SeriesId> {
        self.keys
            .write()
            .get_mut(tenant)
            .and_then(|devices| devices.remove(device))
            .map(|metrics| metrics.into_values().collect())
            .unwrap_or_default()
    }

    /// Whether `id` is still the live series of its key (false once its tenant was purged).
    pub fn is_live(&self, id: SeriesId) -> bool {
        self.get(id)
            .is_some_and(|s| self.find(&s.tenant, &s.device, &s.metric) == Some(id))
    }

    /// Tenants that have series.
    pub fn tenants(&self) -> Vec<TenantId> {
        self.keys.read().keys().cloned().collect()
    }
}
