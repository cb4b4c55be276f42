//! `ferrohub`: the command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrohub::config::{HubConfig, LogFormat};
use ferrohub::hub::Hub;
use tracing_subscriber::EnvFilter;

/// Ferrohub: an open, self-hostable IoT platform in one binary.
///
/// Configuration is layered: built-in defaults < ferrohub.toml (or --config) < FERROHUB_* environment
/// variables (FERROHUB_<SECTION>__<KEY>, e.g. FERROHUB_MQTT__MAX_PACKET_SIZE=65536,
/// FERROHUB_LISTENERS__MQTT=0.0.0.0:1883, FERROHUB_DATA_DIR=/var/lib/ferrohub) < command-line flags.
/// Every key is documented in docs/configuration.md; `ferrohub config` prints the effective result.
#[derive(Parser, Debug)]
#[command(name = "ferrohub", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    /// Config file (default: ./ferrohub.toml if present).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory for durable state (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// MQTT/TCP listen address, e.g. 127.0.0.1:0 for any free port; "" disables it.
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// MQTT/TLS listen address (needs tls.cert_file and tls.key_file in the config).
    #[arg(long)]
    mqtts_listen: Option<String>,
    /// MQTT over WebSocket listen address (served at /mqtt).
    #[arg(long)]
    ws_listen: Option<String>,
    /// HTTP listen address (/healthz, /readyz, /metrics).
    #[arg(long)]
    http_listen: Option<String>,
    /// Development mode: let any client connect without credentials (a warning is logged).
    #[arg(long)]
    allow_anonymous: bool,
    /// Demo mode: create a `demo` tenant with 50 simulated devices of mixed profiles (first
    /// start) and run them in-process against the MQTT listener until shutdown.
    #[arg(long)]
    demo: bool,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl ServeArgs {
    fn load(&self) -> Result<HubConfig> {
        let mut cfg = HubConfig::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(a) = &self.mqtt_listen {
            cfg.listeners.mqtt = a.clone();
        }
        if let Some(a) = &self.mqtts_listen {
            cfg.listeners.mqtts = a.clone();
        }
        if let Some(a) = &self.ws_listen {
            cfg.listeners.ws = a.clone();
        }
        if let Some(a) = &self.http_listen {
            cfg.listeners.http = a.clone();
        }
        if self.allow_anonymous {
            cfg.allow_anonymous = true;
        }
        if self.demo {
            cfg.demo = true;
        }
        if let Some(f) = self.log_format {
            cfg.log.format = f;
        }
        Ok(cfg)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub: MQTT broker (TCP, TLS, WebSocket) and the HTTP endpoints.
    Serve(ServeArgs),
    /// Print the effective configuration (after file, environment and flags) as TOML.
    Config(ServeArgs),
    /// Benchmark an MQTT broker (ours or any other) and print one JSON line per run.
    Bench(Box<ferrohub_sim::bench::BenchArgs>),
    /// Simulate a fleet of devices publishing realistic telemetry to an MQTT broker (ours or any
    /// other): device profiles as TOML, ramp-up, bounded runs, a summary table or JSON.
    Sim(Box<ferrohub_sim::sim::SimArgs>),
    /// Operate a running hub over its HTTP API: tenants, devices (and bulk import),
    /// credentials, groups, policies, API tokens, the audit log.
    Ctl(ferrohub::ctl::CtlArgs),
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(args) => {
            let cfg = args.load()?;
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("rendering configuration")?
            );
            Ok(())
        }
        Command::Ctl(args) => std::process::exit(ferrohub::ctl::run(args)),
        Command::Bench(args) => {
            init_logging(LogFormat::Text, "warn");
            ferrohub_sim::bench::run_cli(*args)
        }
        Command::Sim(args) => {
            init_logging(LogFormat::Text, "warn");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.worker_threads())
                .enable_all()
                .thread_name("sim")
                .build()
                .context("starting the simulator runtime")?;
            rt.block_on(ferrohub_sim::sim::run_cli(*args, async {
                // Ctrl-C / SIGTERM stop a run early (it still drains and prints its summary).
                if let Err(e) = wait_for_signal().await {
                    eprintln!("warning: {e:#}; the run can only stop by its own bounds");
                    std::future::pending::<()>().await;
                }
            }))
        }
        Command::Serve(args) => {
            let cfg = args.load()?;
            init_logging(cfg.log.format, &cfg.log.level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ferrohub")
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                let hub = Hub::start(cfg).await?;
                if let Some(token) = &hub.bootstrap_token {
                    // Printed once, to the terminal, not into the logs: only its hash is stored.
                    eprintln!(
                        "\n  Created the platform admin API token (shown only this once; store it):\n\n      {token}\n\n  Use it as `Authorization: Bearer <token>` or `ferrohub ctl --token <token>`.\n"
                    );
                }
                let addrs: Vec<(&str, Option<SocketAddr>)> = vec![
                    ("mqtt", hub.mqtt_addr),
                    ("mqtts", hub.mqtts_addr),
                    ("ws", hub.ws_addr),
                    ("http", hub.http_addr),
                ];
                let shown: Vec<String> = addrs
                    .iter()
                    .filter_map(|(n, a)| a.map(|a| format!("{n}={a}")))
                    .collect();
                tracing::info!(listeners = %shown.join(" "), "ferrohub is ready");
                wait_for_signal().await?;
                hub.shutdown().await;
                Ok(())
            })
        }
    }
}
