//! The head's queue across tenants, over HTTP on a real API server (a scripted backend behind
//! it, one slot for the model): requests that wait for the slot are released in turns weighted
//! by their keys' `weight` under `--queue-policy fair`, in arrival order under `fcfs`, and a
//! client that leaves the queue frees its place (the queue takes another request) without ever
//! reaching the backend. Under `fair` the requests carry their tenant to the worker, and a queue
//! one tenant filled gives another tenant's request the newest of its places (that request ends
//! with the full queue's error).

mod api_support;

use std::time::Duration;

use api_support::*;
use lumen_head::api::generate::admission::AdmissionLimits;
use lumen_head::api::generate::fair_queue::QueuePolicy;
use lumen_head::api::{ApiConfig, ApiState};
use lumen_proto::v1 as pb;
use serde_json::json;
use std::sync::Arc;
use tokio::task::JoinHandle;

const HEAVY: &str = "sk-heavy-tenant-key";
const LIGHT: &str = "sk-light-tenant-key";

/// One model with one slot and room for `max_queued` waiting requests; tenants `heavy`
/// (weight 1) and `light` (weight 2). The prompt `hang` holds its slot until its client leaves.
async fn start(policy: QueuePolicy, max_queued: usize) -> (Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|request| match &request.prompt {
        Some(pb::generate_request::Prompt::Text(t)) if t.text == "hang" => {
            Ok(vec![started(1), delta(0, "Hello"), Item::Hang])
        }
        _ => hello_world(request),
    });
    let config = ApiConfig {
        admission: AdmissionLimits { max_in_flight: 1, max_queued },
        queue_policy: policy,
        ..ApiConfig::default()
    };
    let server = serve(backend.clone(), config).await;
    let document = json!({"api_keys": [
        {"tenant": "heavy", "key": HEAVY},
        {"tenant": "light", "key": LIGHT, "weight": 2},
    ]});
    let keys = lumen_head::api::edge::keys::parse(&document).expect("keys");
    server.state.keys().replace(keys).expect("replace");
    (backend, server)
}

async fn send(server: &Server, key: &str, prompt: &str) -> reqwest::Response {
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": true});
    server.client.post(server.at("/v1/completions")).bearer_auth(key).json(&body).send().await.expect("request")
}

/// Takes the model's only slot with a request that holds it until dropped.
async fn hold(server: &Server) -> reqwest::Response {
    let mut held = send(server, HEAVY, "hang").await;
    assert_eq!(held.status(), 200);
    // Its first delta arrived: it runs, and holds the slot.
    let chunk = held.chunk().await.expect("body").expect("a first chunk");
    assert!(String::from_utf8_lossy(&chunk).contains("Hello"));
    held
}

/// Queues `prompt` as `key` (a queued stream answers 200 at once) and reads its body to the end.
async fn queue(server: &Server, key: &str, prompt: &str) -> JoinHandle<String> {
    let response = send(server, key, prompt).await;
    assert_eq!(response.status(), 200, "{prompt} is queued");
    tokio::spawn(async move { response.text().await.expect("body") })
}

/// Waits until `n` requests wait at the model's gate (the condition, not a time, is asserted).
async fn until_waiting(state: &ApiState, n: usize) {
    for _ in 0..1000 {
        if state.waiting("m") == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} requests wait, expected {n}", state.waiting("m"));
}

/// The prompts the backend received, in order.
fn sent(backend: &FakeBackend) -> Vec<String> {
    backend
        .requests()
        .into_iter()
        .map(|(_, r)| match r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => t.text,
            other => panic!("a text prompt, got {other:?}"),
        })
        .collect()
}

