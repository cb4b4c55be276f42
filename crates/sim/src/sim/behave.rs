//! What a simulated device does besides publishing telemetry: it reports firmware and health in
//! its twin, applies desired settings the hub sends in the twin delta, and answers commands
//! (topics and payloads as in `docs/device-api.md`).
//!
//! This module is the device's logic without I/O: it turns an incoming PUBLISH into the messages
//! the device sends back and the change it makes to itself ([`Effect`]); `run` does the I/O.
//! Behaviour messages are rare (a report per connection and per health period, one per desired
//! change or command), so they are built with `serde_json` values.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::generate::device_key;
use super::rng::{derive, unit};

const SALT_SIGNAL: u64 = 0xBE4A_0001;
const SALT_BATTERY: u64 = 0xBE4A_0002;
const SALT_MEMORY: u64 = 0xBE4A_0003;

/// Firmware version devices report unless told otherwise.
pub const DEFAULT_FIRMWARE: &str = "sim-1.0.0";
/// Pause before a rebooted device reconnects when the command does not say.
pub const DEFAULT_REBOOT_DELAY: Duration = Duration::from_secs(1);
/// Longest reboot pause a command may ask for.
pub const MAX_REBOOT_DELAY: Duration = Duration::from_secs(60);
/// Longest sampling interval a desired change or command may set (one day).
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Commands the device answers (others get 501).
pub const COMMANDS: [&str; 4] = ["ping", "reboot", "set_interval", "get_config"];

/// What devices do besides telemetry (on by default).
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Report firmware and health in the twin and apply desired settings.
    pub twin: bool,
    /// Answer commands.
    pub commands: bool,
    /// Period of the health reports after the one at connect (`None`: only at connect).
    pub health_every: Option<Duration>,
    /// Firmware version reported.
    pub firmware: Arc<str>,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            twin: true,
            commands: true,
            health_every: Some(Duration::from_secs(60)),
            firmware: Arc::from(DEFAULT_FIRMWARE),
        }
    }
}

impl Behaviour {
    /// Pure telemetry: no subscriptions, no reports.
    pub fn off() -> Behaviour {
        Behaviour {
            twin: false,
            commands: false,
            ..Behaviour::default()
        }
    }

    /// Whether devices subscribe to anything.
    pub fn any(&self) -> bool {
        self.twin || self.commands
    }

    /// The filters a device subscribes to after CONNECT.
    pub fn filters(&self, device: &str) -> Vec<String> {
        let mut f = Vec::new();
        if self.twin {
            f.push(delta_topic(device));
        }
        if self.commands {
            f.push(format!("$devices/{device}/commands/req/#"));
        }
        f
    }
}

/// The twin delta topic of a device (default twin).
pub fn delta_topic(device: &str) -> String {
    format!("$devices/{device}/twin/delta")
}

/// The topic a device publishes its reported state on.
pub fn update_topic(device: &str) -> String {
    format!("$devices/{device}/twin/update")
}

/// The settings of a device that desired changes and commands alter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time between two samples.
    pub interval: Duration,
    /// Whether the device publishes telemetry.
    pub enabled: bool,
}

/// What a device changes in itself after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// New settings (interval or enabled changed).
    Settings(Settings),
    /// Answer, then disconnect and reconnect after this pause.
    Reboot(Duration),
}

/// What the device knows about itself when it reports or answers.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Seed of the run.
    pub seed: u64,
    /// Device index.
    pub index: u64,
    /// Profile name.
    pub profile: &'a str,
    /// Firmware version.
    pub firmware: &'a str,
    /// Current settings.
    pub settings: Settings,
    /// Seconds since the device (re)booted.
    pub uptime_s: u64,
    /// Reboots so far.
    pub reboots: u64,
    /// Health reports so far (each draws its own signal strength).
    pub report_no: u64,
}

/// The `health` object: the hub's convention (`docs/device-api.md`): `battery` (%), `memory`
/// (free bytes), `firmware`, `uptime` (s), `signal` (dBm), plus `status`. Values are draws from
/// the seed and the device index (battery drains with uptime).
pub fn health(f: &Facts<'_>) -> Value {
    let key = device_key(f.seed, f.index);
    let signal = -50.0 - 40.0 * unit(derive(derive(key, SALT_SIGNAL), f.report_no));
    let battery_start = 60.0 + 40.0 * unit(derive(key, SALT_BATTERY));
    // About 1 % per hour of uptime.
    let battery = (battery_start - f.uptime_s as f64 / 3600.0).clamp(0.0, 100.0);
    let memory = 96 * 1024 + (unit(derive(key, SALT_MEMORY)) * 64.0 * 1024.0) as u64;
    json!({
        "status": "ok",
        "uptime": f.uptime_s,
        "signal": signal.round() as i64,
        "battery": battery.round() as i64,
        "memory": memory,
        "firmware": f.firmware,
        "reboots": f.reboots,
    })
}

