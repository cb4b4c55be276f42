//! `ferrohub bench`: an MQTT broker benchmark harness.
//!
//! Raw MQTT 3.1.1/5.0 over tokio TCP with `ferrohub-proto` as the client codec, so it can target
//! any broker address. Scenarios:
//!
//! * `fan-in`: P publishers, each on its own topic `bench/fanin/<run>/<i>`, one subscriber on
//!   the wildcard `bench/fanin/<run>/#`;
//! * `fan-out`: one publisher on `bench/fanout/<run>`, N subscribers of that topic (every message
//!   is delivered N times; throughput counts deliveries);
//! * `pairs`: N device-like pairs, publisher i on `bench/pairs/<run>/<i>` subscribed by
//!   subscriber i only;
//! * `idle`: C idle connections opened as fast as possible (connect rate, broker RSS per
//!   connection), held, then checked (every connection answers PINGREQ; a message still routes);
//! * `connect`: the devices of a fleet file connect one after the other with their own passwords
//!   or client certificates (CONNECT, CONNACK, DISCONNECT), N at a time, in passes (first cold,
//!   then warm): authenticated connects per second;
//! * `provision`: registers a fleet (devices, passwords, certificates, a telemetry monitor) in a
//!   hub data directory's registry database and writes the fleet file (see [`fleet`]);
//! * `registry`: loads a million devices into a temporary registry and times device listings
//!   (see [`regbench`]);
//! * `twins` / `commands`: reported twin updates (accepted/s, accept latency) and direct-command
//!   round trips through a running hub (see `twinbench.rs`);
//! * `tsdb`: the telemetry engine in-process (no hub): ingest rate, bytes per point and query
//!   times on generated sensor series, side by side with SQLite and PostgreSQL (see
//!   `tsdbbench.rs`).
//!
//! With `--fleet`, `fan-in` publishers are the fleet's devices (their credentials, client ids
//! and topics `devices/{id}/telemetry`) and the subscriber is the fleet's monitor on
//! `devices/+/telemetry`: the default device policy is checked on every PUBLISH. Add
//! `--fleet-anonymous` for the same ids and topics without credentials.
//!
//! `<run>` is a per-run token, so that messages an overloaded broker still delivers from an
//! earlier run are never counted in a later one.
//!
//! Publishers are paced (`--rate` messages/s in total, 0 = as fast as possible) and stamp every
//! payload with a monotonic send time and a sequence number; subscribers record end-to-end latency
//! and count deliveries. Each run prints one JSON line on stdout; `--ladder r1,r2,...` runs one
//! step per offered rate and ends with a summary line carrying `max_sustainable_rate`: the highest
//! offered rate sent in full with loss ≤ 0.5 % and p99 ≤ 100 ms.
//!
//! Cost: publishers write paced batches (one pre-encoded PUBLISH copied and stamped per message,
//! one write per batch) and drain PUBACKs once per tick; subscribers decode whatever one read
//! returned and answer all its PUBACKs in one write. What remains is mostly the kernel's loopback
//! TCP work, which depends on how the broker writes: against brokers that batch their writes the
//! harness uses a third to a half of the broker's CPU; against Mosquitto, which writes every
//! packet separately, about three quarters; for `pairs` (one message per connection per write,
//! on both sides) nearly as much as the broker.
//!
//! ```text
//! ferrohub bench fan-in --port 1883 --qos 1 --publishers 8 --ladder 20k,40k,60k,80k,100k
//! ferrohub bench pairs --pairs 1000 --qos 1 --rate 10000 --duration 10 --broker-pid 1234
//! ferrohub bench idle --connections 19000 --duration 30 --broker-pid 1234
//! ```

pub mod connect;
pub mod fleet;
mod idle;
mod ladder;
mod payload;
pub mod regbench;
pub(crate) mod stats;
pub(crate) mod sys;
mod telemetrybench;
mod traffic;
pub mod transport;
mod tsdbbench;
mod twinbench;
pub(crate) mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::ValueEnum;
use ferrohub_proto::mqtt::ProtocolVersion;
use ferrohub_types::QoS;
use serde::Serialize;

