//! One simulated device's values, sample after sample.
//!
//! A [`DeviceSim`] is a profile, a seed, a device index and a start time. Sample `n` (the tick)
//! is taken at `start + n × interval`; every random draw is a hash of (seed, device index, metric
//! name, purpose, tick) (see [`super::rng`]), so the values are a pure function of those: two runs
//! with the same seed give every device the same series, whichever process, thread or order
//! produced them. Generators with memory (random walk, counter, flag, choice, excursion, route
//! position) step once per tick from tick 0. Only `sine` reads the clock (the sample time), so a
//! daily cycle peaks at the same time of day in every run; everything else depends on the tick.

use std::f64::consts::TAU;
use std::sync::Arc;

use super::profile::{Finish, Kind, Numeric, Profile, Rate, Route, RouteOutput};
use super::rng::{derive, gaussian, mix, uniform, unit};

/// One value of a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number with a fractional resolution.
    Float(f64),
    /// A number with a whole-number resolution.
    Int(i64),
    /// A flag or geofence.
    Bool(bool),
    /// A choice state.
    Str(Arc<str>),
}

impl Value {
    /// The value as a number (booleans are 0 or 1, strings none).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Str(_) => None,
        }
    }
}

/// The values of one tick, in the profile's metric order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Sample time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// One value per metric.
    pub values: Vec<Value>,
}

// Purposes of draws (mixed into the keys).
const SALT_NOISE: u64 = 1;
const SALT_WALK_START: u64 = 2;
const SALT_WALK: u64 = 3;
const SALT_FAULT: u64 = 4;
const SALT_EXCURSION: u64 = 5;
const SALT_OFFSET: u64 = 6;
const SALT_COUNTER_START: u64 = 7;
const SALT_COUNTER: u64 = 8;
const SALT_FLAG: u64 = 9;
const SALT_CHOICE: u64 = 10;
const SALT_ROUTE_START: u64 = 11;
const SALT_ROUTE_SPEED: u64 = 12;
const SALT_PHASE: u64 = 13;

/// Memory of one metric between ticks.
#[derive(Debug, Clone, Default)]
struct State {
    walk: f64,
    counter: f64,
    flag: bool,
    choice: usize,
    excursion_start: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct RouteState {
    distance_m: f64,
    speed_kmh: f64,
    lat: f64,
    lon: f64,
    heading: f64,
}

/// The key of device `index` under `seed`.
pub fn device_key(seed: u64, index: u64) -> u64 {
    derive(mix(seed), index)
}

/// Where in its first interval device `index` takes its first sample, as a fraction of the
/// interval in `[0, 1)`: spreads a fleet's messages evenly instead of every device sending at
/// the same instant.
pub fn phase(seed: u64, index: u64) -> f64 {
    unit(derive(device_key(seed, index), SALT_PHASE))
}

/// A simulated device's generator state.
#[derive(Debug, Clone)]
pub struct DeviceSim {
    profile: Arc<Profile>,
    key: u64,
    start_ms: i64,
    /// The tick taken at `start_ms` (not 0 once the interval was changed live).
    start_tick: u64,
    interval_us: u128,
    dt: f64,
    tick: u64,
    states: Vec<State>,
    route: RouteState,
}

impl DeviceSim {
    /// Device `index` of a fleet simulated under `seed`, whose tick 0 is at `start_ms`.
    pub fn new(profile: Arc<Profile>, seed: u64, index: u64, start_ms: i64) -> DeviceSim {
        let n = profile.metrics.len();
        DeviceSim {
            key: device_key(seed, index),
            start_ms,
            start_tick: 0,
            interval_us: profile.interval.as_micros().max(1),
            dt: profile.interval.as_secs_f64() * profile.time_scale,
            tick: 0,
            states: vec![State::default(); n],
            route: RouteState::default(),
            profile,
        }
    }

    /// The profile.
    pub fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }

    /// The tick the next sample will have.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// The time of tick `n`, milliseconds since the Unix epoch.
    pub fn time_of(&self, n: u64) -> i64 {
        let off = u128::from(n.saturating_sub(self.start_tick)) * self.interval_us / 1000;
        self.start_ms
            .saturating_add(i64::try_from(off).unwrap_or(i64::MAX))
    }

    /// Changes the sampling interval from the next tick on, which is taken at `next_ms` (a
    /// device told to sample faster or slower; the series keeps its ticks and memory).
    pub fn set_interval(&mut self, interval: std::time::Duration, next_ms: i64) {
        self.start_tick = self.tick;
        self.start_ms = next_ms;
        self.interval_us = interval.as_micros().max(1);
        self.dt = interval.as_secs_f64() * self.profile.time_scale;
    }

    /// The next sample.
    pub fn next_sample(&mut self) -> Sample {
        let mut s = Sample::default();
        self.next_into(&mut s);
        s
    }

