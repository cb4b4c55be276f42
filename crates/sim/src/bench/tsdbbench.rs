//! `ferrohub bench tsdb`: the telemetry engine (`ferrohub-tsdb`) in-process, side by side with
//! SQLite and PostgreSQL storing the same points.
//!
//! Phases (everything is generated before it is timed):
//!
//! 1. **Generate** (deterministic, splitmix64): the *main* dataset has ten tenants, five value
//!    profiles × two timestamp styles, each with `--series / 10` series of
//!    `--points-per-series` points at 1 Hz from 2026-01-01 00:00:00.500 UTC:
//!    - `temp`: 21 + 4·sin(daily) + AR(1) drift + N(0, 0.02), rounded to 0.01 (float);
//!    - `vib3` / `vib2`: 2.5·exp(0.25·N(0,1)), rounded to 0.001 / 0.01 (the same draws: only the
//!      resolution differs; 0.001 has an entropy floor of about 1.41 B/pt);
//!    - `counter`: integer Wh, +U{0..5} per second (integer values);
//!    - `status`: a boolean flipping about three times a day;
//!    - timestamps `reg` (exactly 1 s apart) or `jit` (±20 ms uniform jitter, about 0.67 B/pt of
//!      entropy); the same values in both.
//!
//!    The *fleet* dataset is `--fleet-devices` temperature series over `--fleet-days` days at
//!    `--fleet-interval-s`, ending now (each device at its own phase within the interval).
//! 2. **Ingest** into the engine (`--threads` threads calling `write_blocking` with `--batch`
//!    points of one tenant each, time-major: a batch holds the next timestamps of every series
//!    of its tenant, as a gateway's upload would; tenants take turns), then `flush_blocking` and
//!    `compact(true)`, each timed. Bytes per point per tenant come from the part files under
//!    `dir/engine/parts/<tenant>/`, broken down into timestamp and value blocks, 1-minute and
//!    1-hour rollups and index/framing (read with `PartFile::open`).
//! 3. **Queries**: one series' day of raw points (limit 100,000), median and p99 of 50 runs after
//!    a warm-up; 1-hour buckets (avg) of that day; the fleet query (1-hour avg buckets over
//!    every device for `--fleet-days` days, one group; median of 5), plus the same per device.
//! 4. **SQLite** (bundled, `points(series, ts, value) WITHOUT ROWID`, WAL, one transaction per
//!    batch) and 5. **PostgreSQL** (`COPY … FROM STDIN (FORMAT binary)` per batch, one
//!    connection per thread) with the same points and queries.
//!
//! Prints one JSON line on stdout and a table on stderr.

use std::f64::consts::TAU;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ferrohub_tsdb::part::PartFile;
use ferrohub_tsdb::{AggFn, AggregateQuery, Engine, EngineConfig, RawQuery, SeriesGroup};
use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Point, Value};
use serde::Serialize;
use serde_json::json;

use super::stats::Latency;
use super::{BenchArgs, sys};

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// First day of the main dataset: 2026-01-01 (days since the epoch).
const MAIN_DAY0_MS: i64 = 20_454 * DAY_MS;
/// Offset of the first sample within the second, so that jitter never crosses midnight.
const MAIN_OFFSET_MS: i64 = 500;
const SEED: u64 = 0x5EED_F00D_2026_0001;
/// Raw query page (the engine's largest).
const RAW_LIMIT: usize = 100_000;
/// Timed runs of the single-series queries.
const SERIES_RUNS: usize = 50;
/// Timed runs of the fleet query.
const FLEET_RUNS: usize = 5;
/// Timed runs of the per-device fleet query.
const PER_DEVICE_RUNS: usize = 3;
/// Devices per engine query when grouping per device (the engine caps buckets × groups at 1 M).
const PER_DEVICE_CHUNK: usize = 1000;
/// Devices of the side-by-side fleet when SQLite or PostgreSQL take part (unless
/// `--compare-fleet-devices` says otherwise): SQLite's time-major insert into a (series, ts) key
/// slows to about 50,000 rows/s once the table outgrows its cache, so the whole default fleet
/// (86.4 M points) would take about half an hour on the standard machine.
const SCALED_FLEET_DEVICES: usize = 1000;

/// How to run `bench tsdb` (from the `ferrohub bench` flags).
#[derive(Debug, Clone)]
pub struct TsdbBenchParams {
    /// Points per series of the main dataset (1 Hz).
    pub points_per_series: usize,
    /// Series per tenant of the main dataset (ten tenants).
    pub series_per_tenant: usize,
    /// Points per write call / transaction / COPY.
    pub batch: usize,
    /// Ingest threads (and PostgreSQL connections).
    pub threads: usize,
    /// Data directory (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Keep a temporary directory afterwards.
    pub keep: bool,
    /// Sync before acknowledging, in every engine.
    pub fsync: bool,
    /// Compare with SQLite.
    pub sqlite: bool,
    /// Compare with PostgreSQL at this connection string.
    pub postgres: Option<String>,
    /// Devices of the fleet dataset.
    pub fleet_devices: usize,
    /// Days of the fleet dataset.
    pub fleet_days: u32,
    /// Sample spacing of the fleet dataset, seconds.
    pub fleet_interval_s: u32,
    /// Devices of the side-by-side fleet (default: all of them for the engine alone, at most
    /// 1,000 when SQLite or PostgreSQL take part).
    pub compare_fleet_devices: Option<usize>,
    /// Free text copied into the result line.
    pub label: String,
}

impl TsdbBenchParams {
    /// Reads and checks the `tsdb` flags.
    pub fn from_args(a: &BenchArgs) -> anyhow::Result<TsdbBenchParams> {
        let mut sqlite = false;
        let mut postgres = false;
        for c in a
            .compare
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match c {
                "sqlite" => sqlite = true,
                "postgres" | "postgresql" | "pg" => postgres = true,
                other => bail!("--compare: unknown engine {other:?} (sqlite, postgres)"),
            }
        }
        let postgres = match (postgres, &a.pg_url) {
            (false, _) => None,
            (true, Some(url)) => Some(url.clone()),
            (true, None) => bail!("--compare postgres needs --pg-url (nothing is started)"),
        };
        let usize_of = |v: u64, flag: &str| {
            usize::try_from(v).with_context(|| format!("{flag} is too large for this machine"))
        };
        Ok(TsdbBenchParams {
            points_per_series: usize_of(a.points_per_series, "--points-per-series")?,
            series_per_tenant: usize_of(a.series.div_ceil(TENANTS as u64), "--series")?,
            batch: usize_of(a.batch, "--batch")?,
            threads: usize::from(a.threads).max(1),
            dir: a.dir.clone(),
            keep: a.keep,
            fsync: a.fsync,
            sqlite,
            postgres,
            fleet_devices: usize_of(a.fleet_devices, "--fleet-devices")?,
            fleet_days: a.fleet_days,
            fleet_interval_s: a.fleet_interval_s,
            compare_fleet_devices: a
                .compare_fleet_devices
                .map(|n| usize_of(n, "--compare-fleet-devices"))
                .transpose()?,
            label: a.label.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic data.

/// splitmix64's finaliser: a well-spread hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A splitmix64 stream with Box–Muller normals.
struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng {
            state: mix(seed),
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Standard normal.
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (z0, z1) = box_muller(self.next_u64(), self.next_u64());
        self.spare = Some(z1);
        z0
    }
}

/// The top 53 bits of `x` as a float in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn box_muller(a: u64, b: u64) -> (f64, f64) {
    let u1 = 1.0 - unit(a); // (0, 1]: ln is finite
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (TAU * unit(b)).sin_cos();
    (r * c, r * s)
}

fn round_to(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

/// Value profiles of the main dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Temperature,
    Vibration3,
    Vibration2,
    Counter,
    Status,
}

/// Five profiles × two timestamp styles.
const TENANTS: usize = 10;

impl Profile {
    const ALL: [Profile; 5] = [
        Profile::Temperature,
        Profile::Vibration3,
        Profile::Vibration2,
        Profile::Counter,
        Profile::Status,
    ];

    fn short(self) -> &'static str {
        match self {
            Profile::Temperature => "temp",
            Profile::Vibration3 => "vib3",
            Profile::Vibration2 => "vib2",
            Profile::Counter => "counter",
            Profile::Status => "status",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Profile::Temperature => "temperature, 0.01 (float)",
            Profile::Vibration3 => "vibration, 0.001 (float)",
            Profile::Vibration2 => "vibration, 0.01 (float)",
            Profile::Counter => "energy counter, Wh (int)",
            Profile::Status => "status flag (bool)",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Profile::Temperature => "temperature",
            Profile::Vibration3 | Profile::Vibration2 => "vibration",
            Profile::Counter => "energy_wh",
            Profile::Status => "status",
        }
    }

    fn value(self, v: f64) -> Value {
        match self {
            Profile::Temperature | Profile::Vibration3 | Profile::Vibration2 => Value::Float(v),
            Profile::Counter => Value::Int(v as i64),
            Profile::Status => Value::Bool(v != 0.0),
        }
    }

    /// Seed family: both vibration profiles share their draws.
    fn seed_index(self) -> u64 {
        match self {
            Profile::Temperature => 1,
            Profile::Vibration3 | Profile::Vibration2 => 2,
            Profile::Counter => 3,
            Profile::Status => 4,
        }
    }

