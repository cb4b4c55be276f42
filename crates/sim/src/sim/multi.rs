//! One run over several processes: `ferrohub sim run --processes N`.
//!
//! A process holds at most as many devices as it may open sockets (here about 19,990: the hard
//! file-descriptor limit of 20,000 cannot be raised), and one process's runtime is bounded by the
//! cores it gets. The parent splits the run's index range into N contiguous slices and starts one
//! child `ferrohub sim run` per slice, with the parent's own arguments plus `--first-index`,
//! `--devices` and the hidden `--worker`. Device ids, profiles and values depend only on the seed
//! and the device index, so the children together produce exactly what one process would.
//!
//! A worker writes JSON lines on stdout ([`WorkerLine`]): a snapshot of its counters every second,
//! then its summary with its PUBACK latency histogram. The parent draws one progress line over all
//! children and merges their summaries into one (counts added, percentiles from the merged
//! histograms, so they are exact and not an average of percentiles). Ctrl-C or SIGTERM to the
//! parent is passed on; each child drains and reports as a single run would. A child that dies
//! without a summary is named in the merged summary's first error, and the run fails.

use std::ffi::OsString;
use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::report::{Snapshot, Summary, draw_progress};
use crate::bench::stats::Latency;

/// One line of a worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLine {
    /// Its counters now.
    Progress(Snapshot),
    /// Its final summary, and its PUBACK latencies as (microseconds, count) pairs.
    Done {
        /// The worker's summary.
        summary: Box<Summary>,
        /// Its latency histogram.
        latency_us: Vec<(u64, u64)>,
    },
}

/// The slices `[first, first + devices)` is cut into: `processes` contiguous ranges whose sizes
/// differ by at most one (no empty slice).
pub fn slices(first: u64, devices: u64, processes: u64) -> Vec<(u64, u64)> {
    let n = processes.clamp(1, devices.max(1));
    let (base, extra) = (devices / n, devices % n);
    let mut out = Vec::with_capacity(n as usize);
    let mut at = first;
    for k in 0..n {
        let len = base + u64::from(k < extra);
        out.push((at, len));
        at += len;
    }
    out
}

/// What the parent knows of one child.
struct Worker {
    child: Child,
    first: u64,
    devices: u64,
    last: Snapshot,
    done: Option<(Summary, Vec<(u64, u64)>)>,
}

/// An event from a child's stdout reader.
enum Event {
    Line(usize, WorkerLine),
    /// A line that is not a worker line (kept for the error message).
    Garbage(usize, String),
    Closed,
}

/// Runs the fleet `[first, first + devices)` as `processes` children of this executable, with
/// `args` (this process's arguments after the program name) plus each child's range; returns
/// the merged summary.
pub async fn run(
    args: Vec<OsString>,
    first: u64,
    devices: u64,
    processes: u64,
    progress: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let exe = std::env::current_exe().context("finding this program to start the workers")?;
    let (tx, mut rx) = mpsc::channel::<Event>(256);
    let mut workers = Vec::new();
    for (k, (start, len)) in slices(first, devices, processes).into_iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .args(["--first-index", &start.to_string()])
            .args(["--devices", &len.to_string()])
            .args(["--processes", "1", "--worker"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting worker {k} ({} sim run, devices {start}..{})",
                exe.display(),
                start + len
            )
        })?;
        let Some(stdout) = child.stdout.take() else {
            bail!("worker {k}: no stdout pipe");
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let ev = match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(l) => Event::Line(k, l),
                    Err(_) => Event::Garbage(k, line),
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Closed).await;
        });
        workers.push(Worker {
            child,
            first: start,
            devices: len,
            last: Snapshot::default(),
            done: None,
        });
    }
    drop(tx);

    let started = Instant::now();
    let draw = progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_drawn: Option<(Duration, u64)> = None;
    let mut open = workers.len();
    let mut garbage: Option<String> = None;
    let mut interrupted = false;
    let mut shutdown = std::pin::pin!(shutdown);
    while open > 0 {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Line(k, WorkerLine::Progress(s))) => {
                    if let Some(w) = workers.get_mut(k) { w.last = s; }
                }
                Some(Event::Line(k, WorkerLine::Done { summary, latency_us })) => {
                    if let Some(w) = workers.get_mut(k) { w.done = Some((*summary, latency_us)); }
                }
                Some(Event::Garbage(k, line)) => {
                    garbage.get_or_insert_with(|| format!("worker {k} wrote {line:?}"));
                }
                Some(Event::Closed) => open -= 1,
                None => break,
            },
            _ = ticker.tick(), if draw => {
                let total = workers.iter().fold(Snapshot::default(), |acc, w| acc.add(&w.last));
                let elapsed = started.elapsed();
                draw_progress(&total, elapsed, &mut last_drawn, workers.len());
            }
            _ = &mut shutdown, if !interrupted => {
                interrupted = true;
                for w in &workers {
                    signal_stop(&w.child);
                }
            }
        }
    }
    if draw && last_drawn.is_some() {
        eprintln!();
    }
    let mut parts = Vec::new();
    let mut latency = Latency::new(2).map_err(|e| anyhow::anyhow!("latency histogram: {e}"))?;
    let mut failures = Vec::new();
    for (k, w) in workers.iter_mut().enumerate() {
        let status = w.child.wait().await.ok();
        match w.done.take() {
            Some((s, pairs)) => {
                latency.add_pairs(&pairs);
                parts.push(s);
            }
            None => failures.push(format!(
                "worker {k} (devices {}..{}) ended{} without a summary",
                w.first,
                w.first + w.devices,
                status.map(|s| format!(" with {s}")).unwrap_or_default()
            )),
        }
    }
    if parts.is_empty() {
        bail!(
            "no worker finished: {}",
            failures
                .into_iter()
                .chain(garbage)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let mut merged = Summary::merge(parts, &latency);
    merged.processes = workers.len() as u64;
    merged.interrupted |= interrupted;
    if let Some(e) = failures.into_iter().chain(garbage).next() {
        merged.first_error = Some(e);
        merged.failed_workers = merged.failed_workers.saturating_add(1);
    }
    Ok(merged)
}

/// Asks a child to stop as Ctrl-C would (it drains and reports).
#[allow(unsafe_code)]
fn signal_stop(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid we started and have not reaped; no memory is touched.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_range_once() {
        assert_eq!(slices(10, 7, 3), vec![(10, 3), (13, 2), (15, 2)]);
        assert_eq!(slices(0, 2, 5), vec![(0, 1), (1, 1)]);
        assert_eq!(slices(5, 9, 1), vec![(5, 9)]);
        for (first, n, p) in [(0, 19_990, 2), (3, 100_001, 7), (0, 1, 1)] {
            let s = slices(first, n, p);
            assert_eq!(s.iter().map(|x| x.1).sum::<u64>(), n);
            assert_eq!(s[0].0, first);
            for w in s.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0);
                assert!(w[0].1.abs_diff(w[1].1) <= 1);
            }
        }
    }

    #[test]
    fn worker_lines_round_trip() {
        let line = WorkerLine::Progress(Snapshot {
            connected: 3,
            sent: 10,
            ..Snapshot::default()
        });
        let text = serde_json::to_string(&line).unwrap();
        match serde_json::from_str::<WorkerLine>(&text).unwrap() {
            WorkerLine::Progress(s) => assert_eq!((s.connected, s.sent), (3, 10)),
            WorkerLine::Done { .. } => panic!("wrong variant"),
        }
    }
}
