//! `POST /v1/responses` over HTTP against a scripted backend: the response object and its output
//! items streamed and not, what reaches the backend (the items as chat messages, `instructions`
//! first, tools in the template kwargs, the text.format constraint), `previous_response_id`
//! chaining through the store and its bounds, retrieval, and every refusal's 400 naming its field.

mod api_support;

use api_support::*;
use lumen_head::api::chat::reasoning::ReasoningParserKind;
use lumen_head::api::tools::{ToolParserKind, ToolSettings};
use lumen_head::api::{ApiConfig, ModelApiOptions};
use lumen_proto::v1 as pb;
use serde_json::{Value, json};

/// What the fake model answers, keyed by the last message's content.
fn answer(key: &str) -> (&'static [&'static str], pb::FinishReason) {
    match key {
        "think" => (&["<think>Let me ", "see.</think>", "It is ", "sunny."], pb::FinishReason::Stop),
        "call" => (
            &["<tool_call>{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\"}}</tool_call>"],
            pb::FinishReason::Stop,
        ),
        "long" => (&["It is ", "su"], pb::FinishReason::Length),
        _ => (&["Hello", " world"], pb::FinishReason::Stop),
    }
}

fn script(request: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    let messages = sent_messages(request);
    let key = messages.as_array().unwrap().last().unwrap()["content"].as_str().unwrap_or_default().to_string();
    let (chunks, reason) = answer(&key);
    let mut items = vec![started(9)];
    for (i, chunk) in chunks.iter().enumerate() {
        items.push(if i + 1 == chunks.len() { last(0, chunk, reason) } else { delta(0, chunk) });
    }
    items.push(finished(9, chunks.len() as u32));
    Ok(items)
}

fn chat_prompt(request: &pb::GenerateRequest) -> &pb::ChatPrompt {
    let Some(pb::generate_request::Prompt::Chat(chat)) = &request.prompt else { panic!("{request:?}") };
    chat
}

fn sent_messages(request: &pb::GenerateRequest) -> Value {
    serde_json::from_str(&chat_prompt(request).messages_json).unwrap()
}

/// `m` plain, `r1` with the deepseek_r1 reasoning parser; hermes tool calls for both.
async fn server_with(config: ApiConfig) -> (std::sync::Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["m", "r1"]);
    backend.script(script);
    let mut config = ApiConfig {
        tools: ToolSettings { enable_auto_tool_choice: true, tool_call_parser: Some(ToolParserKind::Hermes) },
        ..config
    };
    config.models.insert(
        "r1".into(),
        ModelApiOptions { reasoning_parser: Some(ReasoningParserKind::DeepseekR1), ..Default::default() },
    );
    let server = serve(backend.clone(), config).await;
    (backend, server)
}

async fn server() -> (std::sync::Arc<FakeBackend>, Server) {
    server_with(ApiConfig::default()).await
}

/// Typed SSE events: (event name, data).
fn events(raw: &str) -> Vec<(String, Value)> {
    raw.split("\n\n")
        .filter(|f| !f.is_empty() && !f.starts_with(':'))
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap_or_else(|| panic!("{frame:?}"));
            let event = event.strip_prefix("event: ").unwrap_or_else(|| panic!("no event line: {frame:?}"));
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], event, "{frame}");
            (event.to_string(), data)
        })
        .collect()
}

