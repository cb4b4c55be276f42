//! `ferrohub sim`: fleets of simulated devices publishing realistic telemetry to any MQTT broker.
//!
//! * [`profile`]: device profiles as TOML data (built-ins in `crates/sim/profiles/`, or the
//!   user's files), checked up front with errors that name the key;
//! * [`generate`]: a device's values, deterministic in (seed, device index, tick);
//! * `encode`: payloads in JSON, CBOR or MessagePack, one sample or a batch per message;
//! * [`run`]: one task and one MQTT connection per device (the bench harness's raw client,
//!   `crate::bench::wire`), ramp-up, QoS 0/1 with a bounded in-flight window, bounded runs;
//! * [`chaos`]: reconnects with back-off, and chaos (random disconnects, latency, loss, clock
//!   skew, bursts, misbehaving devices), deterministic under the seed;
//! * [`behave`]: what devices do besides telemetry: twin reports (firmware, health), desired
//!   settings applied, commands answered;
//! * `report`: the live progress line and the final summary (table or JSON);
//! * [`recording`] and [`replay`]: recorded telemetry (the hub's export, or a wide CSV)
//!   published again by its devices, at its recorded pace or faster.
//!
//! See `docs/sim.md` for the user's guide and the profile reference.

pub mod behave;
pub mod chaos;
mod encode;
pub mod generate;
pub mod multi;
pub mod profile;
pub mod provision;
pub mod recording;
pub mod replay;
mod report;
mod rng;
pub mod run;
pub mod transport;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use ferrohub_types::QoS;

pub use encode::{EncodeError, encode};
pub use generate::{DeviceSim, Sample, Value};
pub use profile::{Format, Mix, Overrides, Profile, ProfileError};
pub use report::{ProgressMode, Snapshot, Summary};
pub use run::{DeviceSpec, RunConfig};
pub use transport::TransportKind;

use crate::bench::Protocol;
use crate::bench::fleet;
use crate::bench::wire::{ClientOpts, Creds};

/// Arguments of `ferrohub sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SimCommand,
}

/// The `ferrohub sim` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SimCommand {
    /// Connect simulated devices to an MQTT broker and publish their telemetry.
    #[command(after_help = "Examples:\n  \
        ferrohub sim run --devices 1000 --profile environment --duration 10m\n  \
        ferrohub sim run -n 200 --profile rotating-machine:1 --profile smart-meter:3 \
        --set bearing_fault_after=5m\n  \
        ferrohub sim run -n 20 --messages-per-device 5 --interval 100ms --json\n  \
        ferrohub sim run -n 19000 --processes 2 --duration 1m   # two processes, one summary\n  \
        ferrohub sim run --fleet fleet.jsonl --first-index 10000 -n 10000   # by hand\n\n\
        Prints a summary table on stdout (--json: one JSON object) and, when stderr is a \
        terminal, a progress line on stderr. Exits non-zero if no device connected.",
        // Workers of --processes get the parent's arguments plus their own range: the last wins.
        args_override_self = true)]
    Run(Box<RunArgs>),
    /// List the built-in profiles, or print one as TOML (a starting point for your own).
    Profiles(ProfilesArgs),
    /// Print the payloads a device would publish, without connecting.
    Preview(PreviewArgs),
    /// Publish recorded telemetry again: the hub's export (CSV or Parquet) or a wide CSV, one
    /// connection per recorded device, at the recorded pace, faster, or as fast as
    /// acknowledgements allow.
    #[command(after_help = "Examples:\n  \
        ferrohub sim replay export.csv --speed max --password secret\n  \
        ferrohub sim replay day.csv.gz --speed 10 --shift-to-now --fleet fleet.jsonl\n  \
        ferrohub sim replay wide.csv --speed 1 --loop 3 --qos 0\n\n\
        Prints a summary table on stdout (--json: one JSON object) and, when stderr is a \
        terminal, a progress line on stderr. Bad rows are reported on stderr as FILE:LINE and \
        skipped (--strict: the first one fails the replay). Exits non-zero if nothing was sent.")]
    Replay(Box<ReplayArgs>),
}

