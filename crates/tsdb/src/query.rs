//! Queries: raw ranges, bucketed aggregates (from rollups where they cover the range), fleet
//! snapshots of latest values, series listings.
//!
//! A query takes a consistent snapshot of the part lists and the heads (two short read locks) and
//! then reads immutable files and copies of head series, so it never holds up ingest.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Value, ValueKind};
use hashbrown::HashMap;
use serde::Serialize;

use crate::catalog::SeriesId;
use crate::column::Values;
use crate::engine::{DAY_MS, Engine, Part, PartSeriesMeta};
use crate::error::TsdbError;
use crate::head::Head;
use crate::maintain::{self, RetentionOutcome};
use crate::merge::merge_sources;
use crate::rollup::{Agg, AggFn, HOUR_MS, MINUTE_MS, RollupRows, bucket_start};

/// Largest page of a raw query.
pub const MAX_RAW_LIMIT: usize = 100_000;
/// Largest number of buckets one aggregate query may produce (over all groups).
pub const MAX_BUCKETS: usize = 1_000_000;

/// A raw range query on one series.
#[derive(Debug, Clone)]
pub struct RawQuery {
    /// Device.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// Start (inclusive), ms.
    pub from: i64,
    /// End (exclusive), ms.
    pub to: i64,
    /// Page size (1..=[`MAX_RAW_LIMIT`]).
    pub limit: usize,
    /// Newest first.
    pub descending: bool,
}

/// A page of a raw query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawPage {
    /// Points as (timestamp ms, value).
    pub points: Vec<(i64, Value)>,
    /// Where the next page starts if there is one: pass it as `from` (ascending) or `to`
    /// (descending).
    pub next: Option<i64>,
}

/// Devices whose series are aggregated together.
#[derive(Debug, Clone)]
pub struct SeriesGroup {
    /// Label of the group in the result (a device id, a tag value, `all` …).
    pub name: String,
    /// Devices in the group.
    pub devices: Vec<String>,
}

/// A bucketed aggregate over groups of devices.
#[derive(Debug, Clone)]
pub struct AggregateQuery {
    /// Metric.
    pub metric: String,
    /// Groups.
    pub groups: Vec<SeriesGroup>,
    /// Start (inclusive), ms.
    pub from: i64,
    /// End (exclusive), ms.
    pub to: i64,
    /// Bucket width, ms (buckets are aligned to the Unix epoch).
    pub bucket_ms: i64,
    /// Functions wanted (decides which rollup columns are read).
    pub fns: Vec<AggFn>,
}

/// One group's buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBuckets {
    /// The group's label.
    pub name: String,
    /// Series of the group that exist.
    pub series: usize,
    /// Non-empty buckets as (start ms, aggregate), ascending.
    pub buckets: Vec<(i64, Agg)>,
}

/// The latest point of one device's metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatestPoint {
    /// Device.
    pub device: String,
    /// Timestamp, ms (absent if the device has no such series).
    pub ts: Option<i64>,
    /// Value.
    pub value: Option<Value>,
}

/// A series, as listings show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesSummary {
    /// Device.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// Kind of values.
    pub kind: ValueKind,
    /// Latest point's timestamp.
    pub latest_ts: Option<i64>,
    /// Latest point's value.
    pub latest: Option<Value>,
}

/// Parts and heads as of one moment.
struct Snapshot {
    days: Vec<(i64, Vec<Arc<Part>>)>,
    heads: Vec<Arc<Head>>,
}

fn clip(day: i64, from: i64, to: i64) -> (i64, i64) {
    (from.max(day * DAY_MS), to.min((day + 1) * DAY_MS))
}

/// Reads the points of `meta` in `[a, b)` from a part.
fn read_part_range(
    part: &Part,
    meta: &PartSeriesMeta,
    a: i64,
    b: i64,
) -> Result<(Vec<i64>, Values), TsdbError> {
    let mut ts = Vec::new();
    let mut values: Option<Values> = None;
    for c in meta.chunks.iter().filter(|c| c.max_ts >= a && c.min_ts < b) {
        let (t, v) = part.file.read_chunk(c)?;
        let lo = t.partition_point(|&x| x < a);
        let hi = t.partition_point(|&x| x < b);
        ts.extend_from_slice(&t[lo..hi]);
        let v = if lo == 0 && hi == t.len() {
            v
        } else {
            v.slice(lo..hi)
        };
        match &mut values {
            None => values = Some(v),
            Some(acc) => maintain::append(acc, &v),
        }
    }
    Ok((ts, values.unwrap_or_else(|| Values::empty(meta.kind))))
}

