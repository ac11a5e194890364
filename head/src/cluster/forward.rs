//! A request's event stream from its worker to the API layer, and what ends it when the worker
//! goes silent.
//!
//! Contract:
//! - The stream yields the worker's events in order and ends after `finished`, or with one
//!   `Err` item: the call failed, the worker ended it without `finished`, or the worker went
//!   silent.
//! - Silent: the head marked the worker dead (it missed its heartbeats; [`WorkerSilence`]) and
//!   this stream then received nothing for [`SILENT_STREAM_GRACE`] (or the heartbeat deadline,
//!   if longer). A worker that vanished without closing its connections (a partition that drops
//!   packets, a frozen host) would otherwise hold its streams until HTTP/2 keepalive gives up,
//!   about 40 s; a worker marked dead by mistake (a starved heartbeat) whose tokens still flow
//!   keeps its streams, and one heard from again before the grace ends keeps them too.
//! - While the stream lives it counts as one request in flight on its replica ([`InFlight`]);
//!   dropping it drops the gRPC call, which cancels the request on the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use lumen_proto::v1 as pb;
use tokio::sync::watch;

use super::replica_client::status_to_error;
use crate::backend::{BackendError, EventStream};

/// How long a stream from a worker marked dead may stay silent before it is ended, at least.
pub const SILENT_STREAM_GRACE: Duration = Duration::from_secs(5);

/// Counts one head-side request on a replica for as long as it lives.
pub(super) struct InFlight(Arc<AtomicU32>);

