//! TLS end to end with real processes and a private CA made for the test: a `lumen head` with
//! `--ssl-certfile`/`--ssl-keyfile` serves HTTPS on its API and dashboard ports and TLS gRPC; a
//! `lumen worker` with the CA (and certificates of its own) joins over `https://` and serves
//! SmolLM2; a worker without the CA is refused with a log line that says why; plain HTTP and
//! clients that do not trust the CA get nothing; SIGTERM still drains a stream in flight.
//! `lumen serve` with the flags serves HTTPS while its in-process worker joins over loopback.
//! Mutual TLS: with `--ssl-cert-reqs 2` on the head and the worker, a client and the worker
//! present certificates from the CA and SmolLM2 is served (the head presents its own certificate
//! to the worker); a client without one is refused at the handshake, and a worker with a
//! certificate from another CA cannot join: the head logs the refused handshake, the worker why.
//! Half a TLS configuration (or client certificates without a CA) is refused at start-up, naming
//! the flag or the file.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use support::{Lumen, head_args, head_flags, model_path, read_sse, serve_flags, until, worker_flags};

/// A CA, and a certificate it signed for `localhost` and `127.0.0.1` (head, workers and clients
/// share it: it has no extended key usage, so it is both a server and a client identity); and
/// `rogue.pem`/`rogue-key.pem`, the same names signed by another CA.
struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate for the loopback names and its key, signed by a new CA named `ca_name`, as PEM:
/// (CA, certificate, key).
fn issue(ca_name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, cert, key) = issue("lumen e2e CA");
        let (_, rogue, rogue_key) = issue("another CA");
        for (name, pem) in
            [("ca.pem", ca), ("cert.pem", cert), ("key.pem", key), ("rogue.pem", rogue), ("rogue-key.pem", rogue_key)]
        {
            std::fs::write(dir.path().join(name), pem).expect("writing PEM");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `--ssl-certfile`, `--ssl-keyfile` and `--ssl-ca-certs`.
    fn flags(&self) -> Vec<String> {
        ["--ssl-certfile", &self.path("cert.pem"), "--ssl-keyfile", &self.path("key.pem")]
            .into_iter()
            .map(String::from)
            .chain(self.trust())
            .collect()
    }

    fn trust(&self) -> Vec<String> {
        vec!["--ssl-ca-certs".into(), self.path("ca.pem")]
    }

    /// An HTTPS client trusting only the CA.
    fn client(&self) -> reqwest::Client {
        self.client_builder().build().expect("client")
    }

    /// An HTTPS client trusting only the CA and presenting the CA's certificate as its identity.
    fn client_with_identity(&self) -> reqwest::Client {
        let pem =
            [std::fs::read(self.path("cert.pem")).expect("cert"), std::fs::read(self.path("key.pem")).expect("key")]
                .concat();
        let identity = reqwest::Identity::from_pem(&pem).expect("identity PEM");
        self.client_builder().identity(identity).build().expect("client")
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let pem = std::fs::read(self.path("ca.pem")).expect("CA");
        let certs = reqwest::Certificate::from_pem_bundle(&pem).expect("CA PEM");
        reqwest::Client::builder().tls_certs_only(certs)
    }
}

fn https(lumen: &Lumen, port: &str) -> String {
    format!("https://127.0.0.1:{}", lumen.addr(port).port())
}

fn serve_config(dir: &Path) -> PathBuf {
    let config = dir.join("serve.yaml");
    let yaml = format!(
        "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        model:\n          source: {}\n          \
         served_model_name: smol\n          threads: 2\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
        model_path()
    );
    std::fs::write(&config, yaml).expect("writing the serve config");
    config
}

