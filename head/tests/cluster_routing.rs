//! The router (`impl Backend for Cluster`) against fake workers: streaming, cancellation on
//! drop, power of two choices, prefix affinity, waiting for a replica that is starting, retry
//! before the first event, and gRPC status -> BackendError.

mod cluster_common;

use cluster_common::*;
use futures::StreamExt;
use lumen_head::backend::{Backend, BackendError};
use lumen_head::cluster::{ClusterSettings, Deployment, ReplicaState};
use lumen_proto::v1 as pb;
use pb::generate_event::Event;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;
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
        // What tonic reports for a broken connection: the replica is unavailable, not buggy.
        (Code::Unknown, None, "unavailable"),
        (Code::Cancelled, None, "unavailable"),
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
async fn unknown_model_is_not_found_and_a_model_without_workers_says_why() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    assert_eq!(
        head.cluster.generate("nope", chat_request("r")).await.err(),
        Some(BackendError::ModelNotFound("nope".into()))
    );
    // Nothing is starting and the controller said why: answered at once, with its reason.
    let error = within_10s(head.cluster.generate("m", chat_request("r"))).await.err();
    assert!(matches!(&error, Some(BackendError::Unavailable(m)) if m.contains("no live worker")), "{error:?}");
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

/// Awaits `future`, failing the test if it takes more than 10 s (a hang, not slowness).
async fn within_10s<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future).await.expect("answered within 10 s")
}

/// A chat whose 2 KB system prompt `system` is shared and whose question is `question`.
fn chat_with_system(id: &str, system: &str, question: &str) -> pb::GenerateRequest {
    let messages = serde_json::json!([
        {"role": "system", "content": system.repeat(2048 / system.len() + 1)},
        {"role": "user", "content": question},
    ]);
    pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages_json: messages.to_string(),
            add_generation_prompt: true,
            template_kwargs_json: String::new(),
        })),
        n: 1,
        ..Default::default()
    }
}

/// Runs `request` to its end and returns the replica that served it.
async fn served_by(head: &TestHead, workers: &[FakeWorker], request: pb::GenerateRequest) -> String {
    let id = request.request_id.clone();
    let events = collect(head.cluster.generate("m", request).await.expect("routable")).await;
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    let replicas: Vec<String> = workers
        .iter()
        .flat_map(|w| w.state.generates.lock().unwrap().clone())
        .filter(|g| g.request_id == id)
        .map(|g| g.replica_id)
        .collect();
    assert_eq!(replicas.len(), 1, "`{id}` was sent once");
    replicas[0].clone()
}

#[tokio::test]
async fn requests_sharing_a_long_prefix_land_on_one_replica_while_others_spread() {
    let (head, workers) = cluster_with(3).await;
    let mut shared = std::collections::BTreeSet::new();
    for i in 0..12 {
        let request = chat_with_system(&format!("s{i}"), "You answer questions about Rust. ", &format!("question {i}"));
        shared.insert(served_by(&head, &workers, request).await);
    }
    assert_eq!(shared.len(), 1, "one replica serves the shared system prompt: {shared:?}");

    // Long prompts without a common head: power of two choices over equal loads spreads them.
    let mut spread = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..30 {
        let request = chat_with_system(&format!("d{i}"), &format!("Persona number {i}. "), "hello");
        *spread.entry(served_by(&head, &workers, request).await).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "every replica takes some: {spread:?}");
}

#[tokio::test]
async fn an_overloaded_affine_replica_is_bypassed_and_the_new_choice_is_remembered() {
    let (head, workers) = cluster_with(3).await;
    let request = |i: usize| chat_with_system(&format!("r{i}"), "Shared instructions. ", &format!("q{i}"));
    let affine = served_by(&head, &workers, request(0)).await;
    let busy = workers.iter().find(|w| w.hosted_ids().contains(&affine)).expect("host");
    busy.report_load(&affine, 40, 0);
    eventually("the affine replica's load arrives", || {
        head.cluster.snapshot().replicas.iter().any(|r| r.stats.as_ref().is_some_and(|s| s.running == 40))
    })
    .await;

    let mut next = std::collections::BTreeSet::new();
    for i in 1..6 {
        next.insert(served_by(&head, &workers, request(i)).await);
    }
    assert!(!next.contains(&affine), "the overloaded replica was bypassed");
    assert_eq!(next.len(), 1, "the replica chosen instead keeps the prefix: {next:?}");
}

