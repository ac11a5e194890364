//! `/v1/completions` end to end over HTTP against a scripted backend: prompt shapes, several
//! prompts times n, legacy logprobs, echo, streaming and usage.

mod api_support;

use api_support::*;
use lumen_proto::v1 as pb;
use pb::generate_request::Prompt;
use serde_json::json;

#[tokio::test]
async fn non_streaming_answer_has_openai_shape() {
    let (backend, server) = serve_default().await;
    let (status, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "Once"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "Hello world");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["logprobs"], serde_json::Value::Null);
    assert_eq!(body["usage"]["total_tokens"], 7);
    let request = &backend.requests()[0].1;
    assert!(matches!(&request.prompt, Some(Prompt::Text(t)) if t.text == "Once" && t.add_special_tokens));
    assert_eq!(request.stop.as_ref().unwrap().max_tokens, 16, "vLLM's completions default");
    assert!(!request.return_prompt);
}

#[tokio::test]
async fn several_prompts_times_n_are_indexed_as_openai_does() {
    let (backend, server) = serve_default().await;
    backend.script(|request| {
        let Some(Prompt::Text(text)) = &request.prompt else { panic!("text prompt expected") };
        let tag = text.text.clone();
        Ok(vec![
            started(1),
            last(0, &format!("{tag}0"), pb::FinishReason::Stop),
            last(1, &format!("{tag}1"), pb::FinishReason::Length),
            finished(1, 2),
        ])
    });
    let body = json!({"model": "m", "prompt": ["a", "b"], "n": 2});
    let (status, body) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let texts: Vec<_> =
        body["choices"].as_array().unwrap().iter().map(|c| (c["index"].clone(), c["text"].clone())).collect();
    assert_eq!(
        texts,
        vec![(json!(0), json!("a0")), (json!(1), json!("a1")), (json!(2), json!("b0")), (json!(3), json!("b1"))]
    );
    assert_eq!(body["choices"][3]["finish_reason"], "length");
    assert_eq!(body["usage"], json!({"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}));
    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    assert_ne!(requests[0].1.request_id, requests[1].1.request_id);

    let body = json!({"model": "m", "prompt": ["a", "b"], "n": 2, "stream": true});
    let (_, sse) = stream(&server, "/v1/completions", body).await;
    for (index, want) in ["a0", "a1", "b0", "b1"].iter().enumerate() {
        assert_eq!(joined(&sse.chunks, index as u64, "/text"), *want);
    }
    assert!(sse.done);
}

#[tokio::test]
async fn token_prompts_are_sent_as_token_ids() {
    let (backend, server) = serve_default().await;
    server.post_json("/v1/completions", json!({"model": "m", "prompt": [1, 2, 3]})).await;
    server.post_json("/v1/completions", json!({"model": "m", "prompt": [[4], [5, 6]]})).await;
    let prompts: Vec<_> = backend.requests().into_iter().map(|(_, r)| r.prompt).collect();
    let ids = |p: &Option<Prompt>| match p {
        Some(Prompt::Tokens(t)) => t.token_ids.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(prompts.iter().map(ids).collect::<Vec<_>>(), vec![vec![1, 2, 3], vec![4], vec![5, 6]]);
}

fn two_tokens_with_logprobs(request: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    assert_eq!(request.sampling.as_ref().unwrap().logprobs, Some(1));
    let token = |piece: &str, logprob: f32| pb::TokenLogprob {
        token_id: 9,
        piece: piece.into(),
        logprob,
        top: vec![pb::TopLogprob { token_id: 3, piece: "zz".into(), logprob: -4.0 }],
        rank: 0,
    };
    let mut items = vec![started(2)];
    for (text, lp, finish) in [("ab", -0.5f32, pb::FinishReason::Unspecified), ("c", -1.0, pb::FinishReason::Length)] {
        items.push(Item::Event(pb::generate_event::Event::Delta(pb::Delta {
            text: text.into(),
            token_ids: vec![9],
            logprobs: vec![token(text, lp)],
            finish_reason: finish as i32,
            ..Default::default()
        })));
    }
    items.push(finished(2, 2));
    Ok(items)
}

#[tokio::test]
async fn logprobs_use_the_legacy_shape() {
    let (backend, server) = serve_default().await;
    backend.script(two_tokens_with_logprobs);
    let (status, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x", "logprobs": 1})).await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["ab", "c"]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -1.0]));
    assert_eq!(lp["top_logprobs"][0], json!({"ab": -0.5, "zz": -4.0}));
    assert_eq!(lp["text_offset"], json!([0, 2]));

    let (_, sse) =
        stream(&server, "/v1/completions", json!({"model": "m", "prompt": "x", "logprobs": 1, "stream": true})).await;
    let offsets: Vec<_> = sse.chunks.iter().map(|c| c["choices"][0]["logprobs"]["text_offset"][0].clone()).collect();
    assert_eq!(offsets, vec![json!(0), json!(2)], "offsets continue across chunks");
}

#[tokio::test]
async fn return_tokens_as_token_ids_names_logprob_tokens_by_id() {
    let (backend, server) = serve_default().await;
    backend.script(two_tokens_with_logprobs);
    let body = json!({"model": "m", "prompt": "x", "logprobs": 1, "return_tokens_as_token_ids": true});
    let (status, body) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["token_id:9", "token_id:9"]));
    assert_eq!(lp["top_logprobs"][0], json!({"token_id:9": -0.5, "token_id:3": -4.0}));
    // Chat does not name tokens by id yet: refused, not ignored.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true,
                      "return_tokens_as_token_ids": true});
    let (status, body) = server.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "return_tokens_as_token_ids", "{body}");
}

#[tokio::test]
async fn echo_prepends_the_prompt_text() {
    let (backend, server) = serve_default().await;
    backend.script(|request| {
        assert!(request.return_prompt);
        Ok(vec![
            Item::Event(pb::generate_event::Event::Started(pb::Started {
                prompt_tokens: 2,
                prompt_token_ids: vec![1, 2],
                prompt_text: "Say: ".into(),
                resumed_tokens: 0,
            })),
            last(0, "hi", pb::FinishReason::Stop),
            finished(2, 1),
        ])
    });
    let (_, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "Say: ", "echo": true})).await;
    assert_eq!(body["choices"][0]["text"], "Say: hi");
    let (_, sse) =
        stream(&server, "/v1/completions", json!({"model": "m", "prompt": "Say: ", "echo": true, "stream": true}))
            .await;
    assert_eq!(joined(&sse.chunks, 0, "/text"), "Say: hi");
}

#[tokio::test]
async fn streaming_with_usage_ends_with_usage_then_done() {
    let (_backend, server) = serve_default().await;
    let body = json!({"model": "m", "prompt": "x", "stream": true, "stream_options": {"include_usage": true}});
    let (status, sse) = stream(&server, "/v1/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(sse.chunks[0]["object"], "text_completion");
    assert_eq!(joined(&sse.chunks, 0, "/text"), "Hello world");
    let usage = sse.chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert!(sse.raw.ends_with("data: [DONE]\n\n"));
}
