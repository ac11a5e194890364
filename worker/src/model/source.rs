//! Where weights come from: a [`TensorSource`] hands out raw tensors by their Hugging Face name
//! (`model.layers.0.self_attn.q_proj.weight`, ...), whatever the file format behind it.
//!
//! Shapes are row-major in Hugging Face order: a linear layer's weight is `[out_features,
//! in_features]`. Sources translate their own names and layouts (GGUF's reversed dimensions and
//! permuted query/key rows) so that everything above sees one convention.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use memmap2::Mmap;

use crate::{Result, WorkerError};

/// The element type of a raw tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorDType {
    F32,
    F16,
    BF16,
    /// FP8 E4M3 codes, one byte each (their scales are separate tensors: `model::quant`).
    F8E4M3,
    /// 32-bit integers (packed quantized weights, group indices: `model::quant::int`).
    I32,
    /// A GGML block-quantized type (Q4_0, Q4_1, Q8_0, K-quants, ...), blocks along the last dim.
    Ggml(GgmlDType),
}

impl TensorDType {
    /// Bytes taken by `elems` elements of a row (must be a whole number of blocks for GGML types).
    pub fn row_bytes(self, elems: usize) -> usize {
        match self {
            TensorDType::F32 => elems * 4,
            TensorDType::F16 | TensorDType::BF16 => elems * 2,
            TensorDType::F8E4M3 => elems,
            TensorDType::I32 => elems * 4,
            TensorDType::Ggml(t) => elems / t.block_size() * t.type_size(),
        }
    }
}

/// The bytes of a tensor: borrowed from a memory-mapped file or owned.
#[derive(Clone)]
pub enum TensorBytes {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Vec<u8>),
}

impl TensorBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped { map, range } => &map[range.clone()],
            TensorBytes::Owned(v) => v,
        }
    }
}

/// One tensor as stored: element type, row-major shape (Hugging Face order) and bytes.
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    pub bytes: TensorBytes,
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawTensor({} {:?} {:?})", self.name, self.dtype, self.shape)
    }
}

impl RawTensor {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Fails unless the shape is exactly `want`.
    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(WorkerError::tensor(&self.name, format!("expected shape {want:?}, found {:?}", self.shape)));
        }
        Ok(())
    }

    /// Checks that the byte length matches dtype and shape (a truncated file fails here).
    pub fn check_len(&self) -> Result<()> {
        let last = self.shape.last().copied().unwrap_or(1);
        let rows = self.elem_count().checked_div(last).unwrap_or(0);
        if let TensorDType::Ggml(t) = self.dtype
            && last % t.block_size() != 0
        {
            return Err(WorkerError::tensor(
                &self.name,
                format!("row length {last} is not a multiple of the {t:?} block size {}", t.block_size()),
            ));
        }
        let want = rows * self.dtype.row_bytes(last);
        let have = self.bytes.as_slice().len();
        if have != want {
            return Err(WorkerError::tensor(
                &self.name,
                format!("holds {have} bytes, {:?} {:?} needs {want}", self.dtype, self.shape),
            ));
        }
        Ok(())
    }

    /// All elements converted to f32 (GGML types are dequantized; FP8 codes are decoded without
    /// their scale; I32, packed integers, is an error).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_len()?;
        let b = self.bytes.as_slice();
        Ok(match self.dtype {
            TensorDType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            TensorDType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            TensorDType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            TensorDType::F8E4M3 => b.iter().map(|&c| crate::model::quant::fp8::e4m3_to_f32(c)).collect(),
            TensorDType::I32 => {
                b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect()
            }
            TensorDType::Ggml(t) => dequantize_ggml(&self.name, t, b, self.elem_count())?,
        })
    }
}

/// Dequantizes GGML blocks through candle's reference implementation.
fn dequantize_ggml(name: &str, dtype: GgmlDType, bytes: &[u8], elems: usize) -> Result<Vec<f32>> {
    let fail = |e: candle_core::Error| {
        WorkerError::tensor(name, format!("cannot dequantize {elems} elements of {dtype:?}: {e}"))
    };
    let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![elems], &candle_core::Device::Cpu)
        .map_err(fail)?;
    qt.dequantize(&candle_core::Device::Cpu).and_then(|t| t.to_vec1::<f32>()).map_err(fail)
}

/// A set of named tensors in Hugging Face naming.
pub trait TensorSource: Send + Sync {
    /// The tensor named `name` (Hugging Face naming), or an error naming it and the source.
    fn tensor(&self, name: &str) -> Result<RawTensor>;
    /// Whether `name` is present.
    fn contains(&self, name: &str) -> bool;
    /// Where the tensors come from, for messages ("model.gguf", "dir/ (3 shards)", ...).
    fn describe(&self) -> String;
}