/// The report a device sends at each connect: firmware, profile, settings and health (and, after
/// a reboot command, when it was).
pub fn connect_report(f: &Facts<'_>, last_reboot_ms: Option<i64>) -> Vec<u8> {
    let mut reported = json!({
        "firmware": f.firmware,
        "profile": f.profile,
        "interval_ms": millis(f.settings.interval),
        "enabled": f.settings.enabled,
        "health": health(f),
    });
    if let (Some(at), Some(o)) = (last_reboot_ms, reported.as_object_mut()) {
        o.insert("last_reboot".into(), json!({"at": at, "reason": "command"}));
    }
    json!({ "reported": reported }).to_string().into_bytes()
}

/// The periodic health report.
pub fn health_report(f: &Facts<'_>) -> Vec<u8> {
    json!({"reported": {"health": health(f)}})
        .to_string()
        .into_bytes()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An interval given as milliseconds (`interval_ms`).
fn interval_from_ms(v: &Value) -> Result<Duration, String> {
    match v.as_u64() {
        Some(ms) if ms >= 1 && Duration::from_millis(ms) <= MAX_INTERVAL => {
            Ok(Duration::from_millis(ms))
        }
        _ => Err(format!(
            "expected whole milliseconds from 1 to {}",
            millis(MAX_INTERVAL)
        )),
    }
}

/// An interval given as a duration string (`"5s"`) or seconds (`sampling_interval`).
fn interval_from_duration(v: &Value) -> Result<Duration, String> {
    let d = match v {
        Value::String(s) => super::parse_duration(s).ok(),
        Value::Number(n) => n
            .as_f64()
            .filter(|s| s.is_finite() && (0.0..=1e9).contains(s))
            .map(Duration::from_secs_f64),
        _ => None,
    };
    match d {
        Some(d) if d >= Duration::from_millis(1) && d <= MAX_INTERVAL => Ok(d),
        _ => Err("expected a duration such as \"5s\" or seconds, from 1ms to 24h".into()),
    }
}

/// What a desired delta made the device do.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaOutcome {
    /// The twin update to send (applied values in `reported`, refused keys in `rejected`), if
    /// the delta held anything.
    pub update: Option<Vec<u8>>,
    /// Keys applied.
    pub applied: u64,
    /// Keys refused (unknown to the device or with a bad value).
    pub rejected: u64,
    /// The settings after the delta.
    pub settings: Settings,
}

/// Applies a delta message (`{"version", "delta": {…}}`). Settings the device has are applied
/// and reported back with the desired value (so the hub's delta clears); others are refused with
/// a reason in `rejected` (the hub's per-key acknowledgement). A delta whose version is below
/// `last_version` is stale (a copy queued in the session) and ignored.
pub fn apply_delta(
    payload: &[u8],
    settings: Settings,
    last_version: &mut u64,
) -> Option<DeltaOutcome> {
    let msg: Value = serde_json::from_slice(payload).ok()?;
    let version = msg.get("version").and_then(Value::as_u64).unwrap_or(0);
    if version < *last_version {
        return None;
    }
    *last_version = version;
    let delta = msg.get("delta")?.as_object()?;
    let mut s = settings;
    let mut reported = Map::new();
    let mut rejected = Map::new();
    for (key, value) in delta {
        let applied = match key.as_str() {
            "interval_ms" => interval_from_ms(value).map(|d| {
                s.interval = d;
                // A duration given the other way no longer holds.
                reported.insert("sampling_interval".into(), Value::Null);
            }),
            "sampling_interval" => interval_from_duration(value).map(|d| {
                s.interval = d;
                reported.insert("interval_ms".into(), json!(millis(d)));
            }),
            "enabled" => value
                .as_bool()
                .map(|e| s.enabled = e)
                .ok_or_else(|| "expected true or false".to_string()),
            _ => Err(format!(
                "not applicable: the simulated device has no setting `{key}` (it applies \
                 interval_ms, sampling_interval and enabled)"
            )),
        };
        match applied {
            Ok(()) => {
                reported.insert(key.clone(), value.clone());
            }
            Err(why) => {
                rejected.insert(key.clone(), Value::String(why));
            }
        }
    }
    // A key both applied and nulled (two interval keys in one delta): the applied value wins.
    for k in ["interval_ms", "sampling_interval"] {
        if let Some(v) = delta.get(k).filter(|_| !rejected.contains_key(k)) {
            reported.insert(k.into(), v.clone());
        }
    }
    let (applied, refused) = (
        delta.len() as u64 - rejected.len() as u64,
        rejected.len() as u64,
    );
    let update = (!delta.is_empty()).then(|| {
        let mut body = Map::new();
        if !reported.is_empty() {
            body.insert("reported".into(), Value::Object(reported));
        }
        if !rejected.is_empty() {
            body.insert("rejected".into(), Value::Object(rejected));
        }
        Value::Object(body).to_string().into_bytes()
    });
    Some(DeltaOutcome {
        update,
        applied,
        rejected: refused,
        settings: s,
    })
}

