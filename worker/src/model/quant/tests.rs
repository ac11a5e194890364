use serde_json::json;

use super::fp8::Granularity;
use super::int::IntScheme;
use super::{Fp8Scheme, Quantization, from_hf_config};

/// The FP8 scheme of a config that must have one.
fn fp8_of(config: &serde_json::Value) -> Fp8Scheme {
    match from_hf_config(Some(config)).unwrap() {
        Some(Quantization::Fp8(s)) => s,
        other => panic!("{config}: {other:?}"),
    }
}

/// llm-compressor's FP8-dynamic config (per-channel weights, per-token dynamic activations).
fn fp8_dynamic() -> serde_json::Value {
    json!({
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": null, "global_compression_ratio": 1.24,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": null,
            "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel", "dynamic": false,
                        "group_size": null, "block_structure": null, "actorder": null, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token",
                                  "dynamic": true, "observer": null}
        }}
    })
}

#[test]
fn fp8_checkpoint_configs_are_read() {
    let scheme = fp8_of(&fp8_dynamic());
    assert_eq!(
        scheme,
        Fp8Scheme { method: "compressed-tensors", weights: Granularity::Channel, serialized: true, activations: true }
    );
    // Per-tensor weights, static activations (llm-compressor's "FP8").
    let mut fp8 = fp8_dynamic();
    fp8["config_groups"]["group_0"]["weights"]["strategy"] = json!("tensor");
    fp8["config_groups"]["group_0"]["input_activations"] =
        json!({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false});
    assert_eq!(fp8_of(&fp8).weights, Granularity::Tensor);
    // Weight-only.
    let mut weight_only = fp8_dynamic();
    weight_only["config_groups"]["group_0"]["input_activations"] = json!(null);
    assert!(!fp8_of(&weight_only).activations);
    // vLLM's own.
    let vllm = json!({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]});
    assert_eq!(
        fp8_of(&vllm),
        Fp8Scheme { method: "fp8", weights: Granularity::Tensor, serialized: true, activations: true }
    );
    assert_eq!(from_hf_config(None).unwrap(), None);
    assert_eq!(from_hf_config(Some(&json!(null))).unwrap(), None);
}

#[test]
fn schemes_lumen_cannot_run_are_refused_saying_why() {
    let with = |path: &[&str], value: serde_json::Value| {
        let mut config = fp8_dynamic();
        let mut at = &mut config;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = value;
        config
    };
    let group = ["config_groups", "group_0"];
    let cases = [
        (json!({"quant_method": "gptq", "bits": 3}), "3-bit GPTQ"),
        (json!({"quant_method": "gptq", "checkpoint_format": "marlin"}), "checkpoint_format"),
        (json!({"quant_method": "awq", "bits": 8}), "8-bit AWQ"),
        (json!({"quant_method": "awq", "version": "gemv"}), "AWQ version \"gemv\""),
        (json!({"quant_method": "awq", "zero_point": false}), "without zero points"),
        (json!({"quant_method": "awq", "group_size": 0}), "group_size 0"),
        (json!({"quant_method": "bitsandbytes"}), "bitsandbytes checkpoints are not supported yet"),
        (json!({"quant_method": "gptq", "lm_head": true}), "lm_head: a quantized lm_head"),
        (json!({"quant_method": "gptq", "is_marlin_format": true}), "is_marlin_format"),
        (json!({"quant_method": "gptq", "dynamic": {"+:.*down.*": {"bits": 8}}}), "dynamic: per-layer"),
        (json!({"quant_method": "gptq", "bits": 4294967300u64}), "bits 4294967300"),
        (json!({"quant_method": "hqq"}), "unknown quant_method \"hqq\""),
        (json!({"quant_method": "fp8", "weight_block_size": [128, 128]}), "block-wise"),
        (json!({"quant_method": "fp8", "activation_scheme": "none"}), "activation_scheme"),
        (json!("fp8"), "must be an object"),
        (with(&["kv_cache_scheme"], json!({"num_bits": 8, "type": "float"})), "kv_cache_scheme"),
        (with(&["format"], json!("pack-quantized")), "float-quantized"),
        (with(&[group[0], group[1], "weights", "num_bits"], json!(4)), "8-bit floats"),
        (with(&[group[0], group[1], "weights", "type"], json!("int")), "8-bit floats"),
        (with(&[group[0], group[1], "weights", "strategy"], json!("group")), "tensor or channel"),
        (with(&[group[0], group[1], "input_activations", "strategy"], json!("group")), "per token or per tensor"),
        (with(&[group[0], group[1], "targets"], json!(["Attention"])), "[\"Linear\"]"),
        (with(&[group[0], group[1], "output_activations"], json!({"num_bits": 8})), "output activation"),
        (with(&["config_groups", "group_1"], json!({"targets": ["Linear"]})), "more than one config group"),
        (with(&["config_groups"], json!({})), "config_groups is missing"),
    ];
    for (config, want) in cases {
        let err = from_hf_config(Some(&config)).expect_err(&config.to_string()).to_string();
        assert!(err.contains("quantization_config") && err.contains(want), "{config}: {err}");
    }
}

