//! Llama weights in device memory, in the element type the GPU path computes in (BF16, or F32
//! for exact comparisons), loaded from any [`TensorSource`] or drawn at random on the device.
//!
//! As on the CPU, each layer's query/key/value projections are stacked into one matrix and so are
//! the MLP's gate and up projections, so each takes one cuBLAS call. Linear weights keep the
//! Hugging Face layout `[out_features, in_features]`; the forward multiplies by their transpose
//! (cuBLAS reads it transposed, nothing is copied).
//!
//! With FP8 quantization (`model::quant`) the four projections of each layer are
//! [`CudaLinear::Fp8`]: a stored FP8 checkpoint's codes and per-row scales are uploaded as they
//! are (a projection group with any float part is loaded as floats: an ignore list); with online
//! quantization each projection is loaded (or drawn) in bf16 and quantized on the device per
//! output row. Embeddings, norms and the output projection stay in the model's element type.

use candle_core::{DType, Device, Tensor};

use crate::kernels::cuda::fp8::Fp8Weight;
use crate::kernels::cuda::{CudaKernels, gpu_error};
use crate::model::config::LlamaConfig;
use crate::model::dummy::DUMMY_WEIGHT_RANGE;
use crate::model::quant::Quantization;
use crate::model::quant::source::{DequantizedSource, row_scales};
use crate::model::source::{RawTensor, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// Where the weights come from.
pub enum WeightOrigin<'a> {
    /// A checkpoint (safetensors, GGUF dequantized on the host, ...).
    Source(&'a dyn TensorSource),
    /// `load_format: dummy`: uniform in ±[`DUMMY_WEIGHT_RANGE`] (norms 1.0), drawn on the device
    /// by cuRAND from `seed`, so an 8B model is ready in seconds. Same distribution as the CPU's
    /// [`crate::model::DummySource`], not the same bytes.
    Random { seed: u64 },
}

/// A linear layer's weight `[out_features, in_features]`.
pub enum CudaLinear {
    /// In the model's element type.
    Dense(Tensor),
    /// FP8 E4M3 codes with a scale per output row.
    Fp8(Fp8Weight),
}

impl CudaLinear {
    /// `x · Wᵀ`.
    pub fn apply(&self, kernels: &CudaKernels, x: &Tensor) -> Result<Tensor> {
        match self {
            CudaLinear::Dense(w) => kernels.linear(x, w),
            CudaLinear::Fp8(w) => kernels.linear_fp8(x, w),
        }
    }

    /// Bytes on the device.
    pub fn size_bytes(&self) -> usize {
        match self {
            CudaLinear::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            CudaLinear::Fp8(w) => w.size_bytes(),
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self, CudaLinear::Fp8(_))
    }
}

/// One transformer block's weights.
pub struct CudaLayer {
    pub attn_norm: Tensor,
    /// `[q_dim + 2 * kv_dim, hidden]`.
    pub qkv: CudaLinear,
    pub o: CudaLinear,
    pub ffn_norm: Tensor,
    /// `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub gate_up: CudaLinear,
    pub down: CudaLinear,
}

/// All weights of a Llama model on one device.
pub struct CudaWeights {
    pub embed: Tensor,
    pub layers: Vec<CudaLayer>,
    pub final_norm: Tensor,
    /// `None` when the embeddings are tied to the output projection.
    pub lm_head: Option<Tensor>,
}

impl CudaWeights {
    /// Loads (or draws) every tensor onto `device` as `dtype`, checking names and shapes; the
    /// projections as `quantization` says (FP8 ones through `kernels`).
    pub fn load(
        config: &LlamaConfig,
        origin: &WeightOrigin<'_>,
        dtype: DType,
        kernels: &CudaKernels,
        quantization: &Quantization,
    ) -> Result<CudaWeights> {
        let device = kernels.device();
        let loader = Loader { origin, dtype, device, kernels, quantization };
        let (h, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (qd, kvd) = (config.q_dim(), config.kv_dim());
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.self_attn");
            let m = format!("model.layers.{i}.mlp");
            let qkv = loader.linear(
                &[
                    (format!("{p}.q_proj.weight"), qd),
                    (format!("{p}.k_proj.weight"), kvd),
                    (format!("{p}.v_proj.weight"), kvd),
                ],
                h,
            )?;
            let gate_up = loader
                .linear(&[(format!("{m}.gate_proj.weight"), inter), (format!("{m}.up_proj.weight"), inter)], h)?;
            layers.push(CudaLayer {
                attn_norm: loader.norm(&format!("model.layers.{i}.input_layernorm.weight"), h)?,
                qkv,
                o: loader.linear(&[(format!("{p}.o_proj.weight"), h)], qd)?,
                ffn_norm: loader.norm(&format!("model.layers.{i}.post_attention_layernorm.weight"), h)?,
                gate_up,
                down: loader.linear(&[(format!("{m}.down_proj.weight"), h)], inter)?,
            });
        }
        let embed = loader.matrix("model.embed_tokens.weight", vocab, h)?;
        let untied = match origin {
            WeightOrigin::Source(src) => src.contains("lm_head.weight"),
            WeightOrigin::Random { .. } => !config.tie_word_embeddings,
        };
        let lm_head = if untied {
            Some(loader.matrix("lm_head.weight", vocab, h)?)
        } else if config.tie_word_embeddings {
            None
        } else {
            let described = match origin {
                WeightOrigin::Source(src) => src.describe(),
                WeightOrigin::Random { .. } => "random weights".into(),
            };
            return Err(WorkerError::tensor(
                "lm_head.weight",
                format!("missing from {described} and the embeddings are not tied"),
            ));
        };
        let final_norm = loader.norm("model.norm.weight", h)?;
        Ok(CudaWeights { embed, layers, final_norm, lm_head })
    }

    /// The output projection (the embeddings when tied).
    pub fn output(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of device memory the weights take.
    pub fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                bytes(&l.attn_norm)
                    + bytes(&l.ffn_norm)
                    + [&l.qkv, &l.o, &l.gate_up, &l.down].into_iter().map(CudaLinear::size_bytes).sum::<usize>()
            })
            .sum();
        layers + bytes(&self.embed) + bytes(&self.final_norm) + self.lm_head.as_ref().map_or(0, bytes)
    }

    /// Bytes one decode step reads: every layer, the final norm and the output projection (of the
    /// embeddings only one row per token).
    pub fn streamed_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.size_bytes() - self.lm_head.as_ref().map_or(0, |_| bytes(&self.embed))
    }

    /// Whether any projection is FP8.
    pub fn has_fp8(&self) -> bool {
        self.layers.iter().any(|l| [&l.qkv, &l.o, &l.gate_up, &l.down].into_iter().any(CudaLinear::is_fp8))
    }
}