    /// `n` values of series `j`, one per second.
    fn generate(self, j: usize, n: usize) -> Vec<f64> {
        let mut rng = Rng::new(SEED ^ (self.seed_index() << 40) ^ j as u64);
        let mut out = Vec::with_capacity(n);
        match self {
            Profile::Temperature => {
                let phase = rng.uniform() * 0.5;
                let mut drift = 0.0;
                for i in 0..n {
                    let day = i as f64 / 86_400.0;
                    drift = 0.9995 * drift + 0.003 * rng.normal();
                    let v = 21.0 + 4.0 * (TAU * day + phase).sin() + drift + 0.02 * rng.normal();
                    out.push(round_to(v, 100.0));
                }
            }
            Profile::Vibration3 | Profile::Vibration2 => {
                let scale = if self == Profile::Vibration3 {
                    1000.0
                } else {
                    100.0
                };
                for _ in 0..n {
                    out.push(round_to(2.5 * (0.25 * rng.normal()).exp(), scale));
                }
            }
            Profile::Counter => {
                let mut c = 1_000_000 + rng.below(1_000_000);
                for _ in 0..n {
                    c += rng.below(6);
                    out.push(c as f64);
                }
            }
            Profile::Status => {
                let mut on = rng.below(2) == 1;
                for _ in 0..n {
                    if rng.uniform() < 3.0 / 86_400.0 {
                        on = !on;
                    }
                    out.push(if on { 1.0 } else { 0.0 });
                }
            }
        }
        out
    }
}

/// One tenant of the main dataset.
struct TenantData {
    name: String,
    tenant: TenantId,
    profile: Profile,
    jitter: bool,
    devices: Vec<String>,
    ts: Vec<Vec<i64>>,
    values: Vec<Vec<f64>>,
}

/// Points `start..end` of a tenant in time-major order (flat index `i * series + j`: time step
/// `i` of series `j`).
#[derive(Debug, Clone, Copy)]
struct BatchSpec {
    tenant: usize,
    start: usize,
    end: usize,
}

/// The main dataset.
struct MainData {
    tenants: Vec<TenantData>,
    series: usize,
    points_per_series: usize,
    batches: Vec<BatchSpec>,
}

impl MainData {
    fn generate(series: usize, points: usize, batch: usize, threads: usize) -> MainData {
        let specs: Vec<(Profile, bool)> = Profile::ALL
            .iter()
            .flat_map(|&p| [(p, false), (p, true)])
            .collect();
        let mut tenants: Vec<TenantData> = Vec::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = specs
                .chunks(specs.len().div_ceil(threads.max(1)))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|&(p, jitter)| gen_tenant(p, jitter, series, points))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                if let Ok(t) = h.join() {
                    tenants.extend(t);
                }
            }
        });
        // Tenants take turns, one batch each.
        let per_tenant = (series * points).div_ceil(batch);
        let mut batches = Vec::with_capacity(per_tenant * tenants.len());
        for b in 0..per_tenant {
            for t in 0..tenants.len() {
                let start = b * batch;
                let end = ((b + 1) * batch).min(series * points);
                batches.push(BatchSpec {
                    tenant: t,
                    start,
                    end,
                });
            }
        }
        MainData {
            tenants,
            series,
            points_per_series: points,
            batches,
        }
    }

    fn points(&self) -> usize {
        self.tenants.len() * self.series * self.points_per_series
    }

    /// The engine's write calls, spread round-robin over `threads` (untimed).
    fn build_points(&self, threads: usize) -> Vec<Vec<(TenantId, Vec<Point>)>> {
        let mut out: Vec<Vec<(TenantId, Vec<Point>)>> = (0..threads).map(|_| Vec::new()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    s.spawn(move || {
                        self.batches
                            .iter()
                            .skip(k)
                            .step_by(threads)
                            .map(|b| {
                                let t = &self.tenants[b.tenant];
                                let metric = t.profile.metric();
                                let points = (b.start..b.end)
                                    .map(|f| {
                                        let (i, j) = (f / self.series, f % self.series);
                                        Point {
                                            device: t.devices[j].clone(),
                                            metric: metric.to_string(),
                                            ts_ms: t.ts[j][i],
                                            value: t.profile.value(t.values[j][i]),
                                        }
                                    })
                                    .collect();
                                (t.tenant.clone(), points)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for (k, h) in handles.into_iter().enumerate() {
                if let Ok(v) = h.join() {
                    out[k] = v;
                }
            }
        });
        out
    }
}

fn gen_tenant(profile: Profile, jitter: bool, series: usize, points: usize) -> TenantData {
    let name = format!("{}-{}", profile.short(), if jitter { "jit" } else { "reg" });
    let mut ts = Vec::with_capacity(series);
    let mut values = Vec::with_capacity(series);
    for j in 0..series {
        values.push(profile.generate(j, points));
        let mut jr = Rng::new(SEED ^ 0x7177_E500 ^ (profile.seed_index() << 40) ^ j as u64);
        ts.push(
            (0..points)
                .map(|i| {
                    let t = MAIN_DAY0_MS + MAIN_OFFSET_MS + i as i64 * 1000;
                    if jitter {
                        t + jr.below(41) as i64 - 20
                    } else {
                        t
                    }
                })
                .collect(),
        );
    }
    TenantData {
        tenant: TenantId::new(&name),
        name,
        profile,
        jitter,
        devices: (0..series).map(|j| format!("dev-{j:05}")).collect(),
        ts,
        values,
    }
}

/// The fleet dataset: one temperature series per device, time-major values.
struct Fleet {
    devices: usize,
    steps: usize,
    interval_ms: i64,
    end_ms: i64,
    phase_ms: Vec<i64>,
    names: Vec<String>,
    /// `values[k * devices + d]`: step `k` of device `d`.
    values: Vec<f64>,
}

impl Fleet {
    fn generate(devices: usize, days: u32, interval_s: u32, threads: usize) -> Fleet {
        let interval_ms = i64::from(interval_s) * 1000;
        let steps = (i64::from(days) * DAY_MS / interval_ms).max(1) as usize;
        let end_ms = now_ms().div_euclid(interval_ms) * interval_ms;
        let phase_ms: Vec<i64> = (0..devices)
            .map(|d| (mix(SEED ^ 0xF1EE7 ^ d as u64) % interval_ms as u64) as i64)
            .collect();
        let offset: Vec<f64> = (0..devices)
            .map(|d| unit(mix(SEED ^ 0x0FF5E7 ^ d as u64)) * 6.0 - 3.0)
            .collect();
        let daily_phase: Vec<f64> = (0..devices)
            .map(|d| unit(mix(SEED ^ 0xDA11 ^ d as u64)) * 0.6)
            .collect();
        let mut values = vec![0.0; devices * steps];
        let first_ts = end_ms - (steps as i64 - 1) * interval_ms;
        let rows_per_thread = steps.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            for (c, chunk) in values.chunks_mut(rows_per_thread * devices).enumerate() {
                let (phase_ms, offset, daily_phase) = (&phase_ms, &offset, &daily_phase);
                s.spawn(move || {
                    for (r, row) in chunk.chunks_mut(devices).enumerate() {
                        let k = c * rows_per_thread + r;
                        for (d, v) in row.iter_mut().enumerate() {
                            let t = first_ts + k as i64 * interval_ms - phase_ms[d];
                            let day = t as f64 / DAY_MS as f64;
                            let h = mix(SEED ^ ((d as u64) << 32) ^ k as u64);
                            let (n, _) = box_muller(h, mix(h));
                            *v = round_to(
                                20.0 + offset[d]
                                    + 4.0 * (TAU * day + daily_phase[d]).sin()
                                    + 0.05 * n,
                                100.0,
                            );
                        }
                    }
                });
            }
        });
        Fleet {
            devices,
            steps,
            interval_ms,
            end_ms,
            phase_ms,
            names: (0..devices).map(|d| format!("dev-{d:05}")).collect(),
            values,
        }
    }

    fn ts(&self, d: usize, k: usize) -> i64 {
        self.end_ms - (self.steps - 1 - k) as i64 * self.interval_ms - self.phase_ms[d]
    }

    /// Exact per-bucket (count, sum) of the first `devices` devices in `[from, to)`.
    fn expected(&self, devices: usize, from: i64, to: i64) -> Vec<(i64, u64, f64)> {
        let base = from.div_euclid(HOUR_MS);
        let n = ((to - 1).div_euclid(HOUR_MS) - base + 1) as usize;
        let mut acc = vec![(0u64, 0.0f64); n];
        for k in 0..self.steps {
            for d in 0..devices {
                let t = self.ts(d, k);
                if t >= from && t < to {
                    let slot = &mut acc[(t.div_euclid(HOUR_MS) - base) as usize];
                    slot.0 += 1;
                    slot.1 += self.values[k * self.devices + d];
                }
            }
        }
        acc.into_iter()
            .enumerate()
            .filter(|(_, (c, _))| *c > 0)
            .map(|(i, (c, s))| ((base + i as i64) * HOUR_MS, c, s))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Rows for the SQL engines: (series, ts, value).

type Row = (i64, i64, f64);

/// Batches of rows, the same ones the engine got.
trait Rows: Sync {
    fn batch_count(&self) -> usize;
    fn fill(&self, b: usize, out: &mut Vec<Row>);
    fn points(&self) -> usize;
}

impl Rows for MainData {
    fn batch_count(&self) -> usize {
        self.batches.len()
    }

    fn fill(&self, b: usize, out: &mut Vec<Row>) {
        let spec = self.batches[b];
        let t = &self.tenants[spec.tenant];
        for f in spec.start..spec.end {
            let (i, j) = (f / self.series, f % self.series);
            out.push((
                (spec.tenant * self.series + j) as i64,
                t.ts[j][i],
                t.values[j][i],
            ));
        }
    }

    fn points(&self) -> usize {
        MainData::points(self)
    }
}

/// The first `devices` devices of a fleet, `batch` points at a time, time-major.
struct FleetRows<'a> {
    fleet: &'a Fleet,
    devices: usize,
    batch: usize,
}

impl FleetRows<'_> {
    fn for_each(&self, b: usize, mut f: impl FnMut(usize, i64, f64)) {
        let total = self.points();
        for flat in b * self.batch..((b + 1) * self.batch).min(total) {
            let (k, d) = (flat / self.devices, flat % self.devices);
            f(
                d,
                self.fleet.ts(d, k),
                self.fleet.values[k * self.fleet.devices + d],
            );
        }
    }
}

