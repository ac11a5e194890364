//! FP8 E4M3 linear layers (issue 15): weights of one byte per value with one f32 scale per output
//! row, activations in bf16 (`fp8.cu`).
//!
//! By token rows, as the bf16 path:
//! - up to the GEMV's rows (decode): `gemv_fp8_bf16_*`, the decode GEMV core of the bf16 path
//!   (gemv.cuh, the same kernel shapes chosen by the same `Variant`) streaming the codes (half
//!   the bytes of bf16), with the row scale applied at the end;
//! - more rows on a GPU with FP8 tensor cores (sm_89+): each token row is quantized on the fly
//!   (dynamic, per token: `quantize_rows_fp8_bf16`) and cuBLASLt multiplies codes by codes with
//!   both scale vectors in its epilogue (`blas_lt::LtGemm::gemm_fp8`); where cuBLASLt has no such
//!   epilogue for the shape, it multiplies unscaled and `scale_outer_bf16` scales the product;
//! - more rows elsewhere (an A10G), or with `LUMEN_CUDA_FP8_GEMM=dequant`: the weight is
//!   dequantized to bf16 in slices of [`DEQUANT_ELEMS`] values into a buffer made once
//!   ([`CudaKernels::enable_fp8`]) and each slice multiplied by cuBLAS into its columns of the
//!   output.
//!
//! Invariants: k is a multiple of 16 (checked when a weight is made); the model's element type
//! is bf16; every output and temporary of a step comes from the layer scratch or the buffer made
//! at load, so FP8 steps capture into graphs like bf16 ones.

use candle_core::{DType, Tensor};
use cudarc::driver::CudaFunction;

use super::gemv::Variant;
use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::{Result, WorkerError};

/// Values of the bf16 buffer a weight is dequantized into, slice by slice (32 MiB).
pub const DEQUANT_ELEMS: usize = 16 << 20;

/// An FP8 linear weight on the device: `codes` `[n, k]` (E4M3 bytes), `scales` `[n]` (f32).
pub struct Fp8Weight {
    pub codes: Tensor,
    pub scales: Tensor,
    pub n: usize,
    pub k: usize,
    /// Whether products may quantize their activations (W8A8); false for weight-only schemes
    /// (W8A16), whose larger products take the dequantizing path.
    pub activations: bool,
}

impl Fp8Weight {
    /// Bytes on the device.
    pub fn size_bytes(&self) -> usize {
        self.n * self.k + self.n * 4
    }

    /// Stacks weights row-wise (q, k, v into one; gate and up into one), codes and scales alike.
    pub fn stack(parts: Vec<Fp8Weight>) -> Result<Fp8Weight> {
        let k = parts.first().map_or(0, |p| p.k);
        if parts.iter().any(|p| p.k != k) {
            return Err(WorkerError::Engine("cuda fp8: stacking weights of different widths".into()));
        }
        let n = parts.iter().map(|p| p.n).sum();
        let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0).map_err(|e| gpu_error("stacking fp8 weights", e));
        let codes = cat(parts.iter().map(|p| &p.codes).collect())?;
        let scales = cat(parts.iter().map(|p| &p.scales).collect())?;
        let activations = parts.iter().all(|p| p.activations);
        Ok(Fp8Weight { codes, scales, n, k, activations })
    }
}

/// How products of more rows than the GEMV takes are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LargeProduct {
    /// FP8 tensor cores through cuBLASLt.
    TensorCores,
    /// Weights dequantized slice by slice, bf16 cuBLAS.
    Dequantize,
}

/// The FP8 kernels of one device.
pub struct Fp8Kernels {
    quantize_rows: CudaFunction,
    quantize_rows_f32: CudaFunction,
    /// `gemv[m - 1]` multiplies m token rows; `gemv_wide` / `gemv_split` one row into many or
    /// few outputs (gemv.rs's `Variant`).
    gemv: Vec<CudaFunction>,
    gemv_wide: CudaFunction,
    gemv_split: CudaFunction,
    scale_outer: CudaFunction,
    dequantize_rows: CudaFunction,
    large: LargeProduct,
    /// The bf16 buffer of the dequantizing path, once [`CudaKernels::enable_fp8`] made it.
    dequant_buffer: Option<Tensor>,
    /// The cuBLASLt handle of the tensor-core path, likewise.
    lt: Option<super::blas_lt::LtGemm>,
}

