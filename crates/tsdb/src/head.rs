//! The head: points acknowledged since the last flush, in memory, per series.
//!
//! The writer thread appends (in WAL order) after each group commit; queries copy out one series'
//! points under that series' short lock. A flush freezes the head (a new one takes the writes) and
//! seals it into parts; a frozen head stays queryable until its parts are in place.

use std::sync::atomic::{AtomicUsize, Ordering};

use ferrohub_types::telemetry::Value;
use parking_lot::{Mutex, RwLock};

use crate::catalog::SeriesId;
use crate::column::Values;

/// One series' points in the head, in arrival order.
#[derive(Debug)]
pub struct SeriesHead {
    /// Timestamps.
    pub ts: Vec<i64>,
    /// Values.
    pub values: Values,
    /// Whether `ts` is strictly increasing (no sort or dedup needed).
    pub ordered: bool,
}

impl SeriesHead {
    fn new(values: Values) -> Self {
        SeriesHead {
            ts: Vec::new(),
            values,
            ordered: true,
        }
    }

    fn push(&mut self, ts: i64, value: Value) {
        if self.ts.last().is_some_and(|&last| ts <= last) {
            self.ordered = false;
        }
        self.ts.push(ts);
        self.values.push(value);
    }

    /// The points with timestamps in `[from, to)`, sorted, unique (the later write of a timestamp
    /// wins).
    pub fn snapshot(&self, from: i64, to: i64) -> (Vec<i64>, Values) {
        if self.ordered {
            let lo = self.ts.partition_point(|&t| t < from);
            let hi = self.ts.partition_point(|&t| t < to);
            return (self.ts[lo..hi].to_vec(), self.values.slice(lo..hi));
        }
        let mut idx: Vec<usize> = (0..self.ts.len())
            .filter(|&i| self.ts[i] >= from && self.ts[i] < to)
            .collect();
        sort_dedup_last(&self.ts, &mut idx);
        (
            idx.iter().map(|&i| self.ts[i]).collect(),
            self.values.gather(&idx),
        )
    }
}

/// Sorts positions by timestamp and keeps, for each timestamp, the last position (the latest
/// write). Stable, so equal timestamps keep their write order before dedup.
pub fn sort_dedup_last(ts: &[i64], idx: &mut Vec<usize>) {
    idx.sort_by_key(|&i| ts[i]);
    let mut out = 0;
    for k in 0..idx.len() {
        if k + 1 < idx.len() && ts[idx[k + 1]] == ts[idx[k]] {
            continue;
        }
        idx[out] = idx[k];
        out += 1;
    }
    idx.truncate(out);
}

/// A head: series heads indexed by series id.
#[derive(Debug, Default)]
pub struct Head {
    series: RwLock<Vec<Option<Box<Mutex<SeriesHead>>>>>,
    points: AtomicUsize,
}

impl Head {
    /// Number of points held.
    pub fn points(&self) -> usize {
        self.points.load(Ordering::Relaxed)
    }

    /// Appends points (`ids[i]`, `ts[i]`, `values[i]`); `empty` gives a new series' column.
    pub fn append(
        &self,
        ids: &[SeriesId],
        ts: &[i64],
        values: Vec<Value>,
        empty: impl Fn(SeriesId) -> Values,
    ) {
        let max = ids.iter().copied().max().unwrap_or(0) as usize;
        let needs_grow = {
            let s = self.series.read();
            s.len() <= max || ids.iter().any(|&id| s[id as usize].is_none())
        };
        if needs_grow {
            let mut s = self.series.write();
            if s.len() <= max {
                s.resize_with(max + 1, || None);
            }
            for &id in ids {
                if s[id as usize].is_none() {
                    s[id as usize] = Some(Box::new(Mutex::new(SeriesHead::new(empty(id)))));
                }
            }
        }
        let s = self.series.read();
        for ((&id, &t), v) in ids.iter().zip(ts).zip(values) {
            if let Some(h) = &s[id as usize] {
                h.lock().push(t, v);
            }
        }
        self.points.fetch_add(ids.len(), Ordering::Relaxed);
    }

    /// Runs `f` on a series' head if the series has points here.
    pub fn with_series<R>(&self, id: SeriesId, f: impl FnOnce(&SeriesHead) -> R) -> Option<R> {
        let s = self.series.read();
        let h = s.get(id as usize)?.as_ref()?;
        Some(f(&h.lock()))
    }

    /// Takes every series out (used when sealing a frozen head, which no one writes any more).
    pub fn drain(&self) -> Vec<(SeriesId, SeriesHead)> {
        let mut s = self.series.write();
        s.iter_mut()
            .enumerate()
            .filter_map(|(id, h)| h.take().map(|h| (id as SeriesId, h.into_inner())))
            .collect()
    }

    /// Ids of the series with points here.
    pub fn series_ids(&self) -> Vec<SeriesId> {
        self.series
            .read()
            .iter()
            .enumerate()
            .filter_map(|(id, h)| h.as_ref().map(|_| id as SeriesId))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_and_duplicates_keep_the_last_write() {
        let head = Head::default();
        head.append(
            &[0, 0, 0, 0],
            &[30, 10, 20, 10],
            vec![Value::Int(3), Value::Int(1), Value::Int(2), Value::Int(9)],
            |_| Values::Int(Vec::new()),
        );
        let (ts, v) = head.with_series(0, |h| h.snapshot(0, 100)).unwrap();
        assert_eq!(ts, vec![10, 20, 30]);
        assert_eq!(v, Values::Int(vec![9, 2, 3]));
        let (ts, _) = head.with_series(0, |h| h.snapshot(15, 30)).unwrap();
        assert_eq!(ts, vec![20]);
        assert_eq!(head.points(), 4);
        assert!(head.with_series(1, |_| ()).is_none());
    }
}
