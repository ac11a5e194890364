//! Llama weights in the forms the CPU kernels multiply, loaded from any [`TensorSource`].
//!
//! Per layer the query/key/value projections are stacked into one matrix (`[q; k; v]` rows) and
//! so are the MLP's gate and up projections (`[gate; up]`), so each takes one matrix
//! multiplication.

use candle_core::quantized::GgmlDType;

use super::config::LlamaConfig;
use super::source::{RawTensor, TensorDType, TensorSource};
use crate::kernels::cpu::matmul::{Matrix, WeightData};
use crate::kernels::cpu::quant::{QK, quantize_q8_0};
use crate::{Result, WorkerError};

/// How weights are stored for the CPU kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuWeightFormat {
    /// Q4_0 / Q4_1 / Q8_0 stay as they are; other GGML types become Q8_0; floats become f32
    /// (a quantized checkpoint's, FP8 / AWQ / GPTQ, become Q8_0: the engine asks for it).
    #[default]
    Auto,
    /// Everything dequantized to f32.
    F32,
    /// Everything (re)quantized to Q8_0.
    Q8_0,
}

impl std::str::FromStr for CpuWeightFormat {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CpuWeightFormat::Auto),
            "f32" => Ok(CpuWeightFormat::F32),
            "q8_0" => Ok(CpuWeightFormat::Q8_0),
            other => Err(WorkerError::invalid("cpu_weight_format", format!("`{other}` is not one of auto, f32, q8_0"))),
        }
    }
}

/// One transformer block's weights.
pub struct CpuLayer {
    pub attn_norm: Vec<f32>,
    /// `[q_dim + 2 * kv_dim, hidden]`: query, key and value projections stacked.
    pub qkv: Matrix,
    pub o: Matrix,
    pub ffn_norm: Vec<f32>,
    /// `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub gate_up: Matrix,
    pub down: Matrix,
}

/// All weights of a Llama model.
pub struct CpuWeights {
    pub embed: Matrix,
    pub layers: Vec<CpuLayer>,
    pub final_norm: Vec<f32>,
    /// `None` when the embeddings are tied to the output projection.
    pub lm_head: Option<Matrix>,
}

impl CpuWeights {
    /// Loads and converts every tensor, checking names and shapes against `config`.
    pub fn load(config: &LlamaConfig, src: &dyn TensorSource, format: CpuWeightFormat) -> Result<CpuWeights> {
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let (qd, kvd) = (config.q_dim(), config.kv_dim());
        if h % QK != 0 || inter % QK != 0 {
            return Err(WorkerError::ModelConfig(format!(
                "hidden_size {h} and intermediate_size {inter} must be multiples of {QK}"
            )));
        }
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            let t = src.tensor(name)?;
            t.expect_shape(&[rows, cols])?;
            to_matrix(&t, format)
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = src.tensor(name)?;
            t.expect_shape(&[len])?;
            t.to_f32()
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let q = matrix(&format!("{p}.self_attn.q_proj.weight"), qd, h)?;
            let k = matrix(&format!("{p}.self_attn.k_proj.weight"), kvd, h)?;
            let v = matrix(&format!("{p}.self_attn.v_proj.weight"), kvd, h)?;
            let gate = matrix(&format!("{p}.mlp.gate_proj.weight"), inter, h)?;
            let up = matrix(&format!("{p}.mlp.up_proj.weight"), inter, h)?;
            let gate_up = stack(vec![gate, up])?;
            layers.push(CpuLayer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: stack(vec![q, k, v])?,
                o: matrix(&format!("{p}.self_attn.o_proj.weight"), h, qd)?,
                ffn_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up,
                down: matrix(&format!("{p}.mlp.down_proj.weight"), h, inter)?,
            });
        }
        let embed = matrix("model.embed_tokens.weight", config.vocab_size, h)?;
        let lm_head = if src.contains("lm_head.weight") {
            Some(matrix("lm_head.weight", config.vocab_size, h)?)
        } else if config.tie_word_embeddings {
            None
        } else {
            return Err(WorkerError::tensor(
                "lm_head.weight",
                format!("missing from {} and the embeddings are not tied", src.describe()),
            ));
        };
        Ok(CpuWeights { embed, layers, final_norm: vector("model.norm.weight", h)?, lm_head })
    }

    /// The output projection (the embeddings when tied).
    pub fn output(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Total bytes of weights, and the bytes one decode step streams (everything but the embeddings,
    /// unless they are also the output projection).
    pub fn sizes(&self) -> (usize, usize) {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.size_bytes() + l.o.size_bytes() + l.gate_up.size_bytes() + l.down.size_bytes())
            .sum();
        let total = layers + self.embed.size_bytes() + self.lm_head.as_ref().map_or(0, Matrix::size_bytes);
        (total, layers + self.output().size_bytes())
    }

    /// A short description of the formats in use, e.g. `q4_1 (output q8_0)`.
    pub fn format_summary(&self) -> String {
        let body = self.layers.first().map_or("none", |l| l.qkv.format_name());
        format!("{body} (output {})", self.output().format_name())
    }
}

