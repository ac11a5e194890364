//! Property tests (proptest) of request parsing and validation over real HTTP (fake backend):
//! whatever body arrives at `/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
//! `/tokenize` or `/v1/embeddings` (on a server whose model `m` is served for pooling) — arbitrary
//! bytes, arbitrary JSON, or OpenAI-shaped objects whose known fields hold arbitrary JSON — the
//! server answers (never drops the connection or panics), and anything but a 2xx is OpenAI's
//! error body.
//!
//! The suite runs a bounded number of cases per target (64); a longer run:
//! `PROPTEST_CASES=20000 cargo test --release -p lumen-head --test fuzz_request_bodies`.

mod api_support;
mod fuzz_support;

use api_support::*;
use fuzz_support::{json_value, runner};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

const ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize"];

/// Fields the routes read, so that generated objects reach validation rather than stopping at
/// "messages is required".
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "echo",
    "min_tokens",
    "presence_penalty",
    "repetition_penalty",
    "chat_template_kwargs",
    "add_generation_prompt",
    // Constraints and tools (compiled by the worker; the head checks their shape).
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "prompt_logprobs",
    // The Responses API's own.
    "input",
    "instructions",
    "text",
    "max_output_tokens",
    "previous_response_id",
    "store",
    // Embeddings' own (`input` above).
    "encoding_format",
    "dimensions",
    "truncate_prompt_tokens",
    "add_special_tokens",
    "normalize",
    "embed_dtype",
    "endianness",
    "user",
];

/// Words the routes look for, as strings and keys.
const WORDS: &[&str] = &[
    "m",
    "user",
    "role",
    "content",
    "type",
    "function",
    "name",
    "json_schema",
    "schema",
    "json",
    "message",
    "float",
    "base64",
    "float32",
];

/// An object with some of the routes' fields set to arbitrary JSON.
fn request_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), json_value(WORDS)), 0..8).prop_map(|fields| {
        let mut object: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // Usually a valid model and message list, so the other fields get validated.
        object.entry("model").or_insert_with(|| Value::String("m".into()));
        Value::Object(object)
    })
}

/// Posts `body` and checks the answer's contract.
async fn check(server: &Server, path: &str, body: Vec<u8>) -> Result<(), TestCaseError> {
    let response = server
        .client
        .post(server.at(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer from {path}: {e}")))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| TestCaseError::fail(format!("body of {path}: {e}")))?;
    if status.is_success() {
        prop_assert!(!text.is_empty(), "{path}: empty 2xx body");
        return Ok(());
    }
    prop_assert!(status.is_client_error(), "{path}: {status} {text}");
    let reply: Value =
        serde_json::from_str(&text).map_err(|_| TestCaseError::fail(format!("{path}: {status} not JSON: {text}")))?;
    prop_assert!(reply["error"]["type"].is_string() && reply["error"]["message"].is_string(), "{path}: {reply}");
    prop_assert!(reply["error"].get("param").is_some(), "{path}: {reply}");
    Ok(())
}

/// Runs `strategy`'s cases against every route of a fresh server.
fn fuzz<S: Strategy>(strategy: S, to_bytes: impl Fn(&S::Value) -> Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (_backend, server) = runtime.block_on(serve_default());
    let pooling = runtime.block_on(async {
        let card = lumen_head::backend::ModelCard { runner: lumen_head::backend::Runner::Pooling, ..card("m") };
        serve(FakeBackend::with_cards(vec![card]), lumen_head::api::ApiConfig::default()).await
    });
    runner()
        .run(&strategy, |value| {
            let body = to_bytes(&value);
            runtime.block_on(async {
                for path in ROUTES {
                    check(&server, path, body.clone()).await?;
                }
                check(&pooling, "/v1/embeddings", body.clone()).await
            })
        })
        .expect("every body gets an answer in the contract");
}

#[test]
fn arbitrary_bytes_get_an_openai_answer() {
    fuzz(prop::collection::vec(any::<u8>(), 0..256), |bytes| bytes.clone());
}

#[test]
fn arbitrary_json_values_get_an_openai_answer() {
    fuzz(json_value(WORDS), |value| value.to_string().into_bytes());
}

#[test]
fn requests_with_arbitrary_field_values_get_an_openai_answer() {
    fuzz(request_object(), |value| value.to_string().into_bytes());
}