/// One series' points of `day` in `[a, b)`: every part of that day holding it, then the heads'
/// points (already merged) in the range, merged with the later write winning.
fn day_points(
    snap: &Snapshot,
    id: SeriesId,
    day: i64,
    a: i64,
    b: i64,
    head_ts: &[i64],
    head_vals: &Values,
) -> Result<(Vec<i64>, Values), TsdbError> {
    let mut sources = Vec::new();
    if let Some((_, list)) = snap.days.iter().find(|(d, _)| *d == day) {
        for p in list {
            if let Some(meta) = p.find(id).filter(|m| m.max_ts >= a && m.min_ts < b) {
                sources.push(read_part_range(p, meta, a, b)?);
            }
        }
    }
    let lo = head_ts.partition_point(|&t| t < a);
    let hi = head_ts.partition_point(|&t| t < b);
    if lo < hi {
        sources.push((head_ts[lo..hi].to_vec(), head_vals.slice(lo..hi)));
    }
    Ok(merge_sources(sources))
}

#[inline]
fn fold(slot: &mut Agg, o: &Agg) {
    if slot.count == 0 {
        *slot = *o;
    } else {
        slot.merge(o);
    }
}

const EMPTY: Agg = Agg {
    count: 0,
    sum: 0.0,
    min: 0.0,
    max: 0.0,
    first: 0.0,
    last: 0.0,
    first_ts: 0,
    last_ts: 0,
};

struct Acc {
    base: i64,
    width: i64,
    n: usize,
    /// Per group, per bucket.
    slots: Vec<Vec<Agg>>,
}

impl Acc {
    #[inline]
    fn index(&self, ts: i64) -> Option<usize> {
        let i = (bucket_start(ts, self.width) - self.base) / self.width;
        usize::try_from(i).ok().filter(|&i| i < self.n)
    }

    fn add_raw(&mut self, groups: &[usize], ts: &[i64], values: &Values) {
        for (i, &t) in ts.iter().enumerate() {
            let (Some(b), Some(v)) = (self.index(t), values.f64_at(i)) else {
                continue;
            };
            let a = Agg::of(t, v);
            for &g in groups {
                fold(&mut self.slots[g][b], &a);
            }
        }
    }
}

