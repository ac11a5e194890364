//! Migration against a scripted backend: what the continuation asks for and what the API layer
//! sees. Real processes and a real kill: `tests/e2e_migration.rs`.

use std::collections::VecDeque;
use std::sync::Mutex;

use pb::generate_event::Event;

use super::*;
use crate::backend::ModelCard;

type Script = Vec<Result<Event, BackendError>>;

/// Serves one script per call, on replica `r<call>`, and keeps what each call asked for.
#[derive(Default)]
struct Scripted {
    scripts: Mutex<VecDeque<Script>>,
    calls: Mutex<Vec<(pb::GenerateRequest, Vec<String>)>>,
}

#[async_trait::async_trait]
impl Backend for Scripted {
    fn models(&self) -> Vec<ModelCard> {
        Vec::new()
    }

    fn ready(&self) -> bool {
        true
    }

    async fn generate(&self, model: &str, request: pb::GenerateRequest) -> Result<EventStream, BackendError> {
        self.generate_avoiding(model, request, &[]).await
    }

    async fn generate_avoiding(
        &self,
        _model: &str,
        request: pb::GenerateRequest,
        avoid: &[String],
    ) -> Result<EventStream, BackendError> {
        let mut calls = self.calls.lock().unwrap();
        calls.push((request, avoid.to_vec()));
        let script = self.scripts.lock().unwrap().pop_front().ok_or(BackendError::NoReplica("m".into()))?;
        backend::note_route("d", &format!("r{}", calls.len()));
        let items = script.into_iter().map(|item| item.map(|e| pb::GenerateEvent { event: Some(e) }));
        Ok(stream::iter(items.collect::<Vec<_>>()).boxed())
    }

    async fn tokenize(&self, _: &str, _: pb::TokenizeRequest) -> Result<pb::TokenizeReply, BackendError> {
        unreachable!()
    }

    async fn detokenize(&self, _: &str, _: pb::DetokenizeRequest) -> Result<pb::DetokenizeReply, BackendError> {
        unreachable!()
    }
}

fn started(prompt_ids: &[u32]) -> Result<Event, BackendError> {
    Ok(Event::Started(pb::Started {
        prompt_tokens: prompt_ids.len() as u32,
        prompt_token_ids: prompt_ids.to_vec(),
        ..Default::default()
    }))
}

/// A continuation's `started`: it took `resumed` tokens as generated.
fn resumed(resumed: u32) -> Result<Event, BackendError> {
    Ok(Event::Started(pb::Started { prompt_tokens: 3, resumed_tokens: resumed, ..Default::default() }))
}

fn token(id: u32, finish: pb::FinishReason) -> Result<Event, BackendError> {
    choice_token(0, id, finish)
}

fn choice_token(index: u32, id: u32, finish: pb::FinishReason) -> Result<Event, BackendError> {
    Ok(Event::Delta(pb::Delta {
        index,
        token_ids: vec![id],
        text: format!("<{id}>"),
        finish_reason: finish as i32,
        ..Default::default()
    }))
}

fn aborted() -> Result<Event, BackendError> {
    choice_aborted(0)
}

fn choice_aborted(index: u32) -> Result<Event, BackendError> {
    Ok(Event::Delta(pb::Delta { index, finish_reason: pb::FinishReason::Abort as i32, ..Default::default() }))
}

fn finished(prompt: u32, completion: u32) -> Result<Event, BackendError> {
    let usage = pb::Usage { prompt_tokens: prompt, completion_tokens: completion, cached_tokens: 0 };
    Ok(Event::Finished(pb::Finished { usage: Some(usage), timings: None }))
}

fn broken() -> Result<Event, BackendError> {
    Err(BackendError::Unavailable("the connection to the replica's worker broke: h2 protocol error".into()))
}

const GO: pb::FinishReason = pb::FinishReason::Unspecified;

fn chat_request(n: u32) -> pb::GenerateRequest {
    let chat = pb::ChatPrompt { messages_json: "[]".into(), ..Default::default() };
    pb::GenerateRequest {
        request_id: "chatcmpl-1".into(),
        prompt: Some(pb::generate_request::Prompt::Chat(chat)),
        prompt_logprobs: Some(1),
        n,
        ..Default::default()
    }
}

/// Runs `request` with `limit` over `scripts`: the events the API layer saw, the calls made and
/// the migrations counted by reason.
async fn run(
    limit: u32,
    request: pb::GenerateRequest,
    scripts: Vec<Script>,
) -> (Vec<Result<Event, BackendError>>, Vec<(pb::GenerateRequest, Vec<String>)>, Migrations) {
    let scripted = Arc::new(Scripted { scripts: Mutex::new(scripts.into()), ..Default::default() });
    let backend: Arc<dyn Backend> = scripted.clone();
    let migrations = Migrations::register(limit, &Registry::new()).unwrap();
    let trace = Trace::detached();
    let seen = match generate(&backend, &migrations, "m", request, &trace).await {
        Ok(stream) => stream.map(|item| item.map(|e| e.event.unwrap())).collect().await,
        Err(e) => vec![Err(e)],
    };
    let calls = scripted.calls.lock().unwrap().clone();
    (seen, calls, migrations)
}