#[test]
fn the_quantization_option_agrees_with_the_checkpoint_or_quantizes_floats() {
    let checkpoint = from_hf_config(Some(&fp8_dynamic())).unwrap().unwrap();
    assert_eq!(Quantization::resolve(None, None).unwrap(), Quantization::None);
    assert_eq!(Quantization::resolve(Some(&checkpoint), None).unwrap(), checkpoint);
    assert_eq!(Quantization::resolve(Some(&checkpoint), Some("compressed-tensors")).unwrap(), checkpoint);
    let awq = from_hf_config(Some(&json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM"})))
        .unwrap()
        .unwrap();
    assert_eq!(
        awq,
        Quantization::Int(IntScheme { method: "awq", bits: 4, group_size: Some(128), v2: false, desc_act: false })
    );
    assert_eq!(Quantization::resolve(Some(&awq), Some("awq_marlin")).unwrap(), awq, "vLLM's kernel spelling");
    let gptq =
        json!({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": true, "checkpoint_format": "gptq_v2"});
    assert_eq!(
        from_hf_config(Some(&gptq)).unwrap().unwrap(),
        Quantization::Int(IntScheme { method: "gptq", bits: 8, group_size: None, v2: true, desc_act: true })
    );
    let online = Quantization::resolve(None, Some("fp8")).unwrap();
    assert_eq!(
        online,
        Quantization::Fp8(Fp8Scheme {
            method: "fp8",
            weights: Granularity::Channel,
            serialized: false,
            activations: true
        })
    );
    for (checkpoint, flag, want) in [
        (Some(&checkpoint), "fp8", "quantized with compressed-tensors but --quantization says fp8"),
        (Some(&awq), "gptq", "quantized with awq but --quantization says gptq"),
        (None, "compressed-tensors", "holds float weights"),
        (None, "awq", "holds float weights"),
        (None, "hqq", "\"hqq\" is not one of fp8, compressed-tensors, awq"),
    ] {
        let err = Quantization::resolve(checkpoint, Some(flag)).expect_err(flag).to_string();
        assert!(err.contains("quantization") && err.contains(want), "{flag}: {err}");
    }
}

#[test]
fn only_the_layers_projections_are_linear_weights() {
    use super::source::is_linear_weight;
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.31.mlp.down_proj.weight"] {
        assert!(is_linear_weight(name), "{name}");
    }
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight_scale",
        "model.layers.x.mlp.up_proj.weight",
        "model.norm.weight",
    ] {
        assert!(!is_linear_weight(name), "{name}");
    }
}

#[test]
fn older_checkpoints_name_their_scheme_in_a_file_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(super::from_sidecar(dir.path()).unwrap(), None);
    let gptq = json!({"bits": 4, "group_size": 128, "desc_act": false, "sym": true, "true_sequential": true});
    std::fs::write(dir.path().join("quantize_config.json"), gptq.to_string()).unwrap();
    assert_eq!(
        super::from_sidecar(dir.path()).unwrap(),
        Some(Quantization::Int(IntScheme {
            method: "gptq",
            bits: 4,
            group_size: Some(128),
            v2: false,
            desc_act: false
        }))
    );
    let awq_dir = tempfile::tempdir().unwrap();
    let awq = json!({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"});
    std::fs::write(awq_dir.path().join("quant_config.json"), awq.to_string()).unwrap();
    match super::from_sidecar(awq_dir.path()).unwrap() {
        Some(Quantization::Int(s)) => assert_eq!((s.method, s.group_size), ("awq", Some(64))),
        other => panic!("{other:?}"),
    }
    std::fs::write(awq_dir.path().join("quant_config.json"), "{not json").unwrap();
    let err = super::from_sidecar(awq_dir.path()).unwrap_err().to_string();
    assert!(err.contains("quant_config.json") && err.contains("not JSON"), "{err}");
}
