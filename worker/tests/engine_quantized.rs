//! Quantized checkpoints end to end on the CPU path: SmolLM2 written in the published layouts
//! (FP8: compressed-tensors per channel, as llm-compressor's "FP8-dynamic" saves it, and vLLM's
//! `fp8` with one scale per tensor; AutoAWQ's GEMM layout; AutoGPTQ's with `desc_act`), read back
//! against each format's own dequantization formula (written here, not Lumen's), and served: a
//! quantized checkpoint gives exactly the greedy tokens of a float checkpoint holding its
//! dequantized values, and `--quantization fp8` on the float model gives those of the
//! per-channel checkpoint (the same rounding, done as it loads).

mod common;

use common::hf::{Stored, f32_tensor, write_checkpoint, write_tensors};
use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest};
use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::model::quant::fp8::{Granularity, quantize};
use lumen_worker::model::quant::source::{DequantizedSource, is_linear_weight};
use lumen_worker::model::quant::{Quantization, from_hf_config};
use lumen_worker::model::source::RawTensor;
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

/// The checkpoint in `dir`, held in f32 on the CPU so its exact values are compared (`auto`
/// requantizes a quantized checkpoint to Q8_0).
fn exact_options(dir: &tempfile::TempDir) -> EngineOptions {
    EngineOptions { model: dir.path().display().to_string(), cpu_weight_format: CpuWeightFormat::F32, ..options() }
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

    let from_fp8 = greedy(exact_options(&channel));
    assert_eq!(from_fp8, greedy(exact_options(&reference)), "the FP8 checkpoint serves its values");
    assert!(from_fp8.iter().all(|t| t.len() == 16));
    // The same rounding, done as the float model loads.
    let online = greedy(EngineOptions {
        quantization: Some("fp8".into()),
        cpu_weight_format: CpuWeightFormat::F32,
        ..options()
    });
    assert_eq!(online, from_fp8, "--quantization fp8 quantizes per channel as the checkpoint was");
    // The per-tensor checkpoint serves too; its rounding differs, so only its length is known.
    assert!(greedy(exact_options(&tensor)).iter().all(|t| t.len() == 16));
    // Under `auto` the CPU holds an FP8 checkpoint as Q8_0 blocks, not f32.
    let auto = engine(&EngineOptions { cpu_weight_format: CpuWeightFormat::Auto, ..exact_options(&channel) });
    let described = auto.model().describe();
    assert!(described.contains("weights q8_0 (output q8_0)"), "{described}");
    // Naming another method than the checkpoint's is refused.
    let wrong = EngineOptions { quantization: Some("fp8".into()), ..exact_options(&channel) };
    let Err(err) = lumen_worker::engine::build_engine(&wrong) else { panic!("a mismatched --quantization loads") };
    let err = err.to_string();
    assert!(err.contains("compressed-tensors") && err.contains("--quantization"), "{err}");
}

#[test]
fn an_fp8_weight_without_its_scale_is_an_error_naming_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let codes = vec![0x38u8; 8];
    let weight = Stored { name: name.into(), dtype: Dtype::F8_E4M3, shape: vec![2, 4], bytes: codes };
    write_tensors(&dir.path().join("model.safetensors"), &[weight]);
    let stored = SafetensorsSource::open(dir.path()).unwrap();
    let scheme = from_hf_config(Some(&compressed_tensors_config())).unwrap();
    let quantization = Quantization::resolve(scheme.as_ref(), None).unwrap();
    let err = DequantizedSource::wrap(&stored, &quantization).unwrap().tensor(name).unwrap_err().to_string();
    assert!(err.contains("q_proj.weight_scale"), "{err}");
}

