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

use serde_json::json;

use crate::model::{TwinSection, WebhookSpec};
use crate::stats::ActionCounters;

/// Why an action failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    /// What went wrong, for the dead letter.
    pub message: String,
    /// A later attempt may succeed (a full queue, a timeout); else the job is given up at once.
    pub retryable: bool,
}

impl ActionError {
    /// A failure that retrying will not fix (invalid topic, unknown device, bad patch).
    pub fn permanent(message: impl Into<String>) -> ActionError {
        ActionError {
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure worth retrying after a back-off.
    pub fn transient(message: impl Into<String>) -> ActionError {
        ActionError {
            message: message.into(),
            retryable: true,
        }
    }
}

fn unavailable(what: &str) -> ActionError {
    ActionError::permanent(format!("{what} is not available in this hub"))
}

/// A command a rule sends.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    /// Command name.
    pub name: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Queued (durable) or direct.
    pub queued: bool,
    /// Lifetime of a queued command, seconds.
    pub ttl_s: Option<u64>,
}

/// What an alarm action asks of the alarm service.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmRequest {
    /// Raise, or fold into the open alarm with the same key.
    Raise {
        /// Dedup key.
        key: String,
        /// One of [`crate::model::SEVERITIES`].
        severity: String,
        /// The device it concerns.
        device: Option<String>,
        /// Human text.
        message: String,
        /// The rule's output.
        details: Json,
    },
    /// Clear the open alarm with this key (nothing open: success).
    Clear {
        /// Dedup key.
        key: String,
    },
}

/// What rule actions and lookups reach in the hub. The binary implements it over the broker,
/// telemetry, twins, commands, alarms and the registry; a method a hub does not implement fails
/// permanently (lookups find nothing).
#[async_trait::async_trait]
pub trait HubLink: Send + Sync + 'static {
    /// Publishes `payload` on `topic` with QoS 0 or 1, as the hub itself (so no rule ever hears
    /// a republished message: loop protection by construction).
    async fn publish(
        &self,
        tenant: &str,
        topic: &str,
        payload: Bytes,
        qos: u8,
    ) -> Result<(), ActionError>;

    /// Stores a device payload (a JSON object with a `ts` key) as telemetry of `device`.
    async fn store_telemetry(
        &self,
        _tenant: &str,
        _device: &str,
        _payload: Json,
    ) -> Result<(), ActionError> {
        Err(unavailable("telemetry"))
    }

    /// Merges `patch` into a section of the device's default twin, written by `actor`.
    async fn update_twin(
        &self,
        _tenant: &str,
        _device: &str,
        _section: TwinSection,
        _patch: Json,
        _actor: &str,
    ) -> Result<(), ActionError> {
        Err(unavailable("the twin service"))
    }

    /// Sends a command to a device on behalf of `actor`.
    async fn send_command(
        &self,
        _tenant: &str,
        _device: &str,
        _command: CommandRequest,
        _actor: &str,
    ) -> Result<(), ActionError> {
        Err(unavailable("the command service"))
    }

    /// Raises or clears an alarm from rule `source` (`rule:<id>`).
    async fn alarm(
        &self,
        _tenant: &str,
        _request: AlarmRequest,
        _source: &str,
    ) -> Result<(), ActionError> {
        Err(unavailable("the alarm service"))
    }

    /// The device's default twin as operators see it (`twin(id)` in rules).
    async fn twin(&self, _tenant: &str, _device: &str) -> Option<Json> {
        None
    }

    /// The device's registry record (`device(id)` in rules).
    async fn device(&self, _tenant: &str, _device: &str) -> Option<Json> {
        None
    }
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
    /// Telemetry of a device.
    StoreTelemetry {
        /// Device id.
        device: String,
        /// A device payload: metrics and `ts`.
        payload: Json,
    },
    /// A twin merge patch.
    UpdateTwin {
        /// Device id.
        device: String,
        /// Section.
        section: TwinSection,
        /// The merge patch.
        patch: Json,
    },
    /// A command.
    Command {
        /// Device id.
        device: String,
        /// What to send.
        command: CommandRequest,
    },
    /// An alarm raise or clear (boxed: the largest job).
    Alarm(Box<AlarmRequest>),
}

impl Job {
    /// Where the job goes, for dead letters and dry runs: topic, URL, device or alarm key.
    pub fn target(&self) -> String {
        match self {
            Job::Republish { topic, .. } => topic.clone(),
            Job::Webhook { url, .. } => url.clone(),
            Job::StoreTelemetry { device, .. } | Job::UpdateTwin { device, .. } => device.clone(),
            Job::Command { device, command } => format!("{device}: {}", command.name),
            Job::Alarm(a) => match &**a {
                AlarmRequest::Raise { key, .. } | AlarmRequest::Clear { key } => key.clone(),
            },
        }
    }

    /// The job as JSON (dry runs show it; a dead letter keeps its `payload`).
    pub fn describe(&self) -> Json {
        match self {
            Job::Republish {
                topic,
                payload,
                qos,
            } => json!({"type": "republish", "topic": topic, "qos": qos,
                "payload": String::from_utf8_lossy(payload)}),
            Job::Webhook { url, headers, body } => json!({"type": "webhook", "url": url,
                "headers": headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                "body": String::from_utf8_lossy(body)}),
            Job::StoreTelemetry { device, payload } => {
                json!({"type": "store_telemetry", "device": device, "payload": payload})
            }
            Job::UpdateTwin {
                device,
                section,
                patch,
            } => json!({"type": "update_twin", "device": device, "section": section,
                "patch": patch}),
            Job::Command { device, command } => json!({"type": "command", "device": device,
                "name": command.name, "payload": String::from_utf8_lossy(&command.payload),
                "queued": command.queued, "ttl_s": command.ttl_s}),
            Job::Alarm(a) => match &**a {
                AlarmRequest::Raise {
                    key,
                    severity,
                    device,
                    message,
                    details,
                } => json!({"type": "alarm", "op": "raise", "key": key, "severity": severity,
                    "device": device, "message": message, "details": details}),
                AlarmRequest::Clear { key } => json!({"type": "alarm", "op": "clear", "key": key}),
            },
        }
    }