impl Rows for FleetRows<'_> {
    fn batch_count(&self) -> usize {
        self.points().div_ceil(self.batch)
    }

    fn fill(&self, b: usize, out: &mut Vec<Row>) {
        self.for_each(b, |d, t, v| out.push((d as i64, t, v)));
    }

    fn points(&self) -> usize {
        self.devices * self.fleet.steps
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// An ingest phase.
#[derive(Debug, Clone, Default, Serialize)]
struct Ingest {
    points: u64,
    seconds: f64,
    points_per_s: f64,
    /// CPU of this process over the phase, in cores (the engine and the harness; for PostgreSQL
    /// only the client side).
    cpu_cores: f64,
    /// Latency of one write call (engine), transaction (SQLite) or COPY (PostgreSQL).
    call_p50_ms: f64,
    call_p99_ms: f64,
    call_max_ms: f64,
    rejected: u64,
    /// Time the ingest threads spent building `Point`s inside the timed loop (fleet only; the
    /// main dataset's points are built before timing).
    build_s: Option<f64>,
}

impl Ingest {
    fn finish(points: u64, wall: Duration, cpu: Duration, lat: &Latency) -> Ingest {
        let secs = wall.as_secs_f64().max(1e-9);
        Ingest {
            points,
            seconds: secs,
            points_per_s: points as f64 / secs,
            cpu_cores: cpu.as_secs_f64() / secs,
            call_p50_ms: lat.quantile_ms(0.5),
            call_p99_ms: lat.quantile_ms(0.99),
            call_max_ms: lat.max_ms(),
            rejected: 0,
            build_s: None,
        }
    }
}

/// Repeated runs of one query.
#[derive(Debug, Clone, Default, Serialize)]
struct Timing {
    runs: usize,
    median_ms: f64,
    /// Nearest-rank p99 (of 50 runs: the largest).
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
    /// Rows (points, buckets) the last run returned.
    rows: u64,
}

/// Runs `f` `warmup` times untimed, then `runs` times timed.
fn time_runs<T>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
    rows: impl Fn(&T) -> u64,
) -> anyhow::Result<(Timing, T)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = f()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        last = Some(r);
    }
    let Some(last) = last else { bail!("no run") };
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Ok((
        Timing {
            runs: ms.len(),
            median_ms: rank(0.5),
            p99_ms: rank(0.99),
            min_ms: ms[0],
            max_ms: ms[ms.len() - 1],
            rows: rows(&last),
        },
        last,
    ))
}

/// Where a tenant's (or a directory's) part bytes go.
#[derive(Debug, Clone, Default, Serialize)]
struct PartBytes {
    files: u64,
    bytes: u64,
    points: u64,
    series: u64,
    /// Timestamp blocks.
    ts: u64,
    /// Value blocks.
    values: u64,
    /// 1-minute rollups.
    minute: u64,
    /// 1-hour rollup table.
    hourly: u64,
    /// Header, index, footer.
    other: u64,
}

impl PartBytes {
    fn add(&mut self, o: &PartBytes) {
        self.files += o.files;
        self.bytes += o.bytes;
        self.points += o.points;
        self.series += o.series;
        self.ts += o.ts;
        self.values += o.values;
        self.minute += o.minute;
        self.hourly += o.hourly;
        self.other += o.other;
    }

    fn per_point(&self, v: u64) -> f64 {
        v as f64 / self.points.max(1) as f64
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "files": self.files,
            "bytes": self.bytes,
            "points": self.points,
            "series": self.series,
            "bytes_per_point": self.per_point(self.bytes),
            "ts_bpp": self.per_point(self.ts),
            "values_bpp": self.per_point(self.values),
            "minute_rollup_bpp": self.per_point(self.minute),
            "hourly_rollup_bpp": self.per_point(self.hourly),
            "index_bpp": self.per_point(self.other),
        })
    }
}

/// Reads every part file under `dir` (recursively) and sums its blocks by kind.
fn analyze_parts(dir: &Path) -> anyhow::Result<PartBytes> {
    let mut out = PartBytes::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            out.add(&analyze_parts(&path)?);
        } else if path.extension().is_some_and(|x| x == "part") {
            let (file, index) = PartFile::open(&path)
                .with_context(|| format!("reading the index of {}", path.display()))?;
            let mut p = PartBytes {
                files: 1,
                bytes: file.size(),
                series: index.series.len() as u64,
                ..PartBytes::default()
            };
            for s in &index.series {
                p.points += s.count;
                for c in &s.chunks {
                    p.ts += u64::from(c.ts.len);
                    p.values += u64::from(c.values.len);
                }
                p.minute += s.minute.map_or(0, |m| u64::from(m.len));
            }
            p.hourly = index.hourly.iter().map(|h| u64::from(h.block.len)).sum();
            p.other = p
                .bytes
                .saturating_sub(p.ts + p.values + p.minute + p.hourly);
            out.add(&p);
        }
    }
    Ok(out)
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A `/proc/self/status` field in MiB (`VmRSS`, `VmHWM`).
fn proc_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Gives freed heap back to the kernel, so that RSS shows live memory between phases.
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn progress(msg: &str) {
    eprintln!("[tsdb] {msg}");
}

/// Per-bucket (start ms, count, avg) of a fleet or single-series aggregate.
type Buckets = Vec<(i64, u64, f64)>;

/// The largest relative difference of two bucket lists' averages, or `None` if the buckets or
/// counts differ.
fn compare_buckets(a: &Buckets, b: &Buckets) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let mut worst: f64 = 0.0;
    for (x, y) in a.iter().zip(b) {
        if x.0 != y.0 || x.1 != y.1 {
            return None;
        }
        worst = worst.max((x.2 - y.2).abs() / x.2.abs().max(1e-12));
    }
    Some(worst)
}

/// Records a check: a difference within `tol`, or a failure message.
fn check(checks: &mut Vec<String>, what: &str, diff: Option<f64>, tol: f64) -> bool {
    match diff {
        Some(d) if d <= tol => true,
        Some(d) => {
            checks.push(format!("{what}: averages differ by {d:.3e} (relative)"));
            false
        }
        None => {
            checks.push(format!("{what}: buckets or counts differ"));
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The engine.

fn open_engine(dir: &Path, fsync: bool) -> anyhow::Result<Engine> {
    let cfg = EngineConfig {
        fsync,
        // The datasets are backdated (the main one to 2026-01-01): keep everything.
        default_retention_days: None,
        // Compaction is run and timed explicitly after each ingest, not in the background.
        maintenance_interval: Duration::from_secs(7 * 86_400),
        ..EngineConfig::new(dir)
    };
    Engine::open(cfg).with_context(|| format!("opening the engine in {}", dir.display()))
}

/// `threads` threads write their prepared calls; returns the ingest figures.
fn engine_ingest_prepared(
    engine: &Engine,
    work: Vec<Vec<(TenantId, Vec<Point>)>>,
) -> anyhow::Result<Ingest> {
    let points: u64 = work.iter().flatten().map(|(_, p)| p.len() as u64).sum();
    let barrier = Barrier::new(work.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|calls| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<(Latency, u64)> {
                    barrier.wait();
                    let mut lat = Latency::new(3)?;
                    let mut rejected = 0u64;
                    for (tenant, pts) in calls {
                        let t = Instant::now();
                        let summary = engine.write_blocking(&tenant, pts)?;
                        lat.record_ns(t.elapsed().as_nanos() as u64);
                        rejected += summary.rejected.len() as u64;
                    }
                    Ok((lat, rejected))
                })
            })
            .collect();
        barrier.wait();
        let (t0, cpu0) = (Instant::now(), sys::self_cpu());
        let mut lat = Latency::new(3)?;
        let mut rejected = 0;
        for h in handles {
            let (l, r) = h
                .join()
                .map_err(|_| anyhow::anyhow!("an ingest thread panicked"))??;
            lat.merge(&l);
            rejected += r;
        }
        let mut out = Ingest::finish(points, t0.elapsed(), sys::self_cpu() - cpu0, &lat);
        out.rejected = rejected;
        Ok(out)
    })
}