/// How simulated devices reach the broker: address, MQTT version, QoS, shared credentials and
/// transport (`sim run` and `sim replay` share these flags).
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Broker")]
    pub host: String,
    /// Broker port (default by --transport: 1883 tcp, 8883 tls, 8083 ws, 8084 wss).
    #[arg(
        long,
        default_value_t = 1883,
        default_value_ifs = [("transport", "tls", "8883"), ("transport", "ws", "8083"), ("transport", "wss", "8084")],
        help_heading = "Broker"
    )]
    pub port: u16,
    /// MQTT version: v5 (5.0) or v3 (3.1.1).
    #[arg(long, value_enum, default_value_t = Protocol::V5, help_heading = "Broker")]
    pub protocol: Protocol,
    /// QoS of the publications: 0, or 1 (waits for PUBACKs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1), help_heading = "Broker")]
    pub qos: u8,
    /// User name for every device ("{device}" is replaced by the device id; default with
    /// --password: the device id).
    #[arg(long, help_heading = "Broker")]
    pub username: Option<String>,
    /// Password shared by every device.
    #[arg(
        long,
        env = "FERROHUB_SIM_PASSWORD",
        hide_env_values = true,
        help_heading = "Broker"
    )]
    pub password: Option<String>,
    /// Keep Alive sent in CONNECT, seconds (a device pings when it has nothing to send).
    #[arg(long, default_value_t = 60, help_heading = "Broker")]
    pub keep_alive: u16,
    /// Longest wait for the TCP handshake and CONNACK.
    #[arg(long, default_value = "10s", value_parser = parse_duration, help_heading = "Broker")]
    pub connect_timeout: Duration,
    /// Local address to connect from (repeatable; devices take them in turn by index), e.g.
    /// 127.0.0.2 on loopback: each source address has its own ephemeral ports (about 28,000)
    /// towards one broker address.
    #[arg(long = "source-address", value_name = "IP", help_heading = "Broker")]
    pub source_addresses: Vec<std::net::IpAddr>,

    /// How devices reach the broker: MQTT over TCP, TLS, WebSocket or WebSocket over TLS.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp, help_heading = "Transport")]
    pub transport: TransportKind,
    /// PEM file of CA certificates to trust (tls, wss, and an https:// --api), in addition to
    /// the public web roots; e.g. the CA that signed the hub's `tls.cert_file`.
    #[arg(long, value_name = "FILE", help_heading = "Transport")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM chain) every device presents (mutual TLS); a fleet entry's own
    /// `cert_pem` takes precedence.
    #[arg(
        long,
        value_name = "FILE",
        requires = "key",
        help_heading = "Transport"
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "cert",
        help_heading = "Transport"
    )]
    pub key: Option<PathBuf>,
    /// INSECURE: do not verify the server's certificate (any server can pose as the broker);
    /// for test setups only.
    #[arg(long, help_heading = "Transport")]
    pub insecure: bool,
    /// Server name for SNI and the certificate check [default: --host].
    #[arg(long, value_name = "NAME", help_heading = "Transport")]
    pub server_name: Option<String>,
    /// WebSocket path (ws, wss).
    #[arg(long, value_name = "PATH", default_value = crate::bench::transport::DEFAULT_WS_PATH, help_heading = "Transport")]
    pub ws_path: String,
}

/// How devices keep their connections and messages going (`sim run` and `sim replay`).
#[derive(clap::Args, Debug, Clone)]
pub struct DeliveryArgs {
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Run")]
    pub connect_concurrency: u32,
    /// QoS 1 messages awaiting PUBACK per connection (capped by the broker's Receive Maximum).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..), help_heading = "Run")]
    pub inflight: u16,
    /// A connection whose in-flight window stays full this long counts as lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Run")]
    pub ack_timeout: Duration,
    /// After the run stops, how long devices wait for outstanding PUBACKs.
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Run")]
    pub drain: Duration,
    /// Runtime worker threads (of each process).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256), help_heading = "Run")]
    pub threads: u16,
    /// Back-off between reconnection attempts: MIN[..MAX] (doubling from MIN up to MAX, with
    /// jitter; plain numbers are milliseconds).
    #[arg(long, default_value = "100ms..5s", value_parser = chaos::parse_backoff, help_heading = "Reconnect")]
    pub reconnect_backoff: (Duration, Duration),
    /// Consecutive failed reconnection attempts after which a device gives up (0: a lost
    /// connection is not re-established; a replaying device's remaining messages are then
    /// dropped and counted).
    #[arg(long, default_value_t = 10, help_heading = "Reconnect")]
    pub reconnect_attempts: u32,
    /// Retries of a device's first connect (0: a device whose first connect fails gives up).
    #[arg(long, default_value_t = 0, help_heading = "Reconnect")]
    pub connect_retries: u32,
}

impl DeliveryArgs {
    /// How devices reconnect.
    pub fn reconnect(&self) -> chaos::Reconnect {
        chaos::Reconnect {
            min: self.reconnect_backoff.0,
            max: self.reconnect_backoff.1,
            attempts: self.reconnect_attempts,
            connect_retries: self.connect_retries,
        }
    }
}

impl BrokerArgs {
    /// QoS of the publications.
    pub fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Resolves the broker and builds the options every device connects with, over `transport`
    /// to `port` (from [`transport::setup`]).
    pub async fn client_opts(
        &self,
        transport: crate::bench::transport::Transport,
        port: u16,
    ) -> anyhow::Result<ClientOpts> {
        let addr = run::resolve(&self.host, port)
            .await
            .with_context(|| format!("resolving {}:{port}", self.host))?;
        Ok(ClientOpts {
            addr,
            version: self.protocol.version(),
            username: None,
            password: None,
            keep_alive: self.keep_alive,
            timeout: self.connect_timeout,
            transport,
        })
    }

    /// The credentials device `id` presents from --username/--password (none without them).
    pub fn shared_creds(&self, id: &str) -> Option<Creds> {
        (self.username.is_some() || self.password.is_some()).then(|| Creds {
            username: Some(match &self.username {
                Some(u) => u.replace("{device}", id),
                None => id.to_string(),
            }),
            password: self.password.clone().map(Bytes::from),
            tls: None,
        })
    }
}

