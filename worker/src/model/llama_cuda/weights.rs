//! Llama weights in device memory, in the element type the GPU path computes in (BF16, or F32
//! for exact comparisons), loaded from any [`TensorSource`] or drawn at random on the device.
//!
//! As on the CPU, each layer's query/key/value projections are stacked into one matrix and so are
//! the MLP's gate and up projections, so each takes one cuBLAS call. Linear weights keep the
//! Hugging Face layout `[out_features, in_features]`; the forward multiplies by their transpose
//! (cuBLAS reads it transposed, nothing is copied).

use candle_core::{DType, Device, Tensor};

use crate::kernels::cuda::gpu_error;
use crate::model::config::LlamaConfig;
use crate::model::dummy::DUMMY_WEIGHT_RANGE;
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

/// One transformer block's weights.
pub struct CudaLayer {
    pub attn_norm: Tensor,
    /// `[q_dim + 2 * kv_dim, hidden]`.
    pub qkv: Tensor,
    pub o: Tensor,
    pub ffn_norm: Tensor,
    /// `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub gate_up: Tensor,
    pub down: Tensor,
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
    /// Loads (or draws) every tensor onto `device` as `dtype`, checking names and shapes.
    pub fn load(config: &LlamaConfig, origin: &WeightOrigin<'_>, dtype: DType, device: &Device) -> Result<CudaWeights> {
        let loader = Loader { origin, dtype, device };
        let (h, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (qd, kvd) = (config.q_dim(), config.kv_dim());
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv = cat(&[
                loader.matrix(&format!("{p}.self_attn.q_proj.weight"), qd, h)?,
                loader.matrix(&format!("{p}.self_attn.k_proj.weight"), kvd, h)?,
                loader.matrix(&format!("{p}.self_attn.v_proj.weight"), kvd, h)?,
            ])?;
            let gate_up = cat(&[
                loader.matrix(&format!("{p}.mlp.gate_proj.weight"), inter, h)?,
                loader.matrix(&format!("{p}.mlp.up_proj.weight"), inter, h)?,
            ])?;
            layers.push(CudaLayer {
                attn_norm: loader.norm(&format!("{p}.input_layernorm.weight"), h)?,
                qkv,
                o: loader.matrix(&format!("{p}.self_attn.o_proj.weight"), h, qd)?,
                ffn_norm: loader.norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up,
                down: loader.matrix(&format!("{p}.mlp.down_proj.weight"), h, inter)?,
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
                [&l.attn_norm, &l.qkv, &l.o, &l.ffn_norm, &l.gate_up, &l.down].into_iter().map(bytes).sum::<usize>()
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
}

struct Loader<'a> {
    origin: &'a WeightOrigin<'a>,
    dtype: DType,
    device: &'a Device,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        match self.origin {
            WeightOrigin::Source(src) => {
                let t = src.tensor(name)?;
                t.expect_shape(&[rows, cols])?;
                self.upload(&t)
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
        t.check_len()?;
        let fail = |e| gpu_error(&format!("uploading {}", t.name), e);
        let on_device = match t.dtype {
            TensorDType::F32 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::F32, &t.shape, self.device),
            TensorDType::F16 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::F16, &t.shape, self.device),
            TensorDType::BF16 => Tensor::from_raw_buffer(t.bytes.as_slice(), DType::BF16, &t.shape, self.device),
            TensorDType::Ggml(_) => Tensor::from_vec(t.to_f32()?, t.shape.as_slice(), self.device),
            TensorDType::F8E4M3 => {
                return Err(WorkerError::tensor(&t.name, "FP8 weights need the FP8 path (quantization)"));
            }
        }
        .map_err(fail)?;
        on_device.to_dtype(self.dtype).map_err(fail)
    }
}

/// Stacks matrices row-wise on the device.
fn cat(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 0).map_err(|e| gpu_error("stacking projections", e))
}
