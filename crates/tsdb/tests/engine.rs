//! Engine behaviour end to end: writes, flushes, queries, rollups, retention, compaction and
//! recovery from the files a crash leaves behind.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrohub_tsdb::column::Values;
use ferrohub_tsdb::rollup::{Agg, bucket_start};
use ferrohub_tsdb::{AggFn, AggregateQuery, Engine, EngineConfig, RawQuery, SeriesGroup};
use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Point, Value};
use proptest::prelude::*;

const DAY: i64 = 86_400_000;

fn cfg(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.fsync = false;
    c.default_retention_days = None;
    c.maintenance_interval = Duration::from_secs(3600);
    c
}

fn p(device: &str, metric: &str, ts: i64, value: Value) -> Point {
    Point {
        device: device.into(),
        metric: metric.into(),
        ts_ms: ts,
        value,
    }
}

fn raw_all(e: &Engine, t: &TenantId, device: &str, metric: &str) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = e
            .raw(
                t,
                &RawQuery {
                    device: device.into(),
                    metric: metric.into(),
                    from,
                    to: i64::MAX / 2,
                    limit: 1000,
                    descending: false,
                },
            )
            .unwrap();
        out.extend(page.points);
        match page.next {
            Some(n) => from = n,
            None => return out,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn out_of_order_duplicates_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let t = TenantId::new("acme");
    let base = now() - now().rem_euclid(DAY) - DAY; // yesterday 00:00
    // In order, then flushed; then late points (some duplicates with new values) in the head.
    let first: Vec<Point> = (0..5000)
        .map(|i| {
            p(
                "d1",
                "temp",
                base + i * 1000,
                Value::Float(20.0 + i as f64 * 0.01),
            )
        })
        .collect();
    assert_eq!(e.write_blocking(&t, first).unwrap().accepted, 5000);
    e.flush_blocking().unwrap();
    let late: Vec<Point> = (0..10)
        .map(|i| {
            p(
                "d1",
                "temp",
                base + (4990 - i * 500) * 1000,
                Value::Float(-1.0),
            )
        })
        .chain([p("d1", "temp", base - 5 * DAY, Value::Float(7.0))])
        .collect();
    e.write_blocking(&t, late).unwrap();
    let all = raw_all(&e, &t, "d1", "temp");
    assert_eq!(all.len(), 5001);
    assert_eq!(all[0], (base - 5 * DAY, Value::Float(7.0)));
    assert_eq!(all[1 + 4990], (base + 4_990_000, Value::Float(-1.0)));
    assert_eq!(
        all[1 + 4989],
        (base + 4_989_000, Value::Float(20.0 + 4989.0 * 0.01))
    );
    // Same after sealing the late points into their own parts and after compaction.
    e.flush_blocking().unwrap();
    assert_eq!(raw_all(&e, &t, "d1", "temp"), all);
    assert!(e.compact(true).unwrap() >= 1);
    assert_eq!(raw_all(&e, &t, "d1", "temp"), all);
    assert_eq!(
        e.parts_summary().0,
        2,
        "one part per day after a full compaction"
    );
    // Descending pages.
    let page = e
        .raw(
            &t,
            &RawQuery {
                device: "d1".into(),
                metric: "temp".into(),
                from: 0,
                to: i64::MAX / 2,
                limit: 3,
                descending: true,
            },
        )
        .unwrap();
    assert_eq!(page.points[0].0, base + 4_999_000);
    assert_eq!(page.next, Some(base + 4_997_000));
    e.close();
}

#[test]
fn kinds_are_fixed_per_series_and_ints_widen() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let t = TenantId::new("acme");
    let s = e
        .write_blocking(
            &t,
            vec![
                p("d", "n", 1000, Value::Int(1)),
                p("d", "n", 2000, Value::Float(1.5)),
                p("d", "n", 3000, Value::Str("x".into())),
                p("d", "s", 1000, Value::Str("idle".into())),
                p("d", "b", 1000, Value::Bool(true)),
                p("d", "n", -1, Value::Int(1)),
            ],
        )
        .unwrap();
    assert_eq!(s.accepted, 4);
    assert_eq!(s.rejected.len(), 2);
    assert!(
        s.rejected[0].1.contains("holds numeric values, got string"),
        "{:?}",
        s.rejected
    );
    e.flush_blocking().unwrap();
    assert_eq!(
        raw_all(&e, &t, "d", "n"),
        vec![(1000, Value::Float(1.0)), (2000, Value::Float(1.5))]
    );
    assert_eq!(
        raw_all(&e, &t, "d", "s"),
        vec![(1000, Value::Str("idle".into()))]
    );
    assert_eq!(raw_all(&e, &t, "d", "b"), vec![(1000, Value::Bool(true))]);
    let latest = e.latest(&t, &["d".into(), "nope".into()], "n");
    assert_eq!(latest[0].value, Some(Value::Float(1.5)));
    assert_eq!(latest[1].ts, None);
    // Other tenants see nothing.
    assert!(raw_all(&e, &TenantId::new("other"), "d", "n").is_empty());
    e.close();
}

