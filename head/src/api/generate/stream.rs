//! Launching a generation after admission, and driving a streaming response.
//!
//! A request admitted at once is sent to the backend before the HTTP response starts, so refusals
//! (unknown model, context too long, no replica) keep their status codes. A queued request gets
//! its SSE response at once (keep-alive comments flow while it waits) and is sent when its turn
//! comes; a failure then arrives as an error event. Either way the body stream owns the backend
//! streams and the admission slot: when the client disconnects, the body is dropped and with it
//! everything the request holds.
//!
//! Slow clients: the frames are produced by a pump task into a bounded outbox
//! ([`OUTBOX_FRAMES`]) that the response body drains as the client's connection takes them. The
//! pump never buffers more than that; while the outbox is full it stops pulling from the
//! replica, so back-pressure reaches the worker's per-request stream instead of growing memory
//! here. When the outbox stays full for `stream_send_timeout` (the client took no output for
//! that long), the pump gives up: it drops the request (aborting it on its replica and freeing
//! its admission slot), logs a warning in the request's span (its `request_id`), counts it in
//! `lumen_serve_stream_send_timeouts_total`, and the body ends with an error, so the connection
//! is closed rather than finished as if complete, whenever the client next reads. A client that
//! goes away is noticed at once (the outbox closes) and its request is dropped the same way.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::response::Response;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use lumen_proto::v1 as pb;
use tokio::sync::mpsc;
use tracing::{Instrument, Span};

use crate::api::ApiState;
use crate::api::edge::errors::ApiError;
use crate::api::edge::trace::Trace;
use crate::api::generate::admission::{Entry, Ticket};
use crate::api::generate::dispatch::{self, Running, Step, Usage};
use crate::api::generate::sse;

