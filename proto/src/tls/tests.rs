//! PEM loading errors name their file; a valid pair serves a handshake to a client trusting the
//! CA, and a connection that never handshakes does not hold others up. Client certificates:
//! `--ssl-cert-reqs 2` admits only clients with a certificate from the CA, `1` also admits
//! clients without one, and either refuses a certificate from another CA; both sides can tell a
//! refused certificate from other failures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A CA and a certificate for `localhost` / `127.0.0.1` it signed (`cert.pem`, `key.pem`; no
/// extended key usage, so it serves as server and client identity), as PEM files; besides:
/// `server-only.pem` (same CA, serverAuth usage only), `rogue.pem` (another CA's), and
/// `other-key.pem` (a key of no certificate).
struct Pki {
    dir: tempfile::TempDir,
}

/// A CA's issuer and its certificate's PEM.
fn certificate_authority(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    (Issuer::new(ca, ca_key), ca_cert.pem())
}

/// A certificate for the loopback names signed by `issuer`, and its key, as PEM.
fn leaf(issuer: &Issuer<'static, KeyPair>, usages: Vec<ExtendedKeyUsagePurpose>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let (issuer, ca_pem) = certificate_authority("lumen test CA");
        let (cert, key) = leaf(&issuer, Vec::new());
        let (server_only, server_only_key) = leaf(&issuer, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        let (other_issuer, _) = certificate_authority("another CA");
        let (rogue, rogue_key) = leaf(&other_issuer, Vec::new());
        let other_key = KeyPair::generate().expect("another key");
        for (name, pem) in [
            ("ca.pem", ca_pem),
            ("cert.pem", cert),
            ("key.pem", key),
            ("server-only.pem", server_only),
            ("server-only-key.pem", server_only_key),
            ("rogue.pem", rogue),
            ("rogue-key.pem", rogue_key),
            ("other-key.pem", other_key.serialize_pem()),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("writing PEM");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("writing");
        path
    }
}

fn load_error(cert: &Path, key: &Path) -> TlsError {
    ServerTls::load(cert, key).expect_err("should be refused")
}

#[test]
fn certfile_and_keyfile_go_together() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("cert.pem"), pki.path("key.pem"));
    let flags = |cert, key| ServerTls::from_flags(cert, key, CertReqs::None, None);
    assert!(flags(None, None).expect("plain").is_none());
    assert!(flags(Some(&cert), Some(&key)).expect("TLS").is_some());
    let only_cert = flags(Some(&cert), None).expect_err("cert alone");
    assert_eq!(
        only_cert.to_string(),
        "--ssl-certfile was given without --ssl-keyfile: TLS needs both (or neither, for plain text)"
    );
    let only_key = flags(None, Some(&key)).expect_err("key alone");
    assert!(matches!(only_key, TlsError::Incomplete { given: "--ssl-keyfile", missing: "--ssl-certfile" }));
}

#[test]
fn an_unreadable_file_is_named() {
    let pki = Pki::new();
    let missing = pki.path("nope.pem");
    let error = load_error(&missing, &pki.path("key.pem"));
    assert!(matches!(&error, TlsError::Read { path, .. } if path == &missing), "{error}");
    assert!(error.to_string().contains("nope.pem"), "{error}");
    let error = load_error(&pki.path("cert.pem"), &missing);
    assert!(matches!(&error, TlsError::Read { path, .. } if path == &missing), "{error}");
}

#[test]
fn a_file_without_pem_blocks_is_named_with_what_it_lacks() {
    let pki = Pki::new();
    let junk = pki.write("junk.pem", "this is not a certificate\n");
    let error = load_error(&junk, &pki.path("key.pem"));
    assert!(matches!(&error, TlsError::Missing { path, expected: "certificate", .. } if path == &junk), "{error}");
    // A certificate where the key should be.
    let error = load_error(&pki.path("cert.pem"), &pki.path("cert.pem"));
    assert!(matches!(&error, TlsError::Missing { expected: "private key", .. }), "{error}");
    assert!(error.to_string().contains("cert.pem"), "{error}");
}