pub use connect::ConnectAuth;
pub use ladder::{Criteria, LadderError, StepOutcome, parse_ladder};
pub use payload::{STAMP_LEN, Stamp};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Many publishers (--publishers), each on its own topic, one wildcard subscriber.
    FanIn,
    /// One publisher, many subscribers (--subscribers) of the same topic.
    FanOut,
    /// N publisher/subscriber pairs (--pairs), each topic subscribed by its own subscriber only.
    Pairs,
    /// Many idle connections (--connections): connect rate, broker RSS per connection.
    Idle,
    /// Internal: one worker process of `idle` holding its share of the connections.
    #[value(hide = true)]
    IdleWorker,
    /// Authenticated connect rate of a fleet's devices (--fleet, --auth), in passes.
    Connect,
    /// Register a benchmark fleet in a hub data directory (--data-dir, --devices).
    Provision,
    /// Registry queries at fleet scale (--devices, default 1,000,000).
    Registry,
    /// Twin reported updates through a hub (--devices, --connections): accepted/s, accept latency.
    Twins,
    /// Direct commands over HTTP to devices connected over MQTT (--devices, --http-concurrency).
    Commands,
    /// The telemetry engine in-process: ingest, bytes per point, queries (--series,
    /// --points-per-series, --fleet-devices), optionally against SQLite and PostgreSQL (--compare).
    Tsdb,
    /// End-to-end telemetry ingest of a running hub: QoS 1 JSON telemetry from --connections
    /// publishers for --devices devices, --metrics-per-message metrics each; stored points/s.
    Telemetry,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::Pairs => "pairs",
            Scenario::Idle => "idle",
            Scenario::IdleWorker => "idle-worker",
            Scenario::Connect => "connect",
            Scenario::Provision => "provision",
            Scenario::Registry => "registry",
            Scenario::Twins => "twins",
            Scenario::Commands => "commands",
            Scenario::Tsdb => "tsdb",
            Scenario::Telemetry => "telemetry",
        }
    }
}

/// MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// MQTT 3.1.1.
    #[value(name = "v3", alias = "3.1.1", alias = "v311", alias = "4")]
    V3,
    /// MQTT 5.0.
    #[value(name = "v5", alias = "5", alias = "5.0")]
    V5,
}

impl Protocol {
    /// The codec's protocol version.
    pub fn version(self) -> ProtocolVersion {
        match self {
            Protocol::V3 => ProtocolVersion::V311,
            Protocol::V5 => ProtocolVersion::V5,
        }
    }

    /// `3.1.1` or `5.0`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::V3 => "3.1.1",
            Protocol::V5 => "5.0",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Protocol::V3 => "v3",
            Protocol::V5 => "v5",
        }
    }
}