async fn stream_events(server: &Server, body: Value) -> Vec<(String, Value)> {
    let response = server.post("/v1/responses", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    events(&response.text().await.unwrap())
}

#[tokio::test]
async fn a_response_has_openais_shape() {
    let (_, server) = server().await;
    let (status, body) = server
        .post_json("/v1/responses", json!({"model": "m", "input": "hi", "metadata": {"k": "v"}, "temperature": 0.5}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["model"], "m");
    assert!(body["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["incomplete_details"], Value::Null);
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["role"], "assistant");
    assert_eq!(output[0]["status"], "completed");
    assert!(output[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        output[0]["content"],
        json!([{"type": "output_text", "text": "Hello world", "annotations": [], "logprobs": []}])
    );
    assert_eq!(body["usage"]["input_tokens"], 9);
    assert_eq!(body["usage"]["output_tokens"], 2);
    assert_eq!(body["usage"]["total_tokens"], 11);
    assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(body["usage"]["output_tokens_details"]["reasoning_tokens"], 0);
    // Echoed parameters.
    assert_eq!(body["metadata"], json!({"k": "v"}));
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["parallel_tool_calls"], true);
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["tools"], json!([]));
    assert_eq!(body["text"], json!({"format": {"type": "text"}}));
    assert_eq!(body["store"], true);
}

#[tokio::test]
async fn length_cut_answers_are_incomplete_and_reasoning_is_its_own_item() {
    let (_, server) = server().await;
    let (_, body) = server.post_json("/v1/responses", json!({"input": "long", "max_output_tokens": 2})).await;
    assert_eq!(body["status"], "incomplete");
    assert_eq!(body["incomplete_details"], json!({"reason": "max_output_tokens"}));
    assert_eq!(body["max_output_tokens"], 2);

    let (_, body) = server.post_json("/v1/responses", json!({"model": "r1", "input": "think"})).await;
    let output = body["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning");
    assert_eq!(output[0]["content"], json!([{"type": "reasoning_text", "text": "Let me see."}]));
    assert_eq!(output[1]["content"][0]["text"], "It is sunny.");
}

#[tokio::test]
async fn a_streamed_response_sends_typed_events_in_order() {
    let (_, server) = server().await;
    let events = stream_events(&server, json!({"model": "r1", "input": "think", "stream": true})).await;
    let numbers: Vec<u64> = events.iter().map(|(_, d)| d["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let mut names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    names.dedup();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    let text: String = events
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, d)| {
            assert_eq!(d["output_index"], 1);
            d["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "It is sunny.");
    let (_, completed) = events.last().unwrap();
    let response = &completed["response"];
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][1]["content"][0]["text"], "It is sunny.");
    assert_eq!(response["usage"]["output_tokens"], 4);
    // The stored response is the completed one.
    let stored: Value = server
        .client
        .get(server.at(&format!("/v1/responses/{}", response["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&stored, response);
}

#[tokio::test]
async fn function_tools_are_chat_tools_and_calls_are_function_call_items() {
    let (backend, server) = server().await;
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": false}]);
    let (status, body) = server.post_json("/v1/responses", json!({"input": "call", "tools": tools})).await;
    assert_eq!(status, 200, "{body}");
    let call = &body["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], "{\"city\": \"Paris\"}");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(body["tools"], tools);
    let (_, request) = backend.requests().pop().unwrap();
    let kwargs: Value = serde_json::from_str(&chat_prompt(&request).template_kwargs_json).unwrap();
    assert_eq!(kwargs["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(kwargs["tools"][0]["function"]["parameters"], tools[0]["parameters"]);

    let events = stream_events(&server, json!({"input": "call", "tools": tools, "stream": true})).await;
    let args: String = events
        .iter()
        .filter(|(e, _)| e == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(args, "{\"city\": \"Paris\"}");
    let done = events.iter().find(|(e, _)| e == "response.function_call_arguments.done").unwrap();
    assert_eq!(done.1["arguments"], args);
    let added = events.iter().find(|(e, _)| e == "response.output_item.added").unwrap();
    assert_eq!(added.1["item"]["type"], "function_call");
    assert_eq!(added.1["item"]["name"], "get_weather");
}

#[tokio::test]
async fn input_items_reach_the_template_as_chat_messages_after_the_instructions() {
    let (backend, server) = server().await;
    let input = json!([
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]);
    let (status, body) = server.post_json("/v1/responses", json!({"input": input, "instructions": "You help."})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instructions"], "You help.");
    let (_, request) = backend.requests().pop().unwrap();
    assert_eq!(
        sent_messages(&request),
        json!([
            {"role": "system", "content": "You help."},
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ])
    );
    assert!(chat_prompt(&request).add_generation_prompt);
}

#[tokio::test]
async fn previous_response_id_continues_the_conversation_without_old_instructions() {
    let (backend, server) = server().await;
    let (_, first) = server.post_json("/v1/responses", json!({"input": "hi", "instructions": "Old."})).await;
    let id = first["id"].as_str().unwrap();
    let (status, second) = server
        .post_json("/v1/responses", json!({"input": "again", "previous_response_id": id, "instructions": "New."}))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["previous_response_id"], id);
    let (_, request) = backend.requests().pop().unwrap();
    assert_eq!(
        sent_messages(&request),
        json!([
            {"role": "system", "content": "New."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello world"},
            {"role": "user", "content": "again"},
        ])
    );
    // A third turn sees both.
    let (_, _) =
        server.post_json("/v1/responses", json!({"input": "third", "previous_response_id": second["id"]})).await;
    let (_, request) = backend.requests().pop().unwrap();
    assert_eq!(sent_messages(&request).as_array().unwrap().len(), 5);

    // Not stored: not found later.
    let (_, unstored) = server.post_json("/v1/responses", json!({"input": "hi", "store": false})).await;
    let (status, error) =
        server.post_json("/v1/responses", json!({"input": "x", "previous_response_id": unstored["id"]})).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["param"], "previous_response_id");
    assert!(error["error"]["message"].as_str().unwrap().contains("not found"));
}

#[tokio::test]
async fn stored_responses_are_retrieved_deleted_and_bounded() {
    let config = ApiConfig { responses_store_max_entries: 2, ..ApiConfig::default() };
    let (_, server) = server_with(config).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, body) = server.post_json("/v1/responses", json!({"input": "hi"})).await;
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let get = |id: &str| server.client.get(server.at(&format!("/v1/responses/{id}"))).send();
    assert_eq!(get(&ids[0]).await.unwrap().status(), 404, "the oldest was evicted");
    let kept = get(&ids[2]).await.unwrap();
    assert_eq!(kept.status(), 200);
    assert_eq!(kept.json::<Value>().await.unwrap()["id"], ids[2]);
    let cancel = server.client.post(server.at(&format!("/v1/responses/{}/cancel", ids[2]))).send().await.unwrap();
    assert_eq!(cancel.status(), 400);
    let deleted = server.client.delete(server.at(&format!("/v1/responses/{}", ids[2]))).send().await.unwrap();
    assert_eq!(deleted.json::<Value>().await.unwrap(), json!({"id": ids[2], "object": "response", "deleted": true}));
    assert_eq!(get(&ids[2]).await.unwrap().status(), 404);
}

#[tokio::test]
async fn text_format_becomes_the_structured_output_constraint() {
    let (backend, server) = server().await;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let body = json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": true}}});
    let (status, response) = server.post_json("/v1/responses", body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["text"]["format"]["name"], "s");
    let (_, request) = backend.requests().pop().unwrap();
    let constraint = request.structured_output.expect("a constraint");
    assert_eq!(constraint.param, "text.format");
    match constraint.kind {
        Some(pb::structured_output::Kind::JsonSchema(text)) => {
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), schema)
        }
        other => panic!("{other:?}"),
    }
    server.post_json("/v1/responses", json!({"input": "hi", "text": {"format": {"type": "json_object"}}})).await;
    let (_, request) = backend.requests().pop().unwrap();
    assert!(matches!(request.structured_output.unwrap().kind, Some(pb::structured_output::Kind::JsonObject(_))));
}

#[tokio::test]
async fn every_refusal_is_a_400_naming_its_field() {
    let (backend, server) = server().await;
    for (body, param) in [
        (json!({"input": "x", "tools": [{"type": "web_search_preview"}]}), "tools[0].type"),
        (json!({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}), "tools[0].type"),
        (json!({"input": "x", "background": true}), "background"),
        (json!({"input": "x", "include": ["reasoning.encrypted_content"]}), "include"),
        (json!({"input": "x", "conversation": "conv_1"}), "conversation"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
            "input[0].content[0]",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "input[0].content[0]",
        ),
        (json!({"input": [{"type": "item_reference", "id": "x"}]}), "input[0].type"),
        (json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}), "text.format.schema"),
        (json!({"input": "x", "max_output_tokens": 0}), "max_output_tokens"),
        (json!({"input": "x", "temperature": 5}), "temperature"),
        (json!({"input": "x", "tool_choice": "required"}), "tool_choice"),
        (json!({}), "input"),
    ] {
        let (status, error) = server.post_json("/v1/responses", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert!(backend.requests().is_empty(), "no refused request reached the backend");
    let (status, error) =
        server.post_json("/v1/responses", json!({"input": "x", "previous_response_id": "resp_nope"})).await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["message"], "Response with id 'resp_nope' not found.");
    let missing = server.client.get(server.at("/v1/responses/resp_nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}