    /// Writes the next sample into `out` (reusing its allocation).
    pub fn next_into(&mut self, out: &mut Sample) {
        let tick = self.tick;
        let ts_ms = self.time_of(tick);
        out.ts_ms = ts_ms;
        out.values.clear();
        let profile = self.profile.clone();
        if let Some(route) = &profile.route {
            self.step_route(route, tick);
        }
        for (i, m) in profile.metrics.iter().enumerate() {
            let mk = derive(self.key, m.key);
            let value = match &m.kind {
                Kind::Numeric(n) => {
                    let v = self.numeric(n, i, mk, tick, ts_ms);
                    finish(v, &m.finish, mk)
                }
                Kind::Counter(c) => {
                    let st = &mut self.states[i];
                    if tick == 0 {
                        st.counter = uniform(derive(mk, SALT_COUNTER_START), c.start.0, c.start.1);
                    } else {
                        let rate = match c.rate {
                            Rate::Uniform(lo, hi) => {
                                uniform(derive(derive(mk, SALT_COUNTER), tick), lo, hi)
                            }
                            Rate::Of(j) => out
                                .values
                                .get(j)
                                .and_then(Value::as_f64)
                                .unwrap_or(0.0)
                                .max(0.0),
                        };
                        st.counter += rate / c.per_s * self.dt;
                    }
                    finish(st.counter, &m.finish, mk)
                }
                Kind::Flag(f) => {
                    let st = &mut self.states[i];
                    if tick == 0 {
                        st.flag = f.initial;
                    } else {
                        let p = if st.flag { f.flip_back } else { f.flip };
                        if unit(derive(derive(mk, SALT_FLAG), tick)) < p {
                            st.flag = !st.flag;
                        }
                    }
                    Value::Bool(st.flag)
                }
                Kind::Choice(c) => {
                    let st = &mut self.states[i];
                    if tick == 0 {
                        st.choice = c.initial;
                    } else {
                        let u = unit(derive(derive(mk, SALT_CHOICE), tick));
                        let mut acc = 0.0;
                        for (to, p) in c.transitions.get(st.choice).into_iter().flatten() {
                            acc += p;
                            if u < acc {
                                st.choice = *to;
                                break;
                            }
                        }
                    }
                    c.states
                        .get(st.choice)
                        .map_or(Value::Bool(false), |s| Value::Str(s.clone()))
                }
                Kind::Route(out) => {
                    let r = &self.route;
                    let v = match out {
                        RouteOutput::Lat => r.lat,
                        RouteOutput::Lon => r.lon,
                        RouteOutput::Speed => r.speed_kmh,
                        RouteOutput::Heading => r.heading,
                    };
                    finish(v, &m.finish, mk)
                }
                Kind::Geofence(poly) => Value::Bool(inside(poly, (self.route.lat, self.route.lon))),
            };
            out.values.push(value);
        }
        self.tick += 1;
    }

    fn numeric(&mut self, n: &Numeric, i: usize, mk: u64, tick: u64, ts_ms: i64) -> f64 {
        let mut v = n.base;
        if let Some(s) = &n.sine {
            let t = ts_ms as f64 / 1000.0;
            v += s.mean + s.amplitude * (TAU * (t - s.phase_s) / s.period_s).cos();
        }
        if let Some(sd) = n.noise {
            v += sd * gaussian(derive(derive(mk, SALT_NOISE), tick));
        }
        let dt = self.dt;
        let st = &mut self.states[i];
        if let Some(w) = &n.walk {
            if tick == 0 {
                let (lo, hi) = w.start.unwrap_or((w.min, w.max));
                st.walk = uniform(derive(mk, SALT_WALK_START), lo, hi);
            } else {
                let mut x = st.walk + w.step * gaussian(derive(derive(mk, SALT_WALK), tick));
                // Reflect at the bounds (a big step may need it twice), then make sure.
                for _ in 0..2 {
                    if x > w.max {
                        x = 2.0 * w.max - x;
                    }
                    if x < w.min {
                        x = 2.0 * w.min - x;
                    }
                }
                st.walk = x.clamp(w.min, w.max);
            }
            v += st.walk;
        }
        if let Some(d) = &n.drift {
            let elapsed = tick as f64 * dt;
            // The same devices are affected for every metric of the profile.
            let affected = unit(derive(self.key, SALT_FAULT)) < d.fraction;
            if affected && elapsed > d.after_s {
                let mut x = (elapsed - d.after_s) / 3600.0 * d.per_hour;
                if let Some(l) = d.limit {
                    x = x.clamp(-l, l);
                }
                v += x;
            }
        }
        if let Some(e) = &n.excursion {
            if let Some(s) = st.excursion_start
                && (tick - s) as f64 * dt >= e.duration_s
            {
                st.excursion_start = None;
            }
            if st.excursion_start.is_none()
                && unit(derive(derive(mk, SALT_EXCURSION), tick)) < dt / e.every_s
            {
                st.excursion_start = Some(tick);
            }
            if let Some(s) = st.excursion_start {
                // Trapezoid: rises over the first fifth, holds, falls over the last fifth.
                let p = ((tick - s) as f64 + 0.5) * dt / e.duration_s;
                let shape = (p.min(1.0 - p) / 0.2).clamp(0.0, 1.0);
                v += e.magnitude * shape;
            }
        }
        v
    }