/// Arguments of `ferrohub bench`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Prints one JSON line per run on stdout (and a summary line after a --ladder).\n\
                  Examples:\n  ferrohub bench fan-in --port 1883 --qos 0 --ladder 50k,100k,150k\n  \
                  ferrohub bench pairs --pairs 1000 --qos 1 --rate 10000 --broker-pid $(pidof mosquitto)\n  \
                  ferrohub bench idle --connections 15000 --duration 30"
)]
pub struct BenchArgs {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT/TCP port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// MQTT version: v3 (3.1.1) or v5 (5.0).
    #[arg(long, value_enum, default_value_t = Protocol::V3)]
    pub protocol: Protocol,
    /// QoS of publications and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Payload size in bytes (at least 16: send timestamp + publisher + sequence).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=16_000_000))]
    pub payload: u32,
    /// Measurement window in seconds (for `idle`: how long connections are held).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up before the window, seconds (messages sent then are not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Offered publish rate in messages/s over all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Run one step per offered rate ("20000,40000,60k") and report the maximum sustainable rate.
    #[arg(long)]
    pub ladder: Option<String>,
    /// fan-in: number of publishers.
    #[arg(long, default_value_t = 8)]
    pub publishers: u32,
    /// fan-out: number of subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: u32,
    /// pairs: number of publisher/subscriber pairs.
    #[arg(long, default_value_t = 1000)]
    pub pairs: u32,
    /// idle: number of connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: u32,
    /// QoS 1 in-flight window per publisher (capped by the broker's v5 Receive Maximum).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// User name for CONNECT.
    #[arg(long)]
    pub username: Option<String>,
    /// Password for CONNECT.
    #[arg(long, env = "FERROHUB_BENCH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Broker process id: samples its CPU (`/proc/PID/stat`) and RSS (`/proc/PID/status`).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Free text copied into every JSON line (e.g. the broker's name).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Longest wait for in-flight deliveries after publishing stops, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// Ladder: stop after this many consecutive unsustainable steps (0 = run every step).
    #[arg(long, default_value_t = 2)]
    pub ladder_stop_after: u32,
    /// Ladder: pause between steps, seconds (lets the broker settle).
    #[arg(long, default_value_t = 1.0)]
    pub ladder_pause: f64,
    /// Ladder: largest loss ratio of a sustainable step.
    #[arg(long, default_value_t = 0.005)]
    pub max_loss: f64,
    /// Ladder: largest p99 latency of a sustainable step, ms.
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,
    /// With --broker-pid: before each run, wait up to this many seconds for the broker to go
    /// quiet (below 10 % of a core), so a backlog from the previous run does not leak in.
    #[arg(long, default_value_t = 10.0)]
    pub settle: f64,
    /// Pacing tick in ms (default: about one message per publisher per tick, 1–50 ms).
    #[arg(long)]
    pub tick_ms: Option<f64>,
    /// Publishers sharing a pacing phase send together, in bursts of at most this many messages
    /// (fewer, larger bursts keep the harness cheap; smaller ones make traffic smoother).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub burst: u32,
    /// Connection handshakes in flight at once (over all processes). Keep it below the broker's
    /// listen backlog (Mosquitto's is 100): an overflowing accept queue drops SYNs, and each
    /// dropped SYN costs a one-second retransmission.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: u32,
    /// idle: most connections one process holds; more are spread over worker processes.
    #[arg(long, default_value_t = 15_000)]
    pub max_per_process: u32,
    /// Keep Alive sent in CONNECT, seconds (connections ping at half of it).
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// Timeout for CONNACK/SUBACK, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Print a progress line on stderr every second.
    #[arg(long)]
    pub progress: bool,
    /// Runtime worker threads of the harness; tsdb: ingest threads (and PostgreSQL connections).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Client identifier prefix (default: unique per invocation).
    #[arg(long, hide = true)]
    pub client_prefix: Option<String>,
    /// connect, fan-in: fleet file written by `bench provision` (ids and credentials).
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// fan-in with --fleet: the fleet's client ids and topics, without credentials.
    #[arg(long)]
    pub fleet_anonymous: bool,
    /// connect: how the devices authenticate.
    #[arg(long, value_enum, default_value_t = ConnectAuth::Password)]
    pub auth: ConnectAuth,
    /// connect: TLS 1.3 (needs --ca-file); implied by --auth certificate.
    #[arg(long)]
    pub tls: bool,
    /// connect: PEM file of the CA that signed the broker's certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// connect: name checked against the broker's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// connect: passes over the whole fleet (the first is cold, later ones warm).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub passes: u32,
    /// connect: devices of the fleet to use (default all); provision: devices to register
    /// (default 2,000); registry: devices to load (default 1,000,000).
    #[arg(long)]
    pub devices: Option<usize>,
    /// telemetry: metrics in each published payload.
    #[arg(long, default_value_t = 10)]
    pub metrics_per_message: usize,
    /// provision: the hub data directory to create; registry: where to keep the database
    /// (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// provision: credentials per device, comma-separated: password, certificate.
    #[arg(long, default_value = "password,certificate")]
    pub credentials: String,
    /// provision: also register `bench-monitor`, allowed to read `devices/+/telemetry`.
    #[arg(long)]
    pub monitor: bool,
    /// provision: let the registry generate the passwords (256 random bits, stored as SHA-256,
    /// no argon2id) instead of choosing them (argon2id).
    #[arg(long)]
    pub generated_passwords: bool,
    /// provision: where to write the fleet file (default DATA_DIR/fleet.jsonl).
    #[arg(long)]
    pub fleet_out: Option<PathBuf>,
    /// registry: timed repetitions of each query.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub queries: u32,
    /// registry: keep the temporary database; tsdb: keep the temporary directory.
    #[arg(long)]
    pub keep: bool,
    /// commands: the hub's HTTP port.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// commands: an admin API token.
    #[arg(long, env = "FERROHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// commands: operators sending direct commands at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub http_concurrency: u32,
    /// tsdb: points per series of the main dataset (1 Hz; 86,400 = one day).
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub points_per_series: u64,
    /// tsdb: series of the main dataset, spread evenly over ten tenants (five value profiles ×
    /// regular and jittered timestamps); rounded up to a multiple of ten.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub series: u64,
    /// tsdb: points per write call (also per SQLite transaction and per PostgreSQL COPY).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch: u64,
    /// tsdb: data directory, kept afterwards (default: a temporary directory, removed afterwards
    /// unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// tsdb: sync before acknowledging (`--fsync false` to turn off): the engine's WAL, SQLite
    /// `synchronous = FULL` (else NORMAL), PostgreSQL `synchronous_commit = on` (else off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fsync: bool,
    /// tsdb: also store the same points in these, comma-separated: sqlite, postgres.
    #[arg(long, default_value = "")]
    pub compare: String,
    /// tsdb: PostgreSQL connection string for --compare postgres (e.g.
    /// "host=/tmp port=54329 user=postgres dbname=postgres"); nothing is started.
    #[arg(long, env = "FERROHUB_BENCH_PG_URL")]
    pub pg_url: Option<String>,
    /// tsdb: devices of the fleet dataset (one temperature series each).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub fleet_devices: u64,
    /// tsdb: days of the fleet dataset, ending now.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub fleet_days: u32,
    /// tsdb: sample spacing of the fleet dataset in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub fleet_interval_s: u32,
    /// tsdb: devices of the fleet dataset stored in all three engines for the side-by-side
    /// fleet query (default: --fleet-devices, or 1,000 if SQLite's measured insert rate projects
    /// more than 10 minutes for the whole fleet).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub compare_fleet_devices: Option<u64>,
}