#[test]
fn broken_pem_is_named() {
    let pki = Pki::new();
    let good = std::fs::read_to_string(pki.path("cert.pem")).expect("cert");
    let cut = pki.write("cut.pem", &good[..good.len() / 2]);
    let error = load_error(&cut, &pki.path("key.pem"));
    assert!(matches!(&error, TlsError::Pem { path, .. } if path == &cut), "{error}");
    let garbled = pki.write("garbled.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
    let error = load_error(&garbled, &pki.path("key.pem"));
    assert!(matches!(&error, TlsError::Pem { path, .. } if path == &garbled), "{error}");
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let pki = Pki::new();
    let error = load_error(&pki.path("cert.pem"), &pki.path("other-key.pem"));
    assert!(matches!(error, TlsError::Identity { .. }), "{error}");
    assert!(error.to_string().contains("other-key.pem"), "{error}");
}

#[test]
fn a_ca_file_must_hold_certificates() {
    let pki = Pki::new();
    let trust = ClientTls::from_ca_file(&pki.path("ca.pem")).expect("CA");
    assert_eq!(trust.ca_file(), Some(pki.path("ca.pem").as_path()));
    assert!(trust.ca_pem().is_some_and(|pem| pem.starts_with(b"-----BEGIN CERTIFICATE-----")));
    let error = ClientTls::from_ca_file(&pki.path("key.pem")).expect_err("a key is no CA");
    assert!(matches!(error, TlsError::Missing { expected: "certificate", .. }), "{error}");
    assert!(ClientTls::from_flag(None).expect("system roots").ca_pem().is_none());
}

/// The rustls config of a [`ClientTls`] trusting the test CA and presenting `identity`
/// (certificate and key files of the [`Pki`]) when given.
fn client_config(pki: &Pki, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let (cert, key) = identity.map(|(cert, key)| (pki.path(cert), pki.path(key))).unzip();
    let client = ClientTls::from_flags(Some(&pki.path("ca.pem")), cert.as_deref(), key.as_deref()).expect("client");
    assert_eq!(client.has_identity(), identity.is_some());
    Arc::new(client.rustls_config().expect("rustls config"))
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_up_a_handshake() {
    let pki = Pki::new();
    let tls = ServerTls::load(&pki.path("cert.pem"), &pki.path("key.pem")).expect("loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut incoming = TlsIncoming::new(listener, &tls);
    let address = incoming.local_addr().expect("bound");
    // Connects and never says anything.
    let _silent = tokio::net::TcpStream::connect(address).await.expect("connect");

    let connector = tokio_rustls::TlsConnector::from(client_config(&pki, None));
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut stream = connector.connect(name, tcp).await.expect("handshake");
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        stream.write_all(b"ping").await.expect("write");
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).await.expect("read");
        reply
    });
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, futures::StreamExt::next(&mut incoming))
        .await
        .expect("the handshake was held up")
        .expect("a connection")
        .expect("no error");
    let mut stream = accepted;
    let mut ping = [0u8; 4];
    stream.read_exact(&mut ping).await.expect("read");
    assert_eq!(&ping, b"ping");
    stream.write_all(b"pong").await.expect("write");
    assert_eq!(&client.await.expect("client"), b"pong");
}

/// What one TLS connection over loopback came to: the server's verdict (its certificate
/// failure, or `Err(None)` for another) and the client's (a ping answered, or its error).
struct Outcome {
    server: Result<(), Option<CertificateFailure>>,
    client: std::io::Result<()>,
}

