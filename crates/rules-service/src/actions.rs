//! Actions: each action of each rule has its own bounded queue and one worker task, so a slow
//! webhook holds up only its own queue — never the router, the evaluation task or other rules.
//!
//! Overflow policy: a job that does not fit in the action's queue is not dropped silently; it
//! becomes a dead letter (reason `queue full`), counted, and the rule's error action fires.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::mpsc;

use crate::model::WebhookSpec;
use crate::stats::ActionCounters;

/// How the service publishes: the binary implements it over the broker, publishing as the hub
/// (so no rule ever hears a republished message: loop protection by construction).
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `payload` on `topic` in `tenant` with QoS 0 or 1; `Err` with a reason when the
    /// topic is invalid or the broker refused it.
    fn publish(
        &self,
        tenant: &str,
        topic: &str,
        payload: Bytes,
        qos: u8,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
}

/// A job for one action: everything already rendered on the evaluation task.
#[derive(Debug, Clone)]
pub enum Job {
    /// Publish.
    Republish {
        /// Rendered topic.
        topic: String,
        /// The output.
        payload: Bytes,
        /// 0 or 1.
        qos: u8,
    },
    /// HTTP request.
    Webhook {
        /// Rendered URL.
        url: String,
        /// Rendered headers.
        headers: Vec<(String, String)>,
        /// Rendered body.
        body: Bytes,
    },
}

/// A message an action gave up on (API: `GET …/rules/{id}/dead-letters`).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// When, Unix ms.
    pub at_ms: i64,
    /// Index of the action in the rule (`null`: the error action).
    pub action: Option<usize>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// Where it was going (topic or URL).
    pub target: String,
    /// The payload or body, as JSON when it parses, else as text.
    pub payload: Json,
}

/// A rule's dead letters: bounded, the oldest evicted (and counted) when full.
#[derive(Debug)]
pub struct DeadLetters {
    items: Mutex<VecDeque<DeadLetter>>,
    capacity: usize,
    /// Evicted because the list was full.
    pub evicted: AtomicU64,
}

impl DeadLetters {
    /// A list holding at most `capacity` letters.
    pub fn new(capacity: usize) -> DeadLetters {
        DeadLetters {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            evicted: AtomicU64::new(0),
        }
    }

    /// Adds a letter, evicting the oldest when full.
    pub fn push(&self, letter: DeadLetter) {
        let mut items = self.items.lock();
        if items.len() >= self.capacity {
            items.pop_front();
            self.evicted.fetch_add(1, Relaxed);
        }
        items.push_back(letter);
    }

    /// The letters, oldest first.
    pub fn list(&self) -> Vec<DeadLetter> {
        self.items.lock().iter().cloned().collect()
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a worker reports when it gives up on a job, for the error action.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Index of the action.
    pub action: Option<usize>,
    /// The error.
    pub error: String,
    /// The dead letter it became.
    pub letter: DeadLetter,
}

/// The sending side of one action's queue.
#[derive(Debug, Clone)]
pub struct ActionQueue {
    tx: mpsc::Sender<Job>,
    /// Counters of the action.
    pub counters: Arc<ActionCounters>,
    /// `republish` or `webhook`.
    pub kind: &'static str,
}

impl ActionQueue {
    /// Queues a job; the job back when the queue is full (or the worker stopped).
    pub fn offer(&self, job: Job) -> Result<(), Job> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j)) => {
                Err(j)
            }
        }
    }
}

/// Everything a worker needs besides its queue.
pub(crate) struct WorkerContext {
    pub tenant: Arc<str>,
    pub action: Option<usize>,
    pub counters: Arc<ActionCounters>,
    pub dead_letters: Arc<DeadLetters>,
    pub publisher: Arc<dyn Publisher>,
    pub http: reqwest::Client,
    /// Failures go here (to the error action); `None` for the error action itself, whose own
    /// failures only become dead letters (no error action of the error action).
    pub failures: Option<mpsc::Sender<Failure>>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn payload_json(b: &[u8]) -> Json {
    serde_json::from_slice(b).unwrap_or_else(|_| Json::String(String::from_utf8_lossy(b).into()))
}

/// Starts the worker of one action; it stops when every sender is dropped (the rule was
/// removed or replaced) after finishing what is queued.
pub(crate) fn spawn_worker(
    ctx: WorkerContext,
    webhook: Option<WebhookSpec>,
    capacity: usize,
    kind: &'static str,
) -> ActionQueue {
    let (tx, mut rx) = mpsc::channel::<Job>(capacity.max(1));
    let counters = ctx.counters.clone();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            ctx.counters.queued.fetch_sub(1, Relaxed);
            run_job(&ctx, webhook.as_ref(), job).await;
        }
    });
    ActionQueue { tx, counters, kind }
}

