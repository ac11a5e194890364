//! Per-layer scratch memory: the outputs of a decode step's kernels without an allocation each.
//!
//! candle allocates every tensor from the stream-ordered memory pool and frees it the same way,
//! so each kernel of a step comes with an allocation and a free in the stream: on the H200 these
//! cost ~1 µs of GPU time per kernel and stop the next kernel from being launched early (see
//! `launch.rs`): 5.23 vs 4.86 ms for the 8B shape's 32-layer chain with plain launches, 4.64 vs
//! 4.51 ms with dependent launches (`scripts/gpu/decode_chain_bench.cu`).
//!
//! So the model hands its kernels two regions (halves) of one buffer per element type, and
//! switches halves at each layer: layer `i` takes its outputs from half `i % 2`, which is reset
//! when the layer starts. What a layer passes on (the `down` projection added to the residual by
//! the next layer's norm) is read by layer `i + 1`, before half `i % 2` is reset again at layer
//! `i + 2`. Stream order (and, with dependent launches, each kernel's wait for the one before
//! it) keeps the GPU from reusing memory a kernel still reads. A tensor taken from a half must
//! not be used after that half was reset: the model drops every layer's tensors by then.
//! Requests that do not fit (prefill chunks) fall back to ordinary allocation.

use std::cell::Cell;

use candle_core::{DType, Device, Shape, Tensor};

use super::{alloc_tensor, gpu_error};
use crate::Result;

/// One half's buffer of one element type and how much of it is handed out.
struct Region {
    buffer: Tensor,
    used: Cell<usize>,
}

impl Region {
    fn new(device: &Device, dtype: DType, elements: usize) -> Result<Region> {
        Ok(Region { buffer: alloc_tensor(device, Shape::from(elements), dtype)?, used: Cell::new(0) })
    }

    /// The next `shape` of the buffer, 16-byte aligned, if it fits.
    fn take(&self, shape: &Shape) -> Result<Option<Tensor>> {
        let align = 16 / self.buffer.dtype().size_in_bytes();
        let start = self.used.get().next_multiple_of(align);
        let n = shape.elem_count().max(1);
        if start + n > self.buffer.elem_count() {
            return Ok(None);
        }
        self.used.set(start + n);
        let view = self.buffer.narrow(0, start, shape.elem_count()).and_then(|t| t.reshape(shape.clone()));
        view.map(Some).map_err(|e| gpu_error("a scratch view", e))
    }
}

/// Two halves of scratch memory, each with a region of the model's element type and one of f32
/// (attention's split partials).
pub struct LayerScratch {
    halves: [(Region, Region); 2],
    active: Cell<Option<usize>>,
}

impl LayerScratch {
    /// Halves of `elements` values of `dtype` and `f32_elements` f32 values each.
    pub fn new(device: &Device, dtype: DType, elements: usize, f32_elements: usize) -> Result<LayerScratch> {
        let half = || -> Result<(Region, Region)> {
            Ok((Region::new(device, dtype, elements)?, Region::new(device, DType::F32, f32_elements)?))
        };
        Ok(LayerScratch { halves: [half()?, half()?], active: Cell::new(None) })
    }

    /// Layer `layer` starts: its outputs come from half `layer % 2`, reset now.
    pub fn begin_layer(&self, layer: usize) {
        let half = layer % 2;
        self.halves[half].0.used.set(0);
        self.halves[half].1.used.set(0);
        self.active.set(Some(half));
    }

    /// The layers are done: ordinary allocation again (what was taken stays valid until the next
    /// `begin_layer` of its half).
    pub fn end_layers(&self) {
        self.active.set(None);
    }

    /// A tensor of `shape` and `dtype` from the active half, or `None` outside the layers, for
    /// another element type, or when it does not fit.
    pub fn take(&self, shape: &Shape, dtype: DType) -> Result<Option<Tensor>> {
        let Some(half) = self.active.get() else { return Ok(None) };
        let (own, f32) = &self.halves[half];
        match dtype {
            // An f32 model's own region holds its layer outputs; what does not fit there (the
            // attention partials of a captured launch, sized for the largest split) takes the
            // f32 region, as it does for a bf16 model.
            DType::F32 if own.buffer.dtype() == DType::F32 => match own.take(shape)? {
                Some(t) => Ok(Some(t)),
                None => f32.take(shape),
            },
            d if d == own.buffer.dtype() => own.take(shape),
            DType::F32 => f32.take(shape),
            _ => Ok(None),
        }
    }
}