/// Runs `ferrohub bench` on its own two-worker tokio runtime; JSON lines go to stdout. `tsdb`
/// runs on plain threads instead (the engine's and the PostgreSQL client's blocking calls must
/// not run inside a runtime).
pub fn run_cli(args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    if args.scenario == Scenario::Tsdb {
        return tsdbbench::run(&tsdbbench::TsdbBenchParams::from_args(&args)?);
    }
    let fd_limit = sys::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .thread_name("bench")
        .build()
        .context("starting the benchmark runtime")?;
    rt.block_on(run(args, fd_limit))
}

fn validate(a: &BenchArgs) -> anyhow::Result<()> {
    if !(a.duration.is_finite() && a.duration > 0.0) {
        bail!("--duration must be positive");
    }
    for (name, v) in [
        ("--warmup", a.warmup),
        ("--drain", a.drain),
        ("--ladder-pause", a.ladder_pause),
        ("--settle", a.settle),
        ("--max-loss", a.max_loss),
        ("--max-p99-ms", a.max_p99_ms),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be a non-negative number");
        }
    }
    if !(a.connect_timeout.is_finite() && a.connect_timeout > 0.0) {
        bail!("--connect-timeout must be positive");
    }
    if let Some(t) = a.tick_ms
        && !(t.is_finite() && (0.1..=1000.0).contains(&t))
    {
        bail!("--tick-ms must be between 0.1 and 1000");
    }
    let zero = match a.scenario {
        Scenario::FanIn => (a.publishers == 0).then_some("--publishers"),
        Scenario::FanOut => (a.subscribers == 0).then_some("--subscribers"),
        Scenario::Pairs => (a.pairs == 0).then_some("--pairs"),
        Scenario::Idle | Scenario::IdleWorker => (a.connections == 0).then_some("--connections"),
        Scenario::Connect
        | Scenario::Provision
        | Scenario::Registry
        | Scenario::Twins
        | Scenario::Telemetry
        | Scenario::Commands => (a.devices == Some(0)).then_some("--devices"),
        Scenario::Tsdb => None,
    };
    if let Some(flag) = zero {
        bail!("{flag} must be at least 1");
    }
    if a.connect_concurrency == 0 || a.max_per_process == 0 {
        bail!("--connect-concurrency and --max-per-process must be at least 1");
    }
    if a.ladder.is_some()
        && !matches!(
            a.scenario,
            Scenario::FanIn | Scenario::FanOut | Scenario::Pairs
        )
    {
        bail!("--ladder applies to fan-in, fan-out and pairs");
    }
    match a.scenario {
        Scenario::Connect if a.fleet.is_none() => bail!("connect needs --fleet"),
        Scenario::Provision if a.data_dir.is_none() => bail!("provision needs --data-dir"),
        Scenario::FanOut | Scenario::Pairs | Scenario::Idle if a.fleet.is_some() => {
            bail!("--fleet applies to connect and fan-in")
        }
        _ => {}
    }
    if (a.tls || a.auth == ConnectAuth::Certificate) && a.ca_file.is_none() {
        bail!("TLS needs --ca-file (the CA of the broker's certificate)");
    }
    Ok(())
}

