//! One load step of `lumen bench head`: requests to `/v1/completions` at a fixed Poisson rate for
//! a fixed time, open loop (a request is sent when it is due, whatever is in flight), and what
//! they measured.
//!
//! Contract:
//! - Every body is rendered before the step starts (distinct random token-id prompts, so the
//!   router's prefix affinity has nothing to hold on to); sending costs only the HTTP call.
//! - The head-added latency is read from the simulated workers' stamps (each token's text is the
//!   wall-clock time the worker sent it, `engine::simulated::stamp`): streamed, every chunk gives
//!   one sample, its arrival here minus its stamp; not streamed, the whole response gives one, its
//!   arrival minus its latest stamp. Both include the worker's gRPC send and this client's read,
//!   so they bound what the head adds from above.
//! - A request fails on a transport error, a non-2xx status, an `error` in the stream, a stream
//!   without `[DONE]`, or a response without `--max-tokens` stamps; failures are counted and the
//!   first one is described.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lumen_worker::engine::simulated::stamps;

use crate::bench::sse::{SseDecoder, clip};
use crate::bench::workload::{Arrivals, token_prompts};

/// How long requests still in flight when a step ends may take to finish.
const TAIL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a step sends.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub url: String,
    pub model: String,
    pub stream: bool,
    pub rate: f64,
    pub duration: Duration,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

/// What one step measured.
#[derive(Debug, Default)]
pub struct StepResult {
    pub sent: usize,
    pub completed: usize,
    pub failed: usize,
    pub first_failure: Option<String>,
    /// From the first send to the last completion.
    pub elapsed: Duration,
    /// The step's sending window (`StepSpec::duration`).
    pub duration: Duration,
    /// Stamped tokens received.
    pub tokens: usize,
    /// Head-added latency samples, microseconds.
    pub added_us: Vec<u64>,
    /// Send to first token (streamed) or to the whole response, milliseconds.
    pub ttft_ms: Vec<f64>,
    pub e2e_ms: Vec<f64>,
}

/// One request's outcome.
struct Outcome {
    added_us: Vec<u64>,
    tokens: usize,
    ttft: Duration,
    e2e: Duration,
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Runs one step (see the module docs).
pub async fn run(client: &reqwest::Client, spec: &StepSpec) -> StepResult {
    // Spare bodies: a Poisson process may bring more than rate x duration arrivals.
    let n = (spec.rate * spec.duration.as_secs_f64() * 1.2).ceil() as usize + 16;
    let bodies: Vec<Arc<str>> = token_prompts(n, spec.prompt_len, 100..30_000, spec.seed)
        .into_iter()
        .map(|prompt| {
            let body = serde_json::json!({
                "model": spec.model, "prompt": prompt, "max_tokens": spec.max_tokens,
                "stream": spec.stream, "ignore_eos": true, "temperature": 0,
            });
            Arc::from(body.to_string())
        })
        .collect();
    let results: Arc<Mutex<StepResult>> = Arc::default();
    let mut arrivals = Arrivals::new(spec.rate, spec.seed);
    let started = Instant::now();
    let mut due = Duration::ZERO;
    let mut tasks = tokio::task::JoinSet::new();
    for body in bodies {
        if due > spec.duration {
            break;
        }
        tokio::time::sleep_until((started + due).into()).await;
        due += arrivals.next_gap();
        let (client, url, spec, results) = (client.clone(), spec.url.clone(), spec.clone(), Arc::clone(&results));
        tasks.spawn(async move {
            let outcome = one(&client, &url, body, &spec).await;
            let mut r = results.lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Ok(o) => {
                    r.completed += 1;
                    r.tokens += o.tokens;
                    r.added_us.extend(o.added_us);
                    r.ttft_ms.push(o.ttft.as_secs_f64() * 1e3);
                    r.e2e_ms.push(o.e2e.as_secs_f64() * 1e3);
                }
                Err(e) => {
                    r.failed += 1;
                    r.first_failure.get_or_insert(e);
                }
            }
        });
    }
    let sent = tasks.len();
    let tail = tokio::time::timeout(TAIL_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    let elapsed = started.elapsed();
    let mut result = std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    if tail.is_err() {
        let lost = sent - result.completed - result.failed;
        result.failed += lost;
        result.first_failure.get_or_insert(format!("{lost} requests still running {TAIL_TIMEOUT:?} after the step"));
    }
    result.sent = sent;
    result.elapsed = elapsed;
    result.duration = spec.duration;
    result
}

/// Sends one request and reads its answer.
async fn one(client: &reqwest::Client, url: &str, body: Arc<str>, spec: &StepSpec) -> Result<Outcome, String> {
    let sent = Instant::now();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", clip(&text, 200)));
    }
    let mut outcome = Outcome { added_us: Vec::new(), tokens: 0, ttft: Duration::ZERO, e2e: Duration::ZERO };
    if spec.stream {
        let mut bytes = response.bytes_stream();
        let (mut decoder, mut done) = (SseDecoder::default(), false);
        while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|e| format!("reading the stream: {e}"))?;
            let now = unix_us();
            for data in decoder.push(&piece) {
                if data == "[DONE]" {
                    done = true;
                } else if data.contains("\"error\"") {
                    return Err(format!("error in the stream: {}", clip(&data, 200)));
                }
                for stamp in stamps(&data) {
                    if outcome.tokens == 0 {
                        outcome.ttft = sent.elapsed();
                    }
                    outcome.tokens += 1;
                    outcome.added_us.push(now.saturating_sub(stamp));
                }
            }
        }
        if !done {
            return Err("the stream ended without [DONE]".into());
        }
    } else {
        let text = response.text().await.map_err(|e| format!("reading the response: {e}"))?;
        let now = unix_us();
        outcome.ttft = sent.elapsed();
        let times: Vec<u64> = stamps(&text).collect();
        outcome.tokens = times.len();
        outcome.added_us.extend(times.iter().max().map(|&t| now.saturating_sub(t)));
    }
    outcome.e2e = sent.elapsed();
    if outcome.tokens != spec.max_tokens {
        return Err(format!("{} stamped tokens, expected {}", outcome.tokens, spec.max_tokens));
    }
    Ok(outcome)
}
