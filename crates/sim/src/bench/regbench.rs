//! `ferrohub bench registry`: device-registry queries at fleet scale.
//!
//! Opens a fresh SQLite registry (`ferrohub-registry`'s own store, in a temporary directory unless
//! `--data-dir` is given), bulk-loads N devices with realistic tags, types and last-seen times,
//! then times the listings an operator console issues — each through [`Registry::list_devices`],
//! the call behind `GET /api/v1/tenants/{t}/devices` — and the device count.
//!
//! Fleet shape (deterministic; a hash of the device number picks every value, so that no tag
//! correlates with id order): `site` 100 values (1 % each), `model` 20 (5 %), `fw` 5 (20 %),
//! `beta=yes` on 0.1 % of the devices, one of 10 device types, and a last-seen time within the
//! last 30 days for 95 % of them (the rest never connected). Names are `meter-NNNNNNN` with the
//! number scrambled, so that name order is not id order either.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferrohub_registry::model::{
    Connectivity, Device, DeviceListing, DeviceQuery, DeviceStatus, DeviceType, Group, SortKey,
    now_millis,
};
use ferrohub_registry::store::ConnectivityUpdate;
use ferrohub_registry::{
    Actor, Registry, RegistryConfig, RegistryStore, SqliteOptions, SqliteStore,
};
use serde::Serialize;

/// How to run the registry benchmark.
#[derive(Debug, Clone)]
pub struct RegistryBenchParams {
    /// Devices to load.
    pub devices: usize,
    /// Timed repetitions of each query.
    pub queries: usize,
    /// Where to put `registry.db` (default: a temporary directory, removed afterwards).
    pub data_dir: Option<PathBuf>,
    /// Keep the database afterwards.
    pub keep: bool,
    /// Progress on stderr.
    pub progress: bool,
    /// Free text copied into every line.
    pub label: String,
}

/// The load phase.
#[derive(Debug, Serialize)]
struct LoadLine<'a> {
    scenario: &'static str,
    label: &'a str,
    phase: &'static str,
    devices: usize,
    load_s: f64,
    devices_per_s: f64,
    connectivity_s: f64,
    db_bytes: u64,
    db_path: String,
}

/// One timed query.
#[derive(Debug, Serialize)]
struct QueryLine<'a> {
    scenario: &'static str,
    label: &'a str,
    phase: &'static str,
    query: &'static str,
    description: &'static str,
    devices: usize,
    runs: usize,
    /// Rows returned by the last run (page size or count).
    rows: u64,
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    min_ms: f64,
}

const TENANT: &str = "default";
const PAGE: u32 = 100;
/// Deep pages start after this many rows (page 51 of 100).
const DEEP_OFFSET_PAGES: usize = 50;

fn mix(mut x: u64) -> u64 {
    // splitmix64: a cheap, well-spread hash of the device number.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Id of device `i`.
pub fn device_id(i: usize) -> String {
    format!("dev-{i:07}")
}

fn site(n: u64) -> String {
    format!("site-{:02}", n % 100)
}

fn model(n: u64) -> String {
    format!("model-{:02}", n % 20)
}

fn fw(n: u64) -> String {
    format!("fw-{}", n % 5)
}

fn device_type(n: u64) -> String {
    format!("type-{}", n % 10)
}

/// Device `i` of an `n`-device fleet.
fn make_device(i: usize, n: usize, base: i64) -> Device {
    let h = mix(i as u64);
    let mut tags = BTreeMap::new();
    tags.insert("site".to_string(), site(h));
    tags.insert("model".to_string(), model(h >> 8));
    tags.insert("fw".to_string(), fw(h >> 16));
    if (h >> 24).is_multiple_of(1000) {
        tags.insert("beta".to_string(), "yes".to_string());
    }
    // A bijection of 0..n (999,983 is prime, so coprime with any n it does not divide).
    let scrambled = (i as u128 * 999_983 % n.max(1) as u128) as u64;
    let created = base + i as i64;
    Device {
        id: device_id(i),
        tenant: TENANT.into(),
        name: format!("meter-{scrambled:07}"),
        device_type: Some(device_type(h >> 32)),
        tags,
        attributes: serde_json::json!({ "serial": format!("SN{:012X}", h >> 16) }),
        status: DeviceStatus::Enabled,
        policy: None,
        groups: Vec::new(),
        connectivity: Connectivity::default(),
        created_at: created,
        updated_at: created,
    }
}

fn progress_line(what: &str, done: usize, total: usize, t0: Instant) {
    let secs = t0.elapsed().as_secs_f64();
    eprint!(
        "\r[registry] {what} {done:>9}/{total} ({:>3.0} %, {:>7.0}/s, {secs:>5.0} s)",
        done as f64 * 100.0 / total.max(1) as f64,
        done as f64 / secs.max(1e-9)
    );
    if done >= total {
        eprintln!();
    }
}

/// Runs the benchmark; JSON lines go to stdout.
pub async fn run(p: &RegistryBenchParams) -> anyhow::Result<()> {
    let (dir, temporary) = match &p.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "ferrohub-registry-bench-{}-{}",
                std::process::id(),
                now_millis()
            )),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let db = dir.join("registry.db");
    let result = run_in(p, &db).await;
    if temporary && !p.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("[registry] database kept at {}", db.display());
    }
    result
}