async fn run(a: BenchArgs, fd_limit: u64) -> anyhow::Result<()> {
    match a.scenario {
        Scenario::Provision => return run_provision(&a).await,
        Scenario::Registry => {
            return regbench::run(&regbench::RegistryBenchParams {
                devices: a.devices.unwrap_or(1_000_000),
                queries: a.queries as usize,
                data_dir: a.data_dir.clone(),
                keep: a.keep,
                progress: true,
                label: a.label.clone(),
            })
            .await;
        }
        _ => {}
    }
    let addr = tokio::net::lookup_host((a.host.as_str(), a.port))
        .await
        .with_context(|| format!("resolving {}:{}", a.host, a.port))?
        .next()
        .with_context(|| format!("{}:{} resolves to no address", a.host, a.port))?;
    let opts = Arc::new(wire::ClientOpts {
        addr,
        version: a.protocol.version(),
        username: a.username.clone(),
        password: a.password.clone().map(Bytes::from),
        keep_alive: a.keep_alive,
        timeout: Duration::from_secs_f64(a.connect_timeout),
        transport: wire::Transport::Tcp,
    });
    let prefix = a.client_prefix.clone().unwrap_or_else(unique_prefix);
    // Keep a margin of descriptors for the runtime, stdio and the routing check.
    let usable = usize::try_from(fd_limit.saturating_sub(64)).unwrap_or(usize::MAX);
    match a.scenario {
        Scenario::IdleWorker => {
            idle::worker(
                opts,
                a.connections as usize,
                &prefix,
                a.connect_concurrency as usize,
            )
            .await
        }
        Scenario::Idle => run_idle(&a, opts, prefix, usable).await,
        Scenario::FanIn | Scenario::FanOut | Scenario::Pairs => {
            run_traffic(&a, opts, prefix, usable).await
        }
        Scenario::Connect => run_connect(&a, addr).await,
        Scenario::Twins => twinbench::run_twins(&a, opts, prefix).await,
        Scenario::Commands => twinbench::run_commands(&a, opts, prefix).await,
        Scenario::Telemetry => telemetrybench::run_telemetry(&a, opts, prefix).await,
        Scenario::Provision | Scenario::Registry | Scenario::Tsdb => Ok(()),
    }
}

async fn run_provision(a: &BenchArgs) -> anyhow::Result<()> {
    let Some(dir) = a.data_dir.clone() else {
        bail!("provision needs --data-dir");
    };
    let kinds: Vec<&str> = a
        .credentials
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(k) = kinds
        .iter()
        .find(|k| !matches!(**k, "password" | "certificate"))
    {
        bail!("--credentials: unknown kind {k} (password, certificate)");
    }
    let report = fleet::provision(&fleet::ProvisionParams {
        fleet_out: a
            .fleet_out
            .clone()
            .unwrap_or_else(|| dir.join("fleet.jsonl")),
        data_dir: dir,
        devices: a.devices.unwrap_or(2_000),
        passwords: kinds.contains(&"password"),
        generated_passwords: a.generated_passwords,
        certificates: kinds.contains(&"certificate"),
        monitor: a.monitor,
        parallel: usize::from(a.threads).max(2),
        progress: a.progress,
    })
    .await?;
    emit(&report)
}

#[derive(Debug, Serialize)]
struct ConnectLine<'a> {
    scenario: &'static str,
    label: &'a str,
    broker: String,
    protocol: &'static str,
    broker_pid: Option<u32>,
    unix_time: u64,
    #[serde(flatten)]
    stats: &'a connect::PassStats,
}

async fn run_connect(a: &BenchArgs, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let Some(path) = &a.fleet else {
        bail!("connect needs --fleet");
    };
    let all = fleet::read(path)?;
    let devices = fleet::devices(&all, a.devices.unwrap_or(0));
    if devices.is_empty() {
        bail!("{} has no devices", path.display());
    }
    let tls = if a.tls || a.auth == ConnectAuth::Certificate {
        let Some(ca) = &a.ca_file else {
            bail!("TLS needs --ca-file");
        };
        Some(connect::TlsSetup::load(ca, &a.server_name)?)
    } else {
        None
    };
    let passes = connect::run(&connect::ConnectParams {
        addr,
        version: a.protocol.version(),
        devices,
        auth: a.auth,
        tls,
        concurrency: a.connect_concurrency as usize,
        passes: a.passes as usize,
        keep_alive: a.keep_alive,
        timeout: Duration::from_secs_f64(a.connect_timeout),
        broker_pid: a.broker_pid,
        settle: Duration::from_secs_f64(a.settle),
        progress: a.progress,
    })
    .await?;
    let mut failed = 0;
    for s in &passes {
        failed += s.failed;
        emit(&ConnectLine {
            scenario: "connect",
            label: &a.label,
            broker: format!("{}:{}", a.host, a.port),
            protocol: a.protocol.label(),
            broker_pid: a.broker_pid,
            unix_time: unix_time(),
            stats: s,
        })?;
    }
    if failed > 0 {
        eprintln!(
            "[connect] {failed} connects failed: {}",
            passes
                .iter()
                .find_map(|s| s.first_error.as_deref())
                .unwrap_or("?")
        );
    }
    Ok(())
}

