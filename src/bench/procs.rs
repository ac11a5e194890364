//! Benchmarks' processes (`lumen bench soak`, `lumen bench head`): `lumen head` and `lumen worker`
//! children of this very binary, each with its stderr in a log file of the work directory, its
//! listeners from the ready line, its memory sampled from `/proc/PID/status`, its CPU time read
//! from `/proc/PID/stat`, and how it ended.
//!
//! Contract: a [`Proc`] is killed when dropped (`kill_on_drop`), so a soak that fails half way
//! leaves no process behind. [`Ledger`] keeps one [`ProcRecord`] per process ever started (a
//! restarted head or a replacement worker is a new record); a sampler task updates the resident
//! set size of the live ones every [`RSS_PERIOD`].

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a process may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the resident set size of live processes is read.
pub const RSS_PERIOD: Duration = Duration::from_secs(1);

/// One process the soak started, as the report shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ProcRecord {
    /// `head-1`, `head-2`, `w1`, ...
    pub name: String,
    pub role: &'static str,
    pub pid: u32,
    /// Seconds after the soak began.
    pub started_s: f64,
    /// Resident set size (VmRSS, KiB) once the cluster first served with it (its replica
    /// loaded), at the last sample and at most.
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
    /// How it ended: `SIGKILL (fault)`, `SIGTERM (rolling replacement): exit 0`, ...; `None`
    /// while it runs.
    pub end: Option<String>,
    /// Whether it ended as planned (a SIGTERM answered by exit 0, a SIGKILL by death).
    #[serde(skip)]
    pub clean: bool,
    /// Whether `rss_start_kib` was taken.
    #[serde(skip)]
    serving: bool,
}

/// Every process started, shared with the RSS sampler.
#[derive(Clone)]
pub struct Ledger {
    records: Arc<Mutex<Vec<ProcRecord>>>,
    began: Instant,
}

impl Ledger {
    pub fn new(began: Instant) -> Ledger {
        Ledger { records: Arc::default(), began }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ProcRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn records(&self) -> Vec<ProcRecord> {
        self.lock().clone()
    }

    /// Reads VmRSS of every live process now.
    pub fn sample(&self) {
        for record in self.lock().iter_mut().filter(|r| r.end.is_none()) {
            let Some(kib) = vm_rss_kib(record.pid) else { continue };
            record.rss_end_kib = kib;
            record.rss_peak_kib = record.rss_peak_kib.max(kib);
        }
    }

    /// Samples now and takes the start figure of every live process that has none yet: called
    /// once the cluster serves with all of them.
    pub fn mark_serving(&self) {
        self.sample();
        for record in self.lock().iter_mut().filter(|r| r.end.is_none() && !r.serving) {
            record.rss_start_kib = record.rss_end_kib;
            record.serving = true;
        }
    }

    /// Samples every [`RSS_PERIOD`] until the returned task is aborted.
    pub fn spawn_sampler(&self) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            loop {
                ledger.sample();
                tokio::time::sleep(RSS_PERIOD).await;
            }
        })
    }

    fn add(&self, name: &str, role: &'static str, pid: u32) -> usize {
        let mut records = self.lock();
        records.push(ProcRecord {
            name: name.to_string(),
            role,
            pid,
            started_s: self.began.elapsed().as_secs_f64(),
            rss_start_kib: 0,
            rss_end_kib: 0,
            rss_peak_kib: 0,
            end: None,
            clean: false,
            serving: false,
        });
        records.len() - 1
    }

    fn end(&self, index: usize, how: String, clean: bool) {
        if let Some(record) = self.lock().get_mut(index) {
            record.end = Some(how);
            record.clean = clean;
        }
    }
}

/// VmRSS of `pid` in KiB, `None` once it is gone.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time `pid` has used so far (user plus system, its threads included), `None` once it is
/// gone. `/proc/PID/stat` counts in clock ticks of 1/100 s (`USER_HZ` on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // state (3), ..., utime (14), stime (15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// A running `lumen` child.
pub struct Proc {
    pub name: String,
    child: Child,
    pid: u32,
    /// The ready line's `listen` map (`api`, `dashboard`, `grpc`, ...).
    listen: Map<String, Value>,
    ledger: Ledger,
    index: usize,
}

/// Where children come from and where their logs go.
#[derive(Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    pub work_dir: PathBuf,
    pub ledger: Ledger,
}

impl Launcher {
    /// Starts `lumen ARGS` as `name` and waits for its ready line.
    pub async fn start(&self, name: &str, role: &'static str, args: &[String]) -> anyhow::Result<Proc> {
        let log_path = self.work_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new(&self.exe);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).kill_on_drop(true);
        if std::env::var_os("LUMEN_LOG").is_none() {
            command.env("LUMEN_LOG", "info");
        }
        let mut child = command.spawn().with_context(|| format!("starting {name}: {}", self.exe.display()))?;
        let pid = child.id().context("a child without a pid")?;
        let index = self.ledger.add(name, role, pid);
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["event"] == "ready"
                {
                    return Ok(v["listen"].as_object().cloned().unwrap_or_default());
                }
            }
            bail!("{name} exited before it was ready (see {})", log_path.display())
        };
        let listen = match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(listen) => listen?,
            Err(_) => bail!("{name} printed no ready line within {READY_TIMEOUT:?} (see {})", log_path.display()),
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.ledger.sample();
        Ok(Proc { name: name.to_string(), child, pid, listen, ledger: self.ledger.clone(), index })
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The port of listener `name` from the ready line.
    pub fn port(&self, name: &str) -> anyhow::Result<u16> {
        let addr =
            self.listen.get(name).and_then(Value::as_str).with_context(|| format!("{}: no `{name}`", self.name))?;
        let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("{}: `{name}` is {addr}", self.name))?;
        Ok(addr.port())
    }

    /// SIGKILL, then reaps it.
    pub async fn kill(mut self, why: &str) -> anyhow::Result<()> {
        self.ledger.sample();
        self.child.start_kill().with_context(|| format!("killing {}", self.name))?;
        let status = self.child.wait().await.with_context(|| format!("reaping {}", self.name))?;
        let clean = status.code().is_none();
        self.ledger.end(self.index, format!("SIGKILL ({why}): {}", describe(status)), clean);
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for it to exit (SIGKILL after that). Returns the
    /// exit code, `None` when it had to be killed or died of a signal.
    pub async fn terminate(mut self, why: &str, timeout: Duration) -> anyhow::Result<Option<i32>> {
        self.ledger.sample();
        let sent = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await;
        if !sent.with_context(|| format!("running kill -TERM {}", self.pid))?.success() {
            bail!("kill -TERM {} ({}) failed", self.pid, self.name);
        }
        let (status, note) = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => (status.with_context(|| format!("waiting for {}", self.name))?, ""),
            Err(_) => {
                self.child.start_kill().ok();
                (self.child.wait().await?, " (still running after the timeout: killed)")
            }
        };
        let code = if note.is_empty() { status.code() } else { None };
        self.ledger.end(self.index, format!("SIGTERM ({why}): {}{note}", describe(status)), code == Some(0));
        Ok(code)
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "ended".to_string(),
    }
}

/// A work directory: `given`, else a fresh one named after `bench` under the system's
/// temporary directory.
pub fn work_dir(given: Option<&Path>, bench: &str) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("lumen-{bench}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
