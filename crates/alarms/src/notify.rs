//! Notifications: alarm events matched against the tenant's channels, rate-limited per alarm,
//! and sent by a small worker pool from one bounded queue, so a slow webhook never holds up a
//! raise.
//!
//! - **Queue** (`queue`, default 1000 jobs, all tenants): a notification that does not fit is
//!   not waited for: it is recorded as a failed delivery with reason `queue full` and counted
//!   (`ferrohub_alarm_notifications_total{outcome="dropped"}`).
//! - **Rate limit** (per channel, per alarm): at most one `raised`/`updated` notification per
//!   alarm per `rate_limit_s`; the others are suppressed and counted. Acknowledge and clear
//!   happen once per alarm and always notify.
//! - **Delivery**: per-attempt timeout, retries of timeouts, connection errors, 5xx, 408 and
//!   429 with exponential back-off and jitter; after `max_attempts` the delivery is recorded as
//!   failed. The last `deliveries` outcomes per channel are kept in memory (API).
//! - **Templates**: minijinja, checked when a channel is saved; one render is bounded by fuel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::error::{AlarmError, Result};
use crate::model::{
    Alarm, AlarmEvent, AlarmState, Channel, ChannelKind, ChannelSpec, Delivery, DeliveryStatus,
    EventKind, Severity, WebhookChannel,
};

/// Instructions one template render may execute (bounds loops in a template).
const TEMPLATE_FUEL: u64 = 100_000;
/// Longest URL template.
const MAX_URL: usize = 2048;
/// Largest body or header template.
const MAX_TEMPLATE: usize = 16 * 1024;
/// Headers per channel.
const MAX_HEADERS: usize = 32;
/// Longest rate-limit window (a week).
const MAX_RATE_LIMIT_S: u64 = 7 * 24 * 3600;
/// Rate-limit entries kept; when full, expired ones are swept, and if it is still full the
/// notification goes through unlimited rather than growing the table (counted as sent).
const MAX_RATE_ENTRIES: usize = 100_000;

/// The template environment: no auto-escaping (bodies are JSON or text, not HTML), bounded
/// fuel, `tojson` available.
pub(crate) fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env
}

fn template_error(field: &str, e: &minijinja::Error) -> AlarmError {
    AlarmError::Template {
        field: field.to_string(),
        line: e.line().unwrap_or(1),
        message: e
            .detail()
            .map_or_else(|| e.kind().to_string(), str::to_string),
    }
}

/// Checks a channel before it is saved: bounds, method, header names and template syntax (400
/// with the template's line).
pub fn validate_spec(spec: &ChannelSpec) -> Result<()> {
    let ChannelKind::Webhook(w) = &spec.kind;
    if spec.events.is_empty() {
        return Err(AlarmError::Invalid(
            "events: name at least one of raised, updated, acknowledged, cleared".into(),
        ));
    }
    if spec.rate_limit_s > MAX_RATE_LIMIT_S {
        return Err(AlarmError::Invalid(format!(
            "rate_limit_s: at most {MAX_RATE_LIMIT_S} (a week)"
        )));
    }
    if !matches!(w.method.as_str(), "POST" | "PUT" | "PATCH" | "GET") {
        return Err(AlarmError::Invalid(format!(
            "method `{}`: use POST, PUT, PATCH or GET",
            w.method
        )));
    }
    if !(1..=60_000).contains(&w.timeout_ms) {
        return Err(AlarmError::Invalid("timeout_ms: 1 to 60000".into()));
    }
    if !(1..=10).contains(&w.max_attempts) {
        return Err(AlarmError::Invalid("max_attempts: 1 to 10".into()));
    }
    if w.backoff_ms > 60_000 {
        return Err(AlarmError::Invalid("backoff_ms: at most 60000".into()));
    }
    if w.url.is_empty() || w.url.len() > MAX_URL {
        return Err(AlarmError::Invalid(format!(
            "url: give 1 to {MAX_URL} bytes"
        )));
    }
    if w.headers.len() > MAX_HEADERS {
        return Err(AlarmError::Invalid(format!(
            "headers: at most {MAX_HEADERS}"
        )));
    }
    let env = environment();
    let check = |field: String, src: &str| -> Result<()> {
        if src.len() > MAX_TEMPLATE {
            return Err(AlarmError::Invalid(format!(
                "{field}: at most {MAX_TEMPLATE} bytes"
            )));
        }
        env.template_from_str(src)
            .map(|_| ())
            .map_err(|e| template_error(&field, &e))
    };
    check("url".into(), &w.url)?;
    for (name, value) in &w.headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(AlarmError::Invalid(format!(
                "headers: `{name}` is not a valid header name"
            )));
        }
        check(format!("headers.{name}"), value)?;
    }
    if let Some(body) = &w.body {
        check("body".into(), body)?;
    }
    // A URL without template syntax can be checked now.
    if !w.url.contains("{{") && !w.url.contains("{%") {
        check_url(&w.url)?;
    }
    Ok(())
}

