//! Structured outputs end to end: one real `lumen serve` of the 135M test model, driven by the
//! official `openai` Python client (tests/support/structured_client.py): JSON schemas at
//! temperature 1 under several seeds (validated by `jsonschema`), JSON objects, regexes,
//! choices, Lark grammars, streamed and not, chat and completions, `n > 1`, the SDK's `parse()`
//! with a Pydantic model, a batch mixing constrained and free requests, and bad constraints
//! answered 400 naming their field while the server serves on. Then the mask-time histogram is
//! on `/metrics`.

mod support;

use std::path::PathBuf;
use std::process::Command;

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