#[tokio::test]
async fn affine_replica_at_max_ongoing_requests_is_bypassed() {
    let llm = Deployment { max_ongoing_requests: 1, ..deployment("llm", "m", 2) };
    let (head, workers) = cluster_of(llm, 2).await;
    let request = |i: usize| chat_with_system(&format!("r{i}"), "Shared instructions. ", &format!("q{i}"));
    let affine = served_by(&head, &workers, request(0)).await;
    for worker in &workers {
        worker.script_generate(GenerateScript::Hold);
    }
    let held = head.cluster.generate("m", request(1)).await.expect("routable");
    let second = head.cluster.generate("m", request(2)).await.expect("the other replica takes it");
    let replica_of_request = |id: &str| {
        workers
            .iter()
            .flat_map(|w| w.state.generates.lock().unwrap().clone())
            .find(|g| g.request_id == id)
            .map(|g| g.replica_id)
    };
    assert_eq!(replica_of_request("r1"), Some(affine.clone()));
    assert!(replica_of_request("r2").is_some_and(|r| r != affine));
    drop((held, second));
}

#[tokio::test]
async fn a_request_waits_for_a_replica_that_is_starting() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    let gate = Gate::closed();
    worker.script_start(StartScript::RunWhenOpened(gate.clone()));
    worker.join(&head).await;
    eventually("the replica is starting", || {
        head.cluster.snapshot().replicas.iter().any(|r| r.state == ReplicaState::Starting)
    })
    .await;

    let cluster = head.cluster.clone();
    let waiting = tokio::spawn(async move {
        collect(cluster.generate("m", chat_request("early")).await?).await.into_iter().collect::<Result<Vec<_>, _>>()
    });
    let tokenize = {
        let cluster = head.cluster.clone();
        let request = pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text(pb::TextPrompt {
                text: "hi".into(),
                add_special_tokens: false,
            })),
            ..Default::default()
        };
        tokio::spawn(async move { cluster.tokenize("m", request).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished() && !tokenize.is_finished(), "nothing can answer before the replica runs");
    gate.open();
    let events = within_10s(waiting).await.expect("task").expect("served once the replica runs");
    assert!(matches!(events.last().and_then(|e| e.event.as_ref()), Some(Event::Finished(_))));
    assert_eq!(within_10s(tokenize).await.expect("task").expect("tokenized").token_ids, [104, 105]);
    assert_eq!(worker.generates_for(&worker.hosted_ids()[0]), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_stops_waiting() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    let gate = Gate::closed();
    worker.script_start(StartScript::RunWhenOpened(gate.clone()));
    worker.join(&head).await;
    eventually("the replica is starting", || !worker.state.starts.lock().unwrap().is_empty()).await;

    let cluster = head.cluster.clone();
    let gone = tokio::spawn(async move { cluster.generate("m", chat_request("gone")).await.map(drop) });
    tokio::task::yield_now().await;
    gone.abort();
    assert!(gone.await.is_err_and(|e| e.is_cancelled()), "it was still waiting when dropped");
    gate.open();
    until_routable(&head, "llm", 1).await;
    collect(head.cluster.generate("m", chat_request("later")).await.expect("routable")).await;
    let sent: Vec<String> = worker.state.generates.lock().unwrap().iter().map(|g| g.request_id.clone()).collect();
    assert_eq!(sent, ["later"], "the dropped request never reached the worker");
    assert_eq!(head.cluster.snapshot().replicas[0].in_flight, 0);
}

#[tokio::test]
async fn waiting_gives_up_after_the_replica_wait_timeout() {
    let settings = ClusterSettings { replica_wait_timeout_s: 1, ..settings() };
    let head = start_head(settings, vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.script_start(StartScript::RunWhenOpened(Gate::closed()));
    worker.join(&head).await;
    eventually("the replica is starting", || !worker.state.starts.lock().unwrap().is_empty()).await;
    let error = within_10s(head.cluster.generate("m", chat_request("r"))).await.err();
    assert_eq!(error, Some(BackendError::NoReplica("m".into())));
}

#[tokio::test]
async fn a_deployment_whose_starts_fail_answers_at_once_with_its_message() {
    let head = start_head(settings(), vec![deployment("llm", "m", 1)]).await;
    let mut worker = FakeWorker::start("w1").await;
    worker.script_start(StartScript::ReportFailure("out of memory loading weights".into()));
    worker.join(&head).await;
    eventually("the failure is recorded", || {
        head.cluster.snapshot().deployments[0].message.as_deref().is_some_and(|m| m.contains("out of memory"))
    })
    .await;
    // The default wait is 60 s: answering within 10 s means it did not wait for a replica.
    let error = within_10s(head.cluster.generate("m", chat_request("r"))).await.err();
    assert!(
        matches!(&error, Some(BackendError::Unavailable(m)) if m.contains("out of memory loading weights")),
        "{error:?}"
    );
}