fn unique_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("fhb{:x}{:x}", std::process::id(), nanos)
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The topology of a message-flow scenario. Client identifiers start with `prefix`, which is
/// unique per run and also names the run's topic level, so that a late message from an earlier
/// run (still queued in the broker) can never be counted in this one.
fn topology(a: &BenchArgs, prefix: &str, fleet: Option<&FleetClients>) -> traffic::Topology {
    use traffic::{PubSpec, SubSpec, Topology};
    let run = prefix;
    if let (Scenario::FanIn, Some(f)) = (a.scenario, fleet) {
        return Topology {
            publishers: f
                .devices
                .iter()
                .map(|(id, creds)| PubSpec {
                    client_id: id.clone(),
                    topic: format!("devices/{id}/telemetry"),
                    creds: creds.clone(),
                })
                .collect(),
            subscribers: vec![SubSpec {
                client_id: f.monitor.0.clone(),
                filter: "devices/+/telemetry".into(),
                pub_base: 0,
                pub_count: f.devices.len() as u32,
                creds: f.monitor.1.clone(),
            }],
            fanout: 1,
        };
    }
    match a.scenario {
        Scenario::FanIn => Topology {
            publishers: (0..a.publishers)
                .map(|i| PubSpec {
                    client_id: format!("{prefix}-p{i}"),
                    topic: format!("bench/fanin/{run}/{i}"),
                    creds: None,
                })
                .collect(),
            subscribers: vec![SubSpec {
                client_id: format!("{prefix}-s0"),
                filter: format!("bench/fanin/{run}/#"),
                pub_base: 0,
                pub_count: a.publishers,
                creds: None,
            }],
            fanout: 1,
        },
        Scenario::FanOut => Topology {
            publishers: vec![PubSpec {
                client_id: format!("{prefix}-p0"),
                topic: format!("bench/fanout/{run}"),
                creds: None,
            }],
            subscribers: (0..a.subscribers)
                .map(|i| SubSpec {
                    client_id: format!("{prefix}-s{i}"),
                    filter: format!("bench/fanout/{run}"),
                    pub_base: 0,
                    pub_count: 1,
                    creds: None,
                })
                .collect(),
            fanout: u64::from(a.subscribers),
        },
        _ => Topology {
            publishers: (0..a.pairs)
                .map(|i| PubSpec {
                    client_id: format!("{prefix}-p{i}"),
                    topic: format!("bench/pairs/{run}/{i}"),
                    creds: None,
                })
                .collect(),
            subscribers: (0..a.pairs)
                .map(|i| SubSpec {
                    client_id: format!("{prefix}-s{i}"),
                    filter: format!("bench/pairs/{run}/{i}"),
                    pub_base: i,
                    pub_count: 1,
                    creds: None,
                })
                .collect(),
            fanout: 1,
        },
    }
}

/// Fan-in clients taken from a fleet file: `(client id, credentials)` of the publishers and of
/// the monitor (credentials `None` with `--fleet-anonymous`).
struct FleetClients {
    devices: Vec<(String, Option<wire::Creds>)>,
    monitor: (String, Option<wire::Creds>),
}

fn fleet_clients(a: &BenchArgs) -> anyhow::Result<Option<FleetClients>> {
    let Some(path) = &a.fleet else {
        return Ok(None);
    };
    let all = fleet::read(path)?;
    let creds = |e: &fleet::FleetEntry| {
        (!a.fleet_anonymous).then(|| wire::Creds {
            username: e.username.clone(),
            password: e.password.clone().map(Bytes::from),
            tls: None,
        })
    };
    let devices: Vec<_> = fleet::devices(&all, a.publishers as usize)
        .iter()
        .map(|e| (e.client_id.clone(), creds(e)))
        .collect();
    if devices.len() < a.publishers as usize {
        bail!(
            "{} has {} devices, fewer than --publishers {}",
            path.display(),
            devices.len(),
            a.publishers
        );
    }
    let m = fleet::monitor(&all).with_context(|| {
        format!(
            "{} has no monitor (provision with --monitor)",
            path.display()
        )
    })?;
    Ok(Some(FleetClients {
        devices,
        monitor: (m.client_id.clone(), creds(m)),
    }))
}

/// Fields common to every JSON line of a message-flow run.
#[derive(Debug, Serialize)]
struct RunLine<'a> {
    scenario: &'static str,
    label: &'a str,
    broker: String,
    protocol: &'static str,
    qos: u8,
    payload: u32,
    /// Offered publish rate (messages/s); 0 = as fast as possible.
    offered_rate: u64,
    /// Offered deliveries/s (offered rate × fan-out).
    offered_delivery_rate: u64,
    duration_s: f64,
    warmup_s: f64,
    inflight: Option<u16>,
    ladder_step: Option<usize>,
    sustainable: Option<bool>,
    broker_pid: Option<u32>,
    unix_time: u64,
    #[serde(flatten)]
    stats: &'a traffic::TrafficStats,
}

