//! What OpenAI clients rely on, checked against real `lumen serve` processes and the real model:
//! the official Python client (chat, completions and the Responses API), stop strings, seeds, usage counts that match the tokens produced,
//! the reasoning split, tool calls (the client assembling streamed calls, tool results rendered
//! through the template, refusals), and the 413/429 limits.

mod support;

use std::path::PathBuf;
use std::process::Command;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{Lumen, read_sse, run_python, serve_flags};

fn serve(extra: &[&str]) -> Lumen {
    Lumen::start(&serve_flags(extra))
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> Value {
    let resp = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{body}");
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    let lumen = serve(&["--api-key", "sekret"]);
    lumen.wait_healthy(&reqwest::Client::new()).await;
    let base_url = format!("{}/v1", lumen.url("api"));
    for script in ["openai_client.py", "openai_responses.py"] {
        run_python(script, &[&base_url, "sekret", "smol"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_seeds_usage_and_cached_tokens_follow_the_tokens_produced() {
    let lumen = serve(&["--enable-prompt-tokens-details"]);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let url = format!("{}/v1/completions", lumen.url("api"));
    let prompt = "Once upon a time, in a small village,";

    // Greedy: usage counts the tokens whose pieces make up the text.
    let r = post(&http, url.clone(), json!({"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 0, "ignore_eos": true})).await;
    let text = r["choices"][0]["text"].as_str().unwrap().to_string();
    let pieces: Vec<&str> =
        r["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(r["usage"]["completion_tokens"], 24);
    assert_eq!(pieces.len(), 24);
    assert_eq!(pieces.concat(), text);

    // A stop string taken from the middle of that text: the output ends right before it.
    let stop = pieces[6..].iter().find(|p| p.trim().chars().any(char::is_alphanumeric)).expect("a word piece").trim();
    let cut = text.find(stop).unwrap();
    let r = post(
        &http,
        url.clone(),
        json!({"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop]}),
    )
    .await;
    assert_eq!(r["choices"][0]["text"], text[..cut], "stop {stop:?} in {text:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() < 24);

    // Streamed, the same stop string gives the same text.
    let resp = http
        .post(url.clone())
        .json(&json!({"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop], "stream": true}))
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(resp).await;
    assert!(done);
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, text[..cut]);

    // Sampling with a seed is reproducible; other seeds give other text.
    let sampled = |seed: u64| {
        let body = json!({"model": "smol", "prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": true});
        let (http, url) = (http.clone(), url.clone());
        async move { post(&http, url, body).await["choices"][0]["text"].as_str().unwrap().to_string() }
    };
    let first = sampled(42).await;
    assert_eq!(sampled(42).await, first);
    let others = [sampled(43).await, sampled(44).await];
    assert!(others.iter().any(|o| *o != first), "three seeds, one text: {first:?}");

    // `usage.prompt_tokens_details.cached_tokens` (--enable-prompt-tokens-details): the prompt
    // tokens read from the prefix cache, i.e. every whole 16-token block before the prompt's last
    // token once the same prompt ran before, none under another `cache_salt`; streamed too.
    let long_prompt = "A quiet river runs past the mill, under the old stone bridge and into the hills. ".repeat(5);
    let cached = |extra: Value| {
        let mut body = json!({"model": "smol", "prompt": long_prompt, "max_tokens": 2, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (http, url) = (http.clone(), url.clone());
        async move {
            let usage = post(&http, url, body).await["usage"].clone();
            (usage["prompt_tokens"].as_u64().unwrap(), usage["prompt_tokens_details"]["cached_tokens"].as_u64())
        }
    };
    let (prompt_tokens, first) = cached(json!({})).await;
    let whole_blocks = (prompt_tokens - 1) / 16 * 16;
    assert!(whole_blocks >= 48, "a prompt of {prompt_tokens} tokens");
    assert_eq!(first, Some(0), "nothing of this prompt was cached before");
    assert_eq!(cached(json!({})).await, (prompt_tokens, Some(whole_blocks)));
    assert_eq!(cached(json!({"cache_salt": "team-b"})).await.1, Some(0), "another salt shares no block");
    assert_eq!(cached(json!({"cache_salt": "team-b"})).await.1, Some(whole_blocks));
    let resp = http
        .post(url.clone())
        .json(&json!({"model": "smol", "prompt": long_prompt, "max_tokens": 2, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(resp).await;
    assert!(done);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], whole_blocks, "{usage}");
    let chat_url = format!("{}/v1/chat/completions", lumen.url("api"));
    let chat = json!({"model": "smol", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2});
    post(&http, chat_url.clone(), chat.clone()).await;
    let usage = post(&http, chat_url, chat).await["usage"].clone();
    let chat_whole = (usage["prompt_tokens"].as_u64().unwrap() - 1) / 16 * 16;
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], chat_whole, "{usage}");
}

/// A template that opens a think block in the prompt, as DeepSeek-R1's does.
/// (The prompt's last newline is inside an expression: Jinja drops a template's final newline.)
const THINK_TEMPLATE: &str = r#"{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{{ '<|im_start|>assistant\n<think>\n' }}"#;

/// What the deepseek_r1 parser must make of a raw completion: (reasoning, content).
fn expected_split(raw: &str) -> (String, Option<String>) {
    match raw.split_once("</think>") {
        Some((reasoning, content)) => (reasoning.to_string(), Some(content.to_string())),
        None => (raw.to_string(), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_split_and_limits_answer_413_and_429() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("think.jinja");
    std::fs::write(&template, THINK_TEMPLATE).unwrap();
    let template = template.display().to_string();
    let lumen = serve(&[
        "--chat-template",
        &template,
        "--reasoning-parser",
        "deepseek_r1",
        "--max-ongoing-requests",
        "1",
        "--max-queued-requests",
        "0",
        "--max-body-size",
        "2KiB",
    ]);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let api = lumen.url("api");

    // The raw output after the rendered prompt, then the same through chat with the parser.
    let rendered = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n<think>\n";
    let raw = post(
        &http,
        format!("{api}/v1/completions"),
        json!({"model": "smol", "prompt": rendered, "max_tokens": 20, "temperature": 0}),
    )
    .await;
    let (reasoning, content) = expected_split(raw["choices"][0]["text"].as_str().unwrap());
    assert!(!reasoning.is_empty());
    let chat_body = json!({"model": "smol", "messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 20, "temperature": 0});
    let chat = post(&http, format!("{api}/v1/chat/completions"), chat_body.clone()).await;
    let message = &chat["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], reasoning);
    assert_eq!(message["content"].as_str().map(str::to_string), content);

    let mut stream_body = chat_body.clone();
    stream_body["stream"] = json!(true);
    let resp = http.post(format!("{api}/v1/chat/completions")).json(&stream_body).send().await.unwrap();
    let (events, done) = read_sse(resp).await;
    assert!(done);
    let streamed: String =
        events.iter().filter_map(|e| e["choices"][0]["delta"]["reasoning_content"].as_str()).collect();
    assert_eq!(streamed, reasoning);

    // 413: a body over --max-body-size.
    let big = json!({"model": "smol", "prompt": "x".repeat(4096)});
    let resp = http.post(format!("{api}/v1/completions")).json(&big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("2"), "{err}");

    // 429: one request in flight is the limit and none may queue.
    let long = json!({"model": "smol", "prompt": "Once", "max_tokens": 900, "ignore_eos": true, "stream": true});
    let resp = http.post(format!("{api}/v1/completions")).json(&long).send().await.unwrap();
    let mut occupant = resp.bytes_stream();
    occupant.next().await.expect("first chunk").expect("chunk");
    let resp = http
        .post(format!("{api}/v1/completions"))
        .json(&json!({"model": "smol", "prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let err: Value = resp.json().await.unwrap();
    assert!(err["error"]["message"].is_string() && err["error"]["type"].is_string(), "{err}");
    drop(occupant);
}

/// The raw completion of `messages` with `tools` rendered by the served template (greedy).
async fn raw_answer(http: &reqwest::Client, api: &str, messages: &Value, tools: &Value) -> String {
    let tokens =
        post(http, format!("{api}/tokenize"), json!({"model": "smol", "messages": messages, "tools": tools})).await;
    let prompt = tokens["tokens"].clone();
    let raw = post(
        http,
        format!("{api}/v1/completions"),
        json!({"model": "smol", "prompt": prompt, "max_tokens": 48, "temperature": 0}),
    )
    .await;
    raw["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_reach_the_official_openai_client_streamed_and_not() {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/pyenv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/tool_template.jinja");
    let template = template.display().to_string();
    let lumen = serve(&["--chat-template", &template, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let api = lumen.url("api");

    // What the model writes for the question (the template makes it copy a hermes call); the
    // chat answers must be that call, read by the parser.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let question = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let raw = raw_answer(&http, &api, &question, &tools).await;
    let call = raw
        .trim()
        .strip_prefix("<tool_call>")
        .and_then(|r| r.split_once("</tool_call>"))
        .map(|(call, _)| call.trim().to_string())
        .unwrap_or_else(|| panic!("the template did not make SmolLM2 call the tool: {raw:?}"));
    let call: Value = serde_json::from_str(&call).unwrap_or_else(|e| panic!("{e}: {raw:?}"));
    let (name, arguments) = (call["name"].as_str().unwrap(), call["arguments"].to_string());

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/openai_tools.py");
    let base_url = format!("{api}/v1");
    let out =
        Command::new(&python).arg(script).args([&base_url, "smol", name, &arguments]).output().expect("running python");
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A conversation with the call and its result renders both through the template.
    let history = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}
    ]);
    let tokens =
        post(&http, format!("{api}/tokenize"), json!({"model": "smol", "messages": history, "tools": tools})).await;
    let text = post(&http, format!("{api}/detokenize"), json!({"model": "smol", "tokens": tokens["tokens"]})).await;
    let text = text["prompt"].as_str().unwrap();
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    assert_eq!(text.matches(call).count(), 4, "three examples and the conversation's call: {text}");
    assert!(text.contains("tool\n22 C, sunny"), "{text}");
}