/// Reference aggregate computed from raw points.
fn reference(points: &[(i64, f64)], from: i64, to: i64, width: i64) -> Vec<(i64, Agg)> {
    let mut m: std::collections::BTreeMap<i64, Agg> = Default::default();
    for &(t, v) in points.iter().filter(|(t, _)| *t >= from && *t < to) {
        let b = bucket_start(t, width);
        m.entry(b)
            .and_modify(|a| a.add(t, v))
            .or_insert(Agg::of(t, v));
    }
    m.into_iter().collect()
}

fn close(a: &[(i64, Agg)], b: &[(i64, Agg)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ta, x), (tb, y))| {
            ta == tb
                && x.count == y.count
                && (x.sum - y.sum).abs() <= 1e-6 * x.sum.abs().max(1.0)
                && x.min == y.min
                && x.max == y.max
                && x.first == y.first
                && x.last == y.last
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    /// Aggregates (served from 1-minute and 1-hour rollups, heads, and raw edges) equal the
    /// aggregate of the raw points, for any range and bucket, before and after flush/compaction,
    /// with late and duplicate points.
    #[test]
    fn rollups_equal_raw_aggregates(
        seed in any::<u64>(),
        from_off in 0i64..(3 * DAY),
        len in 1i64..(3 * DAY),
        width_pick in 0usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(cfg(dir.path())).unwrap();
        let t = TenantId::new("acme");
        let base = 1_700_000_000_000 - 1_700_000_000_000i64.rem_euclid(DAY);
        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut truth: std::collections::BTreeMap<(u8, i64), f64> = Default::default();
        for round in 0..3 {
            let mut batch = Vec::new();
            for i in 0..6000 {
                // dev0 is dense (about 8 points a minute over six hours: parts keep its 1-minute
                // rollups); dev1 and dev2 are sparse over three days (hourly rollups only).
                let d = if i < 3000 { 0 } else { 1 + (next() % 2) as u8 };
                let ts = if d == 0 {
                    base + DAY + (next() % (6 * 3600)) as i64 * 1000
                } else {
                    base + (next() % (3 * DAY as u64 / 1000)) as i64 * 1000
                };
                let v = (next() % 10_000) as f64 / 100.0;
                truth.insert((d, ts), v);
                batch.push(p(&format!("dev{d}"), "m", ts, Value::Float(v)));
            }
            e.write_blocking(&t, batch).unwrap();
            if round < 2 { e.flush_blocking().unwrap(); }
        }
        let widths = [1000, 7 * 60_000, 60_000, 3_600_000, 3 * 3_600_000, DAY];
        let width = widths[width_pick];
        let (from, to) = (base + from_off, base + from_off + len);
        let check = |e: &Engine| {
            let groups = vec![
                SeriesGroup { name: "dev0".into(), devices: vec!["dev0".into()] },
                SeriesGroup { name: "all".into(), devices: vec!["dev0".into(), "dev1".into(), "dev2".into()] },
                SeriesGroup { name: "dev1".into(), devices: vec!["dev1".into()] },
            ];
            let q = AggregateQuery { metric: "m".into(), groups, from, to, bucket_ms: width, fns: vec![] };
            let got = match e.aggregate(&t, &q) { Ok(g) => g, Err(_) => return true };
            let of = |dev: u8| -> Vec<(i64, f64)> {
                truth.iter().filter(|((d, _), _)| *d == dev).map(|((_, t), v)| (*t, *v)).collect()
            };
            let mut all: Vec<(i64, f64)> = truth.iter().map(|((_, t), v)| (*t, *v)).collect();
            all.sort_by_key(|x| x.0);
            close(&got[0].buckets, &reference(&of(0), from, to, width))
                && close(&got[2].buckets, &reference(&of(1), from, to, width))
                && got[1].buckets.iter().map(|b| b.1.count).sum::<u64>() == reference(&all, from, to, width).iter().map(|b| b.1.count).sum::<u64>()
        };
        prop_assert!(check(&e));
        e.flush_blocking().unwrap();
        prop_assert!(check(&e));
        e.compact(true).unwrap();
        prop_assert!(check(&e));
        e.close();
    }
}