/// A command request: its name and request id, from `$devices/{d}/commands/req/{name}/{rid}`.
pub fn command_of<'a>(device: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic
        .strip_prefix("$devices/")?
        .strip_prefix(device)?
        .strip_prefix("/commands/req/")?;
    let (name, rid) = rest.rsplit_once('/')?;
    (!name.is_empty() && !rid.is_empty()).then_some((name, rid))
}

/// A command's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP-like status (2xx: success).
    pub status: u16,
    /// JSON payload.
    pub payload: Vec<u8>,
    /// What the device does after answering.
    pub effect: Effect,
}

fn answer(status: u16, body: Value, effect: Effect) -> Answer {
    Answer {
        status,
        payload: body.to_string().into_bytes(),
        effect,
    }
}

/// Answers command `name` with `payload` (JSON or empty).
pub fn command(name: &str, payload: &[u8], f: &Facts<'_>, topic: &str, format: &str) -> Answer {
    let body: Option<Value> = if payload.is_empty() {
        None
    } else {
        serde_json::from_slice(payload).ok()
    };
    let field = |k: &str| body.as_ref().and_then(|b| b.get(k));
    match name {
        "ping" => Answer {
            status: 200,
            payload: if payload.is_empty() {
                b"{\"pong\":true}".to_vec()
            } else {
                payload.to_vec()
            },
            effect: Effect::None,
        },
        "reboot" => {
            let delay = match (field("delay_ms"), field("delay")) {
                (Some(ms), _) => ms.as_u64().map(Duration::from_millis),
                (None, Some(s)) => s
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 1e6)
                    .map(Duration::from_secs_f64),
                (None, None) => Some(DEFAULT_REBOOT_DELAY),
            };
            match delay {
                Some(d) => {
                    let d = d.min(MAX_REBOOT_DELAY);
                    answer(
                        200,
                        json!({"rebooting": true, "delay_ms": millis(d)}),
                        Effect::Reboot(d),
                    )
                }
                None => answer(
                    400,
                    json!({"error": "delay_ms: expected whole milliseconds (or delay: seconds)"}),
                    Effect::None,
                ),
            }
        }
        "set_interval" => {
            let d = match (field("interval_ms"), field("sampling_interval")) {
                (Some(v), _) => interval_from_ms(v),
                (None, Some(v)) => interval_from_duration(v),
                (None, None) => Err("give interval_ms or sampling_interval".into()),
            };
            match d {
                Ok(d) => answer(
                    200,
                    json!({"interval_ms": millis(d)}),
                    Effect::Settings(Settings {
                        interval: d,
                        ..f.settings
                    }),
                ),
                Err(e) => answer(400, json!({ "error": e }), Effect::None),
            }
        }
        "get_config" => answer(
            200,
            json!({
                "firmware": f.firmware,
                "profile": f.profile,
                "interval_ms": millis(f.settings.interval),
                "enabled": f.settings.enabled,
                "format": format,
                "topic": topic,
                "uptime": f.uptime_s,
            }),
            Effect::None,
        ),
        _ => answer(
            501,
            json!({
                "error": format!("unknown command `{name}`"),
                "commands": COMMANDS,
            }),
            Effect::None,
        ),
    }
}

