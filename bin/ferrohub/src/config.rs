//! The hub's configuration: `ferrohub.toml`, overridden by `FERROHUB_*` environment variables,
//! overridden by command-line flags. Every key is documented in `docs/configuration.md`, and
//! `ferrohub config` prints the effective configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferrohub_adapters::mqtt::MqttConfig;
use serde::{Deserialize, Serialize};

/// The `FERROHUB_*` variables that address configuration keys. Others (such as `FERROHUB_BIN` in
/// a test environment, or variables of tools around the hub) are not configuration and are left
/// alone; a misspelt key *within* a section (`FERROHUB_MQTT__MAX_PAKET_SIZE`) is still an error.
fn config_env_vars(
    vars: impl Iterator<Item = (String, String)>,
) -> Result<std::collections::HashMap<String, String>> {
    let keys = HubConfig::top_level_keys()?;
    Ok(vars
        .filter(|(name, _)| {
            name.strip_prefix("FERROHUB_").is_some_and(|rest| {
                let rest = rest.to_ascii_lowercase();
                keys.iter().any(|k| {
                    rest == *k
                        || rest
                            .strip_prefix(k.as_str())
                            .is_some_and(|r| r.starts_with("__"))
                })
            })
        })
        .collect())
}

/// Everything `ferrohub serve` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Where durable state lives.
    pub data_dir: PathBuf,
    /// Development mode: any client may connect without credentials.
    pub allow_anonymous: bool,
    /// Demo mode: create the `demo` tenant (first start) and run a simulated fleet of 50 devices
    /// in-process against the MQTT listener (`ferrohub serve --demo`, `FERROHUB_DEMO=true`).
    pub demo: bool,
    /// Listener addresses.
    pub listeners: Listeners,
    /// TLS certificate and key (enables the `mqtts` listener).
    pub tls: TlsConfig,
    /// MQTT limits and behaviour.
    pub mqtt: MqttConfig,
    /// Durable storage.
    pub storage: StorageConfig,
    /// Static username/password list, checked before the device registry (development and
    /// service accounts; clients it admits may do anything in the default tenant).
    pub users: Vec<UserEntry>,
    /// Secret of the first platform admin API token, created at first start. Empty: a token is
    /// generated and printed once. Set it with `FERROHUB_ADMIN_TOKEN`.
    pub admin_token: String,
    /// Device registry, credentials and access control.
    pub registry: ferrohub_registry::RegistryConfig,
    /// Device twins.
    pub twins: ferrohub_twins::TwinsConfig,
    /// Commands to devices.
    pub commands: ferrohub_twins::commands::CommandsConfig,
    /// Telemetry: ingest topics, payload formats, timestamps, retention, the engine's head.
    pub telemetry: ferrohub_telemetry::service::TelemetryConfig,
    /// Rules running in the hub: queue bounds and limits.
    pub rules: RulesSettings,
    /// Alarms: history kept, the notification queue and its workers.
    pub alarms: AlarmsSettings,
    /// Logging.
    pub log: LogConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from("./data"),
            allow_anonymous: false,
            demo: false,
            listeners: Listeners::default(),
            tls: TlsConfig::default(),
            mqtt: MqttConfig::default(),
            storage: StorageConfig::default(),
            users: Vec::new(),
            admin_token: String::new(),
            registry: ferrohub_registry::RegistryConfig::default(),
            twins: ferrohub_twins::TwinsConfig::default(),
            telemetry: ferrohub_telemetry::service::TelemetryConfig::default(),
            commands: ferrohub_twins::commands::CommandsConfig::default(),
            rules: RulesSettings::default(),
            alarms: AlarmsSettings::default(),
            log: LogConfig::default(),
        }
    }
}

/// `[rules]`: bounds of the rules service's queues (see `docs/rules.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSettings {
    /// Messages waiting for evaluation, all tenants; when full, messages are not evaluated
    /// (counted per rule).
    pub input_queue: usize,
    /// Jobs waiting per action of a rule; a job that does not fit becomes a dead letter.
    pub action_queue: usize,
    /// Dead letters kept per rule (the oldest are evicted).
    pub dead_letters: usize,
    /// Rules per tenant (bounds the per-rule metric series).
    pub max_rules_per_tenant: usize,
    /// How long a fetched twin or registry record serves `twin()`/`device()`, in ms (a twin
    /// change evicts it at once).
    pub lookup_ttl_ms: u64,
    /// Twin and registry records cached for lookups, all tenants.
    pub lookup_cache: usize,
    /// Refuse webhooks to loopback, private and link-local addresses (for hubs whose tenants'
    /// operators must not reach the hub's own network).
    pub webhook_deny_private: bool,
}

impl Default for RulesSettings {
    fn default() -> Self {
        let d = ferrohub_rules_service::RulesConfig::default();
        RulesSettings {
            input_queue: d.input_queue,
            action_queue: d.action_queue,
            dead_letters: d.dead_letters,
            max_rules_per_tenant: d.max_rules_per_tenant,
            lookup_ttl_ms: d.lookup_ttl.as_millis() as u64,
            lookup_cache: d.lookup_capacity,
            webhook_deny_private: d.webhook_deny_private,
        }
    }
}

