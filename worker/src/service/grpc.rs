//! The tonic `Worker` service over a [`WorkerNode`], and [`serve_worker`] to run it
//! ([`serve_worker_tls`] over TLS).
//!
//! Contracts of `Generate`: the response stream yields `Started` (prompt token count, plus the
//! prompt's ids and text with `return_prompt`), one `Delta` per engine delta, then `Finished`
//! with usage and timings (an embedding request, `pooling` set, yields `Started`, one
//! `Embedding` and `Finished`; the kind of request must match the replica's runner); an engine failure ends it with an INTERNAL status carrying the
//! engine's message. The stream owns the engine's `RequestStream` directly (no forwarding task),
//! so when tonic drops it — the caller cancelled or went away — the request is aborted at once,
//! and an info line in the request's span says so. Output waits for the caller in the engine's
//! per-request channel, which never blocks the engine (one slow reader cannot stall the batch)
//! and holds only that request's own output (at most `max_tokens` x `n` deltas, `max_tokens`
//! capped by the context); tonic pulls from it only as HTTP/2 flow control allows, and the head
//! cancels a stream its client has stopped reading (`--stream-send-timeout-s`).
//! Everything logged about one request — while it is set up and while its stream is polled —
//! runs inside a `request` span with fields `request_id` and `replica`, so every such line
//! carries them (in `--log-format json`, under `span`).
//! With `--otlp-traces-endpoint`, each `Generate` also has an OpenTelemetry span continuing the
//! head's `traceparent` metadata ([`super::otel`]), ended by the stream's last item or its drop.
//!
//! `CheckHealth` answers whether a replica's engine responds and makes progress (see
//! [`super::health`]); an unhealthy engine is a normal reply with `healthy: false`, not an error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream};
use lumen_proto::tls::ServerTls;
use lumen_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use super::ServiceError;
use super::convert::{self, EncodedPrompt, PromptRef, wire_u32};
use super::health;
use super::node::{InFlight, WorkerNode};
use super::otel::WorkerSpan;
use crate::engine::{EngineEvent, EngineRequest, RequestStream};
use crate::grammar::{CompiledGrammar, Constraint, GrammarCompiler};
use crate::tokenizer::Tokenizer;

/// HTTP/2 keepalive pings, so a vanished head is noticed on idle connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// The `Worker` gRPC service.
#[derive(Clone)]
pub struct WorkerService {
    node: WorkerNode,
}

impl WorkerService {
    pub fn new(node: WorkerNode) -> WorkerService {
        WorkerService { node }
    }

    /// The service wrapped for a tonic server.
    pub fn into_server(self) -> pb::worker_server::WorkerServer<WorkerService> {
        pb::worker_server::WorkerServer::new(self)
    }
}

/// Serves the `Worker` service in plain text on an already-bound listener until `shutdown`
/// resolves, then finishes in-flight calls and returns.
pub async fn serve_worker(
    listener: TcpListener,
    node: WorkerNode,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    serve_worker_tls(listener, node, None, shutdown).await
}

/// [`serve_worker`], over TLS with `tls` (the head then dials `https://`). Connections get
/// TCP_NODELAY either way: without it each streamed token could wait for a delayed ACK.
pub async fn serve_worker_tls(
    listener: TcpListener,
    node: WorkerNode,
    tls: Option<&ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%address, worker_id = node.worker_id(), tls = tls.is_some(), "worker gRPC service listening");
    let router = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .add_service(WorkerService::new(node).into_server());
    lumen_proto::tls::serve_grpc(router, listener, tls, shutdown).await?;
    Ok(())
}

/// Tokenizes off the async runtime: long prompts and chat templates take real CPU time.
async fn encode_blocking(
    tokenizer: &Tokenizer,
    prompt: impl FnOnce(&Tokenizer) -> Result<EncodedPrompt, ServiceError> + Send + 'static,
) -> Result<EncodedPrompt, ServiceError> {
    let tokenizer = tokenizer.clone();
    tokio::task::spawn_blocking(move || prompt(&tokenizer))
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenizing panicked: {e}")))?
}

