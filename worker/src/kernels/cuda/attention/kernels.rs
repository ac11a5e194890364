//! The attention kernels of one kind, loaded on a device, and their launches for a plan.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};

use super::{AttentionKind, AttentionPlan, DecodeKernel, Part, Tiles};
use crate::kernels::cuda::graph::{CapturedLaunch, last_captured_node};
use crate::kernels::cuda::launch::{Params, launch};
use crate::kernels::cuda::pack::DevicePack;
use crate::kernels::cuda::{CudaKernels, KernelImage, device_ptr, gpu_error, grid, int, kernel_image};
use crate::{Result, WorkerError};

const THREADS: u32 = 128;

/// Positions in the attention kernels' parameter list of the arguments that change from one
/// decode step to the next (besides the grid): the tiles, the sequence descriptors, the block
/// tables and the chunks each split takes.
const ARG_TILES: usize = 8;
const ARG_SEQS: usize = 9;
const ARG_TABLES: usize = 10;
const ARG_CHUNKS_PER_SPLIT: usize = 15;

/// A launch's grid and the arguments that vary with the step, for updating a captured launch
/// (see `graph.rs`).
pub(crate) struct LaunchUpdate {
    pub grid: (u32, u32, u32),
    pub changes: [(usize, u64); 4],
}

impl Part {
    /// The launch's grid: (tiles, head groups of every KV head, splits).
    fn grid(&self, plan: &AttentionPlan) -> (u32, u32, u32) {
        let groups = plan.heads / plan.kv_heads / self.heads_per_cta;
        (self.num_tiles as u32, (plan.kv_heads * groups) as u32, self.splits as u32)
    }
}

impl AttentionPlan {
    /// For a plan of decode sequences only, with its descriptors at `meta`: what a captured
    /// decode attention launch is updated with to run this plan; `None` for any other plan.
    pub(crate) fn decode_update(&self, meta: &DevicePack) -> Option<LaunchUpdate> {
        let [part] = &self.parts[..] else { return None };
        (part.tiles_kind == Tiles::Decode).then(|| LaunchUpdate {
            grid: part.grid(self),
            changes: [
                (ARG_TILES, meta.ptr(part.tiles)),
                (ARG_SEQS, meta.ptr(self.seqs)),
                (ARG_TABLES, meta.ptr(self.tables)),
                (ARG_CHUNKS_PER_SPLIT, u64::from(part.chunks_per_split as u32)),
            ],
        })
    }
}

const ATTENTION: KernelImage = kernel_image!("attention");
const ATTENTION_MMA: KernelImage = kernel_image!("attention_mma");

/// One kernel with its split merge and the dynamic shared memory a launch takes.
struct Kernel {
    attention: CudaFunction,
    combine: CudaFunction,
    shared_bytes: u32,
}

/// The kernels of one [`AttentionKind`] for one element type and head size.
pub(crate) struct AttentionKernels {
    pub kind: AttentionKind,
    decode: Kernel,
    /// `LUMEN_CUDA_DECODE_ATTENTION=auto`: `warp2`, and the unsplit CTAs from which a decode
    /// launch takes it instead of `decode`.
    decode_wide: Option<(Kernel, usize)>,
    prefill: Kernel,
    /// Tensor cores, where the device's shared memory holds them.
    prefill_tall: Option<Kernel>,
    /// CTAs of the decode kernel resident on one multiprocessor at once.
    pub decode_ctas_per_sm: usize,
}

