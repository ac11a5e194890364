use serde_json::{Value, json};

use super::*;

/// A small Llama config; `extra` keys are merged in (a null removes the key).
fn config(extra: Value) -> String {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c.to_string()
}

fn load(extra: Value) -> Result<LlamaConfig> {
    LlamaConfig::from_hf_json(&config(extra))
}

fn err(extra: Value) -> String {
    match load(extra.clone()) {
        Ok(c) => panic!("{extra} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Each rope type in both spellings: transformers 5's `rope_parameters` (theta inside) and the
/// older top-level `rope_theta` + `rope_scaling`.
fn both_spellings() -> Vec<(&'static str, Value, Value)> {
    let types = [
        ("default", json!({"rope_type": "default"})),
        ("linear", json!({"rope_type": "linear", "factor": 2.0})),
        ("dynamic", json!({"rope_type": "dynamic", "factor": 2.0})),
        (
            "llama3",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}),
        ),
        ("yarn", json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16})),
        (
            "longrope",
            json!({"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [2, 3, 4, 5],
                   "original_max_position_embeddings": 64}),
        ),
    ];
    types
        .into_iter()
        .map(|(name, dict)| {
            let mut new = dict.clone();
            new["rope_theta"] = json!(500000.0);
            let old_scaling = if name == "default" { Value::Null } else { dict };
            (name, json!({"rope_parameters": new}), json!({"rope_theta": 500000, "rope_scaling": old_scaling}))
        })
        .collect()
}

#[test]
fn old_and_new_spellings_read_the_same_config_for_every_rope_type() {
    for (name, new, old) in both_spellings() {
        let (a, b) = (load(new).unwrap(), load(old).unwrap());
        assert_eq!(a, b, "{name}");
        assert_eq!((a.rope.type_name(), a.rope.theta), (name, 500000.0));
        assert_eq!(a.rope_frequencies(256), b.rope_frequencies(256), "{name}");
    }
    // The per-layer-type form, every layer type alike, reads the same as the single dict.
    let per_layer = json!({"rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "linear", "factor": 2, "rope_theta": 500000}}});
    let single = json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}});
    assert_eq!(load(per_layer).unwrap(), load(single).unwrap());
    // Both spellings at once, agreeing (as a config edited by hand may be).
    let both = json!({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2},
                      "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}});
    assert_eq!(load(both).unwrap().rope.type_name(), "linear");
}

#[test]
fn a_config_as_transformers_5_saves_it_keeps_its_theta_and_llama3_scaling() {
    let saved = json!({"dtype": "bfloat16", "torch_dtype": null, "rope_theta": null, "rope_scaling": null,
        "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
        "head_dim": 8, "tie_word_embeddings": false, "pretraining_tp": 1, "attention_bias": false, "mlp_bias": false,
        "hidden_act": "silu", "attention_dropout": 0.0, "eos_token_id": [5, 6], "bos_token_id": 4});
    let c = load(saved).unwrap();
    assert_eq!((c.rope.theta, c.rope.type_name(), c.dtype.as_deref()), (500000.0, "llama3", Some("bfloat16")));
    assert_eq!((c.head_dim, c.eos_token_ids.clone(), c.bos_token_id), (8, vec![5, 6], Some(4)));
    // Without any rotary key the base is transformers' default, 10,000.
    assert_eq!(load(json!({})).unwrap().rope, Rope::plain(10_000.0));
}

#[test]
fn disagreeing_spellings_fail_naming_both_keys() {
    let cases = [
        (
            json!({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}}),
            "rope_theta",
            "rope_parameters.rope_theta",
        ),
        (
            json!({"rope_scaling": {"type": "linear", "factor": 2}, "rope_parameters": {"rope_type": "linear", "factor": 4}}),
            "rope_scaling",
            "rope_parameters",
        ),
        (json!({"torch_dtype": "float16", "dtype": "bfloat16"}), "torch_dtype", "dtype"),
        (
            json!({"original_max_position_embeddings": 32,
                   "rope_parameters": {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 64}}),
            "original_max_position_embeddings",
            "rope_parameters.original_max_position_embeddings",
        ),
    ];
    for (extra, first, second) in cases {
        let e = err(extra.clone());
        assert!(e.contains(&format!("`{first}`")) && e.contains(&format!("`{second}`")), "{extra}: {e}");
        assert!(e.contains("disagree"), "{e}");
    }
    // A null rope_scaling next to a scaled rope_parameters is no conflict: transformers 5 wrote it.
    let written = json!({"rope_scaling": null, "rope_theta": 5e5,
                         "rope_parameters": {"rope_type": "linear", "factor": 4, "rope_theta": 5e5}});
    assert_eq!(load(written).unwrap().rope.type_name(), "linear");
    let e = err(json!({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}}));
    assert!(e.contains("`rope_parameters.sliding_attention`") && e.contains("one rotary table"), "{e}");
}

