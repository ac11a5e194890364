//! `lumen bench head`: what the head costs per request and per worker (issue 20), measured on the
//! real `lumen head` with simulated workers.
//!
//! Contract:
//! - For each count N of `--workers`: starts a `lumen head` child (loopback, ephemeral ports,
//!   `--heartbeat-interval-ms`, its per-model admission limits raised so that only the head's own
//!   speed limits the rate) and one `lumen worker --simulate --simulated-workers N` child: N
//!   workers, each the real worker service, node and registration over an engine that streams a
//!   stamped token every `--step-ms` per running request; deploys `--replicas-per-worker` x N replicas of one model and waits until all run (the time
//!   that took is reported).
//! - Idle: for `--idle-s` seconds nothing is sent; the head's CPU then is what N workers'
//!   heartbeats and the control loop cost it.
//! - Load: per mode (`--modes`: `stream`, `plain`), each rate of `--rates` (requests/s, open-loop
//!   Poisson) for `--duration-s` ([`load`]); a mode stops raising its rate after the first step
//!   that does not keep up (a failure, or fewer completions per second, tail included, than 95%
//!   of the requests it sent per second of the step).
//! - Every step reports the sustained rate, tokens/s through the head, the head-added latency
//!   (p50/p99/p99.9/max, from the workers' stamps), time to first token, the CPU cores the head,
//!   the simulated workers and this process (the load generator) used, the head's RSS, and the
//!   head's own loop timings from its `/metrics` (`lumen_head_reconcile_duration_seconds`,
//!   `lumen_head_heartbeat_duration_seconds`). The summary gives, per N, the highest streamed
//!   rate that kept up with p99 added latency under `--p99-goal-ms`.
//! - Everything runs on this machine: the head, the workers and the client share its cores, so
//!   the figures are a floor for a head with a machine of its own. Child logs stay in the work
//!   directory.

mod load;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::procs::{self, Launcher, Ledger, Proc, cpu_seconds, vm_rss_kib};
use report::{ClusterReport, HeadReport, IdleReport, LoopCounters, StepReport};

/// The served model name of the deployment.
const MODEL_NAME: &str = "sim";
/// How long N workers may take to register and run every replica.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// A step keeps up when it completed at least this share of what it offered, with no failure.
const KEEP_UP: f64 = 0.95;

/// Options of `lumen bench head`.
#[derive(Clone, Debug, clap::Args)]
pub struct HeadBenchArgs {
    /// Simulated worker counts, one cluster each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
    pub workers: Vec<usize>,
    /// Replicas of the deployment on each worker.
    #[arg(long, default_value_t = 1)]
    pub replicas_per_worker: usize,
    /// Offered request rates, requests/s, in rising order (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,3000,4000,5000,6000,8000")]
    pub rates: Vec<f64>,
    /// `stream` (SSE, every token a chunk) and/or `plain` (one JSON response).
    #[arg(long, value_delimiter = ',', default_value = "stream,plain")]
    pub modes: Vec<String>,
    /// Seconds of each load step.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Seconds without load, to measure what heartbeats and the control loop cost.
    #[arg(long, default_value_t = 5.0)]
    pub idle_s: f64,
    /// Output tokens of every request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Prompt length in token ids.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// The simulated engine's step time: each running request gets a token per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_ms: f64,
    /// The head's heartbeat interval (its default is 2000).
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_interval_ms: u64,
    /// The p99 head-added latency the summary's sustained rate must stay under.
    #[arg(long, default_value_t = 5.0)]
    pub p99_goal_ms: f64,
    /// The model whose tokenizer the simulated replicas use (nothing else of it is read).
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Where the serve config and the head's log go (default: a new temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl HeadBenchArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.workers.is_empty() || self.workers.contains(&0) || self.replicas_per_worker == 0 {
            bail!("--workers needs counts of at least 1 and --replicas-per-worker at least 1");
        }
        if self.rates.is_empty() || self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--rates must be positive request rates");
        }
        if let Some(m) = self.modes.iter().find(|m| !matches!(m.as_str(), "stream" | "plain")) {
            bail!("--modes takes `stream` and `plain`, got `{m}`");
        }
        for (name, v) in [("--duration-s", self.duration_s), ("--idle-s", self.idle_s), ("--step-ms", self.step_ms)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be positive, got {v}");
            }
        }
        if self.max_tokens == 0 || self.prompt_len == 0 {
            bail!("--max-tokens and --prompt-len must be at least 1");
        }
        if !self.model.is_file() {
            bail!("--model {} is not a file (run scripts/fetch-model.sh)", self.model.display());
        }
        Ok(())
    }
}

