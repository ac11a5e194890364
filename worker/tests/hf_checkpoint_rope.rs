//! Hugging Face checkpoints as current and older transformers write them: small random Llamas
//! (f32 safetensors) whose config.json spells the rotary settings either as transformers 5 does
//! (`rope_parameters` with `rope_theta` inside, `dtype`) or as older versions did (top-level
//! `rope_theta` + `rope_scaling`, `torch_dtype`), for every rope type Lumen implements.
//!
//! For each case the two spellings must give bit-identical logits, and both must match an
//! independent float64 numpy implementation of transformers' formulas
//! (`scripts/reference/hf_checkpoint_reference.py`, run with `.cache/pyenv`'s python, which
//! `scripts/python-env.sh` gives numpy). The reference also computes what a reader that missed
//! the rope settings would (plain rotary embeddings of base 10,000); each case must be far from
//! that, so a regression to the old fallback fails here. Prompt lengths follow the choices in
//! `worker/src/model/rope/mod.rs`: `dynamic` at exactly `factor * max_position_embeddings`
//! tokens, `longrope` on the same side of `original_max_position_embeddings` as `max_model_len`.

use std::path::{Path, PathBuf};
use std::process::Command;

use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::model::llama_cpu::{CpuLlama, CpuModelOptions};
use lumen_worker::model::{ForwardBatch, LlamaConfig, Model, SafetensorsSource};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

const THETA: f64 = 100_000.0;
/// Worst |Lumen - float64| logit allowed: f32 arithmetic and the f16 KV cache.
const TOLERANCE: f32 = 2e-2;

/// One rope setting to check: the rope dict (without theta), the model's max_position_embeddings,
/// the prompt length and the server's max_model_len.
struct Case {
    name: &'static str,
    rope: Value,
    max_position_embeddings: usize,
    prompt_len: usize,
    max_model_len: usize,
}

fn cases() -> Vec<Case> {
    let case = |name, rope, max_position_embeddings, prompt_len, max_model_len| Case {
        name,
        rope,
        max_position_embeddings,
        prompt_len,
        max_model_len,
    };
    let short: Vec<f64> = (0..8).map(|i| 1.0 + 0.25 * i as f64).collect();
    let long: Vec<f64> = (0..8).map(|i| 1.0 + 1.5 * i as f64).collect();
    let longrope = json!({"rope_type": "longrope", "short_factor": short, "long_factor": long,
                          "original_max_position_embeddings": 32});
    vec![
        case("default", json!({"rope_type": "default"}), 64, 24, 64),
        case("linear", json!({"rope_type": "linear", "factor": 4.0}), 64, 24, 64),
        case("dynamic", json!({"rope_type": "dynamic", "factor": 2.0}), 16, 32, 32),
        case(
            "llama3",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}),
            128,
            24,
            64,
        ),
        case("yarn", json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), 256, 24, 64),
        case(
            "yarn-mscale",
            json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                   "mscale_all_dim": 0.5, "beta_fast": 16.0, "truncate": false}),
            256,
            24,
            64,
        ),
        case("longrope-short", longrope.clone(), 128, 24, 32),
        case("longrope-long", longrope, 128, 40, 64),
    ]
}

/// Deterministic values in `[-scale, scale)` (splitmix64).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 96;
const LAYERS: usize = 2;

