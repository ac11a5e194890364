//! `/v1/embeddings` over HTTP against a scripted backend (a generation model `m`, a pooling model
//! `e` whose vector for a prompt of `t` tokens is `[t, 1, -0.5]`): every input shape fans out as
//! its own pooling request and comes back in order with usage; base64 is the float vector's
//! little-endian bytes; what vLLM refuses is a 400 in OpenAI's shape; and each kind of endpoint
//! refuses a model served for the other (vLLM's "The model does not support ... API").

mod api_support;

use api_support::*;
use base64::Engine;
use lumen_head::backend::BackendError;
use lumen_proto::v1 as pb;
use serde_json::{Value, json};

fn error_of(status: u16, body: &Value) -> (u16, &str, Option<&str>) {
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    (status, body["error"]["message"].as_str().unwrap_or_default(), body["error"]["param"].as_str())
}

#[tokio::test]
async fn a_list_of_inputs_fans_out_and_comes_back_in_order_with_usage() {
    let (backend, server) = serve_with_pooling().await;
    let (status, body) =
        server.post_json("/v1/embeddings", json!({"model": "e", "input": ["abc", "hello", "x"], "user": "u-7"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("list"), Some("e")));
    assert!(body["id"].as_str().unwrap().starts_with("embd-"));
    let data = body["data"].as_array().unwrap();
    for (i, want) in [3.0, 5.0, 1.0].into_iter().enumerate() {
        assert_eq!(data[i], json!({"object": "embedding", "index": i, "embedding": [want, 1.0, -0.5]}));
    }
    assert_eq!(body["usage"], json!({"prompt_tokens": 9, "total_tokens": 9}));
    let requests = backend.requests();
    assert_eq!(requests.len(), 3, "one backend request per input");
    let mut ids: Vec<&str> = requests.iter().map(|(_, r)| r.request_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct request ids");
    for (model, r) in &requests {
        assert_eq!(model, "e");
        assert_eq!(r.pooling, Some(pb::PoolingRequest::default()));
        assert!(r.sampling.is_none() && r.stop.is_none());
    }
}

#[tokio::test]
async fn token_inputs_and_base64_encoding() {
    let (backend, server) = serve_with_pooling().await;
    let (status, floats) =
        server.post_json("/v1/embeddings", json!({"model": "e", "input": [[1, 2], [3, 4, 5]]})).await;
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["data"][1]["embedding"], json!([3.0, 1.0, -0.5]));
    let (status, encoded) = server
        .post_json("/v1/embeddings", json!({"model": "e", "input": [3, 4, 5], "encoding_format": "base64"}))
        .await;
    assert_eq!(status, 200, "{encoded}");
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(encoded["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(json!(decoded), floats["data"][1]["embedding"]);
    assert!(
        matches!(&backend.requests()[2].1.prompt, Some(pb::generate_request::Prompt::Tokens(t)) if t.token_ids == [3, 4, 5])
    );
}

#[tokio::test]
async fn vllms_extras_reach_the_worker() {
    let (backend, server) = serve_with_pooling().await;
    let body = json!({"model": "e", "input": "abc", "truncate_prompt_tokens": -1, "normalize": false, "add_special_tokens": false});
    let (status, body) = server.post_json("/v1/embeddings", body).await;
    assert_eq!(status, 200, "{body}");
    let (_, request) = &backend.requests()[0];
    let pooling = request.pooling.unwrap();
    assert_eq!((pooling.normalize, pooling.truncate_prompt_tokens), (Some(false), Some(2048)));
    assert!(matches!(&request.prompt, Some(pb::generate_request::Prompt::Text(t)) if !t.add_special_tokens));
}

#[tokio::test]
async fn what_vllm_refuses_is_a_400_naming_the_field() {
    let (backend, server) = serve_with_pooling().await;
    let cases = [
        (json!({"model": "e"}), "input"),
        (json!({"model": "e", "input": []}), "input"),
        (json!({"model": "e", "input": ""}), "input"),
        (json!({"model": "e", "input": ["a", ""]}), "input"),
        (json!({"model": "e", "input": [1, -3]}), "input"),
        (json!({"model": "e", "input": [[1], "a"]}), "input"),
        (json!({"model": "e", "input": {"text": "a"}}), "input"),
        (json!({"model": "e", "input": "a", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": "e", "input": "a", "dimensions": 16}), "dimensions"),
        (json!({"model": "e", "input": "a", "truncate_prompt_tokens": 4096}), "truncate_prompt_tokens"),
        (json!({"model": "e", "input": "a", "user": 1}), "user"),
    ];
    for (body, field) in cases {
        let (status, reply) = server.post_json("/v1/embeddings", body.clone()).await;
        assert_eq!(error_of(status, &reply).2, Some(field), "{body} -> {reply}");
        assert_eq!(status, 400);
    }
    let (status, reply) =
        server.post_json("/v1/embeddings", json!({"model": "e", "input": "a", "dimensions": 8})).await;
    assert!(error_of(status, &reply).1.contains("does not support matryoshka representation"), "{reply}");
    assert!(backend.requests().is_empty(), "nothing refused reaches the backend");

    // The worker's refusals (too long, a token outside the vocabulary) are the input's.
    backend.script(|_| {
        Err(BackendError::InvalidRequest {
            message: "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens in the input for embedding generation. Please reduce the length of the input.".into(),
            param: Some("prompt".into()),
        })
    });
    let (status, reply) = server.post_json("/v1/embeddings", json!({"model": "e", "input": "long"})).await;
    let (status, message, param) = error_of(status, &reply);
    assert_eq!((status, param), (400, Some("input")));
    assert!(message.contains("maximum context length is 2048 tokens"), "{message}");
    assert_eq!(server.post_json("/v1/embeddings", json!({"model": "nope", "input": "a"})).await.0, 404);
}

#[tokio::test]
async fn each_kind_of_endpoint_refuses_a_model_served_for_the_other() {
    let (backend, server) = serve_with_pooling().await;
    let (status, reply) = server.post_json("/v1/embeddings", json!({"model": "m", "input": "a"})).await;
    assert_eq!(error_of(status, &reply), (400, "The model does not support Embeddings API", None));
    let generation = [
        ("/v1/completions", json!({"model": "e", "prompt": "a"}), "Completions API"),
        (
            "/v1/chat/completions",
            json!({"model": "e", "messages": [{"role": "user", "content": "a"}]}),
            "Chat Completions API",
        ),
        ("/v1/responses", json!({"model": "e", "input": "a"}), "Responses API"),
    ];
    for (path, body, api) in generation {
        let (status, reply) = server.post_json(path, body).await;
        assert_eq!(
            error_of(status, &reply),
            (400, format!("The model does not support {api}").as_str(), None),
            "{path}"
        );
    }
    assert!(backend.requests().is_empty());
}

#[tokio::test]
async fn a_replica_that_sends_no_vector_is_an_error_not_a_missing_entry() {
    let (backend, server) = serve_with_pooling().await;
    backend.script(|_| Ok(vec![started(2), finished(2, 0)]));
    let (status, reply) = server.post_json("/v1/embeddings", json!({"model": "e", "input": ["a", "b"]})).await;
    assert_eq!(status, 500, "{reply}");
}