struct Loader<'a> {
    origin: &'a WeightOrigin<'a>,
    dtype: DType,
    device: &'a Device,
    kernels: &'a CudaKernels,
    quantization: &'a Quantization,
}

impl Loader<'_> {
    /// The projections `parts` (name, rows), each `cols` wide, stacked row-wise into one linear
    /// layer, FP8 or dense as the quantization and the stored tensors say.
    fn linear(&self, parts: &[(String, usize)], cols: usize) -> Result<CudaLinear> {
        let dense_from = |src: &dyn TensorSource| -> Result<CudaLinear> {
            let dense = parts
                .iter()
                .map(|(n, r)| {
                    let t = src.tensor(n)?;
                    t.expect_shape(&[*r, cols])?;
                    self.upload(&t)
                })
                .collect::<Result<Vec<_>>>()?;
            cat(&dense).map(CudaLinear::Dense)
        };
        // The floats a quantized source's parts mean.
        let dequantized = |src: &dyn TensorSource| -> Result<CudaLinear> {
            let wrapped = DequantizedSource::wrap(src, self.quantization);
            dense_from(wrapped.as_ref().map_or(src, |d| d as &dyn TensorSource))
        };
        let dense = || -> Result<CudaLinear> {
            let dense = parts.iter().map(|(n, r)| self.matrix(n, *r, cols)).collect::<Result<Vec<_>>>()?;
            cat(&dense).map(CudaLinear::Dense)
        };
        let scheme = match (self.quantization, self.origin) {
            (Quantization::Fp8(scheme), _) => scheme,
            // Packed integers (AWQ, GPTQ): no integer kernel yet, the floats they mean.
            (Quantization::Int(_), WeightOrigin::Source(src)) => return dequantized(*src),
            _ => return dense(),
        };
        if let (true, WeightOrigin::Source(src)) = (scheme.serialized, self.origin) {
            let stored = parts.iter().map(|(n, _)| src.tensor(n)).collect::<Result<Vec<_>>>()?;
            if stored.iter().all(|t| t.dtype == TensorDType::F8E4M3) {
                let weights = stored
                    .iter()
                    .zip(parts)
                    .map(|(t, (name, rows))| self.upload_fp8(*src, t, name, *rows, cols))
                    .collect::<Result<Vec<_>>>()?;
                return Fp8Weight::stack(weights).map(CudaLinear::Fp8);
            }
            if stored.iter().any(|t| t.dtype == TensorDType::F8E4M3) {
                // A group mixing FP8 and float parts: all of it as the floats it means.
                return dequantized(*src);
            }
            // No part stored in FP8 (an ignored layer): floats.
            return dense();
        }
        // Online: each part quantized on the device as it loads (its float copy freed after): a
        // checkpoint's values as f32, as the host's reference quantizes them; drawn ones in bf16.
        let weights = parts
            .iter()
            .map(|(n, r)| self.matrix_as(n, *r, cols, DType::F32).and_then(|w| self.kernels.quantize_weight_fp8(&w)))
            .collect::<Result<Vec<_>>>()?;
        Fp8Weight::stack(weights).map(CudaLinear::Fp8)
    }

    /// A stored FP8 weight's codes and its per-row scales onto the device.
    fn upload_fp8(
        &self,
        src: &dyn TensorSource,
        t: &RawTensor,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Fp8Weight> {
        t.expect_shape(&[rows, cols])?;
        t.check_len()?;
        let fail = |e| gpu_error(&format!("uploading {name}"), e);
        let codes = Tensor::from_raw_buffer(t.bytes.as_slice(), DType::U8, &t.shape, self.device).map_err(fail)?;
        let scales = Tensor::from_vec(row_scales(src, name, rows)?, rows, self.device).map_err(fail)?;
        let activations = matches!(self.quantization, Quantization::Fp8(s) if s.activations);
        self.kernels.fp8_weight(codes, scales, activations)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        self.matrix_as(name, rows, cols, self.dtype)
    }

    /// As [`Loader::matrix`], a checkpoint's tensor converted to `dtype` (drawn ones stay in the
    /// model's element type).
    fn matrix_as(&self, name: &str, rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
        match self.origin {
            WeightOrigin::Source(src) => {
                let t = src.tensor(name)?;
                t.expect_shape(&[rows, cols])?;
                self.upload_as(&t, dtype)
            }
            WeightOrigin::Random { .. } => {
                let r = DUMMY_WEIGHT_RANGE;
                Tensor::rand(-r, r, (rows, cols), self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(|e| gpu_error(&format!("drawing {name}"), e))
            }
        }
    }

    fn norm(&self, name: &str, len: usize) -> Result<Tensor> {
        match self.origin {
            WeightOrigin::Source(src) => {
                let t = src.tensor(name)?;
                t.expect_shape(&[len])?;
                self.upload(&t)
            }
            WeightOrigin::Random { .. } => {
                Tensor::ones(len, self.dtype, self.device).map_err(|e| gpu_error(&format!("filling {name}"), e))
            }
        }
    }

    /// Copies a raw tensor to the device and converts it there (GGML blocks are dequantized on
    /// the host first).
    fn upload(&self, t: &RawTensor) -> Result<Tensor> {
        self.upload_as(t, self.dtype)
    }

    fn upload_as(&self, t: &RawTensor, dtype: DType) -> Result<Tensor> {
        t.check_len()?;
        let fail = |e| gpu_error(&format!("uploading {}", t.name), e);
        let on_device = match t.dtype {
            TensorDType::F32 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::F32, &t.shape, self.device),
            TensorDType::F16 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::F16, &t.shape, self.device),
            TensorDType::BF16 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::BF16, &t.shape, self.device),
            TensorDType::Ggml(_) => Tensor::from_vec(t.to_f32()?, t.shape.as_slice(), self.device),
            TensorDType::F8E4M3 | TensorDType::I32 => {
                return Err(WorkerError::tensor(
                    &t.name,
                    format!("{:?} values outside a quantized projection", t.dtype),
                ));
            }
        }
        .map_err(fail)?;
        on_device.to_dtype(dtype).map_err(fail)
    }
}

/// Stacks matrices row-wise on the device.
fn cat(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 0).map_err(|e| gpu_error("stacking projections", e))
}
