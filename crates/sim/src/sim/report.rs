//! What a run reports: a live progress line on stderr and the final summary (a table, or JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chaos::Action;
use super::run::{RunConfig, Shared};
use crate::bench::stats::Latency;

/// The outcome of `ferrohub sim run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Broker address as given.
    pub broker: String,
    /// `3.1.1` or `5.0`.
    pub protocol: String,
    /// QoS of the publications.
    pub qos: u8,
    /// Seed of the generators.
    pub seed: u64,
    /// Lowest device index of this process.
    pub first_index: u64,
    /// Devices this process simulated.
    pub devices: u64,
    /// Devices per profile.
    pub profiles: BTreeMap<String, u64>,
    /// Devices whose CONNECT succeeded.
    pub connected: u64,
    /// Devices whose connection or CONNECT failed.
    pub failed_connects: u64,
    /// PUBLISH packets written.
    pub messages_sent: u64,
    /// PUBLISH packets acknowledged with a success code (QoS 1).
    pub messages_acked: u64,
    /// Samples in the messages sent (messages × batch).
    pub samples_sent: u64,
    /// PUBACKs with an error reason code (MQTT 5).
    pub refused: u64,
    /// Connections that ended before the run did (closed by the broker, write failed, or no
    /// PUBACK within the ack timeout).
    pub connections_lost: u64,
    /// QoS 1 messages never acknowledged (lost with their connection, or still outstanding when
    /// the drain ended).
    pub unacked: u64,
    /// `refused + connections_lost + unacked`.
    pub errors: u64,
    /// Messages per second over the run (acknowledged at QoS 1, sent at QoS 0).
    pub msgs_per_s: f64,
    /// PUBACK latency, median, milliseconds.
    pub latency_p50_ms: f64,
    /// PUBACK latency, 99th percentile, milliseconds.
    pub latency_p99_ms: f64,
    /// Longest PUBACK latency, milliseconds.
    pub latency_max_ms: f64,
    /// Wall time of the run, seconds (ramp-up and drain included).
    pub duration_s: f64,
    /// Connections re-established after a lost connection or a chaos disconnect.
    #[serde(default)]
    pub reconnects: u64,
    /// Reconnection attempts that failed.
    #[serde(default)]
    pub reconnect_failures: u64,
    /// Chaos actions taken, by kind (`disconnect`, `latency`, `loss`, `burst`, `oversized`,
    /// `malformed`, `flood`); only kinds that happened.
    #[serde(default)]
    pub chaos: BTreeMap<String, u64>,
    /// The broker's error answers by packet and reason code (`"PUBACK 0x99"`, `"DISCONNECT
    /// 0x95"`, `"CONNACK 0x86"`), including those to deliberate misbehaviour.
    #[serde(default)]
    pub answers: BTreeMap<String, u64>,
    /// QoS 1 messages sent again after a reconnect (not counted in `messages_sent` again).
    #[serde(default)]
    pub resent: u64,
    /// Twin updates the devices sent (reports at connect, health, applied desired settings).
    #[serde(default)]
    pub twin_reports: u64,
    /// Desired settings applied (and reported back).
    #[serde(default)]
    pub desired_applied: u64,
    /// Desired settings refused (unknown to the device, or a bad value), with a reason.
    #[serde(default)]
    pub desired_rejected: u64,
    /// Commands answered (any status).
    #[serde(default)]
    pub commands_answered: u64,
    /// Reboots done on command.
    #[serde(default)]
    pub reboots: u64,
    /// Incoming messages dropped because a device's inbox was full.
    #[serde(default)]
    pub incoming_dropped: u64,
    /// The run was stopped by a signal.
    pub interrupted: bool,
    /// The first error any device met.
    pub first_error: Option<String>,
    /// CPU time this run's process(es) used, seconds (user + system; ramp-up and drain included).
    #[serde(default)]
    pub cpu_s: f64,
    /// Length of the steady window: from the first second every device was connected until the
    /// run stopped (0 when not every device connected), seconds.
    #[serde(default)]
    pub steady_s: f64,
    /// Messages counted in the steady window (acknowledged at QoS 1, sent at QoS 0).
    #[serde(default)]
    pub steady_msgs: u64,
    /// `steady_msgs / steady_s`: the sustained rate, without ramp-up and drain.
    #[serde(default)]
    pub steady_msgs_per_s: f64,
    /// CPU time the simulator used in the steady window, seconds (all processes): divided by
    /// `steady_s`, the cores it takes to sustain `steady_msgs_per_s`.
    #[serde(default)]
    pub steady_cpu_s: f64,
    /// Processes the run was spread over (`--processes`; 1 for a single process).
    #[serde(default = "one")]
    pub processes: u64,
    /// Worker processes that ended without a summary (their devices are missing from the counts).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_workers: u64,
    /// PUBACK latencies as (microseconds, count) pairs: what a worker hands to the parent so that
    /// merged percentiles are exact (not printed).
    #[serde(skip)]
    pub latency_us: Vec<(u64, u64)>,
}