impl Engine {
    fn snapshot(&self, tenant: &TenantId, from: i64, to: i64) -> Snapshot {
        let first_day = from.div_euclid(DAY_MS);
        let last_day = (to - 1).div_euclid(DAY_MS);
        let parts = self.inner.parts.read();
        let heads = self.inner.heads.read();
        let days = parts
            .get(tenant)
            .map(|d| {
                d.range(first_day..=last_day)
                    .map(|(day, list)| (*day, list.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut hs: Vec<Arc<Head>> = heads.frozen.clone();
        hs.push(heads.active.clone());
        Snapshot { days, heads: hs }
    }

    /// The heads' points of a series in `[from, to)`, merged.
    fn series_in_heads(snap: &Snapshot, id: SeriesId, from: i64, to: i64) -> (Vec<i64>, Values) {
        let sources: Vec<(Vec<i64>, Values)> = snap
            .heads
            .iter()
            .filter_map(|h| h.with_series(id, |s| s.snapshot(from, to)))
            .collect();
        merge_sources(sources)
    }

    fn check_range(from: i64, to: i64) -> Result<(), TsdbError> {
        if from >= to {
            return Err(TsdbError::BadQuery(format!(
                "empty time range: from ({from}) must be before to ({to})"
            )));
        }
        Ok(())
    }

    /// Raw points of one series in `[from, to)`, a page at a time.
    pub fn raw(&self, tenant: &TenantId, q: &RawQuery) -> Result<RawPage, TsdbError> {
        Self::check_range(q.from, q.to)?;
        if q.limit == 0 || q.limit > MAX_RAW_LIMIT {
            return Err(TsdbError::BadQuery(format!(
                "limit must be 1..={MAX_RAW_LIMIT}"
            )));
        }
        let Some(id) = self.inner.catalog.find(tenant, &q.device, &q.metric) else {
            return Ok(RawPage {
                points: Vec::new(),
                next: None,
            });
        };
        let snap = self.snapshot(tenant, q.from, q.to);
        let (head_ts, head_vals) = Self::series_in_heads(&snap, id, q.from, q.to);
        let mut days: BTreeSet<i64> = snap
            .days
            .iter()
            .filter(|(_, list)| list.iter().any(|p| p.find(id).is_some()))
            .map(|(d, _)| *d)
            .collect();
        days.extend(head_ts.iter().map(|t| t.div_euclid(DAY_MS)));
        let ordered: Vec<i64> = if q.descending {
            days.into_iter().rev().collect()
        } else {
            days.into_iter().collect()
        };
        let mut points: Vec<(i64, Value)> = Vec::new();
        for day in ordered {
            let (a, b) = clip(day, q.from, q.to);
            let (ts, vals) = day_points(&snap, id, day, a, b, &head_ts, &head_vals)?;
            let take = q.limit + 1 - points.len();
            if q.descending {
                for i in (0..ts.len()).rev().take(take) {
                    points.push((ts[i], vals.get(i)));
                }
            } else {
                for i in (0..ts.len()).take(take) {
                    points.push((ts[i], vals.get(i)));
                }
            }
            if points.len() > q.limit {
                break;
            }
        }
        let next = if points.len() > q.limit {
            points.truncate(q.limit);
            points
                .last()
                .map(|(t, _)| if q.descending { *t } else { t + 1 })
        } else {
            None
        };
        Ok(RawPage { points, next })
    }

    /// Bucketed aggregates of a metric over groups of devices. Buckets whose width is a multiple
    /// of an hour (or a minute) are served from that rollup wherever a day's sources for a series
    /// do not overlap in time; the rest (range edges, the head, overlapping late data) is computed
    /// from raw points, so results always equal the raw aggregate.
    pub fn aggregate(
        &self,
        tenant: &TenantId,
        q: &AggregateQuery,
    ) -> Result<Vec<GroupBuckets>, TsdbError> {
        Self::check_range(q.from, q.to)?;
        if q.bucket_ms < 1 {
            return Err(TsdbError::BadQuery("bucket must be at least 1 ms".into()));
        }
        let base = bucket_start(q.from, q.bucket_ms);
        let n = ((bucket_start(q.to - 1, q.bucket_ms) - base) / q.bucket_ms + 1) as u64;
        if n.saturating_mul(q.groups.len().max(1) as u64) > MAX_BUCKETS as u64 {
            return Err(TsdbError::BadQuery(format!(
                "{n} buckets × {} groups is over {MAX_BUCKETS}: widen the bucket or narrow the range",
                q.groups.len()
            )));
        }
        let fns: Vec<AggFn> = if q.fns.is_empty() {
            AggFn::ALL.to_vec()
        } else {
            q.fns.clone()
        };
        let mut targets: HashMap<SeriesId, Vec<usize>> = HashMap::new();
        let mut counts = vec![0usize; q.groups.len()];
        for (g, group) in q.groups.iter().enumerate() {
            for d in &group.devices {
                let Some(id) = self.inner.catalog.find(tenant, d, &q.metric) else {
                    continue;
                };
                if self
                    .inner
                    .catalog
                    .get(id)
                    .is_some_and(|s| s.kind == ValueKind::Str)
                {
                    continue;
                }
                let gs = targets.entry(id).or_default();
                if !gs.contains(&g) {
                    gs.push(g);
                    counts[g] += 1;
                }
            }
        }
        let mut acc = Acc {
            base,
            width: q.bucket_ms,
            n: n as usize,
            slots: vec![vec![EMPTY; n as usize]; q.groups.len()],
        };
        let res = if q.bucket_ms % HOUR_MS == 0 {
            Some(HOUR_MS)
        } else if q.bucket_ms % MINUTE_MS == 0 {
            Some(MINUTE_MS)
        } else {
            None
        };
        let snap = self.snapshot(tenant, q.from, q.to);
        let mut head: HashMap<SeriesId, (Vec<i64>, Values)> = HashMap::new();
        let mut days: BTreeSet<i64> = snap.days.iter().map(|(d, _)| *d).collect();
        for &id in targets.keys() {
            let (ts, v) = Self::series_in_heads(&snap, id, q.from, q.to);
            if !ts.is_empty() {
                days.extend(ts.iter().map(|t| t.div_euclid(DAY_MS)));
                head.insert(id, (ts, v));
            }
        }
        let no_parts: Vec<Arc<Part>> = Vec::new();
        for day in days {
            let (a, b) = clip(day, q.from, q.to);
            let list = snap
                .days
                .iter()
                .find(|(d, _)| *d == day)
                .map_or(&no_parts, |(_, l)| l);
            // Per part: positions of clean series whose middle comes from the hourly table.
            // Indexed by the series' position in the part (dense: one slot per series of the part).
            let mut hourly: Vec<Vec<Option<&Vec<usize>>>> = vec![Vec::new(); list.len()];
            let (ra, rb) = match res {
                Some(r) => (bucket_start(a + r - 1, r), bucket_start(b, r)),
                None => (a, a),
            };
            for (&id, groups) in &targets {
                let head_slice = head.get(&id).map(|(ts, v)| {
                    let lo = ts.partition_point(|&t| t < a);
                    let hi = ts.partition_point(|&t| t < b);
                    (&ts[lo..hi], v, lo..hi)
                });
                let mut ranges: Vec<(i64, i64)> = Vec::new();
                let mut in_parts: Vec<(usize, &PartSeriesMeta)> = Vec::new();
                for (pi, p) in list.iter().enumerate() {
                    if let Some(meta) = p.find(id).filter(|m| m.max_ts >= a && m.min_ts < b) {
                        ranges.push((meta.min_ts.max(a), meta.max_ts.min(b - 1)));
                        in_parts.push((pi, meta));
                    }
                }
                if let Some((ts, _, _)) = &head_slice
                    && let (Some(f), Some(l)) = (ts.first(), ts.last())
                {
                    ranges.push((*f, *l));
                }
                ranges.sort_unstable();
                let clean = ranges.windows(2).all(|w| w[0].1 < w[1].0);
                if !clean {
                    let mut sources = Vec::new();
                    for (pi, meta) in &in_parts {
                        sources.push(read_part_range(&list[*pi], meta, a, b)?);
                    }
                    if let Some((ts, v, r)) = head_slice {
                        sources.push((ts.to_vec(), v.slice(r)));
                    }
                    let (ts, v) = merge_sources(sources);
                    acc.add_raw(groups, &ts, &v);
                    continue;
                }
                if let Some((ts, v, r)) = head_slice {
                    acc.add_raw(groups, ts, &v.slice(r));
                }
                for (pi, meta) in in_parts {
                    let part = &list[pi];
                    // Hourly rows exist for every non-string series (strings are not targets);
                    // minute rows only for series dense enough to have them.
                    let usable = |r: &i64| ra < rb && (*r == HOUR_MS || meta.minute.is_some());
                    let Some(r) = res.filter(usable) else {
                        let (ts, v) = read_part_range(part, meta, a, b)?;
                        acc.add_raw(groups, &ts, &v);
                        continue;
                    };
                    for (ea, eb) in [(a, ra), (rb, b)] {
                        if ea < eb && meta.max_ts >= ea && meta.min_ts < eb {
                            let (ts, v) = read_part_range(part, meta, ea, eb)?;
                            acc.add_raw(groups, &ts, &v);
                        }
                    }
                    if r == HOUR_MS {
                        let slots = &mut hourly[pi];
                        let pos = meta.pos as usize;
                        if slots.len() <= pos {
                            slots.resize(pos.max(part.series.len()) + 1, None);
                        }
                        slots[pos] = Some(groups);
                    } else if let Some(block) = meta.minute {
                        let rows = RollupRows::decode_for(&part.file.read_block(block)?, &fns)?;
                        for (k, &bucket) in rows.bucket.iter().enumerate() {
                            if bucket >= ra
                                && bucket < rb
                                && let Some(i) = acc.index(bucket)
                            {
                                for &g in groups {
                                    fold(&mut acc.slots[g][i], &rows.aggs[k]);
                                }
                            }
                        }
                    }
                }
            }
            for (pi, wanted) in hourly.iter().enumerate() {
                let Some(lo) = wanted.iter().position(Option::is_some) else {
                    continue;
                };
                let hi = wanted.iter().rposition(Option::is_some).unwrap_or(lo);
                let (lo, hi) = (lo as u32, hi as u32);
                let part = &list[pi];
                for hb in part
                    .hourly
                    .iter()
                    .filter(|h| h.last_series >= lo && h.first_series <= hi)
                {
                    let rows = RollupRows::decode_for(&part.file.read_block(hb.block)?, &fns)?;
                    for k in 0..rows.len() {
                        let bucket = rows.bucket[k];
                        if bucket < ra || bucket >= rb {
                            continue;
                        }
                        let Some(Some(groups)) = wanted.get(rows.series[k] as usize) else {
                            continue;
                        };
                        if let Some(i) = acc.index(bucket) {
                            for &g in groups.iter() {
                                fold(&mut acc.slots[g][i], &rows.aggs[k]);
                            }
                        }
                    }
                }
            }
        }
        Ok(q.groups
            .iter()
            .zip(acc.slots)
            .zip(counts)
            .map(|((g, slots), series)| GroupBuckets {
                name: g.name.clone(),
                series,
                buckets: slots
                    .into_iter()
                    .enumerate()
                    .filter(|(_, a)| a.count > 0)
                    .map(|(i, a)| (base + i as i64 * q.bucket_ms, a))
                    .collect(),
            })
            .collect())
    }

    /// The latest point of `metric` for each device (a fleet snapshot; from memory).
    pub fn latest(&self, tenant: &TenantId, devices: &[String], metric: &str) -> Vec<LatestPoint> {
        devices
            .iter()
            .map(|d| {
                let latest = self
                    .inner
                    .catalog
                    .find(tenant, d, metric)
                    .and_then(|id| self.inner.catalog.get(id))
                    .and_then(|s| s.latest.lock().clone());
                LatestPoint {
                    device: d.clone(),
                    ts: latest.as_ref().map(|(t, _)| *t),
                    value: latest.map(|(_, v)| v),
                }
            })
            .collect()
    }

    /// Series of a tenant (of one device if given), sorted by device then metric.
    pub fn list_series(&self, tenant: &TenantId, device: Option<&str>) -> Vec<SeriesSummary> {
        self.inner
            .catalog
            .list(tenant, device)
            .into_iter()
            .map(|s| {
                let latest = s.latest.lock().clone();
                SeriesSummary {
                    device: s.device.to_string(),
                    metric: s.metric.to_string(),
                    kind: s.kind,
                    latest_ts: latest.as_ref().map(|(t, _)| *t),
                    latest: latest.map(|(_, v)| v),
                }
            })
            .collect()
    }

    /// Sets a tenant's retention in days (`None`: keep forever), persisted.
    pub fn set_retention(&self, tenant: &TenantId, days: Option<u32>) -> Result<(), TsdbError> {
        self.inner
            .retention
            .lock()
            .insert(tenant.as_str().to_owned(), days.unwrap_or(0));
        maintain::save_retention(&self.inner)
    }

    /// Removes a tenant's retention override (the default applies again).
    pub fn clear_retention(&self, tenant: &TenantId) -> Result<(), TsdbError> {
        self.inner.retention.lock().remove(tenant.as_str());
        maintain::save_retention(&self.inner)
    }

    /// A tenant's retention in days (`None`: forever) and whether it is the default.
    pub fn retention(&self, tenant: &TenantId) -> (Option<u32>, bool) {
        let is_default = !self.inner.retention.lock().contains_key(tenant.as_str());
        (self.inner.retention_days(tenant), is_default)
    }

    /// Applies retention now (the maintainer also does, every `maintenance_interval`).
    pub fn enforce_retention(&self) -> Result<RetentionOutcome, TsdbError> {
        maintain::enforce_retention(&self.inner)
    }

    /// Compacts now; `all` merges every day into one part. Returns the number of merges.
    pub fn compact(&self, all: bool) -> Result<u64, TsdbError> {
        maintain::compact(&self.inner, all)
    }

    /// Deletes every point of a tenant: its series are forgotten at once (queries stop finding
    /// them), the head is sealed (which deletes the WAL segments holding its points) and its part
    /// directories are deleted. Crash-safe: an interrupted purge is finished when the engine next
    /// opens. Blocks; call from a blocking context.
    pub fn purge_tenant(&self, tenant: &TenantId) -> Result<(), TsdbError> {
        crate::purge::purge_tenant(self, tenant)
    }

    /// Deletes every point of one device (a decommissioned device whose tenant purges its
    /// telemetry): its series are forgotten at once, and the background maintainer removes them
    /// from disk within about a second ([`Engine::finish_purges`] does it now). Crash-safe like
    /// [`Engine::purge_tenant`]. Returns the number of series. Does not block on I/O beyond one
    /// small synced file.
    pub fn purge_device(&self, tenant: &TenantId, device: &str) -> Result<usize, TsdbError> {
        crate::purge::purge_device(&self.inner, tenant, device)
    }

    /// Removes the points of every pending device purge from disk now (the maintainer does this
    /// on its own). Blocks; call from a blocking context.
    pub fn finish_purges(&self) -> Result<crate::PurgeOutcome, TsdbError> {
        crate::purge::finish_device_purges(&self.inner, || self.flush_blocking())
    }

    /// Calls `f` with every series of a tenant matching the filters and its points in
    /// `[from, to)`, day by day (bounded memory), for export.
    pub fn scan(
        &self,
        tenant: &TenantId,
        devices: Option<&[String]>,
        metrics: Option<&[String]>,
        from: i64,
        to: i64,
        mut f: impl FnMut(&str, &str, &[i64], &Values) -> Result<(), TsdbError>,
    ) -> Result<u64, TsdbError> {
        Self::check_range(from, to)?;
        let mut rows = 0u64;
        for s in self.inner.catalog.list(tenant, None) {
            if devices.is_some_and(|d| !d.iter().any(|x| **x == *s.device))
                || metrics.is_some_and(|m| !m.iter().any(|x| **x == *s.metric))
            {
                continue;
            }
            let mut cursor = from;
            loop {
                let page = self.raw_columns(tenant, s.id, cursor, to)?;
                let Some((ts, vals, next)) = page else { break };
                if !ts.is_empty() {
                    rows += ts.len() as u64;
                    f(&s.device, &s.metric, &ts, &vals)?;
                }
                match next {
                    Some(n) => cursor = n,
                    None => break,
                }
            }
        }
        Ok(rows)
    }

    /// One day's worth of a series' points from `from` (columns), and where the next day starts.
    #[allow(clippy::type_complexity)]
    fn raw_columns(
        &self,
        tenant: &TenantId,
        id: SeriesId,
        from: i64,
        to: i64,
    ) -> Result<Option<(Vec<i64>, Values, Option<i64>)>, TsdbError> {
        if from >= to {
            return Ok(None);
        }
        let snap = self.snapshot(tenant, from, to);
        // The first day at or after `from` that has data for the series.
        let (head_ts, head_vals) = Self::series_in_heads(&snap, id, from, to);
        let part_day = snap
            .days
            .iter()
            .find(|(_, l)| l.iter().any(|p| p.find(id).is_some()))
            .map(|(d, _)| *d);
        let head_day = head_ts.first().map(|t| t.div_euclid(DAY_MS));
        let Some(day) = [part_day, head_day].into_iter().flatten().min() else {
            return Ok(None);
        };
        let (a, b) = clip(day, from, to);
        let (ts, vals) = day_points(&snap, id, day, a, b, &head_ts, &head_vals)?;
        Ok(Some((ts, vals, (b < to).then_some(b))))
    }
}
