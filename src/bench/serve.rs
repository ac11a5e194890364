//! `lumen bench serve`: a load generator for any OpenAI-compatible server (Lumen's `lumen serve`,
//! llama.cpp's `llama-server`, vLLM), in the manner of `vllm bench serve`.
//!
//! Contract:
//! - Every request streams (`stream: true`, `stream_options.include_usage`) with `max_tokens =
//!   output_len`, `ignore_eos: true`, `temperature: 0`. `/v1/completions` sends `prompt` as exactly
//!   `input_len` random token ids from `--prompt-token-range`; `/v1/chat/completions` sends one
//!   user message of `input_len` random common words, which is only *about* `input_len` tokens
//!   (the tokenizer decides, and the chat template adds its own). No two prompts share a prefix.
//! - Times are taken on this client: TTFT from sending the request to the first chunk carrying
//!   text, ITL between text chunks, e2e from sending to the end of the stream; output tokens from
//!   the final `usage` (else the number of text chunks). See `sse.rs`.
//! - Requests arrive as a Poisson process of `--request-rate` per second (`inf`: all at once); at
//!   most `--concurrency` are in flight, a request waiting for a slot starts its clock when sent.
//! - A request fails on a non-2xx status, a transport error or timeout, an error object in the
//!   stream, or a stream cut off before `[DONE]`/`finish_reason`. Failures are counted and
//!   described (status and body) in the report and left out of every latency figure; a run where
//!   every request fails is an error. Untimed warm-up requests go first and must succeed.
//! - `--tenant NAME:KEY:RATE` (repeatable) sends as several tenants, each with its own key and
//!   Poisson rate, and reports each one's figures too (see `tenants.rs`).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::datasets::{Dataset, text_prompts};
use super::report::{Report, RequestDetail, RequestRecord};
use super::sse::{SseDecoder, StreamTally, clip};
use super::structured;
use super::tenants::{self, TenantSpec};
use super::workload::{Arrivals, LoadArgs, token_prompts, word_prompts};

/// How many failure descriptions the report keeps.
const FAILURES_KEPT: usize = 20;

/// Options of `lumen bench serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Base URL of the OpenAI-compatible server (scheme, host, port; no `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// API path: `/v1/completions` (token-id prompts) or `/v1/chat/completions` (text prompts of
    /// approximately --input-len tokens).
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name sent with every request (default: the first id listed by GET /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "LUMEN_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificates an `https://` --base-url must be signed by, instead of the system's
    /// roots.
    #[arg(long, env = "LUMEN_SSL_CA_CERTS")]
    pub ssl_ca_certs: Option<PathBuf>,
    /// PEM client certificate chain presented to an `https://` --base-url that asks for one (a
    /// head with --ssl-cert-reqs 1 or 2); with --ssl-keyfile.
    #[arg(long, env = "LUMEN_SSL_CERTFILE")]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of --ssl-certfile.
    #[arg(long, env = "LUMEN_SSL_KEYFILE")]
    pub ssl_keyfile: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Most requests in flight at once (default: no limit but --request-rate).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests per second, arriving as a Poisson process; `inf` sends them all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Token ids of the random prompts are drawn from LOW..HIGH (HIGH excluded). The default
    /// avoids the low ids where special tokens live and fits Llama-family and SmolLM2 vocabularies.
    #[arg(long, default_value = "100..32000", value_parser = parse_token_range)]
    pub prompt_token_range: Range<u32>,
    /// Untimed warm-up requests before the run (at most 16 output tokens each); they must succeed.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// JSON object merged into every request body, e.g. '{"cache_prompt": false}'.
    #[arg(long, value_parser = parse_json_object)]
    pub extra_body: Option<Map<String, Value>>,
    /// Seconds one request may take, stream included, before it counts as failed.
    #[arg(long, default_value_t = 1800.0)]
    pub timeout: f64,
    /// Name of the engine in the report (default: the model name).
    #[arg(long)]
    pub engine_label: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Send as a tenant: NAME:KEY:RATE (its API key, its requests per second as a Poisson
    /// process). Repeat for each tenant; --num-prompts is split in proportion to the rates,
    /// --request-rate is not used, and the report adds each tenant's TTFT and throughput share.
    #[arg(long = "tenant", value_name = "NAME:KEY:RATE", value_parser = tenants::parse_tenant)]
    pub tenants: Vec<TenantSpec>,
    /// Also keep every request in the JSON report (`requests`: send time, tenant, TTFT, end to
    /// end, each inter-token gap, or the error), as vLLM's `--save-detailed` does.
    #[arg(long)]
    pub save_detailed: bool,
}

fn parse_token_range(s: &str) -> Result<Range<u32>, String> {
    let (lo, hi) = s.split_once("..").ok_or_else(|| format!("expected LOW..HIGH, got {s:?}"))?;
    let num = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?} in {s:?}: {e}"));
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo >= hi {
        return Err(format!("empty token range {lo}..{hi}"));
    }
    Ok(lo..hi)
}

