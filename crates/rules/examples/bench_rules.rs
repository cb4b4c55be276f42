//! Micro-benchmark of rule evaluation, single thread:
//! `cargo run --release -p ferrohub-rules --example bench_rules [seconds per run] [runs] [case]`
//! (defaults: 1 s, 3 runs, all cases; each case prints the median of its runs; `case` runs only
//! the cases whose name contains it, e.g. `100`).
//!
//! 1. one simple filter rule, `SELECT * FROM 'devices/+/telemetry' WHERE temperature > 30`
//!    (topic match + WHERE + output for the ~25 % of messages that pass);
//! 2. the same rule's WHERE only, on messages that all fail it (the allocation-free path);
//! 3. 100 rules on the same stream through a `RuleSet` (each message offered to all 100).
//!
//! Payloads are parsed once before timing (the hub parses each message once for all rules).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrohub_rules::{MessageContext, NoLookup, Rule, RuleSet, RunnerLimits};
use serde_json::{Value, json};

struct Msg {
    topic: String,
    payload: Value,
}

fn messages(n: usize, all_cold: bool) -> Vec<Msg> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x % 4000) as f64 / 100.0; // 0 .. 40 °C: about a quarter above 30
            let t = if all_cold { t.min(29.0) } else { t };
            Msg {
                topic: format!("devices/d{}/telemetry", i % 500),
                payload: json!({
                    "temperature": t,
                    "humidity": (x >> 20) % 100,
                    "status": if i % 7 == 0 { "warn" } else { "ok" },
                    "battery": {"level": (x >> 30) % 100, "charging": i % 2 == 0},
                    "pos": [48.0 + (i % 100) as f64 / 1000.0, 2.3],
                }),
            }
        })
        .collect()
}

struct Opts {
    per: Duration,
    runs: usize,
    only: String,
}

fn run(name: &str, o: &Opts, evals_per_msg: u64, mut f: impl FnMut() -> u64) {
    if !name.contains(o.only.as_str()) {
        return;
    }
    // Warm up, then `runs` runs of `per` each; the median rate is reported.
    let w = Instant::now();
    while w.elapsed() < o.per / 5 {
        black_box(f());
    }
    let mut rates = Vec::with_capacity(o.runs);
    let mut cpu_rates = Vec::with_capacity(o.runs);
    let mut outputs_per_msg = 0.0;
    for _ in 0..o.runs {
        let start = Instant::now();
        let cpu_start = cpu_ns();
        let (mut msgs, mut hits) = (0u64, 0u64);
        while start.elapsed() < o.per {
            let (m, h) = (1024u64, f());
            msgs += m;
            hits += h;
        }
        rates.push(msgs as f64 / start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu_start, cpu_ns()) {
            cpu_rates.push(msgs as f64 / ((b - a) as f64 / 1e9));
        }
        outputs_per_msg = hits as f64 / msgs as f64;
    }
    let all: Vec<String> = rates.iter().map(|r| format!("{:.0}", r)).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    cpu_rates.sort_by(f64::total_cmp);
    let cpu = cpu_rates
        .get(cpu_rates.len() / 2)
        .map_or(String::new(), |r| {
            format!("; {r:.0} messages per CPU second")
        });
    println!(
        "{name:<58} {median:>12.0} messages/s {:>13.0} rule evaluations/s  ({outputs_per_msg:.2} outputs/message; runs: {}{cpu})",
        median * evals_per_msg as f64,
        all.join(" ")
    );
}

/// CPU time of this thread in ns (Linux: `/proc/thread-self/schedstat`), which a busy shared
/// machine disturbs less than wall time.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize| std::env::args().nth(i);
    let o = Opts {
        per: Duration::from_secs_f64(arg(1).and_then(|s| s.parse().ok()).unwrap_or(1.0)),
        runs: arg(2).and_then(|s| s.parse().ok()).unwrap_or(3).max(1),
        only: arg(3).unwrap_or_default(),
    };
    let stream = messages(1024, false);
    let cold = messages(1024, true);

    let simple = Rule::compile("SELECT * FROM 'devices/+/telemetry' WHERE temperature > 30")?;
    run(
        "1 rule: topic match + WHERE + SELECT * (25 % pass)",
        &o,
        1,
        || {
            let mut hits = 0;
            for m in &stream {
                let msg = MessageContext::new("acme", &m.topic, &m.payload);
                if simple.matches_topic(msg.topic)
                    && let Ok(Some(v)) = simple.evaluate(&msg, &NoLookup)
                {
                    black_box(v);
                    hits += 1;
                }
            }
            hits
        },
    );
    run("1 rule: WHERE false (no allocation)", &o, 1, || {
        let mut hits = 0;
        for m in &cold {
            let msg = MessageContext::new("acme", &m.topic, &m.payload);
            if simple.matches_topic(msg.topic)
                && matches!(simple.evaluate(&msg, &NoLookup), Ok(Some(_)))
            {
                hits += 1;
            }
        }
        hits
    });

    let mut set = RuleSet::new(RunnerLimits::default());
    for i in 0..100 {
        let sql = match i % 5 {
            0 => format!(
                "SELECT * FROM 'devices/+/telemetry' WHERE temperature > {}",
                30 + i % 10
            ),
            1 => format!(
                "SELECT temperature AS t, topic(2) AS device FROM 'devices/+/telemetry' WHERE humidity > {} AND status = 'warn'",
                90 + i % 10
            ),
            2 => format!(
                "SELECT battery.level AS level FROM 'devices/+/telemetry' WHERE battery.level < {} AND NOT battery.charging",
                i % 10
            ),
            3 => format!(
                "SELECT * FROM 'devices/+/telemetry' WHERE st_distance(pos[0], pos[1], 48.05, 2.3) < {}",
                100 + i
            ),
            _ => format!(
                "SELECT upper(status) AS s FROM 'devices/+/telemetry' WHERE CASE WHEN temperature > 35 THEN humidity > {} ELSE false END",
                95 + i % 5
            ),
        };
        set.insert(&format!("r{i}"), Arc::new(Rule::compile(&sql)?));
    }
    let (mut out, mut errs) = (Vec::new(), Vec::new());
    run(
        "100 rules (RuleSet, mixed filters, one topic filter)",
        &o,
        100,
        || {
            let mut hits = 0;
            for m in &stream {
                let msg = MessageContext::new("acme", &m.topic, &m.payload);
                set.on_message(&msg, &NoLookup, &mut out, &mut errs);
                hits += out.len() as u64;
                out.clear();
            }
            hits
        },
    );
    Ok(())
}
