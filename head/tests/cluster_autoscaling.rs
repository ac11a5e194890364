//! The autoscaler against fake workers: replicas follow the ongoing requests within
//! [min_replicas, max_replicas] after the up/downscale delays, the status says UPSCALING or
//! DOWNSCALING meanwhile, a scale-down drains its replica so no request fails, and an upscale
//! beyond the cluster's capacity waits for it.

mod cluster_common;

use std::time::Duration;

use cluster_common::*;
use lumen_head::backend::{Backend, EventStream};
use lumen_head::cluster::{Deployment, DeploymentStatus};
use lumen_head::config::AutoscalingConfig;
use lumen_proto::v1 as pb;

fn autoscaled(min: u32, max: u32, target_ongoing: f64, upscale_delay_s: f64, downscale_delay_s: f64) -> Deployment {
    Deployment {
        autoscaling: Some(AutoscalingConfig {
            min_replicas: min,
            initial_replicas: None,
            max_replicas: max,
            target_ongoing_requests: target_ongoing,
            upscale_delay_s,
            downscale_delay_s,
            ..AutoscalingConfig::default()
        }),
        graceful_shutdown_timeout: Duration::from_secs(10),
        ..deployment("llm", "m", min)
    }
}

fn deployment_state(head: &TestHead) -> (DeploymentStatus, u32, String) {
    let snapshot = head.cluster.snapshot();
    let d = &snapshot.deployments[0];
    (d.status, d.target_replicas, d.message.clone().unwrap_or_default())
}

/// Opens `count` generate streams and keeps them open (the fake worker must hold them).
async fn open_streams(head: &TestHead, prefix: &str, count: usize) -> Vec<EventStream> {
    let mut streams = Vec::new();
    for i in 0..count {
        let mut request = chat_request(&format!("{prefix}-{i}"));
        // Distinct prompts, so no prefix affinity pins them to one replica.
        request.prompt = Some(pb::generate_request::Prompt::Text(pb::TextPrompt {
            text: format!("{prefix} request number {i}"),
            add_special_tokens: true,
        }));
        streams.push(head.cluster.generate("m", request).await.expect("routable"));
    }
    streams
}

fn finished_cleanly(events: &[Result<pb::GenerateEvent, lumen_head::backend::BackendError>]) -> bool {
    events.iter().all(Result::is_ok)
        && matches!(events.last(), Some(Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Finished(_)) })))
}