fn parse_json_object(s: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(s) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("expected a JSON object, got {other}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Which OpenAI API the endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Completions,
    Chat,
}

impl Api {
    fn of(endpoint: &str) -> anyhow::Result<Api> {
        let path = endpoint.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Ok(Api::Chat)
        } else if path.ends_with("/completions") {
            Ok(Api::Completions)
        } else {
            bail!("--endpoint {endpoint:?}: expected /v1/completions or /v1/chat/completions")
        }
    }
}

/// Why one request did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("stream: {0}")]
    Stream(String),
}

impl From<reqwest::Error> for RequestFailure {
    fn from(e: reqwest::Error) -> Self {
        RequestFailure::Transport(error_chain(&e))
    }
}

/// An error and its sources on one line (reqwest hides the cause, e.g. "connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Where requests go and how they are sent.
struct Target {
    client: reqwest::Client,
    url: String,
    api: Api,
    api_key: Option<String>,
    timeout: Duration,
}

impl Target {
    fn new(args: &ServeArgs) -> anyhow::Result<Target> {
        if !(args.timeout > 0.0 && args.timeout.is_finite()) {
            bail!("--timeout must be a positive number of seconds, got {}", args.timeout);
        }
        // Benchmarks talk to a server directly; a proxy from the environment would be measured too.
        // A fresh connection per request (as `vllm bench serve` makes): a server that closes idle
        // keep-alive connections (llama.cpp's does) would otherwise fail requests sent on one it
        // has just closed.
        let trust = lumen_proto::tls::ClientTls::from_flags(
            args.ssl_ca_certs.as_deref(),
            args.ssl_certfile.as_deref(),
            args.ssl_keyfile.as_deref(),
        )?;
        let client = trust.http_client(reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0))?;
        let path = if args.endpoint.starts_with('/') { args.endpoint.clone() } else { format!("/{}", args.endpoint) };
        Ok(Target {
            client,
            url: format!("{}{path}", args.base_url.trim_end_matches('/')),
            api: Api::of(&args.endpoint)?,
            // Tenants send their own keys; the model list and the warm-up go with this one.
            api_key: args.api_key.clone().or_else(|| args.tenants.first().map(|t| t.key.clone())),
            timeout: Duration::from_secs_f64(args.timeout),
        })
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        self.authorize_as(req, None)
    }

    /// Sends `key` (else --api-key, else nothing) as the bearer token.
    fn authorize_as(&self, req: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
        match key.or(self.api_key.as_deref()) {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// The first model id of GET {base}/v1/models.
    async fn first_model(&self, base_url: &str) -> anyhow::Result<String> {
        let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
        let resp = self.authorize(self.client.get(&url)).timeout(Duration::from_secs(30)).send().await;
        let resp = resp.map_err(RequestFailure::from).with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.text().await.map_err(RequestFailure::from).with_context(|| format!("GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: HTTP {}: {}", status.as_u16(), clip(&body, 500));
        }
        let list: Value = serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON"))?;
        match list["data"][0]["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("GET {url} lists no model (pass --model): {}", clip(&body, 300)),
        }
    }

    /// The server's structured-output mask histogram (`GET {base}/metrics`); empty when the
    /// server does not export it.
    async fn mask_histogram(&self, base_url: &str) -> structured::Buckets {
        let url = format!("{}/metrics", base_url.trim_end_matches('/'));
        let page = match self.authorize(self.client.get(&url)).timeout(Duration::from_secs(30)).send().await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        structured::Buckets::from_prometheus(&page, structured::MASK_SERIES)
    }

    /// Sends one request (with `key`, else --api-key) and times its stream.
    async fn send(
        &self,
        body: &Value,
        prompt_tokens: usize,
        key: Option<&str>,
    ) -> Result<RequestRecord, RequestFailure> {
        let sent = Instant::now();
        let post = self.authorize_as(self.client.post(&self.url), key);
        let resp = post.json(body).timeout(self.timeout).send().await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_else(|e| format!("(body unreadable: {})", error_chain(&e)));
            return Err(RequestFailure::Status { status: status.as_u16(), body: clip(&text, 500) });
        }
        let mut stream = resp.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut tally = StreamTally::new(sent);
        let mut ended = None;
        while let Some(bytes) = stream.next().await {
            // Every event completed by this read arrived now.
            let at = Instant::now();
            for data in decoder.push(&bytes?) {
                tally.on_data(&data, at).map_err(RequestFailure::Stream)?;
            }
            if tally.done() && ended.is_none() {
                // Keep reading to the end of the body so the connection can be reused.
                ended = Some(at);
            }
        }
        if let Some(data) = decoder.finish() {
            tally.on_data(&data, Instant::now()).map_err(RequestFailure::Stream)?;
        }
        let ended = ended.unwrap_or_else(Instant::now);
        tally.finish(ended, prompt_tokens).map_err(RequestFailure::Stream)
    }
}