/// Writes the first `rows.devices` devices of the fleet, building points inside the loop.
fn engine_ingest_fleet(
    engine: &Engine,
    tenant: &TenantId,
    rows: &FleetRows<'_>,
    threads: usize,
) -> anyhow::Result<Ingest> {
    let batches = rows.batch_count();
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<(Latency, u64, Duration)> {
                    barrier.wait();
                    let mut lat = Latency::new(3)?;
                    let mut rejected = 0u64;
                    let mut build = Duration::ZERO;
                    for b in (k..batches).step_by(threads) {
                        let t = Instant::now();
                        let mut pts = Vec::with_capacity(rows.batch);
                        rows.for_each(b, |d, ts, v| {
                            pts.push(Point {
                                device: rows.fleet.names[d].clone(),
                                metric: "temperature".to_string(),
                                ts_ms: ts,
                                value: Value::Float(v),
                            })
                        });
                        let t1 = Instant::now();
                        build += t1 - t;
                        let summary = engine.write_blocking(tenant, pts)?;
                        lat.record_ns(t1.elapsed().as_nanos() as u64);
                        rejected += summary.rejected.len() as u64;
                    }
                    Ok((lat, rejected, build))
                })
            })
            .collect();
        barrier.wait();
        let (t0, cpu0) = (Instant::now(), sys::self_cpu());
        let mut lat = Latency::new(3)?;
        let mut rejected = 0;
        let mut build = Duration::ZERO;
        for h in handles {
            let (l, r, b) = h
                .join()
                .map_err(|_| anyhow::anyhow!("an ingest thread panicked"))??;
            lat.merge(&l);
            rejected += r;
            build += b;
        }
        let mut out = Ingest::finish(
            rows.points() as u64,
            t0.elapsed(),
            sys::self_cpu() - cpu0,
            &lat,
        );
        out.rejected = rejected;
        out.build_s = Some(build.as_secs_f64());
        Ok(out)
    })
}

/// The engine's counters over a phase.
#[derive(Debug, Clone, Default, Serialize)]
struct Counters {
    wal_commits: u64,
    wal_bytes: u64,
    /// Head flushes (background, when the head reached `head_max_points`).
    flushes: u64,
    /// Time the flusher thread spent sealing heads, seconds.
    flush_s: f64,
}

impl Counters {
    fn read(engine: &Engine) -> Counters {
        let s = engine.stats();
        let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Counters {
            wal_commits: r(&s.wal_commits),
            wal_bytes: r(&s.wal_bytes),
            flushes: r(&s.flushes),
            flush_s: r(&s.flush_millis) as f64 / 1000.0,
        }
    }

    fn since(&self, before: &Counters) -> Counters {
        Counters {
            wal_commits: self.wal_commits - before.wal_commits,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            flushes: self.flushes - before.flushes,
            flush_s: self.flush_s - before.flush_s,
        }
    }
}

/// Flush and compaction after an ingest, timed.
#[derive(Debug, Clone, Default, Serialize)]
struct Seal {
    flush_s: f64,
    compact_s: f64,
    merges: u64,
    parts: usize,
}

fn seal(engine: &Engine) -> anyhow::Result<Seal> {
    let t = Instant::now();
    engine.flush_blocking().context("flushing the engine")?;
    let flush_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let merges = engine.compact(true).context("compacting")?;
    Ok(Seal {
        flush_s,
        compact_s: t.elapsed().as_secs_f64(),
        merges,
        parts: engine.parts_summary().0,
    })
}

fn engine_buckets(groups: &[ferrohub_tsdb::GroupBuckets]) -> Buckets {
    groups
        .first()
        .map(|g| {
            g.buckets
                .iter()
                .map(|(t, a)| (*t, a.count, a.get(AggFn::Avg)))
                .collect()
        })
        .unwrap_or_default()
}

fn hourly_avg(
    engine: &Engine,
    tenant: &TenantId,
    metric: &str,
    devices: &[String],
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<ferrohub_tsdb::GroupBuckets>> {
    Ok(engine.aggregate(
        tenant,
        &AggregateQuery {
            metric: metric.into(),
            groups: vec![SeriesGroup {
                name: "all".into(),
                devices: devices.to_vec(),
            }],
            from,
            to,
            bucket_ms: HOUR_MS,
            fns: vec![AggFn::Avg],
        },
    )?)
}

/// The per-device fleet query, in chunks of devices (the engine caps buckets × groups).
fn per_device(
    engine: &Engine,
    tenant: &TenantId,
    devices: &[String],
    from: i64,
    to: i64,
) -> anyhow::Result<u64> {
    let mut buckets = 0u64;
    for chunk in devices.chunks(PER_DEVICE_CHUNK) {
        let groups = chunk
            .iter()
            .map(|d| SeriesGroup {
                name: d.clone(),
                devices: vec![d.clone()],
            })
            .collect();
        let r = engine.aggregate(
            tenant,
            &AggregateQuery {
                metric: "temperature".into(),
                groups,
                from,
                to,
                bucket_ms: HOUR_MS,
                fns: vec![AggFn::Avg],
            },
        )?;
        buckets += r.iter().map(|g| g.buckets.len() as u64).sum::<u64>();
    }
    Ok(buckets)
}

/// The fleet query windows: `(from, to)` ending "now" (the last sample + 1 ms) and the same
/// aligned to whole hours.
fn fleet_windows(fleet: &Fleet, days: u32) -> ((i64, i64), (i64, i64)) {
    let span = i64::from(days) * DAY_MS;
    let to = fleet.end_ms + 1;
    let aligned_to = (fleet.end_ms + 1 + HOUR_MS - 1).div_euclid(HOUR_MS) * HOUR_MS;
    ((to - span, to), (aligned_to - span, aligned_to))
}

// ---------------------------------------------------------------------------------------------
// SQL engines.

/// Inserts batches (one transaction each) into SQLite.
fn sqlite_ingest(
    conn: &rusqlite::Connection,
    table: &str,
    rows: &dyn Rows,
) -> anyhow::Result<Ingest> {
    let mut stmt = conn.prepare(&format!(
        "INSERT INTO {table} (series, ts, value) VALUES (?1, ?2, ?3)"
    ))?;
    let mut lat = Latency::new(3)?;
    let mut buf = Vec::new();
    let (t0, cpu0) = (Instant::now(), sys::self_cpu());
    for b in 0..rows.batch_count() {
        buf.clear();
        rows.fill(b, &mut buf);
        let t = Instant::now();
        conn.execute_batch("BEGIN")?;
        for &(s, ts, v) in &buf {
            stmt.execute(rusqlite::params![s, ts, v])?;
        }
        conn.execute_batch("COMMIT")?;
        lat.record_ns(t.elapsed().as_nanos() as u64);
    }
    Ok(Ingest::finish(
        rows.points() as u64,
        t0.elapsed(),
        sys::self_cpu() - cpu0,
        &lat,
    ))
}

fn sqlite_open(path: &Path, table: &str, fsync: bool) -> anyhow::Result<rusqlite::Connection> {
    let _ = std::fs::remove_file(path);
    let conn =
        rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA cache_size = -262144; \
         PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 16384; \
         PRAGMA mmap_size = 1073741824; \
         CREATE TABLE {table} (series INTEGER NOT NULL, ts INTEGER NOT NULL, \
         value REAL NOT NULL, PRIMARY KEY (series, ts)) WITHOUT ROWID;",
        if fsync { "FULL" } else { "NORMAL" }
    ))?;
    Ok(conn)
}

/// Checkpoints and truncates the WAL; returns (seconds, database bytes).
fn sqlite_checkpoint(conn: &rusqlite::Connection, path: &Path) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    let secs = t.elapsed().as_secs_f64();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Ok((secs, file_size(path) + file_size(Path::new(&wal))))
}

fn sqlite_buckets(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> anyhow::Result<Buckets> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| {
        Ok((
            r.get::<_, i64>(0)? * HOUR_MS,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, f64>(2)?,
        ))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn pg_connect(url: &str, fsync: bool) -> anyhow::Result<postgres::Client> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)
        .with_context(|| format!("connecting to PostgreSQL at {url:?}"))?;
    if !fsync {
        c.batch_execute("SET synchronous_commit = off")?;
    }
    Ok(c)
}

fn pg_create(c: &mut postgres::Client, table: &str) -> anyhow::Result<()> {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (series integer NOT NULL, \
         ts bigint NOT NULL, value double precision NOT NULL, PRIMARY KEY (series, ts));"
    ))?;
    Ok(())
}