/// Converts a raw tensor into a kernel matrix under the chosen format policy.
pub fn to_matrix(t: &RawTensor, format: CpuWeightFormat) -> Result<Matrix> {
    let (rows, cols) = match t.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(WorkerError::tensor(&t.name, format!("expected a matrix, found shape {:?}", t.shape)));
        }
    };
    t.check_len()?;
    let native = |data: WeightData| Matrix { rows, cols, data };
    fn blocks<T: bytemuck::Pod>(t: &RawTensor) -> Vec<T> {
        bytemuck::pod_collect_to_vec(t.bytes.as_slice())
    }
    let data = match (format, t.dtype) {
        (CpuWeightFormat::Auto, TensorDType::Ggml(GgmlDType::Q4_0)) => WeightData::Q4_0(blocks(t)),
        (CpuWeightFormat::Auto, TensorDType::Ggml(GgmlDType::Q4_1)) => WeightData::Q4_1(blocks(t)),
        (CpuWeightFormat::Auto | CpuWeightFormat::Q8_0, TensorDType::Ggml(GgmlDType::Q8_0)) => {
            WeightData::Q8_0(blocks(t))
        }
        (CpuWeightFormat::Auto, TensorDType::F32 | TensorDType::F16 | TensorDType::BF16)
        | (CpuWeightFormat::F32, _) => WeightData::F32(t.to_f32()?),
        (CpuWeightFormat::Auto | CpuWeightFormat::Q8_0, _) => {
            if cols % QK != 0 {
                return Err(WorkerError::tensor(
                    &t.name,
                    format!("{cols} columns cannot be quantized in blocks of {QK}"),
                ));
            }
            WeightData::Q8_0(quantize_q8_0(&t.to_f32()?))
        }
    };
    Ok(native(data))
}

/// Stacks matrices row-wise, first bringing them to one format if they differ (f32 if any part
/// is f32, Q8_0 otherwise).
fn stack(parts: Vec<Matrix>) -> Result<Matrix> {
    if let Some(m) = Matrix::concat_rows(&parts) {
        return Ok(m);
    }
    let any_f32 = parts.iter().any(|p| matches!(p.data, WeightData::F32(_)));
    let unified: Vec<Matrix> = parts
        .iter()
        .map(|p| {
            let mut dense = vec![0f32; p.rows * p.cols];
            for (r, row) in dense.chunks_exact_mut(p.cols).enumerate() {
                p.dequantize_row(r, row);
            }
            let data = if any_f32 { WeightData::F32(dense) } else { WeightData::Q8_0(quantize_q8_0(&dense)) };
            Matrix { rows: p.rows, cols: p.cols, data }
        })
        .collect();
    Matrix::concat_rows(&unified)
        .ok_or_else(|| WorkerError::ModelConfig("projections of different widths cannot be stacked".into()))
}