/// The twin update a device sends after a command changed its settings.
pub fn settings_report(s: Settings) -> Vec<u8> {
    json!({"reported": {
        "interval_ms": millis(s.interval),
        "enabled": s.enabled,
        "sampling_interval": Value::Null,
    }})
    .to_string()
    .into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts(settings: Settings) -> Facts<'static> {
        Facts {
            seed: 1,
            index: 2,
            profile: "environment",
            firmware: DEFAULT_FIRMWARE,
            settings,
            uptime_s: 7200,
            reboots: 0,
            report_no: 0,
        }
    }

    const S: Settings = Settings {
        interval: Duration::from_secs(10),
        enabled: true,
    };

    fn json_of(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn deltas_apply_known_settings_and_refuse_the_rest() {
        let mut v = 0;
        let d = br#"{"version":3,"delta":{"interval_ms":500,"enabled":false,"color":"red","sampling_interval":[1]}}"#;
        let o = apply_delta(d, S, &mut v).unwrap();
        assert_eq!(v, 3);
        assert_eq!((o.applied, o.rejected), (2, 2));
        assert_eq!(o.settings.interval, Duration::from_millis(500));
        assert!(!o.settings.enabled);
        let u = json_of(&o.update.unwrap());
        assert_eq!(u["reported"]["interval_ms"], 500);
        assert_eq!(u["reported"]["enabled"], false);
        assert!(
            u["rejected"]["color"]
                .as_str()
                .unwrap()
                .contains("not applicable")
        );
        assert!(u["rejected"]["sampling_interval"].is_string());
        // The applied key is echoed as given, so the delta clears.
        let o = apply_delta(
            br#"{"version":4,"delta":{"sampling_interval":"2s"}}"#,
            S,
            &mut v,
        )
        .unwrap();
        let u = json_of(&o.update.unwrap());
        assert_eq!(u["reported"]["sampling_interval"], "2s");
        assert_eq!(u["reported"]["interval_ms"], 2000);
        assert_eq!(o.settings.interval, Duration::from_secs(2));
        // Stale and malformed deltas are ignored.
        assert!(apply_delta(br#"{"version":1,"delta":{"enabled":true}}"#, S, &mut v).is_none());
        assert!(apply_delta(b"not json", S, &mut v).is_none());
        assert!(
            apply_delta(br#"{"version":0,"delta":{"interval_ms":0}}"#, S, &mut 0)
                .unwrap()
                .rejected
                == 1
        );
    }

    #[test]
    fn commands_are_answered() {
        let f = facts(S);
        let a = command("ping", br#"{"n":1}"#, &f, "t", "json");
        assert_eq!((a.status, json_of(&a.payload)), (200, json!({"n": 1})));
        let a = command("reboot", br#"{"delay_ms":250}"#, &f, "t", "json");
        assert_eq!(a.effect, Effect::Reboot(Duration::from_millis(250)));
        let a = command("reboot", br#"{"delay":5}"#, &f, "t", "json");
        assert_eq!(a.effect, Effect::Reboot(Duration::from_secs(5)));
        let a = command("set_interval", br#"{"interval_ms":100}"#, &f, "t", "json");
        assert_eq!(a.status, 200);
        assert!(
            matches!(a.effect, Effect::Settings(s) if s.interval == Duration::from_millis(100))
        );
        assert_eq!(command("set_interval", b"{}", &f, "t", "json").status, 400);
        let a = command("get_config", b"", &f, "devices/x/telemetry", "json");
        let c = json_of(&a.payload);
        assert_eq!(
            (c["interval_ms"].as_u64(), c["firmware"].as_str()),
            (Some(10_000), Some(DEFAULT_FIRMWARE))
        );
        assert_eq!(command("selfdestruct", b"", &f, "t", "json").status, 501);
        assert_eq!(
            command_of("d-1", "$devices/d-1/commands/req/ping/r7"),
            Some(("ping", "r7"))
        );
        assert_eq!(
            command_of("d-1", "$devices/d-10/commands/req/ping/r7"),
            None
        );
        assert_eq!(command_of("d-1", "$devices/d-1/commands/req/ping"), None);
    }

    #[test]
    fn reports_carry_firmware_and_deterministic_health() {
        let f = facts(S);
        let r = json_of(&connect_report(&f, Some(5)));
        assert_eq!(r["reported"]["firmware"], DEFAULT_FIRMWARE);
        assert_eq!(r["reported"]["health"]["uptime"], 7200);
        assert_eq!(r["reported"]["last_reboot"]["at"], 5);
        assert_eq!(health(&f), health(&f));
        let signal = health(&f)["signal"].as_i64().unwrap();
        assert!((-90..=-50).contains(&signal), "{signal}");
        let b = health(&f)["battery"].as_i64().unwrap();
        assert!((0..=100).contains(&b), "{b}");
        assert_eq!(
            Behaviour::default().filters("d"),
            ["$devices/d/twin/delta", "$devices/d/commands/req/#"]
        );
        assert!(Behaviour::off().filters("d").is_empty());
    }
}
