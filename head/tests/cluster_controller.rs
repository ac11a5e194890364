//! The controller against fake workers: placement with `StartReplica`, failures reported as the
//! deployment's message, `StopReplica` for removed deployments, one replica per CUDA device, GPU
//! placement, replacement of replicas whose worker died, rolling updates of changed deployments,
//! and health checks that replace stuck replicas.

mod cluster_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_common::*;
use lumen_head::backend::{Backend, BackendError};
use lumen_head::cluster::{Deployment, DeploymentStatus, ReplicaState};

#[tokio::test]
async fn registered_worker_gets_start_replica_and_the_model_becomes_routable() {
    let llm = deployment("llm", "m", 1);
    let head = start_head(settings(), vec![llm.clone()]).await;
    assert_eq!(head.cluster.models()[0].max_model_len, 0, "no replica runs yet");
    let refused = head.cluster.generate("m", chat_request("r0")).await.err();
    assert!(
        matches!(&refused, Some(BackendError::Unavailable(m)) if m.contains("no live worker is registered")),
        "{refused:?}"
    );

    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;

    let starts = worker.state.starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].engine_options_json, llm.engine_options_json, "sent verbatim");
    let suffix = starts[0].replica_id.strip_prefix("llm-").expect("id starts with the deployment");
    assert!(suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()), "{}", starts[0].replica_id);
    assert!(head.cluster.ready());
    let models = head.cluster.models();
    assert_eq!((models[0].id.as_str(), models[0].max_model_len), ("m", 2048));
    let snapshot = head.cluster.snapshot();
    assert_eq!(snapshot.deployments[0].status, DeploymentStatus::Healthy);
    assert_eq!(snapshot.replicas[0].state, ReplicaState::Running);
    assert_eq!(snapshot.replicas[0].worker_id, "w1");
}

#[tokio::test]
async fn failed_start_is_reported_as_the_deployment_message() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.script_start(StartScript::ReportFailure("out of memory loading weights".into()));
    worker.join(&head).await;
    eventually("the failure is recorded", || {
        head.cluster.snapshot().deployments[0].message.as_deref().is_some_and(|m| m.contains("out of memory"))
    })
    .await;

    let snapshot = head.cluster.snapshot();
    let message = snapshot.deployments[0].message.clone().unwrap_or_default();
    assert!(message.contains("out of memory loading weights") && message.contains("w1"), "{message}");
    assert_eq!(snapshot.deployments[0].status, DeploymentStatus::Unhealthy);
    assert!(snapshot.replicas.is_empty(), "a failed replica is not kept");
    let refused = head.cluster.generate("m", chat_request("r")).await.err();
    assert!(matches!(&refused, Some(BackendError::Unavailable(m)) if m.contains("out of memory")), "{refused:?}");

    // Once the worker can load it, a retry (after the backoff) succeeds and clears the message.
    worker.script_start(StartScript::Run);
    until_routable(&head, "llm", 1).await;
    eventually("the message clears", || head.cluster.snapshot().deployments[0].message.is_none()).await;
}

#[tokio::test]
async fn replicas_of_a_removed_deployment_are_stopped() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1), deployment("other", "o", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    until_routable(&head, "other", 1).await;
    let llm_replica = worker.hosted_ids().into_iter().find(|id| id.starts_with("llm-")).expect("llm placed");

    head.cluster.set_deployments(vec![deployment("other", "o", 1)]).expect("valid");
    eventually("StopReplica reaches the worker", || !worker.state.stops.lock().unwrap().is_empty()).await;
    assert_eq!(worker.state.stops.lock().unwrap()[0].replica_id, llm_replica);
    eventually("the stopped replica is forgotten", || head.cluster.snapshot().replicas.len() == 1).await;
    assert_eq!(
        head.cluster.generate("m", chat_request("r")).await.err(),
        Some(BackendError::ModelNotFound("m".into()))
    );
    assert_eq!(worker.state.stops.lock().unwrap().len(), 1, "the other deployment is untouched");
}

