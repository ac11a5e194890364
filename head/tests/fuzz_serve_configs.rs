//! Property tests (proptest) of the control API's config parser over real HTTP (head-side stack,
//! a state directory): whatever arrives at `PUT /api/serve/applications/` — arbitrary bytes (as
//! JSON and as YAML), arbitrary JSON values, or config-shaped documents whose fields hold
//! arbitrary or nearly valid values — the head answers within a bound (never drops the
//! connection or panics), a refusal is a 400 `{"error": ...}` and changes nothing (the
//! applications and the persisted config stay as they were), and an accepted document is applied
//! whole: it becomes the persisted config and its applications are exactly the ones listed. The
//! head accepts a document exactly when `ServeConfig::from_value` does, the check `lumen deploy`
//! runs before sending, and its `api_keys:` section (if any) reads as a keys document; an
//! accepted section replaces the API keys and is not persisted, a refused one changes no key.
//!
//! The suite runs a bounded number of cases per target (64); a longer run:
//! `PROPTEST_CASES=20000 cargo test --release -p lumen-head --test fuzz_serve_configs`.

mod cluster_common;
mod control_support;
mod fuzz_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use control_support::*;
use fuzz_support::runner;
use lumen_head::config::ServeConfig;
use lumen_head::state_store::StateStore;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value, json};

/// The longest any answer may take.
const BOUND: Duration = Duration::from_secs(2);

/// Words the parser looks for, as strings and keys.
const WORDS: &[&str] = &["auto", "/", "applications", "deployments", "model", "source", "name"];

fn json_value() -> impl Strategy<Value = Value> {
    fuzz_support::json_value(WORDS)
}

/// Mostly a plausible value, sometimes anything.
fn mostly(plausible: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    prop_oneof![4 => plausible, 1 => json_value()].boxed()
}

fn count() -> BoxedStrategy<Value> {
    mostly((-1i64..6).prop_map(Value::from))
}

fn seconds() -> BoxedStrategy<Value> {
    mostly(prop_oneof![(-2.0f64..100.0).prop_map(Value::from), Just(json!(0)), Just(json!(1e12))])
}