impl InFlight {
    pub fn new(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the head considers a worker silent (marked dead for missed heartbeats): true from
/// then until it is heard from again. The registry holds the sender; streams watch it.
#[derive(Clone, Debug)]
pub(super) struct WorkerSilence {
    pub receiver: watch::Receiver<bool>,
    /// How long a stream may stay silent once the worker is.
    pub grace: Duration,
}

impl WorkerSilence {
    /// Completes once the worker is silent and has stayed so for `grace`; never while it is
    /// heard from (or its registry entry is gone: nothing will mark it silent then).
    async fn outlasted(&mut self) {
        loop {
            let closed = self.receiver.wait_for(|silent| *silent).await.is_err();
            if closed {
                return std::future::pending().await;
            }
            let heard = tokio::select! {
                _ = tokio::time::sleep(self.grace) => return,
                heard = self.receiver.wait_for(|silent| !*silent) => heard.is_ok(),
            };
            if !heard {
                return std::future::pending().await;
            }
        }
    }
}

/// The next event of `events`, or why there is none: `Ok(None)` when the stream ended.
pub(super) async fn next_event<S>(
    events: &mut S,
    silence: &mut WorkerSilence,
    worker_id: &str,
) -> Result<Option<pb::GenerateEvent>, BackendError>
where
    S: Stream<Item = Result<pb::GenerateEvent, tonic::Status>> + Unpin,
{
    tokio::select! {
        biased;
        event = events.next() => event.transpose().map_err(|status| status_to_error(&status)),
        _ = silence.outlasted() => Err(BackendError::Unavailable(format!(
            "worker `{worker_id}` missed its heartbeats and sent nothing for {:?}: the request was ended",
            silence.grace
        ))),
    }
}

/// Where a forwarded stream stands.
struct Forward<S> {
    first: Option<pb::GenerateEvent>,
    events: S,
    silence: WorkerSilence,
    worker_id: String,
    replica_id: String,
    done: bool,
    _in_flight: InFlight,
}

/// The stream handed to the API layer: `first`, then the rest of `events` (see the contract).
pub(super) fn forward_events<S>(
    first: pb::GenerateEvent,
    events: S,
    silence: WorkerSilence,
    in_flight: InFlight,
    worker_id: String,
    replica_id: String,
) -> EventStream
where
    S: Stream<Item = Result<pb::GenerateEvent, tonic::Status>> + Send + Unpin + 'static,
{
    let state =
        Forward { first: Some(first), events, silence, worker_id, replica_id, done: false, _in_flight: in_flight };
    Box::pin(stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let item = match s.first.take() {
            Some(event) => Ok(event),
            None => match next_event(&mut s.events, &mut s.silence, &s.worker_id).await {
                Ok(Some(event)) => Ok(event),
                Ok(None) => Err(BackendError::Unavailable(format!(
                    "replica `{}` ended the stream before the request finished",
                    s.replica_id
                ))),
                Err(e) => Err(e),
            },
        };
        s.done = match &item {
            Ok(event) => matches!(event.event, Some(pb::generate_event::Event::Finished(_))),
            Err(_) => true,
        };
        Some((item, s))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    const GRACE: Duration = Duration::from_secs(5);

    fn token(id: u32) -> pb::GenerateEvent {
        pb::GenerateEvent {
            event: Some(pb::generate_event::Event::Delta(pb::Delta { token_ids: vec![id], ..Default::default() })),
        }
    }

    /// What a test drives a forwarded stream with.
    struct Forwarded {
        stream: EventStream,
        /// The worker's side of the stream.
        tx: mpsc::UnboundedSender<Result<pb::GenerateEvent, tonic::Status>>,
        /// The worker's silence flag, as the registry sets it.
        silent: watch::Sender<bool>,
        /// The replica's in-flight counter.
        counter: Arc<AtomicU32>,
    }

    fn forwarded() -> Forwarded {
        let (tx, rx) = mpsc::unbounded_channel();
        let (silent, receiver) = watch::channel(false);
        let counter = Arc::new(AtomicU32::new(0));
        let in_flight = InFlight::new(counter.clone());
        assert_eq!(counter.load(Ordering::Relaxed), 1, "the stream counts as one request in flight");
        let stream = forward_events(
            token(0),
            UnboundedReceiverStream::new(rx),
            WorkerSilence { receiver, grace: GRACE },
            in_flight,
            "w".into(),
            "r".into(),
        );
        Forwarded { stream, tx, silent, counter }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_from_a_worker_marked_dead_ends_once_it_stays_silent_for_the_grace() {
        let Forwarded { mut stream, tx: _tx, silent, counter } = forwarded();
        assert!(stream.next().await.expect("the first event").is_ok());
        silent.send_replace(true);
        let started = tokio::time::Instant::now();
        let item = stream.next().await.expect("an error item");
        assert!(
            matches!(item, Err(BackendError::Unavailable(ref m)) if m.contains("missed its heartbeats")),
            "{item:?}"
        );
        assert_eq!(started.elapsed(), GRACE);
        assert!(stream.next().await.is_none(), "the error ends the stream");
        drop(stream);
        assert_eq!(counter.load(Ordering::Relaxed), 0, "the request left the replica's in-flight count");
    }

    #[tokio::test(start_paused = true)]
    async fn events_that_keep_coming_keep_the_stream_of_a_worker_marked_dead_by_mistake() {
        let Forwarded { mut stream, tx, silent, .. } = forwarded();
        stream.next().await.expect("first").expect("ok");
        silent.send_replace(true);
        for id in 1..6 {
            tokio::time::sleep(GRACE / 2).await;
            tx.send(Ok(token(id))).expect("send");
            assert!(stream.next().await.expect("an event").is_ok(), "event {id} after {:?} of silence", GRACE / 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_heard_from_again_within_the_grace_keeps_its_streams() {
        let Forwarded { mut stream, tx, silent, .. } = forwarded();
        stream.next().await.expect("first").expect("ok");
        silent.send_replace(true);
        let revive = tokio::spawn(async move {
            tokio::time::sleep(GRACE / 2).await;
            silent.send_replace(false);
            tokio::time::sleep(GRACE * 3).await;
            tx.send(Ok(token(9))).expect("send");
            (silent, tx)
        });
        let item = stream.next().await.expect("an event");
        assert!(item.is_ok(), "the worker was heard from again: {item:?}");
        drop(revive.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_without_finished_is_an_error() {
        let Forwarded { mut stream, tx, silent: _silent, .. } = forwarded();
        stream.next().await.expect("first").expect("ok");
        drop(tx);
        let item = stream.next().await.expect("an error item");
        assert!(matches!(item, Err(BackendError::Unavailable(ref m)) if m.contains("ended the stream")), "{item:?}");
    }
}