fn check_url(url: &str) -> Result<reqwest::Url> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| AlarmError::Invalid(format!("url `{url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(AlarmError::Invalid(format!(
            "url `{url}`: use http or https"
        )));
    }
    Ok(parsed)
}

/// The `event` of a template's context.
#[derive(Serialize)]
struct EventContext<'a> {
    kind: EventKind,
    seq: i64,
    at_ms: i64,
    by: &'a str,
    note: Option<&'a str>,
}

/// A rendered request.
struct Request {
    url: reqwest::Url,
    headers: Vec<(String, String)>,
    body: String,
}

fn render(
    env: &minijinja::Environment<'static>,
    channel: &Channel,
    w: &WebhookChannel,
    event: &AlarmEvent,
) -> std::result::Result<Request, String> {
    let ev = EventContext {
        kind: event.kind,
        seq: event.seq,
        at_ms: event.at_ms,
        by: &event.by,
        note: event.note.as_deref(),
    };
    let ctx = minijinja::context! {
        alarm => &event.alarm,
        event => &ev,
        tenant => &channel.tenant,
        channel => &channel.id,
    };
    let r = |field: &str, src: &str| {
        env.render_str(src, &ctx)
            .map_err(|e| format!("template: {}", template_error(field, &e)))
    };
    let url = r("url", &w.url)?;
    let url = check_url(url.trim()).map_err(|e| e.to_string())?;
    let mut headers = Vec::with_capacity(w.headers.len());
    for (name, value) in &w.headers {
        headers.push((name.clone(), r(&format!("headers.{name}"), value)?));
    }
    let body = match &w.body {
        Some(b) => r("body", b)?,
        None => json!({"alarm": &event.alarm, "event": &ev}).to_string(),
    };
    Ok(Request { url, headers, body })
}

/// Back-off before attempt `attempt + 1`: `base * 2^(attempt-1)`, ±50 % jitter, at most 30 s.
pub(crate) fn backoff(base_ms: u64, attempt: u32) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(16));
    let jitter = rand::random_range(0.5..1.5);
    Duration::from_millis(((exp as f64) * jitter).min(30_000.0) as u64)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hub-wide notification counters.
#[derive(Debug, Default)]
pub struct NotifyCounters {
    /// Delivered (2xx).
    pub sent: AtomicU64,
    /// Gave up after retries, or could not render.
    pub failed: AtomicU64,
    /// Held back by a channel's rate limit.
    pub suppressed: AtomicU64,
    /// Not queued: the queue was full (or the workers stopped).
    pub dropped: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
}

/// A channel's counters and its last deliveries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChannelDeliveries {
    /// Delivered since the hub started.
    pub sent: u64,
    /// Failed after being queued since the hub started.
    pub failed: u64,
    /// Suppressed by the rate limit since the hub started.
    pub suppressed: u64,
    /// Not queued because the queue was full.
    pub dropped: u64,
    /// The last deliveries, newest first.
    pub deliveries: VecDeque<Delivery>,
}

/// (tenant, channel, alarm): the rate-limit table's key; its value is when a notification last
/// went through, and the window.
type RateKey = (String, String, String);

