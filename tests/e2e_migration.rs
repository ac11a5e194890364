//! Request migration end to end (issue 24), with real processes: a `lumen head` and four
//! `lumen worker`s (`--drain-timeout-s 1`) serving SmolLM2, one replica each. The head runs with
//! `--migration-limit 0` and the deployment's `model:` section sets `migration_limit: 2`: every
//! move below shows that the config's value is the one in force.
//! - Streamed chat and completion requests (greedy and seeded sampled with penalties, with
//!   log-probabilities, one under a JSON schema) run once undisturbed; run again, the worker serving most of them is
//!   killed with SIGKILL once every stream has tokens: none fails, and each answer equals its
//!   undisturbed run token for token (text, token ids or pieces, finish reason, usage, one id).
//! - A worker given SIGTERM while it streams a long request of two seeded choices drains; its
//!   drain times out while the stream is still running, and the request moves instead of failing
//!   (`aborted`), each choice from its own tokens: the answer equals its undisturbed run choice
//!   for choice, the worker exits 0.
//! - A non-streamed request whose worker is killed mid-generation answers as undisturbed.
//! - With no replica left, a stream ends with the error event clients got before migration (one
//!   of one choice and one of two).
//! - `lumen:request_migrations_total` counts the moves; the request log shows them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use support::cluster::{Extra, running_by_worker, start_cluster, worker_stats};
use support::{Lumen, until};

/// Long enough that a kill after the first tokens lands mid-stream.
const MAX_TOKENS: u32 = 160;

/// Long enough (per choice, two choices) that a one-second drain timeout passes mid-stream.
const DRAINED_TOKENS: u32 = 320;

/// One request of the test.
#[derive(Clone, Copy, Debug)]
struct Spec {
    chat: bool,
    stream: bool,
    /// Seeded sampling with penalties; greedy otherwise.
    seed: Option<u64>,
    logprobs: bool,
    max_tokens: u32,
    /// Choices.
    n: u32,
    /// Under a JSON schema (`response_format`) whose documents are long.
    structured: bool,
}

impl Spec {
    fn new(chat: bool, stream: bool, seed: Option<u64>, logprobs: bool) -> Spec {
        Spec { chat, stream, seed, logprobs, max_tokens: MAX_TOKENS, n: 1, structured: false }
    }

    fn body(self, i: usize) -> (String, Value) {
        let mut body =
            json!({"model": "smol", "max_tokens": self.max_tokens, "ignore_eos": true, "stream": self.stream});
        if self.n > 1 {
            body["n"] = self.n.into();
        }
        if self.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        match self.seed {
            Some(seed) => {
                body["seed"] = seed.into();
                body["temperature"] = 0.9.into();
                body["top_p"] = 0.95.into();
                body["frequency_penalty"] = 0.3.into();
            }
            None => body["temperature"] = 0.0.into(),
        }
        if self.structured {
            let schema = json!({"type": "object", "required": ["lights"], "additionalProperties": false,
                "properties": {"lights": {"type": "array", "minItems": 40,
                    "items": {"type": "object", "required": ["name", "year"], "additionalProperties": false,
                        "properties": {"name": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}}}}}});
            body["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": "lights", "schema": schema}});
        }
        let text = format!("Tell story number {i} about a lighthouse keeper.");
        if self.chat {
            body["messages"] = json!([{"role": "user", "content": text}]);
            if self.logprobs {
                body["logprobs"] = true.into();
                body["top_logprobs"] = 1.into();
            }
            ("/v1/chat/completions".into(), body)
        } else {
            body["prompt"] = text.into();
            if self.logprobs {
                body["logprobs"] = 1.into();
                body["return_tokens_as_token_ids"] = true.into();
            }
            ("/v1/completions".into(), body)
        }
    }
}

/// What a client saw of one choice.
#[derive(Debug, Default, PartialEq)]
struct Choice {
    text: String,
    /// Token ids (completions) or pieces (chat), from the log-probabilities.
    tokens: Vec<String>,
    finish: Option<String>,
}