#[test]
fn retention_deletes_old_days_and_frees_disk() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let t = TenantId::new("acme");
    let keep = TenantId::new("keep");
    let today = now() - now().rem_euclid(DAY);
    for tenant in [&t, &keep] {
        let pts: Vec<Point> = (0..10)
            .flat_map(|day| {
                (0..2000).map(move |i| {
                    p(
                        "d",
                        "v",
                        today - day * DAY + i * 1000,
                        Value::Float((i % 97) as f64 * 1.37),
                    )
                })
            })
            .collect();
        e.write_blocking(tenant, pts).unwrap();
    }
    e.flush_blocking().unwrap();
    let du = |p: &Path| -> u64 {
        walk(p)
            .into_iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum()
    };
    let before = du(&dir.path().join("parts/acme"));
    e.set_retention(&t, Some(3)).unwrap();
    e.set_retention(&keep, None).unwrap();
    assert_eq!(e.retention(&t), (Some(3), false));
    let out = e.enforce_retention().unwrap();
    assert_eq!(out.partitions, 7);
    let after = du(&dir.path().join("parts/acme"));
    assert_eq!(before - after, out.bytes);
    assert!(after < before * 4 / 10, "{after} of {before}");
    let left = raw_all(&e, &t, "d", "v");
    assert_eq!(left.len(), 3 * 2000);
    assert_eq!(raw_all(&e, &keep, "d", "v").len(), 10 * 2000);
    // Points written for an expired day are dropped at flush, and the setting survives a restart.
    e.write_blocking(&t, vec![p("d", "v", today - 8 * DAY, Value::Float(1.0))])
        .unwrap();
    e.flush_blocking().unwrap();
    assert_eq!(raw_all(&e, &t, "d", "v").len(), 3 * 2000);
    e.close();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(e.retention(&t), (Some(3), false));
    assert_eq!(raw_all(&e, &t, "d", "v").len(), 3 * 2000);
    e.close();
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn recovery_replays_the_wal_and_skips_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let e = Engine::open(cfg(&live)).unwrap();
    let t = TenantId::new("acme");
    let base = now() - 3_600_000;
    e.write_blocking(
        &t,
        (0..1000)
            .map(|i| p("d", "a", base + i, Value::Int(i)))
            .collect(),
    )
    .unwrap();
    e.flush_blocking().unwrap();
    for k in 0..10 {
        e.write_blocking(
            &t,
            (0..100)
                .map(|i| p("d", "b", base + k * 100 + i, Value::Float(i as f64)))
                .collect(),
        )
        .unwrap();
    }
    // The files as a crash would leave them (acknowledged writes are in the WAL, not in parts).
    let crashed = dir.path().join("crashed");
    copy_dir(&live, &crashed);
    e.close();
    let torn = dir.path().join("torn");
    copy_dir(&crashed, &torn);
    let r = Engine::open(cfg(&crashed)).unwrap();
    assert_eq!(r.recovery().wal_points, 1000);
    assert!(r.recovery().wal_damage.is_empty());
    assert_eq!(raw_all(&r, &t, "d", "a").len(), 1000);
    assert_eq!(raw_all(&r, &t, "d", "b").len(), 1000);
    r.close();

    // A torn tail: the last record cut short. Everything before it is kept; the start is reported.
    let wal_dir = torn.join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let biggest = segs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let len = std::fs::metadata(&biggest).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&biggest)
        .unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);
    let r = Engine::open(cfg(&torn)).unwrap();
    assert_eq!(r.recovery().wal_damage.len(), 1, "{:?}", r.recovery());
    let b = raw_all(&r, &t, "d", "b").len();
    assert!((800..1000).contains(&b), "{b}");
    // Garbage appended to a segment and a corrupt part: reported and skipped, never a refusal.
    std::fs::write(
        wal_dir.join("00000000000000ff.wal"),
        b"FHTSWAL1\x01\x00\0\0\0\0\0\0\xff\xff\xff\xff",
    )
    .unwrap();
    r.close();
    // The oldest part (seq 1) holds only series "a".
    let mut parts: Vec<_> = walk(&torn.join("parts"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect();
    parts.sort_by_key(|p| p.file_name().unwrap().to_owned());
    let part = parts[0].clone();
    let mut bytes = std::fs::read(&part).unwrap();
    let n = bytes.len();
    bytes[n - 30] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let r = Engine::open(cfg(&torn)).unwrap();
    assert_eq!(r.recovery().corrupt_parts.len(), 1);
    assert_eq!(
        r.recovery().wal_damage.len(),
        1,
        "the torn segment was sealed and deleted; the garbage one is reported"
    );
    assert_eq!(raw_all(&r, &t, "d", "b").len(), b);
    assert!(raw_all(&r, &t, "d", "a").is_empty());
    r.close();
}

#[test]
fn values_round_trip_through_parts() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let t = TenantId::new("acme");
    let vals = [
        Value::Float(-0.0),
        Value::Float(1e300),
        Value::Float(f64::MIN_POSITIVE),
        Value::Int(i64::MAX),
        Value::Int(i64::MIN),
    ];
    let pts: Vec<Point> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| {
            p(
                "d",
                if matches!(v, Value::Int(_)) { "i" } else { "f" },
                1000 + i as i64,
                v.clone(),
            )
        })
        .collect();
    e.write_blocking(&t, pts).unwrap();
    e.flush_blocking().unwrap();
    let f = raw_all(&e, &t, "d", "f");
    assert!(matches!(f[0].1, Value::Float(x) if x.to_bits() == (-0.0f64).to_bits()));
    assert_eq!(
        raw_all(&e, &t, "d", "i"),
        vec![(1003, Value::Int(i64::MAX)), (1004, Value::Int(i64::MIN))]
    );
    let mut n = 0;
    e.scan(
        &t,
        None,
        Some(&["i".to_string()]),
        0,
        i64::MAX / 2,
        |d, m, ts, v: &Values| {
            assert_eq!((d, m, ts.len(), v.len()), ("d", "i", 2, 2));
            n += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(n, 1);
    let _ = AggFn::ALL;
    e.close();
}

#[test]
fn purging_a_tenant_deletes_its_points_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let (gone, kept) = (TenantId::new("gone"), TenantId::new("kept"));
    let base = now() - 3 * DAY;
    for t in [&gone, &kept] {
        e.write_blocking(
            t,
            (0..3000)
                .map(|i| p("d", "v", base + i * 60_000, Value::Int(i)))
                .collect(),
        )
        .unwrap();
    }
    e.flush_blocking().unwrap();
    // More points in the head and the WAL.
    e.write_blocking(&gone, vec![p("d", "v", now(), Value::Int(-1))])
        .unwrap();
    e.purge_tenant(&gone).unwrap();
    assert!(raw_all(&e, &gone, "d", "v").is_empty());
    assert!(!dir.path().join("parts/gone").exists());
    assert_eq!(raw_all(&e, &kept, "d", "v").len(), 3000);
    e.close();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert!(
        raw_all(&e, &gone, "d", "v").is_empty(),
        "nothing comes back from the WAL"
    );
    assert_eq!(raw_all(&e, &kept, "d", "v").len(), 3000);
    // The tenant can write again.
    e.write_blocking(&gone, vec![p("d", "v", now(), Value::Int(5))])
        .unwrap();
    assert_eq!(raw_all(&e, &gone, "d", "v").len(), 1);
    e.close();
}

