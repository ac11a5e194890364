//! gRPC clients to workers, one cached channel per worker, and the mapping of gRPC status codes
//! to [`BackendError`] (the only place that mapping lives).
//!
//! Channels connect lazily on first use and reconnect by themselves; a worker that re-registers
//! at a new address gets a new channel. Connection failures surface as `UNAVAILABLE` statuses.
//! A worker that advertises an `https://` address is dialed over TLS and must present a
//! certificate for that host signed by the pool's roots (`--ssl-ca-certs`, else the system's);
//! the head presents its own certificate (`--ssl-certfile`) to a worker that asks for one. A
//! call that fails at the transport of an `https://` worker is explained by a probe handshake
//! when the TLS handshake was refused ([`ClientPool::describe_failure`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use lumen_proto::tls::{CertificateFailure, ClientTls};
use lumen_proto::v1 as pb;
use pb::worker_client::WorkerClient;
use tonic::transport::{Channel, Endpoint};

use crate::backend::BackendError;

/// Response metadata key in which a worker names the request parameter it rejected.
pub const PARAM_METADATA_KEY: &str = "lumen-param";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// HTTP/2 windows of a worker connection. Output a client has not read yet stays in its
/// request's stream window (2 MiB, hyper's default), which also holds connection window until
/// read: with hyper's 5 MiB connection window three stalled clients could stop every stream of
/// that worker. The connection window is therefore the protocol's largest, so only a stream's own
/// window ever pushes back.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Cached channels by worker id.
#[derive(Default)]
pub(super) struct ClientPool {
    channels: Mutex<HashMap<String, (String, Channel)>>,
    /// Whom `https://` workers must prove to be; the system's roots until set.
    tls: OnceLock<ClientTls>,
}

impl ClientPool {
    /// Sets the roots `https://` workers are verified against, once, before the first dial;
    /// `false` when they were set already (the first stay).
    pub fn set_tls(&self, tls: ClientTls) -> bool {
        self.tls.set(tls).is_ok()
    }

    /// A client for `worker_id` at `address`, reusing the cached channel when the address is the
    /// same. Fails only when the address is not a valid URI, or it is `https://` and the TLS
    /// roots cannot be loaded.
    pub fn client(&self, worker_id: &str, address: &str) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached_address, channel)) = channels.get(worker_id)
            && cached_address == address
        {
            return Ok(WorkerClient::new(channel.clone()));
        }
        let tls = self.tls.get_or_init(ClientTls::system);
        let channel = tls.apply(endpoint(address)?)?.connect_lazy();
        channels.insert(worker_id.to_owned(), (address.to_owned(), channel.clone()));
        Ok(WorkerClient::new(channel))
    }

    /// `status`, the failure of a call to `worker_id`, in words: its code and message, and,
    /// when the call failed at the transport (the status has a source) and the TLS handshake
    /// with the worker was refused, why and which flag to look at. With TLS 1.3 a refused client
    /// certificate otherwise shows only as a closed connection, so a probe handshake asks.
    pub async fn describe_failure(&self, worker_id: &str, status: &tonic::Status) -> String {
        let text = format!("{:?}: {}", status.code(), status.message());
        let address =
            self.channels.lock().unwrap_or_else(PoisonError::into_inner).get(worker_id).map(|(a, _)| a.clone());
        let tls = self.tls.get_or_init(ClientTls::system);
        let Some(failure) = tls.call_failure(address.as_deref().unwrap_or_default(), status).await else {
            return text;
        };
        let hint = match failure {
            CertificateFailure::Refused(_) => {
                "the head's --ssl-ca-certs must include the CA of the worker's certificate"
            }
            _ => {
                "the worker asks for a client certificate: the head presents its --ssl-certfile, which must be signed \
                 by a CA of the worker's --ssl-ca-certs"
            }
        };
        format!("{text}; TLS: {} ({hint})", failure.as_seen_by_client())
    }
}

/// The endpoint for a worker's advertised address (`host:port` or a full `http://` URI).
pub(super) fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
}

/// What a worker's gRPC status means to the API layer.
pub fn status_to_error(status: &tonic::Status) -> BackendError {
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::InvalidArgument => BackendError::InvalidRequest {
            message,
            param: status
                .metadata()
                .get(PARAM_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        },
        tonic::Code::ResourceExhausted => BackendError::Overloaded(message),
        tonic::Code::NotFound | tonic::Code::Unavailable => BackendError::Unavailable(message),
        // The worker never answers these itself: they are what tonic reports when the connection
        // breaks (a worker killed mid-stream shows as `Unknown: h2 protocol error ...`).
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Aborted => {
            BackendError::Unavailable(format!("the connection to the replica's worker broke: {message}"))
        }
        _ => BackendError::Internal(format!("{:?}: {message}", status.code())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_the_param_from_metadata() {
        let mut status = tonic::Status::invalid_argument("top_p must be in (0, 1]");
        status.metadata_mut().insert(PARAM_METADATA_KEY, tonic::metadata::MetadataValue::from_static("top_p"));
        assert_eq!(
            status_to_error(&status),
            BackendError::InvalidRequest { message: "top_p must be in (0, 1]".into(), param: Some("top_p".into()) }
        );
    }

    #[test]
    fn codes_map_to_their_backend_errors() {
        assert!(matches!(status_to_error(&tonic::Status::resource_exhausted("full")), BackendError::Overloaded(_)));
        assert!(matches!(status_to_error(&tonic::Status::not_found("gone")), BackendError::Unavailable(_)));
        assert!(matches!(status_to_error(&tonic::Status::unavailable("down")), BackendError::Unavailable(_)));
        assert!(matches!(status_to_error(&tonic::Status::internal("bug")), BackendError::Internal(_)));
        let broken =
            status_to_error(&tonic::Status::unknown("h2 protocol error: error reading a body from connection"));
        assert!(
            matches!(&broken, BackendError::Unavailable(m) if m.contains("connection to the replica's worker broke"))
        );
    }

    #[test]
    fn bare_host_port_addresses_get_an_http_scheme() {
        assert_eq!(
            endpoint("127.0.0.1:7000").map(|e| e.uri().to_string()).ok().as_deref(),
            Some("http://127.0.0.1:7000/")
        );
        assert!(endpoint("http://[::1").is_err());
    }
}
