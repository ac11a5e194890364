//! A weight source that presents a quantized model's linear weights as the f32 values they mean,
//! for paths that compute in floats (the CPU model, and through it tensor parallelism on the CPU;
//! the GPU for packed integer weights, until it has an integer kernel).
//!
//! Packed integer layers (AWQ, GPTQ: `<layer>.qweight`, no `<layer>.weight`) come back as
//! `<layer>.weight`, dequantized by `int`.
//! A stored FP8 weight (`F8_E4M3`) comes back as `weight * weight_scale` per row; with online
//! quantization (`--quantization fp8` on a float checkpoint) every linear weight comes back
//! quantized and dequantized per output channel, exactly the values a GPU holding the FP8 codes
//! and scales computes with, so the CPU is the GPU path's reference. Every other tensor passes
//! through untouched.

use super::Quantization;
use super::fp8::{self, Granularity};
use crate::model::source::{RawTensor, TensorBytes, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// The projections of a Llama layer that FP8 schemes quantize.
const LINEAR: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Whether `name` is the weight of a layer's linear projection (`model.layers.N.<proj>.weight`).
pub fn is_linear_weight(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else { return false };
    let Some((layer, rest)) = rest.split_once('.') else { return false };
    layer.parse::<usize>().is_ok() && rest.strip_suffix(".weight").is_some_and(|proj| LINEAR.contains(&proj))
}

/// One scale per row of the stored FP8 weight `weight` (`rows` rows), from its `weight_scale`
/// (one value for the tensor, or one per row).
pub fn row_scales(src: &dyn TensorSource, weight: &str, rows: usize) -> Result<Vec<f32>> {
    let name = format!("{}_scale", weight);
    let scale = src.tensor(&name)?.to_f32()?;
    match scale.len() {
        1 => Ok(vec![scale[0]; rows]),
        n if n == rows => Ok(scale),
        n => {
            Err(WorkerError::tensor(&name, format!("holds {n} scales for a weight of {rows} rows (want 1 or {rows})")))
        }
    }
}

/// `src` with quantized linear weights presented as f32 values.
pub struct DequantizedSource<'a> {
    inner: &'a dyn TensorSource,
    scheme: Quantization,
}

impl<'a> DequantizedSource<'a> {
    /// `src` as the floats it means under `quantization`: `None` when nothing is quantized.
    pub fn wrap(src: &'a dyn TensorSource, quantization: &Quantization) -> Option<DequantizedSource<'a>> {
        match quantization {
            Quantization::None => None,
            scheme => Some(DequantizedSource { inner: src, scheme: scheme.clone() }),
        }
    }
}

impl TensorSource for DequantizedSource<'_> {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        if let Quantization::Int(scheme) = &self.scheme
            && is_linear_weight(name)
            && !self.inner.contains(name)
        {
            return scheme.dequantize(self.inner, name);
        }
        let t = self.inner.tensor(name)?;
        let values = match t.dtype {
            TensorDType::F8E4M3 => {
                let rows = t.shape.first().copied().unwrap_or(1);
                let codes = t.bytes.as_slice();
                t.check_len()?;
                fp8::dequantize(codes, &row_scales(self.inner, name, rows)?)
            }
            _ if self.online_fp8() && is_linear_weight(name) && t.shape.len() == 2 => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let (codes, scales) = fp8::quantize(&t.to_f32()?, rows, cols, Granularity::Channel);
                fp8::dequantize(&codes, &scales)
            }
            _ => return Ok(t),
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(RawTensor { name: t.name, dtype: TensorDType::F32, shape: t.shape, bytes: TensorBytes::Owned(bytes) })
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
            || (is_linear_weight(name)
                && matches!(self.scheme, Quantization::Int(_))
                && self.inner.contains(&format!("{}.qweight", name.trim_end_matches(".weight"))))
    }

    fn describe(&self) -> String {
        let how = if self.online_fp8() { "quantized as loaded" } else { "dequantized" };
        format!("{} ({}, {how})", self.inner.describe(), self.scheme.method())
    }
}

impl DequantizedSource<'_> {
    /// Whether float weights are quantized to FP8 as they load (`--quantization fp8`).
    fn online_fp8(&self) -> bool {
        matches!(&self.scheme, Quantization::Fp8(s) if !s.serialized)
    }
}
