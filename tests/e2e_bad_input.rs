//! Bad input against one real `lumen serve` (SmolLM2 from a serve config, `--state-dir`,
//! `--api-key`), as a careless operator and a careless client would send it:
//! - every serve-config rule (`head/tests/fixtures/serve_config_rules.json`, the table the head's
//!   unit tests check too) is refused with a 400 naming the field, while a stream is running; the
//!   stream then finishes whole, and the application, its replica and the state directory are
//!   exactly as before. `lumen deploy` shows the same message without reaching any head;
//! - the OpenAI port's type and range rules answer 400 naming the parameter; a body not declared
//!   JSON is a 415, a wrong method a 405 and an unknown route a 404, all in OpenAI's error shape;
//!   `bearer` in lower case is a valid scheme;
//! - port 8265 answers every error as `{"error": ...}`.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{Lumen, serve_flags};

const KEY: &str = "k3y";

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("head/tests/fixtures/serve_config_rules.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the rules fixture")).expect("fixture JSON")
}

/// Every file of the state directory and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("state dir")
        .map(|e| e.expect("entry").path())
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect()
}

/// What must not change: the applications as deployed (config, time) and their replicas' ids and states.
fn serving(status: &Value) -> Value {
    let app = &status["applications"]["chat"];
    let replicas: Vec<Value> = app["deployments"]["llm"]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| json!([r["replica_id"], r["state"]]))
        .collect();
    json!({"apps": status["applications"].as_object().map(|a| a.len()), "config": app["deployed_app_config"],
           "time": app["last_deployed_time_s"], "status": app["status"], "replicas": replicas})
}

async fn status(http: &reqwest::Client, control: &str) -> Value {
    http.get(format!("{control}/api/serve/applications/")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_configs_change_nothing_while_a_stream_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (state, config) = (dir.path().join("state"), dir.path().join("serve.json"));
    let mut good = fixture()["base"].clone();
    good["applications"][0]["deployments"][0]["model"] = json!({"source": support::model_path(),
        "served_model_name": "smol", "threads": 2, "max_model_len": 1024, "kv_cache_memory": "64MiB"});
    std::fs::write(&config, good.to_string()).unwrap();
    let (config_arg, state_arg) = (config.display().to_string(), state.display().to_string());
    let lumen = Lumen::start(&serve_flags(&["--config", &config_arg, "--state-dir", &state_arg, "--api-key", KEY]));
    let (http, control, api) = (reqwest::Client::new(), lumen.url("dashboard"), lumen.url("api"));
    let before = status(&http, &control).await;
    assert_eq!(before["applications"]["chat"]["status"], "RUNNING", "{before:#}");
    let stored = files(&state);

    // A long stream, in flight while every bad config arrives.
    let body = json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}, "user": "u-1"});
    let stream = http.post(format!("{api}/v1/completions")).bearer_auth(KEY).json(&body).send().await.expect("stream");
    assert_eq!(stream.status(), 200);
    let mut stream = stream.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("bytes");
    let reader = tokio::spawn(async move {
        let mut text = String::from_utf8_lossy(&first).into_owned();
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("stream bytes")));
        }
        (text, Instant::now())
    });

    let url = format!("{control}/api/serve/applications/");
    let fixture = fixture();
    for case in fixture["cases"].as_array().unwrap() {
        let rule = case["rule"].as_str().unwrap();
        let r = http.put(&url).json(&case["document"]).send().await.expect("PUT");
        assert_eq!(r.status(), 400, "{rule}");
        let error: Value = r.json().await.expect("a JSON error");
        let message = error["error"].as_str().unwrap_or_else(|| panic!("{rule}: {error}"));
        assert_eq!(error.get("field").and_then(Value::as_str).unwrap_or(""), case["field"], "{rule}: {error}");
        assert!(message.contains(case["says"].as_str().unwrap()), "{rule}: {message}");
    }
    let refused_all = Instant::now();
    // `lumen deploy` checks a file with the same code before sending: the same message, although
    // nothing listens at the address it was given.
    for case in &fixture["cases"].as_array().unwrap()[..4] {
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, case["document"].to_string()).unwrap();
        let expected = http.put(&url).json(&case["document"]).send().await.unwrap().json::<Value>().await.unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(["deploy", &file.display().to_string(), "--address", "http://127.0.0.1:9"])
            .output()
            .expect("lumen deploy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(expected["error"].as_str().unwrap()), "{stderr} vs {expected}");
        assert!(!stderr.contains("cannot reach"), "{stderr}");
    }

    // The stream ran on through all of it, and finishes whole.
    let (text, ended) = reader.await.expect("the stream reader");
    assert!(ended > refused_all, "the stream was still running when the last config was refused");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"completion_tokens\":600"), "all 600 tokens came: {text}");
    let after = status(&http, &control).await;
    assert_eq!(serving(&after), serving(&before), "{after:#}");
    assert_eq!(files(&state), stored, "the state directory is untouched");
    let r = http
        .post(format!("{api}/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "smol", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the model still serves");
}

/// POSTs `body` to `path` with the key and returns the status and JSON body.
async fn post(http: &reqwest::Client, api: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = http.post(format!("{api}{path}")).bearer_auth(KEY).json(body).send().await.expect("request");
    (r.status().as_u16(), r.json().await.expect("a JSON body"))
}

