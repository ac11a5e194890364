//! Access control and secret hygiene with a real `lumen serve` (SmolLM2): the admin token guards
//! the control API's mutating routes and the tenants' usage while every other read stays open,
//! `lumen deploy` sends the token,
//! the model's context is enforced end to end, and none of the configured secrets (API key, join
//! token, admin token, HF token) ever appears in the process's logs or on `/metrics`.

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::serve_flags;

const API_KEY: &str = "sk-test-apikey-7f3a9c51";
const JOIN_TOKEN: &str = "join-secret-51be77d2";
const ADMIN_TOKEN: &str = "admin-secret-c0ffee42";
const HF_TOKEN: &str = "hf_SecretTokenValue9911";

/// `lumen serve` with every secret configured, stderr captured in a file, killed when dropped.
struct Served {
    child: Child,
    listen: serde_json::Map<String, Value>,
    log: std::path::PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(dir: &std::path::Path) -> Served {
        use std::io::{BufRead, BufReader};
        let log = dir.join("stderr.log");
        let mut args = serve_flags(&["--log-requests"]);
        args.extend(["--api-key", API_KEY, "--join-token", JOIN_TOKEN].map(String::from));
        let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
            .args(&args)
            .env("LUMEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HF_TOKEN", HF_TOKEN)
            .env("LUMEN_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting lumen");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let listen = loop {
            let line = lines.next().expect("lumen exited before it was ready").expect("stdout");
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "ready"
            {
                break v["listen"].as_object().cloned().expect("listen map");
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Served { child, listen, log }
    }

    fn url(&self, name: &str) -> String {
        let addr: std::net::SocketAddr = self.listen[name].as_str().expect(name).parse().expect("address");
        format!("http://127.0.0.1:{}", addr.port())
    }
}

fn lumen(args: &[&str], admin_token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lumen"));
    command.args(args).env_remove("LUMEN_ADMIN_TOKEN");
    if let Some(token) = admin_token {
        command.env("LUMEN_ADMIN_TOKEN", token);
    }
    command.output().expect("running lumen")
}

async fn status_and_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_mutations_and_no_secret_reaches_logs_or_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path());
    let (api, control) = (served.url("api"), served.url("dashboard"));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while http.get(format!("{api}/health")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The API with its key: served; the model's context is enforced by head and replica.
    let chat = |body: Value| http.post(format!("{api}/v1/chat/completions")).bearer_auth(API_KEY).json(&body);
    let hello = json!({"model": "smol", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3});
    assert_eq!(status_and_json(chat(hello.clone())).await.0, 200);
    let (status, body) = status_and_json(http.post(format!("{api}/v1/chat/completions")).json(&hello)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{body}");
    let long_prompt = "lorem ipsum dolor ".repeat(1500);
    let over = json!({"model": "smol", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 8});
    let (status, body) = status_and_json(chat(over)).await;
    assert_eq!(status, 400, "a prompt over max_model_len (1024) is refused: {body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(body["error"]["param"].is_string(), "{body}");
    let past_context = json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024});
    let (status, body) = status_and_json(chat(past_context)).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("max_tokens")), "{body}");

    // Reads of the control API stay open: a read-only dashboard without the token.
    for path in ["/api/serve/applications/", "/api/cluster", "/api/requests", "/metrics", "/api/gcs_healthz", "/"] {
        let response = http.get(format!("{control}{path}")).send().await.expect("GET");
        assert_eq!(response.status(), 200, "GET {path} needs no admin token");
    }
    // Mutations and the tenants' usage need it: missing or wrong token is a 401 with a JSON error,
    // and changes nothing.
    let applications = format!("{control}/api/serve/applications/");
    let usage = format!("{control}/api/lumen/usage");
    let empty = json!({"applications": []});
    for request in [
        http.put(&applications).json(&empty),
        http.put(&applications).bearer_auth("admin-secret-wrong").json(&empty),
        http.put(&applications).header("authorization", ADMIN_TOKEN).json(&empty),
        http.delete(&applications),
        http.delete(&applications).bearer_auth(API_KEY),
        http.get(&usage),
        http.get(&usage).bearer_auth(API_KEY),
    ] {
        let (status, body) = status_and_json(request).await;
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].as_str().is_some_and(|m| m.contains("admin token")), "{body}");
    }
    assert_eq!(status_and_json(chat(hello.clone())).await.0, 200, "refused mutations changed nothing");
    // With the token the usage answers: `--api-key`'s requests count for the tenant `default`.
    let (status, body) =
        status_and_json(http.get(format!("{usage}?tenant=default&model=smol")).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let rows = body["usage"].as_array().expect("usage rows");
    let answered: u64 = rows.iter().map(|r| r["requests"]["success"].as_u64().unwrap_or(0)).sum();
    assert!(answered >= 2, "the chats answered so far: {body}");

    // `lumen deploy` without the token is refused; with it (LUMEN_ADMIN_TOKEN) it applies.
    let config = dir.path().join("empty.yaml");
    std::fs::write(&config, "applications: []\n").expect("config");
    let config = config.display().to_string();
    let out = lumen(&["deploy", &config, "--address", &control], None);
    assert!(!out.status.success(), "deploy without the admin token succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lumen(&["deploy", &config, "--address", &control], Some(ADMIN_TOKEN));
    assert!(out.status.success(), "deploy with the token failed: {}", String::from_utf8_lossy(&out.stderr));
    let (status, _) = status_and_json(chat(hello)).await;
    assert_eq!(status, 404, "the authorized deploy removed the application");

    // No secret in the logs (debug level, prompts logged) nor on either /metrics.
    let mut exposed = vec![("stderr".to_string(), std::fs::read_to_string(&served.log).expect("log"))];
    for base in [&api, &control] {
        let metrics = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
        exposed.push((format!("{base}/metrics"), metrics));
    }
    assert!(exposed[0].1.contains("Say hi"), "the log captured requests (--log-requests)");
    for (source, text) in &exposed {
        for secret in [API_KEY, JOIN_TOKEN, ADMIN_TOKEN, HF_TOKEN] {
            assert!(!text.contains(secret), "{source} contains the secret {secret}");
        }
    }
}