impl AttentionKernels {
    /// Loads `kind`'s kernels for `suffix` (`bf16_d128`, ...) with `load` (an image to a module);
    /// raises the dynamic shared memory limit of those that need more than the default 48 KiB.
    /// Tensor-core kernels need `max_shared` bytes at most (the device's limit per block): when
    /// the decode and prefill kernels do not fit (an sm_86 GPU such as the A10G has 99 KiB), the
    /// CUDA-core kernels load instead.
    pub fn load(
        kind: AttentionKind,
        load: &dyn Fn(KernelImage) -> Result<Arc<CudaModule>>,
        suffix: &str,
        head_dim: usize,
        max_shared: usize,
        num_sms: usize,
    ) -> Result<AttentionKernels> {
        let fits = |tiles: Tiles| kind.shared_bytes(tiles, head_dim) <= max_shared;
        if kind == AttentionKind::TensorCore && !(fits(Tiles::Decode) && fits(Tiles::Prefill)) {
            tracing::info!(
                max_shared,
                needed = kind.shared_bytes(Tiles::Decode, head_dim),
                "the tensor-core attention kernels need more shared memory than this GPU gives a block: CUDA-core attention"
            );
            return Self::load(AttentionKind::Simt, load, suffix, head_dim, max_shared, num_sms);
        }
        // The tensor-core decode kernel's variant (the CUDA-core kernels have one).
        let decode_kernel = match kind {
            AttentionKind::TensorCore => DecodeKernel::from_env()?,
            AttentionKind::Simt => DecodeKernel::Block,
        };
        let (module, names) = match kind {
            AttentionKind::Simt => (load(ATTENTION)?, ["paged_attention_decode", "paged_attention", ""]),
            AttentionKind::TensorCore => (
                load(ATTENTION_MMA)?,
                [decode_kernel.prefix(), "paged_attention_mma_prefill", "paged_attention_mma_prefill_wide"],
            ),
        };
        let kernel_of = |decode_kernel: DecodeKernel, prefix: &str, tiles: Tiles| -> Result<Kernel> {
            let shared = match (kind, tiles) {
                (AttentionKind::TensorCore, Tiles::Decode) => decode_kernel.shared_bytes(head_dim),
                _ => kind.shared_bytes(tiles, head_dim),
            } as u32;
            let name = format!("{prefix}_{suffix}");
            let attention = module.load_function(&name).map_err(|e| gpu_error(&format!("kernel {name}"), e))?;
            if shared > 0 {
                let attribute =
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                attention
                    .set_attribute(attribute, shared as i32)
                    .map_err(|e| gpu_error(&format!("kernel {name}: {shared} bytes of shared memory"), e))?;
            }
            let combine = module
                .load_function(&format!("{name}_combine"))
                .map_err(|e| gpu_error(&format!("kernel {name}_combine"), e))?;
            Ok(Kernel { attention, combine, shared_bytes: shared })
        };
        let kernel = |prefix: &str, tiles: Tiles| kernel_of(decode_kernel, prefix, tiles);
        let resident_of = |k: &Kernel| -> Result<usize> {
            let n = k
                .attention
                .occupancy_max_active_blocks_per_multiprocessor(THREADS, k.shared_bytes as usize, None)
                .map_err(|e| gpu_error("the attention kernel's occupancy", e))?;
            Ok((n as usize).max(1))
        };
        let decode = kernel(names[0], Tiles::Decode)?;
        let resident = resident_of(&decode)?;
        let decode_wide = match decode_kernel {
            DecodeKernel::Auto => {
                let wide = DecodeKernel::Warp2;
                let k = kernel_of(wide, wide.prefix(), Tiles::Decode)?;
                let from = 2 * resident_of(&k)? * num_sms;
                Some((k, from))
            }
            _ => None,
        };
        let prefill_tall = match kind {
            AttentionKind::TensorCore if fits(Tiles::PrefillTall) => Some(kernel(names[2], Tiles::PrefillTall)?),
            _ => None,
        };
        Ok(AttentionKernels {
            kind,
            decode,
            decode_wide,
            decode_ctas_per_sm: resident,
            prefill: kernel(names[1], Tiles::Prefill)?,
            prefill_tall,
        })
    }

    /// Whether the tall prefill tiles can run here.
    pub fn has_tall_prefill(&self) -> bool {
        self.prefill_tall.is_some()
    }

    /// The kernel of a launch of `ctas` unsplit CTAs of `tiles`.
    fn kernel(&self, tiles: Tiles, ctas: usize) -> Result<&Kernel> {
        match tiles {
            Tiles::Decode => Ok(match &self.decode_wide {
                Some((wide, from)) if ctas >= *from => wide,
                _ => &self.decode,
            }),
            Tiles::Prefill => Ok(&self.prefill),
            Tiles::PrefillTall => self
                .prefill_tall
                .as_ref()
                .ok_or_else(|| WorkerError::Engine("cuda attention: tall prefill tiles are not loaded".into())),
        }
    }
}

