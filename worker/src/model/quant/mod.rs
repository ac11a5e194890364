//! Quantized weights: which scheme a model's linear layers use, from the checkpoint's
//! `quantization_config` and vLLM's `--quantization` option, and how a weight source presents
//! them to a path that computes in floats.
//!
//! Read today (FP8 E4M3 weights, `fp8`):
//! - `compressed-tensors` checkpoints (llm-compressor's "FP8", "FP8-dynamic", "FP8 weight-only"):
//!   one config group targeting `Linear`, weights `num_bits: 8, type: float, symmetric`, strategy
//!   `tensor` or `channel`; input activations absent (weight-only), dynamic (`token` or `tensor`)
//!   or static (`tensor`, an `input_scale` per layer); `ignore`d layers stay in floats.
//! - vLLM's own `fp8` checkpoints (`quant_method: fp8`, per-tensor `weight_scale`,
//!   `activation_scheme` dynamic or static); `weight_block_size` (block-wise scales) is refused.
//! - `--quantization fp8` on a float checkpoint: the linear layers are quantized as they load
//!   (per output channel).
//!
//! Tensors: a quantized layer stores `<layer>.weight` as `F8_E4M3` `[out, in]` and
//! `<layer>.weight_scale` (`[out, 1]`, `[out]`, `[1]` or a scalar, any float type); its value is
//! `weight * scale` per row. Whether a layer is quantized is read from its stored dtype, so an
//! ignore list needs no matching here. Activation scales are not read: a GPU computing in FP8
//! quantizes each token's activations itself (dynamic, per token), the CPU computes in floats.
//! - AutoAWQ's `awq` (`version: gemm`, 4 bits, groups, zero points) and AutoGPTQ's `gptq` (4 or 8
//!   bits, groups or whole rows, `desc_act` with `g_idx`, the v1 zero offset unless
//!   `checkpoint_format: gptq_v2`): packed integers read by `int`, computed with as the floats they
//!   mean (the CPU, and for now the GPU too: no integer kernel yet).
//!
//! Other methods (`bitsandbytes`, `marlin`, ...) and `kv_cache_scheme` are refused by name.

pub mod fp8;
pub mod int;
pub mod source;

use serde_json::{Map, Value};

use crate::{Result, WorkerError};

/// The weight quantization a model loads with.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantization {
    /// Float weights.
    None,
    /// FP8 E4M3 linear weights.
    Fp8(Fp8Scheme),
    /// Packed integer weights with group scales (AWQ, GPTQ).
    Int(int::IntScheme),
}

/// An FP8 model's scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Scheme {
    /// `fp8` or `compressed-tensors` (what `--quantization` must say, if anything).
    pub method: &'static str,
    /// Scales of the stored weights (online quantization: per channel).
    pub weights: fp8::Granularity,
    /// Whether the checkpoint holds FP8 weights (false: quantized as they load).
    pub serialized: bool,
    /// Whether activations are quantized too (W8A8; false: weight-only, W8A16).
    pub activations: bool,
}

impl Quantization {
    /// The scheme for a checkpoint that says `checkpoint` (from its config) under
    /// `--quantization` `flag`: the checkpoint's when the flag is absent or agrees; `fp8` on a
    /// float checkpoint quantizes it online; anything else is an error naming the option.
    pub fn resolve(checkpoint: Option<&Quantization>, flag: Option<&str>) -> Result<Quantization> {
        let bad = |why: String| Err(WorkerError::invalid("quantization", why));
        match (checkpoint, flag) {
            (None | Some(Quantization::None), None) => Ok(Quantization::None),
            (Some(scheme), None) => Ok(scheme.clone()),
            (Some(scheme), Some(flag)) if scheme.accepts(flag) => Ok(scheme.clone()),
            (Some(scheme), Some(flag)) => bad(format!(
                "the checkpoint is quantized with {} but --quantization says {flag}: leave it out or say {}",
                scheme.method(),
                scheme.method()
            )),
            (None, Some("fp8")) => Ok(Quantization::Fp8(Fp8Scheme {
                method: "fp8",
                weights: fp8::Granularity::Channel,
                serialized: false,
                activations: true,
            })),
            (None, Some(flag)) if KNOWN.contains(&flag) => bad(format!(
                "{flag} needs a checkpoint quantized with it, and this one holds float weights (on those only fp8 quantizes as it loads)"
            )),
            (None, Some(flag)) => bad(format!("{flag:?} is not one of {}", KNOWN.join(", "))),
        }
    }

    /// The method's name (`--quantization`'s value for it).
    pub fn method(&self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Fp8(s) => s.method,
            Quantization::Int(s) => s.method,
        }
    }

    /// Whether `--quantization flag` names this checkpoint's method (vLLM's kernel-specific
    /// spellings, `awq_marlin` and `gptq_marlin`, included).
    fn accepts(&self, flag: &str) -> bool {
        flag == self.method() || flag.strip_suffix("_marlin") == Some(self.method()) && self.method() != "fp8"
    }
}

/// The `--quantization` values understood.
const KNOWN: &[&str] = &["fp8", "compressed-tensors", "awq", "awq_marlin", "gptq", "gptq_marlin"];

/// Methods vLLM knows that Lumen does not run yet.
const NOT_YET: &[&str] = &[
    "awq_marlin",
    "gptq_marlin",
    "bitsandbytes",
    "gguf",
    "marlin",
    "modelopt",
    "modelopt_fp4",
    "fbgemm_fp8",
    "experts_int8",
    "mxfp4",
    "quark",
    "torchao",
];