async fn run_job(ctx: &WorkerContext, webhook: Option<&WebhookSpec>, job: Job) {
    match job {
        Job::Republish {
            topic,
            payload,
            qos,
        } => match ctx
            .publisher
            .publish(&ctx.tenant, &topic, payload.clone(), qos)
            .await
        {
            Ok(()) => {
                ctx.counters.successes.fetch_add(1, Relaxed);
            }
            Err(error) => {
                ctx.counters.errors.fetch_add(1, Relaxed);
                give_up(ctx, 1, error, topic, &payload);
            }
        },
        Job::Webhook { url, headers, body } => {
            let Some(spec) = webhook else { return };
            send_webhook(ctx, spec, url, headers, body).await;
        }
    }
}

/// Records a dead letter and tells the error action.
pub(crate) fn give_up(
    ctx: &WorkerContext,
    attempts: u32,
    error: String,
    target: String,
    payload: &[u8],
) {
    let letter = DeadLetter {
        at_ms: now_ms(),
        action: ctx.action,
        attempts,
        error: error.clone(),
        target,
        payload: payload_json(payload),
    };
    ctx.counters.dead_letters.fetch_add(1, Relaxed);
    ctx.dead_letters.push(letter.clone());
    tracing::debug!(tenant = %ctx.tenant, action = ?ctx.action, attempts, error, "rule action gave up: dead letter");
    if let Some(f) = &ctx.failures {
        // Full: the dead letter is already recorded and counted; the error action misses it.
        let _ = f.try_send(Failure {
            action: ctx.action,
            error,
            letter,
        });
    }
}

/// Back-off before attempt `attempt + 1`: `base * 2^(attempt-1)`, ±50 % jitter, at most 30 s.
fn backoff(base_ms: u64, attempt: u32) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(16));
    let jitter = rand::random_range(0.5..1.5);
    Duration::from_millis(((exp as f64) * jitter).min(30_000.0) as u64)
}

async fn send_webhook(
    ctx: &WorkerContext,
    spec: &WebhookSpec,
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
) {
    let method =
        reqwest::Method::from_bytes(spec.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut attempt = 0;
    loop {
        attempt += 1;
        if attempt > 1 {
            ctx.counters.retries.fetch_add(1, Relaxed);
        }
        let mut req = ctx
            .http
            .request(method.clone(), &url)
            .timeout(Duration::from_millis(spec.timeout_ms))
            .body(body.clone());
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let (error, retryable) = match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                ctx.counters.successes.fetch_add(1, Relaxed);
                return;
            }
            Ok(resp) => {
                let s = resp.status();
                // 4xx other than 408/429 will not get better by retrying.
                let retryable = s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429;
                (format!("HTTP {s}"), retryable)
            }
            Err(e) if e.is_timeout() => (format!("timed out after {} ms", spec.timeout_ms), true),
            Err(e) => (format!("request failed: {e}"), true),
        };
        ctx.counters.errors.fetch_add(1, Relaxed);
        if !retryable || attempt >= spec.max_attempts {
            give_up(ctx, attempt, error, url, &body);
            return;
        }
        tokio::time::sleep(backoff(spec.backoff_ms, attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_bounded() {
        let d = DeadLetters::new(2);
        for i in 0..5 {
            d.push(DeadLetter {
                at_ms: i,
                action: Some(0),
                attempts: 1,
                error: "x".into(),
                target: "t".into(),
                payload: Json::Null,
            });
        }
        let l = d.list();
        assert_eq!(l.iter().map(|l| l.at_ms).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(d.evicted.load(Relaxed), 3);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(100, 1) <= Duration::from_millis(150));
        assert!(backoff(100, 4) >= Duration::from_millis(400));
        assert!(backoff(60_000, 20) <= Duration::from_secs(30));
    }
}