/// Arguments of `ferrohub sim run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The broker and how to reach it.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet file written by `ferrohub bench provision` (one JSON line per device): device ids
    /// and their own credentials, in file order; --first-index and --devices select a range.
    #[arg(long, value_name = "FILE", help_heading = "Broker")]
    pub fleet: Option<PathBuf>,

    /// Register this run's devices (<prefix>-<index>) through the hub's HTTP API, each with a
    /// generated password, before connecting. Devices that exist already are reused: they get a
    /// new password and their older passwords stop working. A --password is not used.
    #[arg(long, conflicts_with_all = ["fleet", "username"], help_heading = "Provisioning")]
    pub provision: bool,
    /// The hub's HTTP address (as for `ferrohub ctl`).
    #[arg(
        long,
        value_name = "URL",
        env = "FERROHUB_URL",
        default_value = "http://127.0.0.1:8080",
        help_heading = "Provisioning"
    )]
    pub api: String,
    /// Operator API token (`fh_...`); prefer the environment variable.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FERROHUB_TOKEN",
        hide_env_values = true,
        help_heading = "Provisioning"
    )]
    pub token: Option<String>,
    /// Tenant the devices are registered in (their MQTT user name is TENANT/DEVICE outside the
    /// default tenant).
    #[arg(
        long,
        value_name = "TENANT",
        env = "FERROHUB_TENANT",
        default_value = "default",
        help_heading = "Provisioning"
    )]
    pub tenant: String,
    /// Also issue each device a certificate from the tenant's built-in CA (kept in the fleet
    /// file; used with --transport tls or wss).
    #[arg(long, requires = "provision", help_heading = "Provisioning")]
    pub provision_certs: bool,
    /// Write the provisioned devices and their secrets to this fleet file (JSON lines, mode
    /// 0600), for later runs with --fleet.
    #[arg(
        long,
        value_name = "FILE",
        requires = "provision",
        help_heading = "Provisioning"
    )]
    pub fleet_out: Option<PathBuf>,
    /// API calls in flight at once while provisioning.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256), help_heading = "Provisioning")]
    pub provision_concurrency: u32,

    /// Devices this process simulates (default 10; with --fleet, the rest of the fleet).
    #[arg(long, short = 'n', help_heading = "Fleet")]
    pub devices: Option<u64>,
    /// Index of this process's first device: device ids are <prefix>-<index>, so several
    /// processes can take distinct ranges (and get the same values as one process would).
    #[arg(long, default_value_t = 0, help_heading = "Fleet")]
    pub first_index: u64,
    /// Device id prefix.
    #[arg(long, default_value = "sim", help_heading = "Fleet")]
    pub prefix: String,
    /// Profile: a built-in name (see `ferrohub sim profiles`) or a TOML file; NAME:WEIGHT mixes
    /// several (repeat the flag), e.g. --profile environment:3 --profile ./pump.toml:1.
    #[arg(
        long = "profile",
        short = 'p',
        value_name = "NAME[:WEIGHT]",
        default_value = "environment",
        help_heading = "Fleet"
    )]
    pub profiles: Vec<String>,
    /// Set a profile parameter declared in its [params] (repeatable), e.g.
    /// --set bearing_fault_after=30m.
    #[arg(long = "set", value_name = "NAME=VALUE", help_heading = "Fleet")]
    pub set: Vec<String>,
    /// Seed of every generator: the same seed, device index and tick give the same values.
    #[arg(long, default_value_t = 0, help_heading = "Fleet")]
    pub seed: u64,
    /// Topic template: {device} (the device id), {index}, {profile}.
    #[arg(
        long,
        default_value = "devices/{device}/telemetry",
        help_heading = "Fleet"
    )]
    pub topic: String,
    /// Override every profile's sampling interval (e.g. 100ms, 5s).
    #[arg(long, value_parser = parse_duration, help_heading = "Fleet")]
    pub interval: Option<Duration>,
    /// Override every profile's samples per message.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(profile::MAX_BATCH)), help_heading = "Fleet")]
    pub batch: Option<u32>,
    /// Override every profile's payload format.
    #[arg(long, value_enum, help_heading = "Fleet")]
    pub format: Option<Format>,
    /// Simulated seconds per real second for the generators: with 60, a fault injected
    /// `after = "2h"` starts after 2 real minutes and drifts 60 times faster (sines, walks and
    /// counters too). Message timestamps stay real.
    #[arg(long, default_value_t = 1.0, value_parser = parse_time_scale, help_heading = "Fleet")]
    pub time_scale: f64,

    /// Stop after this long (e.g. 30s, 10m, 2h); without it and --messages-per-device, run
    /// until Ctrl-C.
    #[arg(long, value_parser = parse_duration, help_heading = "Run")]
    pub duration: Option<Duration>,
    /// Stop each device after this many messages.
    #[arg(long, help_heading = "Run")]
    pub messages_per_device: Option<u64>,
    /// Devices started per second (0: as fast as --connect-concurrency allows).
    #[arg(long, default_value_t = 100.0, help_heading = "Run")]
    pub connect_rate: f64,
    /// Handshakes, in-flight window, acknowledgements, reconnects, threads.
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// Spread the devices over this many processes (contiguous index ranges, one merged
    /// summary). A fleet larger than one process may hold sockets for is spread automatically.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024), help_heading = "Run")]
    pub processes: u64,
    /// Run as a worker of --processes: progress and summary as JSON lines on stdout.
    #[arg(long, hide = true)]
    pub worker: bool,

    /// Print the summary as one JSON object instead of a table.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress line (it is never drawn when stderr is not a terminal).
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,

    /// Random disconnects: mean disconnects per device per minute (0.5), or the mean time between
    /// two (2m); the device drops its connection and reconnects after a random pause.
    #[arg(long, value_name = "RATE", value_parser = chaos::parse_rate, help_heading = "Chaos")]
    pub chaos_disconnect: Option<f64>,
    /// Application-level delay before each publish: MS or MS..MS (uniform in the range).
    #[arg(long, value_name = "MS[..MS]", value_parser = chaos::parse_latency, help_heading = "Chaos")]
    pub chaos_latency: Option<(Duration, Duration)>,
    /// Application-level loss: this share of messages is skipped (counted, never sent).
    #[arg(long, value_name = "FRACTION", value_parser = chaos::parse_fraction, help_heading = "Chaos")]
    pub chaos_loss: Option<f64>,
    /// Offset each device's timestamps by its own random skew within ±this (e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Chaos")]
    pub chaos_clock_skew: Option<Duration>,
    /// Bursts: now and then (about every INTERVAL per device, default 1m) a device sends its
    /// next N messages at once.
    #[arg(long, value_name = "N[@INTERVAL]", value_parser = chaos::parse_burst, help_heading = "Chaos")]
    pub chaos_burst: Option<(u32, Duration)>,
    /// This share of devices misbehaves: with some of their messages they also send an
    /// oversized payload, malformed JSON or a flood.
    #[arg(long, value_name = "FRACTION", value_parser = chaos::parse_fraction, help_heading = "Chaos")]
    pub chaos_misbehave: Option<f64>,

    /// Devices do not report firmware and health in their twin nor apply desired settings (no
    /// subscription to the twin delta).
    #[arg(long, help_heading = "Behaviour")]
    pub no_twin: bool,
    /// Devices do not subscribe to their command requests nor answer them.
    #[arg(long, help_heading = "Behaviour")]
    pub no_commands: bool,
    /// Period of the health reports in the twin after the one at connect (0: only at connect).
    #[arg(long, default_value = "1m", value_parser = parse_duration, help_heading = "Behaviour")]
    pub health_every: Duration,
    /// Firmware version the devices report.
    #[arg(long, default_value = behave::DEFAULT_FIRMWARE, help_heading = "Behaviour")]
    pub firmware: String,
    /// Session Expiry Interval: the broker keeps a device's session (subscriptions, messages
    /// queued for it) this long after a lost connection, and unacknowledged messages are resent
    /// with their packet ids; 0: clean sessions. [default: 5m over MQTT 5; clean sessions over
    /// 3.1.1, where any other value asks for Clean Session = 0 and the broker keeps the session
    /// by its own rule, e.g. a week on Ferrohub]
    #[arg(long, value_parser = parse_duration, help_heading = "Behaviour")]
    pub session_expiry: Option<Duration>,
}

