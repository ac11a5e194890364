//! The CPU KV cache: per layer, one f16 buffer for K and one for V, each
//! `[num_blocks, kv_heads, block_size, head_dim]` (see [`CacheLayout`]).

use half::f16;

use crate::kernels::cpu::attention::CacheLayout;

/// Paged K/V storage for every layer.
pub struct CpuKvStorage {
    pub layout: CacheLayout,
    pub num_blocks: usize,
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
}

impl CpuKvStorage {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(layout: &CacheLayout, layers: usize) -> usize {
        2 * layers * layout.block_elems() * std::mem::size_of::<f16>()
    }

    /// Allocates `num_blocks` blocks for `layers` layers (zero-filled).
    pub fn new(layout: CacheLayout, layers: usize, num_blocks: usize) -> CpuKvStorage {
        let elems = num_blocks * layout.block_elems();
        CpuKvStorage {
            layout,
            num_blocks,
            k: (0..layers).map(|_| vec![f16::ZERO; elems]).collect(),
            v: (0..layers).map(|_| vec![f16::ZERO; elems]).collect(),
        }
    }

    pub fn size_bytes(&self) -> usize {
        Self::bytes_per_block(&self.layout, self.k.len()) * self.num_blocks
    }
}
