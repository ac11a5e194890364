//! Named API keys end to end, on one real head API server (a scripted backend behind it) and its
//! control server: each key's limits answer 429 in OpenAI's shape with its `x-ratelimit-*`
//! headers at the right count, token reservations settle on the real usage, the concurrency slot
//! comes back when a stream ends and when its client goes away, an exhausted daily budget is
//! `insufficient_quota`, a key sees only its models and runs at its priority, keys are replaced
//! live through the control API with the admin token, and no key appears in the logs or
//! `/metrics`, where the per-tenant counters are.

mod api_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_support::*;
use lumen_head::api::ApiConfig;
use lumen_head::backend::{ModelCard, Runner};
use lumen_proto::v1 as pb;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-not-a-key";
const FLAG_KEY: &str = "sk-flag-secret-0000";
const RPM_KEY: &str = "sk-rpm-secret-1111";
const TPM_KEY: &str = "sk-tpm-secret-2222";
const CONC_KEY: &str = "sk-conc-secret-3333";
const BUDGET_KEY: &str = "sk-budget-secret-4444";
const SCOPED_KEY: &str = "sk-scoped-secret-5555";
const EMBED_KEY: &str = "sk-embed-secret-6666";
const FRESH_KEY: &str = "sk-fresh-secret-7777";
const ALL_KEYS: &[&str] = &[FLAG_KEY, RPM_KEY, TPM_KEY, CONC_KEY, BUDGET_KEY, SCOPED_KEY, EMBED_KEY, FRESH_KEY];

/// Everything the process logs, at debug level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Head = KeyedHead;

impl Head {
    async fn complete(&self, key: &str, prompt: &str, max_tokens: u32) -> reqwest::Response {
        self.post(key, "/v1/completions", json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens})).await
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_string())
}