/// Arguments of `ferrohub sim replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Recorded telemetry: CSV as `ferrohub ctl telemetry export --format csv` writes it, or a
    /// wide CSV (ts,device,METRIC,...); `.gz` files are gunzipped; the hub's Parquet export is
    /// read through a temporary CSV. Several files are replayed as one recording.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// The broker and how to reach it.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet file written by `ferrohub bench provision`: each recorded device connects with the
    /// credentials of the entry with its id (every recorded device must have one).
    #[arg(long, value_name = "FILE", help_heading = "Broker")]
    pub fleet: Option<PathBuf>,

    /// Pace: 1 (as recorded), 10 (ten times faster), 0.5, or max (as fast as acks allow).
    #[arg(long, default_value = "1", value_parser = replay::parse_speed, help_heading = "Replay")]
    pub speed: replay::Speed,
    /// Move the recording so that its first record is at the start of the replay (gaps kept);
    /// by default the recorded timestamps are sent (backfill).
    #[arg(long, help_heading = "Replay")]
    pub shift_to_now: bool,
    /// Play the recording this many times; each loop continues the timeline of the previous
    /// one (timestamps move on by the recording's span plus its first interval).
    #[arg(
        long = "loop",
        value_name = "N",
        default_value_t = 1,
        help_heading = "Replay"
    )]
    pub loops: u32,
    /// Topic template: {device} (the device id), {index} (its order of appearance).
    #[arg(
        long,
        default_value = "devices/{device}/telemetry",
        help_heading = "Replay"
    )]
    pub topic: String,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = Format::Json, help_heading = "Replay")]
    pub format: Format,
    /// Fail at the first bad row (default: report it with FILE:LINE and skip it).
    #[arg(long, help_heading = "Replay")]
    pub strict: bool,
    /// Most runs of increasing time the files may be split into (an export has one per series;
    /// each costs a small read buffer during the merge).
    #[arg(long, default_value_t = recording::DEFAULT_MAX_RUNS, help_heading = "Replay")]
    pub max_runs: usize,

    /// Handshakes (every device connects before the replay starts), in-flight window,
    /// acknowledgements, reconnects, threads.
    #[command(flatten)]
    pub delivery: DeliveryArgs,

    /// Print the summary as one JSON object instead of a table.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// No progress line (it is never drawn when stderr is not a terminal).
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,
}

