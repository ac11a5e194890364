//! Failures over HTTP: every refusal answers OpenAI's error body with the right status and
//! names the offending parameter; backend errors keep their meaning.

mod api_support;

use std::time::Duration;

use api_support::*;
use lumen_head::api::ApiConfig;
use lumen_head::api::generate::admission::AdmissionLimits;
use lumen_head::backend::BackendError;
use serde_json::json;

fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(error["type"], want_type, "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
}

#[tokio::test]
async fn bad_inputs_answer_400_naming_the_parameter() {
    let (backend, server) = serve_default().await;
    let chat = |extra: serde_json::Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        ("/v1/chat/completions", chat(json!({"temperature": "hot"})), "temperature"),
        ("/v1/chat/completions", chat(json!({"temperature": -1})), "temperature"),
        ("/v1/chat/completions", chat(json!({"top_p": 2})), "top_p"),
        ("/v1/chat/completions", chat(json!({"n": 0})), "n"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 0})), "max_tokens"),
        ("/v1/chat/completions", chat(json!({"max_completion_tokens": -3})), "max_completion_tokens"),
        ("/v1/chat/completions", chat(json!({"presence_penalty": 9})), "presence_penalty"),
        ("/v1/chat/completions", chat(json!({"stop": {"a": 1}})), "stop"),
        ("/v1/chat/completions", chat(json!({"logit_bias": {"not-a-token": 1}})), "logit_bias"),
        ("/v1/chat/completions", chat(json!({"top_logprobs": 3})), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"logprobs": true, "top_logprobs": 50})), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"stream_options": {"include_usage": true}})), "stream_options"),
        ("/v1/chat/completions", chat(json!({"messages": []})), "messages"),
        ("/v1/chat/completions", json!({"model": "m"}), "messages"),
        ("/v1/chat/completions", chat(json!({"messages": "hi"})), "messages"),
        (
            "/v1/chat/completions",
            chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            "messages[0].content[0]",
        ),
        ("/v1/completions", json!({"model": "m"}), "prompt"),
        ("/v1/completions", json!({"model": "m", "prompt": [1, "a"]}), "prompt"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "seed": "s"}), "seed"),
        ("/v1/completions", json!({"model": "m", "prompt": "x", "min_tokens": 20, "max_tokens": 3}), "min_tokens"),
    ];
    for (path, body, param) in cases {
        let (status, reply) = server.post_json(path, body.clone()).await;
        assert_error(status, &reply, 400, "invalid_request_error");
        assert_eq!(reply["error"]["param"], param, "{body} -> {reply}");
    }
    assert!(backend.requests().is_empty(), "nothing invalid reached the backend");
}