/// Holds the slot, queues six requests of `heavy` then three of `light`, frees the slot, and
/// returns the order in which the queued requests reached the backend.
async fn release_order(policy: QueuePolicy) -> Vec<String> {
    let (backend, server) = start(policy, 16).await;
    let held = hold(&server).await;
    let mut bodies = Vec::new();
    for i in 0..6 {
        bodies.push(queue(&server, HEAVY, &format!("heavy-{i}")).await);
    }
    for i in 0..3 {
        bodies.push(queue(&server, LIGHT, &format!("light-{i}")).await);
    }
    until_waiting(&server.state, 9).await;
    drop(held);
    for body in bodies {
        let sse = parse_sse(&body.await.unwrap());
        assert!(sse.done, "{}", sse.raw);
        assert_eq!(joined(&sse.chunks, 0, "/text"), "Hello world");
    }
    assert_eq!(server.state.waiting("m"), 0);
    let order = sent(&backend);
    assert_eq!(order[0], "hang");
    // Under the fair policy each request carries its key's tenant and weight to the worker,
    // whose scheduler shares its slots the same way; under fcfs none does.
    for ((_, request), prompt) in backend.requests().iter().zip(&order) {
        let expected = match (policy, prompt.starts_with("light")) {
            (QueuePolicy::Fcfs, _) => ("", 0),
            (QueuePolicy::Fair, true) => ("light", 2),
            (QueuePolicy::Fair, false) => ("heavy", 1),
        };
        assert_eq!((request.tenant.as_str(), request.tenant_weight), expected, "{prompt}");
    }
    order[1..].to_vec()
}

#[tokio::test]
async fn a_burst_of_one_tenant_waits_its_turns_behind_a_weighted_other() {
    let order = release_order(QueuePolicy::Fair).await;
    // `light` (weight 2) takes two releases for each of `heavy` while both wait, although its
    // requests arrived behind all six of heavy's.
    let expected = ["light-0", "heavy-0", "light-1", "light-2", "heavy-1", "heavy-2", "heavy-3", "heavy-4", "heavy-5"];
    assert_eq!(order, expected);
}

#[tokio::test]
async fn fcfs_releases_in_arrival_order_whoever_sent_them() {
    let order = release_order(QueuePolicy::Fcfs).await;
    let expected = ["heavy-0", "heavy-1", "heavy-2", "heavy-3", "heavy-4", "heavy-5", "light-0", "light-1", "light-2"];
    assert_eq!(order, expected);
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let (backend, server) = start(QueuePolicy::Fair, 2).await;
    let held = hold(&server).await;
    let leaving = send(&server, LIGHT, "light-gone").await;
    assert_eq!(leaving.status(), 200);
    let stays = queue(&server, HEAVY, "heavy-stays").await;
    until_waiting(&server.state, 2).await;
    let full = send(&server, LIGHT, "light-refused").await;
    assert_eq!(full.status(), 429, "the queue holds two");
    drop(leaving);
    until_waiting(&server.state, 1).await;
    // Its place is free again.
    let next = queue(&server, LIGHT, "light-next").await;
    until_waiting(&server.state, 2).await;
    drop(held);
    for body in [stays, next] {
        assert!(parse_sse(&body.await.unwrap()).done);
    }
    assert_eq!(server.state.waiting("m"), 0);
    // The request that left never ran; `light` (weight 2) still goes first.
    assert_eq!(sent(&backend), ["hang", "light-next", "heavy-stays"]);
}

#[tokio::test]
async fn a_full_queue_takes_a_place_from_the_tenant_that_filled_it() {
    let (backend, server) = start(QueuePolicy::Fair, 2).await;
    let held = hold(&server).await;
    let heavy = [queue(&server, HEAVY, "heavy-0").await, queue(&server, HEAVY, "heavy-1").await];
    until_waiting(&server.state, 2).await;
    // Heavy filled the queue; light's request takes heavy's newest place instead of a 429.
    let light = queue(&server, LIGHT, "light-0").await;
    let [oldest, newest] = heavy;
    let displaced = newest.await.unwrap();
    // Its stream (already 200) ends with the error event a full queue gives, then [DONE].
    assert!(
        displaced.contains("fewer requests waiting") && displaced.contains(r#""code":"queue_full""#),
        "{displaced}"
    );
    assert_eq!(server.state.waiting("m"), 2);
    // Heavy at or over its share of the places: its next request is the one refused.
    assert_eq!(send(&server, HEAVY, "heavy-2").await.status(), 429);
    drop(held);
    for body in [oldest, light] {
        assert!(parse_sse(&body.await.unwrap()).done);
    }
    let order = sent(&backend);
    assert_eq!(order.len(), 3, "{order:?}");
    assert!(order.contains(&"heavy-0".to_string()) && order.contains(&"light-0".to_string()));
    assert!(!order.contains(&"heavy-1".to_string()), "the displaced request never reached the backend");
}