fn dir_bytes(p: &Path) -> u64 {
    walk(p)
        .into_iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Three days of one point a minute for `device` (metrics `v` and `w`).
fn three_days(device: &str, base: i64) -> Vec<Point> {
    // Random values, so that the points (not the file headers) make the size.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..3 * 1440)
        .flat_map(|i| {
            [
                p(
                    device,
                    "v",
                    base + i * 60_000,
                    Value::Int((rand() >> 40) as i64),
                ),
                p(
                    device,
                    "w",
                    base + i * 60_000,
                    Value::Float((rand() >> 44) as f64 * 0.01),
                ),
            ]
        })
        .collect()
}

#[test]
fn device_purge_deletes_its_points_and_only_them() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    let t = TenantId::new("acme");
    let base = now() - now().rem_euclid(DAY) - 2 * DAY;
    for d in ["gone", "kept"] {
        e.write_blocking(&t, three_days(d, base)).unwrap();
    }
    e.flush_blocking().unwrap();
    // A second part per day, and points in the head and the WAL.
    e.write_blocking(&t, vec![p("gone", "v", base + 30_000, Value::Int(-1))])
        .unwrap();
    e.flush_blocking().unwrap();
    e.write_blocking(&t, vec![p("gone", "v", now(), Value::Int(-2))])
        .unwrap();
    let before = dir_bytes(&dir.path().join("parts"));
    assert_eq!(e.purge_device(&t, "gone").unwrap(), 2);
    // Invisible at once.
    assert!(raw_all(&e, &t, "gone", "v").is_empty());
    assert!(e.list_series(&t, Some("gone")).is_empty());
    // Now, or already done by the maintainer (which runs pending purges on its own).
    e.finish_purges().unwrap();
    let st = e.stats();
    assert_eq!(st.device_purges.load(Ordering::Relaxed), 1);
    let after = dir_bytes(&dir.path().join("parts"));
    assert!(after < before * 6 / 10, "{after} of {before} bytes left");
    let freed = st.purge_bytes_freed.load(Ordering::Relaxed);
    assert!(
        freed > (before - after) / 2,
        "{freed} freed, {before} → {after}"
    );
    assert_eq!(raw_all(&e, &t, "kept", "v").len(), 3 * 1440);
    assert_eq!(raw_all(&e, &t, "kept", "w").len(), 3 * 1440);
    // Nothing more to do; the device can come back under the same id with fresh data only.
    assert_eq!(e.finish_purges().unwrap().devices, 0);
    e.write_blocking(&t, vec![p("gone", "v", now(), Value::Int(7))])
        .unwrap();
    e.close();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert_eq!(
        raw_all(&e, &t, "gone", "v"),
        vec![(now_floor(&e, &t), Value::Int(7))]
    );
    assert!(raw_all(&e, &t, "gone", "w").is_empty());
    assert_eq!(raw_all(&e, &t, "kept", "w").len(), 3 * 1440);
    e.close();
}

