//! [`ClientTls::probe`]: one TLS handshake on its own, to learn why a connection was refused.
//!
//! With TLS 1.3 a server judges a client certificate after the client has finished its half of
//! the handshake, so the refusal (an alert) reaches the client on its next read. Over gRPC that
//! read belongs to hyper's connection task: a call waiting for the connection then fails as
//! "connection closed", and h2 keeps only the text of an I/O error, so the reason is lost or
//! flattened. The probe dials the same address with the same roots and client certificate
//! ([`ClientTls::rustls_config`]), completes the handshake, sends nothing, and reads once within
//! [`PROBE_TIMEOUT`]: a refusal then surfaces as rustls's own error. It is meant for the failure
//! path (a call that failed at the transport), never for every connection.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{CertificateFailure, ClientTls, certificate_failure};

/// How long the probe may take, dial to first read.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl ClientTls {
    /// The certificate problem behind a gRPC call to `url` that ended with `status`, if that is
    /// what ended it: only a call that failed at the transport (a status with a source; a
    /// server's own answers have none) qualifies; the status's error chain is read first, and,
    /// since TLS 1.3 often shows a refused client certificate only as a closed connection, a
    /// probe handshake asks otherwise.
    pub async fn call_failure(&self, url: &str, status: &tonic::Status) -> Option<CertificateFailure> {
        std::error::Error::source(status)?;
        match certificate_failure(status) {
            Some(failure) => Some(failure),
            None => self.probe(url).await,
        }
    }

    /// Whether the `https://` server at `url` refuses this client's certificate (or its lack of
    /// one), or presents one this client does not trust. `None` when it accepts the handshake, or
    /// the URL is not `https://`, or the probe fails for another reason (unreachable, timeout).
    pub async fn probe(&self, url: &str) -> Option<CertificateFailure> {
        let uri: tonic::transport::Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("https") {
            return None;
        }
        // `[::1]` is how a URI writes the IPv6 address the server name holds bare.
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.clone()).ok()?;
        let connector = TlsConnector::from(Arc::new(self.rustls_config().ok()?));
        let handshake = async {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let mut stream = connector.connect(name, tcp).await?;
            // An accepting gRPC server speaks first (its HTTP/2 settings); a refusing one alerts.
            let mut first = [0u8; 1];
            stream.read(&mut first).await.map(drop)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, handshake).await {
            Ok(Err(error)) => certificate_failure(&error),
            Ok(Ok(())) | Err(_) => None,
        }
    }
}
