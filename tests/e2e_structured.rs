//! Structured outputs end to end: one real `lumen serve` of the 135M test model, driven by the
//! official `openai` Python client (tests/support/structured_client.py): JSON schemas at
//! temperature 1 under several seeds (validated by `jsonschema`), JSON objects, regexes,
//! choices, Lark grammars, streamed and not, chat and completions, `n > 1`, the SDK's `parse()`
//! with a Pydantic model, a batch mixing constrained and free requests, and bad constraints
//! answered 400 naming their field while the server serves on. Then the mask-time histogram is
//! on `/metrics`. And `--structured-outputs-config` (vLLM's server defaults) reaching the worker:
//! `disable_any_whitespace` leaves no whitespace in JSON at temperature 1, and a backend other
//! than llguidance is warned of once.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::{Lumen, serve_flags};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_outputs_are_valid_and_bad_constraints_are_400s() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/pyenv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    let lumen = Lumen::start(&serve_flags(&["--max-num-seqs", "8"]));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let base_url = format!("{}/v1", lumen.url("api"));
    let out = Command::new(&python)
        .arg(root.join("tests/support/structured_client.py"))
        .args([&base_url, "smol"])
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "the structured-output checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = http.get(format!("{}/metrics", lumen.url("api"))).send().await.unwrap().text().await.unwrap();
    let count = metrics
        .lines()
        .find(|l| l.starts_with("lumen:structured_output_mask_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no mask histogram in /metrics"));
    assert!(count > 100.0, "masks computed: {count}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_structured_outputs_config_reaches_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("lumen.log");
    let defaults = r#"{"backend": "xgrammar", "disable_any_whitespace": true}"#;
    let flags = serve_flags(&["--structured-outputs-config", defaults]);
    let lumen = Lumen::start_with_stderr(&flags, std::fs::File::create(&log).expect("log file"));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    // Numbers, booleans and lists only: with whitespace disabled the text has none at all.
    let schema = json!({"type": "object", "required": ["year", "done", "scores"], "additionalProperties": false,
        "properties": {"year": {"type": "integer", "minimum": 0, "maximum": 3000}, "done": {"type": "boolean"},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3}}});
    for seed in 0..4 {
        let body = json!({"model": "smol", "max_tokens": 60, "temperature": 1.0, "seed": seed,
            "messages": [{"role": "user", "content": "Give a year, whether it is done, and some scores, as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}});
        let reply: Value = http
            .post(format!("{}/v1/chat/completions", lumen.url("api")))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let text = reply["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{reply}"));
        assert_eq!(reply["choices"][0]["finish_reason"], "stop", "seed {seed}: {text:?}");
        assert!(!text.contains(char::is_whitespace), "seed {seed}: whitespace in {text:?}");
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        assert!(value["year"].is_u64() && value["done"].is_boolean(), "{value}");
    }
    let log = std::fs::read_to_string(&log).unwrap();
    let warnings = log.lines().filter(|l| l.contains("structured_outputs_config.backend is `xgrammar`")).count();
    assert_eq!(warnings, 1, "{log}");
}
