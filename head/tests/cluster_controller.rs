//! The controller against fake workers: placement with `StartReplica`, failures reported as the
//! deployment's message, `StopReplica` for removed deployments, one replica per CUDA device, and
//! replacement of replicas whose worker died.

mod cluster_common;

use std::time::Duration;

use cluster_common::*;
use lumen_head::backend::{Backend, BackendError};
use lumen_head::cluster::{DeploymentStatus, ReplicaState};

#[tokio::test]
async fn registered_worker_gets_start_replica_and_the_model_becomes_routable() {
    let llm = deployment("llm", "m", 1);
    let head = start_head(settings(), vec![llm.clone()]).await;
    assert_eq!(head.cluster.models()[0].max_model_len, 0, "no replica runs yet");
    assert_eq!(head.cluster.generate("m", chat_request("r0")).await.err(), Some(BackendError::NoReplica("m".into())));

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
    assert_eq!(head.cluster.generate("m", chat_request("r")).await.err(), Some(BackendError::NoReplica("m".into())));

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