async fn run_in(p: &RegistryBenchParams, db: &std::path::Path) -> anyhow::Result<()> {
    let store = SqliteStore::open(db, SqliteOptions { fsync: false })
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    let registry = Registry::open(store.clone(), RegistryConfig::default()).await?;
    let actor = Actor::system();
    let existing = store.count_devices(TENANT).await?;
    let n = p.devices;
    let mut load_s = 0.0;
    let mut connectivity_s = 0.0;
    if existing == 0 {
        for t in 0..10 {
            registry
                .put_device_type(
                    &actor,
                    TENANT,
                    DeviceType {
                        name: device_type(t),
                        description: format!("benchmark device type {t}"),
                        tags: BTreeMap::new(),
                        attributes: serde_json::json!({}),
                        policy: None,
                    },
                )
                .await?;
        }
        let base = now_millis() - 400 * 86_400_000;
        let t0 = Instant::now();
        const BATCH: usize = 5_000;
        let mut i = 0;
        while i < n {
            let end = (i + BATCH).min(n);
            let batch: Vec<Device> = (i..end).map(|j| make_device(j, n, base)).collect();
            for r in store.insert_devices(&batch).await? {
                r?;
            }
            i = end;
            if p.progress {
                progress_line("loading devices", i, n, t0);
            }
        }
        load_s = t0.elapsed().as_secs_f64();
        // Last seen: 95 % within the last 30 days, the rest never.
        let t1 = Instant::now();
        let now = now_millis();
        let mut i = 0;
        while i < n {
            let end = (i + 10_000).min(n);
            let updates: Vec<ConnectivityUpdate> = (i..end)
                .filter_map(|j| {
                    let h = mix(j as u64 ^ 0x5151);
                    (h % 100 >= 5).then(|| ConnectivityUpdate {
                        tenant: TENANT.into(),
                        device_id: device_id(j),
                        state: Connectivity {
                            online: false,
                            last_seen: Some(now - ((h >> 8) % (30 * 86_400_000)) as i64),
                            remote_addr: Some("10.1.2.3:50000".into()),
                            protocol: Some("mqtts".into()),
                            ..Default::default()
                        },
                    })
                })
                .collect();
            store.set_connectivity(&updates).await?;
            i = end;
            if p.progress {
                progress_line("last-seen times", i, n, t1);
            }
        }
        connectivity_s = t1.elapsed().as_secs_f64();
    } else if p.progress {
        eprintln!("[registry] reusing {existing} devices in {}", db.display());
    }
    let n = store.count_devices(TENANT).await? as usize;
    registry
        .put_group(
            &actor,
            TENANT,
            Group {
                name: "model-03-fw-1".into(),
                description: "dynamic group: model-03 on fw-1".into(),
                query: Some(DeviceQuery {
                    tags: BTreeMap::from([
                        ("model".to_string(), "model-03".to_string()),
                        ("fw".to_string(), "fw-1".to_string()),
                    ]),
                    ..DeviceQuery::default()
                }),
            },
        )
        .await?;
    let db_bytes = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    emit(&LoadLine {
        scenario: "registry",
        label: &p.label,
        phase: "load",
        devices: n,
        load_s,
        devices_per_s: if load_s > 0.0 { n as f64 / load_s } else { 0.0 },
        connectivity_s,
        db_bytes,
        db_path: db.display().to_string(),
    })?;

    let q = Queries {
        registry: registry.clone(),
        actor,
        runs: p.queries.max(1),
        n,
        label: p.label.clone(),
    };
    let tags = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let listing = |query: DeviceQuery, sort: SortKey, descending: bool| DeviceListing {
        query,
        group: None,
        sort,
        descending,
        limit: PAGE,
        cursor: None,
    };

    q.time("tag", "one tag (site: 1 %), first page of 100", |k| {
        listing(
            DeviceQuery {
                tags: tags(&[("site", site(k as u64 * 7))]),
                ..DeviceQuery::default()
            },
            SortKey::Id,
            false,
        )
    })
    .await?;

    // Cursors of page 51 of ten sites (walked once, untimed).
    let mut deep = Vec::new();
    for k in 0..10u64 {
        let mut l = listing(
            DeviceQuery {
                tags: tags(&[("site", site(k * 7))]),
                ..DeviceQuery::default()
            },
            SortKey::Id,
            false,
        );
        for _ in 0..DEEP_OFFSET_PAGES {
            let page = q.registry.list_devices(&q.actor, TENANT, l.clone()).await?;
            l.cursor = page.next_cursor;
        }
        deep.push(l);
    }
    q.time("tag_deep", "one tag (site), page 51 via cursor", |k| {
        deep[k % deep.len()].clone()
    })
    .await?;

    q.time(
        "two_tags",
        "two tags (site 1 % and model 5 %), first page",
        |k| {
            listing(
                DeviceQuery {
                    tags: tags(&[("site", site(k as u64 * 7)), ("model", model(k as u64))]),
                    ..DeviceQuery::default()
                },
                SortKey::Id,
                false,
            )
        },
    )
    .await?;

    q.time("rare_tag", "rare tag (beta: 0.1 %), first page", |_| {
        listing(
            DeviceQuery {
                tags: tags(&[("beta", "yes".to_string())]),
                ..DeviceQuery::default()
            },
            SortKey::Id,
            false,
        )
    })
    .await?;

    q.time("type", "by type (10 %), first page", |k| {
        listing(
            DeviceQuery {
                device_type: Some(device_type(k as u64)),
                ..DeviceQuery::default()
            },
            SortKey::Id,
            false,
        )
    })
    .await?;

    q.time(
        "tag_by_name",
        "one tag (site), sorted by name, first page",
        |k| {
            listing(
                DeviceQuery {
                    tags: tags(&[("site", site(k as u64 * 7))]),
                    ..DeviceQuery::default()
                },
                SortKey::Name,
                false,
            )
        },
    )
    .await?;

    q.time("by_name", "all devices sorted by name, first page", |_| {
        listing(DeviceQuery::default(), SortKey::Name, false)
    })
    .await?;

    q.time(
        "by_last_seen",
        "all devices by last seen, most recent first, first page",
        |_| listing(DeviceQuery::default(), SortKey::LastSeen, true),
    )
    .await?;

    q.time(
        "dynamic_group",
        "dynamic group (model-03 and fw-1: 1 %), first page",
        |_| DeviceListing {
            group: Some("model-03-fw-1".into()),
            ..listing(DeviceQuery::default(), SortKey::Id, false)
        },
    )
    .await?;

    // The count.
    let mut samples = Vec::with_capacity(q.runs);
    let mut rows = 0;
    rows += store.count_devices(TENANT).await?; // warm-up, untimed
    for _ in 0..q.runs {
        let t = Instant::now();
        rows = store.count_devices(TENANT).await?;
        samples.push(t.elapsed());
    }
    q.report("count", "count of all devices", rows, samples)?;
    drop(registry);
    store.close().await;
    Ok(())
}