/// The body of one streamed request.
fn request_body(api: Api, model: &str, prompt: Prompt, max_tokens: usize, extra: Option<&Map<String, Value>>) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match (api, prompt) {
        (Api::Chat, Prompt::Text(text)) => body["messages"] = json!([{"role": "user", "content": text}]),
        (_, Prompt::Tokens(ids)) => body["prompt"] = json!(ids),
        (_, Prompt::Text(text)) => body["prompt"] = json!(text),
    }
    if let (Some(extra), Value::Object(fields)) = (extra, &mut body) {
        fields.extend(extra.clone());
    }
    body
}

enum Prompt {
    Tokens(Vec<u32>),
    Text(String),
}

/// `n` prompts for `api`: token ids for completions, words for chat.
fn prompts(api: Api, args: &ServeArgs, n: usize, seed: u64) -> Vec<Prompt> {
    match api {
        Api::Completions => token_prompts(n, args.load.input_len, args.prompt_token_range.clone(), seed)
            .into_iter()
            .map(Prompt::Tokens)
            .collect(),
        Api::Chat if args.load.dataset_name != Dataset::Random => {
            text_prompts(args.load.dataset_name, n, seed).into_iter().map(Prompt::Text).collect()
        }
        Api::Chat => word_prompts(n, args.load.input_len, seed).into_iter().map(Prompt::Text).collect(),
    }
}

