//! The control API (Ray Serve's `/api/serve/applications/` and `/api/cluster`) on a real
//! head-side stack: the cluster (gRPC + controller) with fake workers, the control router and the
//! OpenAI router over HTTP, and a state directory.

mod cluster_common;
mod control_support;

use std::time::Duration;

use cluster_common::*;
use control_support::*;
use lumen_head::state_store::StateStore;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn applications_are_deployed_served_and_removed_declaratively() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let workers = workers(&stack, 2).await;

    let chat = app("chat", "chat-model", 2, json!({"reasoning_parser": "deepseek_r1"}), json!({}));
    let code = app("code", "code-model", 1, json!({}), json!({"max_ongoing_requests": 1, "max_queued_requests": 0}));
    let (status, body) = stack.put(&config(&[chat.clone(), code])).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));

    let doc = stack.status_until("both applications run", |s| all_running(s, &[("chat", 2), ("code", 1)])).await;
    let chat_status = &doc["applications"]["chat"];
    assert_eq!(chat_status["deployed_app_config"], chat);
    assert_eq!(chat_status["route_prefix"], "/chat");
    assert_eq!(chat_status["deployments"]["llm"]["target_num_replicas"], 2);
    assert!(chat_status["last_deployed_time_s"].as_f64().unwrap() > 1.6e9);
    let replica = &chat_status["deployments"]["llm"]["replicas"][0];
    assert!(replica["replica_id"].as_str().unwrap().starts_with("chat-llm-"), "{replica}");
    assert_eq!(replica["node_ip"], "127.0.0.1");
    assert_eq!((doc["proxy_location"].as_str(), doc["target_capacity"].is_null()), (Some("EveryNode"), true));

    // Each model routes to its own replicas, with the API options its deployment was given.
    let (status, body) = stack.chat("chat-model").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["reasoning_content"], "t0t1t2");
    let (status, body) = stack.chat("code-model").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "t0t1t2");
    let routed: Vec<String> =
        workers.iter().flat_map(|w| w.state.generates.lock().unwrap().clone()).map(|g| g.replica_id).collect();
    assert!(routed.iter().any(|r| r.starts_with("chat-llm-")) && routed.iter().any(|r| r.starts_with("code-llm-")));

    // `code` admits one request and queues none: a second one while the first holds is a 429.
    for worker in &workers {
        worker.script_generate(GenerateScript::Hold);
    }
    let held = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.api))
        .json(&json!({"model": "code-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .expect("held stream");
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(stack.chat("code-model").await.0, StatusCode::TOO_MANY_REQUESTS);
    drop(held);
    for worker in &workers {
        worker.script_generate(GenerateScript::Finish { deltas: 3 });
    }

    // The cluster view: both workers, alive, with the replicas placed on them.
    let cluster: Value =
        stack.http.get(format!("{}/api/cluster", stack.control)).send().await.unwrap().json().await.unwrap();
    let listed = cluster["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|w| w["alive"] == true && w["resources"]["device_kind"] == "cpu"));
    let placed: usize = listed.iter().map(|w| w["replicas"].as_array().unwrap().len()).sum();
    assert_eq!(placed, 3);

    // A config without `code` removes it: gone from the status, its model unknown, and only
    // `chat` is persisted.
    assert_eq!(stack.put(&config(std::slice::from_ref(&chat))).await.0, StatusCode::OK);
    stack.status_until("`code` is gone", |s| all_running(s, &[("chat", 2)])).await;
    let (status, body) = stack.chat("code-model").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(stack.chat("chat-model").await.0, StatusCode::OK);
    let stored = StateStore::open(dir.path()).unwrap().load_serve_config().unwrap().expect("persisted");
    assert_eq!(stored.config, config(&[chat]));
}

#[tokio::test]
async fn an_invalid_config_is_refused_naming_the_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let _workers = workers(&stack, 1).await;
    let good = config(&[app("chat", "chat-model", 1, json!({}), json!({}))]);
    assert_eq!(stack.put(&good).await.0, StatusCode::OK);
    stack.status_until("chat runs", |s| all_running(s, &[("chat", 1)])).await;

    let cases = [
        (config(&[app("a", "m", 1, json!({}), json!({"num_replicas": "many"}))]), "num_replicas"),
        (config(&[app("a", "m", 1, json!({}), json!({"max_ongoing_requests": -3}))]), "max_ongoing_requests"),
        (json!({"applications": [{"name": "a", "deployments": [{"name": "d", "model": {}}]}]}), "model"),
        (config(&[app("a", "m", 1, json!({"reasoning_parser": "nope"}), json!({}))]), "reasoning parser"),
        (config(&[app("a", "m", 1, json!({}), json!({})), app("a", "n", 1, json!({}), json!({}))]), "unique"),
        (json!({"applications": 7}), "applications"),
        // Both deployments would be `a-b-c` in the cluster: refused before anything changes.
        (
            json!({"applications": [
                {"name": "a-b", "route_prefix": "/ab", "deployments": [{"name": "c", "model": {"source": "x.gguf"}}]},
                {"name": "a", "route_prefix": "/a", "deployments": [{"name": "b-c", "model": {"source": "y.gguf"}}]},
            ]}),
            "a-b-c",
        ),
        // A list is not a config (it used to be read as one with no applications).
        (json!([]), "must be an object"),
    ];
    for (bad, field) in cases {
        let (status, body) = stack.put(&bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let error: Value = serde_json::from_str(&body).expect("a JSON error body");
        let message = error["error"].as_str().expect("an error message");
        assert!(message.contains(field), "`{message}` should name `{field}`");
    }
    let not_json = stack.http.put(stack.applications_url()).body("{nope").send().await.unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);

    // Nothing changed: the running config and the persisted one are the good config.
    let doc = stack.status().await;
    assert!(all_running(&doc, &[("chat", 1)]), "{doc:#}");
    let stored = StateStore::open(dir.path()).unwrap().load_serve_config().unwrap().expect("persisted");
    assert_eq!(stored.config, good);
}

/// `structured_outputs_config` travels from the serve config to the constraint a replica is
/// sent; a bad one is refused naming its field (and the value) before anything changes.
#[tokio::test]
async fn a_deployments_structured_outputs_config_reaches_its_replica_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let workers = workers(&stack, 1).await;
    let settings = json!({"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": true}});
    let good = config(&[app("chat", "chat-model", 1, settings, json!({}))]);
    assert_eq!(stack.put(&good).await.0, StatusCode::OK);
    stack.status_until("chat runs", |s| all_running(s, &[("chat", 1)])).await;
    let body = json!({"model": "chat-model", "messages": [{"role": "user", "content": "hi"}],
                      "response_format": {"type": "json_object"}});
    let r = stack.http.post(format!("{}/v1/chat/completions", stack.api)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sent = workers[0].state.generates.lock().unwrap().last().cloned().expect("a generate call");
    let constraint = sent.structured_output.expect("the request's constraint");
    assert!(constraint.disable_any_whitespace && !constraint.disable_additional_properties, "{constraint:?}");

    let bad =
        config(&[app("chat", "chat-model", 1, json!({"structured_outputs_config": {"backend": "vllm"}}), json!({}))]);
    let (status, body) = stack.put(&bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().to_string();
    let field = "applications[0].deployments[0].model.structured_outputs_config.backend";
    assert!(message.contains(field) && message.contains("`vllm`"), "{message}");
    let stored = StateStore::open(dir.path()).unwrap().load_serve_config().unwrap().expect("persisted");
    assert_eq!(stored.config, good);
}

#[tokio::test]
async fn a_yaml_body_is_accepted_and_delete_removes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let _workers = workers(&stack, 1).await;
    let yaml = "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        model: {source: m.gguf, served_model_name: chat-model}\n";
    let r = stack
        .http
        .put(stack.applications_url())
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    stack.status_until("chat runs", |s| all_running(s, &[("chat", 1)])).await;

    let r = stack.http.delete(stack.applications_url()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    stack.status_until("nothing is left", |s| s["applications"].as_object().is_some_and(|a| a.is_empty())).await;
    assert_eq!(stack.chat("chat-model").await.0, StatusCode::NOT_FOUND);
    let stored = StateStore::open(dir.path()).unwrap().load_serve_config().unwrap().expect("persisted");
    assert_eq!(stored.config, json!({"applications": []}));
}

#[tokio::test]
async fn a_new_head_restores_the_persisted_config_and_serves_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let first = start_stack(dir.path()).await;
    let mut worker = FakeWorker::start("w0").await;
    worker.join(&first.head).await;
    let chat = app("chat", "chat-model", 1, json!({"reasoning_parser": "deepseek_r1"}), json!({}));
    assert_eq!(first.put(&config(std::slice::from_ref(&chat))).await.0, StatusCode::OK);
    let before = first.status_until("chat runs", |s| all_running(s, &[("chat", 1)])).await;
    drop(first);

    // A new stack on the same state directory knows the application before any worker joins.
    let second = start_stack(dir.path()).await;
    let restored = second.status().await;
    assert_eq!(restored["applications"]["chat"]["deployed_app_config"], chat);
    assert_eq!(
        restored["applications"]["chat"]["last_deployed_time_s"],
        before["applications"]["chat"]["last_deployed_time_s"]
    );
    // The worker re-registers with the replica it still hosts; the model serves without a new PUT.
    worker.join(&second.head).await;
    second.status_until("chat runs again", |s| all_running(s, &[("chat", 1)])).await;
    let (status, body) = second.chat("chat-model").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["reasoning_content"], "t0t1t2");
}