#[test]
fn every_key_that_would_change_the_math_is_refused_by_name() {
    let cases = [
        (json!({"attention_bias": true}), "attention_bias"),
        (json!({"mlp_bias": true}), "mlp_bias"),
        (json!({"hidden_act": "gelu_pytorch_tanh"}), "hidden_act"),
        (json!({"qk_norm": true}), "qk_norm"),
        (json!({"use_qk_norm": true}), "use_qk_norm"),
        (json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (
            json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}),
            "rope_parameters.partial_rotary_factor",
        ),
        (json!({"attn_logit_softcapping": 50.0}), "attn_logit_softcapping"),
        (json!({"final_logit_softcapping": 30.0}), "final_logit_softcapping"),
        (json!({"num_local_experts": 8}), "num_local_experts"),
        (json!({"num_experts": 8}), "num_experts"),
        (json!({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}}), "quantization_config"),
        (json!({"layer_types": ["full_attention", "sliding_attention"]}), "layer_types"),
        (json!({"rope_scaling": {"type": "su", "factor": 2}}), "rope_scaling.rope_type"),
        (json!({"rope_parameters": {"rope_type": "mrope", "mrope_section": [1, 1]}}), "rope_parameters.rope_type"),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 2, "attn_factor": 1.5}}),
            "rope_parameters.attn_factor",
        ),
        (json!({"rope_scaling": {"type": "dynamic"}}), "rope_scaling.factor"),
        (json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}), "model_type"),
        (json!({"architectures": ["LlamaForSequenceClassification"]}), "architectures"),
        (json!({"model_type": null, "architectures": null}), "model_type"),
    ];
    for (extra, key) in cases {
        let e = err(extra.clone());
        assert!(e.contains(&format!("`{key}`")), "{extra}: {e}");
    }
    // Neutral values, and keys that do not change inference, load.
    let neutral = json!({"attention_bias": false, "mlp_bias": false, "hidden_act": "swish", "qk_norm": false,
        "partial_rotary_factor": 1.0, "pretraining_tp": 2, "attention_dropout": 0.1, "sliding_window": null,
        "layer_types": ["full_attention", "full_attention"], "quantization_config": null, "use_cache": true});
    assert!(load(neutral).is_ok());
}

#[test]
fn sliding_windows_follow_mistral_defaults_and_bound_max_model_len() {
    let mistral = json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_attention_heads": 8,
                         "hidden_size": 64, "num_key_value_heads": null, "max_position_embeddings": null});
    let c = load(mistral.clone()).unwrap();
    // MistralConfig's defaults: 8 KV heads, a 4096-token window, 131072 positions.
    assert_eq!((c.num_key_value_heads, c.max_position_embeddings), (8, 131072));
    assert_eq!(c.sliding_window, Some(SlidingWindow { size: 4096, key: "sliding_window" }));
    assert!(c.check_max_model_len(4096).is_ok());
    assert!(c.check_max_model_len(8192).unwrap_err().to_string().contains("`sliding_window` = 4096"));
    // An explicit null turns the window off.
    let mut explicit_null: Value = serde_json::from_str(&config(json!({"model_type": "mistral"}))).unwrap();
    explicit_null["sliding_window"] = Value::Null;
    assert_eq!(LlamaConfig::from_hf_json(&explicit_null.to_string()).unwrap().sliding_window, None);
    assert_eq!(load(json!({"sliding_window": 128, "use_sliding_window": false})).unwrap().sliding_window, None);
    assert_eq!(load(json!({"sliding_window": 128})).unwrap().sliding_window.map(|w| w.size), Some(128));
}