/// Connects a client with `client` to a listener with `server`, and has it send a ping that the
/// server answers.
async fn connect(server: &ServerTls, client: Arc<rustls::ClientConfig>) -> Outcome {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("bound");
    let acceptor = tokio_rustls::TlsAcceptor::from(server.config());
    let serving = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut stream = acceptor.accept(tcp).await.map_err(|e| certificate_failure(&e))?;
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await.map_err(|_| None)?;
        stream.write_all(b"pong").await.map_err(|_| None)?;
        stream.flush().await.map_err(|_| None)
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let client = async {
        let tcp = tokio::net::TcpStream::connect(address).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        // With TLS 1.3 the client finishes its half before the server has judged its
        // certificate: a refusal arrives as an alert on the first read.
        let mut stream = connector.connect(name, tcp).await?;
        stream.write_all(b"ping").await?;
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await?;
        assert_eq!(&pong, b"pong");
        Ok(())
    };
    let client = tokio::time::timeout(HANDSHAKE_TIMEOUT, client).await.expect("the client hung");
    Outcome { server: serving.await.expect("server task"), client }
}

fn verifying(pki: &Pki, reqs: CertReqs) -> ServerTls {
    ServerTls::load_verifying_clients(&pki.path("cert.pem"), &pki.path("key.pem"), reqs, &pki.path("ca.pem"))
        .expect("server TLS")
}

/// The client's error says the server refused its certificate (or its lack of one).
fn refused_by_server(outcome: &Outcome) -> CertificateFailure {
    let error = outcome.client.as_ref().expect_err("the client got through");
    let failure = certificate_failure(error).unwrap_or_else(|| panic!("not a certificate failure: {error}"));
    assert!(failure.refused_by_peer(), "{failure:?}");
    failure
}

#[tokio::test]
async fn required_client_certificates_admit_only_clients_with_one_from_the_ca() {
    let pki = Pki::new();
    let server = verifying(&pki, CertReqs::Required);
    assert_eq!(server.cert_reqs(), CertReqs::Required);

    let with_ca_cert = connect(&server, client_config(&pki, Some(("cert.pem", "key.pem")))).await;
    assert!(with_ca_cert.server.is_ok() && with_ca_cert.client.is_ok(), "refused: {:?}", with_ca_cert.server);

    let without = connect(&server, client_config(&pki, None)).await;
    assert_eq!(without.server, Err(Some(CertificateFailure::NoneSent)));
    assert_eq!(
        CertificateFailure::NoneSent.as_seen_by_server(),
        "client certificate required: the client presented none"
    );
    let seen = refused_by_server(&without);
    assert_eq!(seen, CertificateFailure::RefusedByPeer(rustls::AlertDescription::CertificateRequired));
    assert!(seen.as_seen_by_client().contains("requires a client certificate"), "{}", seen.as_seen_by_client());

    let rogue = connect(&server, client_config(&pki, Some(("rogue.pem", "rogue-key.pem")))).await;
    let Err(Some(CertificateFailure::Refused(reason))) = &rogue.server else {
        panic!("a certificate of another CA was not refused as such: {:?}", rogue.server)
    };
    assert_eq!(reason, "UnknownIssuer");
    refused_by_server(&rogue);

    // A certificate for servers only (extended key usage serverAuth) is no client identity.
    let server_only = connect(&server, client_config(&pki, Some(("server-only.pem", "server-only-key.pem")))).await;
    let Err(Some(CertificateFailure::Refused(reason))) = &server_only.server else {
        panic!("a serverAuth-only certificate was not refused: {:?}", server_only.server)
    };
    assert!(reason.contains("extended key usage"), "{reason}");
}

#[tokio::test]
async fn optional_client_certificates_admit_clients_without_one_but_refuse_a_bad_one() {
    let pki = Pki::new();
    let server = verifying(&pki, CertReqs::Optional);
    let without = connect(&server, client_config(&pki, None)).await;
    assert!(without.server.is_ok() && without.client.is_ok(), "refused: {:?}", without.server);
    let with_ca_cert = connect(&server, client_config(&pki, Some(("cert.pem", "key.pem")))).await;
    assert!(with_ca_cert.server.is_ok() && with_ca_cert.client.is_ok(), "refused: {:?}", with_ca_cert.server);
    let rogue = connect(&server, client_config(&pki, Some(("rogue.pem", "rogue-key.pem")))).await;
    assert!(matches!(&rogue.server, Err(Some(CertificateFailure::Refused(_)))), "{:?}", rogue.server);
    refused_by_server(&rogue);
}