struct Job {
    channel: Arc<Channel>,
    event: Arc<AlarmEvent>,
}

/// Channels, the queue, the rate limits and the delivery log.
pub(crate) struct Notifier {
    channels: RwLock<HashMap<String, Arc<[Arc<Channel>]>>>,
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
    capacity: usize,
    workers: usize,
    kept: usize,
    http: reqwest::Client,
    env: minijinja::Environment<'static>,
    rate: Mutex<HashMap<RateKey, (Instant, Duration)>>,
    log: Mutex<HashMap<(String, String), ChannelDeliveries>>,
    pub counters: NotifyCounters,
}

impl Notifier {
    pub fn new(capacity: usize, workers: usize, kept: usize) -> Notifier {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Notifier {
            channels: RwLock::new(HashMap::new()),
            tx,
            rx: Mutex::new(Some(rx)),
            capacity: capacity.max(1),
            workers: workers.max(1),
            kept: kept.max(1),
            http: reqwest::Client::new(),
            env: environment(),
            rate: Mutex::new(HashMap::new()),
            log: Mutex::new(HashMap::new()),
            counters: NotifyCounters::default(),
        }
    }

    /// Replaces the cached channels (at start).
    pub fn load(&self, channels: Vec<Channel>) {
        let mut by_tenant: HashMap<String, Vec<Arc<Channel>>> = HashMap::new();
        for c in channels {
            by_tenant
                .entry(c.tenant.clone())
                .or_default()
                .push(Arc::new(c));
        }
        *self.channels.write() = by_tenant
            .into_iter()
            .map(|(t, v)| (t, Arc::from(v)))
            .collect();
    }