/// Encodes rows as one binary COPY stream.
fn copy_binary(rows: &[Row], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    for &(s, t, v) in rows {
        out.extend_from_slice(&3i16.to_be_bytes());
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&(s as i32).to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// COPYs batches into PostgreSQL over `threads` connections (each COPY its own transaction).
fn pg_ingest(
    url: &str,
    fsync: bool,
    table: &str,
    rows: &dyn Rows,
    threads: usize,
) -> anyhow::Result<Ingest> {
    let barrier = Barrier::new(threads + 1);
    let sql = format!("COPY {table} (series, ts, value) FROM STDIN (FORMAT binary)");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let (barrier, sql) = (&barrier, &sql);
                s.spawn(move || -> anyhow::Result<Latency> {
                    let client = pg_connect(url, fsync);
                    barrier.wait();
                    let mut client = client?;
                    let mut lat = Latency::new(3)?;
                    let (mut buf, mut bytes) = (Vec::new(), Vec::new());
                    for b in (k..rows.batch_count()).step_by(threads) {
                        buf.clear();
                        rows.fill(b, &mut buf);
                        copy_binary(&buf, &mut bytes);
                        let t = Instant::now();
                        let mut w = client.copy_in(sql.as_str())?;
                        w.write_all(&bytes)?;
                        w.finish()?;
                        lat.record_ns(t.elapsed().as_nanos() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        barrier.wait();
        let (t0, cpu0) = (Instant::now(), sys::self_cpu());
        let mut lat = Latency::new(3)?;
        for h in handles {
            lat.merge(
                &h.join()
                    .map_err(|_| anyhow::anyhow!("a COPY thread panicked"))??,
            );
        }
        Ok(Ingest::finish(
            rows.points() as u64,
            t0.elapsed(),
            sys::self_cpu() - cpu0,
            &lat,
        ))
    })
}

/// `VACUUM ANALYZE` (timed) and the table's total size (heap + primary key + the rest).
fn pg_finish(c: &mut postgres::Client, table: &str) -> anyhow::Result<(f64, u64, u64, u64)> {
    let t = Instant::now();
    c.batch_execute(&format!("VACUUM ANALYZE {table}"))?;
    let secs = t.elapsed().as_secs_f64();
    let row = c.query_one(
        &format!(
            "SELECT pg_total_relation_size('{table}'), pg_relation_size('{table}'), \
             pg_indexes_size('{table}')"
        ),
        &[],
    )?;
    let total: i64 = row.get(0);
    let heap: i64 = row.get(1);
    let index: i64 = row.get(2);
    Ok((secs, total as u64, heap as u64, index as u64))
}

fn pg_buckets(
    c: &mut postgres::Client,
    stmt: &postgres::Statement,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> anyhow::Result<Buckets> {
    Ok(c.query(stmt, params)?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) * HOUR_MS,
                r.get::<_, i64>(1) as u64,
                r.get::<_, f64>(2),
            )
        })
        .collect())
}

fn pg_settings(c: &mut postgres::Client) -> anyhow::Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    let version: String = c.query_one("SHOW server_version", &[])?.get(0);
    m.insert("server_version".into(), json!(version));
    for r in c.query(
        "SELECT name, current_setting(name) FROM pg_settings WHERE name IN \
         ('shared_buffers', 'work_mem', 'maintenance_work_mem', 'max_wal_size', \
         'checkpoint_timeout', 'synchronous_commit', 'fsync', 'full_page_writes', 'wal_level', \
         'wal_compression', 'max_parallel_workers_per_gather', 'jit', 'effective_cache_size')",
        &[],
    )? {
        let (k, v): (String, String) = (r.get(0), r.get(1));
        m.insert(k, json!(v));
    }
    Ok(serde_json::Value::Object(m))
}

// ---------------------------------------------------------------------------------------------
// The run.

/// What the single-series queries ask, in every engine.
struct SeriesQuery {
    /// Global series number (SQL) and its tenant/device (engine).
    series: i64,
    tenant: usize,
    tenant_name: String,
    device: String,
    metric: &'static str,
    from: i64,
    to: i64,
    /// Expected points and hourly buckets, from the generated data.
    points: Vec<(i64, f64)>,
    buckets: Buckets,
}

impl SeriesQuery {
    fn new(main: &MainData) -> SeriesQuery {
        // Temperature, jittered timestamps, first series.
        let tenant = main
            .tenants
            .iter()
            .position(|t| t.profile == Profile::Temperature && t.jitter)
            .unwrap_or(0);
        let t = &main.tenants[tenant];
        let (from, to) = (MAIN_DAY0_MS, MAIN_DAY0_MS + DAY_MS);
        let points: Vec<(i64, f64)> = t.ts[0]
            .iter()
            .zip(&t.values[0])
            .filter(|(ts, _)| **ts >= from && **ts < to)
            .map(|(ts, v)| (*ts, *v))
            .collect();
        let mut buckets: Buckets = Vec::new();
        for &(ts, v) in &points {
            let b = ts.div_euclid(HOUR_MS) * HOUR_MS;
            match buckets.last_mut() {
                Some(last) if last.0 == b => {
                    last.1 += 1;
                    last.2 += v;
                }
                _ => buckets.push((b, 1, v)),
            }
        }
        for b in &mut buckets {
            b.2 /= b.1 as f64;
        }
        SeriesQuery {
            series: (tenant * main.series) as i64,
            tenant,
            tenant_name: t.name.clone(),
            device: t.devices[0].clone(),
            metric: t.profile.metric(),
            from,
            to,
            points,
            buckets,
        }
    }
}

/// Runs the benchmark; one JSON line goes to stdout, a table to stderr.
pub fn run(p: &TsdbBenchParams) -> anyhow::Result<()> {
    let (dir, temporary) = match &p.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "ferrohub-tsdb-bench-{}-{}",
                std::process::id(),
                now_ms()
            )),
            true,
        ),
    };
    for sub in ["engine", "sqlite"] {
        let d = dir.join(sub);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("clearing {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(dir.join("sqlite"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(p, &dir);
    if temporary && !p.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        progress(&format!("data kept in {}", dir.display()));
    }
    result
}

