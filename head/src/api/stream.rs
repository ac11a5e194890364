//! Launching a generation after admission, and driving a streaming response.
//!
//! A request admitted at once is sent to the backend before the HTTP response starts, so refusals
//! (unknown model, context too long, no replica) keep their status codes. A queued request gets
//! its SSE response at once (keep-alive comments flow while it waits) and is sent when its turn
//! comes; a failure then arrives as an error event. Either way the body stream owns the backend
//! streams and the admission slot: when the client disconnects, the body is dropped and with it
//! everything the request holds.

use std::time::Duration;

use axum::body::Bytes;
use axum::response::Response;
use futures::StreamExt;
use futures::future::BoxFuture;
use lumen_proto::v1 as pb;
use tracing::{Instrument, Span};

use super::admission::Ticket;
use super::dispatch::{self, Running, Step, Usage};
use super::errors::ApiError;
use super::{ApiState, sse};
use crate::observe::Trace;

/// A generation that runs now, or will once admitted.
pub enum Launch {
    Running(Running),
    Queued(BoxFuture<'static, Result<Running, ApiError>>),
}

/// Sends `requests` now if `ticket` is ready; otherwise prepares to send them once admitted.
/// `trace` learns the request's id, model and prompt now, and what happens to it later.
pub async fn launch(
    state: &ApiState,
    model: String,
    requests: Vec<pb::GenerateRequest>,
    n: u32,
    ticket: Ticket,
    trace: Trace,
) -> Result<Launch, ApiError> {
    trace.launched(&model, &requests);
    match ticket {
        Ticket::Ready(permit) => {
            Ok(Launch::Running(dispatch::start(state.backend.as_ref(), &model, requests, n, permit, trace).await?))
        }
        Ticket::Queued(queued) => {
            let backend = state.backend.clone();
            Ok(Launch::Queued(Box::pin(async move {
                let started = match queued.admitted().await {
                    Ok(permit) => dispatch::start(backend.as_ref(), &model, requests, n, permit, trace.clone()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &started {
                    trace.failed(e);
                }
                started
            })))
        }
    }
}

impl Launch {
    /// Waits for admission (if queued) and the backend's acceptance.
    pub async fn running(self) -> Result<Running, ApiError> {
        match self {
            Launch::Running(running) => Ok(running),
            Launch::Queued(pending) => pending.await,
        }
    }
}

/// Turns generation steps into SSE frames in one route's chunk format.
pub trait ChunkWriter: Send + 'static {
    /// Frames sent once the backend accepted the request (chat's role chunks).
    fn started(&mut self) -> Vec<Bytes>;
    /// Frames for one step; may be empty (text held back, nothing new).
    fn step(&mut self, step: Step) -> Vec<Bytes>;
    /// The final usage chunk (`stream_options.include_usage`).
    fn usage(&mut self, usage: Usage) -> Bytes;
}

enum Phase {
    Launching(Launch),
    Running(Running),
    Done,
}

struct Driver<W> {
    phase: Phase,
    writer: W,
    include_usage: bool,
}

impl<W: ChunkWriter> Driver<W> {
    /// The next frames, `None` at the end. Never ends without `[DONE]`.
    async fn next(&mut self) -> Option<Vec<Bytes>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Launching(launch) => match launch.running().await {
                    Ok(running) => {
                        self.phase = Phase::Running(running);
                        let frames = self.writer.started();
                        if !frames.is_empty() {
                            return Some(frames);
                        }
                    }
                    Err(e) => return Some(fail(&e)),
                },
                Phase::Running(mut running) => match running.next().await {
                    Some(Ok(step)) => {
                        let frames = self.writer.step(step);
                        self.phase = Phase::Running(running);
                        if !frames.is_empty() {
                            return Some(frames);
                        }
                    }
                    Some(Err(e)) => return Some(fail(&e)),
                    None => {
                        let mut frames = Vec::with_capacity(2);
                        if self.include_usage {
                            frames.push(self.writer.usage(running.usage()));
                        }
                        frames.push(Bytes::from_static(sse::DONE));
                        return Some(frames);
                    }
                },
            }
        }
    }
}

fn fail(e: &ApiError) -> Vec<Bytes> {
    tracing::warn!(error = %e, "stream failed");
    vec![sse::error(e), Bytes::from_static(sse::DONE)]
}

/// The SSE response for `launch`, written by `writer`, with keep-alives every `keep_alive`.
pub fn respond<W: ChunkWriter>(
    launch: Launch,
    writer: W,
    include_usage: bool,
    keep_alive: Duration,
    span: Span,
) -> Response {
    let driver = Driver { phase: Phase::Launching(launch), writer, include_usage };
    let frames = futures::stream::unfold(driver, move |mut driver| {
        let span = span.clone();
        async move { driver.next().await.map(|frames| (frames, driver)) }.instrument(span)
    })
    .flat_map(futures::stream::iter);
    sse::response(sse::with_keep_alive(frames, keep_alive))
}