/// A flush (or compaction) that sealed a device's points before it was purged must not bring
/// them back when it maps the new part: the CI once saw a decommissioned device's points again.
#[test]
fn a_purge_racing_a_flush_never_brings_the_points_back() {
    let dir = tempfile::tempdir().unwrap();
    let e = std::sync::Arc::new(Engine::open(cfg(dir.path())).unwrap());
    let t = TenantId::new("acme");
    let base = now() - 10 * 60_000;
    for round in 0..60 {
        let device = format!("gone-{round}");
        let points: Vec<Point> = (0..2_000)
            .map(|i| p(&device, "v", base + i * 100, Value::Float(i as f64)))
            .collect();
        e.write_blocking(&t, points).unwrap();
        let flusher = {
            let e = e.clone();
            std::thread::spawn(move || e.flush_blocking().unwrap())
        };
        // Let the flush start in some rounds, race its start in others.
        std::thread::sleep(Duration::from_micros((round % 6) * 150));
        e.purge_device(&t, &device).unwrap();
        flusher.join().unwrap();
        assert!(
            raw_all(&e, &t, &device, "v").is_empty(),
            "round {round}: purged points visible again"
        );
        e.finish_purges().unwrap();
        assert!(raw_all(&e, &t, &device, "v").is_empty(), "round {round}");
    }
    let listed = e.list_series(&t, None);
    assert!(listed.is_empty(), "{} series left", listed.len());
}

/// The timestamp of the only point of `gone/v`.
fn now_floor(e: &Engine, t: &TenantId) -> i64 {
    raw_all(e, t, "gone", "v")
        .first()
        .map(|(ts, _)| *ts)
        .unwrap_or(-1)
}

#[test]
fn an_interrupted_device_purge_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let t = TenantId::new("acme");
    let base = now() - now().rem_euclid(DAY) - 2 * DAY;
    let e = Engine::open(cfg(dir.path())).unwrap();
    for d in ["gone", "kept"] {
        e.write_blocking(&t, three_days(d, base)).unwrap();
    }
    e.flush_blocking().unwrap();
    e.write_blocking(&t, vec![p("gone", "v", now(), Value::Int(-2))])
        .unwrap();
    e.close();
    // The state a crash right after the purge was recorded leaves behind.
    std::fs::write(
        dir.path().join("purges.json"),
        r#"[{"tenant": "acme", "device": "gone"}]"#,
    )
    .unwrap();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert!(
        raw_all(&e, &t, "gone", "v").is_empty(),
        "hidden before open returns"
    );
    // The maintainer finishes it on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dir.path().join("purges.json").exists()
        && std::fs::read_to_string(dir.path().join("purges.json"))
            .unwrap()
            .trim()
            != "[]"
    {
        assert!(std::time::Instant::now() < deadline, "purge not finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(raw_all(&e, &t, "kept", "v").len(), 3 * 1440);
    e.close();
    let e = Engine::open(cfg(dir.path())).unwrap();
    assert!(raw_all(&e, &t, "gone", "v").is_empty());
    assert!(raw_all(&e, &t, "gone", "w").is_empty());
    assert_eq!(raw_all(&e, &t, "kept", "w").len(), 3 * 1440);
    e.close();
}