#[tokio::test]
async fn replicas_follow_the_load_within_bounds() {
    let head = start_head(settings(), vec![autoscaled(1, 3, 1.0, 0.2, 0.3)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    assert_eq!(deployment_state(&head).1, 1, "starts at min_replicas");

    // Five requests in flight ask for five replicas; three is the maximum.
    let loading = Gate::closed();
    worker.script_start(StartScript::RunWhenOpened(loading.clone()));
    worker.script_generate(GenerateScript::Hold);
    let held = open_streams(&head, "load", 5).await;
    eventually("the target goes up to max_replicas", || deployment_state(&head).1 == 3).await;
    assert_eq!(deployment_state(&head).0, DeploymentStatus::Upscaling);
    loading.open();
    until_routable(&head, "llm", 3).await;
    eventually("healthy at the new target", || deployment_state(&head).0 == DeploymentStatus::Healthy).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deployment_state(&head).1, 3, "never beyond max_replicas");
    assert_eq!(worker.state.starts.lock().unwrap().len(), 3);

    // The load goes away: back to min_replicas after the downscale delay, draining two replicas.
    let draining = Gate::closed();
    worker.gate_stops(Some(draining.clone()));
    drop(held);
    eventually("the target goes down to min_replicas", || deployment_state(&head).1 == 1).await;
    eventually("two replicas drain", || worker.state.stops.lock().unwrap().len() == 2).await;
    assert_eq!(deployment_state(&head).0, DeploymentStatus::Downscaling);
    draining.open();
    eventually("healthy at min_replicas", || deployment_state(&head).0 == DeploymentStatus::Healthy).await;
    until_routable(&head, "llm", 1).await;
    let stops = worker.state.stops.lock().unwrap().clone();
    assert!(stops.iter().all(|s| s.drain_timeout_ms == 10_000), "drained for graceful_shutdown_timeout: {stops:?}");
}

#[tokio::test]
async fn a_scale_down_drains_its_replica_and_no_request_fails() {
    let head = start_head(settings(), vec![autoscaled(1, 2, 2.0, 0.2, 0.5)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    worker.script_generate(GenerateScript::Hold);
    let held = open_streams(&head, "load", 4).await;
    until_routable(&head, "llm", 2).await;

    // Two slow requests, one per replica (the router takes the idle one), make the load 2: one
    // replica is enough, so one of them drains while its request is still streaming.
    drop(held);
    worker.script_generate(GenerateScript::Slow { deltas: 100, every: Duration::from_millis(50) });
    let slow = open_streams(&head, "slow", 2).await;
    let replicas: Vec<String> =
        worker.state.generates.lock().unwrap().iter().rev().take(2).map(|g| g.replica_id.clone()).collect();
    assert_ne!(replicas[0], replicas[1], "the router spread the two requests: {replicas:?}");

    eventually("one replica drains", || worker.state.stops.lock().unwrap().len() == 1).await;
    let drained = worker.state.stops.lock().unwrap()[0].clone();
    assert_eq!(drained.drain_timeout_ms, 10_000);
    assert_eq!(worker.state.active_at_stop.lock().unwrap()[&drained.replica_id], 1, "it had a request in flight");
    let (status, target, _) = deployment_state(&head);
    assert_eq!(target, 1);
    assert_eq!(status, DeploymentStatus::Downscaling, "while it drains");

    // New requests go to the remaining replica only.
    worker.script_generate(GenerateScript::Finish { deltas: 2 });
    let routed_before = worker.generates_for(&drained.replica_id);
    for stream in open_streams(&head, "after", 3).await {
        assert!(finished_cleanly(&collect(stream).await));
    }
    assert_eq!(worker.generates_for(&drained.replica_id), routed_before, "the draining replica takes nothing new");

    for stream in slow {
        let events = collect(stream).await;
        assert!(finished_cleanly(&events), "a request failed during the scale-down: {:?}", events.last());
        assert_eq!(events.len(), 102, "started, every delta, finished");
    }
    eventually("the drained replica is gone", || head.cluster.snapshot().replicas.len() == 1).await;
    eventually("healthy", || deployment_state(&head).0 == DeploymentStatus::Healthy).await;
}

#[tokio::test]
async fn an_upscale_beyond_the_cluster_waits_for_capacity() {
    let mut llm = autoscaled(1, 3, 1.0, 0.1, 60.0);
    llm.gpus_per_replica = 1.0;
    let head = start_head(settings(), vec![llm]).await;
    let mut gpu = FakeWorker::start("gpu").await;
    gpu.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 1).await;
    gpu.script_generate(GenerateScript::Hold);
    let _held = open_streams(&head, "load", 3).await;
    eventually("the autoscaler wants three replicas", || deployment_state(&head).1 == 3).await;
    eventually("the missing capacity is explained", || {
        deployment_state(&head).2.contains("waiting for capacity: 1 of 3")
    })
    .await;
    assert_eq!(deployment_state(&head).0, DeploymentStatus::Upscaling);

    let mut more = FakeWorker::start("gpu2").await;
    more.join_as(&head, "cuda", 1).await;
    until_routable(&head, "llm", 2).await;
    eventually("one replica still waits", || deployment_state(&head).2.contains("waiting for capacity: 2 of 3")).await;
    assert_eq!(more.state.starts.lock().unwrap().len(), 1);
}
