//! TLS for every listener and client of Lumen, from PEM files (vLLM's `--ssl-certfile`,
//! `--ssl-keyfile` and `--ssl-ca-certs`).
//!
//! Contract:
//! - [`ServerTls::from_flags`] takes the certificate chain and private key files: both (TLS on),
//!   neither (plain), or an error naming the missing one. Every failure happens at start-up and
//!   names the file: unreadable, not PEM, no certificate or no key in it, or a key that does not
//!   belong to the certificate.
//! - One [`ServerTls`] serves every port of a process: [`TlsIncoming`] wraps a bound
//!   `TcpListener` and yields TLS streams both to `axum::serve` (HTTPS; ALPN offers `h2` and
//!   `http/1.1`) and to tonic's `serve_with_incoming_shutdown` (gRPC), so graceful shutdown works
//!   as it does on plain TCP. Client certificates are not requested.
//! - [`ClientTls`] is what a client trusts when it dials `https://`: the certificates of the
//!   `--ssl-ca-certs` file and nothing else, or the system's roots without one. `http://` peers
//!   are dialed in plain text whatever it says. It configures tonic channels
//!   ([`ClientTls::apply`]) and reqwest clients ([`ClientTls::http_client`]) alike.
//! - The crypto provider is aws-lc-rs, the one the dependency graph already builds (reqwest's
//!   rustls). Configs built here pass it explicitly, and it is installed as the process default
//!   the first time one is built, so tonic's and reqwest's own configs never have to choose.

mod listener;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

pub use listener::{HANDSHAKE_TIMEOUT, TlsIncoming, TlsStream, serve_grpc, serve_http};

/// Why certificates or keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{given} was given without {missing}: TLS needs both (or neither, for plain text)")]
    Incomplete { given: &'static str, missing: &'static str },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no {expected} (a PEM `-----BEGIN {label}-----` block)")]
    Missing { path: PathBuf, expected: &'static str, label: &'static str },
    #[error("the certificate {cert} and the key {key} do not make a TLS identity: {reason}")]
    Identity { cert: PathBuf, key: PathBuf, reason: String },
    #[error("the CA certificates in {path} cannot be trusted: {reason}")]
    Trust { path: PathBuf, reason: String },
    #[error("building the HTTP client: {0}")]
    HttpClient(String),
}

/// The flag names in messages (the CLI's and vLLM's spelling).
const CERT_FLAG: &str = "--ssl-certfile";
const KEY_FLAG: &str = "--ssl-keyfile";

/// aws-lc-rs, installed as the process default on first use (an earlier install wins).
fn provider() -> Arc<CryptoProvider> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // `Err`: someone installed a default already; theirs stays.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(source) => TlsError::Read { path: path.to_owned(), source },
        other => TlsError::Pem { path: path.to_owned(), reason: other.to_string() },
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: path.to_owned(), expected: "certificate", label: "CERTIFICATE" });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            TlsError::Missing { path: path.to_owned(), expected: "private key", label: "PRIVATE KEY" }
        }
        other => pem_error(path, other),
    })
}

/// A server's certificate chain and key, ready to terminate TLS on any of its ports.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("alpn", &self.config.alpn_protocols).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// TLS when both files are given, plain text (`None`) when neither is.
    pub fn from_flags(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<ServerTls>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => ServerTls::load(cert, key).map(Some),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Incomplete { given: CERT_FLAG, missing: KEY_FLAG }),
            (None, Some(_)) => Err(TlsError::Incomplete { given: KEY_FLAG, missing: CERT_FLAG }),
        }
    }

    /// Loads a PEM certificate chain (leaf first) and the leaf's private key.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = certificates(cert, &read(cert)?)?;
        let key_der = private_key(key, &read(key)?)?;
        let identity =
            |e: rustls::Error| TlsError::Identity { cert: cert.to_owned(), key: key.to_owned(), reason: e.to_string() };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(identity)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls { config: Arc::new(config) })
    }

    /// The rustls config every listener of the process shares.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }
}

/// What a client trusts when it dials `https://`.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// The `--ssl-ca-certs` file and its PEM; `None`: the system's roots.
    ca: Option<(PathBuf, Arc<[u8]>)>,
}

impl ClientTls {
    /// The system's root certificates.
    pub fn system() -> ClientTls {
        ClientTls::default()
    }

    /// Only the CA certificates of `path` (a PEM bundle), checked now.
    pub fn from_ca_file(path: &Path) -> Result<ClientTls, TlsError> {
        let pem = read(path)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(path, &pem)? {
            roots.add(cert).map_err(|e| TlsError::Trust { path: path.to_owned(), reason: e.to_string() })?;
        }
        Ok(ClientTls { ca: Some((path.to_owned(), pem.into())) })
    }

    /// [`ClientTls::from_ca_file`] when a file is given, else [`ClientTls::system`].
    pub fn from_flag(ca_file: Option<&Path>) -> Result<ClientTls, TlsError> {
        ca_file.map_or_else(|| Ok(ClientTls::system()), ClientTls::from_ca_file)
    }

    /// The PEM of the trusted CA certificates, when a file replaces the system's roots.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca.as_ref().map(|(_, pem)| &pem[..])
    }

    /// The trusted CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(path, _)| path.as_path())
    }

    /// tonic's client config for these roots.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        provider();
        match &self.ca {
            Some((_, pem)) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        }
    }

    /// An HTTP client from `builder` trusting these roots (only the file's, when given).
    pub fn http_client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, TlsError> {
        provider();
        let builder = match &self.ca {
            Some((path, pem)) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| TlsError::Trust { path: path.clone(), reason: e.to_string() })?;
                builder.tls_certs_only(certs)
            }
            None => builder,
        };
        builder.build().map_err(|e| TlsError::HttpClient(e.to_string()))
    }

    /// `endpoint` with TLS when its URI is `https://`, unchanged otherwise.
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, tonic::transport::Error> {
        if endpoint.uri().scheme_str() == Some("https") {
            endpoint.tls_config(self.tonic_config())
        } else {
            Ok(endpoint)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