fn unsupported(value: &Value, reason: impl Into<String>) -> WorkerError {
    WorkerError::UnsupportedConfig {
        key: "quantization_config".into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The scheme of a config.json's `quantization_config` (`None` for absent or null).
pub fn from_hf_config(config: Option<&Value>) -> Result<Option<Quantization>> {
    let Some(value) = config.filter(|v| !v.is_null()) else { return Ok(None) };
    let obj = value.as_object().ok_or_else(|| unsupported(value, "must be an object"))?;
    let method = obj.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let supported = "supported: fp8, compressed-tensors (FP8), awq, gptq";
    match method {
        "fp8" => fp8_config(value, obj).map(|s| Some(Quantization::Fp8(s))),
        "compressed-tensors" => compressed_tensors(value, obj).map(|s| Some(Quantization::Fp8(s))),
        "awq" | "gptq" => int::IntScheme::from_config(method, obj)
            .map(|s| Some(Quantization::Int(s)))
            .map_err(|why| unsupported(value, why)),
        m if NOT_YET.contains(&m) => {
            Err(unsupported(value, format!("{m} checkpoints are not supported yet ({supported})")))
        }
        m => Err(unsupported(value, format!("unknown quant_method {m:?} ({supported})"))),
    }
}

/// The scheme of a checkpoint directory without `quantization_config` in its config.json that
/// carries AutoGPTQ's `quantize_config.json` or AutoAWQ's `quant_config.json` (older exports;
/// their method is the file's when they do not name one).
pub fn from_sidecar(dir: &std::path::Path) -> Result<Option<Quantization>> {
    for (file, method) in [("quantize_config.json", "gptq"), ("quant_config.json", "awq")] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| WorkerError::model_file(&path, e.to_string()))?;
        let mut value: Value =
            serde_json::from_str(&text).map_err(|e| WorkerError::model_file(&path, format!("not JSON: {e}")))?;
        if let Some(obj) = value.as_object_mut() {
            obj.entry("quant_method").or_insert_with(|| Value::String(method.into()));
        }
        return from_hf_config(Some(&value));
    }
    Ok(None)
}

/// vLLM's `fp8` serialization: per-tensor weight scales.
fn fp8_config(value: &Value, obj: &Map<String, Value>) -> Result<Fp8Scheme> {
    if obj.get("weight_block_size").is_some_and(|v| !v.is_null()) {
        return Err(unsupported(value, "block-wise FP8 scales (weight_block_size) are not supported yet"));
    }
    match obj.get("activation_scheme").and_then(Value::as_str).unwrap_or("dynamic") {
        "dynamic" | "static" => {}
        other => return Err(unsupported(value, format!("activation_scheme {other:?} is not dynamic or static"))),
    }
    Ok(Fp8Scheme { method: "fp8", weights: fp8::Granularity::Tensor, serialized: true, activations: true })
}

/// llm-compressor's `compressed-tensors` serialization of FP8 (`float-quantized` /
/// `naive-quantized` formats).
fn compressed_tensors(value: &Value, obj: &Map<String, Value>) -> Result<Fp8Scheme> {
    let bad = |why: &str| Err(unsupported(value, why.to_string()));
    if obj.get("kv_cache_scheme").is_some_and(|v| !v.is_null()) {
        return bad("kv_cache_scheme (an FP8 KV cache with checkpoint scales) is not supported yet");
    }
    let format = obj.get("format").and_then(Value::as_str).unwrap_or("float-quantized");
    if !matches!(format, "float-quantized" | "naive-quantized") {
        return bad("only the float-quantized (FP8) compressed-tensors format is supported yet");
    }
    let groups = obj.get("config_groups").and_then(Value::as_object).filter(|g| !g.is_empty());
    let Some(groups) = groups else { return bad("config_groups is missing") };
    if groups.len() != 1 {
        return bad("more than one config group (mixed schemes) is not supported");
    }
    let group = groups.values().next().and_then(Value::as_object);
    let Some(group) = group else { return bad("a config group must be an object") };
    let targets = group.get("targets").and_then(Value::as_array);
    if !targets.is_some_and(|t| t.len() == 1 && t[0].as_str() == Some("Linear")) {
        return bad("the config group must target [\"Linear\"]");
    }
    if group.get("output_activations").is_some_and(|v| !v.is_null()) {
        return bad("output activation quantization is not supported");
    }
    let weights = group.get("weights").and_then(Value::as_object);
    let Some(weights) = weights else { return bad("the config group has no weights scheme") };
    let is_fp8 = |a: &Map<String, Value>| {
        a.get("num_bits").and_then(Value::as_u64) == Some(8)
            && a.get("type").and_then(Value::as_str) == Some("float")
            && a.get("symmetric").and_then(Value::as_bool).unwrap_or(true)
    };
    if !is_fp8(weights) || weights.get("dynamic").and_then(Value::as_bool) == Some(true) {
        return bad("weights must be static symmetric 8-bit floats (FP8 E4M3)");
    }
    let granularity = match weights.get("strategy").and_then(Value::as_str) {
        Some("tensor") => fp8::Granularity::Tensor,
        Some("channel") => fp8::Granularity::Channel,
        _ => return bad("weight strategy must be tensor or channel (group and block scales are not supported yet)"),
    };
    let activations = match group.get("input_activations").filter(|v| !v.is_null()) {
        None => false,
        Some(a) => {
            let a = a.as_object().filter(|a| is_fp8(a));
            let strategy = a.and_then(|a| a.get("strategy")).and_then(Value::as_str);
            if !matches!(strategy, Some("token" | "tensor")) {
                return bad("input activations must be 8-bit floats per token or per tensor");
            }
            true
        }
    };
    Ok(Fp8Scheme { method: "compressed-tensors", weights: granularity, serialized: true, activations })
}

#[cfg(test)]
mod tests;