#[derive(Debug, Serialize)]
struct LadderSummary<'a> {
    scenario: &'static str,
    label: &'a str,
    broker: String,
    summary: &'static str,
    protocol: &'static str,
    qos: u8,
    payload: u32,
    publishers: usize,
    subscribers: usize,
    rates: Vec<u64>,
    sustainable: Vec<bool>,
    throughputs: Vec<f64>,
    max_sustainable_rate: Option<u64>,
    /// Deliveries/s measured at that rate.
    max_sustainable_throughput: Option<f64>,
    max_sustainable_p99_ms: Option<f64>,
    max_loss: f64,
    max_p99_ms: f64,
    min_send_ratio: f64,
    unix_time: u64,
}

fn emit<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(v).context("serialising a result line")?;
    println!("{line}");
    Ok(())
}

async fn run_traffic(
    a: &BenchArgs,
    opts: Arc<wire::ClientOpts>,
    prefix: String,
    usable_fds: usize,
) -> anyhow::Result<()> {
    let scenario = a.scenario.name();
    let fleet = fleet_clients(a)?;
    let probe = topology(a, &prefix, fleet.as_ref());
    let sockets = probe.publishers.len() + probe.subscribers.len();
    if sockets > usable_fds {
        bail!(
            "{scenario} needs {sockets} sockets but this process may open only about {usable_fds} \
             (raise `ulimit -n`)"
        );
    }
    let qos = if a.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let criteria = Criteria {
        max_loss: a.max_loss,
        max_p99_ms: a.max_p99_ms,
        ..Criteria::default()
    };
    let rates = match &a.ladder {
        Some(l) => parse_ladder(l)?,
        None => vec![a.rate],
    };
    let is_ladder = a.ladder.is_some();
    let broker = format!("{}:{}", a.host, a.port);
    let mut outcomes: Vec<StepOutcome> = Vec::new();
    let mut throughputs: Vec<f64> = Vec::new();
    let mut p99s: Vec<f64> = Vec::new();
    let mut consecutive_failures = 0;
    let mut step_error = None;
    for (step, &rate) in rates.iter().enumerate() {
        if step > 0 {
            tokio::time::sleep(Duration::from_secs_f64(a.ladder_pause)).await;
        }
        if let Some(pid) = a.broker_pid {
            settle(pid, Duration::from_secs_f64(a.settle)).await;
        }
        let topo = topology(a, &format!("{prefix}{step}"), fleet.as_ref());
        let params = traffic::RunParams {
            opts: opts.clone(),
            qos,
            payload: a.payload as usize,
            rate,
            warmup: Duration::from_secs_f64(a.warmup),
            duration: Duration::from_secs_f64(a.duration),
            drain: Duration::from_secs_f64(a.drain),
            inflight: a.inflight,
            tick: a.tick_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            burst: a.burst as usize,
            connect_concurrency: a.connect_concurrency as usize,
            broker_pid: a.broker_pid,
            progress: a.progress,
            name: scenario,
        };
        let stats = match traffic::run(&topo, &params).await {
            Ok(s) => s,
            Err(e) if is_ladder && step > 0 => {
                // The broker may have fallen over at a high rate: keep what was measured.
                eprintln!("[{scenario}] ladder step {rate} msg/s failed: {e:#}");
                step_error = Some(e);
                break;
            }
            Err(e) => return Err(e),
        };
        let wanted = rate as f64 * a.duration;
        let outcome = StepOutcome {
            rate,
            send_ratio: if rate == 0 {
                1.0
            } else {
                stats.sent as f64 / wanted.max(1.0)
            },
            loss: stats.loss,
            p99_ms: stats.latency_p99_ms,
            completed: stats.errors == 0,
        };
        let ok = criteria.sustainable(&outcome);
        if stats.errors > 0 {
            eprintln!(
                "[{scenario}] {} connection(s) failed during the run: {}",
                stats.errors,
                stats.first_error.as_deref().unwrap_or("?")
            );
        }
        emit(&RunLine {
            scenario,
            label: &a.label,
            broker: broker.clone(),
            protocol: a.protocol.label(),
            qos: a.qos,
            payload: a.payload,
            offered_rate: rate,
            offered_delivery_rate: rate.saturating_mul(topo.fanout),
            duration_s: a.duration,
            warmup_s: a.warmup,
            inflight: (a.qos > 0).then_some(a.inflight),
            ladder_step: is_ladder.then_some(step),
            sustainable: (rate > 0).then_some(ok),
            broker_pid: a.broker_pid,
            unix_time: unix_time(),
            stats: &stats,
        })?;
        outcomes.push(outcome);
        throughputs.push(stats.throughput);
        p99s.push(stats.latency_p99_ms);
        if is_ladder {
            consecutive_failures = if ok { 0 } else { consecutive_failures + 1 };
            if a.ladder_stop_after > 0 && consecutive_failures >= a.ladder_stop_after {
                break;
            }
        }
    }
    if is_ladder {
        let best = criteria.max_sustainable(&outcomes);
        let best_idx = best.and_then(|r| outcomes.iter().position(|o| o.rate == r));
        emit(&LadderSummary {
            scenario,
            label: &a.label,
            broker,
            summary: "ladder",
            protocol: a.protocol.label(),
            qos: a.qos,
            payload: a.payload,
            publishers: probe.publishers.len(),
            subscribers: probe.subscribers.len(),
            rates: outcomes.iter().map(|o| o.rate).collect(),
            sustainable: outcomes.iter().map(|o| criteria.sustainable(o)).collect(),
            throughputs: throughputs.clone(),
            max_sustainable_rate: best,
            max_sustainable_throughput: best_idx.and_then(|i| throughputs.get(i).copied()),
            max_sustainable_p99_ms: best_idx.and_then(|i| p99s.get(i).copied()),
            max_loss: criteria.max_loss,
            max_p99_ms: criteria.max_p99_ms,
            min_send_ratio: criteria.min_send_ratio,
            unix_time: unix_time(),
        })?;
    }
    match step_error {
        Some(e) => Err(e.context("ladder aborted")),
        None => Ok(()),
    }
}