struct Queries {
    registry: Arc<Registry>,
    actor: Actor,
    runs: usize,
    n: usize,
    label: String,
}

impl Queries {
    /// Runs `make(k)` for k in 0..runs (after one untimed warm-up) and reports the times.
    async fn time(
        &self,
        name: &'static str,
        description: &'static str,
        make: impl Fn(usize) -> DeviceListing,
    ) -> anyhow::Result<()> {
        self.registry
            .list_devices(&self.actor, TENANT, make(0))
            .await?;
        let mut samples = Vec::with_capacity(self.runs);
        let mut rows = 0;
        for k in 0..self.runs {
            let l = make(k);
            let t = Instant::now();
            let page = self.registry.list_devices(&self.actor, TENANT, l).await?;
            samples.push(t.elapsed());
            rows = page.items.len() as u64;
        }
        self.report(name, description, rows, samples)
    }

    fn report(
        &self,
        name: &'static str,
        description: &'static str,
        rows: u64,
        mut samples: Vec<Duration>,
    ) -> anyhow::Result<()> {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let line = QueryLine {
            scenario: "registry",
            label: &self.label,
            phase: "query",
            query: name,
            description,
            devices: self.n,
            runs: samples.len(),
            rows,
            median_ms: ms(percentile(&samples, 0.5)),
            p99_ms: ms(percentile(&samples, 0.99)),
            max_ms: samples.last().map(|d| ms(*d)).unwrap_or(0.0),
            min_ms: samples.first().map(|d| ms(*d)).unwrap_or(0.0),
        };
        eprintln!(
            "[registry] {name:<14} median {:>8.2} ms  p99 {:>8.2} ms  ({} rows)",
            line.median_ms, line.p99_ms, rows
        );
        emit(&line)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn emit<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_shape() {
        let n = 100_000;
        let devices: Vec<Device> = (0..n).map(|i| make_device(i, n, 0)).collect();
        let count = |k: &str, v: &str| {
            devices
                .iter()
                .filter(|d| d.tags.get(k).map(String::as_str) == Some(v))
                .count()
        };
        let near = |got: usize, want: usize| got.abs_diff(want) * 10 < want;
        assert!(near(count("site", "site-42"), n / 100));
        assert!(near(count("model", "model-07"), n / 20));
        assert!(near(count("fw", "fw-3"), n / 5));
        assert!(near(count("beta", "yes"), n / 1000));
        let mut names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "names are a permutation");
    }

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&s, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&s[..1], 0.99), Duration::from_millis(1));
    }
}