fn run_in(p: &TsdbBenchParams, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_start = load_average();
    let mut checks: Vec<String> = Vec::new();
    let threads = p.threads;

    // 1. Generate.
    let t = Instant::now();
    let main = MainData::generate(p.series_per_tenant, p.points_per_series, p.batch, threads);
    let fleet = Fleet::generate(p.fleet_devices, p.fleet_days, p.fleet_interval_s, threads);
    let generate_s = t.elapsed().as_secs_f64();
    progress(&format!(
        "generated {} main points ({} tenants × {} series × {}) and {} fleet points ({} devices × {} samples) in {generate_s:.1} s",
        main.points(),
        main.tenants.len(),
        main.series,
        main.points_per_series,
        fleet.values.len(),
        fleet.devices,
        fleet.steps
    ));
    let sq = SeriesQuery::new(&main);

    // 2. The engine: main dataset.
    let engine_dir = dir.join("engine");
    let engine = open_engine(&engine_dir, p.fsync)?;
    trim_heap();
    let rss_base = proc_mib("VmRSS:");
    let t = Instant::now();
    let work = main.build_points(threads);
    let build_s = t.elapsed().as_secs_f64();
    progress(&format!(
        "built {} write calls in {build_s:.1} s; ingesting with {threads} threads",
        main.batches.len()
    ));
    let c0 = Counters::read(&engine);
    let e_ingest = engine_ingest_prepared(&engine, work)?;
    let e_counters = Counters::read(&engine).since(&c0);
    let wal_commits = e_counters.wal_commits;
    progress(&format!(
        "engine ingest: {:.0} points/s ({:.1} s, {:.2} cores, {} WAL group commits)",
        e_ingest.points_per_s, e_ingest.seconds, e_ingest.cpu_cores, wal_commits
    ));
    if e_ingest.rejected > 0 {
        checks.push(format!("engine rejected {} points", e_ingest.rejected));
    }
    let e_seal = seal(&engine)?;
    progress(&format!(
        "flush {:.2} s, compaction {:.2} s ({} merges, {} parts)",
        e_seal.flush_s, e_seal.compact_s, e_seal.merges, e_seal.parts
    ));
    trim_heap();
    let rss_after_main = proc_mib("VmRSS:");
    let (parts, part_bytes) = engine.parts_summary();
    let part_points = engine.part_points();
    if part_points != main.points() as u64 {
        checks.push(format!(
            "engine holds {part_points} points in parts, {} were written",
            main.points()
        ));
    }
    let mut tenants_json = Vec::new();
    let mut by_tenant: Vec<PartBytes> = Vec::new();
    for t in &main.tenants {
        let b = analyze_parts(&engine_dir.join("parts").join(&t.name))?;
        let mut row = b.json();
        if let Some(o) = row.as_object_mut() {
            o.insert("tenant".into(), json!(t.name));
            o.insert("profile".into(), json!(t.profile.describe()));
            o.insert(
                "timestamps".into(),
                json!(if t.jitter {
                    "jittered ±20 ms"
                } else {
                    "regular 1 s"
                }),
            );
        }
        tenants_json.push(row);
        by_tenant.push(b);
    }
    // The four profiles evenly mixed, with vibration at one resolution or the other.
    let mix = |jitter: bool, vib: Profile| {
        let mut sum = PartBytes::default();
        for (t, b) in main.tenants.iter().zip(&by_tenant) {
            let profile_in = t.profile == vib
                || matches!(
                    t.profile,
                    Profile::Temperature | Profile::Counter | Profile::Status
                );
            if t.jitter == jitter && profile_in {
                sum.add(b);
            }
        }
        sum.json()
    };
    let mixes = json!({
        "regular": mix(false, Profile::Vibration3),
        "jittered": mix(true, Profile::Vibration3),
        "regular_vib_0_01": mix(false, Profile::Vibration2),
        "jittered_vib_0_01": mix(true, Profile::Vibration2),
    });

    // Queries.
    let tenant = main.tenants[sq.tenant].tenant.clone();
    let raw_q = RawQuery {
        device: sq.device.clone(),
        metric: sq.metric.into(),
        from: sq.from,
        to: sq.to,
        limit: RAW_LIMIT,
        descending: false,
    };
    let (e_raw, page) = time_runs(
        3,
        SERIES_RUNS,
        || Ok(engine.raw(&tenant, &raw_q)?),
        |p| p.points.len() as u64,
    )?;
    let raw_ok = page.points.len() == sq.points.len()
        && page
            .points
            .iter()
            .zip(&sq.points)
            .all(|((t, v), (et, ev))| t == et && v.as_f64() == Some(*ev));
    if !raw_ok {
        checks.push("engine raw query differs from the generated series".into());
    }
    let day_devices = [sq.device.clone()];
    let (e_agg, groups) = time_runs(
        3,
        SERIES_RUNS,
        || hourly_avg(&engine, &tenant, sq.metric, &day_devices, sq.from, sq.to),
        |g| g.first().map_or(0, |g| g.buckets.len() as u64),
    )?;
    let e_day_buckets = engine_buckets(&groups);
    check(
        &mut checks,
        "engine 1-day hourly avg vs generated",
        compare_buckets(&sq.buckets, &e_day_buckets),
        1e-9,
    );
    progress(&format!(
        "engine raw day: median {:.2} ms, p99 {:.2} ms ({} points); 1 h buckets: median {:.2} ms",
        e_raw.median_ms, e_raw.p99_ms, e_raw.rows, e_agg.median_ms
    ));

    // 3. SQLite: main dataset.
    let mut sqlite_json = serde_json::Value::Null;
    let sqlite_main = dir.join("sqlite").join("points.db");
    if p.sqlite {
        progress("SQLite: ingesting the main dataset (one transaction per batch)");
        let conn = sqlite_open(&sqlite_main, "points", p.fsync)?;
        let ing = sqlite_ingest(&conn, "points", &main)?;
        let (ckpt_s, bytes) = sqlite_checkpoint(&conn, &sqlite_main)?;
        progress(&format!(
            "SQLite ingest: {:.0} points/s ({:.1} s); {:.2} B/point",
            ing.points_per_s,
            ing.seconds,
            bytes as f64 / main.points() as f64
        ));
        let raw_sql = "SELECT ts, value FROM points WHERE series = ?1 AND ts >= ?2 AND ts < ?3 \
                       ORDER BY ts LIMIT 100000";
        let (raw, rows) = time_runs(
            3,
            SERIES_RUNS,
            || {
                let mut stmt = conn.prepare_cached(raw_sql)?;
                let rows = stmt.query_map(rusqlite::params![sq.series, sq.from, sq.to], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            },
            |r| r.len() as u64,
        )?;
        if rows != sq.points {
            checks.push("SQLite raw query differs from the generated series".into());
        }
        let agg_sql = "SELECT ts / 3600000 AS b, count(*), avg(value) FROM points \
                       WHERE series = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY b ORDER BY b";
        let (agg, buckets) = time_runs(
            3,
            SERIES_RUNS,
            || sqlite_buckets(&conn, agg_sql, &[&sq.series, &sq.from, &sq.to]),
            |b| b.len() as u64,
        )?;
        check(
            &mut checks,
            "SQLite 1-day hourly avg vs generated",
            compare_buckets(&sq.buckets, &buckets),
            1e-9,
        );
        sqlite_json = json!({
            "version": rusqlite::version(),
            "settings": format!(
                "journal_mode=WAL, synchronous={}, page_size=4096, cache_size=256MiB, mmap_size=1GiB, temp_store=MEMORY, wal_autocheckpoint=16384 pages; prepared INSERT, one transaction per batch; WITHOUT ROWID, PRIMARY KEY (series, ts)",
                if p.fsync { "FULL" } else { "NORMAL" }
            ),
            "ingest": ing,
            "checkpoint_s": ckpt_s,
            "bytes": bytes,
            "bytes_per_point": bytes as f64 / main.points() as f64,
            "raw_day": raw,
            "agg_day": agg,
        });
    }

    // 4. PostgreSQL: main dataset.
    let mut pg_json = serde_json::Value::Null;
    if let Some(url) = &p.postgres {
        progress("PostgreSQL: ingesting the main dataset (binary COPY per batch)");
        let mut c = pg_connect(url, p.fsync)?;
        let settings = pg_settings(&mut c)?;
        pg_create(&mut c, "bench_points")?;
        let ing = pg_ingest(url, p.fsync, "bench_points", &main, threads)?;
        let (vacuum_s, total, heap, index) = pg_finish(&mut c, "bench_points")?;
        progress(&format!(
            "PostgreSQL ingest: {:.0} points/s ({:.1} s); {:.2} B/point",
            ing.points_per_s,
            ing.seconds,
            total as f64 / main.points() as f64
        ));
        let raw_stmt = c.prepare(
            "SELECT ts, value FROM bench_points WHERE series = $1 AND ts >= $2 AND ts < $3 \
             ORDER BY ts LIMIT 100000",
        )?;
        let series32 = sq.series as i32;
        let (raw, rows) = time_runs(
            3,
            SERIES_RUNS,
            || {
                Ok(c.query(&raw_stmt, &[&series32, &sq.from, &sq.to])?
                    .iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1)))
                    .collect::<Vec<_>>())
            },
            |r| r.len() as u64,
        )?;
        if rows != sq.points {
            checks.push("PostgreSQL raw query differs from the generated series".into());
        }
        let agg_stmt = c.prepare(
            "SELECT ts / 3600000 AS b, count(*), avg(value) FROM bench_points \
             WHERE series = $1 AND ts >= $2 AND ts < $3 GROUP BY b ORDER BY b",
        )?;
        let (agg, buckets) = time_runs(
            3,
            SERIES_RUNS,
            || pg_buckets(&mut c, &agg_stmt, &[&series32, &sq.from, &sq.to]),
            |b| b.len() as u64,
        )?;
        check(
            &mut checks,
            "PostgreSQL 1-day hourly avg vs generated",
            compare_buckets(&sq.buckets, &buckets),
            1e-9,
        );
        pg_json = json!({
            "settings": settings,
            "method": "COPY FROM STDIN (FORMAT binary), one COPY (transaction) per batch, one connection per thread; VACUUM ANALYZE after the load; PRIMARY KEY (series, ts)",
            "ingest": ing,
            "vacuum_analyze_s": vacuum_s,
            "bytes": total,
            "heap_bytes": heap,
            "index_bytes": index,
            "bytes_per_point": total as f64 / main.points() as f64,
            "raw_day": raw,
            "agg_day": agg,
        });
        c.batch_execute("DROP TABLE bench_points")?;
    }
    drop(main);
    if p.sqlite {
        let _ = std::fs::remove_file(&sqlite_main);
    }

    // 5. Fleet size of the side-by-side comparison.
    let sql = p.sqlite || p.postgres.is_some();
    let (cmp_devices, cmp_reason) = match p.compare_fleet_devices {
        Some(n) => (n.min(fleet.devices), "--compare-fleet-devices".to_string()),
        None if sql && fleet.devices > SCALED_FLEET_DEVICES => (
            SCALED_FLEET_DEVICES,
            format!(
                "default with SQL engines: {SCALED_FLEET_DEVICES} devices (SQLite loads a 10,000-device fleet time-major at about 50,000 rows/s once it outgrows its cache)"
            ),
        ),
        None => (fleet.devices, "whole fleet".to_string()),
    };
    let ((from_u, to_u), (from_a, to_a)) = fleet_windows(&fleet, p.fleet_days);

    // 6. The engine: fleet (whole, and the comparison subset in its own tenant).
    trim_heap();
    let rss_before_fleet = proc_mib("VmRSS:");
    let fleet_tenant = TenantId::new("fleet");
    let rows_all = FleetRows {
        fleet: &fleet,
        devices: fleet.devices,
        batch: p.batch,
    };
    progress(&format!(
        "engine: ingesting the fleet ({} devices × {} samples at {} s)",
        fleet.devices, fleet.steps, p.fleet_interval_s
    ));
    let c0 = Counters::read(&engine);
    let f_ingest = engine_ingest_fleet(&engine, &fleet_tenant, &rows_all, threads)?;
    let f_counters = Counters::read(&engine).since(&c0);
    progress(&format!(
        "engine fleet ingest: {:.0} points/s ({:.1} s, {:.1} s of it building points; {} head flushes took the flusher {:.1} s)",
        f_ingest.points_per_s,
        f_ingest.seconds,
        f_ingest.build_s.unwrap_or(0.0),
        f_counters.flushes,
        f_counters.flush_s
    ));
    let f_seal = seal(&engine)?;
    trim_heap();
    let rss_after_fleet = proc_mib("VmRSS:");
    let f_bytes = analyze_parts(&engine_dir.join("parts").join("fleet"))?;
    let expected_u = fleet.expected(fleet.devices, from_u, to_u);
    let expected_a = fleet.expected(fleet.devices, from_a, to_a);
    let avg =
        |e: &Buckets| -> Buckets { e.iter().map(|(t, c, s)| (*t, *c, s / *c as f64)).collect() };
    // Times the all-devices hourly average over [from, to) and checks it against `expected`.
    let mut timed_avg = |from: i64, to: i64, expected: &Buckets, window: &str| {
        let (timing, r) = time_runs(
            1,
            FLEET_RUNS,
            || {
                hourly_avg(
                    &engine,
                    &fleet_tenant,
                    "temperature",
                    &fleet.names,
                    from,
                    to,
                )
            },
            |g| g.first().map_or(0, |g| g.buckets.len() as u64),
        )?;
        check(
            &mut checks,
            &format!("engine fleet hourly avg ({window} window) vs generated"),
            compare_buckets(&avg(expected), &engine_buckets(&r)),
            1e-9,
        );
        anyhow::Ok(timing)
    };
    let fq_u = timed_avg(from_u, to_u, &expected_u, "now-aligned")?;
    let fq_a = timed_avg(from_a, to_a, &expected_a, "hour-aligned")?;
    let (fq_pd, _) = time_runs(
        0,
        PER_DEVICE_RUNS,
        || per_device(&engine, &fleet_tenant, &fleet.names, from_u, to_u),
        |n| *n,
    )?;
    progress(&format!(
        "engine fleet query ({} devices, 1 h avg, {} days): median {:.1} ms (hour-aligned {:.1} ms); per device {:.1} ms",
        fleet.devices, p.fleet_days, fq_u.median_ms, fq_a.median_ms, fq_pd.median_ms
    ));
    let fleet_full_json = json!({
        "devices": fleet.devices,
        "ingest": f_ingest,
        "during_ingest": f_counters,
        "seal": f_seal,
        "parts": f_bytes.json(),
        "query": fq_u,
        "query_hour_aligned": fq_a,
        "per_device": fq_pd,
        "rss_mib_after": rss_after_fleet,
        "rss_mib_growth": rss_after_fleet - rss_before_fleet,
    });

    // The comparison fleet in the engine.
    let cmp_names = &fleet.names[..cmp_devices];
    let rows_cmp = FleetRows {
        fleet: &fleet,
        devices: cmp_devices,
        batch: p.batch,
    };
    let expected_cmp = avg(&fleet.expected(cmp_devices, from_u, to_u));
    let cmp_tenant = if cmp_devices < fleet.devices {
        TenantId::new("fleet-cmp")
    } else {
        fleet_tenant.clone()
    };
    let mut cmp_engine = json!({});
    let mut cmp_engine_buckets = Buckets::new();
    if cmp_devices < fleet.devices {
        progress(&format!(
            "engine: ingesting the comparison fleet ({cmp_devices} devices)"
        ));
        let ing = engine_ingest_fleet(&engine, &cmp_tenant, &rows_cmp, threads)?;
        let s = seal(&engine)?;
        let b = analyze_parts(&engine_dir.join("parts").join("fleet-cmp"))?;
        cmp_engine = json!({"ingest": ing, "seal": s, "parts": b.json(), "bytes_per_point": b.per_point(b.bytes)});
    } else if let Some(o) = cmp_engine.as_object_mut() {
        o.insert("ingest".into(), json!(f_ingest));
        o.insert("seal".into(), json!(f_seal));
        o.insert("parts".into(), f_bytes.json());
        o.insert(
            "bytes_per_point".into(),
            json!(f_bytes.per_point(f_bytes.bytes)),
        );
    }
    let (cq, r) = time_runs(
        1,
        FLEET_RUNS,
        || hourly_avg(&engine, &cmp_tenant, "temperature", cmp_names, from_u, to_u),
        |g| g.first().map_or(0, |g| g.buckets.len() as u64),
    )?;
    cmp_engine_buckets.extend(engine_buckets(&r));
    check(
        &mut checks,
        "engine comparison-fleet hourly avg vs generated",
        compare_buckets(&expected_cmp, &cmp_engine_buckets),
        1e-9,
    );
    let (cpd, _) = time_runs(
        0,
        PER_DEVICE_RUNS,
        || per_device(&engine, &cmp_tenant, cmp_names, from_u, to_u),
        |n| *n,
    )?;
    if let Some(o) = cmp_engine.as_object_mut() {
        o.insert("query".into(), json!(cq));
        o.insert("per_device".into(), json!(cpd));
    }

    // 7. SQLite and PostgreSQL: the comparison fleet.
    let mut cmp_sqlite = serde_json::Value::Null;
    if p.sqlite {
        progress(&format!(
            "SQLite: ingesting the comparison fleet ({cmp_devices} devices)"
        ));
        let path = dir.join("sqlite").join("fleet.db");
        let conn = sqlite_open(&path, "fleet", p.fsync)?;
        let ing = sqlite_ingest(&conn, "fleet", &rows_cmp)?;
        let (_, bytes) = sqlite_checkpoint(&conn, &path)?;
        let sql = "SELECT ts / 3600000 AS b, count(*), avg(value) FROM fleet \
                   WHERE ts >= ?1 AND ts < ?2 GROUP BY b ORDER BY b";
        let (q, b) = time_runs(
            1,
            FLEET_RUNS,
            || sqlite_buckets(&conn, sql, &[&from_u, &to_u]),
            |b| b.len() as u64,
        )?;
        check(
            &mut checks,
            "SQLite comparison-fleet hourly avg vs generated",
            compare_buckets(&expected_cmp, &b),
            1e-9,
        );
        let pd_sql = "SELECT series, ts / 3600000 AS b, avg(value) FROM fleet \
                      WHERE ts >= ?1 AND ts < ?2 GROUP BY series, b";
        let (pd, _) = time_runs(
            0,
            PER_DEVICE_RUNS,
            || {
                let mut stmt = conn.prepare_cached(pd_sql)?;
                let mut rows = stmt.query(rusqlite::params![from_u, to_u])?;
                let mut n = 0u64;
                while rows.next()?.is_some() {
                    n += 1;
                }
                Ok(n)
            },
            |n| *n,
        )?;
        cmp_sqlite = json!({
            "ingest": ing,
            "bytes": bytes,
            "bytes_per_point": bytes as f64 / rows_cmp.points() as f64,
            "query": q,
            "per_device": pd,
        });
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }
    let mut cmp_pg = serde_json::Value::Null;
    if let Some(url) = &p.postgres {
        progress(&format!(
            "PostgreSQL: ingesting the comparison fleet ({cmp_devices} devices)"
        ));
        let mut c = pg_connect(url, p.fsync)?;
        pg_create(&mut c, "bench_fleet")?;
        let ing = pg_ingest(url, p.fsync, "bench_fleet", &rows_cmp, threads)?;
        let (vacuum_s, total, _, _) = pg_finish(&mut c, "bench_fleet")?;
        let stmt = c.prepare(
            "SELECT ts / 3600000 AS b, count(*), avg(value) FROM bench_fleet \
             WHERE ts >= $1 AND ts < $2 GROUP BY b ORDER BY b",
        )?;
        let (q, b) = time_runs(
            1,
            FLEET_RUNS,
            || pg_buckets(&mut c, &stmt, &[&from_u, &to_u]),
            |b| b.len() as u64,
        )?;
        check(
            &mut checks,
            "PostgreSQL comparison-fleet hourly avg vs generated",
            compare_buckets(&expected_cmp, &b),
            1e-9,
        );
        let pd_stmt = c.prepare(
            "SELECT series, ts / 3600000 AS b, avg(value) FROM bench_fleet \
             WHERE ts >= $1 AND ts < $2 GROUP BY series, b",
        )?;
        let (pd, _) = time_runs(
            0,
            PER_DEVICE_RUNS,
            || Ok(c.query(&pd_stmt, &[&from_u, &to_u])?.len() as u64),
            |n| *n,
        )?;
        cmp_pg = json!({
            "ingest": ing,
            "vacuum_analyze_s": vacuum_s,
            "bytes": total,
            "bytes_per_point": total as f64 / rows_cmp.points() as f64,
            "query": q,
            "per_device": pd,
        });
        c.batch_execute("DROP TABLE bench_fleet")?;
    }

    let hwm = proc_mib("VmHWM:");
    let t = Instant::now();
    engine.close();
    let close_s = t.elapsed().as_secs_f64();

    let engine_json = json!({
        "ingest": e_ingest,
        "points_built_s": build_s,
        "during_ingest": e_counters,
        "points_per_wal_commit": e_ingest.points as f64 / wal_commits.max(1) as f64,
        "seal": e_seal,
        "parts": parts,
        "bytes": part_bytes,
        "points": part_points,
        "bytes_per_point": part_bytes as f64 / part_points.max(1) as f64,
        "tenants": tenants_json,
        "mix": mixes,
        "raw_day": e_raw,
        "agg_day": e_agg,
        "close_s": close_s,
        "rss_mib": {
            "base_before_points": rss_base,
            "after_main": rss_after_main,
            "main_growth": rss_after_main - rss_base,
            "vm_hwm": hwm,
        },
    });
    let line = json!({
        "scenario": "tsdb",
        "label": p.label,
        "unix_time": now_ms() / 1000,
        "load_average_at_start": load_start,
        "total_s": started.elapsed().as_secs_f64(),
        "config": {
            "series": main_series(p),
            "series_per_tenant": p.series_per_tenant,
            "tenants": TENANTS,
            "points_per_series": p.points_per_series,
            "points": main_series(p) * p.points_per_series,
            "batch": p.batch,
            "threads": threads,
            "fsync": p.fsync,
            "generate_s": generate_s,
            "fleet_devices": fleet.devices,
            "fleet_days": p.fleet_days,
            "fleet_interval_s": p.fleet_interval_s,
            "fleet_points": fleet.values.len(),
            "compare_fleet_devices": cmp_devices,
            "compare_fleet_points": rows_cmp.points(),
            "compare_fleet_reason": cmp_reason,
            "query_series": format!("{}/{}/{}", sq.tenant_name, sq.device, sq.metric),
        },
        "engine": engine_json,
        "sqlite": sqlite_json,
        "postgres": pg_json,
        "fleet": {
            "window": {"from": from_u, "to": to_u, "hour_aligned_from": from_a, "hour_aligned_to": to_a},
            "engine_full": fleet_full_json,
            "compare": {
                "devices": cmp_devices,
                "engine": cmp_engine,
                "sqlite": cmp_sqlite,
                "postgres": cmp_pg,
            },
        },
        "checks": {"ok": checks.is_empty(), "failures": checks},
    });
    println!(
        "{}",
        serde_json::to_string(&line).context("serialising the result line")?
    );
    print_table(&line);
    Ok(())
}

