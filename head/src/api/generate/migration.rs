//! Moving a request off a replica that failed mid-stream (request migration, Dynamo's
//! `--migration-limit`): the client's stream goes on from another replica of the deployment as if
//! nothing had happened.
//!
//! What it owns: per backend stream, the [`Continuation`] of its request: the request with its
//! prompt as token ids (learnt from the worker's `started`, which is asked for them), each
//! choice's output token ids delivered so far and whether it finished, and how often it moved.
//! Token ids only, freed with the stream.
//!
//! Contract:
//! - A request can move when its prompt's token ids came back, not every choice finished, and
//!   fewer than `limit` moves were made (the deployment's `migration_limit`, else
//!   `--migration-limit`; 0 turns migration off). Others behave exactly as before. A structured
//!   output moves with its constraint: the new replica's matcher takes the delivered tokens
//!   before its first mask.
//! - It moves when its stream fails as `Unavailable` (the connection broke, the worker ended the
//!   stream early or was marked dead and stayed silent) or its choice ends with `abort` (the
//!   replica was stopped or its drain timed out: the client's own cancel never shows here).
//!   Invalid requests, overload and engine failures do not move: another replica would answer
//!   the same.
//! - The continuation goes to a replica that has not failed the request, with the original prompt
//!   ids and `resume` = the delivered ids (`n > 1`: per choice, finished ones marked; the worker
//!   takes them as output already generated: penalties, seeded stream, stop strings,
//!   `max_tokens`, usage; see the proto's `Resume`) and the same `n`, so choice indices stay.
//!   Its `started` must say it took them all (`resumed_tokens`: a worker that does not know
//!   `resume` would start over) and is dropped, so the API layer sees one stream: no token lost
//!   or repeated, the usage of the last worker covers the whole request once.
//! - When it cannot move (limit reached, no other replica, the continuation refused), the client
//!   gets the failure it would have got without migration.
//! - Each move is counted in `lumen:request_migrations_total{reason}`, logged in the request's
//!   span and noted in its [`Trace`] (the request log's `migrations`, the replica it ended on).

use std::sync::{Arc, PoisonError};

use futures::{StreamExt, stream};
use lumen_proto::v1 as pb;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::api::edge::trace::Trace;
use crate::backend::{self, Backend, BackendError, EventStream, RouteSlot};

/// Moves per request when `--migration-limit` is not given.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;

/// Why a request moved (the metric's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The stream failed: connection broken, ended before `finished`, replica unavailable.
    StreamError,
    /// The worker was marked dead (missed heartbeats) and its stream stayed silent.
    WorkerDead,
    /// The replica aborted the request (stopped, or its drain timed out).
    Aborted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::StreamError => "stream_error",
            Reason::WorkerDead => "worker_dead",
            Reason::Aborted => "aborted",
        }
    }

    /// Why a failed stream should move, or `None` when another replica would fail it too.
    fn of(error: &BackendError) -> Option<Reason> {
        match error {
            BackendError::Unavailable(m) if m.contains("missed its heartbeats") => Some(Reason::WorkerDead),
            BackendError::Unavailable(_) => Some(Reason::StreamError),
            _ => None,
        }
    }
}

/// The migration policy and its metric; cheap to clone.
#[derive(Clone)]
pub struct Migrations {
    limit: u32,
    total: IntCounterVec,
}

