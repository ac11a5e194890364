//! TLS for every listener and client of Lumen, from PEM files (vLLM's `--ssl-certfile`,
//! `--ssl-keyfile`, `--ssl-ca-certs` and `--ssl-cert-reqs`).
//!
//! Contract:
//! - [`ServerTls::from_flags`] takes the certificate chain and private key files: both (TLS on),
//!   neither (plain), or an error naming the missing one. Every failure happens at start-up and
//!   names the file: unreadable, not PEM, no certificate or no key in it, or a key that does not
//!   belong to the certificate.
//! - Client certificates follow [`CertReqs`] (Python's `ssl.CERT_*`, as vLLM and uvicorn take
//!   them): `0` asks for none; `1` asks, and verifies one that is presented against the
//!   `--ssl-ca-certs` roots (a client without one still connects); `2` refuses the handshake of a
//!   client without a certificate chained to those roots. `1` or `2` without `--ssl-ca-certs`, or
//!   without TLS on, is a start-up error naming the flags.
//! - One [`ServerTls`] serves every port of a process: [`TlsIncoming`] wraps a bound
//!   `TcpListener` and yields TLS streams both to `axum::serve` (HTTPS; ALPN offers `h2` and
//!   `http/1.1`) and to tonic's `serve_with_incoming_shutdown` (gRPC), so graceful shutdown works
//!   as it does on plain TCP. A refused client certificate is logged (warn) with the peer address
//!   and the reason ([`CertificateFailure`]).
//! - [`ClientTls`] is what a client trusts when it dials `https://`: the certificates of the
//!   `--ssl-ca-certs` file and nothing else, or the system's roots without one; and, when given a
//!   certificate and key, the identity it presents to servers that ask for one (a process's own
//!   `--ssl-certfile`/`--ssl-keyfile`: the certificate must then allow the clientAuth extended
//!   key usage, or carry no extended key usage at all). `http://` peers are dialed in plain text
//!   whatever it says. It configures tonic channels ([`ClientTls::apply`]) and reqwest clients
//!   ([`ClientTls::http_client`]) alike: both build their rustls client config from it with
//!   these roots and `with_client_auth_cert`, as [`ClientTls::rustls_config`] does for
//!   [`ClientTls::probe`], the handshake that names why a server refused this client.
//! - The crypto provider is aws-lc-rs, the one the dependency graph already builds (reqwest's
//!   rustls). Configs built here pass it explicitly, and it is installed as the process default
//!   the first time one is built, so tonic's and reqwest's own configs never have to choose.

mod failure;
mod listener;
mod probe;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

pub use failure::{CertificateFailure, certificate_failure};
pub use listener::{HANDSHAKE_TIMEOUT, TlsIncoming, TlsStream, serve_grpc, serve_http};
pub use probe::PROBE_TIMEOUT;

/// Why certificates or keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{given} was given without {missing}: TLS needs both (or neither, for plain text)")]
    Incomplete { given: &'static str, missing: &'static str },
    #[error(
        "--ssl-cert-reqs {reqs} asks clients for certificates, which needs TLS on: give --ssl-certfile and \
         --ssl-keyfile (or --ssl-cert-reqs 0)"
    )]
    ClientCertsWithoutTls { reqs: CertReqs },
    #[error(
        "--ssl-cert-reqs {reqs} needs --ssl-ca-certs: the CA certificates that client certificates must be \
         signed by"
    )]
    ClientCertsWithoutCa { reqs: CertReqs },
    #[error("--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), not `{0}`")]
    BadCertReqs(String),
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
    #[error("building the TLS client config: {0}")]
    ClientConfig(String),
}

/// The flag names in messages (the CLI's and vLLM's spelling).
const CERT_FLAG: &str = "--ssl-certfile";
const KEY_FLAG: &str = "--ssl-keyfile";

/// Which client certificates a server asks for: vLLM's `--ssl-cert-reqs`, with the values of
/// Python's `ssl.CERT_NONE` (0), `CERT_OPTIONAL` (1) and `CERT_REQUIRED` (2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CertReqs {
    /// Client certificates are not requested.
    #[default]
    None,
    /// Requested; one that is presented must chain to the CA roots, none is fine too.
    Optional,
    /// No handshake without a client certificate chained to the CA roots.
    Required,
}

