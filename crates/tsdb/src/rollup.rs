//! Rollups: mergeable per-bucket aggregates (count, sum, min, max, first, last).
//!
//! Parts store them precomputed at two resolutions (1 minute per series, 1 hour in one table per
//! part) when their points are sealed, so aggregate queries over long ranges read a few rows per
//! bucket instead of every point. Aggregates carry the timestamps of their first and last points,
//! which makes merging partial aggregates exact for `first` and `last` in any order.

use serde::{Deserialize, Serialize};

use crate::bin_io::{PutBytes, Reader};
use crate::error::TsdbError;

/// One minute, the fine rollup resolution.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, the coarse rollup resolution.
pub const HOUR_MS: i64 = 3_600_000;

/// Aggregation functions a query can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggFn {
    /// Mean.
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Sum.
    Sum,
    /// Number of points.
    Count,
    /// Value of the earliest point.
    First,
    /// Value of the latest point.
    Last,
}

impl AggFn {
    /// Every function, in API order.
    pub const ALL: [AggFn; 7] = [
        AggFn::Avg,
        AggFn::Min,
        AggFn::Max,
        AggFn::Sum,
        AggFn::Count,
        AggFn::First,
        AggFn::Last,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            AggFn::Avg => "avg",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Sum => "sum",
            AggFn::Count => "count",
            AggFn::First => "first",
            AggFn::Last => "last",
        }
    }
}

impl std::str::FromStr for AggFn {
    type Err = TsdbError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AggFn::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                TsdbError::BadQuery(format!(
                    "unknown aggregate {s:?}: use avg, min, max, sum, count, first or last"
                ))
            })
    }
}

/// A mergeable aggregate of the points in one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    /// Number of points.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Value of the earliest point.
    pub first: f64,
    /// Value of the latest point.
    pub last: f64,
    /// Timestamp of the earliest point.
    pub first_ts: i64,
    /// Timestamp of the latest point.
    pub last_ts: i64,
}

impl Agg {
    /// The aggregate of one point.
    #[inline]
    pub fn of(ts: i64, v: f64) -> Agg {
        Agg {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first: v,
            last: v,
            first_ts: ts,
            last_ts: ts,
        }
    }

    /// Adds one point.
    #[inline]
    pub fn add(&mut self, ts: i64, v: f64) {
        self.merge(&Agg::of(ts, v));
    }

    /// Merges another aggregate of disjoint points. Points of different series (a group of
    /// devices) can share a timestamp: then `first` takes the smaller value and `last` the larger,
    /// so the result does not depend on the order series are visited in.
    #[inline]
    pub fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.first_ts < self.first_ts
            || (o.first_ts == self.first_ts && o.first.total_cmp(&self.first).is_lt())
        {
            self.first = o.first;
            self.first_ts = o.first_ts;
        }
        if o.last_ts > self.last_ts
            || (o.last_ts == self.last_ts && o.last.total_cmp(&self.last).is_gt())
        {
            self.last = o.last;
            self.last_ts = o.last_ts;
        }
    }

    /// The value of `f`.
    pub fn get(&self, f: AggFn) -> f64 {
        match f {
            AggFn::Avg => self.sum / self.count as f64,
            AggFn::Min => self.min,
            AggFn::Max => self.max,
            AggFn::Sum => self.sum,
            AggFn::Count => self.count as f64,
            AggFn::First => self.first,
            AggFn::Last => self.last,
        }
    }
}

/// Start of the bucket of width `width` holding `ts` (buckets are aligned to the Unix epoch).
#[inline]
pub fn bucket_start(ts: i64, width: i64) -> i64 {
    ts.div_euclid(width) * width
}

/// Rollup rows of one or more series, column-wise, sorted by (series, bucket).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RollupRows {
    /// Series position (within a part) of each row.
    pub series: Vec<u32>,
    /// Bucket start of each row.
    pub bucket: Vec<i64>,
    /// The aggregates.
    pub aggs: Vec<Agg>,
}