/// Runs the benchmark and returns its report (failed requests included in it).
pub async fn run(args: ServeArgs) -> anyhow::Result<Report> {
    if args.load.num_prompts == 0 || args.load.output_len == 0 {
        bail!("--num-prompts and --output-len must be at least 1");
    }
    if args.load.dataset_name != Dataset::Random && Api::of(&args.endpoint)? != Api::Chat {
        bail!("--dataset-name {:?} is chat messages: use --endpoint /v1/chat/completions", args.load.dataset_name);
    }
    if args.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!("--request-rate must be positive (or inf), got {}", args.request_rate);
    }
    structured::check_fraction(args.load.structured_fraction)?;
    tenants::check(&args.tenants, args.load.num_prompts)?;
    let target = Arc::new(Target::new(&args)?);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => target.first_model(&args.base_url).await?,
    };
    // One draw for the run and the warm-up, so no warm-up prompt shares a prefix with a timed one.
    let mut all = prompts(target.api, &args, args.load.num_prompts + args.warmup, args.load.seed);
    let warmups = all.split_off(args.load.num_prompts);
    let extra = args.extra_body.as_ref();
    let fraction = args.load.structured_fraction;
    for (i, prompt) in warmups.into_iter().enumerate() {
        let mut body = request_body(target.api, &model, prompt, args.load.output_len.min(16), extra);
        // The first warm-up compiles the schema, so no timed request waits for it.
        if i == 0 && fraction > 0.0 {
            constrain(&mut body);
        }
        if let Err(e) = target.send(&body, args.load.input_len, None).await {
            bail!("warm-up request {i} to {} failed: {e}", target.url);
        }
    }
    let bodies: Vec<Value> = all
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut body = request_body(target.api, &model, p, args.load.output_len, extra);
            if structured::is_constrained(i, fraction) {
                constrain(&mut body);
            }
            body
        })
        .collect();
    let masks_before = target.mask_histogram(&args.base_url).await;

    let limit = args.concurrency.unwrap_or(args.load.num_prompts);
    let plan = plan(&args, bodies);
    let senders: Vec<Option<usize>> = plan.iter().map(|p| p.tenant).collect();
    let (sent, duration) = dispatch(&target, plan, &args.tenants, args.load.input_len, limit).await?;
    let (sent, outcomes): (Vec<Duration>, Vec<_>) = sent.into_iter().unzip();
    let by_tenant = tenant_reports(&args.tenants, &senders, &outcomes, duration);
    let details = args.save_detailed.then(|| {
        let name = |t: &Option<usize>| t.map(|t| args.tenants[t].name.clone());
        senders
            .iter()
            .zip(&outcomes)
            .zip(&sent)
            .map(|((t, outcome), at)| match outcome {
                Ok(record) => RequestDetail::of(record, name(t)),
                Err(e) => RequestDetail::failed(*at, e.to_string(), name(t)),
            })
            .collect()
    });
    let (records, failures): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    let records: Vec<RequestRecord> = records.into_iter().flatten().collect();
    let failures: Vec<String> = failures.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();

    let label = args.engine_label.clone().unwrap_or_else(|| model.clone());
    let mut report = Report::new(label, limit, args.load.input_len, args.load.output_len, duration, &records);
    report.failed = failures.len();
    report.failures = failures.into_iter().take(FAILURES_KEPT).collect();
    report.request_rate = args.request_rate.is_finite().then_some(args.request_rate);
    report.structured_fraction = fraction;
    report.tenants = by_tenant;
    report.requests = details;
    if !args.tenants.is_empty() {
        report.request_rate = Some(args.tenants.iter().map(|t| t.rate).sum());
    }
    if fraction > 0.0 {
        let masks = target.mask_histogram(&args.base_url).await.since(&masks_before);
        report.mask_ms = structured::mask_ms(&masks);
    }
    Ok(report)
}

/// Puts a request under the benchmark's JSON schema.
fn constrain(body: &mut Value) {
    body["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": structured::schema()}});
}

/// One timed request: when it is sent (from the run's start), by which tenant, and its body.
struct Planned {
    at: Duration,
    tenant: Option<usize>,
    body: Value,
}

/// The run's schedule: Poisson arrivals at --request-rate, or each tenant's own (see `tenants.rs`).
fn plan(args: &ServeArgs, bodies: Vec<Value>) -> Vec<Planned> {
    if args.tenants.is_empty() {
        let mut arrivals = Arrivals::new(args.request_rate, args.load.seed);
        let mut at = Duration::ZERO;
        return bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                if i > 0 {
                    at += arrivals.next_gap();
                }
                Planned { at, tenant: None, body }
            })
            .collect();
    }
    let counts = tenants::counts(&args.tenants, bodies.len());
    let schedule = tenants::schedule(&args.tenants, &counts, args.load.seed);
    schedule.into_iter().zip(bodies).map(|((at, tenant), body)| Planned { at, tenant: Some(tenant), body }).collect()
}

