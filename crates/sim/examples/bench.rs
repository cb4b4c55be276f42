//! Stand-alone `bench` front end with the same command line as `ferrohub bench`, for running the
//! harness without building the whole hub: `cargo run --release -p ferrohub-sim --example bench --
//! bench fan-in --port 1883`. (The `idle` scenario re-executes this binary as its worker.)

use clap::{Parser, Subcommand};

/// The harness alone.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmark an MQTT broker and print one JSON line per run.
    Bench(ferrohub_sim::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let Command::Bench(args) = Cli::parse().command;
    ferrohub_sim::bench::run_cli(args)
}