/// Waits (at most `max`) until the broker used less than 10 % of a core over 200 ms.
async fn settle(pid: u32, max: Duration) {
    let deadline = tokio::time::Instant::now() + max;
    let period = Duration::from_millis(200);
    while tokio::time::Instant::now() < deadline {
        let Some(a) = sys::sample_process(pid) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(b) = sys::sample_process(pid) else {
            return;
        };
        if b.cpu.saturating_sub(a.cpu) < period / 10 {
            return;
        }
    }
}

#[derive(Debug, Serialize)]
struct IdleLine<'a> {
    scenario: &'static str,
    label: &'a str,
    broker: String,
    protocol: &'static str,
    broker_pid: Option<u32>,
    unix_time: u64,
    #[serde(flatten)]
    stats: &'a idle::IdleStats,
}

async fn run_idle(
    a: &BenchArgs,
    opts: Arc<wire::ClientOpts>,
    prefix: String,
    usable_fds: usize,
) -> anyhow::Result<()> {
    let mut worker_args = vec![
        "--host".to_string(),
        a.host.clone(),
        "--port".into(),
        a.port.to_string(),
        "--protocol".into(),
        a.protocol.flag().into(),
        "--keep-alive".into(),
        a.keep_alive.to_string(),
        "--connect-timeout".into(),
        a.connect_timeout.to_string(),
    ];
    if let Some(u) = &a.username {
        worker_args.extend(["--username".to_string(), u.clone()]);
    }
    let mut worker_env = Vec::new();
    if let Some(p) = &a.password {
        worker_env.push(("FERROHUB_BENCH_PASSWORD".to_string(), p.clone()));
    }
    let params = idle::IdleParams {
        opts,
        connections: a.connections as usize,
        hold: Duration::from_secs_f64(a.duration),
        concurrency: a.connect_concurrency as usize,
        max_per_process: (a.max_per_process as usize).min(usable_fds).max(1),
        broker_pid: a.broker_pid,
        progress: a.progress,
        client_prefix: prefix,
        worker_args,
        worker_env,
    };
    let stats = idle::run(&params).await?;
    emit(&IdleLine {
        scenario: "idle",
        label: &a.label,
        broker: format!("{}:{}", a.host, a.port),
        protocol: a.protocol.label(),
        broker_pid: a.broker_pid,
        unix_time: unix_time(),
        stats: &stats,
    })?;
    if stats.failed > 0 || stats.lost > 0 {
        eprintln!(
            "[idle] {} failed to connect, {} lost during the hold: {}",
            stats.failed,
            stats.lost,
            stats.first_error.as_deref().unwrap_or("")
        );
    }
    if !stats.routing_ok {
        bail!(
            "the broker no longer routes with {} connections open: {}",
            stats.connected,
            stats.routing_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}