    fn step_route(&mut self, route: &Route, tick: u64) {
        let total = route.total_m();
        let r = &mut self.route;
        let jitter =
            route.speed_jitter_kmh * gaussian(derive(derive(self.key, SALT_ROUTE_SPEED), tick));
        r.speed_kmh = (route.speed_kmh + jitter).max(0.0);
        if tick == 0 {
            r.distance_m = unit(derive(self.key, SALT_ROUTE_START)) * total;
        } else {
            r.distance_m = (r.distance_m + r.speed_kmh / 3.6 * self.dt) % total;
        }
        let d = r.distance_m;
        let cum = &route.cumulative_m;
        let n = route.points.len();
        // Segment i runs from waypoint i to waypoint i + 1 (the last back to the first).
        let i = cum
            .partition_point(|c| *c <= d)
            .saturating_sub(1)
            .min(n - 1);
        let (a, b) = (route.points[i], route.points[(i + 1) % n]);
        let len = cum[i + 1] - cum[i];
        let f = if len > 0.0 {
            ((d - cum[i]) / len).clamp(0.0, 1.0)
        } else {
            0.0
        };
        r.lat = a.0 + (b.0 - a.0) * f;
        r.lon = a.1 + (b.1 - a.1) * f;
        r.heading = bearing(a, b);
    }
}

/// Initial bearing from `a` to `b`, degrees clockwise from north in `[0, 360)`.
fn bearing(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (p1, p2) = (a.0.to_radians(), b.0.to_radians());
    let dl = (b.1 - a.1).to_radians();
    let y = dl.sin() * p2.cos();
    let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
    (y.atan2(x).to_degrees() + 360.0) % 360.0
}

/// Whether `p` (lat, lon) lies inside the polygon (ray casting; the polygon closes itself).
pub(crate) fn inside(poly: &[(f64, f64)], p: (f64, f64)) -> bool {
    let (y, x) = p;
    let mut c = false;
    let n = poly.len();
    for i in 0..n {
        let (yi, xi) = poly[i];
        let (yj, xj) = poly[(i + n - 1) % n];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            c = !c;
        }
    }
    c
}

/// Per-device offset, bounds and rounding.
fn finish(mut v: f64, f: &Finish, mk: u64) -> Value {
    if f.device_offset > 0.0 {
        v += uniform(derive(mk, SALT_OFFSET), -f.device_offset, f.device_offset);
    }
    if !v.is_finite() {
        v = 0.0;
    }
    if let Some(r) = f.resolution {
        v = round_to(v, r);
    }
    if let Some(lo) = f.min {
        v = v.max(lo);
    }
    if let Some(hi) = f.max {
        v = v.min(hi);
    }
    if f.integer {
        // Saturating: values beyond ±2^63 (never reached by sane profiles) stick at the ends.
        Value::Int(v.round() as i64)
    } else {
        Value::Float(v)
    }
}

/// `v` rounded to a multiple of `step`. For steps like 0.01 it divides by 100 instead of
/// multiplying by 0.01, so the result is the double nearest to the decimal (21.37, not
/// 21.370000000000001) and prints short.
pub(crate) fn round_to(v: f64, step: f64) -> f64 {
    let inv = 1.0 / step;
    let k = inv.round();
    if k >= 1.0 && (inv - k).abs() < 1e-9 * k {
        (v * k).round() / k
    } else {
        (v / step).round() * step
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rounding_prints_short() {
        assert_eq!(round_to(21.374_9, 0.01).to_string(), "21.37");
        assert_eq!(round_to(-3.005_1, 0.01).to_string(), "-3.01");
        assert_eq!(round_to(52.520_007_9, 0.000_001).to_string(), "52.520008");
        assert_eq!(round_to(17.0, 5.0), 15.0);
        assert_eq!(round_to(0.26, 0.25), 0.25);
    }

    #[test]
    fn polygon_containment() {
        let square = [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.0)];
        assert!(inside(&square, (0.5, 0.5)));
        assert!(!inside(&square, (1.5, 0.5)));
        assert!(!inside(&square, (0.5, -0.1)));
    }

    #[test]
    fn bearings() {
        assert!((bearing((0.0, 0.0), (1.0, 0.0)) - 0.0).abs() < 1e-9);
        assert!((bearing((0.0, 0.0), (0.0, 1.0)) - 90.0).abs() < 1e-9);
        assert!((bearing((0.0, 0.0), (-1.0, 0.0)) - 180.0).abs() < 1e-9);
    }
}