/// What a client saw of one request.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    /// By choice index.
    choices: BTreeMap<u64, Choice>,
    usage: Option<(u64, u64)>,
    ids: BTreeSet<String>,
    errors: Vec<String>,
}

impl Answer {
    /// Adds one response object (a chunk, or the whole non-streamed answer).
    fn add(&mut self, object: &Value) {
        if let Some(error) = object.get("error") {
            self.errors.push(error.to_string());
            return;
        }
        self.ids.extend(object["id"].as_str().map(String::from));
        if let Some(usage) = object.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some((usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap()));
        }
        for choice in object["choices"].as_array().into_iter().flatten() {
            let seen = self.choices.entry(choice["index"].as_u64().expect("a choice index")).or_default();
            let text = choice["text"].as_str().or(choice["delta"]["content"].as_str());
            seen.text.push_str(text.or(choice["message"]["content"].as_str()).unwrap_or_default());
            let pieces = choice["logprobs"]["tokens"].as_array().cloned().unwrap_or_default().into_iter();
            let content = choice["logprobs"]["content"].as_array().cloned().unwrap_or_default().into_iter();
            let tokens = pieces.chain(content.map(|c| c["token"].clone()));
            seen.tokens.extend(tokens.filter_map(|t| t.as_str().map(String::from)));
            if let Some(finish) = choice["finish_reason"].as_str() {
                seen.finish = Some(finish.into());
            }
        }
    }

    /// Bytes of text over every choice.
    fn text_len(&self) -> usize {
        self.choices.values().map(|c| c.text.len()).sum()
    }
}

/// Sends `spec` and reads its answer; `progress` counts one once a stream has two chunks with
/// output.
async fn ask(http: reqwest::Client, api: String, spec: Spec, i: usize, progress: Arc<AtomicUsize>) -> Answer {
    let (path, body) = spec.body(i);
    let response = http.post(format!("{api}{path}")).json(&body).send().await.expect("the request is sent");
    assert_eq!(response.status(), 200, "{spec:?}");
    let mut answer = Answer::default();
    if !spec.stream {
        answer.add(&response.json::<Value>().await.expect("a JSON answer"));
        return answer;
    }
    let (mut buffer, mut chunks, mut counted) = (String::new(), 0, false);
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes.expect("the stream reads")));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let before = answer.text_len();
            answer.add(&serde_json::from_str(data).expect("SSE JSON"));
            chunks += usize::from(answer.text_len() > before);
            if chunks >= 2 && !counted {
                counted = true;
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    answer
}

/// Runs every spec at once; the answers in order.
async fn ask_all(http: &reqwest::Client, api: &str, specs: &[Spec], progress: &Arc<AtomicUsize>) -> Vec<Answer> {
    let tasks = specs
        .iter()
        .enumerate()
        .map(|(i, &spec)| tokio::spawn(ask(http.clone(), api.to_string(), spec, i, progress.clone())));
    futures::future::join_all(tasks).await.into_iter().map(|a| a.expect("task")).collect()
}

