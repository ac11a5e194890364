//! Tool calling over HTTP against a scripted backend that "generates" tool-call text in chunks:
//! the OpenAI `tool_calls` shape streamed and not, per parser (`hermes`, `llama3_json`,
//! `deepseek_v3`), with the reasoning split first, what reaches the backend (the template's
//! `tools`, special tokens kept), and every refusal's 400.

mod api_support;

use api_support::*;
use lumen_head::api::chat::reasoning::ReasoningParserKind;
use lumen_head::api::tools::request::AUTO_NEEDS_FLAGS;
use lumen_head::api::tools::{ToolParserKind, ToolSettings};
use lumen_head::api::{ApiConfig, ModelApiOptions};
use lumen_proto::v1 as pb;
use serde_json::{Value, json};

/// What the fake model answers, in chunks, keyed by the last message's content.
fn answer(key: &str) -> &'static [&'static str] {
    match key {
        "hermes" => &[
            "Let me ",
            "check.<tool",
            "_call>\n{\"name\": \"get_",
            "weather\", \"arguments\": {\"ci",
            "ty\": \"Paris\"}}\n</tool_call>",
        ],
        "hermes two" => &[
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>",
            "{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        ],
        "llama" => &["<|python_tag|>{\"name\": \"get_weather\", ", "\"parameters\": {\"city\": ", "\"Paris\"}}"],
        "deepseek" => &[
            "<think>The user wants weather.</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n",
            "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ],
        "truncated" => &["<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa"],
        // What decoding under tool_choice "required" / a named function produces.
        "forced required" => &[
            "[{\"name\": \"get_weather\", \"parameters\": {\"city\": ",
            "\"Paris\"}}, {\"name\": \"get_time\", \"parameters\": {}}]",
        ],
        "forced named" => &["{\"city\"", ": \"Paris\"}"],
        _ => &["It is ", "sunny."],
    }
}

fn tool_output(request: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    let Some(pb::generate_request::Prompt::Chat(chat)) = &request.prompt else { panic!("{request:?}") };
    let messages: Value = serde_json::from_str(&chat.messages_json).unwrap();
    let key = messages.as_array().unwrap().last().unwrap()["content"].as_str().unwrap_or_default().to_string();
    let chunks = answer(&key);
    let reason = if key == "truncated" { pb::FinishReason::Length } else { pb::FinishReason::Stop };
    let mut items = vec![started(9)];
    for (i, chunk) in chunks.iter().enumerate() {
        items.push(if i + 1 == chunks.len() { last(0, chunk, reason) } else { delta(0, chunk) });
    }
    items.push(finished(9, chunks.len() as u32));
    Ok(items)
}

fn options(parser: ToolParserKind, reasoning: bool) -> ModelApiOptions {
    ModelApiOptions {
        reasoning_parser: reasoning.then_some(ReasoningParserKind::DeepseekR1),
        enable_auto_tool_choice: Some(true),
        tool_call_parser: Some(parser),
        ..Default::default()
    }
}

/// Models `hermes`, `llama` and `r1` with their parsers (the server default is hermes, so `plain`
/// takes it too), `off` with automatic tool choice turned off.
async fn tool_server() -> (std::sync::Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["hermes", "llama", "r1", "plain", "off"]);
    backend.script(tool_output);
    let mut config = ApiConfig {
        tools: ToolSettings { enable_auto_tool_choice: true, tool_call_parser: Some(ToolParserKind::Hermes) },
        ..ApiConfig::default()
    };
    config.models.insert("llama".into(), options(ToolParserKind::Llama3Json, false));
    config.models.insert("r1".into(), options(ToolParserKind::DeepseekV3, true));
    config.models.insert("off".into(), ModelApiOptions { enable_auto_tool_choice: Some(false), ..Default::default() });
    let server = serve(backend.clone(), config).await;
    (backend, server)
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    ])
}

fn ask(model: &str, key: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": key}], "tools": weather_tools()});
    body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    body
}