    /// What a dead letter keeps of the job.
    fn payload(&self) -> Json {
        match self {
            Job::Republish { payload, .. } => payload_json(payload),
            Job::Webhook { body, .. } => payload_json(body),
            Job::StoreTelemetry { payload, .. } => payload.clone(),
            Job::UpdateTwin { patch, .. } => patch.clone(),
            Job::Command { command, .. } => payload_json(&command.payload),
            Job::Alarm(a) => match &**a {
                AlarmRequest::Raise { details, .. } => details.clone(),
                AlarmRequest::Clear { .. } => Json::Null,
            },
        }
    }
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
    /// `rule:<id>`: the actor of twin writes and commands, the source of alarms.
    pub actor: Arc<str>,
    pub hub: Arc<dyn HubLink>,
    /// Refuse private addresses (the client's resolver covers names; literals are checked here).
    pub deny_private: bool,
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

/// Attempts and first back-off of actions other than webhooks (which set their own).
const DEFAULT_ATTEMPTS: u32 = 3;
const DEFAULT_BACKOFF_MS: u64 = 200;

/// Runs a job, retrying what may succeed later; gives up into a dead letter.
async fn run_job(ctx: &WorkerContext, webhook: Option<&WebhookSpec>, job: Job) {
    let (max_attempts, backoff_ms) = webhook.map_or((DEFAULT_ATTEMPTS, DEFAULT_BACKOFF_MS), |w| {
        (w.max_attempts, w.backoff_ms)
    });
    let mut attempt = 0;
    loop {
        attempt += 1;
        if attempt > 1 {
            ctx.counters.retries.fetch_add(1, Relaxed);
        }
        match attempt_job(ctx, webhook, &job).await {
            Ok(()) => {
                ctx.counters.successes.fetch_add(1, Relaxed);
                return;
            }
            Err(e) => {
                ctx.counters.errors.fetch_add(1, Relaxed);
                if !e.retryable || attempt >= max_attempts {
                    give_up(ctx, attempt, e.message, job.target(), job.payload());
                    return;
                }
            }
        }
        tokio::time::sleep(backoff(backoff_ms, attempt)).await;
    }
}

async fn attempt_job(
    ctx: &WorkerContext,
    webhook: Option<&WebhookSpec>,
    job: &Job,
) -> Result<(), ActionError> {
    let hub = &ctx.hub;
    match job {
        Job::Republish {
            topic,
            payload,
            qos,
        } => hub.publish(&ctx.tenant, topic, payload.clone(), *qos).await,
        Job::Webhook { url, headers, body } => match webhook {
            Some(spec) => send_webhook(ctx, spec, url, headers, body).await,
            None => Err(ActionError::permanent("webhook job without a webhook spec")),
        },
        Job::StoreTelemetry { device, payload } => {
            hub.store_telemetry(&ctx.tenant, device, payload.clone())
                .await
        }
        Job::UpdateTwin {
            device,
            section,
            patch,
        } => {
            hub.update_twin(&ctx.tenant, device, *section, patch.clone(), &ctx.actor)
                .await
        }
        Job::Command { device, command } => {
            hub.send_command(&ctx.tenant, device, command.clone(), &ctx.actor)
                .await
        }
        Job::Alarm(request) => {
            hub.alarm(&ctx.tenant, (**request).clone(), &ctx.actor)
                .await
        }
    }
}

/// Records a dead letter and tells the error action.
pub(crate) fn give_up(
    ctx: &WorkerContext,
    attempts: u32,
    error: String,
    target: String,
    payload: Json,
) {
    let letter = DeadLetter {
        at_ms: now_ms(),
        action: ctx.action,
        attempts,
        error: error.clone(),
        target,
        payload,
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

/// One webhook attempt: 2xx succeeds; 5xx, 408, 429, timeouts and connection errors are worth
/// retrying; other 4xx will not get better.
async fn send_webhook(
    ctx: &WorkerContext,
    spec: &WebhookSpec,
    url: &str,
    headers: &[(String, String)],
    body: &Bytes,
) -> Result<(), ActionError> {
    let method =
        reqwest::Method::from_bytes(spec.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    if ctx.deny_private {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ActionError::permanent(format!("`{url}` is not a URL: {e}")))?;
        if let Some(why) = crate::egress::private_literal(&parsed) {
            return Err(ActionError::permanent(why));
        }
    }
    let mut req = ctx
        .http
        .request(method, url)
        .timeout(Duration::from_millis(spec.timeout_ms))
        .body(body.clone());
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let s = resp.status();
            let error = format!("HTTP {s}");
            if s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429 {
                Err(ActionError::transient(error))
            } else {
                Err(ActionError::permanent(error))
            }
        }
        Err(e) if e.is_timeout() => Err(ActionError::transient(format!(
            "timed out after {} ms",
            spec.timeout_ms
        ))),
        Err(e) => {
            // The resolver's and redirect policy's refusals are in the error's sources.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            if ctx.deny_private && text.contains("webhook_deny_private") {
                Err(ActionError::permanent(format!("request refused: {text}")))
            } else {
                Err(ActionError::transient(format!("request failed: {text}")))
            }
        }
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