impl Fp8Kernels {
    /// The kernels of `module`, for a GPU of compute capability `cc` (major, minor).
    pub fn load(module: &std::sync::Arc<cudarc::driver::CudaModule>, cc: (usize, usize)) -> Result<Fp8Kernels> {
        let func = |name: &str| module.load_function(name).map_err(|e| gpu_error(&format!("kernel {name}"), e));
        let tensor_cores = cc >= (8, 9);
        let large = match std::env::var("LUMEN_CUDA_FP8_GEMM").as_deref() {
            Err(_) | Ok("auto") if tensor_cores => LargeProduct::TensorCores,
            Err(_) | Ok("auto") | Ok("dequant") => LargeProduct::Dequantize,
            Ok("tensor-cores") if tensor_cores => LargeProduct::TensorCores,
            Ok(other) => {
                return Err(WorkerError::invalid(
                    "LUMEN_CUDA_FP8_GEMM",
                    format!(
                        "{other:?}: auto, dequant, or tensor-cores (compute capability 8.9 and later; this GPU is {}.{})",
                        cc.0, cc.1
                    ),
                ));
            }
        };
        Ok(Fp8Kernels {
            quantize_rows: func("quantize_rows_fp8_bf16")?,
            quantize_rows_f32: func("quantize_rows_fp8_f32")?,
            gemv: (1..=super::gemv::GEMV_MAX_ROWS)
                .map(|m| func(&format!("gemv_fp8_bf16_m{m}")))
                .collect::<Result<_>>()?,
            gemv_wide: func("gemv_fp8_bf16_m1_wide")?,
            gemv_split: func("gemv_fp8_bf16_m1_split")?,
            scale_outer: func("scale_outer_bf16")?,
            dequantize_rows: func("dequantize_rows_fp8_bf16")?,
            large,
            dequant_buffer: None,
            lt: None,
        })
    }
}

impl CudaKernels {
    /// Readies FP8 products for a model holding FP8 weights: bf16 activations, and the buffer of
    /// the dequantizing path when it is taken (always for a weight-only scheme, `!activations`).
    pub fn enable_fp8(&mut self, activations: bool) -> Result<()> {
        if self.dtype != DType::BF16 {
            return Err(WorkerError::invalid(
                "quantization",
                "FP8 weights compute with bf16 activations (dtype bfloat16)",
            ));
        }
        // Both paths take our own cuBLAS handle (the dequantizing one directly, and it writes
        // into the layer scratch like every product of a model that captures graphs).
        self.use_own_gemm()?;
        let dequantizes = self.fp8.large == LargeProduct::Dequantize || !activations;
        if dequantizes && self.fp8.dequant_buffer.is_none() {
            self.fp8.dequant_buffer = Some(super::alloc_tensor(&self.device, DEQUANT_ELEMS.into(), DType::BF16)?);
        }
        if self.fp8.large == LargeProduct::TensorCores && activations && self.fp8.lt.is_none() {
            self.fp8.lt = Some(super::blas_lt::LtGemm::new(&self.device, &self.stream, DType::BF16, false)?);
        }
        Ok(())
    }

    /// Takes the dequantizing path for products beyond the GEMV whatever the GPU (tests).
    #[cfg(test)]
    pub(crate) fn force_fp8_dequantize(&mut self) -> Result<()> {
        self.fp8.large = LargeProduct::Dequantize;
        self.enable_fp8(true)
    }

    /// Whether products beyond the GEMV take FP8 tensor cores.
    pub fn fp8_tensor_cores(&self) -> bool {
        self.fp8.large == LargeProduct::TensorCores
    }