/// An object holding each present (`Some`) entry.
fn object(entries: Vec<(&'static str, Option<Value>)>) -> Value {
    Value::Object(entries.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect::<Map<_, _>>())
}

fn model_section() -> impl Strategy<Value = Value> {
    let name = || prop::sample::select(vec!["m.gguf", "other.gguf", "", "org/name"]).prop_map(Value::from);
    (
        prop::option::of(mostly(name())),
        prop::option::of(mostly(prop::sample::select(vec!["s1", "s2", "s3"]).prop_map(Value::from))),
        prop::option::of(count()),
        prop::option::of(mostly(prop::sample::select(vec!["cpu", "cuda", "cuda:1", "tpu"]).prop_map(Value::from))),
        prop::option::of(mostly(prop::sample::select(vec!["64MiB", "0", "lots"]).prop_map(Value::from))),
        prop::option::of(mostly(Just(json!("deepseek_r1")))),
        prop::option::of(json_value()),
        prop::option::of(mostly(speculative_config())),
    )
        .prop_map(|(source, served, max_len, device, kv, parser, stray, speculative)| {
            object(vec![
                ("source", source),
                ("served_model_name", served),
                ("max_model_len", max_len),
                ("device", device),
                ("kv_cache_memory", kv),
                ("reasoning_parser", parser),
                ("max_model_length", stray),
                ("speculative_config", speculative),
            ])
        })
}

/// vLLM's `speculative_config`: prompt lookup, a draft model, or nearly either.
fn speculative_config() -> impl Strategy<Value = Value> {
    let word = |words: Vec<&'static str>| mostly(prop::sample::select(words).prop_map(Value::from));
    (
        prop::option::of(word(vec!["ngram", "[ngram]", "draft_model", "eagle", "magic"])),
        prop::option::of(word(vec!["[ngram]", "draft.gguf", "org/draft", ""])),
        prop::option::of(mostly(prop_oneof![(-1i64..20).prop_map(Value::from), Just(json!(1u64 << 40))].boxed())),
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(word(vec!["fp8", "awq"])),
    )
        .prop_map(|(method, model, k, lookup_min, lookup_max, draft_tp, quantization)| {
            object(vec![
                ("method", method),
                ("model", model),
                ("num_speculative_tokens", k),
                ("prompt_lookup_min", lookup_min),
                ("prompt_lookup_max", lookup_max),
                ("draft_tensor_parallel_size", draft_tp),
                ("quantization", quantization),
            ])
        })
}

fn autoscaling() -> impl Strategy<Value = Value> {
    (
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(mostly((-1.0f64..8.0).prop_map(Value::from))),
        prop::option::of(seconds()),
        prop::option::of(seconds()),
    )
        .prop_map(|(min, initial, max, target, up, down)| {
            object(vec![
                ("min_replicas", min),
                ("initial_replicas", initial),
                ("max_replicas", max),
                ("target_ongoing_requests", target),
                ("upscale_delay_s", up),
                ("downscale_delay_s", down),
            ])
        })
}

fn deployment() -> impl Strategy<Value = Value> {
    (
        mostly(prop::sample::select(vec!["llm", "d", "b-c", ""]).prop_map(Value::from)),
        prop::option::of(mostly(prop_oneof![count(), Just(json!("auto"))])),
        prop::option::of(mostly(autoscaling())),
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(seconds()),
        prop::option::of(seconds()),
        prop::option::of(mostly((-1.0f64..2.0).prop_map(|g| json!({ "num_gpus": g })))),
        prop::option::of(count()),
        mostly(model_section()),
    )
        .prop_map(|(name, replicas, autoscaling, ongoing, queued, shutdown, period, actor, per_node, model)| {
            object(vec![
                ("name", Some(name)),
                ("num_replicas", replicas),
                ("autoscaling_config", autoscaling),
                ("max_ongoing_requests", ongoing),
                ("max_queued_requests", queued),
                ("graceful_shutdown_timeout_s", shutdown),
                ("health_check_period_s", period),
                ("ray_actor_options", actor),
                ("max_replicas_per_node", per_node),
                ("model", Some(model)),
            ])
        })
}

fn application() -> impl Strategy<Value = Value> {
    (
        prop::option::of(mostly(prop::sample::select(vec!["a", "b", "a-b", ""]).prop_map(Value::from))),
        prop::option::of(mostly(prop::sample::select(vec!["/a", "/b", "/", "a", "/a/", "/{x}"]).prop_map(Value::from))),
        prop::option::of(mostly(prop::collection::vec(deployment(), 0..3).prop_map(Value::Array))),
    )
        .prop_map(|(name, prefix, deployments)| {
            object(vec![("name", name), ("route_prefix", prefix), ("deployments", deployments)])
        })
}

/// An `api_keys:` section: keys valid, nearly valid or anything.
fn keys_section() -> impl Strategy<Value = Value> {
    let key = (
        mostly(prop::sample::select(vec!["acme", "b-2", "a b", "", "default"]).prop_map(Value::from)),
        prop::option::of(mostly(prop::sample::select(vec!["sk-1", "sk-2", "", " sk"]).prop_map(Value::from))),
        prop::option::of(mostly(
            prop::sample::select(vec!["ab".repeat(32), "00".into(), "zz".into()]).prop_map(Value::from),
        )),
        prop::option::of(mostly(Just(json!(["m"])))),
        prop::option::of(count()),
        prop::option::of(count()),
        prop::option::of(mostly((-3i64..3).prop_map(Value::from))),
    )
        .prop_map(|(tenant, key, hashed, models, rpm, per_day, priority)| {
            object(vec![
                ("tenant", Some(tenant)),
                ("key", key),
                ("key_sha256", hashed),
                ("models", models),
                ("requests_per_minute", rpm),
                ("tokens_per_day", per_day),
                ("priority", priority),
            ])
        });
    mostly(prop::collection::vec(key, 0..3).prop_map(Value::Array))
}

/// A serve-config-shaped document, sometimes with Lumen's `api_keys:` section.
fn config_document() -> impl Strategy<Value = Value> {
    let document =
        (prop::collection::vec(application(), 0..3), prop::option::of(keys_section())).prop_map(|(apps, keys)| {
            let mut document = json!({ "applications": apps });
            if let Some(keys) = keys {
                document["api_keys"] = keys;
            }
            document
        });
    mostly(document)
}

/// What the head serves and persists now: the applications' names, the stored document and the
/// API keys in force.
async fn observed(stack: &Stack, state_dir: &Path) -> (BTreeSet<String>, Option<Value>, Value) {
    let status = stack.status().await;
    let names = status["applications"].as_object().map(|a| a.keys().cloned().collect()).unwrap_or_default();
    let stored =
        StateStore::open(state_dir).expect("state dir").load_serve_config().expect("readable").map(|s| s.config);
    let keys = stack.http.get(format!("{}/api/lumen/keys", stack.control)).send().await.expect("keys");
    (names, stored, keys.json().await.expect("keys listing"))
}

/// How many documents the head accepted and refused in a run.
#[derive(Default)]
struct Outcomes {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

/// PUTs `body` and checks the contract against what the head did.
async fn check(
    stack: &Stack,
    state_dir: &Path,
    content_type: &str,
    body: Vec<u8>,
    outcomes: &Outcomes,
) -> Result<(), TestCaseError> {
    let before = observed(stack, state_dir).await;
    let started = Instant::now();
    let response = stack
        .http
        .put(stack.applications_url())
        .header("content-type", content_type)
        .body(body.clone())
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| TestCaseError::fail(format!("no body: {e}")))?;
    prop_assert!(started.elapsed() < BOUND, "answered in {:?}", started.elapsed());
    // The document as the head reads it, for the oracle.
    let parsed: Option<Value> = std::str::from_utf8(&body).ok().and_then(|text| {
        if content_type.ends_with("yaml") {
            serde_yaml_ng::from_str(text).ok()
        } else {
            serde_json::from_str(text).ok()
        }
    });
    // Lumen's `api_keys:` section is read apart, and never persisted.
    let (parsed, keys_section) = match parsed {
        Some(Value::Object(mut map)) => {
            let keys = map.remove("api_keys");
            (Some(Value::Object(map)), keys)
        }
        other => (other, None),
    };
    let keys_valid = keys_section.as_ref().is_none_or(|k| lumen_head::api::edge::keys::parse(k).is_ok());
    let valid = keys_valid && parsed.as_ref().is_some_and(|doc| ServeConfig::from_value(doc).is_ok());
    let after = observed(stack, state_dir).await;
    if status.is_success() {
        prop_assert!(valid, "accepted a document the parser refuses: {parsed:?}");
        let doc = parsed.expect("an accepted document parses");
        let listed: BTreeSet<String> = doc["applications"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a["name"].as_str().unwrap_or("default").to_string())
            .collect();
        prop_assert_eq!(&after.0, &listed, "the applications are exactly the document's");
        prop_assert_eq!(after.1.as_ref(), Some(&doc), "the document is persisted whole, without its keys");
        let tenants = |listing: &Value| -> Vec<Value> {
            listing["api_keys"].as_array().into_iter().flatten().map(|k| k["tenant"].clone()).collect()
        };
        match &keys_section {
            Some(section) => {
                let given: Vec<Value> = section.as_array().into_iter().flatten().map(|k| k["tenant"].clone()).collect();
                prop_assert_eq!(tenants(&after.2), given, "the section's keys are in force");
            }
            None => prop_assert_eq!(&after.2, &before.2, "no section: the keys stay"),
        }
        outcomes.accepted.fetch_add(1, Ordering::Relaxed);
    } else {
        prop_assert_eq!(status.as_u16(), 400, "{}", text);
        prop_assert!(!valid || parsed.is_none(), "refused a valid document: {}", text);
        let reply: Value = serde_json::from_str(&text).map_err(|_| TestCaseError::fail(format!("not JSON: {text}")))?;
        prop_assert!(reply["error"].is_string(), "{}", reply);
        prop_assert!(reply.get("field").is_none_or(Value::is_string), "{}", reply);
        prop_assert_eq!(&after, &before, "a refused document changed nothing");
        outcomes.refused.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Runs `strategy`'s cases against one stack, each body sent as JSON and as YAML.
fn fuzz<S: Strategy>(strategy: S, to_bytes: impl Fn(&S::Value) -> Vec<u8>) -> Outcomes {
    let outcomes = Outcomes::default();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("state dir");
    let stack = runtime.block_on(start_stack(dir.path()));
    runner()
        .run(&strategy, |value| {
            let body = to_bytes(&value);
            runtime.block_on(async {
                for content_type in ["application/json", "application/yaml"] {
                    check(&stack, dir.path(), content_type, body.clone(), &outcomes).await?;
                }
                Ok(())
            })
        })
        .expect("every document gets an answer in the contract, applied whole or not at all");
    outcomes
}

#[test]
fn arbitrary_bytes_are_refused_or_applied_whole() {
    let _ = fuzz(prop::collection::vec(any::<u8>(), 0..256), |bytes| bytes.clone());
}

#[test]
fn arbitrary_json_values_are_refused_or_applied_whole() {
    let _ = fuzz(json_value(), |value| value.to_string().into_bytes());
}

#[test]
fn config_shaped_documents_are_refused_or_applied_whole() {
    let outcomes = fuzz(config_document(), |value| value.to_string().into_bytes());
    // The generator reaches both sides of the parser, so both properties were exercised.
    assert!(outcomes.accepted.load(Ordering::Relaxed) > 0, "no generated document was valid");
    assert!(outcomes.refused.load(Ordering::Relaxed) > 0, "no generated document was refused");
}