impl ReplayArgs {
    /// Parses `ferrohub sim replay`'s arguments (without the command words).
    pub fn try_parse_from<I, T>(args: I) -> Result<ReplayArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            replay: ReplayArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("replay"))
            .chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.replay)
    }
}

/// Arguments of `ferrohub sim profiles`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProfilesArgs {
    /// Print this built-in profile's TOML.
    pub name: Option<String>,
}

/// Arguments of `ferrohub sim preview`.
#[derive(clap::Args, Debug, Clone)]
pub struct PreviewArgs {
    /// Profile: a built-in name or a TOML file.
    #[arg(long, short = 'p', default_value = "environment")]
    pub profile: String,
    /// Set a profile parameter (repeatable), e.g. --set bearing_fault_after=0s.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device index.
    #[arg(long, default_value_t = 0)]
    pub index: u64,
    /// Messages to print.
    #[arg(long, short = 'n', default_value_t = 5)]
    pub messages: u64,
    /// Skip this many messages first (e.g. to look past a fault's start).
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
    /// Time of the first sample: RFC 3339 or milliseconds since the epoch (default: now).
    #[arg(long)]
    pub start: Option<String>,
    /// Override the sampling interval.
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Override the samples per message.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(profile::MAX_BATCH)))]
    pub batch: Option<u32>,
    /// Override the payload format (CBOR and MessagePack are printed as hex).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

impl RunArgs {
    /// Parses `ferrohub sim run`'s flags (without the command words), e.g. for tests and for
    /// callers that build a run from a flag line.
    pub fn try_parse_from<I, T>(args: I) -> Result<RunArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        #[command(args_override_self = true)]
        struct Wrapper {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("run"))
            .chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.run)
    }
}

impl SimArgs {
    /// Worker threads the runtime should have.
    pub fn worker_threads(&self) -> usize {
        match &self.command {
            SimCommand::Run(r) => usize::from(r.delivery.threads),
            SimCommand::Replay(r) => usize::from(r.delivery.threads),
            _ => 1,
        }
    }
}

/// Session Expiry Interval MQTT 5 devices ask for unless told (seconds).
const DEFAULT_SESSION_EXPIRY_SECS: u32 = 300;

/// `"10s"`, `"1h 30m"`, `"250ms"` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if (0.0..=1e12).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 500ms, 10s, 5m or 2h ({e})"))
}

/// Runs `ferrohub sim` (inside a tokio runtime the caller built). `shutdown` stops a run early
/// (the binary passes Ctrl-C / SIGTERM).
pub async fn run_cli(args: SimArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    match args.command {
        SimCommand::Profiles(p) => profiles_cmd(&p),
        SimCommand::Preview(p) => preview_cmd(&p),
        SimCommand::Replay(r) => replay::cli(&r, shutdown).await,
        SimCommand::Run(r) => {
            let summary = if r.worker {
                let summary = run_args(&r, shutdown).await?;
                let done = multi::WorkerLine::Done {
                    latency_us: summary.latency_us.clone(),
                    summary: Box::new(summary),
                };
                println!(
                    "{}",
                    serde_json::to_string(&done).context("rendering the summary")?
                );
                return Ok(());
            } else {
                // The range to split (a provisioned run's devices are named like generated ones).
                let (mix, topic) = profiles_and_topic(&r)?;
                let devices = device_specs(&r, &mix, &topic)?;
                let first = devices.first().map_or(r.first_index, |d| d.index);
                let count = devices.len() as u64;
                drop(devices);
                let per_process = per_process_limit();
                let needed = count.div_ceil(per_process.max(1));
                if needed > r.processes && !r.no_progress {
                    eprintln!(
                        "[sim] {count} devices need more sockets than one process may open \
                         (about {per_process}): using {needed} processes"
                    );
                }
                let processes = r.processes.max(needed);
                if processes > 1 && r.fleet_out.is_some() {
                    bail!(
                        "--fleet-out cannot be written by {processes} processes at once: provision \
                         in one process first (ferrohub sim run --provision --fleet-out FILE \
                         --messages-per-device 1 ...), then run with --fleet FILE --processes \
                         {processes}"
                    );
                }
                if processes > 1 {
                    let args = std::env::args_os().skip(1).collect();
                    multi::run(args, first, count, processes, !r.no_progress, shutdown).await?
                } else {
                    run_args(&r, shutdown).await?
                }
            };
            if r.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).context("rendering the summary")?
                );
            } else {
                print!("{}", summary.table());
            }
            if summary.connected == 0 {
                bail!(
                    "no device connected to {}{}",
                    summary.broker,
                    summary
                        .first_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            if summary.failed_workers > 0 {
                bail!(
                    "{} of {} processes ended without a summary",
                    summary.failed_workers,
                    summary.processes
                );
            }
            Ok(())
        }
    }
}

/// Devices one process may simulate: its socket limit less a margin for everything else.
fn per_process_limit() -> u64 {
    crate::bench::sys::raise_fd_limit().saturating_sub(64)
}