#[tokio::test]
async fn malformed_json_is_400_not_422() {
    let (_backend, server) = serve_default().await;
    for raw in ["{\"model\": ", "[1,2]", "", "null"] {
        let response = server
            .client
            .post(server.at("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_error(status, &body, 400, "invalid_request_error");
    }
}

#[tokio::test]
async fn api_keys_guard_v1_routes_only() {
    let backend = FakeBackend::new(&["m"]);
    let config = ApiConfig { api_keys: vec!["k1".into(), "k2".into()], ..ApiConfig::default() };
    let server = serve(backend, config).await;
    let body = json!({"model": "m", "prompt": "x"});
    let send = |key: Option<&'static str>| {
        let mut request = server.client.post(server.at("/v1/completions")).json(&body);
        if let Some(key) = key {
            request = request.header("authorization", key);
        }
        request.send()
    };
    for key in [None, Some("Bearer nope"), Some("k1"), Some("Bearer k1x")] {
        let response = send(key).await.unwrap();
        let status = response.status().as_u16();
        assert_error(status, &response.json().await.unwrap(), 401, "authentication_error");
    }
    assert_eq!(send(Some("Bearer k1")).await.unwrap().status(), 200);
    assert_eq!(send(Some("Bearer k2")).await.unwrap().status(), 200);
    let models = server.client.get(server.at("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let health = server.client.get(server.at("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "probes need no key");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let (_backend, server) = serve_default().await;
    let (status, body) = server.post_json("/v1/completions", json!({"model": "nope", "prompt": "x"})).await;
    assert_error(status, &body, 404, "not_found_error");
    assert_eq!(body["error"]["param"], "model");
    let (status, body) =
        server.post_json("/v1/completions", json!({"model": "nope", "prompt": "x", "stream": true})).await;
    assert_error(status, &body, 404, "not_found_error");
}

#[tokio::test]
async fn unknown_route_is_404_with_an_error_body() {
    let (_backend, server) = serve_default().await;
    let response = server.client.get(server.at("/v1/nothing")).send().await.unwrap();
    let status = response.status().as_u16();
    assert_error(status, &response.json().await.unwrap(), 404, "not_found_error");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend.clone(), ApiConfig { max_body_bytes: 1024, ..ApiConfig::default() }).await;
    let (status, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x".repeat(4096)})).await;
    assert_error(status, &body, 413, "invalid_request_error");
    assert!(backend.requests().is_empty());
    let (status, _) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x"})).await;
    assert_eq!(status, 200, "small bodies still pass");
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(1), Item::Hang]));
    let config = ApiConfig { admission: AdmissionLimits { max_in_flight: 1, max_queued: 1 }, ..ApiConfig::default() };
    let server = serve(backend.clone(), config).await;
    let body = json!({"model": "m", "prompt": "x", "stream": true});
    let running = server.post("/v1/completions", body.clone()).await;
    assert_eq!(running.status(), 200);
    let queued = server.post("/v1/completions", body.clone()).await;
    assert_eq!(queued.status(), 200, "a queued stream starts at once");
    let refused = server.post("/v1/completions", body.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_error(429, &body, 429, "rate_limit_error");
    assert_eq!(backend.requests().len(), 1, "only the running request reached the backend");
    drop((running, queued));
}

#[tokio::test]
async fn backend_errors_keep_their_status() {
    let cases = [
        (BackendError::NoReplica("m".into()), 503, "service_unavailable_error"),
        (BackendError::Unavailable("worker lost".into()), 503, "service_unavailable_error"),
        (BackendError::Overloaded("replica queues full".into()), 429, "rate_limit_error"),
        (BackendError::Internal("bug".into()), 500, "server_error"),
        (
            BackendError::InvalidRequest {
                message: "prompt + max_tokens > 2048".into(),
                param: Some("max_tokens".into()),
            },
            400,
            "invalid_request_error",
        ),
    ];
    for (error, status, kind) in cases {
        let (backend, server) = serve_default().await;
        let e = error.clone();
        backend.script(move |_| Err(e.clone()));
        let (got, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x"})).await;
        assert_error(got, &body, status, kind);
        let (got, body) =
            server.post_json("/v1/completions", json!({"model": "m", "prompt": "x", "stream": true})).await;
        assert_error(got, &body, status, kind);
        if status == 400 {
            assert_eq!(body["error"]["param"], "max_tokens");
        }
    }
}

#[tokio::test]
async fn a_mid_stream_failure_ends_with_an_error_event_then_done() {
    let (backend, server) = serve_default().await;
    backend
        .script(|_| Ok(vec![started(1), delta(0, "par"), Item::Fail(BackendError::Unavailable("worker died".into()))]));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true});
    let (status, sse) = stream(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(joined(&sse.chunks, 0, "/delta/content"), "par");
    let error = sse.chunks.last().unwrap();
    assert_eq!(error["error"]["type"], "service_unavailable_error", "{}", sse.raw);
    assert!(error["error"]["message"].as_str().unwrap().contains("worker died"));
    assert!(sse.done);
}

#[tokio::test]
async fn a_stream_that_stops_without_finishing_is_reported() {
    let (backend, server) = serve_default().await;
    backend.script(|_| Ok(vec![started(1), delta(0, "cut")]));
    let (_, sse) = stream(&server, "/v1/completions", json!({"model": "m", "prompt": "x", "stream": true})).await;
    assert!(sse.chunks.last().unwrap().get("error").is_some(), "{}", sse.raw);
    assert!(sse.done);
    let (status, body) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x"})).await;
    assert_error(status, &body, 503, "service_unavailable_error");
}