/// The longest a constraint may take to compile before the request is refused. llguidance's fuel
/// limits and the compiler's own deadline (`grammar::GrammarLimits::compile_timeout`) end a
/// runaway compilation; this bounds what the caller waits for if anything else runs long.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// Compiles a structured-output constraint off the async runtime (cached by its text).
async fn compile_blocking(
    grammars: &Arc<GrammarCompiler>,
    constraint: Constraint,
) -> Result<Arc<CompiledGrammar>, ServiceError> {
    let grammars = Arc::clone(grammars);
    let param = constraint.param.clone();
    let task = tokio::task::spawn_blocking(move || grammars.compile(&constraint));
    let compiled = match tokio::time::timeout(COMPILE_TIMEOUT, task).await {
        Ok(joined) => joined.map_err(|e| ServiceError::Internal(format!("compiling a constraint panicked: {e}")))?,
        Err(_) => {
            let reason = format!("compiling it took longer than {} s", COMPILE_TIMEOUT.as_secs());
            return Err(ServiceError::InvalidConstraint { param, reason });
        }
    };
    compiled.map_err(|e| ServiceError::InvalidConstraint { param, reason: e.to_string() })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Where a response stream is: the `Started` event still to send, engine events, or done.
enum Phase {
    Start(pb::GenerateEvent, RequestStream),
    Streaming(RequestStream),
    Done,
}

/// Holds a request's place in its replica's in-flight count while its response stream lives;
/// when the stream is dropped before the request ended (the head cancelled it: its client went
/// away or stopped reading), logs that in the request's span, so the abort carries its id.
struct Tracked {
    _in_flight: InFlight,
    span: Span,
    /// The request's OpenTelemetry span until it ends (tracing on).
    otel: Option<WorkerSpan>,
    ended: bool,
}

impl Tracked {
    /// Ends the OpenTelemetry span on the stream's last item.
    fn note(&mut self, item: &Result<pb::GenerateEvent, Status>) {
        let Some(otel) = self.otel.take() else { return };
        match item {
            Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Finished(finished)) }) => {
                otel.finished(finished);
            }
            Err(status) => otel.failed(status.message()),
            Ok(_) => self.otel = Some(otel),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.ended {
            self.span.in_scope(|| tracing::info!("the caller cancelled the request before it finished; aborted"));
        }
        if let Some(otel) = self.otel.take() {
            otel.failed("the caller cancelled the request before it finished");
        }
    }
}

/// The response stream of one request; dropping it drops (and so aborts) the engine request.
/// `in_flight` is held until the stream ends or is dropped; each item is produced in `span`.
fn event_stream(
    started: pb::GenerateEvent,
    request: RequestStream,
    in_flight: InFlight,
    (span, otel): (Span, Option<WorkerSpan>),
) -> EventStream {
    let tracked = Tracked { _in_flight: in_flight, span, otel, ended: false };
    let state = (Phase::Start(started, request), tracked);
    Box::pin(futures::stream::unfold(state, |(phase, mut tracked)| {
        let polled = tracked.span.clone();
        next_event(phase).instrument(polled).map(move |next| {
            let (item, phase) = next?;
            tracked.ended |= matches!(phase, Phase::Done);
            tracked.note(&item);
            Some((item, (phase, tracked)))
        })
    }))
}

/// The next item of a response stream and the phase after it; `None` once done.
async fn next_event(phase: Phase) -> Option<(Result<pb::GenerateEvent, Status>, Phase)> {
    match phase {
        Phase::Start(started, request) => Some((Ok(started), Phase::Streaming(request))),
        Phase::Streaming(mut request) => match request.recv().await? {
            EngineEvent::Delta(d) => Some((Ok(convert::delta_event(d)), Phase::Streaming(request))),
            EngineEvent::PromptLogprobs(tokens) => {
                Some((Ok(convert::prompt_logprobs_event(tokens)), Phase::Streaming(request)))
            }
            EngineEvent::Embedding(values) => Some((Ok(convert::embedding_event(values)), Phase::Streaming(request))),
            EngineEvent::Finished { usage, timings } => {
                Some((Ok(convert::finished_event(usage, timings)), Phase::Done))
            }
            EngineEvent::Failed(message) => {
                tracing::warn!(%message, "request failed in the engine");
                Some((Err(Status::internal(message)), Phase::Done))
            }
        },
        Phase::Done => None,
    }
}

