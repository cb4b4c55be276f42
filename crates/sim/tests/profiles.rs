//! Device profiles: the built-ins load, generators are deterministic under a seed and stay within
//! their bounds, payloads have the shape the hub reads, and a bad profile gets an error naming
//! the key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use ferrohub_sim::sim::profile::{self, Mix, Overrides, Profile, ProfileError};
use ferrohub_sim::sim::{DeviceSim, Format, Sample, Value, encode};

/// 2026-01-01T00:00:00Z.
const START: i64 = 1_767_225_600_000;

fn builtin(name: &str) -> Arc<Profile> {
    Arc::new(profile::load(name, &Overrides::default()).unwrap())
}

fn with(name: &str, set: &[&str]) -> Arc<Profile> {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    Arc::new(profile::load(name, &Overrides::parse(&set).unwrap()).unwrap())
}

fn series(p: &Arc<Profile>, seed: u64, index: u64, n: usize) -> Vec<Sample> {
    let mut d = DeviceSim::new(p.clone(), seed, index, START);
    (0..n).map(|_| d.next_sample()).collect()
}

fn column(p: &Profile, samples: &[Sample], metric: &str) -> Vec<Value> {
    let i = p.metric_names().position(|m| m == metric).unwrap();
    samples.iter().map(|s| s.values[i].clone()).collect()
}