fn profiles_cmd(p: &ProfilesArgs) -> anyhow::Result<()> {
    if let Some(name) = &p.name {
        let Some(text) = profile::builtin_text(name) else {
            bail!(
                "no built-in profile {name:?} (built-in profiles: {})",
                profile::builtin_names().join(", ")
            );
        };
        print!("{text}");
        return Ok(());
    }
    let mut rows = Vec::new();
    for name in profile::builtin_names() {
        let prof = profile::load(name, &Overrides::default())?;
        let params = if prof.params.is_empty() {
            String::new()
        } else {
            format!(
                "  [params: {}]",
                prof.params
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        rows.push((
            prof.name.clone(),
            format!(
                "every {} · {} · {}{}\n    {}",
                humantime::format_duration(prof.interval),
                prof.format.name(),
                prof.metric_names().collect::<Vec<_>>().join(", "),
                params,
                prof.description
            ),
        ));
    }
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (n, d) in rows {
        println!("{n:<width$}  {d}");
    }
    println!("\n`ferrohub sim profiles NAME` prints one as TOML; docs/sim.md is the reference.");
    Ok(())
}

fn parse_start(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s.trim()).with_context(|| {
        format!("--start {s:?}: expected RFC 3339 (2026-01-01T12:00:00Z) or epoch milliseconds")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .context("--start is before 1970")?;
    i64::try_from(d.as_millis()).context("--start is too far in the future")
}

fn preview_cmd(p: &PreviewArgs) -> anyhow::Result<()> {
    let overrides = Overrides::parse(&p.set)?;
    let mut mix = Mix::load(std::slice::from_ref(&p.profile), &overrides)?;
    mix.override_all(p.interval, p.batch, p.format, 1.0);
    let prof = mix.pick(p.index).clone();
    check_interval(prof.interval)?;
    let start = match &p.start {
        Some(s) => parse_start(s)?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0),
    };
    let mut sim = DeviceSim::new(prof.clone(), p.seed, p.index, start);
    let mut samples = vec![Sample::default(); prof.batch as usize];
    let mut out = Vec::new();
    for m in 0..p.skip.saturating_add(p.messages) {
        for s in &mut samples {
            sim.next_into(s);
        }
        if m < p.skip {
            continue;
        }
        out.clear();
        encode(prof.format, &prof, &samples, &mut out)?;
        match prof.format {
            Format::Json => println!("{}", String::from_utf8_lossy(&out)),
            _ => println!(
                "{} bytes: {}",
                out.len(),
                out.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
        }
    }
    Ok(())
}

fn check_interval(d: Duration) -> anyhow::Result<()> {
    if d < Duration::from_millis(1) {
        bail!("--interval must be at least 1ms");
    }
    Ok(())
}

/// A topic template: `{device}`, `{index}` and `{profile}` are replaced per device.
#[derive(Debug, Clone)]
pub struct TopicTemplate(String);

impl TopicTemplate {
    /// Checks the placeholders.
    pub fn parse(t: &str) -> anyhow::Result<TopicTemplate> {
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                bail!("--topic {t:?}: unclosed {{");
            };
            let name = &rest[open + 1..open + close];
            if !["device", "index", "profile"].contains(&name) {
                bail!(
                    "--topic {t:?}: unknown placeholder {{{name}}} (use {{device}}, {{index}}, {{profile}})"
                );
            }
            rest = &rest[open + close + 1..];
        }
        if t.is_empty() || t.contains(['+', '#', '\0']) {
            bail!("--topic {t:?}: a topic to publish on may not be empty or contain + # or NUL");
        }
        Ok(TopicTemplate(t.to_string()))
    }

    /// The topic of one device.
    pub fn render(&self, device: &str, index: u64, profile: &str) -> String {
        self.0
            .replace("{device}", device)
            .replace("{index}", &index.to_string())
            .replace("{profile}", profile)
    }
}

/// Checks the arguments, loads the profiles, builds the device list and runs the fleet.
pub async fn run_args(a: &RunArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<Summary> {
    if !(a.connect_rate.is_finite() && a.connect_rate >= 0.0) {
        bail!("--connect-rate must be a non-negative number of devices per second");
    }
    if a.duration.is_some_and(|d| d.is_zero()) {
        bail!("--duration must be above zero");
    }
    if a.messages_per_device == Some(0) {
        bail!("--messages-per-device must be at least 1");
    }
    if a.devices == Some(0) {
        bail!("--devices must be at least 1");
    }
    if let Some(i) = a.interval {
        check_interval(i)?;
    }
    if a.prefix.is_empty() && a.fleet.is_none() {
        bail!("--prefix may not be empty");
    }
    let setup = transport::setup(&a.broker)?;
    let (mix, topic) = profiles_and_topic(a)?;
    let devices = if a.provision {
        provisioned_specs(a, &mix, &topic, setup.tls.as_ref()).await?
    } else {
        device_specs(a, &mix, &topic)?
    };
    let usable = per_process_limit();
    if devices.len() as u64 > usable {
        bail!(
            "{} devices need {} sockets, but this process may open about {usable}: use \
             --processes {} (or several processes with distinct --first-index ranges)",
            devices.len(),
            devices.len(),
            (devices.len() as u64).div_ceil(usable.max(1))
        );
    }
    let cfg = RunConfig {
        opts: a.broker.client_opts(setup.transport, setup.port).await?,
        broker: setup.broker,
        qos: a.broker.qos(),
        seed: a.seed,
        connect_rate: a.connect_rate,
        connect_concurrency: a.delivery.connect_concurrency as usize,
        duration: a.duration,
        messages_per_device: a.messages_per_device,
        inflight: a.delivery.inflight,
        ack_timeout: a.delivery.ack_timeout,
        drain: a.delivery.drain,
        progress: if a.worker {
            ProgressMode::JsonLines
        } else if a.no_progress {
            ProgressMode::Off
        } else {
            ProgressMode::Terminal
        },
        reconnect: a.delivery.reconnect(),
        chaos: chaos::Chaos {
            disconnect_per_min: a.chaos_disconnect.unwrap_or(0.0),
            latency: a.chaos_latency,
            loss: a.chaos_loss.unwrap_or(0.0),
            clock_skew: a.chaos_clock_skew.unwrap_or_default(),
            burst: a.chaos_burst,
            misbehave: a.chaos_misbehave.unwrap_or(0.0),
        },
        behaviour: behave::Behaviour {
            twin: !a.no_twin,
            commands: !a.no_commands,
            health_every: (!a.health_every.is_zero()).then_some(a.health_every),
            firmware: Arc::from(a.firmware.as_str()),
        },
        session_expiry: match a.session_expiry {
            Some(d) => u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
            // 3.1.1 has no expiry to ask for: a persistent session would outlive the run.
            None if a.broker.protocol.version().is_v5() => DEFAULT_SESSION_EXPIRY_SECS,
            None => 0,
        },
        sources: a.broker.source_addresses.clone(),
    };
    if cfg.progress == ProgressMode::Terminal
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        let bound = match (a.duration, a.messages_per_device) {
            (None, None) => "until Ctrl-C".to_string(),
            (Some(d), None) => format!("for {}", humantime::format_duration(d)),
            (None, Some(m)) => format!("{m} messages per device"),
            (Some(d), Some(m)) => format!(
                "{m} messages per device, at most {}",
                humantime::format_duration(d)
            ),
        };
        eprintln!(
            "[sim] {} devices → {} (MQTT {}, QoS {}), {bound}",
            devices.len(),
            cfg.broker,
            a.broker.protocol.label(),
            a.broker.qos
        );
    }
    Ok(run::run(cfg, devices, shutdown).await?)
}

fn parse_time_scale(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.001..=1_000_000.0).contains(&x) => Ok(x),
        _ => Err(format!(
            "{s:?} is not a time scale between 0.001 and 1000000"
        )),
    }
}