/// Asserts a 429 in OpenAI's shape of `kind` with `code`, and returns its body.
async fn assert_limited(response: reqwest::Response, kind: &str, code: &str) -> Value {
    assert_eq!(response.status(), 429);
    let retry: u64 = header(&response, "retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    body
}

async fn start(logs: Logs) -> Head {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || logs.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
    let backend =
        FakeBackend::with_cards(vec![card("m"), card("m2"), ModelCard { runner: Runner::Pooling, ..card("e") }]);
    backend.script(|request| {
        let hang = matches!(&request.prompt, Some(pb::generate_request::Prompt::Text(t)) if t.text == "hang");
        if hang {
            return Ok(vec![started(5), delta(0, "Hello"), Item::Hang]);
        }
        embedded_or_hello(request)
    });
    let config = ApiConfig { api_keys: vec![FLAG_KEY.into()], ..ApiConfig::default() };
    let document = json!({"api_keys": [
        {"tenant": "rpm", "key": RPM_KEY, "requests_per_minute": 3},
        {"tenant": "tpm", "key": TPM_KEY, "tokens_per_minute": 100},
        {"tenant": "conc", "key": CONC_KEY, "max_concurrent_requests": 1},
        {"tenant": "budget", "key": BUDGET_KEY, "tokens_per_day": 60},
        {"tenant": "scoped", "key": SCOPED_KEY, "models": ["m"], "priority": 5},
        {"tenant": "embed", "key": EMBED_KEY, "tokens_per_minute": 10},
    ]});
    serve_keyed(backend, config, document, ADMIN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_keys_limit_each_tenant_and_never_leak() {
    let logs = Logs::default();
    let head = start(logs.clone()).await;

    requests_per_minute(&head).await;
    tokens_per_minute_settle_on_usage(&head).await;
    concurrency_slots_come_back(&head).await;
    daily_budget(&head).await;
    models_and_priority(&head).await;
    embeddings_count_input_tokens(&head).await;
    keys_replaced_live(&head).await;

    let metrics = head.http.get(head.api.at("/metrics")).send().await.unwrap().text().await.unwrap();
    let captured = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(captured.contains("refused by the key's limits"), "the logs were captured");
    for key in ALL_KEYS {
        assert!(!metrics.contains(key), "{key} in /metrics");
        assert!(!captured.contains(key), "{key} in the logs");
    }
    let count = |name: &str, labels: &[&str]| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
    };
    assert_eq!(count("lumen_tenant_requests_total", &["tenant=\"rpm\"", "outcome=\"success\""]), 3);
    assert!(count("lumen_tenant_requests_total", &["tenant=\"rpm\"", "outcome=\"rate_limited\""]) >= 1);
    assert_eq!(count("lumen_tenant_rejections_total", &["tenant=\"budget\"", "reason=\"quota\""]), 3);
    assert_eq!(count("lumen_tenant_rejections_total", &["tenant=\"scoped\"", "reason=\"model\""]), 1);
    assert!(count("lumen_tenant_rejections_total", &["tenant=\"conc\"", "reason=\"concurrency\""]) >= 1);
    assert_eq!(count("lumen_tenant_prompt_tokens_total", &["tenant=\"budget\""]), 8 * 5);
    assert_eq!(count("lumen_tenant_generation_tokens_total", &["tenant=\"budget\""]), 8 * 2);
    assert_eq!(count("lumen_tenant_requests_total", &["tenant=\"default\"", "outcome=\"success\""]), 2);
}

async fn requests_per_minute(head: &Head) {
    for remaining in ["2", "1", "0"] {
        let response = head.complete(RPM_KEY, "x", 4).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests").as_deref(), Some("3"));
        assert_eq!(header(&response, "x-ratelimit-remaining-requests").as_deref(), Some(remaining));
        assert!(header(&response, "x-ratelimit-reset-requests").is_some());
        assert!(header(&response, "x-ratelimit-limit-tokens").is_none(), "no token limit on this key");
    }
    let response = head.complete(RPM_KEY, "x", 4).await;
    assert_eq!(header(&response, "x-ratelimit-remaining-requests").as_deref(), Some("0"));
    let reset = header(&response, "x-ratelimit-reset-requests").unwrap();
    assert!(reset.ends_with('s') && reset.len() >= 2, "{reset}");
    let retry: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "3 per minute: one every 20 s ({retry})");
    let body = assert_limited(response, "requests", "rate_limit_exceeded").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("requests per min (RPM): Limit 3, Used 3, Requested 1"), "{message}");
    // Without a key, or with a wrong one: 401, as before.
    let anonymous = head.http.post(head.api.at("/v1/completions")).json(&json!({"model": "m"})).send().await;
    assert_eq!(anonymous.unwrap().status(), 401);
    assert_eq!(head.complete("sk-rpm-secret-111", "x", 4).await.status(), 401);
    // `--api-key` still works, without limits or their headers.
    let flagged = head.complete(FLAG_KEY, "x", 4).await;
    assert_eq!(flagged.status(), 200);
    assert!(header(&flagged, "x-ratelimit-limit-requests").is_none());
}

async fn tokens_per_minute_settle_on_usage(head: &Head) {
    // Reserves 1 + 90 of 100; uses 5 + 2.
    let first = head.complete(TPM_KEY, "x", 90).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens").as_deref(), Some("100"));
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens").as_deref(), Some("9"));
    // Admitted only because the first gave back the 84 it reserved and did not use.
    let second = head.complete(TPM_KEY, "x", 90).await;
    assert_eq!(second.status(), 200, "{}", second.text().await.unwrap());
    let too_large = head.complete(TPM_KEY, "x", 200).await;
    let body = assert_limited(too_large, "tokens", "rate_limit_exceeded").await;
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Request too large"), "{body}");
    // 14 used of 100 (plus a little refill): 96 more do not fit.
    let refused = head.complete(TPM_KEY, "x", 95).await;
    let remaining: u64 = header(&refused, "x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!((86..96).contains(&remaining), "{remaining}");
    assert!(header(&refused, "x-ratelimit-reset-tokens").is_some());
    let body = assert_limited(refused, "tokens", "rate_limit_exceeded").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("tokens per min (TPM): Limit 100"), "{body}");
    // A stream settles too: it used 7, so the bucket is not left short of its 91.
    let (status, sse) = stream_with(head, TPM_KEY, json!({"model": "m", "prompt": "x", "max_tokens": 80})).await;
    assert_eq!((status, sse.done), (200, true));
    let after = head.complete(TPM_KEY, "x", 70).await;
    assert_eq!(after.status(), 200, "the stream's unused reservation came back");
}