/// A generation that runs now, or will once admitted.
pub enum Launch {
    Running(Running),
    Queued(BoxFuture<'static, Result<Running, ApiError>>),
}

/// Sends `requests` now if `entry`'s ticket is ready; otherwise prepares to send them once
/// admitted. The launch holds `entry`'s lease to the request's end.
/// `trace` learns the request's id, model and prompt now, and what happens to it later.
pub async fn launch(
    state: &ApiState,
    model: String,
    requests: Vec<pb::GenerateRequest>,
    n: u32,
    entry: Entry,
    trace: Trace,
) -> Result<Launch, ApiError> {
    trace.launched(&model, &requests);
    let details = state.config.enable_prompt_tokens_details;
    let migrations = state.migrations.for_model(state.model_options(&model).migration_limit);
    let Entry { ticket, lease } = entry;
    match ticket {
        Ticket::Ready(permit) => {
            trace.admitted();
            Ok(Launch::Running(
                dispatch::start(&state.backend, &migrations, &model, requests, n, (permit, lease), trace)
                    .await?
                    .with_prompt_details(details),
            ))
        }
        Ticket::Queued(queued) => {
            trace.queued();
            let backend = state.backend.clone();
            Ok(Launch::Queued(Box::pin(async move {
                let started = match queued.admitted().await {
                    Ok(permit) => {
                        trace.admitted();
                        let held = (permit, lease);
                        dispatch::start(&backend, &migrations, &model, requests, n, held, trace.clone())
                            .await
                            .map(|r| r.with_prompt_details(details))
                    }
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
    /// The frames after the last step: by default the usage chunk if asked for, then `[DONE]`.
    fn end(&mut self, usage: Usage, include_usage: bool) -> Vec<Bytes> {
        let mut frames = Vec::with_capacity(2);
        if include_usage {
            frames.push(self.usage(usage));
        }
        frames.push(Bytes::from_static(sse::DONE));
        frames
    }
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
    /// The next frames, `None` at the end. Never ends without the writer's [`ChunkWriter::end`]
    /// (or an error frame and `[DONE]`).
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
                    None => return Some(self.writer.end(running.usage(), self.include_usage)),
                },
            }
        }
    }
}

fn fail(e: &ApiError) -> Vec<Bytes> {
    tracing::warn!(error = %e, "stream failed");
    vec![sse::error(e), Bytes::from_static(sse::DONE)]
}

/// Frames a streaming response buffers between the replica and the client's connection.
pub const OUTBOX_FRAMES: usize = 16;

/// The SSE response for `launch`, written by `writer`, paced by `state`'s `keep_alive` and
/// `stream_send_timeout` (see the module docs). Must be called within a Tokio runtime.
pub fn respond<W: ChunkWriter>(
    launch: Launch,
    writer: W,
    include_usage: bool,
    state: &ApiState,
    span: Span,
) -> Response {
    let driver = Driver { phase: Phase::Launching(launch), writer, include_usage };
    let polled = span.clone();
    let frames = futures::stream::unfold(driver, move |mut driver| {
        let span = polled.clone();
        async move { driver.next().await.map(|frames| (frames, driver)) }.instrument(span)
    })
    .flat_map(futures::stream::iter);
    let frames = sse::with_keep_alive(frames, state.config.keep_alive);
    let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
    let stalled = Arc::new(AtomicBool::new(false));
    let pump = Pump {
        tx,
        send_timeout: state.config.stream_send_timeout,
        stalled: Arc::clone(&stalled),
        timeouts: state.metrics.stream_send_timeouts.clone(),
    };
    tokio::spawn(pump.run(frames).instrument(span));
    sse::response(Outbox { rx, stalled })
}

/// Moves one response's frames into its outbox; see the module docs.
struct Pump {
    tx: mpsc::Sender<Bytes>,
    send_timeout: Duration,
    stalled: Arc<AtomicBool>,
    timeouts: prometheus::IntCounter,
}

impl Pump {
    /// Runs until `frames` ends, the client goes away, or the client stops taking output.
    /// Returning drops `frames`, and with it the request.
    async fn run(self, frames: impl Stream<Item = Bytes>) {
        let mut frames = std::pin::pin!(frames);
        loop {
            let frame = tokio::select! {
                biased;
                () = self.tx.closed() => return,
                frame = frames.next() => frame,
            };
            let Some(frame) = frame else { return };
            // The outbox has room nearly always: only a full one arms the send timeout (a timer
            // per streamed chunk was a measurable share of the head's CPU).
            let frame = match self.tx.try_send(frame) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(frame)) => frame,
            };
            match tokio::time::timeout(self.send_timeout, self.tx.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    self.stalled.store(true, Ordering::Release);
                    self.timeouts.inc();
                    tracing::warn!(
                        timeout_s = self.send_timeout.as_secs_f64(),
                        "the client took no stream output within the send timeout; aborting its request"
                    );
                    return;
                }
            }
        }
    }
}

/// The response body's end of the outbox: the frames, then an error if the pump gave up on a
/// client that stopped reading (so the connection is closed, not finished as if complete).
struct Outbox {
    rx: mpsc::Receiver<Bytes>,
    stalled: Arc<AtomicBool>,
}

/// Ends the body of a stream whose client stopped reading.
#[derive(Debug, thiserror::Error)]
#[error("the client took no stream output within the send timeout")]
pub struct ClientStalled;

impl Stream for Outbox {
    type Item = Result<Bytes, ClientStalled>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if self.stalled.swap(false, Ordering::AcqRel) => Poll::Ready(Some(Err(ClientStalled))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets a flag when dropped: stands for the request a frame source holds.
    struct Held(Arc<AtomicBool>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// An endless frame source that owns a [`Held`].
    fn endless(dropped: &Arc<AtomicBool>) -> impl Stream<Item = Bytes> + Send + 'static {
        let held = Held(Arc::clone(dropped));
        futures::stream::repeat(Bytes::from_static(b"data: x\n\n")).map(move |frame| {
            let _keep = &held;
            frame
        })
    }

    fn pump(send_timeout: Duration) -> (Pump, Outbox, prometheus::IntCounter) {
        let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
        let stalled = Arc::new(AtomicBool::new(false));
        let timeouts = prometheus::IntCounter::new("t", "t").expect("counter");
        let pump = Pump { tx, send_timeout, stalled: Arc::clone(&stalled), timeouts: timeouts.clone() };
        (pump, Outbox { rx, stalled }, timeouts)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_dropped_after_the_send_timeout_and_its_body_errs() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (pump, outbox, timeouts) = pump(Duration::from_secs(3));
        let started = tokio::time::Instant::now();
        pump.run(endless(&dropped)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(dropped.load(Ordering::Acquire), "the request is dropped");
        assert_eq!(timeouts.get(), 1);
        let items: Vec<_> = outbox.collect().await;
        assert_eq!(items.len(), OUTBOX_FRAMES + 1, "the buffered frames, then the error");
        assert!(items[..OUTBOX_FRAMES].iter().all(Result::is_ok));
        assert!(items[OUTBOX_FRAMES].is_err(), "the body ends with an error, not as if complete");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_drops_the_request_at_once() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (pump, outbox, timeouts) = pump(Duration::from_secs(3));
        let never = futures::stream::pending::<Bytes>().chain(endless(&dropped));
        let running = tokio::spawn(pump.run(never));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(outbox);
        tokio::time::timeout(Duration::from_millis(10), running).await.expect("the pump ends").expect("no panic");
        assert!(dropped.load(Ordering::Acquire));
        assert_eq!(timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_reading_gets_every_frame_and_a_clean_end() {
        let (pump, outbox, timeouts) = pump(Duration::from_secs(3));
        let frames = futures::stream::iter((0..100).map(|i| Bytes::from(format!("data: {i}\n\n"))));
        let running = tokio::spawn(pump.run(frames));
        let items: Vec<_> = outbox.collect().await;
        running.await.expect("no panic");
        assert_eq!(items.len(), 100);
        assert!(items.iter().all(Result::is_ok));
        assert_eq!(timeouts.get(), 0);
    }
}
