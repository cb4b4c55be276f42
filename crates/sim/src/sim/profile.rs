//! Device profiles: what a simulated device measures, how often, and how it sends it.
//!
//! A profile is TOML (see `docs/sim.md` for the reference): a name, a sampling `interval`, a
//! payload `format` (json, cbor, msgpack), an optional `batch` (samples per message), optional
//! `[params]` that the rest of the file references as `"${name}"` (and that `--set name=value`
//! overrides), an optional `[route]` (a closed polyline that GPS metrics follow), and
//! `[[metrics]]`, each one value per sample:
//!
//! * numeric: the sum of any of `base`, `sine`, `noise`, `random_walk`, `drift`, `excursion`,
//!   then a per-device `device_offset`, clamped to `min`/`max` and rounded to `resolution`;
//! * `counter`: monotonic, growing at a random rate in a range or at another metric's value;
//! * `flag`: a boolean that flips with a probability per sample;
//! * `choice`: one of several string states, moving between them with probabilities per sample;
//! * `route`: `lat`, `lon`, `speed` or `heading` of the device on the profile's route;
//! * `geofence`: whether the device's route position is inside a polygon.
//!
//! Parsing checks everything up front and names the offending key: `metrics[2].sine.period
//! (metric "temperature"): expected a duration such as "10s", "15m" or "24h", or seconds`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::rng::name_key;

/// The built-in profiles: `(name, TOML)`.
pub const BUILTIN: [(&str, &str); 5] = [
    (
        "environment",
        include_str!("../../profiles/environment.toml"),
    ),
    (
        "rotating-machine",
        include_str!("../../profiles/rotating-machine.toml"),
    ),
    (
        "gps-tracker",
        include_str!("../../profiles/gps-tracker.toml"),
    ),
    (
        "smart-meter",
        include_str!("../../profiles/smart-meter.toml"),
    ),
    ("cold-chain", include_str!("../../profiles/cold-chain.toml")),
];

/// Keys the hub reads as a sample's timestamp, so no metric may be named like them.
const TIMESTAMP_KEYS: [&str; 3] = ["ts", "timestamp", "time"];

/// Longest metric name the hub accepts.
const MAX_METRIC_LEN: usize = 256;

/// Most samples in one message.
pub const MAX_BATCH: u32 = 10_000;

/// Why a profile could not be loaded.
#[derive(Debug, Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read profile {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Neither a built-in profile nor a file.
    #[error(
        "no built-in profile named {name:?} and no such file (built-in profiles: {known}; a file \
         path must exist, e.g. ./my-profile.toml)"
    )]
    Unknown {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
    },
    /// Not valid TOML (the message carries the line and column).
    #[error("profile {origin}: {message}")]
    Syntax {
        /// File path or built-in name.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// Valid TOML, but a key is missing, unknown or has a value that does not fit.
    #[error("profile {origin}: `{key}`: {message}")]
    Invalid {
        /// File path or built-in name.
        origin: String,
        /// The offending key, e.g. `metrics[1].sine.period (metric "temperature")`.
        key: String,
        /// What is expected.
        message: String,
    },
    /// A `--set` names no parameter of any profile, or is not `name=value`.
    #[error("--set {0}")]
    Override(String),
}

/// Payload encoding of a profile's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON objects (`{"ts": 1767225600000, "temperature": 21.37}`).
    #[default]
    Json,
    /// CBOR (RFC 8949), the same shape as the JSON.
    Cbor,
    /// MessagePack, the same shape as the JSON.
    #[serde(alias = "messagepack")]
    #[value(alias = "messagepack")]
    Msgpack,
}