fn floats(p: &Profile, samples: &[Sample], metric: &str) -> Vec<f64> {
    column(p, samples, metric)
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn parse_err(text: &str) -> String {
    match profile::parse(text, "test.toml", &Overrides::default()) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_builtin_loads_and_names_its_metrics() {
    for name in profile::builtin_names() {
        let p = builtin(name);
        assert_eq!(p.name, name);
        assert!(p.metric_names().count() >= 2, "{name}");
        assert!(!p.description.is_empty());
        // And its TOML is what `ferrohub sim profiles NAME` prints.
        assert!(
            profile::builtin_text(name)
                .unwrap()
                .contains(&format!("name = \"{name}\""))
        );
    }
}

#[test]
fn same_seed_device_and_tick_give_the_same_values() {
    for name in profile::builtin_names() {
        let p = builtin(name);
        let a = series(&p, 42, 7, 500);
        let b = series(&p, 42, 7, 500);
        assert_eq!(a, b, "{name}: two runs differ");
        // Timestamps follow the interval.
        assert_eq!(a[0].ts_ms, START);
        assert_eq!(a[10].ts_ms, START + 10 * p.interval.as_millis() as i64);
        // Another seed or another device gives another series.
        assert_ne!(
            a,
            series(&p, 43, 7, 500),
            "{name}: the seed changes nothing"
        );
        assert_ne!(
            a,
            series(&p, 42, 8, 500),
            "{name}: the device changes nothing"
        );
    }
}

#[test]
fn a_device_does_not_depend_on_the_rest_of_the_fleet() {
    // A second process simulating indices 500.. produces exactly what one process would: a
    // device's values depend only on (seed, index, tick), not on which devices came before.
    let p = builtin("rotating-machine");
    let alone = series(&p, 1, 500, 50);
    let mut others: Vec<DeviceSim> = (0..500)
        .map(|i| DeviceSim::new(p.clone(), 1, i, START))
        .collect();
    for d in &mut others {
        for _ in 0..10 {
            d.next_sample();
        }
    }
    assert_eq!(series(&p, 1, 500, 50), alone);
}

#[test]
fn a_metric_follows_its_name_not_its_position() {
    let one = r#"
        name = "a"
        interval = "1s"
        [[metrics]]
        name = "t"
        noise = { stddev = 1.0 }
    "#;
    let two = r#"
        name = "a"
        interval = "1s"
        [[metrics]]
        name = "other"
        noise = { stddev = 1.0 }
        [[metrics]]
        name = "t"
        noise = { stddev = 1.0 }
    "#;
    let p1 = Arc::new(profile::parse(one, "one", &Overrides::default()).unwrap());
    let p2 = Arc::new(profile::parse(two, "two", &Overrides::default()).unwrap());
    let a = floats(&p1, &series(&p1, 5, 3, 100), "t");
    let b = floats(&p2, &series(&p2, 5, 3, 100), "t");
    assert_eq!(a, b);
}

#[test]
fn environment_values_are_plausible_and_rounded() {
    let p = builtin("environment");
    for dev in 0..20 {
        let s = series(&p, 0, dev, 8640); // one day at 10 s
        let t = floats(&p, &s, "temperature");
        let h = floats(&p, &s, "humidity");
        assert!(
            t.iter().all(|v| (12.0..30.0).contains(v)),
            "temperature {t:?}"
        );
        assert!(h.iter().all(|v| (0.0..=100.0).contains(v)));
        // A daily cycle: the day's range is about twice the amplitude.
        let (lo, hi) = t
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        assert!(hi - lo > 4.0 && hi - lo < 10.0, "range {lo}..{hi}");
        // Rounded to 0.01: at most two decimals when printed.
        for v in &t {
            let text = v.to_string();
            let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
            assert!(decimals <= 2, "{text}");
        }
        let b = floats(&p, &s, "battery_v");
        assert!(b.iter().all(|v| (2.2..=3.2).contains(v)));
    }
}

#[test]
fn smart_meter_energy_never_decreases_and_integrates_power() {
    let p = builtin("smart-meter");
    let s = series(&p, 9, 4, 5760); // one day at 15 s
    let energy = column(&p, &s, "energy");
    let power = floats(&p, &s, "power");
    let e: Vec<i64> = energy
        .iter()
        .map(|v| match v {
            Value::Int(i) => *i,
            other => panic!("energy is a whole number of Wh, got {other:?}"),
        })
        .collect();
    assert!(e.windows(2).all(|w| w[0] <= w[1]), "energy decreased");
    assert!(power.iter().all(|w| *w >= 40.0));
    // Energy over the day ≈ mean power × 24 h.
    let mean_w = power.iter().sum::<f64>() / power.len() as f64;
    let used = (e[e.len() - 1] - e[0]) as f64;
    let expected = mean_w * 24.0 * (5759.0 / 5760.0);
    assert!(
        (used - expected).abs() / expected < 0.02,
        "{used} vs {expected}"
    );
}

#[test]
fn gps_tracker_stays_on_its_route_and_crosses_the_geofence() {
    let p = builtin("gps-tracker");
    let s = series(&p, 0, 2, 2000); // ~2.8 h at 5 s: several laps
    let lat = floats(&p, &s, "lat");
    let lon = floats(&p, &s, "lon");
    assert!(lat.iter().all(|v| (52.49..=52.53).contains(v)), "lat");
    assert!(lon.iter().all(|v| (13.35..=13.44).contains(v)), "lon");
    let speed = floats(&p, &s, "speed");
    assert!(speed.iter().all(|v| *v >= 0.0));
    let mean = speed.iter().sum::<f64>() / speed.len() as f64;
    assert!((mean - 32.0).abs() < 2.0, "mean speed {mean}");
    let heading = floats(&p, &s, "heading");
    assert!(heading.iter().all(|v| (0.0..360.0).contains(v)));
    let inside: Vec<bool> = column(&p, &s, "in_depot")
        .iter()
        .map(|v| matches!(v, Value::Bool(true)))
        .collect();
    let crossings = inside.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(crossings >= 4, "{crossings} geofence crossings");
    // Consecutive fixes are at most one interval's drive apart (no jumps).
    for w in lat.windows(2).zip(lon.windows(2)) {
        let (dlat, dlon) = ((w.0[1] - w.0[0]).abs(), (w.1[1] - w.1[0]).abs());
        assert!(dlat < 0.002 && dlon < 0.003, "jump {dlat} {dlon}");
    }
}

#[test]
fn cold_chain_has_excursions_and_states() {
    let p = builtin("cold-chain");
    let mut excursions = 0;
    let mut states = HashSet::new();
    for dev in 0..20 {
        let s = series(&p, 0, dev, 2880); // one day at 30 s
        let t = floats(&p, &s, "temperature");
        assert!(t.iter().all(|v| (2.0..12.0).contains(v)), "{t:?}");
        if t.iter().any(|v| *v > 7.0) {
            excursions += 1;
        }
        for v in column(&p, &s, "unit_state") {
            match v {
                Value::Str(s) => {
                    states.insert(s.to_string());
                }
                other => panic!("unit_state {other:?}"),
            }
        }
        assert!(
            column(&p, &s, "door_open")
                .iter()
                .all(|v| matches!(v, Value::Bool(_)))
        );
    }
    // Mean every 6 h: nearly every device has one in a day.
    assert!(
        excursions >= 10,
        "{excursions} of 20 devices had an excursion"
    );
    let want: HashSet<String> = ["cooling", "idle", "defrost"].map(String::from).into();
    assert_eq!(states, want);
}

#[test]
fn the_bearing_fault_is_injectable() {
    // Every device faulty after 10 minutes: vibration an hour later is ~1.5 mm/s above its start.
    let p = with(
        "rotating-machine",
        &["bearing_fault_after=10m", "bearing_fault_fraction=1"],
    );
    assert_eq!(p.params["bearing_fault_after"], "\"10m\"");
    for dev in 0..5 {
        let s = series(&p, 3, dev, 4200); // 70 min at 1 s
        let v = floats(&p, &s, "vibration_rms");
        let before: f64 = v[..600].iter().sum::<f64>() / 600.0;
        let after: f64 = v[4100..].iter().sum::<f64>() / 100.0;
        assert!(
            after - before > 1.2 && after - before < 1.8,
            "{before} → {after}"
        );
        let t = floats(&p, &s, "bearing_temp");
        assert!(t[4199] - t[0] > 2.0);
    }
    // No device is faulty with fraction 0; the default (10 %) picks the same devices for
    // vibration and temperature.
    let healthy = with(
        "rotating-machine",
        &["bearing_fault_after=0s", "bearing_fault_fraction=0"],
    );
    let s = series(&healthy, 3, 0, 3600);
    let v = floats(&healthy, &s, "vibration_rms");
    assert!(v.iter().all(|x| *x < 3.5));
    // Compared with the same device without a fault (fraction 0), only the drift differs.
    let default = with("rotating-machine", &["bearing_fault_after=0s"]);
    let mut faulty = 0;
    for dev in 0..200 {
        let s = series(&default, 0, dev, 3601);
        let h = series(&healthy, 0, dev, 3601);
        let dv = floats(&default, &s, "vibration_rms")[3600]
            - floats(&healthy, &h, "vibration_rms")[3600];
        let dt =
            floats(&default, &s, "bearing_temp")[3600] - floats(&healthy, &h, "bearing_temp")[3600];
        let vib_up = (dv - 1.5).abs() < 0.011;
        let temp_up = (dt - 4.0).abs() < 0.11;
        assert!(
            vib_up || dv.abs() < 1e-9,
            "device {dev}: vibration off by {dv}"
        );
        assert_eq!(
            vib_up, temp_up,
            "device {dev}: the fault hit one metric only"
        );
        faulty += usize::from(vib_up);
    }
    assert!((8..=35).contains(&faulty), "{faulty} of 200 faulty");
}

#[test]
fn mixes_follow_their_weights_in_every_range() {
    let overrides = Overrides::default();
    let mix = Mix::load(
        &["environment:3".to_string(), "smart-meter:1".to_string()],
        &overrides,
    )
    .unwrap();
    for (start, n) in [(0u64, 1000u64), (5000, 200), (123_456, 40)] {
        let env = (start..start + n)
            .filter(|i| mix.pick(*i).name == "environment")
            .count() as f64;
        let share = env / n as f64;
        assert!((share - 0.75).abs() < 0.03, "{start}: {share}");
    }
    assert_eq!(
        profile::split_weight("./dir/p.toml:2.5").unwrap(),
        ("./dir/p.toml", 2.5)
    );
    assert_eq!(
        profile::split_weight("environment").unwrap(),
        ("environment", 1.0)
    );
    assert!(profile::split_weight("environment:0").is_err());
}

#[test]
fn payloads_have_the_shape_the_hub_reads() {
    let p = builtin("cold-chain");
    let s = series(&p, 0, 0, 3);
    let mut out = Vec::new();
    encode(Format::Json, &p, &s[..1], &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["ts"], START);
    assert!(v["temperature"].is_f64());
    assert!(v["door_open"].is_boolean());
    assert_eq!(v["unit_state"], "cooling");
    let json_one = v;

    out.clear();
    encode(Format::Json, &p, &s, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[2]["ts"], START + 60_000);

    out.clear();
    encode(Format::Cbor, &p, &s[..1], &mut out).unwrap();
    let v: serde_json::Value = ciborium::from_reader(out.as_slice()).unwrap();
    assert_eq!(v, json_one);

    out.clear();
    encode(Format::Msgpack, &p, &s, &mut out).unwrap();
    let v: serde_json::Value = rmp_serde::from_slice(&out).unwrap();
    assert_eq!(v[0], json_one);
    assert_eq!(v.as_array().unwrap().len(), 3);

    // Whole-number resolutions are integers.
    let m = builtin("smart-meter");
    let s = series(&m, 0, 0, 1);
    out.clear();
    encode(Format::Json, &m, &s, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["power"].is_i64() && v["energy"].is_i64() && v["voltage"].is_f64());
}

#[test]
fn bad_profiles_name_the_key() {
    let head = "name = \"x\"\ninterval = \"1s\"\n";
    let cases: Vec<(String, &[&str])> = vec![
        // TOML syntax: the line is named.
        ("name = \"x\"\ninterval = \n".into(), &["line 2"]),
        // A missing generator parameter.
        (
            format!("{head}[[metrics]]\nname = \"t\"\nsine = {{ amplitude = 1.0 }}\n"),
            &["metrics[0].sine", "\"t\"", "missing field `mean`"],
        ),
        // A misspelt key.
        (
            format!("{head}[[metrics]]\nname = \"t\"\nsine = {{ mean = 1.0, amplitud = 1.0 }}\n"),
            &["metrics[0].sine", "unknown field `amplitud`", "amplitude"],
        ),
        // A bad duration.
        (
            format!(
                "{head}[[metrics]]\nname = \"t\"\nsine = {{ mean = 1.0, amplitude = 1.0, period = \"daily\" }}\n"
            ),
            &["metrics[0].sine.period", "duration"],
        ),
        // A wrong type.
        (
            format!("{head}[[metrics]]\nname = \"t\"\nbase = \"warm\"\n"),
            &["metrics[0].base", "f64"],
        ),
        // A probability out of range.
        (
            format!("{head}[[metrics]]\nname = \"door\"\nflag = {{ flip = 2.0 }}\n"),
            &["metrics[0].flag.flip", "\"door\"", "probability"],
        ),
        // Two kinds in one metric.
        (
            format!(
                "{head}[[metrics]]\nname = \"e\"\ncounter = {{ rate = 1.0 }}\nnoise = {{ stddev = 1.0 }}\n"
            ),
            &["metrics[0]", "counter", "stand alone"],
        ),
        // No generator at all.
        (
            format!("{head}[[metrics]]\nname = \"e\"\nresolution = 0.1\n"),
            &["metrics[0]", "expected a generator"],
        ),
        // A counter fed by a metric that does not exist (yet).
        (
            format!("{head}[[metrics]]\nname = \"e\"\ncounter = {{ rate_of = \"power\" }}\n"),
            &["metrics[0].counter.rate_of", "\"power\""],
        ),
        // A metric the hub would read as the timestamp.
        (
            format!("{head}[[metrics]]\nname = \"ts\"\nbase = 1.0\n"),
            &["metrics[0].name", "timestamp"],
        ),
        // The same name twice.
        (
            format!(
                "{head}[[metrics]]\nname = \"a\"\nbase = 1.0\n[[metrics]]\nname = \"a\"\nbase = 2.0\n"
            ),
            &["metrics[1].name", "already"],
        ),
        // A route metric without a route.
        (
            format!("{head}[[metrics]]\nname = \"lat\"\nroute = \"lat\"\n"),
            &["metrics[0].route", "[route]"],
        ),
        // A route output that does not exist.
        (
            format!(
                "{head}[route]\nwaypoints = [[0.0, 0.0], [0.0, 1.0]]\n[[metrics]]\nname = \"alt\"\nroute = \"altitude\"\n"
            ),
            &["metrics[0].route", "altitude"],
        ),
        // A waypoint off the globe.
        (
            format!(
                "{head}[route]\nwaypoints = [[0.0, 0.0], [95.0, 1.0]]\n[[metrics]]\nname = \"lat\"\nroute = \"lat\"\n"
            ),
            &["route.waypoints[1]", "latitude"],
        ),
        // An unknown choice state in the transitions.
        (
            format!(
                "{head}[[metrics]]\nname = \"s\"\nchoice = {{ states = [\"a\", \"b\"], transitions = {{ a = {{ c = 0.5 }} }} }}\n"
            ),
            &["choice.transitions.a.c", "\"c\" is not one of the states"],
        ),
        // A parameter that [params] does not declare.
        (
            format!(
                "{head}[[metrics]]\nname = \"v\"\ndrift = {{ after = \"${{fault}}\", per_hour = 1.0 }}\n"
            ),
            &["metrics[0].drift.after", "\"fault\"", "[params]"],
        ),
        // No metrics.
        (
            format!("{head}metrics = []\n"),
            &["metrics", "at least one"],
        ),
        // A missing top-level key.
        (
            "name = \"x\"\n[[metrics]]\nname = \"a\"\nbase = 1.0\n".into(),
            &["missing field `interval`"],
        ),
        // An unknown top-level key.
        (format!("{head}formats = \"json\"\n"), &["formats"]),
        // An unknown format.
        (format!("{head}format = \"xml\"\n"), &["format", "xml"]),
        // A batch of zero.
        (
            format!("{head}batch = 0\n[[metrics]]\nname = \"a\"\nbase = 1.0\n"),
            &["batch", "1 to 10000"],
        ),
    ];
    for (text, wants) in cases {
        let e = parse_err(&text);
        assert!(e.starts_with("profile test.toml: "), "{e}");
        for w in wants {
            assert!(e.contains(w), "error {e:?} should mention {w:?}");
        }
    }
}

#[test]
fn overrides_must_name_a_parameter() {
    let bad = Overrides::parse(&["nonsense=1".to_string()]).unwrap();
    let e = Mix::load(&["rotating-machine".to_string()], &bad).unwrap_err();
    assert!(matches!(e, ProfileError::Override(_)));
    let text = e.to_string();
    assert!(
        text.contains("nonsense") && text.contains("bearing_fault_after"),
        "{text}"
    );
    assert!(Overrides::parse(&["no-equals".to_string()]).is_err());
    // A value of the wrong type is reported at the key that uses it.
    let wrong = Overrides::parse(&["bearing_fault_fraction=lots".to_string()]).unwrap();
    let e = profile::load("rotating-machine", &wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("drift.fraction"), "{e}");
    // An unknown profile lists the built-ins.
    let e = profile::load("no-such-profile", &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("environment") && e.contains("cold-chain"), "{e}");
}
