//! Launch wrappers of `ops.cu`: RMSNorm (+ residual), rotary + reshape_and_cache, SwiGLU, row
//! gather.

use candle_core::{Device, Tensor};

use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::kernels::cpu::ops::RopeTable;
use crate::{Result, WorkerError};

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per token of the rotary + cache kernel (each takes 16 bytes of a head at a time).
const ROTARY_THREADS: u32 = 128;
/// 16-byte vectors of a row each add_rms_norm thread holds; must match `NORM_VECS` in ops.cu.
const NORM_VECS: usize = 4;

/// The rotary tables on the device: `cos` and `sin` `[max_positions, half]` f32, the very
/// values of the CPU path's [`RopeTable`].
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    half: usize,
    max_positions: usize,
}

impl RopeTables {
    pub fn new(table: &RopeTable, device: &Device) -> Result<RopeTables> {
        let (half, max_positions) = (table.half(), table.max_positions());
        let upload = |v: &[f32]| {
            Tensor::from_slice(v, (max_positions, half), device).map_err(|e| gpu_error("uploading rotary tables", e))
        };
        Ok(RopeTables { cos: upload(table.cos())?, sin: upload(table.sin())?, half, max_positions })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

fn dims2(what: &str, t: &Tensor) -> Result<(usize, usize)> {
    t.dims2().map_err(|e| WorkerError::Engine(format!("cuda kernel input `{what}`: {e}")))
}

fn mismatch(what: &str, detail: String) -> WorkerError {
    WorkerError::Engine(format!("cuda kernel `{what}`: {detail}"))
}

impl CudaKernels {
    /// Adds `delta` into `x` in place when given (`x` is the residual stream, owned by the
    /// caller), then returns `x / sqrt(mean(x²) + eps) * weight` row by row. `x`, `delta`:
    /// `[rows, n]`; `weight`: `[n]`.
    pub fn add_rms_norm(&self, x: &Tensor, delta: Option<&Tensor>, weight: &Tensor, eps: f32) -> Result<Tensor> {
        self.expect("x", x)?;
        self.expect("weight", weight)?;
        let (rows, n) = dims2("x", x)?;
        if weight.dims() != [n] {
            return Err(mismatch("add_rms_norm", format!("weight {:?} for rows of {n}", weight.dims())));
        }
        let delta = match delta {
            Some(d) => {
                self.expect("delta", d)?;
                if d.dims() != x.dims() {
                    return Err(mismatch("add_rms_norm", format!("delta {:?} vs x {:?}", d.dims(), x.dims())));
                }
                device_ptr(d)?
            }
            None => 0u64,
        };
        let per_vector = 16 / self.dtype.size_in_bytes();
        let vectors = n / per_vector;
        if n % per_vector != 0 || vectors > NORM_VECS * 1024 {
            return Err(mismatch(
                "add_rms_norm",
                format!("rows of {n} are not 16-byte vectors, at most {}", NORM_VECS * 1024),
            ));
        }
        let threads = vectors.clamp(1, 1024).next_multiple_of(32) as u32;
        let out = self.alloc((rows, n))?;
        if rows > 0 {
            // SAFETY: x, delta and out hold rows * n elements, weight n, all of the kernels' type,
            // in whole 16-byte vectors (fresh allocations are aligned); each thread holds at most
            // NORM_VECS of them.
            launch!(self, &self.add_rms_norm, grid((rows as u32, 1, 1), threads);
                device_ptr(x)?, delta, device_ptr(weight)?, device_ptr(&out)?, int("n", n)?, eps)?;
        }
        Ok(out)
    }

    /// Rotary embeddings and reshape_and_cache in one launch, over every token row of the fused
    /// QKV projection `qkv` (`[tokens, (q_heads + 2 * kv_heads) * head_dim]`): query heads are
    /// rotated in place, key heads rotated into the token's cache slot and value heads copied
    /// there. `positions` and `slots` are device addresses of one u32 per row, each below the
    /// tables' `max_positions` and inside the caches (the caller checks). Caches: `[num_blocks,
    /// kv_heads, block_size, head_dim]`, flattened.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary_and_cache(
        &self,
        qkv: &Tensor,
        q_heads: usize,
        kv_heads: usize,
        positions: u64,
        slots: u64,
        tables: &RopeTables,
        k_cache: &Tensor,
        v_cache: &Tensor,
        block_size: usize,
    ) -> Result<()> {
        self.expect("qkv", qkv)?;
        self.expect("k_cache", k_cache)?;
        self.expect("v_cache", v_cache)?;
        let (tokens, width) = dims2("qkv", qkv)?;
        if 2 * tables.half != self.head_dim || (q_heads + 2 * kv_heads) * self.head_dim != width {
            return Err(mismatch(
                "rotary_and_cache",
                format!(
                    "rows of {width} for {q_heads}+2x{kv_heads} heads of {} (tables for {})",
                    self.head_dim,
                    2 * tables.half
                ),
            ));
        }
        let kv_width = kv_heads * self.head_dim;
        if k_cache.elem_count() != v_cache.elem_count() || !k_cache.elem_count().is_multiple_of(kv_width * block_size) {
            return Err(mismatch("rotary_and_cache", "caches are not whole blocks of equal size".into()));
        }
        let per_vec = 16 / self.dtype.size_in_bytes();
        if !tables.half.is_multiple_of(per_vec) || !device_ptr(qkv)?.is_multiple_of(16) {
            return Err(mismatch(
                "rotary_and_cache",
                format!("heads of {} values or rows not in whole 16-byte vectors", self.head_dim),
            ));
        }
        if tokens > 0 {
            // SAFETY: heads lie within each row, in whole 16-byte vectors (checked above);
            // positions index inside the tables and slots inside the caches (checked by the
            // caller).
            launch!(self, &self.rotary_and_cache, grid((tokens as u32, 1, 1), ROTARY_THREADS);
                device_ptr(qkv)?, int("width", width)?, positions, slots, device_ptr(&tables.cos)?,
                device_ptr(&tables.sin)?, device_ptr(k_cache)?, device_ptr(v_cache)?, int("q_heads", q_heads)?,
                int("kv_heads", kv_heads)?, int("half", tables.half)?, int("block_size", block_size)?)?;
        }
        Ok(())
    }

    /// `silu(gate) * up` for each row `[gate | up]` of `gu` (`[rows, 2 * width]`).
    pub fn silu_mul(&self, gu: &Tensor) -> Result<Tensor> {
        self.expect("gate_up", gu)?;
        let (rows, width2) = dims2("gate_up", gu)?;
        if width2 % 2 != 0 {
            return Err(mismatch("silu_mul", format!("rows of {width2} do not split into gate and up")));
        }
        let width = width2 / 2;
        if !device_ptr(gu)?.is_multiple_of(16) {
            return Err(mismatch("silu_mul", "gate_up does not start on a 16-byte boundary".into()));
        }
        let out = self.alloc((rows, width))?;
        if rows > 0 && width > 0 {
            let vectors = width.div_ceil(16 / self.dtype.size_in_bytes());
            let blocks = vectors.div_ceil(ROW_THREADS as usize) as u32;
            // SAFETY: gu holds rows * 2 * width elements, out rows * width; both start on a
            // 16-byte boundary (checked; fresh allocations are), so rows are whole vectors when
            // width is.
            launch!(self, &self.silu_mul, grid((rows as u32, blocks, 1), ROW_THREADS);
                device_ptr(gu)?, device_ptr(&out)?, int("width", width)?)?;
        }
        Ok(out)
    }

    /// Rows `ids[0..n]` of `src` (`[rows, width]`): `ids` is the device address of `n` u32 row
    /// indices, each below `rows` (the caller checks).
    pub fn gather_rows(&self, src: &Tensor, ids: u64, n: usize) -> Result<Tensor> {
        self.expect("src", src)?;
        let (_, width) = dims2("src", src)?;
        let out = self.alloc((n, width))?;
        self.gather_rows_into(src, ids, &out)?;
        Ok(out)
    }

    /// [`CudaKernels::gather_rows`] into `out` (`[n, width]`, contiguous, of the kernels' type).
    pub fn gather_rows_into(&self, src: &Tensor, ids: u64, out: &Tensor) -> Result<()> {
        self.gather_rows_from(src, 0, ids, out)
    }

    /// Rows of the ids at `ids` where `src` holds only the rows of ids `first..first + rows`
    /// (a tensor-parallel rank's vocabulary range): ids outside give rows of zeros, so the
    /// ranks' outputs summed are the whole table's rows.
    pub fn gather_rows_from(&self, src: &Tensor, first: usize, ids: u64, out: &Tensor) -> Result<()> {
        self.expect("src", src)?;
        self.expect("out", out)?;
        let ((src_rows, width), (n, out_width)) = (dims2("src", src)?, dims2("out", out)?);
        if width != out_width {
            return Err(mismatch("gather_rows", format!("rows of {width} into rows of {out_width}")));
        }
        if n > 0 {
            let first = u32::try_from(first).map_err(|_| mismatch("gather_rows", format!("first id {first}")))?;
            let src_rows = u32::try_from(src_rows).map_err(|_| mismatch("gather_rows", format!("{src_rows} rows")))?;
            // SAFETY: the kernel reads a row of src only for ids in first..first + src_rows (the
            // others are zeros); out holds n rows of the same width.
            launch!(self, &self.gather_rows, grid((n as u32, 1, 1), ROW_THREADS);
                device_ptr(src)?, ids, device_ptr(out)?, int("width", width)?, first, src_rows)?;
        }
        Ok(())
    }
}