    /// The cached channels of a tenant, by id.
    pub fn channels(&self, tenant: &str) -> Arc<[Arc<Channel>]> {
        self.channels
            .read()
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Sets (or with `None` removes) one cached channel.
    pub fn set(&self, tenant: &str, id: &str, channel: Option<Channel>) {
        let mut all = self.channels.write();
        let mut list: Vec<Arc<Channel>> = all
            .get(tenant)
            .map(|l| l.iter().filter(|c| c.id != id).cloned().collect())
            .unwrap_or_default();
        if let Some(c) = channel {
            list.push(Arc::new(c));
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        if list.is_empty() {
            all.remove(tenant);
        } else {
            all.insert(tenant.to_string(), Arc::from(list));
        }
        if channel_removed(&all, tenant, id) {
            self.log
                .lock()
                .remove(&(tenant.to_string(), id.to_string()));
        }
    }

    /// Forgets a tenant's channels, logs and rate limits.
    pub fn forget_tenant(&self, tenant: &str) {
        self.channels.write().remove(tenant);
        self.log.lock().retain(|(t, _), _| t != tenant);
        self.rate.lock().retain(|(t, _, _), _| t != tenant);
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.capacity - self.tx.capacity().min(self.capacity)
    }

    /// A channel's counters and last deliveries.
    pub fn deliveries(&self, tenant: &str, id: &str) -> ChannelDeliveries {
        self.log
            .lock()
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn with_log(&self, channel: &Channel, f: impl FnOnce(&mut ChannelDeliveries)) {
        let mut log = self.log.lock();
        let entry = log
            .entry((channel.tenant.clone(), channel.id.clone()))
            .or_default();
        f(entry);
    }

    /// Counts a delivery's outcome (`dropped`: it never got into the queue) and logs it.
    fn record(&self, channel: &Channel, d: Delivery, dropped: bool) {
        let counter = match d.status {
            _ if dropped => &self.counters.dropped,
            DeliveryStatus::Sent => &self.counters.sent,
            DeliveryStatus::Failed => &self.counters.failed,
        };
        counter.fetch_add(1, Relaxed);
        let kept = self.kept;
        self.with_log(channel, |l| {
            match d.status {
                _ if dropped => l.dropped += 1,
                DeliveryStatus::Sent => l.sent += 1,
                DeliveryStatus::Failed => l.failed += 1,
            }
            if l.deliveries.len() >= kept {
                l.deliveries.pop_back();
            }
            l.deliveries.push_front(d);
        });
    }

    /// Whether the rate limit lets a notification of `alarm` through `channel` now (and if so,
    /// starts its window).
    fn admit(&self, channel: &Channel, alarm: &Alarm) -> bool {
        if channel.spec.rate_limit_s == 0 {
            return true;
        }
        let window = Duration::from_secs(channel.spec.rate_limit_s);
        let key = (channel.tenant.clone(), channel.id.clone(), alarm.id.clone());
        let now = Instant::now();
        let mut rate = self.rate.lock();
        if let Some((at, w)) = rate.get(&key)
            && now.duration_since(*at) < *w
        {
            return false;
        }
        if rate.len() >= MAX_RATE_ENTRIES && !rate.contains_key(&key) {
            rate.retain(|_, (at, w)| now.duration_since(*at) < *w);
            if rate.len() >= MAX_RATE_ENTRIES {
                return true;
            }
        }
        rate.insert(key, (now, window));
        true
    }

    /// Queues the notifications of an event (never waits).
    pub fn dispatch(&self, event: &Arc<AlarmEvent>) {
        let channels = self.channels(&event.alarm.tenant);
        for channel in channels.iter() {
            let s = &channel.spec;
            if !s.enabled
                || !s.events.contains(&event.kind)
                || event.alarm.severity < s.min_severity
            {
                continue;
            }
            if matches!(event.kind, EventKind::Raised | EventKind::Updated)
                && !self.admit(channel, &event.alarm)
            {
                self.counters.suppressed.fetch_add(1, Relaxed);
                self.with_log(channel, |l| l.suppressed += 1);
                continue;
            }
            let job = Job {
                channel: channel.clone(),
                event: event.clone(),
            };
            if let Err(
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
            ) = self.tx.try_send(job)
            {
                self.record(
                    &job.channel,
                    Delivery {
                        at_ms: now_ms(),
                        alarm_id: job.event.alarm.id.clone(),
                        event: job.event.kind,
                        status: DeliveryStatus::Failed,
                        attempts: 0,
                        http_status: None,
                        error: Some("queue full".into()),
                        test: false,
                    },
                    true,
                );
            }
        }
    }

    /// Sends one notification with up to `max_attempts` attempts.
    async fn deliver(
        &self,
        channel: &Channel,
        event: &AlarmEvent,
        max_attempts: u32,
        test: bool,
    ) -> Delivery {
        let ChannelKind::Webhook(w) = &channel.spec.kind;
        let mut d = Delivery {
            at_ms: 0,
            alarm_id: event.alarm.id.clone(),
            event: event.kind,
            status: DeliveryStatus::Failed,
            attempts: 0,
            http_status: None,
            error: None,
            test,
        };
        let req = match render(&self.env, channel, w, event) {
            Ok(r) => r,
            Err(e) => {
                d.error = Some(e);
                d.at_ms = now_ms();
                return d;
            }
        };
        let method =
            reqwest::Method::from_bytes(w.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        loop {
            d.attempts += 1;
            if d.attempts > 1 {
                self.counters.retries.fetch_add(1, Relaxed);
            }
            let mut r = self
                .http
                .request(method.clone(), req.url.clone())
                .timeout(Duration::from_millis(w.timeout_ms));
            if method != reqwest::Method::GET {
                r = r.body(req.body.clone());
                if !req
                    .headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    r = r.header("content-type", "application/json");
                }
            }
            for (k, v) in &req.headers {
                r = r.header(k.as_str(), v.as_str());
            }
            let retryable = match r.send().await {
                Ok(resp) if resp.status().is_success() => {
                    d.status = DeliveryStatus::Sent;
                    d.http_status = Some(resp.status().as_u16());
                    d.error = None;
                    d.at_ms = now_ms();
                    return d;
                }
                Ok(resp) => {
                    let s = resp.status();
                    d.http_status = Some(s.as_u16());
                    d.error = Some(format!("HTTP {s}"));
                    // 4xx other than 408/429 will not get better by retrying.
                    s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429
                }
                Err(e) if e.is_timeout() => {
                    d.http_status = None;
                    d.error = Some(format!("timed out after {} ms", w.timeout_ms));
                    true
                }
                Err(e) => {
                    d.http_status = None;
                    d.error = Some(format!("request failed: {e}"));
                    true
                }
            };
            if !retryable || d.attempts >= max_attempts {
                d.at_ms = now_ms();
                return d;
            }
            tokio::time::sleep(backoff(w.backoff_ms, d.attempts)).await;
        }
    }

    /// Sends a sample notification through a channel now (one attempt) and records it.
    pub async fn test(&self, channel: &Channel) -> Delivery {
        let now = now_ms();
        let event = AlarmEvent {
            seq: 0,
            kind: EventKind::Raised,
            alarm: Alarm {
                tenant: channel.tenant.clone(),
                id: "test".into(),
                key: "test:channel".into(),
                severity: Severity::Critical,
                state: AlarmState::Active,
                device: Some("test-device".into()),
                message: format!("test notification of channel {}", channel.id),
                details: json!({"test": true}),
                source: "api".into(),
                count: 1,
                created_ms: now,
                updated_ms: now,
                last_raised_ms: now,
                acknowledged_ms: None,
                acknowledged_by: None,
                cleared_ms: None,
                cleared_by: None,
            },
            at_ms: now,
            by: "api".into(),
            note: None,
        };
        let d = self.deliver(channel, &event, 1, true).await;
        self.record(channel, d.clone(), false);
        d
    }

    /// Starts the worker pool; on `stop` the workers finish the attempt in hand within `grace`
    /// and are aborted after it. Jobs still queued then are counted as dropped.
    pub fn start(
        self: &Arc<Self>,
        mut stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let rx = self.rx.lock().take();
        let me = self.clone();
        tokio::spawn(async move {
            let Some(rx) = rx else { return };
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..me.workers {
                let (me, rx, mut stop) = (me.clone(), rx.clone(), stop.clone());
                workers.spawn(async move {
                    loop {
                        let job = {
                            let mut rx = rx.lock().await;
                            tokio::select! {
                                _ = stop.wait_for(|s| *s) => return,
                                j = rx.recv() => j,
                            }
                        };
                        let Some(job) = job else { return };
                        let ChannelKind::Webhook(w) = &job.channel.spec.kind;
                        let d = me
                            .deliver(&job.channel, &job.event, w.max_attempts, false)
                            .await;
                        if d.status == DeliveryStatus::Failed {
                            tracing::debug!(tenant = %job.channel.tenant, channel = %job.channel.id,
                                alarm = %d.alarm_id, error = ?d.error, "alarm notification failed");
                        }
                        me.record(&job.channel, d, false);
                    }
                });
            }
            let _ = stop.wait_for(|s| *s).await;
            let drained = async { while workers.join_next().await.is_some() {} };
            if tokio::time::timeout(grace, drained).await.is_err() {
                workers.abort_all();
            }
            let mut rx = rx.lock().await;
            rx.close();
            let mut left = 0u64;
            while rx.try_recv().is_ok() {
                left += 1;
            }
            if left > 0 {
                me.counters.dropped.fetch_add(left, Relaxed);
                tracing::info!(
                    notifications = left,
                    "hub stopping: queued alarm notifications not sent"
                );
            }
        })
    }
}

fn channel_removed(all: &HashMap<String, Arc<[Arc<Channel>]>>, tenant: &str, id: &str) -> bool {
    !all.get(tenant)
        .is_some_and(|l| l.iter().any(|c| c.id == id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WebhookChannel;
    use std::collections::BTreeMap;

    fn spec(url: &str, body: Option<&str>) -> ChannelSpec {
        ChannelSpec {
            kind: ChannelKind::Webhook(WebhookChannel {
                url: url.into(),
                method: "POST".into(),
                headers: BTreeMap::from([("X-Severity".into(), "{{ alarm.severity }}".into())]),
                body: body.map(str::to_string),
                timeout_ms: 1000,
                max_attempts: 3,
                backoff_ms: 10,
            }),
            min_severity: Severity::Info,
            events: EventKind::ALL.to_vec(),
            rate_limit_s: 0,
            enabled: true,
            description: String::new(),
        }
    }

    fn event() -> AlarmEvent {
        AlarmEvent {
            seq: 7,
            kind: EventKind::Raised,
            alarm: Alarm {
                tenant: "t1".into(),
                id: "A1".into(),
                key: "overheat:dev-1".into(),
                severity: Severity::Major,
                state: AlarmState::Active,
                device: Some("dev-1".into()),
                message: "too \"hot\"".into(),
                details: json!({"temp": 91}),
                source: "api".into(),
                count: 1,
                created_ms: 1,
                updated_ms: 1,
                last_raised_ms: 1,
                acknowledged_ms: None,
                acknowledged_by: None,
                cleared_ms: None,
                cleared_by: None,
            },
            at_ms: 1,
            by: "api".into(),
            note: None,
        }
    }

    #[test]
    fn templates_render_alarm_and_event() {
        let s = spec(
            "http://h/{{ alarm.device }}",
            Some(
                r#"{"text": {{ (alarm.severity | upper ~ ": " ~ alarm.message) | tojson }}, "t": {{ alarm.details.temp }}, "k": "{{ event.kind }}"}"#,
            ),
        );
        validate_spec(&s).unwrap();
        let c = Channel {
            tenant: "t1".into(),
            id: "c".into(),
            spec: s,
            updated_ms: 0,
        };
        let ChannelKind::Webhook(w) = &c.spec.kind;
        let r = render(&environment(), &c, w, &event()).unwrap();
        assert_eq!(r.url.as_str(), "http://h/dev-1");
        assert_eq!(r.headers, vec![("X-Severity".into(), "major".into())]);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"text": "MAJOR: too \"hot\"", "t": 91, "k": "raised"})
        );
        // Without a body template: the alarm and the event as JSON.
        let mut c2 = c.clone();
        c2.spec = spec("http://h/", None);
        let ChannelKind::Webhook(w) = &c2.spec.kind;
        let r = render(&environment(), &c2, w, &event()).unwrap();
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["alarm"]["key"], "overheat:dev-1");
        assert_eq!(body["event"]["seq"], 7);
    }

    #[test]
    fn bad_templates_name_their_line() {
        let s = spec("http://h/", Some("{\n  \"a\": {{ alarm.message \n}"));
        match validate_spec(&s) {
            Err(AlarmError::Template { field, line, .. }) => {
                assert_eq!(field, "body");
                assert!(line >= 2, "line {line}");
            }
            other => panic!("{other:?}"),
        }
        let s = spec("ftp://h/", None);
        assert!(matches!(validate_spec(&s), Err(AlarmError::Invalid(_))));
        let mut s = spec("http://h/", None);
        s.events.clear();
        assert!(validate_spec(&s).is_err());
    }

    #[test]
    fn runaway_templates_are_bounded() {
        let s = spec(
            "http://h/",
            Some(
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            ),
        );
        validate_spec(&s).unwrap();
        let c = Channel {
            tenant: "t1".into(),
            id: "c".into(),
            spec: s,
            updated_ms: 0,
        };
        let ChannelKind::Webhook(w) = &c.spec.kind;
        let started = Instant::now();
        let e = render(&environment(), &c, w, &event()).err().unwrap();
        assert!(e.starts_with("template:"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn rate_limit_is_per_alarm_and_channel() {
        let n = Notifier::new(10, 1, 10);
        let mut s = spec("http://h/", None);
        s.rate_limit_s = 60;
        let c = Channel {
            tenant: "t1".into(),
            id: "c".into(),
            spec: s,
            updated_ms: 0,
        };
        let mut a = event().alarm;
        assert!(n.admit(&c, &a));
        assert!(!n.admit(&c, &a));
        a.id = "A2".into();
        assert!(n.admit(&c, &a), "another alarm has its own window");
    }
}