impl WorkerService {
    /// Starts `req`; `otel` (the request's span) moves into the response stream once it exists.
    async fn start_generate(
        &self,
        req: pb::GenerateRequest,
        span: Span,
        otel: &mut Option<WorkerSpan>,
    ) -> Result<EventStream, ServiceError> {
        let replica = self.node.replica(&req.replica_id)?;
        let in_flight = replica.track_request();
        let handle = replica.handle().clone();
        let Some(prompt) = req.prompt else {
            return Err(ServiceError::invalid("prompt", "a prompt (chat, text or token ids) is required"));
        };
        let param = PromptRef::from(&prompt).param();
        // A reasoning gate needs the prompt's text: has the template already closed the reasoning?
        let gated = req.structured_output.as_ref().is_some_and(|s| !s.reasoning_end.is_empty());
        let want_text = req.return_prompt || gated;
        let encoded =
            encode_blocking(handle.tokenizer(), move |tok| convert::encode_prompt(tok, (&prompt).into(), want_text))
                .await?;
        if let Some(pooling) = convert::pooling(req.pooling.as_ref(), replica.pooling())? {
            let mut ids = encoded.token_ids;
            convert::truncate_left(&mut ids, req.pooling.as_ref().and_then(|p| p.truncate_prompt_tokens));
            let prompt_tokens = ids.len();
            let sent = if req.return_prompt_token_ids { ids.clone() } else { Vec::new() };
            let stream = handle.generate(EngineRequest::pooling(req.request_id.clone(), ids, pooling)).await?;
            tracing::debug!(prompt_tokens, "embedding request queued");
            let started = convert::started_event(prompt_tokens, 0, sent, None);
            return Ok(event_stream(started, stream, in_flight, (span, otel.take())));
        }
        let limits = handle.limits();
        let prompt_tokens = encoded.token_ids.len();
        convert::check_prompt_fits(prompt_tokens, limits, param)?;
        let mut engine_req = EngineRequest::new(
            req.request_id.clone(),
            encoded.token_ids.clone(),
            convert::sampling_params(req.sampling.as_ref()),
            convert::stop_params(req.stop.as_ref(), prompt_tokens, limits),
        );
        engine_req.n = if req.n == 0 { 1 } else { req.n as usize };
        engine_req.skip_special_tokens = req.skip_special_tokens;
        engine_req.prompt_logprobs = req.prompt_logprobs.map(|k| k as usize);
        engine_req.resumed = req.resume.map(convert::resumed).unwrap_or_default();
        engine_req.priority = req.priority;
        engine_req.cache_salt = req.cache_salt.filter(|s| !s.is_empty());
        engine_req.tenant = (!req.tenant.is_empty()).then(|| std::sync::Arc::from(req.tenant.as_str()));
        engine_req.tenant_weight = req.tenant_weight.max(1);
        if let Some(structured) = &req.structured_output {
            let constraint = convert::constraint(structured)?;
            engine_req.constraint = Some(compile_blocking(handle.grammars(), constraint).await?);
            engine_req.constraint_after = convert::constraint_after(structured, encoded.text.as_deref());
        }
        let resumed_tokens = engine_req.resumed_tokens();
        let stream = handle.generate(engine_req).await?;
        tracing::debug!(prompt_tokens, "request queued");
        let only_ids = req.return_prompt_token_ids && !req.return_prompt;
        let ids = if only_ids { encoded.token_ids.clone() } else { Vec::new() };
        let started = convert::started_event(prompt_tokens, resumed_tokens, ids, req.return_prompt.then_some(encoded));
        Ok(event_stream(started, stream, in_flight, (span, otel.take())))
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn start_replica(
        &self,
        request: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let req = request.into_inner();
        let info = self.node.start_replica_json(&req.replica_id, &req.engine_options_json).await?;
        Ok(Response::new(info))
    }

    async fn stop_replica(
        &self,
        request: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaReply>, Status> {
        let req = request.into_inner();
        let drain = Duration::from_millis(u64::from(req.drain_timeout_ms));
        // The stop completes even if the caller gives up waiting.
        let node = self.node.clone();
        tokio::spawn(async move { node.stop_replica(&req.replica_id, drain).await })
            .await
            .map_err(|e| Status::internal(format!("stopping the replica panicked: {e}")))??;
        Ok(Response::new(pb::StopReplicaReply {}))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let mut otel = WorkerSpan::start(request.metadata(), request.get_ref());
        let req = request.into_inner();
        let span = tracing::info_span!("request", request_id = %req.request_id, replica = %req.replica_id);
        let stream = self.start_generate(req, span.clone(), &mut otel).instrument(span.clone()).await;
        if let Err(e) = &stream {
            span.in_scope(|| tracing::debug!(error = %e, "request refused"));
            if let Some(otel) = otel.take() {
                otel.failed(&e.to_string());
            }
        }
        Ok(Response::new(stream?))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        let req = request.into_inner();
        self.node.replica(&req.replica_id)?.handle().abort(&req.request_id);
        Ok(Response::new(pb::AbortReply {}))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeReply>, Status> {
        let req = request.into_inner();
        let replica = self.node.replica(&req.replica_id)?;
        let tokenizer = replica.handle().tokenizer();
        let Some(input) = req.input else {
            return Err(ServiceError::invalid("prompt", "text or chat messages are required").into());
        };
        let encoded =
            encode_blocking(tokenizer, move |tok| convert::encode_prompt(tok, (&input).into(), false)).await?;
        let token_strs = if req.return_token_strs {
            encoded.token_ids.iter().map(|&id| tokenizer.id_to_token(id).unwrap_or_default()).collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::TokenizeReply {
            count: wire_u32(encoded.token_ids.len()),
            token_ids: encoded.token_ids,
            max_model_len: wire_u32(replica.handle().limits().max_model_len),
            token_strs,
        }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeReply>, Status> {
        let req = request.into_inner();
        let replica = self.node.replica(&req.replica_id)?;
        let tokenizer = replica.handle().tokenizer();
        let vocab = tokenizer.vocab_size();
        if let Some(bad) = req.token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ServiceError::invalid(
                "tokens",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            )
            .into());
        }
        let text = tokenizer.decode(&req.token_ids, false).map_err(ServiceError::from)?;
        Ok(Response::new(pb::DetokenizeReply { text }))
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthReply>, Status> {
        let req = request.into_inner();
        let replica = self.node.replica(&req.replica_id)?;
        let reply = health::check_replica(&replica, health::stall_timeout(&req)).await;
        if !reply.healthy {
            tracing::warn!(replica_id = %req.replica_id, message = %reply.message, "health check failed");
        }
        Ok(Response::new(reply))
    }

    async fn stats(&self, _request: Request<pb::StatsRequest>) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(pb::WorkerStats {
            worker_id: self.node.worker_id().to_string(),
            replicas: self.node.stats().await,
        }))
    }
}
