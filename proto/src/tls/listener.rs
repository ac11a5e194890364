//! [`TlsIncoming`]: the connections of a bound TCP listener, TLS-terminated.
//!
//! One task accepts TCP connections and hands each to its own handshake task, so a client that
//! connects and sends nothing (or speaks plain HTTP) delays no one else; a handshake gets
//! [`HANDSHAKE_TIMEOUT`]. A handshake that fails over a certificate (a client certificate missing
//! where one is required, or refused, or the client refusing ours) is logged as a warning with
//! the peer address and the reason; other failures (plain text on a TLS port, a probe that only
//! connects, a timeout) at debug level; the connection is dropped. Finished streams wait
//! in a bounded queue for the server. The listener closes when the `TlsIncoming` is dropped
//! (axum and tonic drop it when their graceful shutdown begins), exactly like a plain
//! `TcpListener`. [`serve_http`] and [`serve_grpc`] serve on a listener with or without TLS, so
//! every server of Lumen starts the same way.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::ServerTls;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const READY_QUEUE: usize = 64;
/// The pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A server-side TLS stream over TCP.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS connections of a listener: an `axum::serve::Listener` and a `Stream` of
/// `io::Result<TlsStream>` for tonic.
pub struct TlsIncoming {
    ready: mpsc::Receiver<(TlsStream, SocketAddr)>,
    local: Option<SocketAddr>,
    acceptor: JoinHandle<()>,
}

impl TlsIncoming {
    /// Starts accepting on `listener` (needs a Tokio runtime).
    pub fn new(listener: TcpListener, tls: &ServerTls) -> TlsIncoming {
        let local = listener.local_addr().ok();
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls.config()), tx));
        TlsIncoming { ready, local, acceptor }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the listener has no local address"))
    }
}

/// Serves `app` on `listener` (HTTPS with `tls`) until `shutdown` resolves, then lets the
/// requests in flight finish (axum's graceful shutdown), as plain `axum::serve` does. Every
/// connection gets TCP_NODELAY (as uvicorn gives vLLM's): without it a streamed chunk written
/// while the previous one is unacknowledged waits for the client's delayed ACK, up to 40 ms.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<&ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match tls {
        Some(tls) => axum::serve(TlsIncoming::new(listener, tls), app).with_graceful_shutdown(shutdown).await,
        None => {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

/// Serves a tonic `router` on `listener` (TLS with `tls`) until `shutdown` resolves, then
/// finishes the calls in flight. Plain connections get TCP_NODELAY too.
pub async fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<&ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => router.serve_with_incoming_shutdown(TlsIncoming::new(listener, tls), shutdown).await,
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, ready: mpsc::Sender<(TlsStream, SocketAddr)>) {
    loop {
        let accepted = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(connection) => connection,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Without TCP_NODELAY each streamed token could wait for a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // Fails only once the server stopped taking connections: the stream drops.
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => log_failed_handshake(peer, &e),
                Err(_) => tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
            }
        });
    }
}

fn log_failed_handshake(peer: SocketAddr, error: &io::Error) {
    match super::certificate_failure(error) {
        Some(failure) => {
            tracing::warn!(%peer, reason = %failure.as_seen_by_server(), "TLS handshake refused");
        }
        None => tracing::debug!(%peer, error = %error, "TLS handshake failed"),
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsStream, SocketAddr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop never ends while `ready` is held: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TlsIncoming::local_addr(self)
    }
}

impl futures::Stream for TlsIncoming {
    type Item = io::Result<TlsStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx).map(|connection| connection.map(|(stream, _)| Ok(stream)))
    }
}
