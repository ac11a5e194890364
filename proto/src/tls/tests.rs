//! PEM loading errors name their file; a valid pair serves a handshake to a client trusting the
//! CA, and a connection that never handshakes does not hold others up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A CA and a server certificate for `localhost` / `127.0.0.1` it signed, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "lumen test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let other_key = KeyPair::generate().expect("another key");
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
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
    assert!(ServerTls::from_flags(None, None).expect("plain").is_none());
    assert!(ServerTls::from_flags(Some(&cert), Some(&key)).expect("TLS").is_some());
    let only_cert = ServerTls::from_flags(Some(&cert), None).expect_err("cert alone");
    assert_eq!(
        only_cert.to_string(),
        "--ssl-certfile was given without --ssl-keyfile: TLS needs both (or neither, for plain text)"
    );
    let only_key = ServerTls::from_flags(None, Some(&key)).expect_err("key alone");
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

fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&pki.path("ca.pem"), &std::fs::read(pki.path("ca.pem")).expect("ca")).expect("ca") {
        roots.add(cert).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
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

    let connector = tokio_rustls::TlsConnector::from(client_config(&pki));
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
