//! The small routes over HTTP: models, health probes, version, metrics, tokenize, detokenize.

mod api_support;

use std::sync::atomic::Ordering;

use api_support::*;
use lumen_head::api::ApiConfig;
use lumen_proto::v1 as pb;
use serde_json::json;

async fn get(server: &Server, path: &str) -> (u16, String) {
    let response = server.client.get(server.at(path)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn models_lists_every_deployed_model() {
    let backend = FakeBackend::new(&["a", "b"]);
    let server = serve(backend, ApiConfig::default()).await;
    let (status, text) = get(&server, "/v1/models").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "list");
    let first = &body["data"][0];
    assert_eq!(
        (
            first["id"].clone(),
            first["object"].clone(),
            first["created"].clone(),
            first["owned_by"].clone(),
            first["max_model_len"].clone()
        ),
        (json!("a"), json!("model"), json!(1_700_000_000u64), json!("lumen"), json!(2048))
    );
    assert_eq!(body["data"][1]["id"], "b");
}

#[tokio::test]
async fn health_follows_backend_readiness() {
    let (backend, server) = serve_default().await;
    assert_eq!(get(&server, "/health").await, (200, String::new()));
    assert_eq!(get(&server, "/-/healthz").await, (200, "success".to_string()));
    backend.ready.store(false, Ordering::SeqCst);
    assert_eq!(get(&server, "/health").await.0, 503);
    assert_eq!(get(&server, "/-/healthz").await.0, 503);
}

#[tokio::test]
async fn version_reports_the_configured_version() {
    let server = serve(FakeBackend::new(&["m"]), ApiConfig { version: "9.8.7".into(), ..ApiConfig::default() }).await;
    let (status, text) = get(&server, "/version").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), json!({"version": "9.8.7"}));
}

#[tokio::test]
async fn metrics_count_requests_by_route_model_and_code() {
    let (_backend, server) = serve_default().await;
    server.post_json("/v1/completions", json!({"model": "m", "prompt": "x"})).await;
    server.post_json("/v1/completions", json!({"model": "nope", "prompt": "x"})).await;
    stream(&server, "/v1/completions", json!({"model": "m", "prompt": "x", "stream": true})).await;
    let (status, text) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    let ok = r#"lumen_serve_num_router_requests_total{code="200",model="m",route="/v1/completions"} 2"#;
    let missing = r#"lumen_serve_num_router_requests_total{code="404",model="nope",route="/v1/completions"} 1"#;
    assert!(text.contains(ok), "{text}");
    assert!(text.contains(missing), "{text}");
    assert!(text.contains(r#"lumen_serve_request_latency_ms_count{model="m",route="/v1/completions"} 2"#), "{text}");
}

#[tokio::test]
async fn tokenize_accepts_a_prompt_or_messages() {
    let (backend, server) = serve_default().await;
    let (status, body) =
        server.post_json("/tokenize", json!({"model": "m", "prompt": "hi", "return_token_strs": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3], "token_strs": ["a", "b", "c"]}));
    let messages = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]});
    let (status, body) = server.post_json("/tokenize", messages).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_strs"], serde_json::Value::Null);
    let requests = backend.tokenize_requests.lock().unwrap().clone();
    assert!(
        matches!(&requests[0].input, Some(pb::tokenize_request::Input::Text(t)) if t.text == "hi" && t.add_special_tokens)
    );
    match &requests[1].input {
        Some(pb::tokenize_request::Input::Chat(chat)) => {
            assert!(chat.add_generation_prompt);
            let sent: serde_json::Value = serde_json::from_str(&chat.messages_json).unwrap();
            assert_eq!(sent, json!([{"role": "user", "content": "q"}]));
        }
        other => panic!("{other:?}"),
    }
    let (status, body) = server.post_json("/tokenize", json!({"model": "m"})).await;
    assert_eq!((status, body["error"]["param"].clone()), (400, json!("prompt")));
}

#[tokio::test]
async fn detokenize_returns_the_prompt_text() {
    let (_backend, server) = serve_default().await;
    let (status, body) = server.post_json("/detokenize", json!({"model": "m", "tokens": [4, 5]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"prompt": "text of [4, 5]"}));
    let (status, body) = server.post_json("/detokenize", json!({"model": "m", "tokens": [-1]})).await;
    assert_eq!((status, body["error"]["param"].clone()), (400, json!("tokens")));
    let (status, _) = server.post_json("/detokenize", json!({"model": "zzz", "tokens": [1]})).await;
    assert_eq!(status, 404);
}
