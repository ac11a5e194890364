//! `/v1/chat/completions` end to end over HTTP against a scripted backend: response shapes,
//! streaming, n > 1, logprobs, usage, reasoning split, and what reaches the backend.

mod api_support;

use api_support::*;
use lumen_head::api::chat::reasoning::ReasoningParserKind;
use lumen_head::api::{ApiConfig, ModelApiOptions};
use lumen_proto::v1 as pb;
use serde_json::json;

fn hi(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[tokio::test]
async fn non_streaming_answer_has_openai_shape() {
    let (_backend, server) = serve_default().await;
    let (status, body) = server.post_json("/v1/chat/completions", hi(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello world");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], serde_json::Value::Null);
    assert_eq!(body["usage"], json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}));
}

#[tokio::test]
async fn request_reaches_the_backend_converted() {
    let (backend, server) = serve_default().await;
    let body = hi(json!({
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 9, "max_tokens": 100, "temperature": 0.2, "top_p": 0.8, "top_k": 5,
        "min_p": 0.1, "seed": 42, "stop": "END", "stop_token_ids": [3], "ignore_eos": true, "min_tokens": 1,
        "logit_bias": {"11": 5}, "user": "alice", "skip_special_tokens": false,
        "chat_template_kwargs": {"enable_thinking": true}, "some_future_field": {"x": 1}
    }));
    let (status, reply) = server.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{reply}");
    let requests = backend.requests();
    let (model, request) = &requests[0];
    assert_eq!(model, "m");
    assert_eq!(request.request_id, reply["id"].as_str().unwrap());
    assert!(request.replica_id.is_empty());
    let Some(pb::generate_request::Prompt::Chat(chat)) = &request.prompt else { panic!("{request:?}") };
    let messages: serde_json::Value = serde_json::from_str(&chat.messages_json).unwrap();
    assert_eq!(messages, json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]));
    assert!(chat.add_generation_prompt);
    assert_eq!(chat.template_kwargs_json, r#"{"enable_thinking":true}"#);
    let sampling = request.sampling.clone().unwrap();
    assert_eq!((sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed), (0.2, 0.8, 5, Some(42)));
    assert_eq!(sampling.logit_bias, vec![pb::LogitBias { token_id: 11, bias: 5.0 }]);
    assert_eq!(sampling.logprobs, None);
    let stop = request.stop.clone().unwrap();
    assert_eq!(stop.max_tokens, 9, "max_completion_tokens wins over max_tokens");
    assert_eq!(
        (stop.stop, stop.stop_token_ids, stop.ignore_eos, stop.min_tokens),
        (vec!["END".into()], vec![3], true, 1)
    );
    assert!(!request.skip_special_tokens);
}

#[tokio::test]
async fn each_request_gets_a_fresh_id_and_unbounded_max_tokens_by_default() {
    let (backend, server) = serve_default().await;
    server.post_json("/v1/chat/completions", hi(json!({}))).await;
    server.post_json("/v1/chat/completions", hi(json!({}))).await;
    let requests = backend.requests();
    assert_ne!(requests[0].1.request_id, requests[1].1.request_id);
    assert_eq!(requests[0].1.stop.as_ref().unwrap().max_tokens, 0);
    assert_eq!(requests[0].1.sampling.as_ref().unwrap().temperature, 1.0);
}

#[tokio::test]
async fn streaming_sends_role_first_then_deltas_then_done() {
    let (_backend, server) = serve_default().await;
    let (status, sse) = stream(&server, "/v1/chat/completions", hi(json!({"stream": true}))).await;
    assert_eq!(status, 200);
    assert!(sse.done, "{}", sse.raw);
    let first = &sse.chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(joined(&sse.chunks, 0, "/delta/content"), "Hello world");
    let last = sse.chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(sse.chunks[..sse.chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert!(sse.chunks.iter().all(|c| c.get("usage").is_none()), "usage only with include_usage");
    let ids: std::collections::HashSet<_> = sse.chunks.iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "one id per stream");
}

#[tokio::test]
async fn include_usage_adds_a_final_chunk_with_empty_choices() {
    let (_backend, server) = serve_default().await;
    let body = hi(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (_, sse) = stream(&server, "/v1/chat/completions", body).await;
    let usage_chunk = sse.chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}));
    assert!(sse.done);
}

#[tokio::test]
async fn n_two_gives_two_choices_streamed_and_not() {
    let (backend, server) = serve_default().await;
    let (_, body) = server.post_json("/v1/chat/completions", hi(json!({"n": 2}))).await;
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!((choices[0]["index"].clone(), choices[1]["index"].clone()), (json!(0), json!(1)));
    assert!(choices.iter().all(|c| c["message"]["content"] == "Hello world"));
    assert_eq!(backend.requests()[0].1.n, 2);

    let (_, sse) = stream(&server, "/v1/chat/completions", hi(json!({"n": 2, "stream": true}))).await;
    for index in 0..2 {
        assert_eq!(joined(&sse.chunks, index, "/delta/role"), "assistant");
        assert_eq!(joined(&sse.chunks, index, "/delta/content"), "Hello world");
        assert_eq!(joined(&sse.chunks, index, "/finish_reason"), "stop");
    }
}

