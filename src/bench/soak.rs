//! `lumen bench soak`: a bounded load on a real loopback cluster while processes are killed and
//! replaced, counting every request's end (see issue 8 and `docs/reliability.md`).
//!
//! Contract:
//! - It starts, as children of this binary, a `lumen head` (`--config`, `--state-dir` in the work
//!   directory, ephemeral ports) and `--workers` `lumen worker`s, deploys `--model` as `smol` with
//!   `--replicas` replicas at most one per worker (`max_replicas_per_node: 1`), and waits until
//!   every replica runs.
//! - Then `--concurrency` loops send requests (see [`load`]) for `--duration-s` seconds while the
//!   `--faults` run in order, evenly spaced: `kill` (SIGKILL the oldest worker, start a new one),
//!   `roll` (start a new worker, wait until the head lists it, SIGTERM the oldest: a rolling
//!   replacement), `head` (SIGKILL the head, start a new one on the same state directory and
//!   ports, without `--config`: the applications are restored and the workers re-register). After
//!   each fault it waits until every replica runs again on the live workers.
//! - At the end the load stops, every process gets SIGTERM and must exit 0. The report
//!   ([`report`]) counts requests per phase and outcome, the requests in flight at each signal,
//!   and each process's memory; the program fails (exit code 1) when a request was lost, a request
//!   of a rolling replacement did not complete, a process ended badly or the cluster did not
//!   recover. Child logs stay in the work directory.

mod load;
mod report;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::procs::{self, Launcher, Ledger, Proc};
use load::Load;
use report::{FaultKind, FaultReport, Settings, SoakReport, Tally};

/// How long a SIGTERMed process may take to drain and exit.
const TERM_TIMEOUT: Duration = Duration::from_secs(45);
/// The served model name of the soak's deployment.
const MODEL_NAME: &str = "smol";
/// Attempts to start the restarted head (its ports may take a moment to be free again).
const HEAD_START_ATTEMPTS: u32 = 5;

/// Options of `lumen bench soak`.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// The model file the replicas serve.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Worker processes (a replacement keeps the count).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Replicas of the deployment, at most one per worker (default: --workers).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Requests in flight at once (each loop sends its next request when one ends).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 300.0)]
    pub duration_s: f64,
    /// Faults in order, spread evenly over the run: kill, roll, head (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "kill,roll,head", value_parser = FaultKind::parse)]
    pub faults: Vec<FaultKind>,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Seconds a request may take before it counts as lost.
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout_s: f64,
    /// Engine threads per replica.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The head's heartbeat interval (a worker silent for three is dead), in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_interval_ms: u64,
    /// Seconds the cluster may take to run every replica again after a fault.
    #[arg(long, default_value_t = 120.0)]
    pub recovery_timeout_s: f64,
    /// Where the state directory, the serve config and the child logs go (default: a new
    /// directory under the system's temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl SoakArgs {
    fn replicas(&self) -> usize {
        self.replicas.unwrap_or(self.workers)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.workers == 0 || self.concurrency == 0 || self.max_tokens == 0 {
            bail!("--workers, --concurrency and --max-tokens must be at least 1");
        }
        if self.replicas() == 0 || self.replicas() > self.workers {
            bail!("--replicas must be between 1 and --workers ({}), got {}", self.workers, self.replicas());
        }
        for (name, value) in [
            ("--duration-s", self.duration_s),
            ("--request-timeout-s", self.request_timeout_s),
            ("--recovery-timeout-s", self.recovery_timeout_s),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                bail!("{name} must be a positive number of seconds, got {value}");
            }
        }
        Ok(())
    }
}

/// The serve config: one deployment, one replica per worker at most.
fn serve_config(model: &Path, replicas: usize, threads: usize) -> String {
    format!(
        "applications:\n  - name: soak\n    deployments:\n      - name: llm\n        num_replicas: {replicas}\n        \
         max_replicas_per_node: 1\n        model:\n          source: {}\n          served_model_name: {MODEL_NAME}\n          \
         threads: {threads}\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
        model.display()
    )
}

/// The processes of the cluster under test and how to reach them.
struct Cluster {
    launcher: Launcher,
    http: reqwest::Client,
    config: PathBuf,
    state_dir: PathBuf,
    heartbeat_ms: u64,
    head: Option<Proc>,
    heads_started: usize,
    /// `(api, dashboard, grpc)` ports, fixed by the first head.
    ports: (u16, u16, u16),
    /// Oldest first.
    workers: VecDeque<Proc>,
    workers_started: usize,
    replicas: usize,
    /// Request migrations counted by the heads already gone, by reason.
    migrations: BTreeMap<String, u64>,
}

impl Cluster {
    fn url(&self, port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }

    /// Starts a head: the first with `--config`, later ones on the state directory alone.
    async fn start_head(&mut self) -> anyhow::Result<String> {
        self.heads_started += 1;
        let name = format!("head-{}", self.heads_started);
        let (api, dashboard, grpc) = self.ports;
        let mut args: Vec<String> = ["head", "--host", "127.0.0.1", "--port", &api.to_string()]
            .into_iter()
            .chain(["--dashboard-port", &dashboard.to_string(), "--grpc-port", &grpc.to_string()])
            .chain(["--heartbeat-interval-ms", &self.heartbeat_ms.to_string(), "--replica-wait-timeout-s", "20"])
            .map(String::from)
            .collect();
        args.extend(["--state-dir".into(), self.state_dir.display().to_string()]);
        if self.heads_started == 1 {
            args.extend(["--config".into(), self.config.display().to_string()]);
        }
        let mut attempt = 1;
        let head = loop {
            match self.launcher.start(&name, "head", &args).await {
                Ok(head) => break head,
                Err(e) if attempt < HEAD_START_ATTEMPTS && self.heads_started > 1 => {
                    tracing::warn!(error = %e, attempt, "the restarted head did not start; trying again");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.ports = (head.port("api")?, head.port("dashboard")?, head.port("grpc")?);
        self.head = Some(head);
        Ok(name)
    }

    async fn start_worker(&mut self) -> anyhow::Result<String> {
        self.workers_started += 1;
        let name = format!("w{}", self.workers_started);
        let head = self.url(self.ports.2);
        let args: Vec<String> =
            ["worker", "--head", &head, "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--worker-id", &name]
                .map(String::from)
                .to_vec();
        let worker = self.launcher.start(&name, "worker", &args).await?;
        self.workers.push_back(worker);
        Ok(name)
    }

    /// The head's view: live worker ids, and RUNNING replicas on live workers.
    async fn view(&self) -> Option<(BTreeSet<String>, usize)> {
        let url = format!("{}/api/cluster", self.url(self.ports.1));
        let response = self.http.get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
        let view: Value = response.json().await.ok()?;
        let live: Vec<&Value> = view["workers"].as_array()?.iter().filter(|w| w["alive"] == true).collect();
        let running = live
            .iter()
            .flat_map(|w| w["replicas"].as_array().into_iter().flatten())
            .filter(|r| r["state"] == "RUNNING")
            .count();
        Some((live.iter().filter_map(|w| w["id"].as_str().map(String::from)).collect(), running))
    }

    /// Waits until the head lists exactly our workers as live and runs every replica on them;
    /// returns the seconds since `since`, `None` after `timeout`.
    async fn wait_recovered(&self, since: Instant, timeout: Duration) -> Option<f64> {
        let ours: BTreeSet<String> = self.workers.iter().map(|w| w.name.clone()).collect();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((live, running)) = self.view().await
                && live == ours
                && running == self.replicas
            {
                self.launcher.ledger.mark_serving();
                return Some(since.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Waits until the head lists worker `name` as live.
    async fn wait_registered(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.view().await.is_some_and(|(live, _)| live.contains(name)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("worker {name} did not register within {timeout:?}")
    }

    /// SIGTERM to every process (the head first), each must exit 0.
    /// Adds the running head's `lumen:request_migrations_total` to [`Cluster::migrations`]
    /// (before it goes: its counters go with it).
    async fn count_migrations(&mut self) {
        let url = format!("{}/metrics", self.url(self.ports.0));
        let Ok(text) = async { self.http.get(&url).send().await?.text().await }.await else {
            tracing::warn!("the head's /metrics did not answer: its request migrations are not counted");
            return;
        };
        for line in text.lines().filter(|l| l.starts_with("lumen:request_migrations_total{")) {
            let reason = line.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("unknown");
            let count = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0);
            *self.migrations.entry(reason.to_string()).or_default() += count as u64;
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        self.count_migrations().await;
        if let Some(head) = self.head.take() {
            head.terminate("end of the run", TERM_TIMEOUT).await?;
        }
        let stops = self.workers.drain(..).map(|w| w.terminate("end of the run", TERM_TIMEOUT));
        for result in futures::future::join_all(stops).await {
            result?;
        }
        Ok(())
    }
}

/// Runs one fault; returns its report (phase and in-flight tally are filled in later).
async fn inject(
    cluster: &mut Cluster,
    load: &Load,
    kind: FaultKind,
    recovery: Duration,
) -> anyhow::Result<FaultReport> {
    let (victim, replacement, signal) = match kind {
        FaultKind::WorkerKill => {
            let victim = cluster.workers.pop_front().context("no worker to kill")?;
            let (name, signal) = (victim.name.clone(), Instant::now());
            victim.kill("fault").await?;
            (name, cluster.start_worker().await?, signal)
        }
        FaultKind::RollingReplacement => {
            let replacement = cluster.start_worker().await?;
            cluster.wait_registered(&replacement, recovery).await?;
            let victim = cluster.workers.pop_front().context("no worker to replace")?;
            let (name, signal) = (victim.name.clone(), Instant::now());
            victim.terminate("rolling replacement", TERM_TIMEOUT).await?;
            (name, replacement, signal)
        }
        FaultKind::HeadRestart => {
            cluster.count_migrations().await;
            let victim = cluster.head.take().context("no head to kill")?;
            let (name, signal) = (victim.name.clone(), Instant::now());
            load.head.killing();
            victim.kill("fault").await?;
            let replacement = cluster.start_head().await?;
            load.head.ready();
            (name, replacement, signal)
        }
    };
    let recovered_after_s = cluster.wait_recovered(signal, recovery).await;
    Ok(FaultReport {
        kind,
        phase: 0,
        signal_s: signal.duration_since(load.began).as_secs_f64(),
        victim,
        replacement,
        recovered_after_s,
        in_flight_at_signal: Tally::default(),
    })
}

/// Runs the soak and returns its report.
pub async fn run(args: SoakArgs) -> anyhow::Result<SoakReport> {
    args.check()?;
    let model = std::fs::canonicalize(&args.model).with_context(|| format!("the model {}", args.model.display()))?;
    let work_dir = procs::work_dir(args.work_dir.as_deref(), "soak")?;
    let config = work_dir.join("serve.yaml");
    std::fs::write(&config, serve_config(&model, args.replicas(), args.threads))?;
    let began = Instant::now();
    let launcher = Launcher {
        exe: std::env::current_exe().context("locating this binary")?,
        work_dir: work_dir.clone(),
        ledger: Ledger::new(began),
    };
    let sampler = launcher.ledger.spawn_sampler();
    let mut cluster = Cluster {
        launcher: launcher.clone(),
        http: reqwest::Client::builder().no_proxy().build()?,
        config,
        state_dir: work_dir.join("state"),
        heartbeat_ms: args.heartbeat_interval_ms,
        head: None,
        heads_started: 0,
        ports: (0, 0, 0),
        workers: VecDeque::new(),
        workers_started: 0,
        replicas: args.replicas(),
        migrations: BTreeMap::new(),
    };
    let recovery = Duration::from_secs_f64(args.recovery_timeout_s);
    cluster.start_head().await?;
    for _ in 0..args.workers {
        cluster.start_worker().await?;
    }
    if cluster.wait_recovered(Instant::now(), recovery).await.is_none() {
        bail!("the replicas did not all run within {recovery:?} (logs in {})", work_dir.display());
    }

    let deadline = Duration::from_secs_f64(args.request_timeout_s);
    let load = Arc::new(Load::new(cluster.url(cluster.ports.0), MODEL_NAME.into(), args.max_tokens, deadline, began)?);
    load.head.ready();
    let load_start = Instant::now();
    let mut phases = vec![("steady".to_string(), began.elapsed().as_secs_f64())];
    let tasks = load.spawn(args.concurrency);
    let duration = Duration::from_secs_f64(args.duration_s);
    let mut faults = Vec::new();
    for (i, &kind) in args.faults.iter().enumerate() {
        let at = load_start + duration.mul_f64((i + 1) as f64 / (args.faults.len() + 1) as f64);
        tokio::time::sleep_until(at.into()).await;
        phases.push((format!("{} {}", kind.name(), i + 1), began.elapsed().as_secs_f64()));
        load.phase.store(phases.len() - 1, Ordering::SeqCst);
        tracing::info!(fault = kind.name(), "injecting a fault");
        let mut fault = inject(&mut cluster, &load, kind, recovery).await?;
        fault.phase = phases.len() - 1;
        faults.push(fault);
    }
    tokio::time::sleep_until((load_start + duration).into()).await;
    load.stop();
    futures::future::join_all(tasks).await;
    let elapsed_s = began.elapsed().as_secs_f64();
    launcher.ledger.sample();
    sampler.abort();
    cluster.stop().await?;

    let settings = Settings {
        model: model.display().to_string(),
        workers: args.workers,
        replicas: args.replicas(),
        concurrency: args.concurrency,
        duration_s: args.duration_s,
        max_tokens: args.max_tokens,
        request_timeout_s: args.request_timeout_s,
        faults: args.faults.clone(),
    };
    let records = load.records();
    let processes = launcher.ledger.records();
    let mut report =
        SoakReport::build(settings, elapsed_s, &phases, faults, &records, processes, work_dir.display().to_string());
    report.migrations = std::mem::take(&mut cluster.migrations);
    Ok(report)
}

/// `lumen bench soak` from the command line: runs, prints the table, writes the JSON; fails when
/// the report has problems.
pub async fn main(args: SoakArgs) -> anyhow::Result<()> {
    let json_path = args.json.clone();
    let report = run(args).await?;
    print!("{}", report.table());
    for example in &report.examples {
        eprintln!("{example}");
    }
    let text = serde_json::to_string_pretty(&report)?;
    match json_path {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    if !report.ok {
        bail!("soak failed: {} (logs in {})", report.problems.join("; "), report.work_dir);
    }
    Ok(())
}