impl std::str::FromStr for CertReqs {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<CertReqs, TlsError> {
        match s.trim() {
            "0" => Ok(CertReqs::None),
            "1" => Ok(CertReqs::Optional),
            "2" => Ok(CertReqs::Required),
            other => Err(TlsError::BadCertReqs(other.to_owned())),
        }
    }
}

impl std::fmt::Display for CertReqs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertReqs::None => "0",
            CertReqs::Optional => "1",
            CertReqs::Required => "2",
        })
    }
}

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

/// The CA certificates of a PEM bundle as trust roots, and the PEM itself.
fn roots(path: &Path) -> Result<(rustls::RootCertStore, Vec<u8>), TlsError> {
    let pem = read(path)?;
    Ok((root_store(path, &pem)?, pem))
}

/// The CA certificates of `pem` (read from `path`) as trust roots.
fn root_store(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Trust { path: path.to_owned(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// A certificate chain and its key from PEM files, checked to belong together. Its `Debug`
/// names the files only: the key never reaches a log.
struct KeyPair {
    cert_path: PathBuf,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The files' PEM, for the clients that take PEM (tonic, reqwest).
    chain_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl KeyPair {
    fn load(cert: &Path, key: &Path) -> Result<KeyPair, TlsError> {
        let chain_pem = read(cert)?;
        let key_pem = read(key)?;
        let pair = KeyPair {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            chain: certificates(cert, &chain_pem)?,
            key: private_key(key, &key_pem)?,
            chain_pem,
            key_pem,
        };
        rustls::sign::CertifiedKey::from_der(pair.chain.clone(), pair.key.clone_key(), &provider())
            .map_err(|e| pair.error(e))?;
        Ok(pair)
    }

    fn error(&self, e: rustls::Error) -> TlsError {
        identity_error(&self.cert_path, &self.key_path, e)
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("cert", &self.cert_path).field("key", &self.key_path).finish_non_exhaustive()
    }
}

fn identity_error(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    TlsError::Identity { cert: cert.to_owned(), key: key.to_owned(), reason: e.to_string() }
}

/// The verifier of client certificates for `reqs` (none for [`CertReqs::None`]).
fn client_verifier(reqs: CertReqs, ca: &Path) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
    if reqs == CertReqs::None {
        return Ok(None);
    }
    let (roots, _) = roots(ca)?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if reqs == CertReqs::Optional { builder.allow_unauthenticated() } else { builder };
    let verifier = builder.build().map_err(|e| TlsError::Trust { path: ca.to_owned(), reason: e.to_string() })?;
    Ok(Some(verifier))
}

/// A server's certificate chain and key, ready to terminate TLS on any of its ports.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    reqs: CertReqs,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("alpn", &self.config.alpn_protocols)
            .field("cert_reqs", &self.reqs)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// TLS when both files are given, plain text (`None`) when neither is; client certificates
    /// as `reqs` asks, verified against the CA file `ca` (needed unless `reqs` is
    /// [`CertReqs::None`], and then unused).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        reqs: CertReqs,
        ca: Option<&Path>,
    ) -> Result<Option<ServerTls>, TlsError> {
        let (cert, key) = match (cert, key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if reqs == CertReqs::None => return Ok(None),
            (None, None) => return Err(TlsError::ClientCertsWithoutTls { reqs }),
            (Some(_), None) => return Err(TlsError::Incomplete { given: CERT_FLAG, missing: KEY_FLAG }),
            (None, Some(_)) => return Err(TlsError::Incomplete { given: KEY_FLAG, missing: CERT_FLAG }),
        };
        match (reqs, ca) {
            (CertReqs::None, _) => ServerTls::load(cert, key).map(Some),
            (reqs, Some(ca)) => ServerTls::load_verifying_clients(cert, key, reqs, ca).map(Some),
            (reqs, None) => Err(TlsError::ClientCertsWithoutCa { reqs }),
        }
    }

    /// Loads a PEM certificate chain (leaf first) and the leaf's private key; client
    /// certificates are not requested.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        ServerTls::build(cert, key, CertReqs::None, None)
    }

    /// [`ServerTls::load`], asking clients for certificates chained to the CA file `ca` as
    /// `reqs` says.
    pub fn load_verifying_clients(cert: &Path, key: &Path, reqs: CertReqs, ca: &Path) -> Result<ServerTls, TlsError> {
        ServerTls::build(cert, key, reqs, client_verifier(reqs, ca)?)
    }

    fn build(
        cert: &Path,
        key: &Path,
        reqs: CertReqs,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<ServerTls, TlsError> {
        let pair = KeyPair::load(cert, key)?;
        let identity = |e| identity_error(cert, key, e);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(pair.chain, pair.key).map_err(identity)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls { config: Arc::new(config), reqs })
    }

    /// The rustls config every listener of the process shares.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// Which client certificates the listeners ask for.
    pub fn cert_reqs(&self) -> CertReqs {
        self.reqs
    }
}