fn with_logprobs(request: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    let token = |piece: &str, logprob: f32| pb::TokenLogprob {
        token_id: 1,
        piece: piece.into(),
        logprob,
        top: vec![
            pb::TopLogprob { token_id: 1, piece: piece.into(), logprob },
            pb::TopLogprob { token_id: 2, piece: "x".into(), logprob: -3.0 },
        ],
        rank: 0,
    };
    assert_eq!(request.sampling.as_ref().unwrap().logprobs, Some(2));
    let delta = |text: &str, lp: f32, finish: pb::FinishReason| {
        Item::Event(pb::generate_event::Event::Delta(pb::Delta {
            index: 0,
            text: text.into(),
            token_ids: vec![1],
            logprobs: vec![token(text, lp)],
            finish_reason: finish as i32,
            stop_reason: None,
        }))
    };
    Ok(vec![
        started(3),
        delta("Hi", -0.25, pb::FinishReason::Unspecified),
        delta("!", -0.5, pb::FinishReason::Length),
        finished(3, 2),
    ])
}

#[tokio::test]
async fn logprobs_use_the_chat_shape() {
    let (backend, server) = serve_default().await;
    backend.script(with_logprobs);
    let (status, body) =
        server.post_json("/v1/chat/completions", hi(json!({"logprobs": true, "top_logprobs": 2}))).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["token"], "Hi");
    assert_eq!(content[0]["logprob"], -0.25);
    assert_eq!(content[0]["bytes"], json!([72, 105]));
    assert_eq!(content[0]["top_logprobs"][1], json!({"token": "x", "logprob": -3.0, "bytes": [120]}));
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let body = hi(json!({"logprobs": true, "top_logprobs": 2, "stream": true}));
    let (_, sse) = stream(&server, "/v1/chat/completions", body).await;
    let streamed: Vec<_> = sse.chunks.iter().filter(|c| !c["choices"][0]["logprobs"].is_null()).collect();
    assert_eq!(streamed.len(), 2);
    assert_eq!(streamed[1]["choices"][0]["logprobs"]["content"][0]["token"], "!");
}

fn r1_output(_: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    Ok(vec![
        started(4),
        delta(0, "<thi"),
        delta(0, "nk>Let me see.</th"),
        delta(0, "ink>\n\n"),
        last(0, "It is 4.", pb::FinishReason::Stop),
        finished(4, 4),
    ])
}

async fn r1_server() -> (std::sync::Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["r1", "plain"]);
    backend.script(r1_output);
    let mut config = ApiConfig::default();
    config.models.insert(
        "r1".into(),
        ModelApiOptions { reasoning_parser: Some(ReasoningParserKind::DeepseekR1), ..Default::default() },
    );
    let server = serve(backend.clone(), config).await;
    (backend, server)
}

#[tokio::test]
async fn deepseek_r1_parser_splits_reasoning_from_content() {
    let (_backend, server) = r1_server().await;
    let (_, body) = server.post_json("/v1/chat/completions", hi(json!({"model": "r1"}))).await;
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me see.");
    assert_eq!(message["content"], "\n\nIt is 4.");

    let (_, sse) = stream(&server, "/v1/chat/completions", hi(json!({"model": "r1", "stream": true}))).await;
    assert_eq!(joined(&sse.chunks, 0, "/delta/reasoning_content"), "Let me see.");
    assert_eq!(joined(&sse.chunks, 0, "/delta/content"), "\n\nIt is 4.");
    assert!(!sse.raw.contains("think>"), "tags leaked: {}", sse.raw);
}

#[tokio::test]
async fn models_without_a_parser_keep_the_raw_text() {
    let (_backend, server) = r1_server().await;
    let (_, body) = server.post_json("/v1/chat/completions", hi(json!({"model": "plain"}))).await;
    assert_eq!(body["choices"][0]["message"]["content"], "<think>Let me see.</think>\n\nIt is 4.");
    assert!(body["choices"][0]["message"].get("reasoning_content").is_none());
}

#[tokio::test]
async fn parser_set_at_run_time_applies_to_later_requests() {
    let (_backend, server) = r1_server().await;
    server.state.set_model_options(
        "plain",
        ModelApiOptions { reasoning_parser: Some(ReasoningParserKind::DeepseekR1), ..Default::default() },
    );
    let (_, body) = server.post_json("/v1/chat/completions", hi(json!({"model": "plain"}))).await;
    assert_eq!(body["choices"][0]["message"]["reasoning_content"], "Let me see.");
}