fn main_series(p: &TsdbBenchParams) -> usize {
    p.series_per_tenant * TENANTS
}

// ---------------------------------------------------------------------------------------------
// The human table (stderr).

fn get<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn num(v: &serde_json::Value, path: &str) -> Option<f64> {
    get(v, path).and_then(serde_json::Value::as_f64)
}

fn fmt_int(v: Option<f64>) -> String {
    let Some(v) = v else {
        return "–".into();
    };
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn fmt_f(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn print_table(r: &serde_json::Value) {
    let c = |k: &str| num(r, &format!("config.{k}"));
    eprintln!(
        "\nferrohub bench tsdb: {} points ({} series × {}), batch {}, {} threads, fsync {}; fleet {} devices × {} days at {} s ({} points), side by side on {} devices",
        fmt_int(c("points")),
        fmt_int(c("series")),
        fmt_int(c("points_per_series")),
        fmt_int(c("batch")),
        fmt_int(c("threads")),
        get(r, "config.fsync").map_or("?".into(), |v| v.to_string()),
        fmt_int(c("fleet_devices")),
        fmt_int(c("fleet_days")),
        fmt_int(c("fleet_interval_s")),
        fmt_int(c("fleet_points")),
        fmt_int(c("compare_fleet_devices")),
    );
    let engines = ["engine", "sqlite", "postgres"];
    let row = |name: &str, f: &dyn Fn(&str) -> String| {
        let cells: Vec<String> = engines.iter().map(|e| f(e)).collect();
        eprintln!(
            "| {name:<44} | {:>14} | {:>14} | {:>14} |",
            cells[0], cells[1], cells[2]
        );
    };
    eprintln!(
        "| {:<44} | {:>14} | {:>14} | {:>14} |",
        "", "engine", "SQLite", "PostgreSQL"
    );
    eprintln!("|{:-<46}|{:->16}|{:->16}|{:->16}|", "", "", "", "");
    row("ingest, points/s", &|e| {
        fmt_int(num(r, &format!("{e}.ingest.points_per_s")))
    });
    row("bytes/point (all ten tenants)", &|e| {
        fmt_f(num(r, &format!("{e}.bytes_per_point")), 2)
    });
    row("raw day of one series, median ms", &|e| {
        fmt_f(num(r, &format!("{e}.raw_day.median_ms")), 2)
    });
    row("raw day of one series, p99 ms", &|e| {
        fmt_f(num(r, &format!("{e}.raw_day.p99_ms")), 2)
    });
    row("1 h buckets of that day, median ms", &|e| {
        fmt_f(num(r, &format!("{e}.agg_day.median_ms")), 2)
    });
    row("comparison fleet: ingest, points/s", &|e| {
        fmt_int(num(r, &format!("fleet.compare.{e}.ingest.points_per_s")))
    });
    row("comparison fleet: bytes/point", &|e| {
        fmt_f(num(r, &format!("fleet.compare.{e}.bytes_per_point")), 2)
    });
    row("comparison fleet: 1 h avg, all devices, ms", &|e| {
        fmt_f(num(r, &format!("fleet.compare.{e}.query.median_ms")), 1)
    });
    row("comparison fleet: 1 h avg per device, ms", &|e| {
        fmt_f(
            num(r, &format!("fleet.compare.{e}.per_device.median_ms")),
            1,
        )
    });
    eprintln!("\nengine, bytes per point by tenant (ts + values + rollups + index):");
    if let Some(ts) = get(r, "engine.tenants").and_then(|v| v.as_array()) {
        for t in ts {
            eprintln!(
                "  {:<12} {:<28} {:<18} {:>6} = ts {:>5} + values {:>5} + 1-min {:>5} + 1-h {:>5} + index {:>5}",
                t.get("tenant").and_then(|v| v.as_str()).unwrap_or("?"),
                t.get("profile").and_then(|v| v.as_str()).unwrap_or("?"),
                t.get("timestamps").and_then(|v| v.as_str()).unwrap_or("?"),
                fmt_f(num(t, "bytes_per_point"), 3),
                fmt_f(num(t, "ts_bpp"), 3),
                fmt_f(num(t, "values_bpp"), 3),
                fmt_f(num(t, "minute_rollup_bpp"), 3),
                fmt_f(num(t, "hourly_rollup_bpp"), 3),
                fmt_f(num(t, "index_bpp"), 3),
            );
        }
    }
    for (k, what) in [
        ("regular", "regular timestamps"),
        ("jittered", "jittered timestamps"),
        ("regular_vib_0_01", "regular, vibration at 0.01"),
        ("jittered_vib_0_01", "jittered, vibration at 0.01"),
    ] {
        eprintln!(
            "  mix of the four profiles, {what:<28} {:>6} B/point",
            fmt_f(num(r, &format!("engine.mix.{k}.bytes_per_point")), 3)
        );
    }
    eprintln!(
        "engine: flush {} s, compaction {} s; whole fleet ({} devices): ingest {} points/s, {} B/point, 1 h avg over all devices median {} ms (hour-aligned {} ms), per device {} ms; RSS growth main {} MiB, fleet {} MiB, VmHWM {} MiB",
        fmt_f(num(r, "engine.seal.flush_s"), 2),
        fmt_f(num(r, "engine.seal.compact_s"), 2),
        fmt_int(num(r, "fleet.engine_full.devices")),
        fmt_int(num(r, "fleet.engine_full.ingest.points_per_s")),
        fmt_f(num(r, "fleet.engine_full.parts.bytes_per_point"), 3),
        fmt_f(num(r, "fleet.engine_full.query.median_ms"), 1),
        fmt_f(num(r, "fleet.engine_full.query_hour_aligned.median_ms"), 1),
        fmt_f(num(r, "fleet.engine_full.per_device.median_ms"), 1),
        fmt_f(num(r, "engine.rss_mib.main_growth"), 0),
        fmt_f(num(r, "fleet.engine_full.rss_mib_growth"), 0),
        fmt_f(num(r, "engine.rss_mib.vm_hwm"), 0),
    );
    match get(r, "checks.failures").and_then(|v| v.as_array()) {
        Some(f) if !f.is_empty() => {
            eprintln!("CHECKS FAILED:");
            for x in f {
                eprintln!("  {x}");
            }
        }
        _ => eprintln!("checks: every query result matched the generated data"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_shaped() {
        let a = Profile::Temperature.generate(3, 3600);
        assert_eq!(a, Profile::Temperature.generate(3, 3600));
        assert!(a.iter().all(|v| (10.0..32.0).contains(v)));
        assert!(
            a.iter()
                .all(|v| (v * 100.0 - (v * 100.0).round()).abs() < 1e-6)
        );
        let v3 = Profile::Vibration3.generate(0, 1000);
        let v2 = Profile::Vibration2.generate(0, 1000);
        assert!(v3.iter().zip(&v2).all(|(a, b)| (a - b).abs() <= 0.0051));
        let c = Profile::Counter.generate(0, 1000);
        assert!(c.windows(2).all(|w| (0.0..=5.0).contains(&(w[1] - w[0]))));
        let s = Profile::Status.generate(0, 86_400);
        assert!(s.iter().all(|v| *v == 0.0 || *v == 1.0));
        let flips = s.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(flips < 20, "{flips} flips");
        let t = gen_tenant(Profile::Temperature, true, 2, 1000);
        assert!(
            t.ts[1]
                .windows(2)
                .all(|w| (960..=1040).contains(&(w[1] - w[0])))
        );
        assert!(
            t.ts[1]
                .iter()
                .all(|ts| ts.div_euclid(DAY_MS) == MAIN_DAY0_MS / DAY_MS)
        );
    }

    #[test]
    fn batches_cover_every_point_once() {
        let m = MainData::generate(3, 7, 4, 2);
        let mut seen = vec![vec![false; 21]; TENANTS];
        for b in &m.batches {
            for s in &mut seen[b.tenant][b.start..b.end] {
                assert!(!*s);
                *s = true;
            }
        }
        assert!(seen.iter().flatten().all(|s| *s));
        let calls = m.build_points(3);
        let n: usize = calls.iter().flatten().map(|(_, p)| p.len()).sum();
        assert_eq!(n, m.points());
        let mut rows = Vec::new();
        for b in 0..Rows::batch_count(&m) {
            m.fill(b, &mut rows);
        }
        assert_eq!(rows.len(), m.points());
    }

    #[test]
    fn fleet_rows_and_expectation() {
        let f = Fleet::generate(5, 1, 3600, 2);
        assert_eq!(f.steps, 24);
        let rows = FleetRows {
            fleet: &f,
            devices: 3,
            batch: 7,
        };
        let mut out = Vec::new();
        for b in 0..rows.batch_count() {
            rows.fill(b, &mut out);
        }
        assert_eq!(out.len(), 72);
        let e = f.expected(3, f.end_ms - 2 * DAY_MS, f.end_ms + 1);
        assert_eq!(e.iter().map(|b| b.1).sum::<u64>(), 72);
        assert!(f.ts(0, 23) <= f.end_ms);
    }

    #[test]
    fn binary_copy_layout() {
        let mut out = Vec::new();
        copy_binary(&[(1, 2, 3.5)], &mut out);
        assert_eq!(out.len(), 19 + 2 + 3 * 4 + 4 + 8 + 8 + 2);
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
    }

    #[test]
    fn timing_ranks() {
        let mut i = 0;
        let (t, last) = time_runs(
            1,
            50,
            || {
                i += 1;
                Ok(i)
            },
            |x| *x as u64,
        )
        .unwrap();
        assert_eq!(t.runs, 50);
        assert_eq!(last, 51);
        assert!(t.min_ms <= t.median_ms && t.median_ms <= t.p99_ms && t.p99_ms <= t.max_ms);
    }

    #[test]
    fn thousands() {
        assert_eq!(fmt_int(Some(1234567.4)), "1,234,567");
        assert_eq!(fmt_int(Some(999.0)), "999");
        assert_eq!(fmt_int(None), "–");
    }
}
