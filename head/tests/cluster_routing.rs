//! The router (`impl Backend for Cluster`) against fake workers: streaming, cancellation on
//! drop, power of two choices, retry before the first event, and gRPC status -> BackendError.

mod cluster_common;

use cluster_common::*;
use futures::StreamExt;
use lumen_head::backend::{Backend, BackendError};
use lumen_head::cluster::Deployment;
use lumen_proto::v1 as pb;
use pb::generate_event::Event;
use std::sync::atomic::Ordering;
use tonic::Code;

/// A head with `llm` (model `m`) at `replicas` replicas, one per fake worker.
async fn cluster_with(replicas: usize) -> (TestHead, Vec<FakeWorker>) {
    cluster_of(deployment("llm", "m", replicas as u32), replicas).await
}

async fn cluster_of(llm: Deployment, workers: usize) -> (TestHead, Vec<FakeWorker>) {
    let head = start_head(settings(), vec![]).await;
    let mut fakes = Vec::new();
    for i in 0..workers {
        let mut worker = FakeWorker::start(&format!("w{i}")).await;
        worker.join(&head).await;
        fakes.push(worker);
    }
    // Deployed once every worker is in, so placement spreads one replica per worker.
    head.cluster.set_deployments(vec![llm]).expect("valid");
    until_routable(&head, "llm", workers).await;
    (head, fakes)
}

fn replica_of(worker: &FakeWorker) -> String {
    worker.hosted_ids().pop().expect("a replica")
}

#[tokio::test]
async fn generate_streams_the_workers_events_to_the_replica_it_picked() {
    let (head, workers) = cluster_with(1).await;
    let events = collect(head.cluster.generate("m", chat_request("req-1")).await.expect("routable")).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e.as_ref().map(|e| e.event.as_ref()) {
            Ok(Some(Event::Started(_))) => "started",
            Ok(Some(Event::Delta(_))) => "delta",
            Ok(Some(Event::Finished(_))) => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["started", "delta", "delta", "delta", "finished"]);
    let sent = workers[0].state.generates.lock().unwrap()[0].clone();
    assert_eq!((sent.replica_id, sent.request_id), (replica_of(&workers[0]), "req-1".to_owned()));
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_call_on_the_worker() {
    let (head, workers) = cluster_with(1).await;
    workers[0].script_generate(GenerateScript::Hold);
    let mut stream = head.cluster.generate("m", chat_request("r")).await.expect("routable");
    assert!(matches!(stream.next().await, Some(Ok(_))));
    assert!(matches!(stream.next().await, Some(Ok(_))));
    assert_eq!(head.cluster.snapshot().replicas[0].in_flight, 1);
    drop(stream);
    eventually("the worker sees the cancellation", || workers[0].state.cancelled.load(Ordering::SeqCst) == 1).await;
    assert_eq!(head.cluster.snapshot().replicas[0].in_flight, 0);
}

#[tokio::test]
async fn power_of_two_choices_spreads_load_across_two_replicas() {
    let (head, workers) = cluster_with(2).await;
    for worker in &workers {
        worker.script_generate(GenerateScript::Hold);
    }
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(head.cluster.generate("m", chat_request(&format!("r{i}"))).await.expect("routable"));
    }
    // With two replicas both are always drawn, so the one with fewer in flight always wins.
    let counts: Vec<usize> = workers.iter().map(|w| w.state.generates.lock().unwrap().len()).collect();
    assert_eq!(counts, [5, 5]);
}

#[tokio::test]
async fn power_of_two_choices_prefers_the_replica_reporting_less_load() {
    let (head, workers) = cluster_with(2).await;
    workers[0].report_load(&replica_of(&workers[0]), 40, 10);
    eventually("the busy replica's load arrives", || {
        head.cluster.snapshot().replicas.iter().any(|r| r.stats.as_ref().is_some_and(|s| s.running == 40))
    })
    .await;
    for worker in &workers {
        worker.script_generate(GenerateScript::Hold);
    }
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(head.cluster.generate("m", chat_request(&format!("r{i}"))).await.expect("routable"));
    }
    assert_eq!(workers[0].state.generates.lock().unwrap().len(), 0);
    assert_eq!(workers[1].state.generates.lock().unwrap().len(), 10);
}