/// The migrations counted on the head's `/metrics` whose labels contain `labels` (`""`: all).
async fn migrations_of(http: &reqwest::Client, head: &Lumen, labels: &str) -> f64 {
    let text = http.get(format!("{}/metrics", head.url("api"))).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("lumen:request_migrations_total{") && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn migrations(http: &reqwest::Client, head: &Lumen) -> f64 {
    migrations_of(http, head, "").await
}

/// Takes the worker running the most requests out of `workers`.
async fn busiest(workers: &mut BTreeMap<&'static str, Lumen>) -> (&'static str, Lumen) {
    let mut busiest = ("", 0);
    for (&id, worker) in workers.iter() {
        let running = worker_stats(worker).await.1;
        if running > busiest.1 {
            busiest = (id, running);
        }
    }
    assert!(busiest.1 > 0, "no worker runs a request");
    (busiest.0, workers.remove(busiest.0).expect("the busiest"))
}

/// Kills (SIGKILL) the worker running the most requests; returns its id.
async fn kill_busiest(workers: &mut BTreeMap<&'static str, Lumen>) -> &'static str {
    let (id, mut victim) = busiest(workers).await;
    victim.child.kill().expect("SIGKILL");
    victim.child.wait().expect("the victim exits");
    id
}

/// Waits until the head counts exactly `workers` alive: a worker killed a moment ago still takes
/// new requests until its heartbeats are missed, and with its replicas placed again a new request
/// could be refused (503) after its retries met only those.
async fn until_the_head_sees(http: &reqwest::Client, head: &Lumen, workers: &BTreeMap<&'static str, Lumen>) {
    let want: Vec<String> = workers.keys().map(|id| id.to_string()).collect();
    let want = &want;
    until("the head sees which workers are left", Duration::from_secs(30), || async move {
        running_by_worker(http, head).await.keys().cloned().collect::<Vec<_>>() == *want
    })
    .await;
}

/// Runs `spec` until its stream has tokens; the task that reads the rest.
async fn started(
    http: &reqwest::Client,
    api: &str,
    spec: Spec,
    i: usize,
    progress: &Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Answer> {
    progress.store(0, Ordering::SeqCst);
    let task = tokio::spawn(ask(http.clone(), api.to_string(), spec, i, progress.clone()));
    until("the stream has tokens", Duration::from_secs(120), || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) == 1 }
    })
    .await;
    task
}