async fn wait_healthy(http: &reqwest::Client, api: &str) {
    until("the API answers /health over HTTPS", Duration::from_secs(60), || async {
        http.get(format!("{api}/health")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "smol",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// A non-streamed and a streamed chat completion over HTTPS.
async fn chat_over_https(http: &reqwest::Client, api: &str) {
    let url = format!("{api}/v1/chat/completions");
    let reply: Value = http.post(&url).json(&chat(8, false)).send().await.expect("POST").json().await.expect("JSON");
    assert!(reply["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{reply}");
    let response = http.post(&url).json(&chat(8, true)).send().await.expect("POST stream");
    assert_eq!(response.status(), 200);
    let (events, done) = read_sse(response).await;
    assert!(done, "the stream ended without [DONE]: {events:?}");
    assert!(events.iter().any(|e| e["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty())));
}

/// A `lumen worker` whose stderr goes to `log` (its ready line is not awaited).
fn spawn_logged(args: &[String], log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(args)
        .env("LUMEN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("starting lumen")
}

#[tokio::test]
async fn head_and_workers_speak_tls_and_an_untrusting_worker_cannot_join() {
    let pki = Pki::new();
    let config = serve_config(pki.dir.path());
    let mut args = head_args(&config);
    args.extend(pki.flags());
    let mut head = Lumen::start(&args);
    let head_grpc = https(&head, "grpc");
    let mut worker_args = worker_flags(&head_grpc, "w-tls");
    worker_args.extend(pki.flags());
    let mut worker = Lumen::start(&worker_args);

    let http = pki.client();
    let (api, dashboard) = (https(&head, "api"), https(&head, "dashboard"));
    wait_healthy(&http, &api).await;
    chat_over_https(&http, &api).await;

    // The dashboard port: the page, and the worker registered with an https:// address.
    let page = http.get(&dashboard).send().await.expect("dashboard");
    assert_eq!(page.status(), 200);
    let cluster: Value =
        http.get(format!("{dashboard}/api/cluster")).send().await.expect("GET").json().await.expect("JSON");
    let workers = cluster["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1, "{cluster}");
    let address = workers[0]["address"].as_str().expect("address");
    assert_eq!(address, https(&worker, "grpc"), "the worker advertises https://");
    // The worker's own metrics port speaks HTTPS too.
    let metrics = http.get(format!("{}/metrics", https(&worker, "metrics"))).send().await.expect("worker metrics");
    assert_eq!(metrics.status(), 200);

    // Plain HTTP to a TLS port, and HTTPS without trusting the CA, get no answer.
    let plain = reqwest::Client::new();
    let plain_url = format!("http://127.0.0.1:{}/health", head.addr("api").port());
    assert!(plain.get(&plain_url).send().await.is_err(), "plain HTTP was answered on the TLS port");
    let untrusting = reqwest::Client::new().get(format!("{api}/health")).send().await;
    assert!(untrusting.is_err(), "an untrusted certificate was accepted");

    // The shipped client with the CA file (and without it).
    let status = |trust: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(["status", "--address", &dashboard])
            .args(trust)
            .output()
            .expect("lumen status")
    };
    let trusted = status(&pki.trust());
    assert!(trusted.status.success(), "{}", String::from_utf8_lossy(&trusted.stderr));
    assert!(String::from_utf8_lossy(&trusted.stdout).contains("RUNNING"));
    assert!(!status(&[]).status.success(), "lumen status trusted the private CA without --ssl-ca-certs");

    // A worker without the CA: refused by its own TLS check, with a log line saying why.
    let log = pki.dir.path().join("untrusting-worker.log");
    let mut untrusting_worker = spawn_logged(&worker_flags(&head_grpc, "w-no-ca"), &log);
    until("the untrusting worker logs why it cannot join", Duration::from_secs(15), || async {
        // "does not trust" where the system has roots, "cannot set up TLS" where it has none.
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("the head at") && l.contains("--ssl-ca-certs"))
    })
    .await;
    let cluster: Value =
        http.get(format!("{dashboard}/api/cluster")).send().await.expect("GET").json().await.expect("JSON");
    assert_eq!(cluster["workers"].as_array().map(Vec::len), Some(1), "{cluster}");
    let _ = untrusting_worker.kill();
    let _ = untrusting_worker.wait();

    // SIGTERM drains: a stream in flight over HTTPS still ends with [DONE], then the head exits 0.
    let in_flight = http.post(format!("{api}/v1/chat/completions")).json(&chat(48, true)).send().await.expect("POST");
    head.terminate();
    let (_, done) = read_sse(in_flight).await;
    assert!(done, "the stream in flight was cut by the shutdown");
    assert_eq!(exit_code(&mut head, Duration::from_secs(20)).await, Some(0));
    worker.terminate();
    assert_eq!(exit_code(&mut worker, Duration::from_secs(20)).await, Some(0));
}

/// Waits for `lumen` to exit, without blocking the runtime: the test's HTTP/2 connections must
/// keep answering the servers' shutdown (GOAWAY and PING), or their drain waits for them.
async fn exit_code(lumen: &mut Lumen, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = lumen.child.try_wait().expect("try_wait") {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REQUIRE_CLIENT_CERTS: [&str; 2] = ["--ssl-cert-reqs", "2"];

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn with_client_certificates_required_only_holders_of_a_ca_certificate_get_in() {
    let pki = Pki::new();
    let config = serve_config(pki.dir.path());
    let mut args = head_args(&config);
    args.extend(pki.flags().into_iter().chain(REQUIRE_CLIENT_CERTS.map(String::from)));
    let head_log = pki.dir.path().join("head.log");
    let head = Lumen::start_with_stderr(&args, std::fs::File::create(&head_log).expect("head log"));
    let head_grpc = https(&head, "grpc");
    // The worker requires a client certificate too: the head must present its own to place and
    // call the replica.
    let mut worker_args = worker_flags(&head_grpc, "w-mtls");
    worker_args.extend(pki.flags().into_iter().chain(REQUIRE_CLIENT_CERTS.map(String::from)));
    let worker = Lumen::start(&worker_args);

    let http = pki.client_with_identity();
    let (api, dashboard) = (https(&head, "api"), https(&head, "dashboard"));
    wait_healthy(&http, &api).await;
    let reply: Value = http
        .post(format!("{api}/v1/chat/completions"))
        .json(&chat(4, false))
        .send()
        .await
        .expect("POST")
        .json()
        .await
        .expect("JSON");
    assert!(reply["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{reply}");
    let worker_metrics = format!("{}/metrics", https(&worker, "metrics"));
    assert_eq!(http.get(&worker_metrics).send().await.expect("worker metrics").status(), 200);

    // Without a client certificate: no handshake, on the head's ports and the worker's.
    let anonymous = pki.client();
    assert!(anonymous.get(format!("{api}/health")).send().await.is_err(), "answered without a client certificate");
    assert!(anonymous.get(&worker_metrics).send().await.is_err(), "the worker answered without one");
    until("the head logs the handshake without a client certificate", Duration::from_secs(5), || async {
        read_log(&head_log).contains("client certificate required: the client presented none")
    })
    .await;

    // `lumen status` presents a certificate with the flags, and is refused without them.
    let status = |identity: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(["status", "--address", &dashboard])
            .args(pki.trust())
            .args(identity)
            .output()
            .expect("lumen status")
    };
    let identity = ["--ssl-certfile".to_string(), pki.path("cert.pem"), "--ssl-keyfile".into(), pki.path("key.pem")];
    let with_identity = status(&identity);
    assert!(with_identity.status.success(), "{}", String::from_utf8_lossy(&with_identity.stderr));
    assert!(String::from_utf8_lossy(&with_identity.stdout).contains("RUNNING"));
    assert!(!status(&[]).status.success(), "lumen status got in without a client certificate");

    // A worker whose certificate comes from another CA (it trusts the head's CA).
    let rogue_log = pki.dir.path().join("rogue-worker.log");
    let mut rogue_args = worker_flags(&head_grpc, "w-rogue");
    rogue_args.extend(
        ["--ssl-certfile", &pki.path("rogue.pem"), "--ssl-keyfile", &pki.path("rogue-key.pem")].map(String::from),
    );
    rogue_args.extend(pki.trust());
    // Held as a `Lumen` (no ready line awaited), so that it is killed even when an assertion fails.
    let _rogue = Lumen { child: spawn_logged(&rogue_args, &rogue_log), listen: Default::default() };
    // Polled by hand, so that a failure shows both logs.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (worker_says, head_says) = loop {
        let (worker_says, head_says) = (read_log(&rogue_log), read_log(&head_log));
        let logged = worker_says.contains("refused the TLS handshake")
            && worker_says.contains("--ssl-certfile")
            && head_says.contains("client certificate refused: UnknownIssuer");
        if logged || std::time::Instant::now() > deadline {
            break (worker_says, head_says);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        worker_says.contains("refused the TLS handshake") && head_says.contains("client certificate refused"),
        "the refused handshake is not logged:\n--- rogue worker ---\n{worker_says}\n--- head ---\n{head_says}"
    );
    let refusal = read_log(&head_log);
    let line = refusal.lines().find(|l| l.contains("UnknownIssuer")).expect("the refusal line");
    // `peer=127.0.0.1:PORT` (the text log colours the field name).
    assert!(line.contains("TLS handshake refused") && line.contains("peer") && line.contains("127.0.0.1:"), "{line}");
    let cluster: Value =
        http.get(format!("{dashboard}/api/cluster")).send().await.expect("GET").json().await.expect("JSON");
    let workers = cluster["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1, "the rogue worker joined: {cluster}");
    assert_eq!(workers[0]["id"], "w-mtls", "{cluster}");
}

#[tokio::test]
async fn serve_with_tls_answers_https_with_its_loopback_worker() {
    let pki = Pki::new();
    let mut args = serve_flags(&[]);
    args.extend(["--ssl-certfile".to_string(), pki.path("cert.pem"), "--ssl-keyfile".into(), pki.path("key.pem")]);
    let serve = Lumen::start(&args);
    let http = pki.client();
    // The ready line comes once the in-process worker joined and the model runs.
    chat_over_https(&http, &https(&serve, "api")).await;
    let cluster: Value = http
        .get(format!("{}/api/cluster", https(&serve, "dashboard")))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    let address = cluster["workers"][0]["address"].as_str().expect("a worker");
    assert!(address.starts_with("http://127.0.0.1:"), "the in-process worker stays plain on loopback: {address}");
}

/// Runs `lumen ARGS`, expecting it to fail at start-up; returns its stderr.
fn start_up_error(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen")).args(args).output().expect("running lumen");
    assert!(!out.status.success(), "lumen started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn half_a_tls_configuration_is_a_start_up_error_naming_what_is_wrong() {
    let pki = Pki::new();
    let head = |tls: &[&str]| {
        let mut args = vec!["head".to_string()];
        args.extend(head_flags());
        args.extend(tls.iter().map(|s| s.to_string()));
        args
    };
    let (cert, key) = (pki.path("cert.pem"), pki.path("key.pem"));
    let error = start_up_error(&head(&["--ssl-certfile", &cert]));
    assert!(error.contains("--ssl-certfile was given without --ssl-keyfile"), "{error}");
    let error = start_up_error(&head(&["--ssl-keyfile", &key]));
    assert!(error.contains("--ssl-keyfile was given without --ssl-certfile"), "{error}");
    let junk = pki.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let error = start_up_error(&head(&["--ssl-certfile", &junk.display().to_string(), "--ssl-keyfile", &key]));
    assert!(error.contains("junk.pem") && error.contains("no certificate"), "{error}");
    // A key where the certificate should be, and a CA file that is missing.
    let error = start_up_error(&head(&["--ssl-certfile", &key, "--ssl-keyfile", &key]));
    assert!(error.contains("key.pem"), "{error}");
    // Client certificates without a CA to verify them against.
    let mut reqs = vec!["--ssl-certfile", &cert, "--ssl-keyfile", &key];
    reqs.extend(REQUIRE_CLIENT_CERTS);
    let error = start_up_error(&head(&reqs));
    assert!(error.contains("--ssl-cert-reqs 2 needs --ssl-ca-certs"), "{error}");
    let mut worker = worker_flags("https://127.0.0.1:1", "w");
    worker.extend(["--ssl-ca-certs".to_string(), pki.path("missing.pem")]);
    let error = start_up_error(&worker);
    assert!(error.contains("missing.pem"), "{error}");
}