async fn stream_with(head: &Head, key: &str, mut body: Value) -> (u16, Sse) {
    body["stream"] = json!(true);
    let response = head.post(key, "/v1/completions", body).await;
    let status = response.status().as_u16();
    (status, parse_sse(&response.text().await.unwrap()))
}

/// Retries `request` until it answers 200 (up to 5 s): a slot is freed once the server has
/// noticed the end of the request holding it.
async fn eventually_ok(head: &Head, key: &str) {
    for _ in 0..100 {
        if head.complete(key, "x", 4).await.status() == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the concurrency slot never came back");
}

async fn concurrency_slots_come_back(head: &Head) {
    // A stream that ends frees its slot.
    for _ in 0..3 {
        let (status, sse) = stream_with(head, CONC_KEY, json!({"model": "m", "prompt": "x"})).await;
        assert_eq!((status, sse.done), (200, true));
    }
    // A stream that hangs holds it; its client going away frees it.
    let dropped_before = head.backend.dropped();
    let mut hanging =
        head.post(CONC_KEY, "/v1/completions", json!({"model": "m", "prompt": "hang", "stream": true})).await;
    assert_eq!(hanging.status(), 200);
    assert!(hanging.chunk().await.unwrap().is_some(), "the stream started");
    let refused = head.complete(CONC_KEY, "x", 4).await;
    let body = assert_limited(refused, "requests", "rate_limit_exceeded").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("concurrent requests: Limit 1"), "{body}");
    drop(hanging);
    assert!(head.backend.wait_dropped(dropped_before + 1).await, "the request was aborted");
    eventually_ok(head, CONC_KEY).await;
}

async fn daily_budget(head: &Head) {
    // Each request reserves 1 + 10 and uses 7 of the 60 a day: 8 fit (7 * 7 + 11 = 60).
    let mut admitted = 0;
    let refused = loop {
        let response = head.complete(BUDGET_KEY, "x", 10).await;
        if response.status() != 200 {
            break response;
        }
        admitted += 1;
        assert!(admitted < 20, "the budget never ran out");
    };
    assert_eq!(admitted, 8, "usage settles on what was used, not on what was reserved");
    let retry: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!(retry <= 86_400, "until UTC midnight: {retry}");
    let body = assert_limited(refused, "insufficient_quota", "insufficient_quota").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("quota"), "{body}");
}

async fn models_and_priority(head: &Head) {
    let response = head.post(SCOPED_KEY, "/v1/completions", json!({"model": "m2", "prompt": "x"})).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["message"], "The model `m2` does not exist or you do not have access to it.");
    let models: Value =
        head.http.get(head.api.at("/v1/models")).bearer_auth(SCOPED_KEY).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m"]);
    let priority_sent = |asked: Option<i64>| async move {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let Some(p) = asked {
            body["priority"] = json!(p);
        }
        assert_eq!(head.post(SCOPED_KEY, "/v1/chat/completions", body).await.status(), 200);
        head.backend.requests().last().unwrap().1.priority
    };
    assert_eq!(priority_sent(None).await, 5, "the key's priority by default");
    assert_eq!(priority_sent(Some(1)).await, 5, "no better than the key's");
    assert_eq!(priority_sent(Some(8)).await, 8, "worse is allowed");
}

async fn embeddings_count_input_tokens(head: &Head) {
    let embed = |input: &str| head.post(EMBED_KEY, "/v1/embeddings", json!({"model": "e", "input": input}));
    // 20 bytes: about 5 tokens of the 10 a minute.
    assert_eq!(embed(&"a".repeat(20)).await.status(), 200);
    let body = assert_limited(embed(&"a".repeat(60)).await, "tokens", "rate_limit_exceeded").await;
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Request too large"), "{body}");
}

