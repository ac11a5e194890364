//! The KV cache in device memory: per layer, one buffer for K and one for V, each
//! `[num_blocks, kv_heads, block_size, head_dim]` (the CPU's layout, see
//! [`CacheLayout`]) in the model's element type (BF16, or F32).

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::kernels::cpu::attention::CacheLayout;
use crate::kernels::cuda::gpu_error;

/// Paged K/V storage for every layer, on one device.
pub struct CudaKvStorage {
    pub layout: CacheLayout,
    pub num_blocks: usize,
    pub dtype: DType,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl CudaKvStorage {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(layout: &CacheLayout, layers: usize, dtype: DType) -> usize {
        2 * layers * layout.block_elems() * dtype.size_in_bytes()
    }

    /// Allocates `num_blocks` zeroed blocks for `layers` layers on `device`.
    pub fn new(layout: CacheLayout, layers: usize, num_blocks: usize, dtype: DType, device: &Device) -> Result<Self> {
        let elems = num_blocks * layout.block_elems();
        let zeros = || {
            Tensor::zeros(elems, dtype, device)
                .map_err(|e| gpu_error(&format!("allocating {num_blocks} KV cache blocks"), e))
        };
        let k = (0..layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        let v = (0..layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        Ok(CudaKvStorage { layout, num_blocks, dtype, k, v })
    }

    /// No blocks and no memory (before the memory plan has sized the cache).
    pub fn empty(layout: CacheLayout, dtype: DType) -> Self {
        CudaKvStorage { layout, num_blocks: 0, dtype, k: Vec::new(), v: Vec::new() }
    }

    pub fn size_bytes(&self) -> usize {
        Self::bytes_per_block(&self.layout, self.k.len(), self.dtype) * self.num_blocks
    }
}