/// Each tenant's report from the outcomes, sent by `senders` (in the same order).
fn tenant_reports(
    specs: &[TenantSpec],
    senders: &[Option<usize>],
    outcomes: &[Result<RequestRecord, RequestFailure>],
    duration: Duration,
) -> Vec<tenants::TenantReport> {
    let mut records = vec![Vec::new(); specs.len()];
    let mut failed = vec![0; specs.len()];
    for (sender, outcome) in senders.iter().zip(outcomes) {
        let Some(t) = *sender else { continue };
        match outcome {
            Ok(record) => records[t].push(record.clone()),
            Err(_) => failed[t] += 1,
        }
    }
    tenants::reports(specs, &records, &failed, duration)
}

/// Sends every planned request at its time (an absolute schedule, so time spent spawning does
/// not stretch the gaps), at most `limit` in flight; returns each request's send time and
/// outcome (in plan order) and the time from the first send to the last completion.
async fn dispatch(
    target: &Arc<Target>,
    plan: Vec<Planned>,
    specs: &[TenantSpec],
    prompt_tokens: usize,
    limit: usize,
) -> anyhow::Result<(Vec<(Duration, Result<RequestRecord, RequestFailure>)>, Duration)> {
    let slots = Arc::new(Semaphore::new(limit));
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for Planned { at, tenant, body } in plan {
        tokio::time::sleep_until(start + at).await;
        let (target, slots) = (Arc::clone(target), Arc::clone(&slots));
        let key = tenant.map(|t| specs[t].key.clone());
        tasks.push(tokio::spawn(async move {
            let slot = slots.acquire_owned().await.map_err(|e| RequestFailure::Transport(e.to_string()));
            let sent = started.elapsed();
            let record = match slot {
                Ok(_slot) => target.send(&body, prompt_tokens, key.as_deref()).await,
                Err(e) => Err(e),
            };
            (sent, record.map(|record| RequestRecord { start: sent, ..record }))
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.context("a benchmark request task panicked")?);
    }
    Ok((outcomes, started.elapsed()))
}

/// `lumen bench serve` from the command line: runs, prints the table (and the failures to
/// stderr), writes the JSON; fails when no request succeeded.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let json_path = args.json.clone();
    let output_len = args.load.output_len;
    let report = run(args).await?;
    print!("{}", report.table());
    for failure in &report.failures {
        eprintln!("failed request: {failure}");
    }
    if report.failed > report.failures.len() {
        eprintln!("... and {} more failed requests", report.failed - report.failures.len());
    }
    let expected = report.num_prompts * output_len;
    if report.total_output_tokens != expected {
        eprintln!(
            "warning: {} output tokens in total, {expected} expected ({} requests x --output-len {output_len}): \
             the server may not honour ignore_eos/max_tokens",
            report.total_output_tokens, report.num_prompts
        );
    }
    let text = serde_json::to_string_pretty(&report)?;
    match json_path {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    if report.num_prompts == 0 {
        bail!("all {} requests failed", report.failed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_range_parses_low_and_high_and_rejects_empty_ranges() {
        assert_eq!(parse_token_range("100..32000"), Ok(100..32000));
        assert!(parse_token_range("5..5").is_err());
        assert!(parse_token_range("100-200").is_err());
    }

    #[test]
    fn endpoint_path_selects_the_api() {
        assert_eq!(Api::of("/v1/completions").unwrap(), Api::Completions);
        assert_eq!(Api::of("/v1/chat/completions/").unwrap(), Api::Chat);
        assert!(Api::of("/v1/embeddings").is_err());
    }

    #[test]
    fn completion_body_carries_token_ids_and_extra_fields_override() {
        let extra = parse_json_object(r#"{"cache_prompt": false, "temperature": 0.5}"#).unwrap();
        let body = request_body(Api::Completions, "m", Prompt::Tokens(vec![5, 6]), 3, Some(&extra));
        assert_eq!(body["prompt"], json!([5, 6]));
        assert_eq!(body["max_tokens"], 3);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["cache_prompt"], false);
        assert_eq!(body["temperature"], 0.5);
    }

    #[test]
    fn chat_body_sends_one_user_message() {
        let body = request_body(Api::Chat, "m", Prompt::Text("a b".into()), 3, None);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "a b"}]));
        assert!(body.get("prompt").is_none());
    }
}
