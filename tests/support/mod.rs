//! Starting real `lumen` processes for end-to-end tests: ephemeral ports on 127.0.0.1, the
//! machine-readable ready line, readiness polling, and clean termination.

#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn model_path() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-model.sh first", p.display());
    p.display().to_string()
}

/// A `lumen` child process, killed when dropped.
pub struct Lumen {
    pub child: Child,
    /// The listeners from the ready line (`api`, `dashboard`, `grpc`, `worker`).
    pub listen: serde_json::Map<String, serde_json::Value>,
}

/// Light engine flags for tests.
pub fn engine_flags() -> Vec<String> {
    ["--threads", "2", "--max-model-len", "1024", "--kv-cache-memory", "64MiB"].iter().map(|s| s.to_string()).collect()
}

/// `head --config CONFIG` with [`head_flags`]: the arguments of a `lumen head` serving a config file.
pub fn head_args(config: impl AsRef<std::path::Path>) -> Vec<String> {
    let mut args = vec!["head".to_string(), "--config".into(), config.as_ref().display().to_string()];
    args.extend(head_flags());
    args
}

/// Ephemeral-port flags for a head.
pub fn head_flags() -> Vec<String> {
    [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dashboard-port",
        "0",
        "--grpc-port",
        "0",
        "--heartbeat-interval-ms",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `lumen serve` of the test model as `smol`, on ephemeral ports, with light engine flags and
/// `extra`.
pub fn serve_flags(extra: &[&str]) -> Vec<String> {
    let mut args =
        vec!["serve".to_string(), "--model".into(), model_path(), "--served-model-name".into(), "smol".into()];
    args.extend(head_flags());
    args.extend(engine_flags());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `lumen worker` joining `head_grpc` as `id`, its gRPC and metrics ports ephemeral (several
/// workers share the host).
pub fn worker_flags(head_grpc: &str, id: &str) -> Vec<String> {
    ["worker", "--head", head_grpc, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--worker-id", id]
        .map(String::from)
        .to_vec()
}

/// Runs `tests/support/{script}` with the tests' Python environment (`.cache/pyenv`, with the
/// official `openai` client) and `args`; fails with its output unless it succeeds.
pub fn run_python(script: &str, args: &[&str]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/pyenv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    let script = root.join("tests/support").join(script);
    let out = Command::new(&python).arg(&script).args(args).output().expect("running python");
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 100 ms until it holds, failing after `timeout` with `what`.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Lumen {
    /// Starts `lumen ARGS` and waits for its ready line.
    pub fn start(args: &[String]) -> Lumen {
        Lumen::start_with_stderr(args, Stdio::inherit())
    }

    /// [`Lumen::start`], its log (stderr) going to `stderr`, e.g. a file a test reads.
    pub fn start_with_stderr(args: &[String], stderr: impl Into<Stdio>) -> Lumen {
        Lumen::start_with(args, stderr, &[])
    }

    /// [`Lumen::start_with_stderr`] with the variables `env` set for the process.
    pub fn start_with(args: &[String], stderr: impl Into<Stdio>, env: &[(&str, &str)]) -> Lumen {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(args)
            .env("LUMEN_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting lumen");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let listen = loop {
            let line = lines.next().expect("lumen exited before it was ready").expect("reading stdout");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "ready"
            {
                break v["listen"].as_object().cloned().expect("listen map");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Lumen { child, listen }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listen[name].as_str().expect(name).parse().expect("socket address")
    }

    /// `http://127.0.0.1:PORT` of a listener.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}", self.addr(name).port())
    }

    /// Waits until `GET {api}/health` answers 200 (a replica is serving).
    pub async fn wait_healthy(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url("api"))).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "lumen never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for exit (up to `timeout`) and returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lumen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an SSE response to the end: the JSON of each `data:` event, and whether `[DONE]` came.
pub async fn read_sse(resp: reqwest::Response) -> (Vec<serde_json::Value>, bool) {
    let text = resp.text().await.expect("sse body");
    let mut events = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(data).expect("sse json"));
            }
        }
    }
    (events, done)
}
