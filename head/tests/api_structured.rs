//! A deployment's structured-output defaults (vLLM's `structured_outputs_config`) over HTTP
//! against a scripted backend: what reaches the backend in `pb::StructuredOutput` for each route
//! and way of constraining (the server's options on, the request's own beside them, a model's
//! own settings over the server's, none without a constraint), and the settings' reasoning parser
//! splitting the output as the model's `reasoning_parser` would.

mod api_support;

use api_support::*;
use lumen_head::api::{ApiConfig, ModelApiOptions};
use lumen_head::config::structured_outputs::{Backend, StructuredOutputsConfig};
use lumen_proto::v1 as pb;
use serde_json::{Value, json};

fn r1_output(_: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    Ok(vec![started(4), delta(0, "<think>Why not.</think>"), last(0, "{}", pb::FinishReason::Stop), finished(4, 2)])
}

/// The server's default turns whitespace off (`plain` takes it); `strict` has its own settings
/// (additional properties off, whitespace left to the request, a reasoning parser whose
/// reasoning is constrained too); `r1` names its reasoning parser only in its structured-output
/// settings.
async fn structured_server() -> (std::sync::Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["plain", "strict", "r1"]);
    backend.script(r1_output);
    let mut config = ApiConfig {
        structured_outputs: StructuredOutputsConfig {
            backend: Backend::Guidance,
            disable_any_whitespace: true,
            ..StructuredOutputsConfig::default()
        },
        ..ApiConfig::default()
    };
    let strict = StructuredOutputsConfig {
        backend: Backend::Xgrammar,
        disable_additional_properties: true,
        enable_in_reasoning: true,
        reasoning_parser: "deepseek_r1".parse().ok(),
        ..StructuredOutputsConfig::default()
    };
    config.models.insert("strict".into(), ModelApiOptions { structured_outputs: Some(strict), ..Default::default() });
    let r1 =
        StructuredOutputsConfig { reasoning_parser: "deepseek_r1".parse().ok(), ..StructuredOutputsConfig::default() };
    config.models.insert("r1".into(), ModelApiOptions { structured_outputs: Some(r1), ..Default::default() });
    let server = serve(backend.clone(), config).await;
    (backend, server)
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    body
}

/// The last request's constraint: (param, disable_any_whitespace, disable_additional_properties).
fn sent(backend: &FakeBackend) -> Option<(String, bool, bool)> {
    let (_, request) = backend.requests().pop().expect("a request reached the backend");
    request.structured_output.map(|so| (so.param, so.disable_any_whitespace, so.disable_additional_properties))
}

#[tokio::test]
async fn the_deployments_defaults_reach_the_backend_beside_the_requests_own() {
    let (backend, server) = structured_server().await;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let response_format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "a", "schema": schema}}});
    let tools = json!({"tool_choice": "required", "tools": [{"type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]});
    let cases = [
        // The server's default, for each route and kind of constraint.
        ("/v1/chat/completions", chat("plain", response_format.clone()), Some(("response_format", true, false))),
        (
            "/v1/completions",
            json!({"model": "plain", "prompt": "x", "guided_regex": "a+"}),
            Some(("guided_regex", true, false)),
        ),
        ("/v1/chat/completions", chat("plain", tools), Some(("tool_choice", true, false))),
        // A request turns an option on beside the server's.
        (
            "/v1/chat/completions",
            chat("plain", json!({"structured_outputs": {"json": schema, "disable_additional_properties": true}})),
            Some(("structured_outputs.json", true, true)),
        ),
        // A request cannot turn the server's option off.
        (
            "/v1/completions",
            json!({"model": "plain", "prompt": "x", "structured_outputs": {"regex": "a+", "disable_any_whitespace": false}}),
            Some(("structured_outputs.regex", true, false)),
        ),
        // A model's own settings replace the server's.
        ("/v1/chat/completions", chat("strict", response_format), Some(("response_format", false, true))),
        (
            "/v1/completions",
            json!({"model": "strict", "prompt": "x", "structured_outputs": {"choice": ["a"], "disable_any_whitespace": true}}),
            Some(("structured_outputs.choice", true, true)),
        ),
        // No constraint: nothing to apply them to.
        ("/v1/chat/completions", chat("plain", json!({})), None),
        ("/v1/completions", json!({"model": "strict", "prompt": "x"}), None),
    ];
    for (path, body, expected) in cases {
        let (status, reply) = server.post_json(path, body.clone()).await;
        assert_eq!(status, 200, "{body}: {reply}");
        let got = sent(&backend);
        let expected = expected.map(|(p, w, a)| (p.to_string(), w, a));
        assert_eq!(got, expected, "{path} {body}");
    }
}

#[tokio::test]
async fn the_settings_reasoning_parser_splits_the_output_and_gates_constraints_unless_enable_in_reasoning() {
    let (backend, server) = structured_server().await;
    let (_, body) = server.post_json("/v1/chat/completions", chat("r1", json!({}))).await;
    let message = &body["choices"][0]["message"];
    assert_eq!((message["reasoning_content"].as_str(), message["content"].as_str()), (Some("Why not."), Some("{}")));
    let (_, body) = server.post_json("/v1/chat/completions", chat("plain", json!({}))).await;
    assert_eq!(body["choices"][0]["message"]["content"], "<think>Why not.</think>{}");
    // Constraints wait for the end of the reasoning (vLLM's default), unless enable_in_reasoning.
    let json_object = json!({"response_format": {"type": "json_object"}});
    let mut markers = Vec::new();
    for model in ["r1", "strict", "plain"] {
        server.post_json("/v1/chat/completions", chat(model, json_object.clone())).await;
        let so = backend.requests().pop().unwrap().1.structured_output.unwrap();
        markers.push((so.reasoning_start, so.reasoning_end));
    }
    let none = (String::new(), String::new());
    assert_eq!(markers, [("<think>".to_string(), "</think>".to_string()), none.clone(), none]);
    assert_eq!(server.state.structured_outputs("unknown").backend, Backend::Guidance, "the server's default");
}