impl RollupRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.bucket.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.bucket.is_empty()
    }

    /// Appends the rollups of one series' sorted points at resolution `width`.
    pub fn add_series(
        &mut self,
        series: u32,
        ts: &[i64],
        value: impl Fn(usize) -> f64,
        width: i64,
    ) {
        let mut cur: Option<(i64, Agg)> = None;
        for (i, &t) in ts.iter().enumerate() {
            let b = bucket_start(t, width);
            let v = value(i);
            match &mut cur {
                Some((cb, agg)) if *cb == b => agg.add(t, v),
                _ => {
                    if let Some((cb, agg)) = cur.take() {
                        self.push(series, cb, agg);
                    }
                    cur = Some((b, Agg::of(t, v)));
                }
            }
        }
        if let Some((cb, agg)) = cur {
            self.push(series, cb, agg);
        }
    }

    /// Appends `other`'s rows as rows of series `series`.
    pub fn append_as(&mut self, other: &RollupRows, series: u32) {
        self.series.extend(std::iter::repeat_n(series, other.len()));
        self.bucket.extend_from_slice(&other.bucket);
        self.aggs.extend_from_slice(&other.aggs);
    }

    fn push(&mut self, series: u32, bucket: i64, agg: Agg) {
        self.series.push(series);
        self.bucket.push(bucket);
        self.aggs.push(agg);
    }

    /// Encodes the rows (pco per column).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), TsdbError> {
        let cfg = pco::ChunkConfig::default().with_compression_level(4);
        out.put_varint(self.len() as u64);
        if self.is_empty() {
            return Ok(());
        }
        let col = |out: &mut Vec<u8>, data: Vec<u8>| {
            out.put_blob(&data);
        };
        let c = |r: pco::errors::PcoResult<Vec<u8>>| r.map_err(TsdbError::from);
        col(
            out,
            c(pco::standalone::simple_compress(&self.series, &cfg))?,
        );
        col(
            out,
            c(pco::standalone::simple_compress(&self.bucket, &cfg))?,
        );
        let counts: Vec<u64> = self.aggs.iter().map(|a| a.count).collect();
        col(out, c(pco::standalone::simple_compress(&counts, &cfg))?);
        for get in [
            |a: &Agg| a.sum,
            |a: &Agg| a.min,
            |a: &Agg| a.max,
            |a: &Agg| a.first,
            |a: &Agg| a.last,
        ] {
            let v: Vec<f64> = self.aggs.iter().map(get).collect();
            col(out, c(pco::standalone::simple_compress(&v, &cfg))?);
        }
        for get in [|a: &Agg| a.first_ts, |a: &Agg| a.last_ts] {
            let v: Vec<i64> = self.aggs.iter().map(get).collect();
            col(out, c(pco::standalone::simple_compress(&v, &cfg))?);
        }
        Ok(())
    }

    /// Decodes rows written by [`RollupRows::encode`].
    pub fn decode(buf: &[u8]) -> Result<RollupRows, TsdbError> {
        RollupRows::decode_for(buf, &AggFn::ALL)
    }

    /// Decodes only the columns `fns` need (the others read as zero): a fleet average decodes
    /// four of ten columns.
    pub fn decode_for(buf: &[u8], fns: &[AggFn]) -> Result<RollupRows, TsdbError> {
        let mut r = Reader::new(buf, "rollup block");
        let n = r.len(usize::MAX >> 8)?;
        if n == 0 {
            return Ok(RollupRows::default());
        }
        let wants = |f: &[AggFn]| fns.iter().any(|x| f.contains(x));
        fn col<T: pco::data_types::Number + Default>(
            r: &mut Reader<'_>,
            n: usize,
            wanted: bool,
        ) -> Result<Vec<T>, TsdbError> {
            let blob = r.blob()?;
            if !wanted {
                return Ok(Vec::new());
            }
            let v = pco::standalone::simple_decompress::<T>(blob)?;
            if v.len() != n {
                return Err(TsdbError::Corrupt("rollup column length mismatch".into()));
            }
            Ok(v)
        }
        let series = col::<u32>(&mut r, n, true)?;
        let bucket = col::<i64>(&mut r, n, true)?;
        let count = col::<u64>(&mut r, n, true)?;
        let sum = col::<f64>(&mut r, n, wants(&[AggFn::Avg, AggFn::Sum]))?;
        let min = col::<f64>(&mut r, n, wants(&[AggFn::Min]))?;
        let max = col::<f64>(&mut r, n, wants(&[AggFn::Max]))?;
        let first = col::<f64>(&mut r, n, wants(&[AggFn::First]))?;
        let last = col::<f64>(&mut r, n, wants(&[AggFn::Last]))?;
        let first_ts = col::<i64>(&mut r, n, wants(&[AggFn::First]))?;
        let last_ts = col::<i64>(&mut r, n, wants(&[AggFn::Last]))?;
        let at = |v: &[f64], i: usize| v.get(i).copied().unwrap_or(0.0);
        let at_ts = |v: &[i64], i: usize| v.get(i).copied().unwrap_or(0);
        let aggs = (0..n)
            .map(|i| Agg {
                count: count[i],
                sum: at(&sum, i),
                min: at(&min, i),
                max: at(&max, i),
                first: at(&first, i),
                last: at(&last, i),
                first_ts: at_ts(&first_ts, i),
                last_ts: at_ts(&last_ts, i),
            })
            .collect();
        Ok(RollupRows {
            series,
            bucket,
            aggs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_order_free_for_first_and_last() {
        let mut a = Agg::of(10, 1.0);
        a.add(20, 5.0);
        let b = Agg::of(5, -3.0);
        let mut ab = a;
        ab.merge(&b);
        let mut ba = b;
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.first, -3.0);
        assert_eq!(ab.last, 5.0);
        assert_eq!(ab.get(AggFn::Avg), 1.0);
        assert_eq!(bucket_start(-1, 60_000), -60_000);
        // Two devices at the same timestamps: the same answer in either order.
        let (mut x, y) = (Agg::of(5, 2.0), Agg::of(5, 7.0));
        let mut yx = y;
        yx.merge(&x);
        x.merge(&y);
        assert_eq!(x, yx);
        assert_eq!((x.first, x.last), (2.0, 7.0));
    }

    #[test]
    fn rows_round_trip() {
        let ts: Vec<i64> = (0..10_000).map(|i| i * 1000).collect();
        let mut rows = RollupRows::default();
        rows.add_series(0, &ts, |i| i as f64 * 0.5, MINUTE_MS);
        rows.add_series(1, &ts[..100], |i| -(i as f64), HOUR_MS);
        assert_eq!(rows.len(), 167 + 1);
        let mut buf = Vec::new();
        rows.encode(&mut buf).unwrap();
        assert_eq!(RollupRows::decode(&buf).unwrap(), rows);
        assert_eq!(rows.aggs[0].count, 60);
        assert_eq!(
            rows.aggs[0].sum,
            (0..60).map(|i| i as f64 * 0.5).sum::<f64>()
        );
        for cut in 0..buf.len() {
            let _ = RollupRows::decode(&buf[..cut]);
        }
    }
}
