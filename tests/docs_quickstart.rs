//! `docs/quickstart.md` is run, so it cannot rot.
//!
//! Every fenced block of the page carries a marker on the line before it: `<!-- test: KIND -->`
//! (run here) or `<!-- not tested: why -->`; an unmarked block fails the test. The README's
//! quick start blocks must appear verbatim among the tested ones. Kinds:
//! - `serve`: `A && B && cargo run --release -- serve ARGS`: the steps before the last run in
//!   the repository root; the last becomes the `lumen` binary with ephemeral local ports added;
//! - `curl`: run by bash against that server (`http://localhost:8000` and `:8265` rewritten to
//!   its ports): every command succeeds, no OpenAI error body, chat answers carry `choices`
//!   (streams end with `data: [DONE]`);
//! - `python`: run with the tests' Python environment (`.cache/pyenv`, the `openai` client);
//! - `file NAME`: the block's text saved as NAME for the blocks after it;
//! - `cluster`: `lumen head`, `lumen worker` (started, on ephemeral ports, `HEAD_HOST` being
//!   127.0.0.1), `lumen deploy` and `lumen status` (must succeed); then the deployed model chats.
//!
//! The `curl` examples of `docs/api.md` run against the same server as the `curl` blocks.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::Lumen;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced block and the marker before it.
#[derive(Debug)]
struct Block {
    marker: String,
    text: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut previous = "";
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            let text: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            let marker = previous.trim().strip_prefix("<!--").and_then(|m| m.strip_suffix("-->")).unwrap_or("");
            found.push(Block { marker: marker.trim().to_string(), text: text.join("\n") + "\n" });
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    found
}

fn quickstart() -> Vec<Block> {
    blocks(&std::fs::read_to_string(root().join("docs/quickstart.md")).expect("docs/quickstart.md"))
}

fn tested<'a>(blocks: &'a [Block], kind: &str) -> Vec<&'a Block> {
    blocks.iter().filter(|b| b.marker.strip_prefix("test:").map(str::trim) == Some(kind)).collect()
}

#[test]
fn every_block_is_marked_and_the_readme_quick_start_is_among_the_tested_ones() {
    let page = quickstart();
    for block in &page {
        let kind = block.marker.strip_prefix("test:").map(str::trim);
        let known = matches!(kind, Some("serve" | "curl" | "python" | "cluster"))
            || kind.is_some_and(|k| k.starts_with("file "));
        assert!(known || block.marker.starts_with("not tested:"), "unmarked or unknown block:\n{}", block.text);
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme.split("## Quick start").nth(1).expect("a Quick start section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let readme_blocks = blocks(section);
    assert!(readme_blocks.len() >= 3, "the README's quick start has its commands");
    for block in readme_blocks {
        let run = page.iter().any(|b| b.marker.starts_with("test:") && b.text == block.text);
        assert!(run, "the README's quick start block is not a tested block of docs/quickstart.md:\n{}", block.text);
    }
}

/// `http://localhost:8000` -> the API, `http://localhost:8265` -> the dashboard.
fn localize(text: &str, server: &Lumen) -> String {
    text.replace("http://localhost:8000", &server.url("api")).replace("http://localhost:8265", &server.url("dashboard"))
}

fn check_curl(block: &str, server: &Lumen) {
    let script = localize(block, server);
    let out = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).output().expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.trim().is_empty(), "{script} printed nothing");
    // An error body (OpenAI's `{"error": {...}}`, the control API's `{"error": "..."}`), not a
    // request log's `"error":null`.
    let error_body =
        ["\"error\":{", "\"error\": {", "\"error\":\"", "\"error\": \""].iter().any(|e| stdout.contains(e));
    assert!(!error_body, "{script} answered an error: {stdout}");
    if script.contains("chat/completions") {
        let streamed = script.contains("\"stream\": true");
        assert!(stdout.contains("\"choices\""), "{script}: {stdout}");
        assert_eq!(stdout.trim_end().ends_with("data: [DONE]"), streamed, "{script}: {stdout}");
    }
}

