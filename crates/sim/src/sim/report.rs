//! What a run reports: a live progress line on stderr and the final summary (a table, or JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chaos::Action;
use super::run::{RunConfig, Shared};

/// The outcome of `ferrohub sim run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
            ("connected", self.connected.to_string()),
            ("failed connects", self.failed_connects.to_string()),
            ("messages sent", self.messages_sent.to_string()),
        ];
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

/// The live progress line: redrawn every second on stderr, only when stderr is a terminal.
pub(crate) struct Progress {
    enabled: bool,
    last: Option<(Duration, u64)>,
    drawn: bool,
}

impl Progress {
    pub fn new(requested: bool) -> Progress {
        Progress {
            enabled: requested && std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    pub fn update(&mut self, s: &Shared, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let sent = s.sent.load(Relaxed);
        let rate = match self.last {
            Some((t, n)) if elapsed > t => (sent - n) as f64 / (elapsed - t).as_secs_f64(),
            _ => sent as f64 / elapsed.as_secs_f64().max(1e-9),
        };
        self.last = Some((elapsed, sent));
        let lat = s.latency();
        let q = |p: f64| lat.as_ref().map_or(0.0, |l| l.quantile_ms(p));
        let errors = s.refused.load(Relaxed) + s.lost.load(Relaxed) + s.unacked.load(Relaxed);
        let mut line = format!(
            "[sim] {:>4.0}s  connected {}/{} ({} online",
            elapsed.as_secs_f64(),
            s.connected.load(Relaxed),
            s.devices,
            s.online.load(Relaxed),
        );
        let failed = s.failed_connects.load(Relaxed);
        if failed > 0 {
            let _ = write!(line, ", {failed} failed");
        }
        let reconnects = s.reconnects.load(Relaxed);
        if reconnects > 0 {
            let _ = write!(line, ", {reconnects} reconnects");
        }
        let _ = write!(
            line,
            ")  sent {sent}  acked {}  {rate:.0} msg/s  errors {errors}  p50 {:.1} ms  p99 {:.1} ms",
            s.acked.load(Relaxed),
            q(0.5),
            q(0.99)
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    pub fn finish(&mut self, s: &Shared, elapsed: Duration) {
        if self.drawn {
            self.update(s, elapsed);
            eprintln!();
        }
    }
}