/// The calls a stream's deltas add up to, as the `openai` SDK assembles them: (id, name, arguments).
fn assembled(sse: &Sse) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for chunk in &sse.chunks {
        for call in chunk["choices"][0]["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert!(call["id"].as_str().unwrap().starts_with("call_"), "the first delta carries the id: {call}");
                assert_eq!(call["type"], "function");
                calls.push((
                    call["id"].as_str().unwrap().into(),
                    call["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            } else {
                assert!(call.get("id").is_none() && call["function"].get("name").is_none(), "{call}");
            }
            calls[index].2.push_str(call["function"]["arguments"].as_str().unwrap());
        }
    }
    calls
}

#[tokio::test]
async fn auto_tool_calls_have_openai_shape_streamed_and_not_for_each_parser() {
    let (backend, server) = tool_server().await;
    let cases = [
        ("hermes", "hermes", Some("Let me check."), vec![("get_weather", "{\"city\": \"Paris\"}")]),
        ("plain", "hermes two", None, vec![("get_weather", "{\"city\": \"Paris\"}"), ("get_time", "{}")]),
        ("llama", "llama", None, vec![("get_weather", "{\"city\": \"Paris\"}")]),
        ("r1", "deepseek", None, vec![("get_weather", "{\"city\": \"Paris\"}")]),
    ];
    for (model, key, content, calls) in cases {
        let (status, body) = server.post_json("/v1/chat/completions", ask(model, key, json!({}))).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{model}: {body}");
        assert_eq!(choice["message"]["content"].as_str(), content, "{model}");
        let got: Vec<(&str, &str)> = choice["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["function"]["name"].as_str().unwrap(), c["function"]["arguments"].as_str().unwrap()))
            .collect();
        assert_eq!(got, calls, "{model}");
        assert!(choice["message"]["tool_calls"].as_array().unwrap().iter().all(|c| c["type"] == "function"));

        let (status, sse) = stream(&server, "/v1/chat/completions", ask(model, key, json!({"stream": true}))).await;
        assert_eq!(status, 200);
        assert!(sse.done);
        let streamed: Vec<(String, String)> = assembled(&sse).into_iter().map(|(_, n, a)| (n, a)).collect();
        let want: Vec<(String, String)> = calls.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
        assert_eq!(streamed, want, "{model}: {}", sse.raw);
        assert_eq!(joined(&sse.chunks, 0, "/delta/content"), content.unwrap_or_default(), "{model}");
        assert_eq!(sse.chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls", "{model}");
        assert!(!sse.raw.contains("tool_call>") && !sse.raw.contains("｜"), "markup leaked: {}", sse.raw);
    }
    // Reasoning is split first (r1): the thinking is reasoning_content, never a call.
    let (_, body) = server.post_json("/v1/chat/completions", ask("r1", "deepseek", json!({}))).await;
    assert_eq!(body["choices"][0]["message"]["reasoning_content"], "The user wants weather.");
    // The template got the tools; the markers' special tokens were kept (hermes, deepseek_v3),
    // not for llama3_json, whose calls read the same without <|python_tag|>.
    for (model, request) in backend.requests() {
        let Some(pb::generate_request::Prompt::Chat(chat)) = &request.prompt else { panic!() };
        let kwargs: Value = serde_json::from_str(&chat.template_kwargs_json).unwrap();
        assert_eq!(kwargs["tools"], weather_tools(), "{model}");
        assert_eq!(request.skip_special_tokens, model == "llama", "{model}");
    }
}

#[tokio::test]
async fn answers_without_calls_and_broken_calls_are_content() {
    let (_backend, server) = tool_server().await;
    let (_, body) = server.post_json("/v1/chat/completions", ask("hermes", "hello", json!({}))).await;
    let choice = &body["choices"][0];
    assert_eq!(
        (choice["message"]["content"].as_str(), choice["finish_reason"].as_str()),
        (Some("It is sunny."), Some("stop"))
    );
    assert_eq!(choice["message"]["tool_calls"], json!([]));
    // Cut by max_tokens inside a call: content, non-streaming; streaming keeps what it sent.
    let (_, body) = server.post_json("/v1/chat/completions", ask("hermes", "truncated", json!({}))).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["content"], answer("truncated")[0]);
    assert_eq!(choice["finish_reason"], "length");
    let (_, sse) = stream(&server, "/v1/chat/completions", ask("hermes", "truncated", json!({"stream": true}))).await;
    let calls = assembled(&sse);
    assert_eq!((calls[0].1.as_str(), calls[0].2.as_str()), ("get_weather", "{\"city\": \"Pa"));
    assert_eq!(sse.chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // tool_choice none: the text as it is, the tools still in the template.
    let (_, body) =
        server.post_json("/v1/chat/completions", ask("hermes", "hermes", json!({"tool_choice": "none"}))).await;
    assert_eq!(body["choices"][0]["message"]["content"], answer("hermes").concat());
}

#[tokio::test]
async fn required_and_named_choices_constrain_decoding_to_the_tools_schema() {
    let (backend, server) = tool_server().await;
    // Even a model without automatic tool choice may be forced to call (vLLM needs no flags).
    let (status, body) = server
        .post_json("/v1/chat/completions", ask("off", "forced required", json!({"tool_choice": "required"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    let names: Vec<&str> = calls.iter().map(|c| c["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}");
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (_, sse) = stream(
        &server,
        "/v1/chat/completions",
        ask("hermes", "forced named", json!({"tool_choice": named, "stream": true})),
    )
    .await;
    let calls = assembled(&sse);
    assert_eq!((calls.len(), calls[0].1.as_str(), calls[0].2.as_str()), (1, "get_weather", "{\"city\": \"Paris\"}"));
    // What the replica was asked to enforce: the array of calls, then get_weather's parameters.
    let sent: Vec<pb::GenerateRequest> = backend.requests().into_iter().map(|(_, r)| r).collect();
    let schema = |r: &pb::GenerateRequest| {
        let so = r.structured_output.as_ref().expect("a forced call is constrained");
        assert_eq!(so.param, "tool_choice");
        match &so.kind {
            Some(pb::structured_output::Kind::JsonSchema(text)) => serde_json::from_str::<Value>(text).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let required = schema(&sent[0]);
    assert_eq!((required["type"].as_str(), required["minItems"].as_u64()), (Some("array"), Some(1)));
    assert_eq!(required["items"]["anyOf"].as_array().unwrap().len(), 2);
    assert_eq!(schema(&sent[1]), weather_tools()[0]["function"]["parameters"]);
    assert_eq!(
        sent[0].structured_output.as_ref().unwrap().reasoning_end,
        "",
        "no reasoning parser: constrained at once"
    );
    // auto leaves decoding free.
    server.post_json("/v1/chat/completions", ask("hermes", "hermes", json!({}))).await;
    assert!(backend.requests().pop().unwrap().1.structured_output.is_none());
    // A reasoning model thinks freely first: the constraint waits for the end of its reasoning.
    server.post_json("/v1/chat/completions", ask("r1", "x", json!({"tool_choice": "required"}))).await;
    let so = backend.requests().pop().unwrap().1.structured_output.unwrap();
    assert_eq!((so.reasoning_start.as_str(), so.reasoning_end.as_str()), ("<think>", "</think>"));
}

#[tokio::test]
async fn parallel_tool_calls_false_keeps_the_first_call() {
    let (_backend, server) = tool_server().await;
    let body = ask("plain", "hermes two", json!({"parallel_tool_calls": false}));
    let (_, reply) = server.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(reply["choices"][0]["message"]["tool_calls"].as_array().unwrap().len(), 1);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, sse) = stream(&server, "/v1/chat/completions", streamed).await;
    assert_eq!(assembled(&sse).len(), 1);
}

#[tokio::test]
async fn a_conversation_with_tool_results_reaches_the_template() {
    let (backend, server) = tool_server().await;
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "user", "content": "hello"}
    ]);
    let (status, body) =
        server.post_json("/v1/chat/completions", ask("hermes", "x", json!({"messages": messages}))).await;
    assert_eq!(status, 200, "{body}");
    let (_, request) = backend.requests().pop().unwrap();
    let Some(pb::generate_request::Prompt::Chat(chat)) = &request.prompt else { panic!() };
    let sent: Value = serde_json::from_str(&chat.messages_json).unwrap();
    assert_eq!(sent[1]["tool_calls"], messages[1]["tool_calls"]);
    assert_eq!((sent[1]["content"].clone(), sent[2]["tool_call_id"].clone()), (Value::Null, json!("call_1")));
}

#[tokio::test]
async fn every_bad_tool_input_is_a_400_naming_the_field() {
    let (backend, server) = tool_server().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let cases = [
        (ask("off", "x", json!({})), "tool_choice", AUTO_NEEDS_FLAGS),
        (ask("off", "x", json!({"tool_choice": "auto"})), "tool_choice", AUTO_NEEDS_FLAGS),
        (
            ask("hermes", "x", json!({"tool_choice": "required", "response_format": {"type": "json_object"}})),
            "tool_choice",
            "cannot be combined with the structured-output constraint `response_format`",
        ),
        (ask("hermes", "x", json!({"tool_choice": named, "guided_regex": "a+"})), "tool_choice", "`guided_regex`"),
        (
            ask("hermes", "x", json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "tool_choice",
            "does not match",
        ),
        (ask("hermes", "x", json!({"tool_choice": "sometimes"})), "tool_choice", "Invalid value"),
        (ask("hermes", "x", json!({"tools": "all"})), "tools", "a list of tools"),
        (
            ask("hermes", "x", json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
            "tools[0].function.name",
            "a-z",
        ),
        (
            ask(
                "hermes",
                "x",
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "float"}}}}}]}),
            ),
            "tools[0].function.parameters.properties.a.type",
            "one of",
        ),
        (ask("hermes", "x", json!({"parallel_tool_calls": 1})), "parallel_tool_calls", "boolean"),
        (
            ask(
                "hermes",
                "x",
                json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}),
            ),
            "messages[0].tool_calls[0].function.name",
            "name",
        ),
        (
            json!({"model": "hermes", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}),
            "tool_choice",
            "`tools` must be set",
        ),
    ];
    for (body, param, says) in cases {
        let (status, reply) = server.post_json("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"]["param"], param, "{body}");
        assert_eq!(reply["error"]["type"], "invalid_request_error");
        assert!(reply["error"]["message"].as_str().unwrap().contains(says), "{body}: {reply}");
    }
    assert!(backend.requests().is_empty(), "no refused request reached the backend");
    // Tools with tool_choice none need no server flags.
    let (status, _) = server.post_json("/v1/chat/completions", ask("off", "x", json!({"tool_choice": "none"}))).await;
    assert_eq!(status, 200);
}