fn tokens(seen: &[Result<Event, BackendError>]) -> Vec<u32> {
    seen.iter()
        .filter_map(|e| match e {
            Ok(Event::Delta(d)) => Some(d.token_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn count(migrations: &Migrations, reason: Reason) -> u64 {
    migrations.total.with_label_values(&[reason.as_str()]).get()
}

#[tokio::test]
async fn a_broken_stream_continues_on_another_replica_from_the_prompt_ids_and_the_delivered_tokens() {
    let first = vec![started(&[1, 2, 3]), token(10, GO), token(11, GO), broken()];
    let second = vec![resumed(2), token(12, GO), token(13, pb::FinishReason::Length), finished(3, 4)];
    let (seen, calls, migrations) = run(3, chat_request(1), vec![first, second]).await;

    assert_eq!(tokens(&seen), [10, 11, 12, 13], "no token lost or repeated");
    let starts: Vec<_> = seen.iter().filter(|e| matches!(e, Ok(Event::Started(_)))).collect();
    assert_eq!(starts.len(), 1, "the continuation's `started` is not passed on");
    let Ok(Event::Started(s)) = starts[0] else { unreachable!() };
    assert!(s.prompt_token_ids.is_empty(), "ids the client did not ask for are not passed on");
    assert!(matches!(seen.last(), Some(Ok(Event::Finished(f))) if f.usage.unwrap().completion_tokens == 4));
    assert!(seen.iter().all(Result::is_ok), "the failure never reaches the API layer: {seen:?}");

    let (original, avoided) = &calls[0];
    assert!(original.return_prompt_token_ids && avoided.is_empty());
    let (continuation, avoided) = &calls[1];
    assert_eq!(avoided, &["r1".to_string()], "the replica that failed is avoided");
    let Some(pb::generate_request::Prompt::Tokens(prompt)) = &continuation.prompt else {
        panic!("the continuation's prompt is token ids: {continuation:?}")
    };
    assert_eq!(prompt.token_ids, [1, 2, 3]);
    assert_eq!(continuation.resume.as_ref().unwrap().output_token_ids, [10, 11]);
    assert_eq!(continuation.request_id, "chatcmpl-1");
    assert_eq!(continuation.prompt_logprobs, None, "prompt log-probabilities were delivered already");
    assert_eq!(count(&migrations, Reason::StreamError), 1);
}

#[tokio::test]
async fn an_aborted_choice_moves_and_the_abort_is_never_seen() {
    let first = vec![started(&[1]), token(10, GO), aborted(), finished(1, 1)];
    let second = vec![resumed(1), token(11, pb::FinishReason::Stop), finished(1, 2)];
    let (seen, calls, migrations) = run(3, chat_request(1), vec![first, second]).await;
    assert_eq!(tokens(&seen), [10, 11]);
    let finishes: Vec<i32> = seen
        .iter()
        .filter_map(|e| match e {
            Ok(Event::Delta(d)) if d.finish_reason != 0 => Some(d.finish_reason),
            _ => None,
        })
        .collect();
    assert_eq!(finishes, [pb::FinishReason::Stop as i32], "finish_reason as if nothing happened");
    assert_eq!(calls.len(), 2);
    assert_eq!(count(&migrations, Reason::Aborted), 1);
}

#[tokio::test]
async fn past_the_limit_the_failure_reaches_the_client() {
    let failing = || vec![started(&[1]), token(10, GO), broken()];
    let moved = vec![resumed(1), token(11, GO), broken()];
    let (seen, calls, migrations) = run(1, chat_request(1), vec![failing(), moved, failing()]).await;
    assert_eq!(calls.len(), 2, "one move, then no more");
    assert!(matches!(seen.last(), Some(Err(BackendError::Unavailable(_)))), "{seen:?}");
    assert_eq!(tokens(&seen), [10, 11], "what each replica delivered before failing");
    assert_eq!(count(&migrations, Reason::StreamError), 1);

    let (seen, calls, _) = run(0, chat_request(1), vec![failing(), failing()]).await;
    assert_eq!(calls.len(), 1, "--migration-limit 0: never moves");
    assert!(!calls[0].0.return_prompt_token_ids);
    assert!(matches!(seen.last(), Some(Err(BackendError::Unavailable(_)))));
}

#[tokio::test]
async fn with_no_replica_left_the_original_failure_is_reported() {
    let first = vec![started(&[1]), token(10, GO), broken()];
    let (seen, calls, migrations) = run(3, chat_request(1), vec![first]).await;
    assert_eq!(calls.len(), 2, "the continuation was tried");
    assert!(
        matches!(seen.last(), Some(Err(BackendError::Unavailable(m))) if m.contains("connection")),
        "the stream's own failure, as without migration: {seen:?}"
    );
    assert_eq!(count(&migrations, Reason::StreamError), 0, "nothing moved");
}

#[tokio::test]
async fn each_choice_continues_from_its_own_tokens_and_a_finished_one_is_not_continued() {
    let first = vec![
        started(&[1, 2]),
        choice_token(0, 10, GO),
        choice_token(1, 20, GO),
        choice_token(2, 30, pb::FinishReason::Stop),
        choice_token(1, 21, GO),
        broken(),
    ];
    let second = vec![
        resumed(4),
        choice_token(1, 22, pb::FinishReason::Length),
        choice_token(0, 11, pb::FinishReason::Length),
        finished(2, 6),
    ];
    let (seen, calls, migrations) = run(3, chat_request(3), vec![first, second]).await;
    assert!(seen.iter().all(Result::is_ok), "{seen:?}");
    assert_eq!(tokens(&seen), [10, 20, 30, 21, 22, 11]);
    let (continuation, _) = &calls[1];
    assert_eq!(continuation.n, 3, "the same n: choice indices stay");
    let resume = continuation.resume.as_ref().unwrap();
    assert!(resume.output_token_ids.is_empty());
    let choices: Vec<_> = resume.choices.iter().map(|c| (c.index, c.output_token_ids.clone(), c.finished)).collect();
    assert_eq!(choices, [(0, vec![10], false), (1, vec![20, 21], false), (2, vec![30], true)]);
    assert_eq!(count(&migrations, Reason::StreamError), 1);

    // Both choices aborted and no replica takes them: both aborts go on, and no second attempt
    // moves a request whose first abort the client has seen.
    let first = vec![started(&[1]), choice_token(0, 10, GO), aborted(), choice_aborted(1), finished(1, 1)];
    let (seen, calls, _) = run(3, chat_request(2), vec![first]).await;
    assert_eq!(calls.len(), 2, "one attempt at moving, refused");
    let aborts =
        seen.iter().filter(|e| matches!(e, Ok(Event::Delta(d)) if d.finish_reason == pb::FinishReason::Abort as i32));
    assert_eq!(aborts.count(), 2, "{seen:?}");

    // Every choice finished but `finished` never came: nothing is left to continue.
    let done = vec![
        started(&[1]),
        choice_token(0, 10, pb::FinishReason::Stop),
        choice_token(1, 20, pb::FinishReason::Stop),
        broken(),
    ];
    let (seen, calls, _) = run(3, chat_request(2), vec![done]).await;
    assert_eq!(calls.len(), 1);
    assert!(matches!(seen.last(), Some(Err(BackendError::Unavailable(_)))));
}

#[tokio::test]
async fn requests_with_a_constraint_move_with_it() {
    let first = vec![started(&[1]), token(10, GO), broken()];
    let second = vec![resumed(1), token(11, pb::FinishReason::Stop), finished(1, 2)];
    let mut constrained = chat_request(1);
    constrained.structured_output =
        Some(pb::StructuredOutput { kind: Some(pb::structured_output::Kind::JsonObject(true)), ..Default::default() });
    let (seen, calls, _) = run(3, constrained.clone(), vec![first, second]).await;
    assert_eq!(calls.len(), 2);
    assert_eq!(tokens(&seen), [10, 11]);
    let continuation = &calls[1].0;
    assert_eq!(continuation.structured_output, constrained.structured_output, "the replica's matcher takes [10] first");
    assert_eq!(continuation.resume.as_ref().unwrap().output_token_ids, [10]);
}

#[tokio::test]
async fn a_replica_that_does_not_take_the_delivered_tokens_is_not_used() {
    let first = vec![started(&[1, 2]), token(10, GO), token(11, GO), broken()];
    let older_worker = vec![resumed(0), token(10, GO), token(11, GO), finished(2, 2)];
    let (seen, calls, migrations) = run(3, chat_request(1), vec![first, older_worker]).await;
    assert_eq!(calls.len(), 2);
    assert_eq!(tokens(&seen), [10, 11], "nothing repeated");
    assert!(matches!(seen.last(), Some(Err(BackendError::Unavailable(_)))), "the original failure: {seen:?}");
    assert_eq!(count(&migrations, Reason::StreamError), 0);
}