#[tokio::test]
async fn a_queued_request_that_fails_reports_it_in_the_stream() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| {
        let slow = Item::Sleep(Duration::from_millis(200));
        Ok(vec![started(1), slow, last(0, "a", lumen_proto::v1::FinishReason::Stop), finished(1, 1)])
    });
    let config = ApiConfig { admission: AdmissionLimits { max_in_flight: 1, max_queued: 4 }, ..ApiConfig::default() };
    let server = serve(backend.clone(), config).await;
    let first = server.post("/v1/completions", json!({"model": "m", "prompt": "x", "stream": true}));
    let second = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend.script(|_| Err(BackendError::NoReplica("m".into())));
        stream(&server, "/v1/completions", json!({"model": "m", "prompt": "x", "stream": true})).await
    };
    let (first, (status, sse)) = tokio::join!(first, second);
    assert_eq!(first.status(), 200);
    assert_eq!(status, 200, "the queued stream had started");
    assert_eq!(sse.chunks.last().unwrap()["error"]["type"], "service_unavailable_error", "{}", sse.raw);
    assert!(sse.done);
}

/// A deployment's `migration_limit` (its serve config's `model:` section) is the limit its
/// requests move under, whatever `--migration-limit` says; a deployment without one takes the
/// head's. The fake fails each stream after one token, and continues a resumed one.
#[tokio::test]
async fn a_deployments_migration_limit_from_the_serve_config_is_the_one_in_force() {
    use lumen_head::config::ServeConfig;
    use lumen_head::plan::plans_from_config;
    use lumen_proto::v1 as pb;

    let serve_config = ServeConfig::from_yaml(
        "applications:\n  - name: a\n    deployments:\n\
         \x20     - {name: on, model: {source: m.gguf, served_model_name: on, migration_limit: 2}}\n\
         \x20     - {name: off, model: {source: m.gguf, served_model_name: off, migration_limit: 0}}\n\
         \x20     - {name: inherits, model: {source: m.gguf, served_model_name: inherits}}\n",
    )
    .unwrap();
    let plans = plans_from_config(&serve_config).unwrap();
    let models: std::collections::HashMap<_, _> = plans.into_iter().map(|p| (p.deployment.model_name, p.api)).collect();
    let fails_once = |request: &pb::GenerateRequest| {
        Ok(match &request.resume {
            None => vec![
                Item::Event(pb::generate_event::Event::Started(pb::Started {
                    prompt_tokens: 1,
                    prompt_token_ids: vec![1],
                    ..Default::default()
                })),
                delta(0, "moved "),
                Item::Fail(BackendError::Unavailable("worker died".into())),
            ],
            Some(_) => vec![
                Item::Event(pb::generate_event::Event::Started(pb::Started {
                    prompt_tokens: 1,
                    resumed_tokens: 1,
                    ..Default::default()
                })),
                last(0, "on", lumen_proto::v1::FinishReason::Stop),
                finished(1, 2),
            ],
        })
    };
    for (head_limit, model, moves) in
        [(0, "on", true), (0, "inherits", false), (3, "off", false), (3, "inherits", true)]
    {
        let backend = FakeBackend::new(&["on", "off", "inherits"]);
        backend.script(fails_once);
        let config = ApiConfig { migration_limit: head_limit, models: models.clone(), ..Default::default() };
        let server = serve(backend.clone(), config).await;
        let body = json!({"model": model, "messages": [{"role": "user", "content": "x"}], "stream": true});
        let (status, sse) = stream(&server, "/v1/chat/completions", body).await;
        assert_eq!(status, 200);
        let case = format!("--migration-limit {head_limit}, model {model}: {}", sse.raw);
        assert_eq!(backend.requests().len(), if moves { 2 } else { 1 }, "{case}");
        if moves {
            assert_eq!(joined(&sse.chunks, 0, "/delta/content"), "moved on", "{case}");
            assert!(sse.chunks.iter().all(|c| c.get("error").is_none()), "{case}");
        } else {
            assert_eq!(sse.chunks.last().unwrap()["error"]["type"], "service_unavailable_error", "{case}");
        }
        assert!(sse.done, "{case}");
    }
}
