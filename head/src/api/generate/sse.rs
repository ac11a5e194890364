//! Server-sent events as OpenAI clients expect them: one `data: {json}\n\n` frame per chunk,
//! `data: [DONE]\n\n` last, a `data: {"error": {...}}` frame before `[DONE]` when a stream fails,
//! and `: keep-alive` comment frames whenever nothing else was sent for an interval (a request can
//! wait in the admission queue or behind a long prefill before its first token).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;

use crate::api::edge::errors::ApiError;

/// The comment frame sent while idle.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";
/// The last frame of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// One `data:` frame holding `chunk` as JSON.
pub fn data<T: Serialize>(chunk: &T) -> Bytes {
    match serde_json::to_string(chunk) {
        Ok(json) => Bytes::from(format!("data: {json}\n\n")),
        Err(e) => error(&ApiError::Internal(format!("could not encode a chunk: {e}"))),
    }
}

/// The frame reporting a failure mid-stream (OpenAI's error body).
pub fn error(err: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", err.body()))
}

/// A streaming response: `text/event-stream`, not cached, not buffered by proxies. An `Err`
/// from `frames` aborts the body (hyper closes the connection instead of ending the stream).
pub fn response<S, E>(frames: S) -> Response
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let body = Body::from_stream(frames);
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Inserts a [`KEEP_ALIVE`] frame whenever `inner` yields nothing for `interval`; ends with it.
pub fn with_keep_alive<S>(inner: S, interval: Duration) -> KeepAlive<S>
where
    S: Stream<Item = Bytes>,
{
    KeepAlive { inner: Box::pin(inner), sleep: Box::pin(tokio::time::sleep(interval)), interval }
}

/// See [`with_keep_alive`]. Dropping it drops the inner stream (and with it the request).
pub struct KeepAlive<S> {
    inner: Pin<Box<S>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    interval: Duration,
}

impl<S: Stream<Item = Bytes>> Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + this.interval;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(item)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let deadline = tokio::time::Instant::now() + this.interval;
                    this.sleep.as_mut().reset(deadline);
                    Poll::Ready(Some(Bytes::from_static(KEEP_ALIVE)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    #[test]
    fn a_chunk_is_one_data_line_and_a_blank_line() {
        let frame = data(&json!({"a": "x\ny", "b": [1, 2]}));
        assert_eq!(&frame[..], b"data: {\"a\":\"x\\ny\",\"b\":[1,2]}\n\n".as_slice());
    }

    #[test]
    fn error_frames_carry_openai_error_bodies() {
        let frame = error(&ApiError::Unavailable("replica died".into()));
        let text = std::str::from_utf8(&frame).unwrap();
        let json: serde_json::Value = serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(json["error"]["message"], "replica died");
        assert!(text.ends_with("\n\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_comments_fill_idle_time_and_stop_with_the_stream() {
        let inner = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Bytes::from_static(b"data: 1\n\n")
        });
        let frames: Vec<Bytes> = with_keep_alive(inner, Duration::from_millis(100)).collect().await;
        let frames: Vec<&[u8]> = frames.iter().map(|b| &b[..]).collect();
        assert_eq!(frames, vec![KEEP_ALIVE, KEEP_ALIVE, b"data: 1\n\n".as_slice()]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_keep_alive_while_chunks_flow() {
        let inner = futures::stream::iter([Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let frames: Vec<Bytes> = with_keep_alive(inner, Duration::from_millis(100)).collect().await;
        assert_eq!(frames.len(), 2);
    }
}