    /// Quantizes the rows of a bf16 or f32 weight `[n, k]` to FP8 (new tensors, not scratch),
    /// for W8A8 products.
    pub fn quantize_weight_fp8(&self, w: &Tensor) -> Result<Fp8Weight> {
        let (n, k) = w.dims2().map_err(|e| WorkerError::Engine(format!("cuda fp8 weight: {e}")))?;
        if !matches!(w.dtype(), DType::BF16 | DType::F32) || !w.is_contiguous() || k % 16 != 0 {
            return Err(WorkerError::Engine(format!(
                "cuda fp8: a weight must be contiguous bf16 or f32 with a width that is a multiple of 16, not {:?} {:?}",
                w.dims(),
                w.dtype()
            )));
        }
        let codes = super::alloc_tensor(&self.device, (n, k).into(), DType::U8)?;
        let scales = super::alloc_tensor(&self.device, n.into(), DType::F32)?;
        self.quantize_rows_into(w, device_ptr(&codes)?, device_ptr(&scales)?, n, k)?;
        Ok(Fp8Weight { codes, scales, n, k, activations: true })
    }

    /// An FP8 weight from codes and per-row scales already on the device; `activations`: W8A8
    /// products allowed.
    pub fn fp8_weight(&self, codes: Tensor, scales: Tensor, activations: bool) -> Result<Fp8Weight> {
        let (n, k) = codes.dims2().map_err(|e| WorkerError::Engine(format!("cuda fp8 weight: {e}")))?;
        if codes.dtype() != DType::U8 || scales.dtype() != DType::F32 || scales.dims() != [n] || k % 16 != 0 {
            return Err(WorkerError::Engine(format!(
                "cuda fp8: codes {:?} {:?} with scales {:?} {:?} (want u8 [n, k], k a multiple of 16, and f32 [n])",
                codes.dims(),
                codes.dtype(),
                scales.dims(),
                scales.dtype()
            )));
        }
        Ok(Fp8Weight { codes, scales, n, k, activations })
    }

    /// Quantizes `rows` rows of k values of `x` (bf16, or f32) into `codes` and `scales`.
    fn quantize_rows_into(&self, x: &Tensor, codes: u64, scales: u64, rows: usize, k: usize) -> Result<()> {
        let func = if x.dtype() == DType::F32 { &self.fp8.quantize_rows_f32 } else { &self.fp8.quantize_rows };
        // SAFETY: x holds `rows` contiguous rows of k values of the kernel's input type (bf16 or
        // f32, checked by the callers); codes has rows * k bytes and scales rows f32 values, on
        // this device.
        launch!(self, func, grid((rows as u32, 1, 1), 256); device_ptr(x)?, codes, scales, int("k", k)?)
    }

    /// `x · Wᵀ` for bf16 `x` `[m, k]` and an FP8 `W`: `[m, n]` bf16.
    pub fn linear_fp8(&self, x: &Tensor, w: &Fp8Weight) -> Result<Tensor> {
        let (m, k) = x.dims2().map_err(|e| WorkerError::Engine(format!("cuda fp8 linear: {e}")))?;
        if k != w.k || x.dtype() != DType::BF16 || !x.is_contiguous() || device_ptr(x)? % 16 != 0 {
            return Err(WorkerError::Engine(format!(
                "cuda fp8 linear: x {:?} {:?} against W [{}, {}]",
                x.dims(),
                x.dtype(),
                w.n,
                w.k
            )));
        }
        let y = self.alloc((m, w.n))?;
        if m == 0 {
            return Ok(y);
        }
        if m <= self.gemv_rows {
            self.gemv_fp8_into(x, w, &y, m)?;
        } else {
            match self.fp8.large {
                LargeProduct::TensorCores if w.activations => self.gemm_fp8_into(x, w, &y, m)?,
                _ => self.dequantized_gemm_into(x, w, &y, m)?,
            }
        }
        Ok(y)
    }