/// Random weights: queries and keys large enough that attention depends strongly on position.
fn write_weights(path: &Path) {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let seed = tensors.len() as u64 + 1;
        let n = shape.iter().product();
        tensors.push((name, shape, values(seed, n, scale).iter().map(|v| v + offset).collect()));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        add(format!("{p}input_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(format!("{p}self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.35, 0.0);
        add(format!("{p}self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.35, 0.0);
        add(format!("{p}self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.25, 0.0);
        add(format!("{p}self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 0.25, 0.0);
        add(format!("{p}post_attention_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(format!("{p}mlp.gate_proj.weight"), vec![INTER, HIDDEN], 0.2, 0.0);
        add(format!("{p}mlp.up_proj.weight"), vec![INTER, HIDDEN], 0.2, 0.0);
        add(format!("{p}mlp.down_proj.weight"), vec![HIDDEN, INTER], 0.2, 0.0);
    }
    add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.4, 0.0);
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// config.json in transformers 5's spelling (`new_style`) or the older one.
fn config_json(case: &Case, new_style: bool) -> Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "max_position_embeddings": case.max_position_embeddings, "tie_word_embeddings": false,
        "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2
    });
    if new_style {
        let mut rope = case.rope.clone();
        rope["rope_theta"] = json!(THETA);
        c["rope_parameters"] = rope;
        c["dtype"] = json!("float32");
    } else {
        let mut rope = case.rope.clone();
        // Older files spell the type `type`; a default rope had no rope_scaling at all.
        let kind = rope.as_object_mut().unwrap().remove("rope_type").unwrap();
        rope["type"] = kind.clone();
        c["rope_scaling"] = if kind == "default" { Value::Null } else { rope };
        c["rope_theta"] = json!(THETA);
        c["torch_dtype"] = json!("float32");
    }
    c
}

fn write_checkpoint(dir: &Path, case: &Case, new_style: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(case, new_style).to_string()).unwrap();
    write_weights(&dir.join("model.safetensors"));
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + 11) % VOCAB) as u32).collect()
}

/// The last prompt position's logits through Lumen's CPU model (f32 weights).
fn lumen_logits(dir: &Path, tokens: &[u32], max_model_len: usize) -> Vec<f32> {
    let config = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let src = SafetensorsSource::open(dir).unwrap();
    let block_size = 16;
    let num_blocks = max_model_len.div_ceil(block_size);
    let opts =
        CpuModelOptions { threads: 1, weight_format: CpuWeightFormat::F32, block_size, num_blocks, max_model_len };
    let mut model = CpuLlama::load(config, &src, &opts).unwrap();
    let mut batch = ForwardBatch::default();
    let blocks: Vec<u32> = (0..num_blocks as u32).collect();
    batch.push_seq(tokens, 0, &blocks, block_size, true);
    model.forward(&batch).unwrap().to_vec()
}

struct Reference {
    logits: Vec<f32>,
    plain_logits: Vec<f32>,
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/pyenv/bin/python");
    assert!(p.is_file(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", p.display());
    p
}

/// Runs the float64 reference once over all `(dir, prompt)` pairs.
fn reference(runs: &[(PathBuf, Vec<u32>)], scratch: &Path) -> Vec<Reference> {
    let list: Vec<Value> = runs.iter().map(|(dir, p)| json!({"dir": dir, "prompt": p})).collect();
    let cases = scratch.join("cases.json");
    std::fs::write(&cases, Value::Array(list).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/hf_checkpoint_reference.py");
    let out = Command::new(python()).arg(script).arg(&cases).output().expect("running the reference");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    parsed
        .iter()
        .map(|r| Reference { logits: floats(&r["logits"]), plain_logits: floats(&r["plain_logits"]) })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_rope_type_in_both_spellings_matches_the_float64_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    let mut runs = Vec::new();
    for case in &cases {
        for (style, new_style) in [("new", true), ("old", false)] {
            let dir = tmp.path().join(format!("{}-{style}", case.name));
            write_checkpoint(&dir, case, new_style);
            runs.push((dir, prompt(case.prompt_len)));
        }
    }
    let refs = reference(&runs, tmp.path());
    for (i, case) in cases.iter().enumerate() {
        let (new_dir, old_dir) = (&runs[2 * i].0, &runs[2 * i + 1].0);
        let tokens = prompt(case.prompt_len);
        let new = lumen_logits(new_dir, &tokens, case.max_model_len);
        let old = lumen_logits(old_dir, &tokens, case.max_model_len);
        assert_eq!(new, old, "{}: old- and new-style configs of the same weights give different logits", case.name);
        // The reference reads each spelling on its own: its two runs agree too.
        let (r, r_old) = (&refs[2 * i], &refs[2 * i + 1]);
        assert_eq!(r.logits, r_old.logits, "{}: the reference reads the two spellings differently", case.name);
        let error = max_diff(&new, &r.logits);
        let fallback = max_diff(&r.plain_logits, &r.logits);
        println!("{:15} |lumen - float64| {error:.5}  |plain rope - float64| {fallback:.3}", case.name);
        assert!(error < TOLERANCE, "{}: logits differ from the float64 reference by {error}", case.name);
        assert!(
            fallback > 10.0 * TOLERANCE,
            "{}: plain rope (base 10,000) is only {fallback} from the reference: the case cannot tell them apart",
            case.name
        );
    }
}

#[test]
fn a_checkpoint_whose_config_changes_the_math_is_refused_at_load_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let case = &cases()[0];
    for (key, value) in [
        ("attention_bias", json!(true)),
        ("rope_parameters", json!({"rope_type": "su", "rope_theta": THETA})),
        ("hidden_act", json!("gelu")),
    ] {
        let dir = tmp.path().join(key);
        write_checkpoint(&dir, case, true);
        let mut config = config_json(case, true);
        config[key] = value;
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let err = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains(&format!("`{key}")), "{key}: {err}");
    }
}