fn one() -> u64 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Summary {
    pub(crate) fn new(
        cfg: &RunConfig,
        s: &Shared,
        elapsed: Duration,
        first_index: u64,
        profiles: Vec<(String, u64)>,
        interrupted: bool,
    ) -> Summary {
        let qos1 = cfg.qos != ferrohub_types::QoS::AtMostOnce;
        let lat = s.latency();
        let q = |p: f64| lat.as_ref().map_or(0.0, |l| l.quantile_ms(p));
        let sent = s.sent.load(Relaxed);
        let acked = s.acked.load(Relaxed);
        let refused = s.refused.load(Relaxed);
        let lost = s.lost.load(Relaxed);
        let unacked = s.unacked.load(Relaxed);
        let secs = elapsed.as_secs_f64().max(1e-9);
        Summary {
            broker: cfg.broker.clone(),
            protocol: if cfg.opts.version.is_v5() {
                "5.0".into()
            } else {
                "3.1.1".into()
            },
            qos: cfg.qos as u8,
            seed: cfg.seed,
            first_index,
            devices: s.devices,
            profiles: profiles.into_iter().collect(),
            connected: s.connected.load(Relaxed),
            failed_connects: s.failed_connects.load(Relaxed),
            messages_sent: sent,
            messages_acked: acked,
            samples_sent: s.samples.load(Relaxed),
            refused,
            connections_lost: lost,
            unacked,
            errors: refused + lost + unacked,
            msgs_per_s: (if qos1 { acked } else { sent }) as f64 / secs,
            latency_p50_ms: q(0.5),
            latency_p99_ms: q(0.99),
            latency_max_ms: lat.as_ref().map_or(0.0, |l| l.max_ms()),
            duration_s: secs,
            reconnects: s.reconnects.load(Relaxed),
            reconnect_failures: s.reconnect_failures.load(Relaxed),
            chaos: Action::ALL
                .iter()
                .zip(&s.chaos)
                .map(|(a, c)| (a.name().to_string(), c.load(Relaxed)))
                .filter(|(_, c)| *c > 0)
                .collect(),
            answers: s.answers.lock().clone(),
            resent: s.resent.load(Relaxed),
            twin_reports: s.twin_reports.load(Relaxed),
            desired_applied: s.desired_applied.load(Relaxed),
            desired_rejected: s.desired_rejected.load(Relaxed),
            commands_answered: s.commands_answered.load(Relaxed),
            reboots: s.reboots.load(Relaxed),
            incoming_dropped: s.incoming_dropped.load(Relaxed),
            interrupted,
            first_error: s.first_error.lock().clone(),
            cpu_s: 0.0,
            steady_s: 0.0,
            steady_msgs: 0,
            steady_msgs_per_s: 0.0,
            steady_cpu_s: 0.0,
            processes: 1,
            failed_workers: 0,
            latency_us: lat.as_ref().map(Latency::pairs).unwrap_or_default(),
        }
    }

    /// The summary of one run made of `parts` (the summaries of its processes, in index order)
    /// whose PUBACK latencies are `latency`: counts add up, the rate is every process's messages
    /// over the longest process's wall time, percentiles come from the merged histogram.
    pub fn merge(parts: Vec<Summary>, latency: &Latency) -> Summary {
        let mut parts = parts.into_iter();
        let Some(mut m) = parts.next() else {
            return Summary::default();
        };
        let mut steady_cores = m.steady_cores();
        for p in parts {
            steady_cores += p.steady_cores();
            m.first_index = m.first_index.min(p.first_index);
            m.devices += p.devices;
            for (k, v) in p.profiles {
                *m.profiles.entry(k).or_insert(0) += v;
            }
            m.connected += p.connected;
            m.failed_connects += p.failed_connects;
            m.messages_sent += p.messages_sent;
            m.messages_acked += p.messages_acked;
            m.samples_sent += p.samples_sent;
            m.refused += p.refused;
            m.connections_lost += p.connections_lost;
            m.unacked += p.unacked;
            m.errors += p.errors;
            m.duration_s = m.duration_s.max(p.duration_s);
            m.reconnects += p.reconnects;
            m.resent += p.resent;
            m.twin_reports += p.twin_reports;
            m.desired_applied += p.desired_applied;
            m.desired_rejected += p.desired_rejected;
            m.commands_answered += p.commands_answered;
            m.reboots += p.reboots;
            m.incoming_dropped += p.incoming_dropped;
            m.reconnect_failures += p.reconnect_failures;
            for (k, v) in p.chaos {
                *m.chaos.entry(k).or_insert(0) += v;
            }
            for (k, v) in p.answers {
                *m.answers.entry(k).or_insert(0) += v;
            }
            m.interrupted |= p.interrupted;
            m.first_error = m.first_error.or(p.first_error);
            m.cpu_s += p.cpu_s;
            // The processes' windows overlap in wall time: their rates add up over the shortest.
            m.steady_msgs_per_s += p.steady_msgs_per_s;
            m.steady_msgs += p.steady_msgs;
            m.steady_s = m.steady_s.min(p.steady_s);
            m.processes += p.processes;
            m.failed_workers += p.failed_workers;
        }
        let counted = if m.qos > 0 {
            m.messages_acked
        } else {
            m.messages_sent
        };
        m.msgs_per_s = counted as f64 / m.duration_s.max(1e-9);
        // Concurrent windows: the processes' cores add up, over the shortest window.
        m.steady_cpu_s = steady_cores * m.steady_s;
        if m.steady_s <= 0.0 {
            // A process never had all its devices connected: the run as a whole had no steady
            // window, and a rate over the other processes alone would mislead.
            m.steady_msgs_per_s = 0.0;
            m.steady_msgs = 0;
            m.steady_cpu_s = 0.0;
        }
        m.latency_p50_ms = latency.quantile_ms(0.5);
        m.latency_p99_ms = latency.quantile_ms(0.99);
        m.latency_max_ms = latency.max_ms();
        m.latency_us = latency.pairs();
        m
    }

    /// Cores the simulator took in the steady window (0 without one).
    pub fn steady_cores(&self) -> f64 {
        if self.steady_s > 0.0 {
            self.steady_cpu_s / self.steady_s
        } else {
            0.0
        }
    }

    /// The summary as an aligned two-column table.
    pub fn table(&self) -> String {
        let profiles = self
            .profiles
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ms = |v: f64| format!("{v:.2} ms");
        let mut rows: Vec<(&str, String)> = vec![
            ("broker", self.broker.clone()),
            (
                "protocol",
                format!("MQTT {}, QoS {}", self.protocol, self.qos),
            ),
            (
                "devices",
                format!(
                    "{} (indices {}..{}, seed {})",
                    self.devices,
                    self.first_index,
                    self.first_index + self.devices,
                    self.seed
                ),
            ),
            ("profiles", profiles),
        ];
        if self.processes > 1 || self.failed_workers > 0 {
            rows.push((
                "processes",
                if self.failed_workers > 0 {
                    format!(
                        "{} ({} ended without a summary)",
                        self.processes, self.failed_workers
                    )
                } else {
                    self.processes.to_string()
                },
            ));
        }
        rows.extend([
            ("connected", self.connected.to_string()),
            ("failed connects", self.failed_connects.to_string()),
            ("messages sent", self.messages_sent.to_string()),
        ]);
        if self.qos > 0 {
            rows.push(("messages acked", self.messages_acked.to_string()));
        }
        rows.push(("samples sent", self.samples_sent.to_string()));
        rows.push((
            "errors",
            format!(
                "{} (refused {}, connections lost {}, unacked {})",
                self.errors, self.refused, self.connections_lost, self.unacked
            ),
        ));
        if self.reconnects > 0 || self.reconnect_failures > 0 {
            rows.push((
                "reconnects",
                format!(
                    "{} ({} failed attempts)",
                    self.reconnects, self.reconnect_failures
                ),
            ));
        }
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.resent > 0 {
            rows.push(("resent", self.resent.to_string()));
        }
        if self.twin_reports + self.commands_answered + self.incoming_dropped > 0 {
            rows.push((
                "behaviour",
                format!(
                    "twin reports {}, desired applied {} (rejected {}), commands answered {}, \
                     reboots {}, incoming dropped {}",
                    self.twin_reports,
                    self.desired_applied,
                    self.desired_rejected,
                    self.commands_answered,
                    self.reboots,
                    self.incoming_dropped
                ),
            ));
        }
        if !self.chaos.is_empty() {
            rows.push(("chaos", join(&self.chaos)));
        }
        if !self.answers.is_empty() {
            rows.push(("broker answers", join(&self.answers)));
        }
        rows.push(("msgs/s", format!("{:.1}", self.msgs_per_s)));
        if self.steady_s > 0.0 {
            rows.push((
                "steady msgs/s",
                format!(
                    "{:.1} (over {:.1} s with every device connected; sim CPU {:.2} cores)",
                    self.steady_msgs_per_s,
                    self.steady_s,
                    self.steady_cores()
                ),
            ));
        }
        if self.cpu_s > 0.0 {
            rows.push((
                "sim CPU",
                format!(
                    "{:.2} s ({:.2} cores)",
                    self.cpu_s,
                    self.cpu_s / self.duration_s.max(1e-9)
                ),
            ));
        }
        if self.qos > 0 {
            rows.push(("PUBACK p50", ms(self.latency_p50_ms)));
            rows.push(("PUBACK p99", ms(self.latency_p99_ms)));
            rows.push(("PUBACK max", ms(self.latency_max_ms)));
        }
        rows.push((
            "duration",
            format!(
                "{:.2} s{}",
                self.duration_s,
                if self.interrupted {
                    " (interrupted)"
                } else {
                    ""
                }
            ),
        ));
        if let Some(e) = &self.first_error {
            rows.push(("first error", e.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

/// How a run shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Nothing.
    Off,
    /// A line redrawn every second on stderr, when stderr is a terminal.
    Terminal,
    /// A [`Snapshot`] as a JSON line on stdout every second (a worker of `--processes`).
    JsonLines,
}

/// A run's counters at one moment: what the progress line shows, and what a worker process sends
/// its parent every second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Devices simulated.
    pub devices: u64,
    /// Devices whose CONNECT succeeded.
    pub connected: u64,
    /// Devices connected now.
    pub online: u64,
    /// Devices that failed to connect.
    pub failed: u64,
    /// Reconnections so far.
    pub reconnects: u64,
    /// PUBLISH packets written.
    pub sent: u64,
    /// PUBLISH packets acknowledged.
    pub acked: u64,
    /// Refused, lost connections and unacknowledged messages.
    pub errors: u64,
    /// PUBACK latency median so far, milliseconds.
    pub p50_ms: f64,
    /// PUBACK latency 99th percentile so far, milliseconds.
    pub p99_ms: f64,
}

impl Snapshot {
    pub(crate) fn of(s: &Shared) -> Snapshot {
        let lat = s.latency();
        let q = |p: f64| lat.as_ref().map_or(0.0, |l| l.quantile_ms(p));
        Snapshot {
            devices: s.devices,
            connected: s.connected.load(Relaxed),
            online: s.online.load(Relaxed),
            failed: s.failed_connects.load(Relaxed),
            reconnects: s.reconnects.load(Relaxed),
            sent: s.sent.load(Relaxed),
            acked: s.acked.load(Relaxed),
            errors: s.refused.load(Relaxed) + s.lost.load(Relaxed) + s.unacked.load(Relaxed),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
        }
    }

    /// Counts added; latencies are the worse of the two (a live line over several processes
    /// shows the slowest one; the final summary merges histograms exactly).
    pub fn add(&self, o: &Snapshot) -> Snapshot {
        Snapshot {
            devices: self.devices + o.devices,
            connected: self.connected + o.connected,
            online: self.online + o.online,
            failed: self.failed + o.failed,
            reconnects: self.reconnects + o.reconnects,
            sent: self.sent + o.sent,
            acked: self.acked + o.acked,
            errors: self.errors + o.errors,
            p50_ms: self.p50_ms.max(o.p50_ms),
            p99_ms: self.p99_ms.max(o.p99_ms),
        }
    }
}

/// Draws the progress line for `s` on stderr; `last` holds the previous (elapsed, sent) for the
/// rate; `processes` above 1 is shown.
pub(crate) fn draw_progress(
    s: &Snapshot,
    elapsed: Duration,
    last: &mut Option<(Duration, u64)>,
    processes: usize,
) {
    let rate = match *last {
        Some((t, n)) if elapsed > t => {
            s.sent.saturating_sub(n) as f64 / (elapsed - t).as_secs_f64()
        }
        _ => s.sent as f64 / elapsed.as_secs_f64().max(1e-9),
    };
    *last = Some((elapsed, s.sent));
    let mut line = format!("[sim] {:>4.0}s  ", elapsed.as_secs_f64());
    if processes > 1 {
        let _ = write!(line, "{processes} processes  ");
    }
    let _ = write!(
        line,
        "connected {}/{} ({} online",
        s.connected, s.devices, s.online
    );
    if s.failed > 0 {
        let _ = write!(line, ", {} failed", s.failed);
    }
    if s.reconnects > 0 {
        let _ = write!(line, ", {} reconnects", s.reconnects);
    }
    let _ = write!(
        line,
        ")  sent {}  acked {}  {rate:.0} msg/s  errors {}  p50 {:.1} ms  p99 {:.1} ms",
        s.sent, s.acked, s.errors, s.p50_ms, s.p99_ms
    );
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{line}");
    let _ = err.flush();
}

/// The live progress of one process.
pub(crate) struct Progress {
    mode: ProgressMode,
    last: Option<(Duration, u64)>,
    drawn: bool,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        let mode = match mode {
            ProgressMode::Terminal if !std::io::stderr().is_terminal() => ProgressMode::Off,
            m => m,
        };
        Progress {
            mode,
            last: None,
            drawn: false,
        }
    }

    pub fn update(&mut self, s: &Shared, elapsed: Duration) {
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Terminal => {
                draw_progress(&Snapshot::of(s), elapsed, &mut self.last, 1);
                self.drawn = true;
            }
            ProgressMode::JsonLines => {
                let line = super::multi::WorkerLine::Progress(Snapshot::of(s));
                if let Ok(text) = serde_json::to_string(&line) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{text}");
                    let _ = out.flush();
                }
            }
        }
    }

    pub fn finish(&mut self, s: &Shared, elapsed: Duration) {
        if self.drawn {
            self.update(s, elapsed);
            eprintln!();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every count of a summary, set to `n` through its JSON form (so a counter added later is
    /// covered without touching this test).
    fn with_counts(n: u64) -> Summary {
        let mut v = serde_json::to_value(Summary::default()).unwrap();
        for (k, x) in v.as_object_mut().unwrap() {
            if x.is_u64() && !["qos", "seed", "first_index"].contains(&k.as_str()) {
                *x = n.into();
            }
        }
        v["duration_s"] = 2.0.into();
        v["steady_s"] = 1.0.into();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn merging_adds_every_count() {
        let mut latency = Latency::new(2).unwrap();
        latency.record_ns(3_000_000);
        let m = Summary::merge(vec![with_counts(1), with_counts(2)], &latency);
        let v = serde_json::to_value(&m).unwrap();
        for (k, x) in v.as_object().unwrap() {
            if x.is_u64() && !["qos", "seed", "first_index"].contains(&k.as_str()) {
                assert_eq!(x.as_u64(), Some(3), "{k} is not added up when merging");
            }
        }
        assert_eq!(m.duration_s, 2.0);
        assert!((m.latency_p99_ms - 3.0).abs() < 0.05);
    }

    #[test]
    fn steady_windows_merge_only_when_every_process_had_one() {
        let part = |s: f64, rate: f64, cpu: f64| Summary {
            steady_s: s,
            steady_msgs_per_s: rate,
            steady_msgs: (s * rate) as u64,
            steady_cpu_s: cpu,
            ..Summary::default()
        };
        let lat = Latency::new(2).unwrap();
        let m = Summary::merge(vec![part(10.0, 100.0, 5.0), part(8.0, 50.0, 2.0)], &lat);
        assert_eq!(m.steady_s, 8.0);
        assert_eq!(m.steady_msgs_per_s, 150.0);
        // 0.5 + 0.25 cores.
        assert!(
            (m.steady_cores() - 0.75).abs() < 1e-9,
            "{}",
            m.steady_cores()
        );
        let m = Summary::merge(vec![part(10.0, 100.0, 5.0), part(0.0, 0.0, 0.0)], &lat);
        assert_eq!(
            (m.steady_s, m.steady_msgs_per_s, m.steady_msgs),
            (0.0, 0.0, 0)
        );
    }
}