    /// The GEMV for 1..=8 rows, whatever `gemv_rows` says (tests call it directly).
    pub(crate) fn gemv_fp8_into(&self, x: &Tensor, w: &Fp8Weight, y: &Tensor, m: usize) -> Result<()> {
        if !(1..=super::gemv::GEMV_MAX_ROWS).contains(&m) {
            return Err(WorkerError::Engine(format!("cuda fp8 gemv: {m} rows (1 to {})", super::gemv::GEMV_MAX_ROWS)));
        }
        let variant = Variant::of(m, w.n);
        let func = match variant {
            Variant::Wide => &self.fp8.gemv_wide,
            Variant::Split => &self.fp8.gemv_split,
            Variant::Rows(m) => &self.fp8.gemv[m - 1],
        };
        let blocks = w.n.div_ceil(variant.features_per_block()) as u32;
        // SAFETY: codes hold n rows of k bytes (k a multiple of 16, rows 16-byte aligned as the
        // allocation is), scales n f32, x m bf16 rows of k (16-byte aligned, checked), y m rows
        // of n.
        launch!(self, func, grid((blocks, 1, 1), 256);
            device_ptr(&w.codes)?, device_ptr(&w.scales)?, device_ptr(x)?, device_ptr(y)?, int("n", w.n)?, int("k", w.k)?)
    }

    /// Activations quantized per token, then an FP8 tensor-core GEMM (scaled in its epilogue or
    /// by `scale_outer_bf16`).
    fn gemm_fp8_into(&self, x: &Tensor, w: &Fp8Weight, y: &Tensor, m: usize) -> Result<()> {
        let lt = self.fp8.lt.as_ref().ok_or_else(|| WorkerError::Engine("cuda fp8: enable_fp8 first".into()))?;
        // The codes live in a bf16 scratch tensor of half as many values (the scratch has no
        // byte region); only its address is used.
        let codes = self.alloc((m, w.k.div_ceil(2)))?;
        let scales = self.alloc_of(m.into(), DType::F32)?;
        let (codes, scales) = (device_ptr(&codes)?, device_ptr(&scales)?);
        self.quantize_rows_into(x, codes, scales, m, w.k)?;
        let operands = super::blas_lt::Fp8Operands {
            x: codes,
            x_scales: scales,
            w: device_ptr(&w.codes)?,
            w_scales: device_ptr(&w.scales)?,
            y: device_ptr(y)?,
        };
        let scaled = lt.gemm_fp8(operands, (m, w.n, w.k))?;
        if !scaled {
            let blocks = ((m * w.n).div_ceil(256)).min(4 * self.num_sms) as u32;
            // SAFETY: y holds m rows of n bf16, the scales m and n f32.
            launch!(self, &self.fp8.scale_outer, grid((blocks, 1, 1), 256);
                operands.y, scales, operands.w_scales, int("m", m)?, int("n", w.n)?)?;
        }
        Ok(())
    }

    /// The weight dequantized slice by slice into the buffer, each slice multiplied by cuBLAS
    /// into its columns of `y`.
    fn dequantized_gemm_into(&self, x: &Tensor, w: &Fp8Weight, y: &Tensor, m: usize) -> Result<()> {
        let buffer = self
            .fp8
            .dequant_buffer
            .as_ref()
            .ok_or_else(|| WorkerError::Engine("cuda fp8: the dequantizing path needs enable_fp8 first".into()))?;
        let slice_rows = (DEQUANT_ELEMS / w.k).clamp(1, w.n);
        let (codes, scales, buf) = (device_ptr(&w.codes)?, device_ptr(&w.scales)?, device_ptr(buffer)?);
        let (xp, yp) = (device_ptr(x)?, device_ptr(y)?);
        for r0 in (0..w.n).step_by(slice_rows) {
            let rows = slice_rows.min(w.n - r0);
            // SAFETY: rows r0..r0+rows of the codes (k bytes each) and scales exist; the buffer
            // holds DEQUANT_ELEMS >= rows * k bf16 values.
            launch!(self, &self.fp8.dequantize_rows, grid((rows as u32, 1, 1), 256);
                codes + (r0 * w.k) as u64, scales + (r0 * 4) as u64, buf, int("k", w.k)?)?;
            self.gemm_raw((m, rows, w.k), xp, buf, yp + (r0 * 2) as u64, w.n)?;
        }
        Ok(())
    }
}
