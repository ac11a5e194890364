//! FP8 checkpoints end to end on the CPU path: SmolLM2 written in the published layouts
//! (compressed-tensors per channel, as llm-compressor's "FP8-dynamic" saves it; vLLM's `fp8` with
//! one scale per tensor), read back against the format's own dequantization formula (written
//! here, not Lumen's), and served: the FP8 checkpoint gives exactly the greedy tokens of a float
//! checkpoint holding its dequantized values, and `--quantization fp8` on the float model gives
//! those of the per-channel checkpoint (the same rounding, done as it loads).

mod common;

use common::hf::{Stored, f32_tensor, write_checkpoint};
use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest};
use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::model::quant::fp8::{Granularity, quantize};
use lumen_worker::model::quant::source::{DequantizedSource, is_linear_weight};
use lumen_worker::model::quant::{Quantization, from_hf_config};
use lumen_worker::model::{SafetensorsSource, TensorSource};
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use safetensors::tensor::Dtype;
use serde_json::json;

/// E4M3's value by the format's definition: sign, 4 exponent bits of bias 7, 3 mantissa bits,
/// exponent 0 subnormal.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = (((b >> 3) & 0x0F) as i32, (b & 0x07) as f32);
    sign * if exp == 0 { man / 8.0 * 2f32.powi(-6) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) }
}

fn compressed_tensors_config() -> serde_json::Value {
    json!({
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": null,
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": null,
            "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel", "dynamic": false},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token", "dynamic": true}
        }}
    })
}

/// A linear weight as FP8 codes and its `weight_scale` (`[rows, 1]` per channel, a scalar per
/// tensor), as the checkpoint stores them.
fn fp8_tensors(name: &str, shape: &[usize], values: &[f32], granularity: Granularity) -> Vec<Stored> {
    let (codes, scales) = quantize(values, shape[0], shape[1], granularity);
    let (scale_shape, scale_values) = match granularity {
        Granularity::Channel => (vec![shape[0], 1], scales),
        Granularity::Tensor => (vec![], vec![scales[0]]),
    };
    vec![
        Stored { name: name.to_string(), dtype: Dtype::F8_E4M3, shape: shape.to_vec(), bytes: codes },
        f32_tensor(&format!("{name}_scale"), &scale_shape, &scale_values),
    ]
}

/// The values an FP8 weight means, by [`e4m3`] and its scale (one per row, or one).
fn formula_values(src: &dyn TensorSource, name: &str) -> Vec<f32> {
    let weight = src.tensor(name).unwrap();
    let scales = src.tensor(&format!("{name}_scale")).unwrap().to_f32().unwrap();
    let cols = weight.shape[1];
    let codes = weight.bytes.as_slice();
    (0..codes.len()).map(|i| e4m3(codes[i]) * scales[if scales.len() == 1 { 0 } else { i / cols }]).collect()
}

/// Greedy tokens of three chat prompts, 16 tokens each.
fn greedy(opts: EngineOptions) -> Vec<Vec<u32>> {
    let mut core = engine(&opts);
    let template = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    ["What is 12 times 12?", "Write a haiku about the sea.", "Hello, who are you?"]
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let prompt = core.tokenizer().encode_chat(&[ChatMessage::new("user", *text)], &template).unwrap();
            let stop = StopParams { max_tokens: 16, ignore_eos: true, ..Default::default() };
            let req = EngineRequest::new(format!("r{i}"), prompt, SamplingParams::greedy(), stop);
            run(&mut core, vec![req]).remove(0).tokens[&0].clone()
        })
        .collect()
}