fn assert_same(undisturbed: &[Answer], disturbed: &[Answer], specs: &[Spec]) {
    for ((before, after), spec) in undisturbed.iter().zip(disturbed).zip(specs) {
        assert!(before.errors.is_empty() && after.errors.is_empty(), "{spec:?}: {before:?} / {after:?}");
        assert_eq!(after.ids.len(), 1, "{spec:?}: one id for the whole answer: {:?}", after.ids);
        let completion = u64::from(spec.max_tokens * spec.n);
        assert_eq!(after.usage, Some((before.usage.unwrap().0, completion)), "{spec:?}: usage, every choice once");
        assert_eq!(after.choices.len(), spec.n as usize, "{spec:?}: every choice");
        for (index, choice) in &after.choices {
            let undisturbed = &before.choices[index];
            assert_eq!(choice.finish.as_deref(), Some("length"), "{spec:?} choice {index}");
            assert_eq!(choice.tokens, undisturbed.tokens, "{spec:?} choice {index}: token for token");
            assert_eq!(choice.text, undisturbed.text, "{spec:?} choice {index}: the same text");
            if spec.logprobs {
                let count = choice.tokens.len();
                assert_eq!(count, spec.max_tokens as usize, "{spec:?} choice {index}: a log-probability per token");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_drained_worker_costs_no_request_and_changes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra {
        head: &["--migration-limit", "0"],
        worker: &["--drain-timeout-s", "1"],
        model: &["migration_limit: 2"],
    };
    let (head, mut workers) = start_cluster(dir.path(), &["w1", "w2", "w3", "w4"], extra).await;
    let http = reqwest::Client::new();
    let api = head.url("api");
    let progress = Arc::new(AtomicUsize::new(0));
    let mut specs: Vec<Spec> =
        (0..6).map(|i| Spec::new(i % 2 == 1, true, (i % 3 != 0).then_some(i as u64 + 7), i != 5)).collect();
    specs.push(Spec { structured: true, ..Spec::new(true, true, None, true) });
    let drained = Spec { max_tokens: DRAINED_TOKENS, n: 2, ..Spec::new(true, true, Some(5), true) };
    let lone = Spec::new(false, false, Some(99), true);
    let mut all = specs.clone();
    all.extend([drained, lone]);
    let undisturbed = ask_all(&http, &api, &all, &progress).await;
    let (drained_at, lone_at) = (specs.len(), specs.len() + 1);
    assert_eq!(migrations(&http, &head).await, 0.0);

    // Every stream has output, then the busiest worker dies.
    progress.store(0, Ordering::SeqCst);
    let running = tokio::spawn({
        let (http, api, specs, progress) = (http.clone(), api.clone(), specs.clone(), progress.clone());
        async move { ask_all(&http, &api, &specs, &progress).await }
    });
    let streams = specs.len();
    until("every stream has tokens", Duration::from_secs(120), || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) == streams }
    })
    .await;
    let first = kill_busiest(&mut workers).await;
    let disturbed = running.await.expect("task");
    assert_same(&undisturbed, &disturbed, &specs);
    let moved = migrations(&http, &head).await;
    assert!(moved >= 1.0, "the requests of {first} moved: {moved}");
    until_the_head_sees(&http, &head, &workers).await;

    // A long stream whose worker drains and whose drain times out: it moves rather than fails.
    let aborted = migrations_of(&http, &head, "reason=\"aborted\"").await;
    let task = started(&http, &api, drained, drained_at, &progress).await;
    let (id, mut draining) = busiest(&mut workers).await;
    draining.terminate();
    let answer = task.await.expect("task");
    assert_same(&undisturbed[drained_at..=drained_at], &[answer], &[drained]);
    assert_eq!(draining.wait_exit(Duration::from_secs(30)), Some(0), "{id} drains and exits 0");
    assert!(
        migrations_of(&http, &head, "reason=\"aborted\"").await > aborted,
        "the stream of {id} moved when its drain timed out"
    );
    let moved = migrations(&http, &head).await;
    until_the_head_sees(&http, &head, &workers).await;

    // A non-streamed request, its worker killed mid-generation.
    let before: u64 = futures::future::join_all(workers.values().map(worker_stats)).await.iter().map(|s| s.2).sum();
    let lone_task = tokio::spawn(ask(http.clone(), api.clone(), lone, lone_at, progress.clone()));
    let workers_ref = &workers;
    until("the lone request is generating", Duration::from_secs(120), || async move {
        let stats = futures::future::join_all(workers_ref.values().map(worker_stats)).await;
        stats.iter().any(|s| s.1 > 0) && stats.iter().map(|s| s.2).sum::<u64>() >= before + 8
    })
    .await;
    kill_busiest(&mut workers).await;
    let answer = lone_task.await.expect("task");
    assert_same(&undisturbed[lone_at..], &[answer], &[lone]);
    assert!(migrations(&http, &head).await > moved, "the non-streamed request moved");
    until_the_head_sees(&http, &head, &workers).await;

    let records: Value = http
        .get(format!("{}/api/requests?limit=100", head.url("dashboard")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let migrated = records["requests"].as_array().unwrap().iter().filter(|r| r["migrations"].as_u64() > Some(0));
    assert!(migrated.clone().count() >= 3, "the request log shows the moves: {records}");
    assert!(migrated.clone().all(|r| r["status"] == 200 && r["finish_reason"] == "length"), "{records}");

    // The last worker dies under two streams, one of two choices: no replica is left, each gets an
    // error event.
    progress.store(0, Ordering::SeqCst);
    let last = [Spec::new(true, true, None, false), Spec { n: 2, ..Spec::new(false, true, None, false) }];
    let last_task = tokio::spawn({
        let (http, api, progress) = (http.clone(), api.clone(), progress.clone());
        async move { ask_all(&http, &api, &last, &progress).await }
    });
    until("the last streams have tokens", Duration::from_secs(120), || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) == 2 }
    })
    .await;
    kill_busiest(&mut workers).await;
    for (answer, spec) in last_task.await.expect("task").iter().zip(last) {
        assert_eq!(answer.errors.len(), 1, "{spec:?}: an error event ends the stream: {answer:?}");
        assert!(answer.choices.values().all(|c| c.finish.is_none()), "{spec:?}: it is not passed off as complete");
    }
}