impl Migrations {
    /// Registers `lumen:request_migrations_total{reason}` into `registry`.
    pub fn register(limit: u32, registry: &Registry) -> Result<Self, prometheus::Error> {
        let total = IntCounterVec::new(
            Opts::new(
                "lumen:request_migrations_total",
                "In-flight requests moved to another replica after theirs failed, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(total.clone()))?;
        for reason in [Reason::StreamError, Reason::WorkerDead, Reason::Aborted] {
            total.with_label_values(&[reason.as_str()]);
        }
        Ok(Migrations { limit, total })
    }

    /// This policy with a model's own limit, when it has one (its deployment's `migration_limit`).
    pub fn for_model(&self, limit: Option<u32>) -> Migrations {
        Migrations { limit: limit.unwrap_or(self.limit), total: self.total.clone() }
    }

    /// Whether requests may move at all (see the module contract).
    fn enabled(&self) -> bool {
        self.limit > 0
    }
}

/// Sends `request` to `model` like [`Backend::generate`], with a stream that moves the request to
/// another replica when its own fails (see the module docs).
pub async fn generate(
    backend: &Arc<dyn Backend>,
    migrations: &Migrations,
    model: &str,
    mut request: pb::GenerateRequest,
    trace: &Trace,
) -> Result<EventStream, BackendError> {
    if !migrations.enabled() {
        return backend.generate(model, request).await;
    }
    let wants_prompt_ids = request.return_prompt;
    request.return_prompt_token_ids = true;
    let slot = RouteSlot::default();
    let current = backend::with_route_slot(slot.clone(), backend.generate(model, request.clone())).await?;
    let replica = note_route(&slot, trace);
    let state = Resumable {
        backend: backend.clone(),
        migrations: migrations.clone(),
        model: model.to_string(),
        trace: trace.clone(),
        continuation: Continuation::new(request, wants_prompt_ids),
        current,
        replica,
        avoid: Vec::new(),
        done: false,
        gave_up: false,
    };
    Ok(Box::pin(stream::unfold(state, |mut s| async move { s.next_item().await.map(|item| (item, s)) })))
}

/// Copies where the backend routed (in `slot`) into the trace's route; returns the replica id.
fn note_route(slot: &RouteSlot, trace: &Trace) -> Option<String> {
    let routed = slot.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
    let replica = routed.replica_id.clone();
    *trace.route_slot().lock().unwrap_or_else(PoisonError::into_inner) = Some(routed);
    Some(replica)
}

/// Reads a continuation's `started` (the client had it already): whether the worker took the
/// `delivered` tokens as generated. One that does not know `resume` would start over.
async fn resumes(stream: &mut EventStream, delivered: usize) -> bool {
    match stream.next().await {
        Some(Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Started(started)) })) => {
            started.resumed_tokens as usize == delivered
        }
        _ => false,
    }
}

/// What a request needs to resume elsewhere: token ids only.
struct Continuation {
    /// The request as sent, its prompt replaced by its token ids once `started` named them.
    request: pb::GenerateRequest,
    /// Per choice, the output token ids delivered to the API layer so far.
    delivered: Vec<Vec<u32>>,
    /// Per choice, whether it finished (its last delta came).
    finished: Vec<bool>,
    /// Moves made.
    moves: u32,
    /// `request.prompt` holds the prompt's token ids.
    prompt_known: bool,
    /// The client asked for the prompt back (echo): `started` keeps its ids.
    wants_prompt_ids: bool,
}

impl Continuation {
    fn new(request: pb::GenerateRequest, wants_prompt_ids: bool) -> Self {
        let n = request.n.max(1) as usize;
        Continuation {
            request,
            delivered: vec![Vec::new(); n],
            finished: vec![false; n],
            moves: 0,
            prompt_known: false,
            wants_prompt_ids,
        }
    }

    /// Output tokens delivered, over every choice.
    fn delivered_tokens(&self) -> usize {
        self.delivered.iter().map(Vec::len).sum()
    }

    /// Whether another replica can take the request on.
    fn can_move(&self, limit: u32) -> bool {
        self.prompt_known && self.moves < limit && self.finished.contains(&false)
    }

    /// The request to send to the next replica.
    fn next_request(&self) -> pb::GenerateRequest {
        let resume = if self.delivered.len() == 1 {
            pb::Resume { output_token_ids: self.delivered[0].clone(), choices: Vec::new() }
        } else {
            let choice = |(index, (ids, finished)): (usize, (&Vec<u32>, &bool))| pb::ResumedChoice {
                index: index as u32,
                output_token_ids: ids.clone(),
                finished: *finished,
            };
            pb::Resume {
                output_token_ids: Vec::new(),
                choices: self.delivered.iter().zip(&self.finished).enumerate().map(choice).collect(),
            }
        };
        pb::GenerateRequest {
            replica_id: String::new(),
            return_prompt: false,
            return_prompt_token_ids: false,
            prompt_logprobs: None,
            resume: Some(resume),
            ..self.request.clone()
        }
    }
}

/// What one event of the current stream means.
enum Seen {
    /// Hand it to the API layer.
    Pass(pb::GenerateEvent),
    /// The replica aborted the request: move it, else hand this on.
    Aborted(pb::GenerateEvent),
}

/// A migrating stream's state.
struct Resumable {
    backend: Arc<dyn Backend>,
    migrations: Migrations,
    model: String,
    trace: Trace,
    continuation: Continuation,
    current: EventStream,
    /// The replica serving the current stream, when the backend named it.
    replica: Option<String>,
    /// Replicas that failed this request.
    avoid: Vec<String>,
    done: bool,
    /// A move failed and its failure went on to the API layer: the rest of this stream (the
    /// other choices' aborts) goes the same way, never half moved.
    gave_up: bool,
}

