//! Request migration end to end (issue 24), with real processes: a `lumen head`
//! (`--migration-limit 2`) and three `lumen worker`s serving SmolLM2, one replica each.
//! - Streamed chat and completion requests (greedy and seeded sampled with penalties, with
//!   log-probabilities) run once undisturbed; run again, the worker serving most of them is
//!   killed with SIGKILL once every stream has tokens: none fails, and each answer equals its
//!   undisturbed run token for token (text, token ids or pieces, finish reason, usage, one id).
//! - A non-streamed request whose worker is killed mid-generation answers as undisturbed.
//! - With no replica left, a stream ends with the error event clients got before migration.
//! - `lumen:request_migrations_total` counts the moves; the request log shows them.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use support::cluster::{start_cluster, worker_stats};
use support::{Lumen, until};

/// Long enough that a kill after the first tokens lands mid-stream.
const MAX_TOKENS: u32 = 160;

/// One request of the test.
#[derive(Clone, Copy, Debug)]
struct Spec {
    chat: bool,
    stream: bool,
    /// Seeded sampling with penalties; greedy otherwise.
    seed: Option<u64>,
    logprobs: bool,
}

impl Spec {
    fn body(self, i: usize) -> (String, Value) {
        let mut body = json!({"model": "smol", "max_tokens": MAX_TOKENS, "ignore_eos": true, "stream": self.stream});
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

/// What a client saw of one request.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    text: String,
    /// Token ids (completions) or pieces (chat), from the log-probabilities.
    tokens: Vec<String>,
    finish: Option<String>,
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
        let Some(choice) = object["choices"].get(0) else { return };
        let text = choice["text"].as_str().or(choice["delta"]["content"].as_str());
        self.text.push_str(text.or(choice["message"]["content"].as_str()).unwrap_or_default());
        let pieces = choice["logprobs"]["tokens"].as_array().cloned().unwrap_or_default().into_iter();
        let content = choice["logprobs"]["content"].as_array().cloned().unwrap_or_default().into_iter();
        self.tokens
            .extend(pieces.chain(content.map(|c| c["token"].clone())).filter_map(|t| t.as_str().map(String::from)));
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.into());
        }
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
            let before = answer.text.len();
            answer.add(&serde_json::from_str(data).expect("SSE JSON"));
            chunks += usize::from(answer.text.len() > before);
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

/// The migrations counted on the head's `/metrics`, all reasons.
async fn migrations(http: &reqwest::Client, head: &Lumen) -> f64 {
    let text = http.get(format!("{}/metrics", head.url("api"))).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("lumen:request_migrations_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Kills (SIGKILL) the worker running the most requests; returns its id.
async fn kill_busiest(workers: &mut std::collections::BTreeMap<&'static str, Lumen>) -> &'static str {
    let mut busiest = ("", 0);
    for (&id, worker) in workers.iter() {
        let running = worker_stats(worker).await.1;
        if running > busiest.1 {
            busiest = (id, running);
        }
    }
    assert!(busiest.1 > 0, "no worker runs a request");
    let mut victim = workers.remove(busiest.0).expect("the victim");
    victim.child.kill().expect("SIGKILL");
    victim.child.wait().expect("the victim exits");
    busiest.0
}

fn assert_same(undisturbed: &[Answer], disturbed: &[Answer], specs: &[Spec]) {
    for ((before, after), spec) in undisturbed.iter().zip(disturbed).zip(specs) {
        assert!(before.errors.is_empty() && after.errors.is_empty(), "{spec:?}: {before:?} / {after:?}");
        assert_eq!(after.ids.len(), 1, "{spec:?}: one id for the whole answer: {:?}", after.ids);
        assert_eq!(after.usage, Some((before.usage.unwrap().0, u64::from(MAX_TOKENS))), "{spec:?}: usage");
        assert_eq!(after.finish.as_deref(), Some("length"), "{spec:?}");
        assert_eq!(after.tokens, before.tokens, "{spec:?}: token for token");
        assert_eq!(after.text, before.text, "{spec:?}: the same text");
        if spec.logprobs {
            assert_eq!(after.tokens.len(), MAX_TOKENS as usize, "{spec:?}: a log-probability per token");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_costs_no_request_and_changes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let (head, mut workers) = start_cluster(dir.path(), &["w1", "w2", "w3"], &["--migration-limit", "2"]).await;
    let http = reqwest::Client::new();
    let api = head.url("api");
    let progress = Arc::new(AtomicUsize::new(0));
    let specs: Vec<Spec> = (0..6)
        .map(|i| Spec { chat: i % 2 == 1, stream: true, seed: (i % 3 != 0).then_some(i as u64 + 7), logprobs: i != 5 })
        .collect();
    let lone = Spec { chat: false, stream: false, seed: Some(99), logprobs: true };
    let mut all = specs.clone();
    all.push(lone);
    let undisturbed = ask_all(&http, &api, &all, &progress).await;
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

    // A non-streamed request, its worker killed mid-generation.
    let before: u64 = futures::future::join_all(workers.values().map(worker_stats)).await.iter().map(|s| s.2).sum();
    let lone_task = tokio::spawn(ask(http.clone(), api.clone(), lone, all.len() - 1, progress.clone()));
    let workers_ref = &workers;
    until("the lone request is generating", Duration::from_secs(120), || async move {
        let stats = futures::future::join_all(workers_ref.values().map(worker_stats)).await;
        stats.iter().any(|s| s.1 > 0) && stats.iter().map(|s| s.2).sum::<u64>() >= before + 8
    })
    .await;
    kill_busiest(&mut workers).await;
    let answer = lone_task.await.expect("task");
    assert_same(&undisturbed[specs.len()..], &[answer], &[lone]);
    assert!(migrations(&http, &head).await > moved, "the non-streamed request moved");

    let records: Value = http
        .get(format!("{}/api/requests?limit=100", head.url("dashboard")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let migrated = records["requests"].as_array().unwrap().iter().filter(|r| r["migrations"].as_u64() > Some(0));
    assert!(migrated.clone().count() >= 2, "the request log shows the moves: {records}");
    assert!(migrated.clone().all(|r| r["status"] == 200 && r["finish_reason"] == "length"), "{records}");

    // The last worker dies under a stream: no replica is left, the client gets an error event.
    progress.store(0, Ordering::SeqCst);
    let last = Spec { chat: true, stream: true, seed: None, logprobs: false };
    let last_task = tokio::spawn(ask(http.clone(), api.clone(), last, 0, progress.clone()));
    until("the last stream has tokens", Duration::from_secs(120), || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) == 1 }
    })
    .await;
    kill_busiest(&mut workers).await;
    let answer = last_task.await.expect("task");
    assert_eq!(answer.errors.len(), 1, "an error event ends the stream: {answer:?}");
    assert_eq!(answer.finish, None, "it is not passed off as complete");
}