/// `lumen bench head`: runs every cluster size, prints the tables, writes the JSON.
pub async fn main(args: HeadBenchArgs) -> anyhow::Result<()> {
    args.check()?;
    let work_dir = procs::work_dir(args.work_dir.as_deref(), "bench-head")?;
    let launcher =
        Launcher { exe: std::env::current_exe()?, work_dir: work_dir.clone(), ledger: Ledger::new(Instant::now()) };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(16_384)
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let mut clusters = Vec::new();
    for &n in &args.workers {
        eprintln!("bench head: {n} simulated workers");
        clusters.push(run_cluster(&args, &launcher, &client, n).await?);
    }
    let report = HeadReport::new(&args, clusters);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("bench head: logs in {}", work_dir.display());
    Ok(())
}

/// One cluster of `n` workers: start, idle, load steps, stop.
async fn run_cluster(
    args: &HeadBenchArgs,
    launcher: &Launcher,
    client: &reqwest::Client,
    n: usize,
) -> anyhow::Result<ClusterReport> {
    let replicas = n * args.replicas_per_worker;
    let config = launcher.work_dir.join(format!("serve-{n}.yaml"));
    std::fs::write(&config, serve_config(args, replicas))?;
    let head = start_head(args, launcher, &config, n).await?;
    let (api, dashboard) =
        (format!("http://127.0.0.1:{}", head.port("api")?), format!("http://127.0.0.1:{}", head.port("dashboard")?));
    let began = Instant::now();
    let fleet = start_fleet(args, launcher, &format!("http://127.0.0.1:{}", head.port("grpc")?), n).await?;
    wait_ready(client, &dashboard, n, replicas).await?;
    let ready_s = began.elapsed().as_secs_f64();

    let pids = Pids { head: head.pid(), fleet: fleet.pid() };
    let window = Window::open(client, &api, pids).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.idle_s)).await;
    let idle = window.close(client, &api).await?;
    let idle = IdleReport::new(&idle);

    let mut steps = Vec::new();
    for mode in &args.modes {
        for (i, &rate) in args.rates.iter().enumerate() {
            let spec = load::StepSpec {
                url: format!("{api}/v1/completions"),
                model: MODEL_NAME.into(),
                stream: mode == "stream",
                rate,
                duration: Duration::from_secs_f64(args.duration_s),
                prompt_len: args.prompt_len,
                max_tokens: args.max_tokens,
                seed: 0x5eed ^ ((n as u64) << 8) ^ i as u64,
            };
            let window = Window::open(client, &api, pids).await?;
            let result = load::run(client, &spec).await;
            let measured = window.close(client, &api).await?;
            let step = StepReport::new(mode, rate, result, &measured);
            eprintln!("  {}", step.line());
            let kept_up = step.kept_up();
            steps.push(step);
            if !kept_up {
                break;
            }
            // Let the previous step's connections and stragglers settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let rss_mib = vm_rss_kib(pids.head).unwrap_or(0) as f64 / 1024.0;
    head.terminate("end of the cluster", Duration::from_secs(30)).await?;
    fleet.terminate("end of the cluster", Duration::from_secs(30)).await?;
    Ok(ClusterReport { workers: n, replicas, ready_s, head_rss_mib: rss_mib, idle, steps })
}

/// The serve config: one deployment, replicas spread over the workers.
fn serve_config(args: &HeadBenchArgs, replicas: usize) -> String {
    format!(
        "applications:\n  - name: bench\n    deployments:\n      - name: sim\n        num_replicas: {replicas}\n        \
         max_replicas_per_node: {}\n        model:\n          source: {}\n          served_model_name: {MODEL_NAME}\n          \
         max_model_len: 4096\n          max_num_seqs: 1024\n",
        args.replicas_per_worker,
        args.model.display()
    )
}

async fn start_head(
    args: &HeadBenchArgs,
    launcher: &Launcher,
    config: &std::path::Path,
    n: usize,
) -> anyhow::Result<Proc> {
    let heartbeat = args.heartbeat_interval_ms.to_string();
    let argv: Vec<String> = ["head", "--host", "127.0.0.1", "--port", "0", "--dashboard-port", "0", "--grpc-port", "0"]
        .into_iter()
        .chain(["--heartbeat-interval-ms", heartbeat.as_str()])
        .chain(["--max-ongoing-requests", "1000000", "--max-queued-requests", "1000000"])
        .map(String::from)
        .chain(["--config".to_string(), config.display().to_string()])
        .collect();
    launcher.start(&format!("head-{n}"), "head", &argv).await
}

/// One `lumen worker` child standing for `n` simulated workers.
async fn start_fleet(args: &HeadBenchArgs, launcher: &Launcher, head_grpc: &str, n: usize) -> anyhow::Result<Proc> {
    let (step, count) = (args.step_ms.to_string(), n.to_string());
    let argv: Vec<String> = ["worker", "--head", head_grpc, "--host", "127.0.0.1", "--port", "0", "--no-metrics"]
        .into_iter()
        .chain(["--worker-id", "sim", "--simulate", step.as_str(), "--simulated-workers", count.as_str()])
        .map(String::from)
        .collect();
    launcher.start(&format!("sim-{n}"), "worker", &argv).await
}

/// Waits until the head lists `workers` live workers and `replicas` running replicas.
async fn wait_ready(client: &reqwest::Client, dashboard: &str, workers: usize, replicas: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut seen = (0, 0);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{dashboard}/api/cluster")).send().await
            && let Ok(view) = response.json::<Value>().await
        {
            let live: Vec<&Value> =
                view["workers"].as_array().into_iter().flatten().filter(|w| w["alive"] == true).collect();
            let running = live
                .iter()
                .flat_map(|w| w["replicas"].as_array().into_iter().flatten())
                .filter(|r| r["state"] == "RUNNING")
                .count();
            seen = (live.len(), running);
            if seen == (workers, replicas) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "after {READY_TIMEOUT:?} the head lists {} live workers and {} running replicas, not {workers} and {replicas}",
        seen.0,
        seen.1
    )
}

/// The processes a window measures.
#[derive(Clone, Copy)]
struct Pids {
    head: u32,
    fleet: u32,
}

/// A measuring window: CPU times of the head, the simulated workers and this process, and the
/// head's loop counters, at its start.
struct Window {
    at: Instant,
    pids: Pids,
    /// Head, fleet, this process.
    cpu: [f64; 3],
    loops: LoopCounters,
}

/// What a window measured (CPU in cores: CPU seconds per second).
pub struct Measured {
    pub seconds: f64,
    pub head_cores: f64,
    pub sim_cores: f64,
    pub client_cores: f64,
    pub head_rss_mib: f64,
    /// The counters' growth over the window.
    pub loops: LoopCounters,
}

fn cpu_times(pids: Pids) -> anyhow::Result<[f64; 3]> {
    let cpu = |pid| cpu_seconds(pid).with_context(|| format!("reading the CPU time of process {pid} (gone?)"));
    Ok([cpu(pids.head)?, cpu(pids.fleet)?, cpu(std::process::id())?])
}

impl Window {
    async fn open(client: &reqwest::Client, api: &str, pids: Pids) -> anyhow::Result<Window> {
        let loops = LoopCounters::scrape(client, api).await?;
        Ok(Window { at: Instant::now(), pids, cpu: cpu_times(pids)?, loops })
    }

    async fn close(self, client: &reqwest::Client, api: &str) -> anyhow::Result<Measured> {
        let seconds = self.at.elapsed().as_secs_f64();
        let cpu = cpu_times(self.pids)?;
        let cores = |i: usize| (cpu[i] - self.cpu[i]) / seconds;
        let loops = LoopCounters::scrape(client, api).await?.since(&self.loops);
        Ok(Measured {
            seconds,
            head_cores: cores(0),
            sim_cores: cores(1),
            client_cores: cores(2),
            head_rss_mib: vm_rss_kib(self.pids.head).unwrap_or(0) as f64 / 1024.0,
            loops,
        })
    }
}