impl Resumable {
    async fn next_item(&mut self) -> Option<Result<pb::GenerateEvent, BackendError>> {
        if self.done {
            return None;
        }
        loop {
            let (reason, failure) = match self.current.next().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Ok(event)) => match self.see(event) {
                    Seen::Pass(event) => return Some(Ok(event)),
                    Seen::Aborted(event) if self.gave_up => return Some(Ok(event)),
                    Seen::Aborted(event) => (Reason::Aborted, Ok(event)),
                },
                Some(Err(error)) => match Reason::of(&error) {
                    Some(reason) => (reason, Err(error)),
                    None => {
                        self.done = true;
                        return Some(Err(error));
                    }
                },
            };
            if !self.migrate(reason, &failure).await {
                self.done = failure.is_err();
                self.gave_up = true;
                return Some(failure);
            }
        }
    }

    /// Notes what resuming needs from `event` and says what to do with it.
    fn see(&mut self, event: pb::GenerateEvent) -> Seen {
        use pb::generate_event::Event;
        let c = &mut self.continuation;
        match event.event {
            // Only the first stream's: a continuation's is read by `resumes`.
            Some(Event::Started(mut started)) => {
                if !started.prompt_token_ids.is_empty() {
                    let ids = pb::TokenPrompt { token_ids: started.prompt_token_ids.clone() };
                    c.request.prompt = Some(pb::generate_request::Prompt::Tokens(ids));
                    c.prompt_known = true;
                }
                if !c.wants_prompt_ids {
                    started.prompt_token_ids = Vec::new();
                }
                Seen::Pass(pb::GenerateEvent { event: Some(Event::Started(started)) })
            }
            Some(Event::Delta(delta)) if delta.finish_reason == pb::FinishReason::Abort as i32 => {
                Seen::Aborted(pb::GenerateEvent { event: Some(Event::Delta(delta)) })
            }
            Some(Event::Delta(delta)) => {
                let index = delta.index as usize;
                if let Some(delivered) = c.delivered.get_mut(index) {
                    delivered.extend_from_slice(&delta.token_ids);
                    c.finished[index] |= delta.finish_reason != pb::FinishReason::Unspecified as i32;
                }
                Seen::Pass(pb::GenerateEvent { event: Some(Event::Delta(delta)) })
            }
            Some(Event::Finished(finished)) => {
                self.done = true;
                Seen::Pass(pb::GenerateEvent { event: Some(Event::Finished(finished)) })
            }
            other => Seen::Pass(pb::GenerateEvent { event: other }),
        }
    }

    /// Moves the request to another replica; false when it cannot (see the module contract).
    async fn migrate(&mut self, mut reason: Reason, failure: &Result<pb::GenerateEvent, BackendError>) -> bool {
        let request_id = self.continuation.request.request_id.clone();
        while self.continuation.can_move(self.migrations.limit) {
            self.continuation.moves += 1;
            self.avoid.extend(self.replica.take());
            let delivered = self.continuation.delivered_tokens();
            let error = failure.as_ref().err().map(ToString::to_string).unwrap_or_else(|| "aborted".into());
            tracing::warn!(%request_id, reason = reason.as_str(), delivered, %error, avoid = ?self.avoid,
                "moving the request to another replica");
            let slot = RouteSlot::default();
            let request = self.continuation.next_request();
            let opened = self.backend.generate_avoiding(&self.model, request, &self.avoid);
            match self.trace.in_span(backend::with_route_slot(slot.clone(), opened)).await {
                Ok(mut stream) => {
                    if !resumes(&mut stream, delivered).await {
                        tracing::warn!(%request_id, "the replica did not take the delivered tokens (a worker without `resume`)");
                        return false;
                    }
                    self.current = stream;
                    self.replica = note_route(&slot, &self.trace);
                    self.migrations.total.with_label_values(&[reason.as_str()]).inc();
                    self.trace.migrated(reason.as_str());
                    self.trace.routed();
                    return true;
                }
                Err(e) if matches!(e, BackendError::Unavailable(_)) => {
                    tracing::warn!(%request_id, error = %e, "the continuation failed to start; trying another replica");
                    reason = Reason::StreamError;
                }
                Err(e) => {
                    tracing::warn!(%request_id, error = %e, "the request could not move");
                    return false;
                }
            }
        }
        false
    }
}

#[cfg(test)]
#[path = "migration_tests.rs"]
mod tests;