#[tokio::test]
async fn failure_before_the_first_event_is_retried_on_the_other_replica() {
    let (head, workers) = cluster_with(2).await;
    workers[0].script_generate(GenerateScript::Refuse {
        code: Code::Unavailable,
        message: "draining".into(),
        param: None,
    });
    // The healthy replica reports more load, so the failing one is always tried first.
    workers[1].report_load(&replica_of(&workers[1]), 5, 0);
    eventually("the load report arrives", || {
        head.cluster.snapshot().replicas.iter().any(|r| r.stats.as_ref().is_some_and(|s| s.running == 5))
    })
    .await;
    for i in 0..3 {
        let events = collect(head.cluster.generate("m", chat_request(&format!("r{i}"))).await.expect("retried")).await;
        assert!(events.iter().all(Result::is_ok));
    }
    assert_eq!(workers[0].state.generates.lock().unwrap().len(), 3);
    assert_eq!(workers[1].state.generates.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn invalid_request_is_not_retried() {
    let (head, workers) = cluster_with(2).await;
    for worker in &workers {
        worker.script_generate(GenerateScript::Refuse {
            code: Code::InvalidArgument,
            message: "bad".into(),
            param: Some("top_p".into()),
        });
    }
    assert!(matches!(head.cluster.generate("m", chat_request("r")).await, Err(BackendError::InvalidRequest { .. })));
    let calls: usize = workers.iter().map(|w| w.state.generates.lock().unwrap().len()).sum();
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn failure_mid_stream_becomes_an_error_item_that_ends_the_stream() {
    let (head, workers) = cluster_with(1).await;
    workers[0].script_generate(GenerateScript::FailMidStream(Code::Internal));
    let events = collect(head.cluster.generate("m", chat_request("r")).await.expect("started")).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[..2].iter().all(Result::is_ok));
    assert!(matches!(events[2], Err(BackendError::Internal(_))), "{:?}", events[2]);
}

#[tokio::test]
async fn worker_statuses_map_to_backend_errors() {
    let (head, workers) = cluster_with(1).await;
    let cases = [
        (Code::InvalidArgument, Some("temperature"), "invalid"),
        (Code::InvalidArgument, None, "invalid"),
        (Code::ResourceExhausted, None, "overloaded"),
        (Code::NotFound, None, "unavailable"),
        (Code::Unavailable, None, "unavailable"),
        (Code::Internal, None, "internal"),
        (Code::Unknown, None, "internal"),
    ];
    for (code, param, expected) in cases {
        let message = format!("scripted {code:?}");
        workers[0].script_generate(GenerateScript::Refuse {
            code,
            message: message.clone(),
            param: param.map(Into::into),
        });
        let error = head.cluster.generate("m", chat_request("r")).await.err().expect("refused");
        match (expected, &error) {
            ("invalid", BackendError::InvalidRequest { message: m, param: p }) => {
                assert_eq!((m.as_str(), p.as_deref()), (message.as_str(), param));
            }
            ("overloaded", BackendError::Overloaded(_))
            | ("unavailable", BackendError::Unavailable(_))
            | ("internal", BackendError::Internal(_)) => {}
            _ => panic!("{code:?} became {error:?}, expected {expected}"),
        }
    }
}

#[tokio::test]
async fn unreachable_worker_is_unavailable() {
    let (head, mut workers) = cluster_with(1).await;
    workers[0].stop_server();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let error = head.cluster.generate("m", chat_request("r")).await.err();
    assert!(matches!(error, Some(BackendError::Unavailable(_))), "{error:?}");
}

#[tokio::test]
async fn unknown_model_is_not_found_and_unplaced_model_has_no_replica() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    assert_eq!(
        head.cluster.generate("nope", chat_request("r")).await.err(),
        Some(BackendError::ModelNotFound("nope".into()))
    );
    assert_eq!(head.cluster.generate("m", chat_request("r")).await.err(), Some(BackendError::NoReplica("m".into())));
    let tokenize = head.cluster.tokenize("nope", pb::TokenizeRequest::default()).await;
    assert_eq!(tokenize.err(), Some(BackendError::ModelNotFound("nope".into())));
}

#[tokio::test]
async fn replica_at_max_ongoing_requests_takes_no_more() {
    let llm = Deployment { max_ongoing_requests: 2, ..deployment("llm", "m", 1) };
    let (head, workers) = cluster_of(llm, 1).await;
    workers[0].script_generate(GenerateScript::Hold);
    let held = [
        head.cluster.generate("m", chat_request("r1")).await.expect("first"),
        head.cluster.generate("m", chat_request("r2")).await.expect("second"),
    ];
    assert!(matches!(head.cluster.generate("m", chat_request("r3")).await, Err(BackendError::Overloaded(_))));
    drop(held);
    eventually("in-flight drains", || head.cluster.snapshot().replicas[0].in_flight == 0).await;
    assert!(head.cluster.generate("m", chat_request("r4")).await.is_ok());
}

#[tokio::test]
async fn tokenize_and_detokenize_go_to_a_replica_of_the_model() {
    let (head, workers) = cluster_with(1).await;
    let request = pb::TokenizeRequest {
        input: Some(pb::tokenize_request::Input::Text(pb::TextPrompt { text: "hi".into(), add_special_tokens: false })),
        ..Default::default()
    };
    let reply = head.cluster.tokenize("m", request).await.expect("tokenized");
    assert_eq!(reply.token_ids, [104, 105]);
    assert_eq!(workers[0].state.tokenizes.lock().unwrap().as_slice(), [replica_of(&workers[0])]);
    let text =
        head.cluster.detokenize("m", pb::DetokenizeRequest { token_ids: vec![104, 105], ..Default::default() }).await;
    assert_eq!(text.expect("detokenized").text, "hi");
}