#[tokio::test]
async fn with_an_admin_token_only_mutations_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_guarded_stack(dir.path(), Some("admin-t0ken")).await;
    let _workers = workers(&stack, 1).await;
    let apps = config(&[app("chat", "chat-model", 1, json!({}), json!({}))]);
    let url = stack.applications_url();
    for request in [
        stack.http.put(&url).json(&apps),
        stack.http.put(&url).bearer_auth("admin-t0ke").json(&apps),
        stack.http.put(&url).bearer_auth("admin-t0ken2").json(&apps),
        stack.http.delete(&url),
        stack.http.delete(&url).header("authorization", "admin-t0ken"),
    ] {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.expect("JSON error body");
        assert!(body["error"].as_str().is_some_and(|m| m.contains("admin token")), "{body}");
    }
    assert!(stack.status().await["applications"].as_object().is_none_or(|a| a.is_empty()), "nothing was applied");
    for path in ["/api/serve/applications/", "/api/cluster", "/metrics", "/api/gcs_healthz"] {
        let response = stack.http.get(format!("{}{path}", stack.control)).send().await.expect("GET");
        assert_eq!(response.status(), StatusCode::OK, "GET {path} stays open");
    }
    let response = stack.http.put(&url).bearer_auth("admin-t0ken").json(&apps).send().await.expect("PUT");
    assert_eq!(response.status(), StatusCode::OK);
    stack.status_until("chat runs", |s| all_running(s, &[("chat", 1)])).await;
    let response = stack.http.delete(&url).bearer_auth("admin-t0ken").send().await.expect("DELETE");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn hostile_serve_configs_are_400_and_the_head_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let started = std::time::Instant::now();
    let deep_json = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let deep_yaml = format!("applications: {}1{}", "[".repeat(50_000), "]".repeat(50_000));
    let alias_bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n";
    let cases: [(&str, Vec<u8>); 5] = [
        ("application/json", deep_json.into_bytes()),
        ("application/yaml", deep_yaml.into_bytes()),
        ("application/yaml", alias_bomb.as_bytes().to_vec()),
        ("application/json", vec![0xff, 0xfe, b'{']),
        ("application/json", b"{\"applications\": \"many\"}".to_vec()),
    ];
    for (content_type, body) in cases {
        let r = stack
            .http
            .put(stack.applications_url())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("an answer");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{content_type}");
        let body: Value = r.json().await.expect("JSON error body");
        assert!(body["error"].is_string(), "{body}");
    }
    assert!(stack.status().await["applications"].as_object().is_none_or(|a| a.is_empty()), "nothing was applied");
    // Deep YAML nesting used to cost the parser seconds of CPU (quadratic in the depth).
    assert!(started.elapsed() < Duration::from_secs(2), "hostile configs took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_serve_config_whose_applications_cannot_be_saved_changes_neither_them_nor_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path()).await;
    let keys = |tenant: &str| json!([{"tenant": tenant, "key": format!("sk-{tenant}-0123456789")}]);
    let mut first = config(&[app("chat", "chat-model", 1, json!({}), json!({}))]);
    first["api_keys"] = keys("first");
    assert_eq!(stack.put(&first).await.0, StatusCode::OK);

    // The state directory can no longer take a serve config (its file is now a directory), but
    // it can take keys: the next config is refused as a whole.
    let saved = dir.path().join("serve-config.json");
    std::fs::remove_file(&saved).unwrap();
    std::fs::create_dir(&saved).unwrap();
    let mut second = config(&[app("other", "other-model", 1, json!({}), json!({}))]);
    second["api_keys"] = keys("second");
    let (status, body) = stack.put(&second).await;
    assert!(status.is_server_error(), "{status} {body}");

    let status = stack.status().await;
    assert!(status["applications"]["chat"].is_object() && status["applications"]["other"].is_null(), "{status}");
    let listing: Value =
        stack.http.get(format!("{}/api/lumen/keys", stack.control)).send().await.unwrap().json().await.unwrap();
    let tenants: Vec<&str> =
        listing["api_keys"].as_array().unwrap().iter().filter_map(|k| k["tenant"].as_str()).collect();
    assert_eq!(tenants, ["first"], "{listing}");
    let persisted = std::fs::read_to_string(dir.path().join("api-keys.json")).unwrap();
    assert!(persisted.contains("\"first\"") && !persisted.contains("\"second\""), "{persisted}");
}