async fn keys_replaced_live(head: &Head) {
    let url = format!("{}/api/lumen/keys", head.control);
    let document = json!({"api_keys": [
        {"tenant": "fresh", "key": FRESH_KEY, "requests_per_minute": 100, "weight": 4},
        {"tenant": "budget", "key": BUDGET_KEY, "tokens_per_day": 60},
    ]});
    let unauthorized = head.http.put(&url).json(&document).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(head.complete(FRESH_KEY, "x", 4).await.status(), 401, "nothing changed");
    let broken = json!({"api_keys": [{"tenant": "fresh", "key": FRESH_KEY, "requests_per_minute": 0}]});
    let refused = head.http.put(&url).bearer_auth(ADMIN).json(&broken).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["field"], "api_keys[0].requests_per_minute", "{body}");
    assert_eq!(head.complete(FRESH_KEY, "x", 4).await.status(), 401, "a refused table changes nothing");
    let heavy = json!({"api_keys": [{"tenant": "fresh", "key": FRESH_KEY, "weight": 0}]});
    let refused = head.http.put(&url).bearer_auth(ADMIN).json(&heavy).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["field"], "api_keys[0].weight", "{body}");
    assert!(body["error"].as_str().unwrap().contains("from 1 to 10000"), "{body}");

    let applied = head.http.put(&url).bearer_auth(ADMIN).json(&document).send().await.unwrap();
    assert_eq!(applied.status(), 200);
    let response = head.complete(FRESH_KEY, "x", 4).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ratelimit-limit-requests").as_deref(), Some("100"));
    assert_eq!(head.complete(RPM_KEY, "x", 4).await.status(), 401, "the old key is gone");
    assert_eq!(head.complete(FLAG_KEY, "x", 4).await.status(), 200, "--api-key stays");
    // A tenant that stays keeps what it used: a new table is no way around a budget.
    let still = head.complete(BUDGET_KEY, "x", 10).await;
    assert_limited(still, "insufficient_quota", "insufficient_quota").await;

    assert_eq!(head.http.get(&url).send().await.unwrap().status(), 401, "the listing needs the admin token");
    let listed = head.http.get(&url).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    let listing: Value = serde_json::from_str(&listed).unwrap();
    let tenants: Vec<&str> =
        listing["api_keys"].as_array().unwrap().iter().map(|k| k["tenant"].as_str().unwrap()).collect();
    assert_eq!(tenants, ["default", "fresh", "budget"]);
    assert!(listing["api_keys"][1]["fingerprint"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(listing["api_keys"][1]["requests_per_minute"], 100);
    let weights: Vec<&Value> = listing["api_keys"].as_array().unwrap().iter().map(|k| &k["weight"]).collect();
    assert_eq!(weights, [1, 4, 1], "a key's weight, 1 when not given");
    for key in ALL_KEYS {
        assert!(!listed.contains(key), "{key} listed");
    }

    // The serve config's `api_keys:` section, through Ray's route, replaces them too.
    let serve = json!({"applications": [], "api_keys": [{"tenant": "fresh", "key": FRESH_KEY}]});
    let applications = format!("{}/api/serve/applications/", head.control);
    let bad = json!({"applications": [], "api_keys": [{"tenant": "x y", "key": "k"}]});
    let refused = head.http.put(&applications).bearer_auth(ADMIN).json(&bad).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(head.complete(BUDGET_KEY, "x", 4).await.status(), 429, "a refused config changes no key");
    let applied = head.http.put(&applications).bearer_auth(ADMIN).json(&serve).send().await.unwrap();
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
    assert_eq!(head.complete(BUDGET_KEY, "x", 4).await.status(), 401);
    let fresh = head.complete(FRESH_KEY, "x", 4).await;
    assert_eq!(fresh.status(), 200);
    assert!(header(&fresh, "x-ratelimit-limit-requests").is_none(), "its limits went with the old table");
}
