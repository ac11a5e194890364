//! Per-tenant usage end to end, on one real head API server (a scripted backend behind it) and
//! its control server with an admin token: two tenants' real requests (answered, invalid,
//! refused by a limit or a model the key lacks, a stream failing midway, a stream whose client
//! goes away, cached prompt tokens) are counted per tenant, model and UTC day by `GET
//! /api/lumen/usage` exactly as by the `lumen_tenant_*` metrics; the endpoint needs the admin
//! token; bad query parameters answer the control API's error shape naming the parameter; days
//! are bucketed and selected by `start` / `end`, tenants and models by `tenant` / `model`.

mod api_support;

use std::time::Duration;

use api_support::*;
use lumen_head::api::ApiConfig;
use lumen_head::api::edge::usage::Outcome;
use lumen_head::backend::BackendError;
use lumen_head::clock::{date_of_day, utc_day};
use lumen_proto::v1 as pb;
use pb::generate_event::Event;
use serde_json::{Value, json};

const ADMIN: &str = "usage-admin-token";
const ALPHA_KEY: &str = "sk-alpha-usage-1111";
const BETA_KEY: &str = "sk-beta-usage-2222";

type Head = KeyedHead;

impl Head {
    async fn complete(&self, key: &str, model: &str, prompt: &str, max_tokens: i64) -> u16 {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens});
        self.post(key, "/v1/completions", body).await.status().as_u16()
    }

    /// `GET /api/lumen/usage?query` with `token` (none: no header).
    async fn usage(&self, query: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}/api/lumen/usage?{query}", self.control));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("usage")
    }

    async fn usage_json(&self, query: &str) -> Value {
        let response = self.usage(query, Some(ADMIN)).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }
}

