//! Hostile and malformed input over real HTTP (fake backend): each case of issue 8's list that
//! `api_errors.rs` does not already cover answers 400 (or 413) in OpenAI's shape, names the
//! parameter where there is one, and never reaches the backend nor brings the server down.

mod api_support;

use api_support::*;
use lumen_head::api::ApiConfig;
use serde_json::{Value, json};

/// Checks OpenAI's error shape and returns `error.param`.
fn refused(status: u16, body: &Value, want_status: u16) -> Value {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    error["param"].clone()
}

/// POSTs raw bytes as JSON and returns (status, JSON body).
async fn post_raw(server: &Server, path: &str, raw: Vec<u8>) -> (u16, Value) {
    let response = server
        .client
        .post(server.at(path))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    body
}

#[tokio::test]
async fn out_of_range_and_oversized_parameters_are_named() {
    let (backend, server) = serve_default().await;
    let stops: Vec<String> = (0..65).map(|i| format!("stop{i}")).collect();
    let bias: serde_json::Map<String, Value> = (0..5000).map(|i| (i.to_string(), json!(1))).collect();
    let cases = [
        ("/v1/chat/completions", chat(json!({"top_p": 0})), "top_p"),
        ("/v1/chat/completions", chat(json!({"top_p": -0.5})), "top_p"),
        ("/v1/chat/completions", chat(json!({"temperature": -0.01})), "temperature"),
        ("/v1/chat/completions", chat(json!({"n": 100000})), "n"),
        ("/v1/chat/completions", chat(json!({"n": 2.5})), "n"),
        ("/v1/chat/completions", chat(json!({"max_tokens": -1})), "max_tokens"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 1e30})), "max_tokens"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 2048})), "max_tokens"),
        ("/v1/chat/completions", chat(json!({"max_completion_tokens": 4096})), "max_completion_tokens"),
        ("/v1/chat/completions", chat(json!({ "stop": stops })), "stop"),
        ("/v1/chat/completions", chat(json!({ "logit_bias": bias })), "logit_bias"),
        ("/v1/chat/completions", chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})), "messages[0].role"),
        ("/v1/chat/completions", chat(json!({"messages": [{"role": "", "content": "hi"}]})), "messages[0].role"),
        ("/v1/chat/completions", chat(json!({"messages": [{"content": "hi"}]})), "messages[0].role"),
        ("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": 7}]})), "messages[0].content"),
        ("/v1/chat/completions", chat(json!({"messages": [1]})), "messages[0]"),
        ("/v1/chat/completions", chat(json!({"model": 5})), "model"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "max_tokens": 9999}), "max_tokens"),
        ("/v1/completions", json!({"model": "m", "prompt": vec![1; 2040], "max_tokens": 16}), "prompt"),
        ("/v1/completions", json!({"model": "m", "prompt": [[1, 2], vec![3; 2048]]}), "prompt"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "n": 129}), "n"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "stop_token_ids": vec![1; 65]}), "stop_token_ids"),
    ];
    for (path, body, param) in cases {
        let (status, reply) = server.post_json(path, body.clone()).await;
        let shown = body.to_string().chars().take(120).collect::<String>();
        assert_eq!(refused(status, &reply, 400), param, "{shown} -> {reply}");
    }
    assert!(backend.requests().is_empty(), "nothing invalid reached the backend");
    let (status, _) =
        server.post_json("/v1/completions", json!({"model": "m", "prompt": vec![1; 2032], "max_tokens": 16})).await;
    assert_eq!(status, 200, "a token prompt that exactly fits the context is served");
}

#[tokio::test]
async fn invalid_utf8_and_deep_nesting_are_400_not_a_crash() {
    let (backend, server) = serve_default().await;
    let mut invalid_utf8 = br#"{"model": "m", "prompt": ""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#""}"#);
    let deep_array =
        [b"{\"model\": \"m\", \"prompt\": ".to_vec(), vec![b'['; 10_000], vec![b']'; 10_000], b"}".to_vec()].concat();
    let deep_object = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes();
    let bare_brackets = vec![b'['; 100_000];
    for path in ["/v1/chat/completions", "/v1/completions", "/tokenize"] {
        for raw in [&invalid_utf8, &deep_array, &deep_object, &bare_brackets] {
            let (status, reply) = post_raw(&server, path, raw.clone()).await;
            refused(status, &reply, 400);
        }
    }
    assert!(backend.requests().is_empty());
    let (status, _) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "still up"})).await;
    assert_eq!(status, 200, "the server still answers after hostile bodies");
}

#[tokio::test]
async fn body_limit_applies_to_every_json_route() {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend.clone(), ApiConfig { max_body_bytes: 2048, ..ApiConfig::default() }).await;
    let big = "x".repeat(8192);
    for (path, body) in [
        ("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": big}]}))),
        ("/tokenize", json!({"model": "m", "prompt": big})),
        ("/detokenize", json!({"model": "m", "tokens": vec![1; 4000]})),
    ] {
        let (status, reply) = server.post_json(path, body).await;
        refused(status, &reply, 413);
    }
    assert!(backend.requests().is_empty());
}