fn check_python(block: &str, server: &Lumen) {
    let python = root().join(".cache/pyenv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/python-env.sh", python.display());
    let script = localize(block, server);
    let out = Command::new(python).args(["-c", &script]).output().expect("python");
    assert!(out.status.success(), "the Python example failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "the Python example printed no answer");
}

#[tokio::test]
async fn the_single_machine_commands_serve_chats() {
    let page = quickstart();
    let serve = tested(&page, "serve");
    assert_eq!(serve.len(), 1, "one serve block");
    let line = serve[0].text.trim();
    let steps: Vec<&str> = line.split(" && ").collect();
    let (last, before) = steps.split_last().expect("a command");
    for step in before {
        let out = Command::new("bash").args(["-c", step]).current_dir(root()).output().expect("bash");
        assert!(out.status.success(), "{step} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let args = last.strip_prefix("cargo run --release -- ").expect("the server is `cargo run --release -- ...`");
    let mut args: Vec<String> = args.split_whitespace().map(str::to_string).collect();
    args.extend(support::head_flags());
    let server = Lumen::start(&args);
    server.wait_healthy(&reqwest::Client::new()).await;

    let curls = tested(&page, "curl");
    assert!(curls.len() >= 2, "the page shows curl commands");
    for block in curls {
        check_curl(&block.text, &server);
    }
    for block in tested(&page, "python") {
        check_python(&block.text, &server);
    }
    // docs/api.md's examples, but for those needing a worker's address, a file, or deleting.
    let api = std::fs::read_to_string(root().join("docs/api.md")).expect("docs/api.md");
    let examples: Vec<Block> = blocks(&api).into_iter().filter(|b| b.text.starts_with("curl")).collect();
    assert!(examples.len() >= 15, "docs/api.md has an example per route");
    for block in
        examples.iter().filter(|b| !["WORKER_HOST", "--data-binary @", "-X DELETE"].iter().any(|s| b.text.contains(s)))
    {
        check_curl(&block.text, &server);
    }
}

#[tokio::test]
async fn the_cluster_commands_deploy_and_report() {
    let page = quickstart();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = BTreeMap::new();
    for block in &page {
        if let Some(name) = block.marker.strip_prefix("test: file ") {
            let path = dir.path().join(name.trim());
            std::fs::write(&path, &block.text).expect("write");
            files.insert(name.trim().to_string(), path);
        }
    }
    let cluster = tested(&page, "cluster");
    assert_eq!(cluster.len(), 1, "one cluster block");
    let state = dir.path().join("state");
    let mut processes: Vec<Lumen> = Vec::new();
    let (mut grpc, mut dashboard) = (String::new(), String::new());
    for line in cluster[0].text.lines().filter(|l| !l.trim().is_empty()) {
        let command = line.split(" #").next().unwrap_or(line).trim();
        let mut words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        assert_eq!(words.first().map(String::as_str), Some("lumen"), "{line}");
        words.remove(0);
        for word in &mut words {
            if let Some(path) = files.get(word.as_str()) {
                *word = path.display().to_string();
            }
            *word = word
                .replace("/var/lib/lumen", &state.display().to_string())
                .replace("HEAD_HOST:50051", &grpc)
                .replace("HEAD_HOST:8265", &dashboard);
        }
        match words[0].as_str() {
            "head" => {
                words.extend(support::head_flags());
                let head = Lumen::start(&words);
                grpc = head.addr("grpc").to_string().replace("0.0.0.0", "127.0.0.1");
                dashboard = head.addr("dashboard").to_string();
                processes.push(head);
            }
            "worker" => {
                words.extend(["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"].map(String::from));
                processes.push(Lumen::start(&words));
            }
            _ => check_client(&words, &files),
        }
    }
    assert!(state.join("serve-config.json").exists(), "the head persists the config in --state-dir");
    let head = processes.first().expect("the head");
    let http = reqwest::Client::new();
    head.wait_healthy(&http).await;
    let config =
        lumen_head::config::ServeConfig::from_yaml(&std::fs::read_to_string(&files["serve.yaml"]).expect("read"))
            .expect("the page's serve.yaml parses");
    let model = config.applications[0].deployments[0].served_model_name().expect("served_model_name").to_string();
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let answer = http.post(format!("{}/v1/chat/completions", head.url("api"))).json(&body).send().await.expect("chat");
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.expect("json");
    assert!(answer["choices"][0]["message"]["content"].is_string(), "{answer}");
}

/// `lumen deploy` / `lumen status` run to completion; status names the page's application.
fn check_client(args: &[String], files: &BTreeMap<String, PathBuf>) {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen")).args(args).output().expect("lumen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lumen {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    if args[0] == "status" {
        let config = std::fs::read_to_string(files.get("serve.yaml").map(PathBuf::as_path).unwrap_or(Path::new("")))
            .expect("serve.yaml");
        let parsed = lumen_head::config::ServeConfig::from_yaml(&config).expect("parses");
        assert!(stdout.contains(&parsed.applications[0].name), "status lists the application: {stdout}");
    }
}