/// What a client trusts when it dials `https://`, and the certificate it presents.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// The `--ssl-ca-certs` file and its PEM; `None`: the system's roots.
    ca: Option<(PathBuf, Arc<[u8]>)>,
    /// The client certificate chain and key, presented to servers that ask.
    identity: Option<Arc<KeyPair>>,
}

impl ClientTls {
    /// The system's root certificates.
    pub fn system() -> ClientTls {
        ClientTls::default()
    }

    /// Only the CA certificates of `path` (a PEM bundle), checked now.
    pub fn from_ca_file(path: &Path) -> Result<ClientTls, TlsError> {
        let (_, pem) = roots(path)?;
        Ok(ClientTls { ca: Some((path.to_owned(), pem.into())), identity: None })
    }

    /// [`ClientTls::from_ca_file`] when a file is given, else [`ClientTls::system`].
    pub fn from_flag(ca_file: Option<&Path>) -> Result<ClientTls, TlsError> {
        ca_file.map_or_else(|| Ok(ClientTls::system()), ClientTls::from_ca_file)
    }

    /// [`ClientTls::from_flag`] for the roots, presenting the certificate and key when both are
    /// given (an error naming the missing flag when only one is).
    pub fn from_flags(ca_file: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<ClientTls, TlsError> {
        let trust = ClientTls::from_flag(ca_file)?;
        match (cert, key) {
            (Some(cert), Some(key)) => trust.with_identity(cert, key),
            (None, None) => Ok(trust),
            (Some(_), None) => Err(TlsError::Incomplete { given: CERT_FLAG, missing: KEY_FLAG }),
            (None, Some(_)) => Err(TlsError::Incomplete { given: KEY_FLAG, missing: CERT_FLAG }),
        }
    }

    /// These roots, presenting the certificate chain `cert` with its key `key` (PEM files,
    /// checked now) to servers that ask for a client certificate.
    pub fn with_identity(self, cert: &Path, key: &Path) -> Result<ClientTls, TlsError> {
        Ok(ClientTls { identity: Some(Arc::new(KeyPair::load(cert, key)?)), ..self })
    }

    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The PEM of the trusted CA certificates, when a file replaces the system's roots.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca.as_ref().map(|(_, pem)| &pem[..])
    }

    /// The trusted CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(path, _)| path.as_path())
    }

    /// tonic's client config for these roots and identity.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        provider();
        let config = match &self.ca {
            Some((_, pem)) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match &self.identity {
            Some(pair) => config.identity(Identity::from_pem(&pair.chain_pem, &pair.key_pem)),
            None => config,
        }
    }

    /// An HTTP client from `builder` trusting these roots (only the file's, when given) and
    /// presenting the identity, if any.
    pub fn http_client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, TlsError> {
        provider();
        let http_error = |e: reqwest::Error| TlsError::HttpClient(e.to_string());
        let builder = match &self.ca {
            Some((path, pem)) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| TlsError::Trust { path: path.clone(), reason: e.to_string() })?;
                builder.tls_certs_only(certs)
            }
            None => builder,
        };
        let builder = match &self.identity {
            Some(pair) => {
                let pem = [&pair.chain_pem[..], b"\n", &pair.key_pem[..]].concat();
                builder.identity(reqwest::Identity::from_pem(&pem).map_err(http_error)?)
            }
            None => builder,
        };
        builder.build().map_err(http_error)
    }

    /// The rustls client config of these roots (the system's: the platform's certificate store)
    /// and identity, offering `h2` by ALPN. tonic and reqwest build theirs from the same files
    /// ([`ClientTls::tonic_config`], [`ClientTls::http_client`]); this one serves
    /// [`ClientTls::probe`].
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let roots = match &self.ca {
            Some((path, pem)) => root_store(path, pem)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                roots
            }
        };
        let versions = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::ClientConfig(e.to_string()))?;
        let builder = versions.with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(pair) => {
                builder.with_client_auth_cert(pair.chain.clone(), pair.key.clone_key()).map_err(|e| pair.error(e))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
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
