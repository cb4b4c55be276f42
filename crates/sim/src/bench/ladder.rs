//! Offered-rate ladders and the "maximum sustainable rate" rule.

use thiserror::Error;

/// Why a `--ladder` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LadderError {
    /// The list had no rates.
    #[error("the ladder is empty")]
    Empty,
    /// One entry is not a positive integer (optionally with a `k` or `m` suffix).
    #[error("ladder step {0:?} is not a positive rate (e.g. 5000, 20k, 1.5m)")]
    BadStep(String),
}

/// Parses `"r1,r2,..."` (messages per second; `k`/`m` suffixes allowed) into ascending, distinct
/// rates.
pub fn parse_ladder(s: &str) -> Result<Vec<u64>, LadderError> {
    let mut out = Vec::new();
    for raw in s.split(',') {
        let t = raw.trim();
        if t.is_empty() {
            continue;
        }
        out.push(parse_rate(t).ok_or_else(|| LadderError::BadStep(t.to_string()))?);
    }
    if out.is_empty() {
        return Err(LadderError::Empty);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parse_rate(t: &str) -> Option<u64> {
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix('k') {
        (n, 1_000.0)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n, 1_000_000.0)
    } else {
        (lower.as_str(), 1.0)
    };
    let v: f64 = num.trim().replace('_', "").parse().ok()?;
    let r = (v * mult).round();
    (r.is_finite() && (1.0..=1e12).contains(&r)).then_some(r as u64)
}

/// What "sustainable" means for one ladder step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Criteria {
    /// Largest acceptable loss ratio (0.005 = 0.5 %).
    pub max_loss: f64,
    /// Largest acceptable p99 latency, milliseconds.
    pub max_p99_ms: f64,
    /// The harness must actually have offered at least this fraction of the requested rate
    /// ("delivered in full": a QoS 1 publisher held back by its in-flight window fails here).
    pub min_send_ratio: f64,
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria {
            max_loss: 0.005,
            max_p99_ms: 100.0,
            min_send_ratio: 0.99,
        }
    }
}

/// The figures of one ladder step that the rule looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Offered rate of the step (messages per second).
    pub rate: u64,
    /// Messages actually sent / messages the offered rate asked for.
    pub send_ratio: f64,
    /// Loss ratio (1 - received / expected).
    pub loss: f64,
    /// p99 latency, milliseconds.
    pub p99_ms: f64,
    /// Whether the step ran to completion (no connection failed).
    pub completed: bool,
}

impl Criteria {
    /// Whether one step meets every criterion.
    pub fn sustainable(&self, s: &StepOutcome) -> bool {
        s.completed
            && s.send_ratio >= self.min_send_ratio
            && s.loss <= self.max_loss
            && s.p99_ms <= self.max_p99_ms
    }

    /// The highest offered rate among the sustainable steps, if any.
    pub fn max_sustainable(&self, steps: &[StepOutcome]) -> Option<u64> {
        steps
            .iter()
            .filter(|s| self.sustainable(s))
            .map(|s| s.rate)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ladders() {
        assert_eq!(
            parse_ladder("20k, 5000,10000,,1.5m,5000"),
            Ok(vec![5000, 10_000, 20_000, 1_500_000])
        );
        assert_eq!(parse_ladder("100_000"), Ok(vec![100_000]));
        assert_eq!(parse_ladder(" , "), Err(LadderError::Empty));
        assert_eq!(parse_ladder("10,x"), Err(LadderError::BadStep("x".into())));
        assert_eq!(parse_ladder("0"), Err(LadderError::BadStep("0".into())));
        assert_eq!(parse_ladder("-5"), Err(LadderError::BadStep("-5".into())));
    }

    fn step(rate: u64, send_ratio: f64, loss: f64, p99_ms: f64) -> StepOutcome {
        StepOutcome {
            rate,
            send_ratio,
            loss,
            p99_ms,
            completed: true,
        }
    }

    #[test]
    fn picks_the_highest_sustainable_rate() {
        let c = Criteria::default();
        let steps = [
            step(10_000, 1.0, 0.0, 0.4),
            step(20_000, 1.0, 0.004, 3.0),
            // Loss too high.
            step(40_000, 1.0, 0.02, 5.0),
            // A noisy failure below a pass still lets the higher pass count.
            step(60_000, 1.0, 0.0, 99.0),
            // p99 too high.
            step(80_000, 1.0, 0.0, 150.0),
            // Could not offer the rate.
            step(100_000, 0.8, 0.0, 1.0),
        ];
        assert_eq!(c.max_sustainable(&steps), Some(60_000));
        assert_eq!(c.max_sustainable(&steps[2..3]), None);
        let mut failed = step(5, 1.0, 0.0, 0.1);
        failed.completed = false;
        assert!(!c.sustainable(&failed));
        assert_eq!(c.max_sustainable(&[]), None);
    }
}
