//! lm-evaluation-harness, the tool evaluation suites score models with, against a real
//! `lumen serve`: its `local-completions` model computes log-likelihoods from Lumen's prompt
//! log-probabilities (`echo`, `logprobs`, `max_tokens: 1`, prompts as token ids) for a
//! multiple-choice task the reference script writes (no hub), and every one of them must equal
//! the float64 reference model's on the same tokens (within the f32 path's tolerance), the
//! accuracy exactly. `scripts/reference/lm_eval_reference.py` does the run and the comparison
//! with the Python environment of `scripts/lmeval-env.sh`.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{Lumen, serve_flags};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_eval_scores_equal_the_float64_reference() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/lmeval/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/lmeval-env.sh (scripts/test.sh does)", python.display());
    let lumen = Lumen::start(&serve_flags(&["--cpu-weight-format", "f32"]));
    lumen.wait_healthy(&reqwest::Client::new()).await;
    let work = tempfile::tempdir().unwrap();
    let script = root.join("scripts/reference/lm_eval_reference.py");
    let out = tokio::task::spawn_blocking(move || {
        let run = Command::new(&python)
            .arg(&script)
            .arg(work.path())
            .arg(lumen.url("api"))
            .envs([("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")])
            .output()
            .expect("running python");
        drop(lumen);
        run
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "lm_eval_reference.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("accuracy: lm-eval"), "no result table:\n{stdout}");
}