impl Format {
    /// The MQTT 5 content type the hub reads to pick its decoder.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Cbor => "application/cbor",
            Format::Msgpack => "application/msgpack",
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::Msgpack => "msgpack",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML schema.

/// A duration written as `"10s"`, `"15m"`, `"24h"`, `"1h 30m"` or a number of seconds.
#[derive(Debug, Clone, Copy)]
struct DurationSpec(Duration);

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a duration such as \"10s\", \"15m\" or \"24h\", or seconds";
        impl Visitor<'_> for V {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationSpec, E> {
                humantime::parse_duration(s.trim())
                    .map(DurationSpec)
                    .map_err(|_| E::custom(format!("{s:?} is not {EXPECTED}")))
            }
            fn visit_f64<E: de::Error>(self, s: f64) -> Result<DurationSpec, E> {
                if s.is_finite() && (0.0..=1e12).contains(&s) {
                    Ok(DurationSpec(Duration::from_secs_f64(s)))
                } else {
                    Err(E::custom(format!("{s} is not {EXPECTED}")))
                }
            }
            fn visit_i64<E: de::Error>(self, s: i64) -> Result<DurationSpec, E> {
                self.visit_f64(s as f64)
            }
            fn visit_u64<E: de::Error>(self, s: u64) -> Result<DurationSpec, E> {
                self.visit_f64(s as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// A number, or a `[low, high]` range a per-device value is drawn from.
#[derive(Debug, Clone, Copy)]
struct RangeSpec(f64, f64);

impl<'de> Deserialize<'de> for RangeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RangeSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a [low, high] pair of numbers")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RangeSpec, E> {
                Ok(RangeSpec(v, v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RangeSpec, E> {
                Ok(RangeSpec(v as f64, v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RangeSpec, E> {
                Ok(RangeSpec(v as f64, v as f64))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RangeSpec, A::Error> {
                let lo: f64 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("expected [low, high], got []"))?;
                let hi: f64 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("expected [low, high], got one number"))?;
                if seq.next_element::<f64>()?.is_some() {
                    return Err(de::Error::custom(
                        "expected [low, high], got more than two numbers",
                    ));
                }
                Ok(RangeSpec(lo, hi))
            }
        }
        d.deserialize_any(V)
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileSpec {
    name: String,
    #[serde(default)]
    description: String,
    interval: DurationSpec,
    #[serde(default)]
    format: Format,
    #[serde(default = "one")]
    batch: u32,
    #[serde(default)]
    route: Option<RouteSpec>,
    metrics: Vec<MetricSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    waypoints: Vec<[f64; 2]>,
    #[serde(default = "default_speed")]
    speed_kmh: f64,
    #[serde(default)]
    speed_jitter_kmh: f64,
}

fn default_speed() -> f64 {
    40.0
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricSpec {
    name: String,
    resolution: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    device_offset: Option<f64>,
    base: Option<f64>,
    sine: Option<SineSpec>,
    noise: Option<NoiseSpec>,
    random_walk: Option<WalkSpec>,
    drift: Option<DriftSpec>,
    excursion: Option<ExcursionSpec>,
    counter: Option<CounterSpec>,
    flag: Option<FlagSpec>,
    choice: Option<ChoiceSpec>,
    route: Option<RouteOutput>,
    geofence: Option<GeofenceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SineSpec {
    mean: f64,
    amplitude: f64,
    #[serde(default = "one_day")]
    period: DurationSpec,
    #[serde(default = "zero_duration")]
    phase: DurationSpec,
}

fn one_day() -> DurationSpec {
    DurationSpec(Duration::from_secs(86_400))
}

fn zero_duration() -> DurationSpec {
    DurationSpec(Duration::ZERO)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseSpec {
    stddev: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WalkSpec {
    start: Option<RangeSpec>,
    step: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriftSpec {
    after: DurationSpec,
    per_hour: f64,
    limit: Option<f64>,
    #[serde(default = "all_devices")]
    fraction: f64,
}

fn all_devices() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExcursionSpec {
    every: DurationSpec,
    duration: DurationSpec,
    magnitude: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterSpec {
    start: Option<RangeSpec>,
    rate: Option<RangeSpec>,
    rate_of: Option<String>,
    per: Option<DurationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagSpec {
    #[serde(default)]
    initial: bool,
    flip: f64,
    flip_back: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChoiceSpec {
    states: Vec<String>,
    initial: Option<String>,
    #[serde(default)]
    transitions: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GeofenceSpec {
    polygon: Vec<[f64; 2]>,
}

// ---------------------------------------------------------------------------------------------
// The compiled model.

/// What a route metric reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RouteOutput {
    /// Latitude, degrees.
    Lat,
    /// Longitude, degrees.
    Lon,
    /// Speed, km/h.
    Speed,
    /// Heading, degrees clockwise from north.
    Heading,
}

/// A loaded, checked profile.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// What it simulates.
    pub description: String,
    /// Time between two samples.
    pub interval: Duration,
    /// Payload encoding.
    pub format: Format,
    /// Samples per message.
    pub batch: u32,
    /// The parameters and their effective values (after `--set`), as TOML literals.
    pub params: BTreeMap<String, String>,
    /// Simulated seconds per real second for the generators (`--time-scale`): drifts, sines,
    /// walks and counters evolve this much faster; message timestamps stay real.
    pub time_scale: f64,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) route: Option<Route>,
}

impl Profile {
    /// The names of the metrics, in payload order.
    pub fn metric_names(&self) -> impl Iterator<Item = &str> {
        self.metrics.iter().map(|m| &*m.name)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Metric {
    pub name: Arc<str>,
    /// Stable key of the name: the metric's draws follow its name, not its position.
    pub key: u64,
    pub kind: Kind,
    pub finish: Finish,
}

/// What happens to a numeric value after its components are summed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    /// Half-width of the per-device constant offset.
    pub device_offset: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Grid the value is rounded to (`None`: unrounded).
    pub resolution: Option<f64>,
    /// The resolution is a whole number: emit integers.
    pub integer: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Numeric(Numeric),
    Counter(Counter),
    Flag(Flag),
    Choice(Choice),
    Route(RouteOutput),
    Geofence(Vec<(f64, f64)>),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Numeric {
    pub base: f64,
    pub sine: Option<Sine>,
    pub noise: Option<f64>,
    pub walk: Option<Walk>,
    pub drift: Option<Drift>,
    pub excursion: Option<Excursion>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sine {
    pub mean: f64,
    pub amplitude: f64,
    pub period_s: f64,
    pub phase_s: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Walk {
    pub start: Option<(f64, f64)>,
    pub step: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Drift {
    pub after_s: f64,
    pub per_hour: f64,
    pub limit: Option<f64>,
    pub fraction: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Excursion {
    pub every_s: f64,
    pub duration_s: f64,
    pub magnitude: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Counter {
    pub start: (f64, f64),
    pub rate: Rate,
    /// Seconds the rate is counted per.
    pub per_s: f64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Rate {
    Uniform(f64, f64),
    /// The value of an earlier metric (its index).
    Of(usize),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Flag {
    pub initial: bool,
    pub flip: f64,
    pub flip_back: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub states: Vec<Arc<str>>,
    pub initial: usize,
    /// Per state: `(next state, probability)` in the order of `states`.
    pub transitions: Vec<Vec<(usize, f64)>>,
}

/// A closed route: waypoints and the cumulative distance (metres) at each, the first repeated
/// at the end.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub points: Vec<(f64, f64)>,
    pub cumulative_m: Vec<f64>,
    pub speed_kmh: f64,
    pub speed_jitter_kmh: f64,
}

impl Route {
    pub fn total_m(&self) -> f64 {
        self.cumulative_m.last().copied().unwrap_or(0.0)
    }
}

/// Great-circle distance in metres.
pub(crate) fn haversine_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6_371_008.8;
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// `--set name=value` overrides of profile parameters (keys of a profile's `[params]`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `name → TOML value` (`--set name=value`).
    pub set: Vec<(String, String)>,
}

impl Overrides {
    /// Parses `name=value` pairs.
    pub fn parse(pairs: &[String]) -> Result<Overrides, ProfileError> {
        let mut set = Vec::new();
        for p in pairs {
            let Some((k, v)) = p.split_once('=') else {
                return Err(ProfileError::Override(format!(
                    "{p:?}: expected name=value, e.g. bearing_fault_after=30m"
                )));
            };
            let k = k.trim();
            if k.is_empty() {
                return Err(ProfileError::Override(format!("{p:?}: empty name")));
            }
            set.push((k.to_string(), v.trim().to_string()));
        }
        Ok(Overrides { set })
    }
}

/// The TOML value of an override: a TOML literal if it is one (`0.5`, `true`, `"x"`, `[1, 2]`),
/// else the text as a string (`30m`).
fn override_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Loads a profile by built-in name or file path.
pub fn load(name_or_path: &str, overrides: &Overrides) -> Result<Profile, ProfileError> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        return parse(text, name_or_path, overrides);
    }
    let path = Path::new(name_or_path);
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        return parse(&text, &path.display().to_string(), overrides);
    }
    Err(ProfileError::Unknown {
        name: name_or_path.to_string(),
        known: builtin_names().join(", "),
    })
}

/// The names of the built-in profiles.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// The TOML of a built-in profile.
pub fn builtin_text(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Parses and checks a profile. `origin` names it in errors; `overrides` whose name the profile
/// does not declare in `[params]` are ignored here (the caller checks that each applies
/// somewhere, see [`unused_overrides`]).
pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Profile, ProfileError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ProfileError::Syntax {
                origin: origin.to_string(),
                message: e.to_string().trim_end().to_string(),
            })?;
    let invalid = |key: String, message: String| ProfileError::Invalid {
        origin: origin.to_string(),
        key,
        message,
    };
    let mut params = match table.remove("params") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err(invalid(
                "params".into(),
                format!("expected a table of parameters, got {}", other.type_str()),
            ));
        }
    };
    for (k, v) in &overrides.set {
        if let Some(slot) = params.get_mut(k) {
            *slot = override_value(v);
        }
    }
    substitute(&mut table, &params, "").map_err(|(key, msg)| invalid(key, msg))?;
    let raw = toml::Value::Table(table);
    let spec: ProfileSpec = serde_path_to_error::deserialize(raw.clone()).map_err(|e| {
        let key = describe_path(&e.path().to_string(), &raw);
        // The TOML deserializer appends "\nin `a.b`" (its own, index-less path): ours is better.
        let inner = e.inner().to_string();
        let message = inner
            .split_once("\nin `")
            .map_or(inner.as_str(), |(m, _)| m)
            .trim_end()
            .to_string();
        invalid(key, message)
    })?;
    let params = params
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    compile(spec, params).map_err(|(key, msg)| invalid(key, msg))
}

/// The `--set` names that no profile of `profiles` declares.
pub fn unused_overrides<'a>(overrides: &'a Overrides, profiles: &[Profile]) -> Vec<&'a str> {
    overrides
        .set
        .iter()
        .filter(|(k, _)| !profiles.iter().any(|p| p.params.contains_key(k)))
        .map(|(k, _)| k.as_str())
        .collect()
}

/// `metrics[2].sine` → `metrics[2].sine (metric "temperature")`, and `.` for the root.
fn describe_path(path: &str, raw: &toml::Value) -> String {
    let path = if path == "." || path.is_empty() {
        "(top level)".to_string()
    } else {
        path.to_string()
    };
    if let Some(rest) = path.strip_prefix("metrics[")
        && let Some((idx, _)) = rest.split_once(']')
        && let Ok(i) = idx.parse::<usize>()
        && let Some(name) = raw
            .get("metrics")
            .and_then(|m| m.get(i))
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
    {
        return format!("{path} (metric {name:?})");
    }
    path
}

/// Replaces every string `"${name}"` with the parameter's value.
fn substitute(
    table: &mut toml::Table,
    params: &toml::Table,
    path: &str,
) -> Result<(), (String, String)> {
    for (k, v) in table.iter_mut() {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        substitute_value(v, params, &p)?;
    }
    Ok(())
}

fn substitute_value(
    v: &mut toml::Value,
    params: &toml::Table,
    path: &str,
) -> Result<(), (String, String)> {
    match v {
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                let Some(value) = params.get(name) else {
                    let known: Vec<&str> = params.keys().map(String::as_str).collect();
                    return Err((
                        path.to_string(),
                        format!(
                            "refers to parameter {name:?}, which [params] does not declare \
                             (declared: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                };
                *v = value.clone();
            }
            Ok(())
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, params, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        toml::Value::Table(t) => substitute(t, params, path),
        _ => Ok(()),
    }
}

type CompileError = (String, String);

fn err<T>(key: impl Into<String>, msg: impl Into<String>) -> Result<T, CompileError> {
    Err((key.into(), msg.into()))
}

fn finite(key: &str, v: f64) -> Result<f64, CompileError> {
    if v.is_finite() {
        Ok(v)
    } else {
        err(key, "expected a finite number")
    }
}

fn probability(key: &str, p: f64) -> Result<f64, CompileError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        err(key, format!("expected a probability from 0 to 1, got {p}"))
    }
}

fn positive_secs(key: &str, d: DurationSpec) -> Result<f64, CompileError> {
    let s = d.0.as_secs_f64();
    if s > 0.0 {
        Ok(s)
    } else {
        err(key, "expected a duration above zero")
    }
}

fn lat_lon(key: &str, p: [f64; 2]) -> Result<(f64, f64), CompileError> {
    let [lat, lon] = p;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return err(
            key,
            format!(
                "expected [latitude, longitude] with latitude in -90..90 and longitude in \
                 -180..180, got [{lat}, {lon}]"
            ),
        );
    }
    Ok((lat, lon))
}

fn compile(spec: ProfileSpec, params: BTreeMap<String, String>) -> Result<Profile, CompileError> {
    if spec.name.trim().is_empty() {
        return err("name", "expected a non-empty name");
    }
    if spec.interval.0 < Duration::from_millis(1) {
        return err(
            "interval",
            "expected at least 1ms (timestamps are milliseconds)",
        );
    }
    if !(1..=MAX_BATCH).contains(&spec.batch) {
        return err(
            "batch",
            format!("expected 1 to {MAX_BATCH} samples per message"),
        );
    }
    if spec.metrics.is_empty() {
        return err("metrics", "expected at least one [[metrics]] entry");
    }
    let route = match spec.route {
        None => None,
        Some(r) => {
            if r.waypoints.len() < 2 {
                return err(
                    "route.waypoints",
                    "expected at least two [lat, lon] waypoints",
                );
            }
            let points = r
                .waypoints
                .iter()
                .enumerate()
                .map(|(i, p)| lat_lon(&format!("route.waypoints[{i}]"), *p))
                .collect::<Result<Vec<_>, _>>()?;
            let mut cumulative_m = vec![0.0];
            for i in 0..points.len() {
                let next = points[(i + 1) % points.len()];
                let d = haversine_m(points[i], next);
                cumulative_m.push(cumulative_m[i] + d);
            }
            if cumulative_m.last().copied().unwrap_or(0.0) < 1.0 {
                return err("route.waypoints", "the route is shorter than one metre");
            }
            let speed_kmh = finite("route.speed_kmh", r.speed_kmh)?;
            if !(0.0..=2000.0).contains(&speed_kmh) {
                return err("route.speed_kmh", "expected 0 to 2000 km/h");
            }
            let speed_jitter_kmh = finite("route.speed_jitter_kmh", r.speed_jitter_kmh)?;
            if speed_jitter_kmh < 0.0 {
                return err("route.speed_jitter_kmh", "expected a non-negative number");
            }
            Some(Route {
                points,
                cumulative_m,
                speed_kmh,
                speed_jitter_kmh,
            })
        }
    };
    let mut metrics: Vec<Metric> = Vec::with_capacity(spec.metrics.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, m) in spec.metrics.into_iter().enumerate() {
        let at = format!("metrics[{i}] (metric {:?})", m.name);
        let key = |k: &str| format!("metrics[{i}].{k} (metric {:?})", m.name);
        check_metric_name(&m.name).map_err(|msg| (format!("metrics[{i}].name"), msg))?;
        if let Some(j) = seen.insert(m.name.clone(), i) {
            return err(
                format!("metrics[{i}].name"),
                format!("{:?} is already the name of metrics[{j}]", m.name),
            );
        }
        let kind = compile_kind(&m, &metrics, route.as_ref(), &at, &key)?;
        let default_resolution = match &kind {
            Kind::Numeric(_) | Kind::Counter(_) => Some(0.01),
            Kind::Route(RouteOutput::Lat | RouteOutput::Lon) => Some(0.000_001),
            Kind::Route(_) => Some(0.1),
            Kind::Flag(_) | Kind::Choice(_) | Kind::Geofence(_) => None,
        };
        let numeric = default_resolution.is_some();
        if !numeric {
            for (name, set) in [
                ("resolution", m.resolution.is_some()),
                ("min", m.min.is_some()),
                ("max", m.max.is_some()),
                ("device_offset", m.device_offset.is_some()),
            ] {
                if set {
                    return err(key(name), "applies to numeric metrics only");
                }
            }
        }
        let resolution = match m.resolution {
            None => default_resolution,
            Some(0.0) => None,
            Some(r) if r.is_finite() && r > 0.0 => Some(r),
            Some(r) => {
                return err(
                    key("resolution"),
                    format!("expected a positive step such as 0.01 (0 for none), got {r}"),
                );
            }
        };
        let integer = resolution.is_some_and(|r| r >= 1.0 && r.fract() == 0.0);
        let min = m.min.map(|v| finite(&key("min"), v)).transpose()?;
        let max = m.max.map(|v| finite(&key("max"), v)).transpose()?;
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            return err(key("min"), format!("min {lo} is above max {hi}"));
        }
        let device_offset = finite(&key("device_offset"), m.device_offset.unwrap_or(0.0))?.abs();
        metrics.push(Metric {
            key: name_key(&m.name),
            name: Arc::from(m.name.as_str()),
            kind,
            finish: Finish {
                device_offset,
                min,
                max,
                resolution,
                integer,
            },
        });
    }
    Ok(Profile {
        name: spec.name,
        description: spec.description,
        interval: spec.interval.0,
        format: spec.format,
        batch: spec.batch,
        params,
        time_scale: 1.0,
        metrics,
        route,
    })
}

fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_METRIC_LEN {
        return Err(format!(
            "expected 1 to {MAX_METRIC_LEN} bytes, got {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{name:?} contains a control character"));
    }
    if TIMESTAMP_KEYS.contains(&name) {
        return Err(format!(
            "{name:?} is read as the sample's timestamp by the hub; choose another name"
        ));
    }
    Ok(())
}

fn compile_kind(
    m: &MetricSpec,
    earlier: &[Metric],
    route: Option<&Route>,
    at: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Kind, CompileError> {
    let numeric_parts = [
        ("base", m.base.is_some()),
        ("sine", m.sine.is_some()),
        ("noise", m.noise.is_some()),
        ("random_walk", m.random_walk.is_some()),
        ("drift", m.drift.is_some()),
        ("excursion", m.excursion.is_some()),
    ];
    let has_numeric = numeric_parts.iter().any(|(_, s)| *s);
    let kinds: Vec<&str> = [
        ("a numeric generator", has_numeric),
        ("counter", m.counter.is_some()),
        ("flag", m.flag.is_some()),
        ("choice", m.choice.is_some()),
        ("route", m.route.is_some()),
        ("geofence", m.geofence.is_some()),
    ]
    .iter()
    .filter(|(_, s)| *s)
    .map(|(n, _)| *n)
    .collect();
    match kinds.len() {
        0 => {
            return err(
                at,
                "expected a generator: any of base, sine, noise, random_walk, drift, excursion \
                 (summed), or one of counter, flag, choice, route, geofence",
            );
        }
        1 => {}
        _ => {
            return err(
                at,
                format!(
                    "combines {}; numeric generators add up, but counter, flag, choice, route and \
                     geofence stand alone",
                    kinds.join(" and ")
                ),
            );
        }
    }
    if has_numeric {
        let mut n = Numeric {
            base: finite(&key("base"), m.base.unwrap_or(0.0))?,
            ..Numeric::default()
        };
        if let Some(s) = &m.sine {
            n.sine = Some(Sine {
                mean: finite(&key("sine.mean"), s.mean)?,
                amplitude: finite(&key("sine.amplitude"), s.amplitude)?,
                period_s: positive_secs(&key("sine.period"), s.period)?,
                phase_s: s.phase.0.as_secs_f64(),
            });
        }
        if let Some(s) = &m.noise {
            let sd = finite(&key("noise.stddev"), s.stddev)?;
            if sd < 0.0 {
                return err(key("noise.stddev"), "expected a non-negative number");
            }
            n.noise = Some(sd);
        }
        if let Some(w) = &m.random_walk {
            let (lo, hi) = (
                finite(&key("random_walk.min"), w.min)?,
                finite(&key("random_walk.max"), w.max)?,
            );
            if lo >= hi {
                return err(
                    key("random_walk.min"),
                    format!("min {lo} must be below max {hi}"),
                );
            }
            let step = finite(&key("random_walk.step"), w.step)?;
            if step < 0.0 {
                return err(key("random_walk.step"), "expected a non-negative number");
            }
            let start = match w.start {
                None => None,
                Some(RangeSpec(a, b)) => {
                    if !(lo..=hi).contains(&a) || !(lo..=hi).contains(&b) || a > b {
                        return err(
                            key("random_walk.start"),
                            format!("expected a value or [low, high] within {lo}..{hi}"),
                        );
                    }
                    Some((a, b))
                }
            };
            n.walk = Some(Walk {
                start,
                step,
                min: lo,
                max: hi,
            });
        }
        if let Some(d) = &m.drift {
            let limit = d
                .limit
                .map(|l| finite(&key("drift.limit"), l).map(f64::abs))
                .transpose()?;
            n.drift = Some(Drift {
                after_s: d.after.0.as_secs_f64(),
                per_hour: finite(&key("drift.per_hour"), d.per_hour)?,
                limit,
                fraction: probability(&key("drift.fraction"), d.fraction)?,
            });
        }
        if let Some(e) = &m.excursion {
            n.excursion = Some(Excursion {
                every_s: positive_secs(&key("excursion.every"), e.every)?,
                duration_s: positive_secs(&key("excursion.duration"), e.duration)?,
                magnitude: finite(&key("excursion.magnitude"), e.magnitude)?,
            });
        }
        return Ok(Kind::Numeric(n));
    }
    if let Some(c) = &m.counter {
        let start = match c.start {
            None => (0.0, 0.0),
            Some(RangeSpec(a, b)) if a.is_finite() && b.is_finite() && a <= b => (a, b),
            Some(_) => return err(key("counter.start"), "expected a number or [low, high]"),
        };
        let rate = match (&c.rate, &c.rate_of) {
            (Some(RangeSpec(a, b)), None) => {
                if !(a.is_finite() && b.is_finite() && 0.0 <= *a && a <= b) {
                    return err(
                        key("counter.rate"),
                        "expected a non-negative rate or [low, high] (a counter never decreases)",
                    );
                }
                Rate::Uniform(*a, *b)
            }
            (None, Some(of)) => {
                let Some(j) = earlier.iter().position(|e| &*e.name == of.as_str()) else {
                    return err(
                        key("counter.rate_of"),
                        format!("expected the name of a metric listed before this one, got {of:?}"),
                    );
                };
                if !matches!(earlier[j].kind, Kind::Numeric(_) | Kind::Counter(_)) {
                    return err(
                        key("counter.rate_of"),
                        format!("{of:?} is not a numeric metric"),
                    );
                }
                Rate::Of(j)
            }
            (Some(_), Some(_)) => {
                return err(key("counter"), "expected either rate or rate_of, not both");
            }
            (None, None) => {
                return err(
                    key("counter"),
                    "expected rate (per `per`, e.g. [0.5, 2.0]) or rate_of (an earlier metric)",
                );
            }
        };
        let per_s = match c.per {
            None => 1.0,
            Some(d) => positive_secs(&key("counter.per"), d)?,
        };
        return Ok(Kind::Counter(Counter { start, rate, per_s }));
    }
    if let Some(f) = &m.flag {
        let flip = probability(&key("flag.flip"), f.flip)?;
        let flip_back = match f.flip_back {
            None => flip,
            Some(p) => probability(&key("flag.flip_back"), p)?,
        };
        return Ok(Kind::Flag(Flag {
            initial: f.initial,
            flip,
            flip_back,
        }));
    }
    if let Some(c) = &m.choice {
        if c.states.is_empty() {
            return err(key("choice.states"), "expected at least one state");
        }
        let index = |s: &str, k: &str| -> Result<usize, CompileError> {
            c.states.iter().position(|x| x == s).ok_or_else(|| {
                (
                    key(k),
                    format!("{s:?} is not one of the states {:?}", c.states),
                )
            })
        };
        for (i, s) in c.states.iter().enumerate() {
            if c.states[..i].contains(s) {
                return err(key("choice.states"), format!("{s:?} is listed twice"));
            }
        }
        let initial = match &c.initial {
            None => 0,
            Some(s) => index(s, "choice.initial")?,
        };
        let mut transitions = vec![Vec::new(); c.states.len()];
        for (from, tos) in &c.transitions {
            let f = index(from, &format!("choice.transitions.{from}"))?;
            let mut sum = 0.0;
            // In the order of `states`, so the draw does not depend on the table's key order.
            let mut row: Vec<(usize, f64)> = Vec::new();
            for (to, p) in tos {
                let k = format!("choice.transitions.{from}.{to}");
                let t = index(to, &k)?;
                row.push((t, probability(&key(&k), *p)?));
                sum += p;
            }
            if sum > 1.0 + 1e-9 {
                return err(
                    key(&format!("choice.transitions.{from}")),
                    format!("probabilities of leaving {from:?} add up to {sum}, above 1"),
                );
            }
            row.sort_by_key(|(t, _)| *t);
            transitions[f] = row;
        }
        return Ok(Kind::Choice(Choice {
            states: c.states.iter().map(|s| Arc::from(s.as_str())).collect(),
            initial,
            transitions,
        }));
    }
    if let Some(out) = m.route {
        if route.is_none() {
            return err(
                key("route"),
                "needs a [route] table (waypoints, speed_kmh) in the profile",
            );
        }
        return Ok(Kind::Route(out));
    }
    if let Some(g) = &m.geofence {
        if route.is_none() {
            return err(
                key("geofence"),
                "needs a [route] table in the profile (the fence is checked against the device's \
                 route position)",
            );
        }
        if g.polygon.len() < 3 {
            return err(
                key("geofence.polygon"),
                "expected at least three [lat, lon] corners",
            );
        }
        let poly = g
            .polygon
            .iter()
            .enumerate()
            .map(|(i, p)| lat_lon(&key(&format!("geofence.polygon[{i}]")), *p))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Kind::Geofence(poly));
    }
    err(at, "expected a generator")
}

// ---------------------------------------------------------------------------------------------
// Mixes.

/// Profiles and their weights (`--profile environment:3 --profile ./mine.toml:1`).
#[derive(Debug, Clone)]
pub struct Mix {
    entries: Vec<(Arc<Profile>, f64)>,
    total: f64,
}

/// Splits `name:weight` (the weight being a positive number) from a `--profile` value.
pub fn split_weight(arg: &str) -> Result<(&str, f64), ProfileError> {
    if let Some((name, w)) = arg.rsplit_once(':')
        && let Ok(weight) = w.trim().parse::<f64>()
    {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(ProfileError::Invalid {
                origin: name.to_string(),
                key: "--profile".into(),
                message: format!("weight {w:?} must be a positive number"),
            });
        }
        return Ok((name, weight));
    }
    Ok((arg, 1.0))
}

impl Mix {
    /// Loads every `--profile` value; checks that every `--set` applies to one of them.
    pub fn load(args: &[String], overrides: &Overrides) -> Result<Mix, ProfileError> {
        let mut entries = Vec::new();
        for a in args {
            let (name, weight) = split_weight(a)?;
            entries.push((Arc::new(load(name, overrides)?), weight));
        }
        let profiles: Vec<Profile> = entries.iter().map(|(p, _)| (**p).clone()).collect();
        let unused = unused_overrides(overrides, &profiles);
        if !unused.is_empty() {
            let declared: Vec<String> = profiles
                .iter()
                .flat_map(|p| p.params.keys().map(|k| format!("{} ({})", k, p.name)))
                .collect();
            return Err(ProfileError::Override(format!(
                "{}: no profile declares it in [params] (declared: {})",
                unused.join(", "),
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            )));
        }
        Mix::new(entries)
    }

    /// A mix of already loaded profiles.
    pub fn new(entries: Vec<(Arc<Profile>, f64)>) -> Result<Mix, ProfileError> {
        if entries.is_empty() {
            return Err(ProfileError::Override(
                "no profile given (use --profile)".into(),
            ));
        }
        let total = entries.iter().map(|(_, w)| *w).sum();
        Ok(Mix { entries, total })
    }

    /// The profile of device `index`: a deterministic low-discrepancy spread, so that every run
    /// of consecutive indices (each process of a multi-process fleet) gets close to the weights.
    pub fn pick(&self, index: u64) -> &Arc<Profile> {
        let mut u = super::rng::weyl(index) * self.total;
        for (p, w) in &self.entries {
            if u < *w {
                return p;
            }
            u -= w;
        }
        // Rounding at the very top: the last profile.
        &self.entries[self.entries.len() - 1].0
    }

    /// The profiles, in the order given.
    pub fn profiles(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.entries.iter().map(|(p, _)| p)
    }

    /// Applies run-wide overrides of interval, batch, format and time scale to every profile.
    pub fn override_all(
        &mut self,
        interval: Option<Duration>,
        batch: Option<u32>,
        format: Option<Format>,
        time_scale: f64,
    ) {
        for (p, _) in &mut self.entries {
            let p = Arc::make_mut(p);
            p.time_scale = time_scale;
            if let Some(i) = interval {
                p.interval = i;
            }
            if let Some(b) = batch {
                p.batch = b;
            }
            if let Some(f) = format {
                p.format = f;
            }
        }
    }
}