#[tokio::test]
async fn servers_without_cert_reqs_ask_for_no_certificate() {
    let pki = Pki::new();
    let server = ServerTls::from_flags(
        Some(&pki.path("cert.pem")),
        Some(&pki.path("key.pem")),
        CertReqs::None,
        Some(&pki.path("ca.pem")),
    )
    .expect("TLS")
    .expect("on");
    // Even a certificate of another CA: it is never asked for, so never sent.
    let rogue = connect(&server, client_config(&pki, Some(("rogue.pem", "rogue-key.pem")))).await;
    assert!(rogue.server.is_ok() && rogue.client.is_ok(), "refused: {:?}", rogue.server);
}

#[test]
fn client_certificates_need_tls_and_a_ca_file() {
    let pki = Pki::new();
    let (cert, key, ca) = (pki.path("cert.pem"), pki.path("key.pem"), pki.path("ca.pem"));
    for reqs in [CertReqs::Optional, CertReqs::Required] {
        let error = ServerTls::from_flags(None, None, reqs, Some(&ca)).expect_err("no TLS");
        assert!(matches!(error, TlsError::ClientCertsWithoutTls { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains(&format!("--ssl-cert-reqs {reqs}")), "{text}");
        assert!(text.contains("--ssl-certfile") && text.contains("--ssl-keyfile"), "{text}");

        let error = ServerTls::from_flags(Some(&cert), Some(&key), reqs, None).expect_err("no CA");
        assert!(matches!(error, TlsError::ClientCertsWithoutCa { .. }), "{error}");
        assert!(error.to_string().contains("needs --ssl-ca-certs"), "{error}");

        let tls = ServerTls::from_flags(Some(&cert), Some(&key), reqs, Some(&ca)).expect("valid").expect("on");
        assert_eq!(tls.cert_reqs(), reqs);
    }
    // A CA file that holds no certificate is named.
    let error = ServerTls::from_flags(Some(&cert), Some(&key), CertReqs::Required, Some(&key)).expect_err("no CA");
    assert!(matches!(&error, TlsError::Missing { path, .. } if path == &key), "{error}");
}

#[test]
fn cert_reqs_take_python_ssl_values() {
    assert_eq!("0".parse::<CertReqs>().expect("0"), CertReqs::None);
    assert_eq!("1".parse::<CertReqs>().expect("1"), CertReqs::Optional);
    assert_eq!("2".parse::<CertReqs>().expect("2"), CertReqs::Required);
    assert_eq!(CertReqs::default(), CertReqs::None);
    let error = "3".parse::<CertReqs>().expect_err("3");
    assert_eq!(error.to_string(), "--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), not `3`");
    assert!("required".parse::<CertReqs>().is_err());
}

#[test]
fn a_client_identity_is_checked_when_loaded() {
    let pki = Pki::new();
    let trust =
        ClientTls::from_flags(Some(&pki.path("ca.pem")), Some(&pki.path("cert.pem")), Some(&pki.path("key.pem")))
            .expect("identity");
    assert!(trust.has_identity());
    assert!(!ClientTls::from_flags(Some(&pki.path("ca.pem")), None, None).expect("roots only").has_identity());
    let error = ClientTls::from_flags(None, Some(&pki.path("cert.pem")), None).expect_err("half");
    assert!(matches!(error, TlsError::Incomplete { given: "--ssl-certfile", .. }), "{error}");
    let error =
        ClientTls::system().with_identity(&pki.path("cert.pem"), &pki.path("other-key.pem")).expect_err("mismatch");
    assert!(matches!(error, TlsError::Identity { .. }), "{error}");
}

/// `ClientTls`'s own HTTP client against `serve_http` with client certificates required: with
/// its identity it is answered, without one the handshake fails.
#[tokio::test]
async fn the_http_client_presents_its_identity_to_a_server_that_requires_one() {
    let pki = Pki::new();
    let server = verifying(&pki, CertReqs::Required);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://127.0.0.1:{}/", listener.local_addr().expect("bound").port());
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let stop = shutdown_signal();
    let serving = tokio::spawn(async move { serve_http(listener, app, Some(&server), stop.1).await });

    let ca = pki.path("ca.pem");
    let with_identity = ClientTls::from_flags(Some(&ca), Some(&pki.path("cert.pem")), Some(&pki.path("key.pem")))
        .expect("identity")
        .http_client(reqwest::Client::builder())
        .expect("client");
    let reply = with_identity.get(&url).send().await.expect("answered");
    assert_eq!(reply.text().await.expect("body"), "hello");

    let anonymous =
        ClientTls::from_ca_file(&ca).expect("roots").http_client(reqwest::Client::builder()).expect("client");
    let error = anonymous.get(&url).send().await.expect_err("answered without a client certificate");
    let failure = certificate_failure(&error).unwrap_or_else(|| panic!("not a certificate failure: {error:?}"));
    assert!(failure.refused_by_peer(), "{failure:?}");
    let _ = stop.0.send(());
    serving.await.expect("server task").expect("served");
}

/// A shutdown signal for a test server: send on the first to stop the second.
fn shutdown_signal() -> (tokio::sync::oneshot::Sender<()>, impl std::future::Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// A TLS listener that greets every client it admits (as an HTTP/2 server speaks first).
async fn greeting_server(tls: &ServerTls) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut incoming = TlsIncoming::new(listener, tls);
    let url = format!("https://127.0.0.1:{}", incoming.local_addr().expect("bound").port());
    let serving = tokio::spawn(async move {
        while let Some(Ok(mut stream)) = futures::StreamExt::next(&mut incoming).await {
            let _ = stream.write_all(b"hi").await;
        }
    });
    (url, serving)
}

#[tokio::test]
async fn a_probe_tells_why_a_server_refuses_the_client() {
    let pki = Pki::new();
    let (url, serving) = greeting_server(&verifying(&pki, CertReqs::Required)).await;
    let ca = pki.path("ca.pem");
    let client = |cert: Option<&str>, key: Option<&str>| {
        let (cert, key) = (cert.map(|c| pki.path(c)), key.map(|k| pki.path(k)));
        ClientTls::from_flags(Some(&ca), cert.as_deref(), key.as_deref()).expect("client")
    };
    let started = std::time::Instant::now();
    assert_eq!(client(Some("cert.pem"), Some("key.pem")).probe(&url).await, None, "admitted: nothing to tell");
    assert!(started.elapsed() < PROBE_TIMEOUT, "the probe waited for its timeout");
    assert_eq!(
        client(None, None).probe(&url).await,
        Some(CertificateFailure::RefusedByPeer(rustls::AlertDescription::CertificateRequired))
    );
    let rogue = client(Some("rogue.pem"), Some("rogue-key.pem")).probe(&url).await;
    assert!(rogue.as_ref().is_some_and(CertificateFailure::refused_by_peer), "{rogue:?}");
    // A client that does not trust the server: refused on its own side.
    let untrusting = ClientTls::from_ca_file(&pki.path("rogue.pem")).expect("roots").probe(&url).await;
    assert!(matches!(untrusting, Some(CertificateFailure::Refused(_))), "{untrusting:?}");
    // Not TLS, or nobody there: nothing to tell.
    assert_eq!(client(None, None).probe(&url.replace("https", "http")).await, None);
    serving.abort();
    let _ = serving.await;
    assert_eq!(client(None, None).probe(&url).await, None);
}

#[test]
fn a_certificate_alert_is_recognised_in_text_alone() {
    // h2 keeps only the message of an I/O error; the alert is still recognised in it.
    let flattened = std::io::Error::other("received fatal alert: UnknownCA");
    assert_eq!(
        certificate_failure(&flattened),
        Some(CertificateFailure::RefusedByPeer(rustls::AlertDescription::UnknownCA))
    );
    assert_eq!(certificate_failure(&std::io::Error::other("received fatal alert: DecodeError")), None);
    assert_eq!(certificate_failure(&std::io::Error::other("connection reset")), None);
}