/// The run's profiles and topic template, checked.
fn profiles_and_topic(a: &RunArgs) -> anyhow::Result<(Mix, TopicTemplate)> {
    let overrides = Overrides::parse(&a.set)?;
    let mut mix = Mix::load(&a.profiles, &overrides)?;
    mix.override_all(a.interval, a.batch, a.format, a.time_scale);
    let topic = TopicTemplate::parse(&a.topic)?;
    Ok((mix, topic))
}

/// The devices of this process: ids, credentials, profiles and topics.
pub fn device_specs(
    a: &RunArgs,
    mix: &Mix,
    topic: &TopicTemplate,
) -> anyhow::Result<Vec<DeviceSpec>> {
    let spec = |index: u64, id: String, creds: Option<Creds>| {
        let profile = mix.pick(index).clone();
        DeviceSpec {
            topic: Arc::from(topic.render(&id, index, &profile.name).as_str()),
            index,
            id,
            creds,
            profile,
        }
    };
    if let Some(path) = &a.fleet {
        let tls = match a.broker.transport {
            TransportKind::Tls | TransportKind::Wss => Some(transport::tls_settings(&a.broker)?),
            TransportKind::Tcp | TransportKind::Ws => None,
        };
        let all = fleet::devices(&fleet::read(path)?, 0);
        let first = usize::try_from(a.first_index).unwrap_or(usize::MAX);
        if first >= all.len() {
            bail!(
                "{} has {} devices; --first-index {} is past its end",
                path.display(),
                all.len(),
                a.first_index
            );
        }
        let n = match a.devices {
            None => all.len() - first,
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if first.saturating_add(n) > all.len() {
            bail!(
                "{} has {} devices; --first-index {} --devices {n} goes past its end",
                path.display(),
                all.len(),
                a.first_index
            );
        }
        return all[first..first + n]
            .iter()
            .enumerate()
            .map(|(k, e)| {
                let creds = fleet_creds(e, tls.as_ref())?;
                Ok(spec(a.first_index + k as u64, e.client_id.clone(), creds))
            })
            .collect();
    }
    let n = a.devices.unwrap_or(10);
    let Some(end) = a.first_index.checked_add(n) else {
        bail!("--first-index + --devices overflows");
    };
    Ok((a.first_index..end)
        .map(|index| {
            let id = format!("{}-{index}", a.prefix);
            let creds = a.broker.shared_creds(&id);
            spec(index, id, creds)
        })
        .collect())
}

/// A fleet entry's credentials: user name, password and, over TLS (`tls`), its own client
/// certificate.
pub(crate) fn fleet_creds(
    e: &fleet::FleetEntry,
    tls: Option<&crate::bench::transport::TlsSettings>,
) -> anyhow::Result<Option<Creds>> {
    let tls = transport::device_tls(
        tls,
        &e.client_id,
        e.cert_pem.as_deref(),
        e.key_pem.as_deref(),
    )?;
    Ok(
        (e.username.is_some() || e.password.is_some() || tls.is_some()).then(|| Creds {
            username: e.username.clone(),
            password: e.password.clone().map(Bytes::from),
            tls,
        }),
    )
}

/// `--provision`: registers this run's devices through the API (or reuses them), writes
/// `--fleet-out`, and gives each device its new credentials.
async fn provisioned_specs(
    a: &RunArgs,
    mix: &Mix,
    topic: &TopicTemplate,
    tls: Option<&crate::bench::transport::TlsSettings>,
) -> anyhow::Result<Vec<DeviceSpec>> {
    let n = a.devices.unwrap_or(10);
    let Some(end) = a.first_index.checked_add(n) else {
        bail!("--first-index + --devices overflows");
    };
    let ids: Vec<(u64, String)> = (a.first_index..end)
        .map(|index| (index, format!("{}-{index}", a.prefix)))
        .collect();
    let params = provision::Params {
        api: a.api.clone(),
        token: a.token.clone(),
        tenant: a.tenant.clone(),
        devices: ids
            .iter()
            .map(|(index, id)| (id.clone(), mix.pick(*index).name.clone()))
            .collect(),
        certificates: a.provision_certs,
        concurrency: a.provision_concurrency as usize,
        progress: !a.no_progress,
    };
    let api_tls = match tls {
        Some(t) => t.clone(),
        None => transport::tls_settings(&a.broker)?,
    };
    let (entries, _) = provision::provision(&params, &api_tls)
        .await
        .with_context(|| format!("provisioning through {}", a.api))?;
    if let Some(path) = &a.fleet_out {
        provision::write_fleet(path, &entries)?;
    }
    ids.into_iter()
        .zip(&entries)
        .map(|((index, id), e)| {
            let profile = mix.pick(index).clone();
            Ok(DeviceSpec {
                topic: Arc::from(topic.render(&id, index, &profile.name).as_str()),
                index,
                id,
                creds: fleet_creds(e, tls)?,
                profile,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates() {
        let t = TopicTemplate::parse("plant/{profile}/{device}/t{index}").unwrap();
        assert_eq!(t.render("sim-3", 3, "pump"), "plant/pump/sim-3/t3");
        for bad in ["devices/{id}/t", "devices/{device", "a/+/b", "a/#", ""] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn device_ranges_and_credentials() {
        let a = RunArgs::try_parse_from([
            "-n",
            "3",
            "--first-index",
            "10",
            "--prefix",
            "d",
            "--password",
            "pw",
            "--profile",
            "environment:1",
            "--profile",
            "smart-meter:1",
        ])
        .unwrap();
        let mix = Mix::load(&a.profiles, &Overrides::default()).unwrap();
        let topic = TopicTemplate::parse(&a.topic).unwrap();
        let devs = device_specs(&a, &mix, &topic).unwrap();
        let ids: Vec<&str> = devs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["d-10", "d-11", "d-12"]);
        assert_eq!(&*devs[1].topic, "devices/d-11/telemetry");
        let c = devs[2].creds.as_ref().unwrap();
        assert_eq!(c.username.as_deref(), Some("d-12"));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        // Profiles follow the index, not the position in this process.
        for d in &devs {
            assert_eq!(d.profile.name, mix.pick(d.index).name);
        }
    }

    #[test]
    fn fleet_files_give_ids_and_credentials() {
        let path = std::env::temp_dir().join(format!("fh-sim-fleet-{}.jsonl", std::process::id()));
        let mut text = String::new();
        for i in 0..3 {
            text += &format!(
                "{{\"role\":\"device\",\"client_id\":\"bd-{i}\",\"username\":\"bd-{i}\",\"password\":\"p{i}\"}}\n"
            );
        }
        text += "{\"role\":\"monitor\",\"client_id\":\"bench-monitor\"}\n";
        std::fs::write(&path, text).unwrap();
        let file = path.to_string_lossy().to_string();
        let parse = |extra: &[&str]| {
            let mut v = vec!["--fleet", file.as_str()];
            v.extend_from_slice(extra);
            RunArgs::try_parse_from(v).unwrap()
        };
        let mix = Mix::load(&["environment".to_string()], &Overrides::default()).unwrap();
        let topic = TopicTemplate::parse("devices/{device}/telemetry").unwrap();
        let devs = device_specs(&parse(&["--first-index", "1"]), &mix, &topic).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!((devs[0].index, devs[0].id.as_str()), (1, "bd-1"));
        assert_eq!(&*devs[1].topic, "devices/bd-2/telemetry");
        let c = devs[1].creds.as_ref().unwrap();
        assert_eq!(c.username.as_deref(), Some("bd-2"));
        assert_eq!(c.password.as_deref(), Some(&b"p2"[..]));
        assert!(device_specs(&parse(&["--first-index", "3"]), &mix, &topic).is_err());
        assert!(device_specs(&parse(&["--first-index", "1", "-n", "3"]), &mix, &topic).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