#[test]
fn fp8_checkpoints_read_as_their_formula_and_serve_the_tokens_of_their_values() {
    let gguf = GgufFile::open(&common::model_path()).unwrap();
    let (channel, tensor, reference) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_checkpoint(&gguf, channel.path(), compressed_tensors_config(), |name, shape, values| {
        if is_linear_weight(name) {
            fp8_tensors(name, shape, &values, Granularity::Channel)
        } else {
            vec![f32_tensor(name, shape, &values)]
        }
    });
    let vllm_fp8 = json!({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]});
    write_checkpoint(&gguf, tensor.path(), vllm_fp8, |name, shape, values| {
        if is_linear_weight(name) {
            fp8_tensors(name, shape, &values, Granularity::Tensor)
        } else {
            vec![f32_tensor(name, shape, &values)]
        }
    });

    // Read back: Lumen's view of each FP8 weight is the formula's, value for value.
    let cfg = gguf.llama_config().unwrap();
    let linear: Vec<String> = lumen_worker::model::dummy::llama_tensor_shapes(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_linear_weight(n))
        .collect();
    assert_eq!(linear.len(), 7 * cfg.num_hidden_layers);
    for (dir, config) in [(&channel, compressed_tensors_config()), (&tensor, json!({"quant_method": "fp8"}))] {
        let stored = SafetensorsSource::open(dir.path()).unwrap();
        let scheme = from_hf_config(Some(&config)).unwrap();
        let quantization = Quantization::resolve(scheme.as_ref(), None).unwrap();
        let dequantized = DequantizedSource::wrap(&stored, &quantization).unwrap();
        for name in linear.iter().step_by(5) {
            assert_eq!(dequantized.tensor(name).unwrap().to_f32().unwrap(), formula_values(&stored, name), "{name}");
        }
        // Everything else passes through as stored.
        let norm = "model.layers.0.input_layernorm.weight";
        assert_eq!(dequantized.tensor(norm).unwrap().to_f32().unwrap(), stored.tensor(norm).unwrap().to_f32().unwrap());
    }

    // A float checkpoint of the per-channel checkpoint's values, by the formula.
    let channel_src = SafetensorsSource::open(channel.path()).unwrap();
    write_checkpoint(&gguf, reference.path(), serde_json::Value::Null, |name, shape, values| {
        let values = if is_linear_weight(name) { formula_values(&channel_src, name) } else { values };
        vec![f32_tensor(name, shape, &values)]
    });
    // `--quantization fp8` rounds the float weights to exactly those values.
    let online = Quantization::resolve(None, Some("fp8")).unwrap();
    let online_src = DequantizedSource::wrap(&gguf, &online).unwrap();
    for name in linear.iter().step_by(5) {
        assert_eq!(online_src.tensor(name).unwrap().to_f32().unwrap(), formula_values(&channel_src, name), "{name}");
    }
    drop(channel_src);

    let dir_options = |dir: &tempfile::TempDir| EngineOptions { model: dir.path().display().to_string(), ..options() };
    let from_fp8 = greedy(dir_options(&channel));
    assert_eq!(from_fp8, greedy(dir_options(&reference)), "the FP8 checkpoint serves its values");
    assert!(from_fp8.iter().all(|t| t.len() == 16));
    // The same rounding, done as the float model loads.
    let online = greedy(EngineOptions {
        quantization: Some("fp8".into()),
        cpu_weight_format: CpuWeightFormat::F32,
        ..options()
    });
    assert_eq!(online, from_fp8, "--quantization fp8 quantizes per channel as the checkpoint was");
    // The per-tensor checkpoint serves too; its rounding differs, so only its length is known.
    assert!(greedy(dir_options(&tensor)).iter().all(|t| t.len() == 16));
    // Naming another method than the checkpoint's is refused.
    let wrong = EngineOptions { quantization: Some("fp8".into()), ..dir_options(&channel) };
    let Err(err) = lumen_worker::engine::build_engine(&wrong) else { panic!("a mismatched --quantization loads") };
    let err = err.to_string();
    assert!(err.contains("compressed-tensors") && err.contains("--quantization"), "{err}");
}

#[test]
fn an_fp8_weight_without_its_scale_is_an_error_naming_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let codes = vec![0x38u8; 8];
    let views = [(name, safetensors::tensor::TensorView::new(Dtype::F8_E4M3, vec![2, 4], &codes).unwrap())];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let stored = SafetensorsSource::open(dir.path()).unwrap();
    let scheme = from_hf_config(Some(&compressed_tensors_config())).unwrap();
    let quantization = Quantization::resolve(scheme.as_ref(), None).unwrap();
    let err = DequantizedSource::wrap(&stored, &quantization).unwrap().tensor(name).unwrap_err().to_string();
    assert!(err.contains("q_proj.weight_scale"), "{err}");
}
