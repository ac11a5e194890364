//! Metrics and logs end to end: a `lumen head` and a `lumen worker` (separate processes, the
//! real SmolLM2 model) serve a handful of chat and text completions, some streamed, all with
//! `ignore_eos` so every count is exact. Then:
//!
//! - the head's `/metrics` on both ports, and the worker's own `/metrics`, carry vLLM's series
//!   whose counters and histogram counts equal what was served, with the expected labels, beside
//!   the cluster series (workers, replicas by state) and the router's request counter;
//! - speculative decoding's counters (the deployment's model drafts for itself: `draft_model`);
//! - the worker's stderr (`--log-format json`) has the periodic engine line, with the replica
//!   id, while it is busy, and stays quiet once idle; request lines carry the request id.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Lumen, head_args, model_path, worker_flags};

/// The engine line's interval on the worker, in seconds.
const LOG_STATS_INTERVAL_S: u64 = 1;
const WORKER_ID: &str = "metrics-w1";
/// The cluster's name of the one deployment: application `chat`, deployment `llm`.
const DEPLOYMENT: &str = "chat-llm";

fn serve_config() -> String {
    format!(
        "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        num_replicas: 1\n        \
         model:\n          source: {}\n          served_model_name: smol\n          threads: 2\n          \
         max_model_len: 1024\n          kv_cache_memory: 64MiB\n          speculative_config: {{model: {}, \
         num_speculative_tokens: 3}}\n",
        model_path(),
        model_path()
    )
}

/// A `lumen worker` whose stderr is kept (JSON log lines), killed when dropped.
struct Worker {
    child: Child,
    listen: serde_json::Map<String, Value>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(head_grpc: &str) -> Worker {
        let interval = LOG_STATS_INTERVAL_S.to_string();
        let mut args = vec!["--log-format".to_string(), "json".into()];
        args.extend(worker_flags(head_grpc, WORKER_ID));
        args.extend(["--log-stats-interval-s".to_string(), interval]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(args)
            .env("LUMEN_LOG", "info,lumen_worker::service::grpc=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the worker");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[worker] {line}");
                lines.lock().expect("log lock").push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let listen = loop {
            let line = stdout.next().expect("the worker exited before it was ready").expect("reading stdout");
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "ready"
            {
                break v["listen"].as_object().cloned().expect("listen map");
            }
        };
        std::thread::spawn(move || for _ in stdout {});
        Worker { child, listen, stderr }
    }

    fn url(&self, name: &str) -> String {
        let addr: std::net::SocketAddr = self.listen[name].as_str().expect(name).parse().expect("address");
        format!("http://127.0.0.1:{}", addr.port())
    }

    /// The stderr lines that are JSON, parsed.
    fn json_logs(&self) -> Vec<Value> {
        let lines = self.stderr.lock().expect("log lock").clone();
        lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The periodic engine lines logged so far.
    fn engine_lines(&self) -> Vec<Value> {
        self.json_logs()
            .into_iter()
            .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("Avg prompt throughput:")))
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus' text format (0.0.4): comments skipped, label values unescaped.
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in `{line}`"));
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let (mut key, mut value, mut in_value, mut escaped) = (String::new(), String::new(), false, false);
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match (in_value, escaped, c) {
                (false, _, '}') => {
                    end = Some(i);
                    break;
                }
                (false, _, ',') => {}
                (false, _, '=') => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "a label value is quoted in `{line}`");
                    in_value = true;
                }
                (false, _, c) => key.push(c),
                (true, true, c) => {
                    value.push(if c == 'n' { '\n' } else { c });
                    escaped = false;
                }
                (true, false, '\\') => escaped = true,
                (true, false, '"') => {
                    labels.insert(std::mem::take(&mut key), std::mem::take(&mut value));
                    in_value = false;
                }
                (true, false, c) => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated labels in `{line}`"));
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value in `{line}`"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|e| panic!("bad value in `{line}`: {e}")),
    };
    Sample { name, labels, value }
}