impl CudaKernels {
    /// Attention of every query token over its sequence's cache: `q` is `[tokens, width]` with
    /// the query heads at the start of each row (the fused QKV projection works as is); the
    /// caches already hold this step's K/V. Returns `[tokens, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        plan: &AttentionPlan,
        meta: &DevicePack,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        block_size: usize,
        scale: f32,
    ) -> Result<Tensor> {
        self.expect("q", q)?;
        self.expect("k_cache", k_cache)?;
        self.expect("v_cache", v_cache)?;
        let (tokens, width) = q.dims2().map_err(|e| WorkerError::Engine(format!("cuda kernel input `q`: {e}")))?;
        let out_width = plan.heads * self.head_dim;
        if tokens != plan.num_tokens || width < out_width {
            return Err(WorkerError::Engine(format!(
                "cuda attention: q {:?} for {} tokens of {} heads",
                q.dims(),
                plan.num_tokens,
                plan.heads
            )));
        }
        if !(width * self.dtype.size_in_bytes()).is_multiple_of(16) || !device_ptr(q)?.is_multiple_of(16) {
            return Err(WorkerError::Engine("cuda attention: q rows must be 16-byte aligned".into()));
        }
        let out = self.alloc((tokens, out_width))?;
        let a = &self.attention;
        let ratio = plan.heads / plan.kv_heads;
        if plan.kind != a.kind {
            return Err(WorkerError::Engine(format!(
                "cuda attention: a {:?} plan for {:?} kernels",
                plan.kind, a.kind
            )));
        }
        let capturing = self.capturing();
        for part in &plan.parts {
            let grid_dim = part.grid(plan);
            let (groups, splits) = (grid_dim.1 as usize, part.splits);
            // A captured launch takes partials of the largest size a split can need (at most
            // `split_ctas` CTAs split), so the scratch after them does not move with the split.
            let partial_rows = match capturing {
                true => self.split_ctas * part.shape.rows,
                false => part.num_tiles * groups * splits * part.shape.rows,
            };
            let (part_acc, part_ml) = if splits > 1 || capturing {
                let acc = self.alloc_of((partial_rows * self.head_dim,).into(), DType::F32)?;
                let ml = self.alloc_of((partial_rows * 2,).into(), DType::F32)?;
                (Some(acc), Some(ml))
            } else {
                (None, None)
            };
            let acc_ptr = part_acc.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
            let ml_ptr = part_ml.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
            // The last split merges in the attention launch itself when there is a zeroed
            // counter for every (tile, head group); otherwise a second launch merges. Launches
            // run in stream order, so the parts share the counters.
            let merge_in_place = splits > 1 && self.merge_splits && part.num_tiles * groups <= self.split_ctas;
            let counters = if merge_in_place || capturing { device_ptr(&self.split_counters)? } else { 0 };
            let kernel = a.kernel(part.tiles_kind, part.num_tiles * groups)?;
            let (attention, combine) = (&kernel.attention, &kernel.combine);
            let cfg = LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: kernel.shared_bytes };
            let mut params = Params::default();
            for arg in [device_ptr(&out)?, acc_ptr, ml_ptr, device_ptr(q)?] {
                params.push(arg);
            }
            params.push(int("q_stride", width)?);
            params.push(int("out_stride", out_width)?);
            for arg in [device_ptr(k_cache)?, device_ptr(v_cache)?, meta.ptr(part.tiles), meta.ptr(plan.seqs)] {
                params.push(arg);
            }
            params.push(meta.ptr(plan.tables));
            for arg in [plan.kv_heads, ratio, part.heads_per_cta, block_size, part.chunks_per_split] {
                params.push(int("attention size", arg)?);
            }
            params.push(scale);
            params.push(counters);
            // SAFETY: the descriptors in `meta` were built by `plan` for these sequences (the
            // caller checked block tables and contexts against the cache); q/out rows are as
            // checked above; partial buffers hold every (tile, group, split, row) slot; the
            // kernel's dynamic shared memory limit was raised to `shared_bytes` at load; the
            // parameters are in the kernel's order (ARG_* below name some of them).
            unsafe { launch(&self.stream, attention, cfg, &mut params, self.dependent_launch.get())? };
            if capturing {
                if part.tiles_kind != Tiles::Decode || (splits > 1 && !merge_in_place) {
                    return Err(WorkerError::Engine(
                        "cuda graph: only decode attention merged in place is captured".into(),
                    ));
                }
                let node = last_captured_node(&self.stream)?;
                let block = cfg.block_dim;
                self.record_capture(CapturedLaunch::new(
                    node,
                    attention.cu_function(),
                    block,
                    cfg.shared_mem_bytes,
                    params,
                ));
            }
            if splits > 1 && !merge_in_place {
                // SAFETY: as above; the partials were all written by the launch before.
                launch!(self, combine, grid((grid_dim.0, grid_dim.1, 1), THREADS);
                    device_ptr(&out)?, acc_ptr, ml_ptr, int("out_stride", out_width)?, meta.ptr(part.tiles),
                    meta.ptr(plan.seqs), int("ratio", ratio)?, int("heads_per_cta", part.heads_per_cta)?,
                    int("splits", splits)?)?;
            }
        }
        Ok(out)
    }
}
