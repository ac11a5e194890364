//! `lumen`: the one command-line binary.

mod bench;
mod cli;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the head's per-request and per-chunk allocations happen on
/// every runtime thread, where glibc's arenas cost it ~13% of its CPU (measured with
/// `lumen bench head`; see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lumen serves large language models: a Ray Serve + vLLM shaped serving framework.
#[derive(Parser)]
#[command(name = "lumen", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "LUMEN_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model: the head (OpenAI API on --port, dashboard on --dashboard-port) and one
    /// in-process worker. With no flags, SmolLM2-135M-Instruct from models/ on the CPU.
    Serve(Box<cli::ServeArgs>),
    /// Run the head alone: registry, router, OpenAI API, control API; workers join it.
    Head(Box<cli::HeadArgs>),
    /// Run a worker that joins a head and hosts the replicas it places.
    Worker(Box<cli::WorkerArgs>),
    /// Apply a serve config to a running head (like Ray's `serve deploy`).
    Deploy(cli::DeployArgs),
    /// Show the applications of a running head (like Ray's `serve status`).
    Status(cli::StatusArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Push fixed-length requests through the engine in-process and report throughput and latency.
    Offline(Box<bench::offline::OfflineArgs>),
    /// Load an OpenAI-compatible server over HTTP (streamed requests, like `vllm bench serve`).
    Serve(Box<bench::serve::ServeArgs>),
    /// Run a loopback cluster (head + workers) under load while killing and replacing workers
    /// and the head; count every request's end and each process's memory.
    Soak(Box<bench::soak::SoakArgs>),
    /// Measure the head alone: a real `lumen head` with hundreds of simulated workers, at rising
    /// request rates (requests/s, head-added latency, CPU, memory, heartbeat cost).
    Head(Box<bench::head::HeadBenchArgs>),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LUMEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(args) => cli::serve::run(*args).await?,
        Command::Head(args) => cli::head::run(*args).await?,
        Command::Worker(args) => cli::worker::run(*args).await?,
        Command::Deploy(args) => cli::deploy::run(args).await?,
        Command::Status(args) => cli::status::run(args).await?,
        Command::Bench(BenchCommand::Offline(args)) => {
            let json = args.json.clone();
            let report = bench::offline::run(*args).await?;
            print!("{}", report.table());
            let text = serde_json::to_string_pretty(&report)?;
            match json {
                Some(path) => std::fs::write(&path, text)?,
                None => println!("{text}"),
            }
        }
        Command::Bench(BenchCommand::Serve(args)) => bench::serve::main(*args).await?,
        Command::Bench(BenchCommand::Soak(args)) => bench::soak::main(*args).await?,
        Command::Bench(BenchCommand::Head(args)) => bench::head::main(*args).await?,
    }
    Ok(())
}