/// The samples named `name` whose labels include `filter`.
fn select<'a>(samples: &'a [Sample], name: &str, filter: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && filter.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The one sample named `name` with labels `filter` (fails on none or several).
fn one(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    let found = select(samples, name, filter);
    assert_eq!(found.len(), 1, "expected one `{name}` {filter:?}, got {found:?}");
    found[0].value
}

async fn scrape(http: &reqwest::Client, url: &str) -> Vec<Sample> {
    let response = http.get(format!("{url}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("ascii").to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse_exposition(&response.text().await.expect("metrics body"))
}

/// What one request was served: its response id, prompt and completion tokens.
#[derive(Debug)]
struct Served {
    id: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

async fn request(http: &reqwest::Client, api: &str, route: &str, body: Value) -> Served {
    let stream = body["stream"] == true;
    let response = http.post(format!("{api}{route}")).json(&body).send().await.expect("request");
    assert_eq!(response.status(), 200, "{route}");
    let (id, usage) = if stream {
        let (events, done) = support::read_sse(response).await;
        assert!(done, "the stream ends with [DONE]");
        let usage = events.iter().rev().find(|e| e["usage"].is_object()).expect("a usage chunk")["usage"].clone();
        (events[0]["id"].clone(), usage)
    } else {
        let v: Value = response.json().await.expect("json");
        (v["id"].clone(), v["usage"].clone())
    };
    Served {
        id: id.as_str().expect("id").to_string(),
        prompt_tokens: usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        completion_tokens: usage["completion_tokens"].as_u64().expect("completion_tokens"),
    }
}

/// A handful of chat and text completions, some streamed; returns what each served.
async fn serve_requests(http: &reqwest::Client, api: &str) -> (Vec<Served>, usize, usize) {
    let chat = |text: &str, max_tokens: u32, stream: bool| {
        json!({"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
               "ignore_eos": true, "stream": stream, "stream_options": stream.then(|| json!({"include_usage": true}))})
    };
    let text = |prompt: &str, max_tokens: u32, stream: bool| {
        json!({"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": stream,
               "stream_options": stream.then(|| json!({"include_usage": true}))})
    };
    let chats = [chat("Name three colours.", 6, false), chat("Count to five.", 9, true), chat("Say hi.", 7, false)];
    let texts = [text("The capital of France is", 5, false), text("Once upon a time", 8, true)];
    let (n_chat, n_text) = (chats.len(), texts.len());
    let mut calls = Vec::new();
    for body in chats {
        calls.push(request(http, api, "/v1/chat/completions", body));
    }
    let mut text_calls = Vec::new();
    for body in texts {
        text_calls.push(request(http, api, "/v1/completions", body));
    }
    let (mut served, texts) = futures::join!(futures::future::join_all(calls), futures::future::join_all(text_calls));
    served.extend(texts);
    (served, n_chat, n_text)
}

/// Polls `url`'s `/metrics` until its generation tokens reach `expected` (the heartbeat brings
/// them to the head), then returns the scrape.
async fn scrape_when_settled(
    http: &reqwest::Client,
    url: &str,
    expected_generation: f64,
    requests: f64,
) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = scrape(http, url).await;
        let generated: f64 = select(&samples, "vllm:generation_tokens_total", &[]).iter().map(|s| s.value).sum();
        let e2e: f64 = select(&samples, "vllm:e2e_request_latency_seconds_count", &[]).iter().map(|s| s.value).sum();
        if generated == expected_generation && e2e == requests {
            return samples;
        }
        assert!(Instant::now() < deadline, "{url}/metrics never showed {expected_generation} tokens (has {generated})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts the vLLM series of the one replica equal what was served.
fn assert_vllm_series(samples: &[Sample], served: &[Served], labels: &[(&str, &str)]) {
    let n = served.len() as f64;
    let prompt: u64 = served.iter().map(|s| s.prompt_tokens).sum();
    let generated: u64 = served.iter().map(|s| s.completion_tokens).sum();
    assert_eq!(one(samples, "vllm:generation_tokens_total", labels), generated as f64);
    assert_eq!(one(samples, "vllm:prompt_tokens_total", labels), prompt as f64);
    let reason = |r| {
        let mut with = labels.to_vec();
        with.push(("finished_reason", r));
        one(samples, "vllm:request_success_total", &with)
    };
    assert_eq!((reason("length"), reason("stop"), reason("abort")), (n, 0.0, 0.0));
    for histogram in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ] {
        assert_eq!(one(samples, &format!("{histogram}_count"), labels), n, "{histogram}");
        let mut inf = labels.to_vec();
        inf.push(("le", "+Inf"));
        assert_eq!(one(samples, &format!("{histogram}_bucket"), &inf), n, "{histogram}");
    }
    // Every gap between two tokens of a request is one inter-token observation.
    assert_eq!(one(samples, "vllm:time_per_output_token_seconds_count", labels), (generated as f64) - n);
    assert_eq!(one(samples, "vllm:request_prompt_tokens_sum", labels), prompt as f64);
    assert_eq!(one(samples, "vllm:request_generation_tokens_sum", labels), generated as f64);
    let e2e_sum = one(samples, "vllm:e2e_request_latency_seconds_sum", labels);
    assert!(e2e_sum > 0.0 && e2e_sum < 120.0, "e2e latency sum {e2e_sum}");
    assert_eq!(one(samples, "vllm:num_requests_running", labels), 0.0);
    assert_eq!(one(samples, "vllm:num_requests_waiting", labels), 0.0);
    let usage = one(samples, "vllm:kv_cache_usage_perc", labels);
    assert!((0.0..=1.0).contains(&usage), "a fraction: {usage}");
    assert_eq!(one(samples, "vllm:gpu_cache_usage_perc", labels), usage);
    let queries = one(samples, "vllm:prefix_cache_queries_total", labels);
    assert!(one(samples, "vllm:prefix_cache_hits_total", labels) <= queries);
    assert_eq!(one(samples, "vllm:num_preemptions_total", labels), 0.0);
    // Speculative decoding (the deployment's `speculative_config`): the model drafts for
    // itself, so the draft model proposes from the first decode step on.
    let drafts = one(samples, "vllm:spec_decode_num_drafts_total", labels);
    let proposed = one(samples, "vllm:spec_decode_num_draft_tokens_total", labels);
    let accepted = one(samples, "vllm:spec_decode_num_accepted_tokens_total", labels);
    assert!(drafts >= 1.0 && proposed >= drafts && proposed <= 3.0 * drafts, "{drafts} drafts of {proposed}");
    assert!(accepted <= proposed && accepted <= (generated as f64) - n);
    let per_position: Vec<f64> = (0..3)
        .map(|p| {
            let mut with = labels.to_vec();
            let position = p.to_string();
            with.push(("position", position.as_str()));
            select(samples, "vllm:spec_decode_num_accepted_tokens_per_pos_total", &with)
                .first()
                .map_or(0.0, |s| s.value)
        })
        .collect();
    assert_eq!(per_position.iter().sum::<f64>(), accepted, "{per_position:?}");
    assert!(
        per_position.windows(2).all(|w| w[0] >= w[1]),
        "a later position is accepted only after the earlier: {per_position:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_engine_logs_match_what_was_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("serve.yaml");
    std::fs::write(&config, serve_config()).expect("config");
    let head = Lumen::start(&head_args(&config));
    let worker = Worker::start(&head.url("grpc"));
    let http = reqwest::Client::new();
    head.wait_healthy(&http).await;

    let (served, n_chat, n_text) = serve_requests(&http, &head.url("api")).await;
    let generated: u64 = served.iter().map(|s| s.completion_tokens).sum();
    assert_eq!(generated, 6 + 9 + 7 + 5 + 8, "ignore_eos: every request ran to max_tokens");
    let n = served.len() as f64;

    // The head, on both ports: the replica's series with every label, and the cluster's.
    let mut replica_id = String::new();
    for port in ["api", "dashboard"] {
        let samples = scrape_when_settled(&http, &head.url(port), generated as f64, n).await;
        let series = select(&samples, "vllm:generation_tokens_total", &[]);
        assert_eq!(series.len(), 1, "one replica: {series:?}");
        let labels = &series[0].labels;
        assert_eq!(
            labels.keys().map(String::as_str).collect::<Vec<_>>(),
            ["deployment", "model_name", "replica", "worker"]
        );
        assert_eq!((labels["model_name"].as_str(), labels["deployment"].as_str()), ("smol", DEPLOYMENT));
        assert_eq!(labels["worker"], WORKER_ID);
        replica_id = labels["replica"].clone();
        assert!(replica_id.starts_with(&format!("{DEPLOYMENT}-")), "{replica_id}");
        let labels = [
            ("model_name", "smol"),
            ("deployment", DEPLOYMENT),
            ("replica", replica_id.as_str()),
            ("worker", WORKER_ID),
        ];
        assert_vllm_series(&samples, &served, &labels);

        assert_eq!(one(&samples, "lumen_cluster_workers", &[("state", "alive")]), 1.0);
        assert_eq!(one(&samples, "lumen_cluster_workers", &[("state", "dead")]), 0.0);
        assert_eq!(
            one(&samples, "lumen_serve_deployment_replicas", &[("deployment", DEPLOYMENT), ("state", "RUNNING")]),
            1.0
        );
        assert_eq!(
            one(&samples, "lumen_serve_deployment_replicas", &[("deployment", DEPLOYMENT), ("state", "STARTING")]),
            0.0
        );
        let routed = |route: &str| {
            one(
                &samples,
                "lumen_serve_num_router_requests_total",
                &[("route", route), ("model", "smol"), ("code", "200")],
            )
        };
        assert_eq!(routed("/v1/chat/completions"), n_chat as f64);
        assert_eq!(routed("/v1/completions"), n_text as f64);
        let latency = [("route", "/v1/chat/completions"), ("model", "smol")];
        assert_eq!(one(&samples, "lumen_serve_request_latency_ms_count", &latency), n_chat as f64);
    }

    // The worker's own /metrics: the same numbers, labelled by model and replica only.
    let samples = scrape_when_settled(&http, &worker.url("metrics"), generated as f64, n).await;
    let series = select(&samples, "vllm:generation_tokens_total", &[]);
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].labels.keys().map(String::as_str).collect::<Vec<_>>(), ["model_name", "replica"]);
    assert_vllm_series(&samples, &served, &[("model_name", "smol"), ("replica", replica_id.as_str())]);
    assert!(select(&samples, "lumen_cluster_workers", &[]).is_empty(), "cluster series are the head's");

    // The engine line: logged for the replica while it was busy (or right after) ...
    let deadline = Instant::now() + Duration::from_secs(5 * LOG_STATS_INTERVAL_S + 5);
    let line = loop {
        let lines = worker.engine_lines();
        if let Some(line) =
            lines.iter().find(|l| l["fields"]["generation_throughput"].as_f64().is_some_and(|t| t > 0.0))
        {
            break line.clone();
        }
        assert!(Instant::now() < deadline, "no engine line with generation throughput in the worker's log");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["fields"]["replica"], replica_id.as_str());
    assert_eq!(line["fields"]["model"], "smol");
    for field in ["prompt_throughput", "running", "waiting", "preempted", "kv_cache_usage", "prefix_cache_hit_rate"] {
        assert!(line["fields"][field].is_number(), "{field} in {line}");
    }
    let message = line["fields"]["message"].as_str().expect("message");
    assert!(message.contains("Running:") && message.contains("KV cache usage:"), "{message}");
    // ... and quiet once idle: at most the one tick that still saw the last requests.
    tokio::time::sleep(Duration::from_secs(LOG_STATS_INTERVAL_S)).await;
    let before = worker.engine_lines().len();
    tokio::time::sleep(Duration::from_secs(3 * LOG_STATS_INTERVAL_S)).await;
    let after = worker.engine_lines().len();
    assert!(after - before <= 1, "an idle replica stays quiet: {before} lines, then {after}");

    // Request lines carry the request id (the response id) and the replica in their span.
    let logs = worker.json_logs();
    for s in &served {
        let tagged = logs.iter().any(|l| {
            l["fields"]["message"] == "request queued"
                && l["span"]["request_id"] == s.id.as_str()
                && l["span"]["replica"] == replica_id.as_str()
        });
        assert!(tagged, "no `request queued` line in the span of request {}", s.id);
    }
}