fn assert_openai_error(body: &Value, kind: &str) {
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_port_refuses_wrong_types_and_ranges_by_name_in_one_error_shape() {
    let lumen = Lumen::start(&serve_flags(&["--api-key", KEY]));
    let (http, api, control) = (reqwest::Client::new(), lumen.url("api"), lumen.url("dashboard"));
    let chat = |extra: Value| {
        let mut body = json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let completion = |extra: Value| {
        let mut body = json!({"model": "smol", "prompt": "hi", "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        ("/v1/chat/completions", chat(json!({"temperature": 2.5})), "temperature", "in [0, 2], got 2.5"),
        ("/v1/chat/completions", chat(json!({"temperature": "hot"})), "temperature", "invalid type"),
        ("/v1/chat/completions", chat(json!({"top_p": 0})), "top_p", "got 0"),
        ("/v1/chat/completions", chat(json!({"n": 0})), "n", "at least 1, got 0"),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 4294967296u64})),
            "max_tokens",
            "at most 4294967295, got 4294967296",
        ),
        ("/v1/chat/completions", chat(json!({"max_tokens": 1024})), "max_tokens", "the context is 1024 tokens"),
        ("/v1/chat/completions", chat(json!({"user": 5})), "user", "must be a string"),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": "hi", "name": 7}]})),
            "messages[0].name",
            "must be a string",
        ),
        ("/v1/chat/completions", chat(json!({"stream": "yes"})), "stream", "invalid type"),
        ("/v1/chat/completions", chat(json!({"logprobs": 1})), "logprobs", "invalid type"),
        (
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
            "at most 20, got 21",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"prompt_logprobs": 1, "stream": true})),
            "prompt_logprobs",
            "not available when stream",
        ),
        ("/v1/chat/completions", chat(json!({"prompt_logprobs": -2})), "prompt_logprobs", "got -2"),
        ("/v1/chat/completions", chat(json!({"use_beam_search": true})), "use_beam_search", "not supported"),
        ("/v1/chat/completions", chat(json!({"chat_template": "{{ x }}"})), "chat_template", "not supported"),
        ("/v1/chat/completions", chat(json!({"seed": 1.5})), "seed", "got 1.5"),
        ("/v1/chat/completions", chat(json!({"priority": 3})), "priority", "Priority scheduling is not enabled"),
        ("/v1/completions", completion(json!({"priority": -1})), "priority", "--scheduling-policy priority"),
        ("/v1/chat/completions", chat(json!({"priority": "high"})), "priority", "invalid type"),
        ("/v1/chat/completions", chat(json!({"stop": [1]})), "stop", "strings"),
        ("/v1/completions", completion(json!({"echo": "yes"})), "echo", "invalid type"),
        ("/v1/completions", completion(json!({"logprobs": 30})), "logprobs", "at most 20, got 30"),
        ("/v1/completions", completion(json!({"prompt": [-1]})), "prompt", "-1"),
        ("/v1/completions", completion(json!({"best_of": 2})), "best_of", "not supported"),
        ("/v1/completions", completion(json!({"min_tokens": 5})), "min_tokens", "must not exceed max_tokens (2)"),
        ("/tokenize", json!({"model": "smol", "prompt": 5}), "prompt", "invalid type"),
        (
            "/tokenize",
            json!({"model": "smol", "prompt": "hi", "return_token_strs": "yes"}),
            "return_token_strs",
            "invalid type",
        ),
        (
            "/tokenize",
            json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "chat_template": "x"}),
            "chat_template",
            "not supported",
        ),
        ("/detokenize", json!({"model": "smol", "tokens": ["a"]}), "tokens[0]", "invalid type"),
        ("/detokenize", json!({"model": "smol", "tokens": [-1]}), "tokens", "-1"),
    ];
    for (path, body, param, says) in cases {
        let (status, reply) = post(&http, &api, path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {reply}");
        assert_openai_error(&reply, "invalid_request_error");
        assert_eq!(reply["error"]["param"], param, "{path} {body}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(says), "{path} {body}: {reply}");
    }
    // Fields vLLM accepts, at their inert values, are served.
    let (status, reply) = post(
        &http,
        &api,
        "/v1/chat/completions",
        &chat(json!({"user": "u-1", "temperature": 2,
        "use_beam_search": false, "priority": 0, "cache_salt": "team-a",
        "messages": [{"role": "user", "content": "hi", "name": "ann"}]})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");

    // Not JSON, wrong method, unknown route: OpenAI's error shape with the matching status.
    let valid = completion(json!({})).to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut request = http.post(format!("{api}/v1/completions")).bearer_auth(KEY).body(valid.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
        assert_openai_error(&r.json().await.unwrap(), "invalid_request_error");
    }
    let r = http.get(format!("{api}/v1/chat/completions")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_openai_error(&r.json().await.unwrap(), "invalid_request_error");
    let r = http.get(format!("{api}/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().await.unwrap(), "not_found_error");

    // The bearer scheme in any case; another scheme is a 401.
    for (header, expected) in
        [(format!("bearer {KEY}"), 200), (format!("BEARER {KEY}"), 200), (format!("Basic {KEY}"), 401)]
    {
        let r = http.get(format!("{api}/v1/models")).header("authorization", header.clone()).send().await.unwrap();
        assert_eq!(r.status(), expected, "{header}");
    }

    // Port 8265: every error is a JSON body with a message.
    for (method, path, expected) in [
        (reqwest::Method::GET, "/api/nothing", 404),
        (reqwest::Method::POST, "/api/serve/applications/", 405),
        (reqwest::Method::GET, "/dashboard/missing.js", 404),
        (reqwest::Method::GET, "/api/requests?limit=many", 400),
    ] {
        let r = http.request(method.clone(), format!("{control}{path}")).send().await.unwrap();
        assert_eq!(r.status(), expected, "{method} {path}");
        let body: Value = r.json().await.unwrap_or_else(|_| panic!("{method} {path}: not JSON"));
        assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {body}");
    }
    let r = http.put(format!("{control}/api/serve/applications/")).body(vec![b' '; 3 << 20]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
}