#[tokio::test]
async fn scaling_down_stops_surplus_replicas() {
    let head = start_head(settings(), vec![deployment("llm", "m", 3)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 3).await;
    head.cluster.set_deployments(vec![deployment("llm", "m", 1)]).expect("valid");
    eventually("two replicas are stopped", || worker.state.stops.lock().unwrap().len() == 2).await;
    until_routable(&head, "llm", 1).await;
    assert_eq!(worker.state.starts.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn cuda_worker_hosts_one_replica_per_device() {
    let head = start_head(settings(), vec![deployment("llm", "m", 2)]).await;
    let mut gpu = FakeWorker::start("gpu").await;
    gpu.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 1).await;
    eventually("the missing replica is explained", || {
        head.cluster.snapshot().deployments[0].message.as_deref().is_some_and(|m| m.contains("free device"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gpu.state.starts.lock().unwrap().len(), 1);

    // A CPU worker takes the second one.
    let mut cpu = FakeWorker::start("cpu").await;
    cpu.join(&head).await;
    until_routable(&head, "llm", 2).await;
    assert_eq!(cpu.state.starts.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn replica_of_a_dead_worker_is_replaced_on_a_live_one() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut first = FakeWorker::start("a").await;
    first.join(&head).await;
    until_routable(&head, "llm", 1).await;
    let mut second = FakeWorker::start("b").await;
    second.join(&head).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(second.state.starts.lock().unwrap().is_empty(), "the deployment was already satisfied");

    first.stop_heartbeats();
    eventually("a replacement starts on the live worker", || second.state.starts.lock().unwrap().len() == 1).await;
    until_routable(&head, "llm", 1).await;
    let events = collect(head.cluster.generate("m", chat_request("r")).await.expect("routable")).await;
    assert!(events.iter().all(Result::is_ok));
    assert_eq!(second.state.generates.lock().unwrap().len(), 1);
}

fn status_of(head: &TestHead) -> (DeploymentStatus, String) {
    let snapshot = head.cluster.snapshot();
    (snapshot.deployments[0].status, snapshot.deployments[0].message.clone().unwrap_or_default())
}

fn with_options(mut d: Deployment, max_model_len: u32) -> Deployment {
    let model = d.model_name.clone();
    d.engine_options_json =
        serde_json::json!({ "source": "fake.gguf", "served_model_name": model, "max_model_len": max_model_len })
            .to_string();
    d
}

/// Sends a request every few milliseconds until stopped; returns how many failed, and why.
fn keep_requesting(head: &TestHead, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    let cluster = head.cluster.clone();
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            match cluster.generate("m", chat_request(&format!("bg-{i}"))).await {
                Err(e) => failures.push(e.to_string()),
                Ok(stream) => {
                    failures.extend(collect(stream).await.into_iter().filter_map(|e| e.err()).map(|e| e.to_string()))
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failures
    })
}

#[tokio::test]
async fn changed_engine_options_roll_the_replicas_one_at_a_time_while_serving() {
    let mut llm = deployment("llm", "m", 2);
    llm.graceful_shutdown_timeout = Duration::from_secs(7);
    let head = start_head(settings(), vec![llm.clone()]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 2).await;
    let old = worker.hosted_ids();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = keep_requesting(&head, stop.clone());

    let loading = Gate::closed();
    worker.script_start(StartScript::RunWhenOpened(loading.clone()));
    let updated = with_options(llm, 4096);
    head.cluster.set_deployments(vec![updated.clone()]).expect("valid");
    eventually("a replica with the new options starts", || worker.state.starts.lock().unwrap().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(worker.state.starts.lock().unwrap().len(), 3, "one new replica at a time");
    assert!(worker.state.stops.lock().unwrap().is_empty(), "no old replica stops before a new one runs");
    let (status, message) = status_of(&head);
    assert_eq!(status, DeploymentStatus::Updating);
    assert!(message.contains("updating to a new version: 0 of 2"), "{message}");
    assert_eq!(head.cluster.snapshot().deployments[0].running_replicas, 2, "the old replicas keep serving");

    loading.open();
    eventually("both old replicas are replaced", || {
        let stopped: Vec<String> = worker.state.stops.lock().unwrap().iter().map(|s| s.replica_id.clone()).collect();
        old.iter().all(|id| stopped.contains(id)) && worker.state.starts.lock().unwrap().len() == 4
    })
    .await;
    eventually("the deployment is healthy again", || status_of(&head) == (DeploymentStatus::Healthy, String::new()))
        .await;
    stop.store(true, Ordering::SeqCst);
    let failures = traffic.await.expect("traffic task");
    assert!(failures.is_empty(), "requests failed during the rollout: {failures:?}");

    let starts = worker.state.starts.lock().unwrap().clone();
    assert!(starts[2..].iter().all(|s| s.engine_options_json == updated.engine_options_json));
    let stops = worker.state.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 2);
    assert!(stops.iter().all(|s| s.drain_timeout_ms == 7000), "drained for graceful_shutdown_timeout: {stops:?}");
    assert_eq!(head.cluster.models()[0].max_model_len, 4096, "the new version serves");
}

#[tokio::test]
async fn changing_only_the_replica_count_scales_without_replacing() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    let loading = Gate::closed();
    worker.script_start(StartScript::RunWhenOpened(loading.clone()));
    head.cluster.set_deployments(vec![deployment("llm", "m", 3)]).expect("valid");
    eventually("two more replicas start", || worker.state.starts.lock().unwrap().len() == 3).await;
    assert_eq!(status_of(&head).0, DeploymentStatus::Upscaling);
    assert_eq!(head.cluster.snapshot().deployments[0].target_replicas, 3);
    loading.open();
    until_routable(&head, "llm", 3).await;
    eventually("healthy", || status_of(&head).0 == DeploymentStatus::Healthy).await;
    assert!(worker.state.stops.lock().unwrap().is_empty(), "nothing was replaced");
}

/// A worker `a` whose health checks fail as `script` says loses its replica to worker `b`.
async fn stuck_replica_is_replaced(script: HealthScript, expected_reason: &str) {
    let mut llm = deployment("llm", "m", 1);
    llm.health_check_period = Duration::from_millis(100);
    llm.health_check_timeout = Duration::from_millis(500);
    let head = start_head(settings(), vec![llm]).await;
    let mut a = FakeWorker::start("a").await;
    a.join(&head).await;
    until_routable(&head, "llm", 1).await;
    let stuck = a.hosted_ids()[0].clone();
    let mut b = FakeWorker::start("b").await;
    b.join(&head).await;
    eventually("health checks run", || a.state.health_checks.lock().unwrap().len() >= 2).await;
    assert!(b.state.starts.lock().unwrap().is_empty(), "a healthy replica is left alone");

    let stopping = Gate::closed();
    a.gate_stops(Some(stopping.clone()));
    a.script_health(script);
    eventually("a replacement starts on the other worker", || b.state.starts.lock().unwrap().len() == 1).await;
    until_routable(&head, "llm", 1).await;
    let snapshot = head.cluster.snapshot();
    let old = snapshot.replicas.iter().find(|r| r.replica_id == stuck).expect("still stopping");
    assert_eq!(old.state, ReplicaState::Stopping);
    let message = old.message.clone().unwrap_or_default();
    assert!(message.starts_with("health check failed: ") && message.contains(expected_reason), "{message}");
    let before = a.generates_for(&stuck);
    let events = collect(head.cluster.generate("m", chat_request("after")).await.expect("routable")).await;
    assert!(events.iter().all(Result::is_ok));
    assert_eq!(a.generates_for(&stuck), before, "the unhealthy replica takes no request");

    stopping.open();
    eventually("the stuck replica is gone", || head.cluster.snapshot().replicas.len() == 1).await;
    let stops = a.state.stops.lock().unwrap().clone();
    assert_eq!(
        (stops[0].replica_id.as_str(), stops[0].drain_timeout_ms),
        (stuck.as_str(), 0),
        "stopped without a drain"
    );
}

#[tokio::test]
async fn a_replica_whose_engine_reports_stuck_is_replaced() {
    stuck_replica_is_replaced(HealthScript::Stuck("the engine is stuck".into()), "the engine is stuck").await;
}

#[tokio::test]
async fn a_replica_whose_health_check_hangs_is_replaced() {
    stuck_replica_is_replaced(HealthScript::Hang, "no answer within 500 ms").await;
}

#[tokio::test]
async fn gpu_replicas_go_only_to_free_devices_and_wait_for_capacity() {
    let mut llm = deployment("llm", "m", 2);
    llm.gpus_per_replica = 1.0;
    let head = start_head(settings(), vec![llm]).await;
    let mut cpu = FakeWorker::start("cpu").await;
    cpu.join(&head).await;
    eventually("the missing GPUs are explained", || {
        let (status, message) = status_of(&head);
        status == DeploymentStatus::Unhealthy
            && message.contains("waiting for capacity: 0 of 2")
            && message.contains("GPU")
    })
    .await;
    let mut gpu = FakeWorker::start("gpu").await;
    gpu.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 1).await;
    eventually("one replica still waits", || status_of(&head).1.contains("waiting for capacity: 1 of 2")).await;
    let mut second = FakeWorker::start("gpu2").await;
    second.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 2).await;
    eventually("healthy", || status_of(&head).0 == DeploymentStatus::Healthy).await;
    assert!(cpu.state.starts.lock().unwrap().is_empty(), "a GPU replica never goes to a CPU worker");
    assert_eq!((gpu.state.starts.lock().unwrap().len(), second.state.starts.lock().unwrap().len()), (1, 1));
}

#[tokio::test]
async fn replica_of_a_dead_worker_without_capacity_elsewhere_leaves_the_deployment_unhealthy() {
    let mut llm = deployment("llm", "m", 1);
    llm.gpus_per_replica = 1.0;
    let head = start_head(settings(), vec![llm]).await;
    let mut first = FakeWorker::start("a").await;
    first.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 1).await;
    first.stop_heartbeats();
    eventually("the deployment says what is missing", || {
        let (status, message) = status_of(&head);
        status == DeploymentStatus::Unhealthy && message.contains("waiting for capacity: 0 of 1")
    })
    .await;
    let mut second = FakeWorker::start("b").await;
    second.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 1).await;
    assert_eq!(second.state.starts.lock().unwrap().len(), 1);
}