async fn start() -> Head {
    let backend = FakeBackend::new(&["m", "m2"]);
    backend.script(|request| {
        let prompt = match &request.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => t.text.as_str(),
            _ => "",
        };
        match prompt {
            "fail" => Ok(vec![started(5), delta(0, "par"), Item::Fail(BackendError::Internal("engine bug".into()))]),
            "hang" => Ok(vec![started(5), delta(0, "Hello"), Item::Hang]),
            "cached" => {
                let mut items = hello_world(request)?;
                items.pop();
                items.push(Item::Event(Event::Finished(pb::Finished {
                    usage: Some(pb::Usage { prompt_tokens: 5, completion_tokens: 2, cached_tokens: 3 }),
                    timings: None,
                })));
                Ok(items)
            }
            _ => hello_world(request),
        }
    });
    let document = json!({"api_keys": [
        {"tenant": "alpha", "key": ALPHA_KEY},
        {"tenant": "beta", "key": BETA_KEY, "models": ["m"], "tokens_per_day": 1000},
    ]});
    serve_keyed(backend, ApiConfig::default(), document, ADMIN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_per_tenant_model_and_day() {
    let head = start().await;
    let first_day = utc_day();
    send_both_tenants_requests(&head).await;
    let last_day = utc_day();

    counts_match_the_requests(&head, first_day, last_day).await;
    the_metrics_agree(&head).await;
    the_admin_token_is_required(&head).await;
    bad_queries_answer_the_control_shape(&head).await;
    days_are_bucketed_and_selected(&head, last_day).await;
}

/// alpha: three answers on `m` (one with cached prompt tokens), a streamed answer on `m2`, one
/// invalid request. beta (only `m`, 1000 tokens a day): a stream failing midway, a stream its
/// client leaves, `m2` refused, a request over its budget, one answer.
async fn send_both_tenants_requests(head: &Head) {
    assert_eq!(head.complete(ALPHA_KEY, "m", "x", 4).await, 200);
    assert_eq!(head.complete(ALPHA_KEY, "m", "x", 4).await, 200);
    assert_eq!(head.complete(ALPHA_KEY, "m", "cached", 4).await, 200);
    let chat = json!({"model": "m2", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let streamed = head.post(ALPHA_KEY, "/v1/chat/completions", chat).await;
    assert_eq!(streamed.status(), 200);
    assert!(parse_sse(&streamed.text().await.unwrap()).done);
    assert_eq!(head.complete(ALPHA_KEY, "m", "x", -1).await, 400);

    let failing = head.post(BETA_KEY, "/v1/completions", json!({"model": "m", "prompt": "fail", "stream": true})).await;
    assert_eq!(failing.status(), 200, "the failure comes after the stream started");
    let sse = parse_sse(&failing.text().await.unwrap());
    assert!(sse.chunks.last().unwrap().get("error").is_some(), "{}", sse.raw);
    let dropped_before = head.backend.dropped();
    let mut hanging =
        head.post(BETA_KEY, "/v1/completions", json!({"model": "m", "prompt": "hang", "stream": true})).await;
    assert_eq!(hanging.status(), 200);
    assert!(hanging.chunk().await.unwrap().is_some(), "the stream started");
    drop(hanging);
    assert!(head.backend.wait_dropped(dropped_before + 1).await, "the abandoned request was aborted");
    assert_eq!(head.complete(BETA_KEY, "m2", "x", 4).await, 404, "beta may not use m2");
    assert_eq!(head.complete(BETA_KEY, "m", "x", 1500).await, 429, "over beta's daily budget");
    assert_eq!(head.complete(BETA_KEY, "m", "x", 4).await, 200);
}

/// Rows of `usage` summed per (tenant, model) over the days: the request counts by outcome, the
/// rejections by reason and the tokens.
fn summed(usage: &Value) -> Value {
    let mut sums = serde_json::Map::new();
    for row in usage["usage"].as_array().unwrap() {
        let key = format!("{}/{}", row["tenant"].as_str().unwrap(), row["model"].as_str().unwrap());
        let entry = sums.entry(key).or_insert_with(|| json!({}));
        let mut add = |name: String, n: &Value| {
            let total = entry.get(&name).and_then(Value::as_u64).unwrap_or(0) + n.as_u64().unwrap();
            if total > 0 {
                entry[name] = total.into();
            }
        };
        for group in ["requests", "rejections"] {
            for (name, n) in row[group].as_object().unwrap() {
                add(format!("{group}.{name}"), n);
            }
        }
        for name in ["prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens"] {
            add(name.to_string(), &row[name]);
        }
    }
    Value::Object(sums)
}

async fn counts_match_the_requests(head: &Head, first_day: u64, last_day: u64) {
    let expected = json!({
        "alpha/": {"requests.invalid": 1, "requests.total": 1},
        "alpha/m": {"requests.success": 3, "requests.total": 3, "prompt_tokens": 15, "completion_tokens": 6,
                    "cached_tokens": 3, "total_tokens": 21},
        "alpha/m2": {"requests.success": 1, "requests.total": 1, "prompt_tokens": 5, "completion_tokens": 2,
                     "total_tokens": 7},
        "beta/m": {"requests.success": 1, "requests.error": 1, "requests.cancelled": 1, "requests.rate_limited": 1,
                   "requests.total": 4, "rejections.quota": 1, "prompt_tokens": 15, "completion_tokens": 4,
                   "total_tokens": 19},
        "beta/m2": {"requests.invalid": 1, "requests.total": 1, "rejections.model": 1},
    });
    // A stream counts when its body is dropped, just after its client read the end: wait for it.
    let mut usage = Value::Null;
    for _ in 0..100 {
        usage = head.usage_json("").await;
        if summed(&usage) == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(summed(&usage), expected, "{usage:#}");
    let dates = [date_of_day(first_day), date_of_day(last_day)];
    for row in usage["usage"].as_array().unwrap() {
        assert!(dates.contains(&row["date"].as_str().unwrap().to_string()), "{row}");
    }
    assert_eq!(usage["retention_days"], 31);
    assert_eq!((&usage["start"], &usage["end"], &usage["tenant"]), (&Value::Null, &Value::Null, &Value::Null));
}

async fn the_metrics_agree(head: &Head) {
    let metrics = head.http.get(head.api.at("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |name: &str, labels: &[&str]| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
    };
    let requests = |tenant: &str, outcome: Outcome| {
        count(
            "lumen_tenant_requests_total",
            &[&format!("tenant=\"{tenant}\""), &format!("outcome=\"{}\"", outcome.label())],
        )
    };
    assert_eq!(requests("beta", Outcome::Success), 1, "a stream that failed midway is no success");
    assert_eq!(requests("beta", Outcome::Error), 1);
    assert_eq!(requests("beta", Outcome::Cancelled), 1);
    assert_eq!(requests("alpha", Outcome::Success), 4);
    assert_eq!(count("lumen_tenant_cached_tokens_total", &["tenant=\"alpha\""]), 3);
    assert_eq!(count("lumen_tenant_prompt_tokens_total", &["tenant=\"beta\""]), 15);
}

async fn the_admin_token_is_required(head: &Head) {
    for token in [None, Some("wrong"), Some(ALPHA_KEY)] {
        let refused = head.usage("", token).await;
        assert_eq!(refused.status(), 401, "{token:?}");
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        let body: Value = refused.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("admin token"), "{body}");
    }
}

async fn bad_queries_answer_the_control_shape(head: &Head) {
    let cases = [
        ("start=yesterday", "start"),
        ("start=2026-02-30", "start"),
        ("end=2026-13-01", "end"),
        ("start=2026-03-02&end=2026-03-01", "end"),
        ("tenant=alpha&tenant=beta", "tenant"),
        ("day=2026-03-01", "day"),
    ];
    for (query, field) in cases {
        let response = head.usage(query, Some(ADMIN)).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["field"], field, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with(field), "{query}: {body}");
    }
}

async fn days_are_bucketed_and_selected(head: &Head, today: u64) {
    // Three days ago, as the ledger would have counted it then.
    let earlier = today - 3;
    head.api.state.usage().add(earlier, "alpha", "m", |c| {
        c.requests[Outcome::Success as usize] += 7;
        c.tokens.prompt += 70;
    });
    let rows = |usage: &Value| -> Vec<(String, String, String)> {
        usage["usage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap().to_string();
                (s("date"), s("tenant"), s("model"))
            })
            .collect()
    };
    let day = date_of_day(earlier);
    let only_then = head.usage_json(&format!("start={day}&end={day}")).await;
    assert_eq!(rows(&only_then), [(day.clone(), "alpha".into(), "m".into())]);
    assert_eq!(only_then["usage"][0]["requests"]["success"], 7);
    assert_eq!(only_then["usage"][0]["prompt_tokens"], 70);
    assert_eq!((&only_then["start"], &only_then["end"]), (&json!(day), &json!(day)));

    let everything = head.usage_json("").await;
    assert_eq!(rows(&everything)[0], (day.clone(), "alpha".into(), "m".into()), "oldest day first");
    let since = head.usage_json(&format!("start={}", date_of_day(earlier + 1))).await;
    assert_eq!(rows(&since).len(), rows(&everything).len() - 1);
    assert!(rows(&since).iter().all(|(date, _, _)| *date != day));

    let beta_m2 = head.usage_json("tenant=beta&model=m2").await;
    assert!(rows(&beta_m2).iter().all(|(_, t, m)| t == "beta" && m == "m2"));
    assert!(!rows(&beta_m2).is_empty());
    let unknown_model = head.usage_json("model=").await;
    assert!(rows(&unknown_model).iter().all(|(_, t, m)| t == "alpha" && m.is_empty()), "{unknown_model}");
}