impl RulesSettings {
    /// The rules service's configuration (zero bounds become 1).
    pub fn service_config(&self) -> ferrohub_rules_service::RulesConfig {
        ferrohub_rules_service::RulesConfig {
            input_queue: self.input_queue.max(1),
            action_queue: self.action_queue.max(1),
            dead_letters: self.dead_letters.max(1),
            max_rules_per_tenant: self.max_rules_per_tenant.max(1),
            lookup_ttl: std::time::Duration::from_millis(self.lookup_ttl_ms),
            lookup_capacity: self.lookup_cache.max(1),
            webhook_deny_private: self.webhook_deny_private,
            ..ferrohub_rules_service::RulesConfig::default()
        }
    }
}

/// `[alarms]`: history and notification bounds of the alarms service (see `docs/alarms.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmsSettings {
    /// History rows kept per alarm (the oldest are deleted).
    pub history_per_alarm: usize,
    /// Notifications waiting for a worker, all tenants; one that does not fit is recorded as a
    /// failed delivery (`queue full`) and counted as dropped.
    pub notification_queue: usize,
    /// Notification workers (concurrent webhook calls).
    pub workers: usize,
    /// Deliveries kept per channel (in memory) for `GET …/alarm-channels/{id}/deliveries`.
    pub deliveries_per_channel: usize,
    /// Events buffered per tenant for alarm event streams; a slower reader is told it lagged.
    pub stream_buffer: usize,
    /// Days a cleared alarm (and its history) is kept; 0 keeps them forever.
    pub cleared_retention_days: u64,
}

impl Default for AlarmsSettings {
    fn default() -> Self {
        let d = ferrohub_alarms::AlarmsConfig::default();
        AlarmsSettings {
            history_per_alarm: d.history_per_alarm,
            notification_queue: d.notification_queue,
            workers: d.workers,
            deliveries_per_channel: d.deliveries_per_channel,
            stream_buffer: d.stream_buffer,
            cleared_retention_days: d.cleared_retention_days,
        }
    }
}

impl AlarmsSettings {
    /// The alarms service's configuration (zero bounds become 1).
    pub fn service_config(&self) -> ferrohub_alarms::AlarmsConfig {
        ferrohub_alarms::AlarmsConfig {
            history_per_alarm: self.history_per_alarm.max(1),
            notification_queue: self.notification_queue.max(1),
            workers: self.workers.max(1),
            deliveries_per_channel: self.deliveries_per_channel.max(1),
            stream_buffer: self.stream_buffer.max(1),
            cleared_retention_days: self.cleared_retention_days,
        }
    }
}

/// Listener addresses; an empty string disables a listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// MQTT over TCP.
    pub mqtt: String,
    /// MQTT over TLS (only when `tls.cert_file` and `tls.key_file` are set).
    pub mqtts: String,
    /// MQTT over WebSocket (`ws://host:port/mqtt`).
    pub ws: String,
    /// HTTP: health, readiness, metrics (and the API later).
    pub http: String,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: "0.0.0.0:1883".into(),
            mqtts: "0.0.0.0:8883".into(),
            ws: "0.0.0.0:8083".into(),
            http: "0.0.0.0:8080".into(),
        }
    }
}

/// TLS settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
    /// PEM bundle of CAs whose device certificates are accepted in the default tenant (mTLS), in
    /// addition to the CAs registered through the API.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate (otherwise they may use passwords or
    /// tokens over TLS).
    pub require_client_cert: bool,
}

/// Storage settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Persist sessions, queued QoS 1/2 messages and retained messages in `data_dir`.
    pub persistence: bool,
    /// `always`: fdatasync every group commit before acknowledging (survives power loss);
    /// `never`: acknowledge once written to the OS (survives a hub crash, not a power loss).
    pub fsync: FsyncMode,
    /// Compact the broker log once it exceeds this many bytes.
    pub compact_after_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            persistence: true,
            fsync: FsyncMode::Always,
            compact_after_bytes: 64 * 1024 * 1024,
        }
    }
}

/// fsync policy names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fdatasync each group commit.
    Always,
    /// Leave flushing to the OS.
    Never,
}

/// A username and its password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `ferrohub_adapters=debug,info` (`RUST_LOG` wins).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log output formats.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl HubConfig {
    /// Loads defaults < file < `FERROHUB_*` environment. A missing file is an error only when it
    /// was named explicitly.
    pub fn load(path: Option<&Path>) -> Result<HubConfig> {
        let defaults = config::Config::try_from(&HubConfig::default())
            .context("internal error: default configuration does not serialise")?;
        let mut builder = config::Config::builder().add_source(defaults);
        match path {
            Some(p) => {
                anyhow::ensure!(p.exists(), "config file {} does not exist", p.display());
                builder =
                    builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
            None => {
                builder = builder.add_source(
                    config::File::with_name("ferrohub.toml")
                        .format(config::FileFormat::Toml)
                        .required(false),
                );
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("FERROHUB")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(config_env_vars(std::env::vars())?)),
        );
        let merged = builder.build().context("reading configuration")?;
        merged.try_deserialize().context(
            "invalid configuration (check key names and types against docs/configuration.md; \
             environment variables are FERROHUB_<SECTION>__<KEY>, e.g. FERROHUB_MQTT__MAX_PACKET_SIZE)",
        )
    }

    /// The top-level keys, e.g. `mqtt` or `data_dir`.
    fn top_level_keys() -> Result<Vec<String>> {
        let table = toml::Table::try_from(HubConfig::default())
            .context("internal error: default configuration does not serialise")?;
        Ok(table.keys().cloned().collect())
    }

    /// Parses a listener address, where empty means disabled.
    pub fn addr(what: &str, s: &str) -> Result<Option<SocketAddr>> {
        if s.trim().is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .with_context(|| format!("listener {what} = {s:?} is not an address like 0.0.0.0:1883"))
    }
}