/// AutoAWQ's packing order: nibble `i` of a word holds output column `ORDER[i]` of its eight.
const AWQ_PACK_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Input rows per group in the 4-bit checkpoints (SmolLM2's inputs are 576 and 1536 wide).
const GROUP: usize = 64;

fn i32_tensor(name: String, shape: Vec<usize>, words: &[u32]) -> Stored {
    Stored { name, dtype: Dtype::I32, shape, bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect() }
}

fn f16_tensor(name: String, shape: Vec<usize>, values: &[f32]) -> Stored {
    let bytes = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    Stored { name, dtype: Dtype::F16, shape, bytes }
}

/// A 4-bit layer as AutoAWQ's GEMM layout stores it (asymmetric, zero points, f16 scales), and
/// the `[out, in]` values it means by the formula `(q - zero) * scale`.
fn awq_layer(name: &str, shape: &[usize], w: &[f32]) -> (Vec<Stored>, Vec<f32>) {
    let (outs, ins) = (shape[0], shape[1]);
    let layer = name.strip_suffix(".weight").unwrap();
    let groups = ins / GROUP;
    let (mut q, mut zeros, mut scales) = (vec![0u32; ins * outs], vec![0u32; groups * outs], vec![0f32; groups * outs]);
    for g in 0..groups {
        for o in 0..outs {
            let rows = g * GROUP..(g + 1) * GROUP;
            let (lo, hi) =
                rows.clone().fold((0f32, 0f32), |(lo, hi), i| (lo.min(w[o * ins + i]), hi.max(w[o * ins + i])));
            let scale = half::f16::from_f32(((hi - lo) / 15.0).max(1e-6)).to_f32();
            let zero = (-lo / scale).round().clamp(0.0, 15.0) as u32;
            scales[g * outs + o] = scale;
            zeros[g * outs + o] = zero;
            for i in rows {
                q[i * outs + o] = ((w[o * ins + i] / scale).round() + zero as f32).clamp(0.0, 15.0) as u32;
            }
        }
    }
    let pack = |values: &[u32], rows: usize| -> Vec<u32> {
        let words = outs / 8;
        let mut packed = vec![0u32; rows * words];
        for r in 0..rows {
            for c in 0..words {
                for (i, &col) in AWQ_PACK_ORDER.iter().enumerate() {
                    packed[r * words + c] |= values[r * outs + 8 * c + col] << (4 * i);
                }
            }
        }
        packed
    };
    let meant = (0..outs * ins)
        .map(|j| {
            let (o, i) = (j / ins, j % ins);
            let g = i / GROUP;
            (q[i * outs + o] as f32 - zeros[g * outs + o] as f32) * scales[g * outs + o]
        })
        .collect();
    let stored = vec![
        i32_tensor(format!("{layer}.qweight"), vec![ins, outs / 8], &pack(&q, ins)),
        i32_tensor(format!("{layer}.qzeros"), vec![groups, outs / 8], &pack(&zeros, groups)),
        f16_tensor(format!("{layer}.scales"), vec![groups, outs], &scales),
    ];
    (stored, meant)
}

/// A 4-bit layer as AutoGPTQ stores it with `desc_act` (symmetric, rows assigned to groups out
/// of order by `g_idx`, zeros stored minus one), and the values it means.
fn gptq_layer(name: &str, shape: &[usize], w: &[f32]) -> (Vec<Stored>, Vec<f32>) {
    let (outs, ins) = (shape[0], shape[1]);
    let layer = name.strip_suffix(".weight").unwrap();
    let groups = ins / GROUP;
    let g_idx: Vec<u32> = (0..ins).map(|r| ((r * 5) % ins / GROUP) as u32).collect();
    let mut scales = vec![0f32; groups * outs];
    for o in 0..outs {
        for i in 0..ins {
            let s = &mut scales[g_idx[i] as usize * outs + o];
            *s = s.max(w[o * ins + i].abs() / 7.0);
        }
    }
    for s in &mut scales {
        *s = half::f16::from_f32(s.max(1e-6)).to_f32();
    }
    let q = |i: usize, o: usize| {
        let s = scales[g_idx[i] as usize * outs + o];
        ((w[o * ins + i] / s).round() + 8.0).clamp(0.0, 15.0) as u32
    };
    let mut qweight = vec![0u32; ins / 8 * outs];
    for i in 0..ins {
        for o in 0..outs {
            qweight[(i / 8) * outs + o] |= q(i, o) << (4 * (i % 8));
        }
    }
    let qzeros = vec![0x7777_7777u32; groups * outs / 8]; // zero 8, stored as 7 in every nibble
    let meant = (0..outs * ins)
        .map(|j| {
            let (o, i) = (j / ins, j % ins);
            (q(i, o) as f32 - 8.0) * scales[g_idx[i] as usize * outs + o]
        })
        .collect();
    let stored = vec![
        i32_tensor(format!("{layer}.qweight"), vec![ins / 8, outs], &qweight),
        i32_tensor(format!("{layer}.qzeros"), vec![groups, outs / 8], &qzeros),
        f16_tensor(format!("{layer}.scales"), vec![groups, outs], &scales),
        i32_tensor(format!("{layer}.g_idx"), vec![ins], &g_idx),
    ];
    (stored, meant)
}

#[test]
fn awq_and_gptq_checkpoints_read_as_their_formula_and_serve_the_tokens_of_their_values() {
    let gguf = GgufFile::open(&common::model_path()).unwrap();
    let cfg = gguf.llama_config().unwrap();
    let (awq, gptq, reference) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let awq_config =
        json!({"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": true, "version": "gemm"});
    write_checkpoint(&gguf, awq.path(), awq_config, |name, shape, values| {
        if is_linear_weight(name) { awq_layer(name, shape, &values).0 } else { vec![f32_tensor(name, shape, &values)] }
    });
    write_checkpoint(&gguf, reference.path(), serde_json::Value::Null, |name, shape, values| {
        let values = if is_linear_weight(name) { awq_layer(name, shape, &values).1 } else { values };
        vec![f32_tensor(name, shape, &values)]
    });
    let gptq_config = json!({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": true, "sym": true});
    write_checkpoint(&gguf, gptq.path(), gptq_config.clone(), |name, shape, values| {
        if is_linear_weight(name) { gptq_layer(name, shape, &values).0 } else { vec![f32_tensor(name, shape, &values)] }
    });

    // Read back: each layer's values are the formula's, for both layouts.
    let linear: Vec<(String, Vec<usize>)> = lumen_worker::model::dummy::llama_tensor_shapes(&cfg)
        .into_iter()
        .filter(|(n, _)| is_linear_weight(n))
        .collect();
    let float = |name: &str| gguf.tensor(name).unwrap().to_f32().unwrap();
    for (dir, layer) in
        [(&awq, awq_layer as fn(&str, &[usize], &[f32]) -> (Vec<Stored>, Vec<f32>)), (&gptq, gptq_layer)]
    {
        let stored = SafetensorsSource::open(dir.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        let scheme = from_hf_config(config.get("quantization_config")).unwrap();
        let quantization = Quantization::resolve(scheme.as_ref(), None).unwrap();
        let dequantized = DequantizedSource::wrap(&stored, &quantization).unwrap();
        for (name, shape) in linear.iter().step_by(5) {
            let got: RawTensor = dequantized.tensor(name).unwrap();
            assert_eq!(got.shape, *shape, "{name}");
            assert!(dequantized.contains(name) && !stored.contains(name), "{name} is stored packed only");
            assert_eq!(got.to_f32().unwrap(), layer(name, shape, &float(name)).1, "{name}");
        }
    }

    let from_awq = greedy(exact_options(&awq));
    assert_eq!(from_awq, greedy(exact_options(&reference)), "the AWQ checkpoint serves its values");
    assert!(greedy(exact_options(&gptq)).iter().all(|t| t.len() == 16), "the GPTQ checkpoint serves");
    let gptq_marlin = EngineOptions { quantization: Some("gptq_marlin".into()), ..exact_options(&gptq) };
    assert!(lumen_worker::engine::build_engine(&gptq_marlin).is_ok(), "vLLM's gptq_marlin spelling is accepted");
}

#[test]
fn a_gptq_layer_in_activation_order_without_its_group_indices_is_an_error_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let layer = "model.layers.0.mlp.down_proj";
    // 16 input rows (two words of 8), 8 outputs, groups of 8: every value 9, zero 8 (stored 7).
    let qweight = vec![0x9999_9999u32; 2 * 8];
    let qzeros = vec![0x7777_7777u32; 2];
    let scales: Vec<f32> = (0..16).map(|i| 0.5 + i as f32).collect();
    let stored = [
        i32_tensor(format!("{layer}.qweight"), vec![2, 8], &qweight),
        i32_tensor(format!("{layer}.qzeros"), vec![2, 1], &qzeros),
        f16_tensor(format!("{layer}.scales"), vec![2, 8], &scales),
    ];
    write_tensors(&dir.path().join("model.safetensors"), &stored);
    let src = SafetensorsSource::open(dir.path()).unwrap();
    let read = |desc_act: bool| {
        let config = json!({"quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": desc_act});
        let quantization = Quantization::resolve(from_hf_config(Some(&config)).unwrap().as_ref(), None).unwrap();
        DequantizedSource::wrap(&src, &quantization).unwrap().tensor(&format!("{layer}.weight"))
    };
    let err = read(true).unwrap_err().to_string();
    assert!(err.contains("g_idx") && err.contains("desc_act"), "{err}");
    // In order, row r is in group r / 8: value (9 - 8) * scale of (group, output).
    let t = read(false).unwrap();
    assert_eq!(t.shape, vec![8, 16]);
    let values = t.to_f32().unwrap();
    for o in 0..8 {
        for i in 0..16 {
            assert_eq!(values[o * 16 + i], scales[(i / 8) * 8 + o], "output {o}, input {i}");
        }
    }
}
