//! Worker membership against the head's gRPC `Head` service: admission (protocol version, join
//! token), liveness by heartbeat, and adoption of replicas a worker already hosts.

mod cluster_common;

use std::time::Duration;

use cluster_common::*;
use lumen_head::backend::{Backend, BackendError};
use lumen_head::cluster::{ClusterSettings, ReplicaState};
use lumen_proto::PROTOCOL_VERSION;
use lumen_proto::v1 as pb;
use pb::head_client::HeadClient;
use tonic::Code;

async fn head_client(head: &TestHead) -> HeadClient<tonic::transport::Channel> {
    HeadClient::connect(format!("http://{}", head.addr)).await.expect("connect head")
}

#[tokio::test]
async fn registration_with_another_protocol_version_is_refused_naming_both_versions() {
    let head = start_head(settings(), vec![]).await;
    let worker = FakeWorker::start("w1").await;
    let mut request = worker.register_request("cpu", 1);
    request.protocol_version = PROTOCOL_VERSION + 7;
    let status = head_client(&head).await.register(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&(PROTOCOL_VERSION + 7).to_string()), "{}", status.message());
    assert!(status.message().contains(&PROTOCOL_VERSION.to_string()), "{}", status.message());
    assert!(head.cluster.snapshot().workers.is_empty());
}

#[tokio::test]
async fn registration_with_a_wrong_join_token_is_refused_and_the_right_one_admitted() {
    let settings = ClusterSettings { join_token: Some("s3cret".into()), ..settings() };
    let head = start_head(settings, vec![]).await;
    let worker = FakeWorker::start("w1").await;
    let mut client = head_client(&head).await;
    for wrong in ["", "s3cret!", "S3CRET"] {
        let request = pb::RegisterRequest { join_token: wrong.into(), ..worker.register_request("cpu", 1) };
        let status = client.register(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "token {wrong:?}");
    }
    assert!(head.cluster.snapshot().workers.is_empty());
    let request = pb::RegisterRequest { join_token: "s3cret".into(), ..worker.register_request("cpu", 1) };
    let reply = client.register(request).await.expect("admitted").into_inner();
    assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
    assert_eq!(u64::from(reply.heartbeat_interval_ms), HEARTBEAT_MS);
    assert_eq!(head.cluster.snapshot().workers.len(), 1);
}

#[tokio::test]
async fn heartbeat_from_an_unregistered_worker_is_told_to_register() {
    let head = start_head(settings(), vec![]).await;
    let beat = pb::WorkerHeartbeat { worker_id: "stranger".into(), ..Default::default() };
    let mut acks =
        head_client(&head).await.heartbeat(futures::stream::iter([beat])).await.expect("stream").into_inner();
    let status = acks.message().await.expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn worker_that_stops_heartbeating_is_marked_dead_and_its_model_has_no_replica() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    assert!(head.cluster.ready());
    collect(head.cluster.generate("m", chat_request("r1")).await.expect("routable")).await;

    worker.stop_heartbeats();
    eventually("the worker is marked dead", || head.cluster.snapshot().workers.iter().all(|w| !w.alive)).await;
    let snapshot = head.cluster.snapshot();
    assert!(snapshot.replicas.iter().all(|r| r.state == ReplicaState::Unhealthy), "{:?}", snapshot.replicas);
    assert!(!head.cluster.ready());
    // Nothing is starting and the controller says why: answered at once with that reason.
    let error = head.cluster.generate("m", chat_request("r2")).await.err();
    assert!(matches!(&error, Some(BackendError::Unavailable(m)) if m.contains("no live worker")), "{error:?}");
}

#[tokio::test]
async fn dead_worker_comes_back_alive_when_it_registers_again() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    worker.stop_heartbeats();
    eventually("the worker is marked dead", || !head.cluster.ready()).await;

    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    assert_eq!(worker.state.starts.lock().unwrap().len(), 1, "the replica it kept was adopted, not restarted");
}

#[tokio::test]
async fn worker_re_registering_with_its_replicas_is_adopted_without_a_new_start() {
    // A restarted head: the serve config is loaded, then a worker that kept serving registers.
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.host("llm-0000beef", "m");
    worker.join(&head).await;
    until_routable(&head, "llm", 1).await;
    // Several reconcile passes go by without a start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(worker.state.starts.lock().unwrap().is_empty());
    assert!(worker.state.stops.lock().unwrap().is_empty());
    assert_eq!(head.cluster.models()[0].max_model_len, 2048);

    collect(head.cluster.generate("m", chat_request("r1")).await.expect("routable")).await;
    assert_eq!(worker.generates_for("llm-0000beef"), 1);
}
