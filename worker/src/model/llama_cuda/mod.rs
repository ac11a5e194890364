//! The Llama forward pass on an NVIDIA GPU (the `cuda` feature), behind the same [`Model`]
//! trait as the CPU path: the same packed batch, block tables and slot mapping, the same cache
//! layout, the same rotary tables.
//!
//! Per layer: fused RMSNorm (+ the previous residual add) -> one matmul for QKV -> rotary fused
//! with reshape_and_cache -> paged attention -> O matmul -> fused residual add + RMSNorm -> one
//! matmul for gate and up -> SwiGLU -> down matmul. Matmuls of up to 8 token rows (decode) are
//! our GEMV, larger ones candle's cuBLAS (f32 accumulation either way); everything else is our
//! kernels (`kernels::cuda`). The step's small arrays (and the sampler's row plans) go to the
//! device in one copy. Sampling rows are reduced on the device (`forward_reduced`, see
//! `sampling::reduce`: the argmax for greedy rows, the k best for top-k rows, after the
//! sampler's penalties, bias and suppression), so a step copies back one small buffer, plus the
//! full f32 rows of only those sequences the host must sample itself (logprobs, sampling over
//! the whole vocabulary); those copies are the step's only synchronisation. A pooling step's
//! `hidden_rows` are gathered, finished (last residual add, final RMSNorm) and converted on the
//! device, and only those rows are copied back.
//!
//! Start-up (`CudaLlama::load`): device and kernel modules, weights straight into device memory,
//! the rotary tables, a profiling forward at the largest batch the scheduler can form (the
//! activation peak), the memory plan, the KV cache, a warm-up step; each phase's time is logged.

mod graphs;
pub mod memory;
mod rank;
mod readback;
mod step;
#[cfg(test)]
mod tests;
pub mod timing;
pub mod weights;

pub use self::rank::RankPart;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use self::memory::{MemoryPlan, MemoryPool, device_memory};
use self::step::Meanwhile;
use self::timing::{OpTimer, StepTiming};
use self::weights::{CudaWeights, WeightOrigin};
use super::Model;
use super::batch::ForwardBatch;
use super::config::LlamaConfig;
use crate::kernels::cpu::attention::CacheLayout;
use crate::kernels::cuda::attention::AttentionPlan;
use crate::kernels::cuda::graph::{PAD_SLOT, ladder_top};
use crate::kernels::cuda::ops::RopeTables;
use crate::kernels::cuda::pack::{DevicePack, HostPack};
use crate::kernels::cuda::sample::{pack_masks, pack_plans};
use crate::kernels::cuda::scratch::LayerScratch;
use crate::kernels::cuda::{CudaKernels, gpu_error};
use crate::kv_cache::cuda_storage::CudaKvStorage;
use crate::model::quant::Quantization;
use crate::sampling::reduce::{ReducedRows, Reduction, RowPlan};
use crate::tp::source::ShardedSource;
use crate::{Result, WorkerError};

/// Options for building a GPU model.
#[derive(Clone, Debug)]
pub struct CudaModelOptions {
    /// Which GPU (`cuda:N`).
    pub ordinal: usize,
    /// Element type of weights, activations and the KV cache (BF16, or F32).
    pub dtype: DType,
    pub block_size: usize,
    /// Longest sequence (sizes the rotary tables; the KV cache must hold one).
    pub max_model_len: usize,
    /// The scheduler's limits: the profiling forward runs the largest batch they allow.
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Fraction of the device's memory to use.
    pub gpu_memory_utilization: f64,
    /// Plan as if the device had at most this many bytes (`gpu_memory_limit`).
    pub gpu_memory_limit: Option<usize>,
    /// Served for pooling: the profiling forward also reads every row's hidden state (mean
    /// pooling's worst case), so the activation peak covers it.
    pub pooling: bool,
    /// Never replay CUDA graphs (vLLM's `enforce_eager`): every step launches its kernels.
    pub enforce_eager: bool,
    /// The projections' weights: floats, or FP8 (see `model::quant`, `kernels::cuda::fp8`).
    pub quantization: Quantization,
    /// Speculative tokens a sequence may carry in a step (`num_speculative_tokens`, 0: off):
    /// each adds a logits row, so the profiling forward asks for that many more per sequence.
    pub draft_tokens: usize,
    /// How the KV cache is sized.
    pub kv: KvSizing,
}

/// How a model's KV cache is sized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvSizing {
    /// What `gpu_memory_utilization` leaves (see `memory`).
    #[default]
    Budget,
    /// The same, keeping room for a draft model loaded next on this GPU: its weights
    /// (`weight_bytes`), an activation peak as large as this model's (a smaller model's forward
    /// over the same rows and vocabulary takes no more), its CUDA graphs, and `bytes_per_block`
    /// for each of as many cache blocks as this model gets.
    BudgetWithDraft { weight_bytes: usize, bytes_per_block: usize },
    /// Exactly this many blocks: a draft model's, as many as its target's, in the room the
    /// target kept.
    Blocks(usize),
}

/// A Llama model with its KV cache, on one GPU.
pub struct CudaLlama {
    config: LlamaConfig,
    kernels: CudaKernels,
    weights: CudaWeights,
    rope: RopeTables,
    cache: CudaKvStorage,
    pack: HostPack,
    /// The step's structured-output masks (uploaded after the layers are queued).
    mask_pack: HostPack,
    /// `forward`'s rows (every row in full).
    full: ReducedRows,
    /// The final-norm hidden states of the last step's `hidden_rows` (pooling), f32.
    hidden: Vec<f32>,
    timing: StepTiming,
    prefill_timing: StepTiming,
    ops: OpTimer,
    /// The decode graphs, once captured (see `graphs`).
    graphs: Option<graphs::DecodeGraphs>,
    /// Run every step eagerly even with graphs captured (tests compare the two).
    eager: bool,
    /// This model's part in a tensor-parallel one (`None`: the whole model).
    rank: Option<RankPart>,
}

impl CudaLlama {
    /// Loads the weights onto the GPU, sizes and allocates the KV cache, and warms up.
    pub fn load(config: LlamaConfig, origin: &WeightOrigin<'_>, opts: &CudaModelOptions) -> Result<CudaLlama> {
        Self::load_part(config, origin, opts, None)
    }

    /// [`CudaLlama::load`] for one rank of a tensor-parallel model (`config` is the whole
    /// model's): its shard of the weights, its KV heads' cache with as many blocks as every
    /// other rank's. Every rank loads at once, each on a thread of its own (the start-up's
    /// forwards meet in collectives).
    pub fn load_rank(
        config: LlamaConfig,
        origin: &WeightOrigin<'_>,
        opts: &CudaModelOptions,
        part: RankPart,
    ) -> Result<CudaLlama> {
        let shard = part.plan.shard_config(&config);
        match origin {
            WeightOrigin::Source(src) => {
                let sharded = ShardedSource::new(*src, part.plan.clone());
                Self::load_part(shard, &WeightOrigin::Source(&sharded), opts, Some(part))
            }
            WeightOrigin::Random { .. } => Self::load_part(shard, origin, opts, Some(part)),
        }
    }

    fn load_part(
        config: LlamaConfig,
        origin: &WeightOrigin<'_>,
        opts: &CudaModelOptions,
        rank: Option<RankPart>,
    ) -> Result<CudaLlama> {
        let started = Instant::now();
        let phase = Instant::now();
        let device = Device::new_cuda_with_stream(opts.ordinal)
            .map_err(|e| gpu_error(&format!("opening cuda:{}", opts.ordinal), e))?;
        let cdev = device.as_cuda_device().map_err(|e| gpu_error("not a CUDA device", e))?;
        // SAFETY: the model uses one stream for everything (kernels, cuBLAS, copies), so
        // cross-stream event tracking would only add an event record per tensor use.
        unsafe { cdev.disable_event_tracking() };
        if let WeightOrigin::Random { seed } = origin {
            device.set_seed(*seed).map_err(|e| gpu_error("seeding the device RNG", e))?;
        }
        let mut kernels = CudaKernels::load(&device, opts.dtype, config.head_dim)?;
        kernels.set_scratch(layer_scratch(&config, opts, &device)?);
        if let Quantization::Fp8(scheme) = &opts.quantization {
            kernels.enable_fp8(scheme.activations)?;
        }
        let stream = kernels.stream().clone();
        let pool = MemoryPool::of(&stream)?;
        let init_s = phase.elapsed().as_secs_f32();

        let phase = Instant::now();
        let weights = CudaWeights::load(&config, origin, opts.dtype, &kernels, &opts.quantization)?;
        let rope = RopeTables::new(&config.rope_table(opts.max_model_len), &device)?;
        synchronize(&device)?;
        let weights_s = phase.elapsed().as_secs_f32();

        let layout = CacheLayout {
            block_size: opts.block_size,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let mut model = CudaLlama {
            cache: CudaKvStorage::empty(layout, opts.dtype),
            config,
            kernels,
            weights,
            rope,
            pack: HostPack::default(),
            mask_pack: HostPack::default(),
            full: ReducedRows::default(),
            hidden: Vec::new(),
            timing: StepTiming::decode(),
            prefill_timing: StepTiming::prefill(),
            ops: OpTimer::from_env(),
            graphs: None,
            eager: false,
            rank,
        };
        // Staged collectives (ranks sharing a GPU) wait on the host: no graph can hold them.
        let use_graphs = !opts.enforce_eager
            && graphs::graphs_allowed(model.kernels.merge_splits, model.ops.enabled())
            && model.rank.as_ref().is_none_or(|r| r.comm.capturable());
        if use_graphs {
            model.kernels.use_own_gemm()?;
        }

        let phase = Instant::now();
        let activation_peak = model.measure_activation_peak(opts, &pool)?;
        let profile_s = phase.elapsed().as_secs_f32();

        let phase = Instant::now();
        let graph_memory = if use_graphs { graphs::GRAPH_MEMORY } else { 0 };
        let mut num_blocks = match opts.kv {
            KvSizing::Blocks(n) => n,
            _ => model.plan_kv_cache(opts, activation_peak, graph_memory)?,
        };
        if let Some(rank) = &model.rank {
            num_blocks = rank.agree_blocks(num_blocks)?;
        }
        model.cache = CudaKvStorage::new(layout, model.config.num_hidden_layers, num_blocks, opts.dtype, &device)?;
        pool.keep_freed_memory()?;
        synchronize(&device)?;
        let kv_s = phase.elapsed().as_secs_f32();

        let phase = Instant::now();
        model.warm_up()?;
        let warmup_s = phase.elapsed().as_secs_f32();

        let phase = Instant::now();
        if use_graphs && let Err(e) = model.capture_graphs(scratch_rows(opts)) {
            // Eager steps give the same results: a device where capturing fails still serves.
            tracing::warn!(error = %e, "capturing CUDA graphs failed: every step runs eagerly");
            model.graphs = None;
        }
        // A split model's ranks replay graphs together or not at all (a replayed step's
        // collectives carry the padded rows, an eager one's the batch's).
        if let Some(rank) = &model.rank
            && !rank.all(model.graphs.is_some())?
        {
            model.graphs = None;
        }
        let graphs_s = phase.elapsed().as_secs_f32();

        tracing::info!(
            device = %model.describe(),
            weight_mib = model.weights.size_bytes() >> 20,
            per_token_mib = model.weights.streamed_bytes() >> 20,
            kv_cache_mib = model.cache.size_bytes() >> 20,
            kv_blocks = num_blocks,
            init_s,
            weights_s,
            profile_s,
            kv_s,
            warmup_s,
            graphs_s,
            graph_sizes = model.graph_sizes().len(),
            total_s = started.elapsed().as_secs_f32(),
            "loaded model on the GPU"
        );
        Ok(model)
    }

    /// Runs the largest batch the scheduler can form, over a scratch cache just big enough for
    /// it, and returns the activation memory it took at its peak.
    fn measure_activation_peak(&mut self, opts: &CudaModelOptions, pool: &MemoryPool) -> Result<usize> {
        let (device, layout, layers) =
            (self.kernels.device().clone(), self.cache.layout, self.config.num_hidden_layers);
        let profile = profiling_batch(opts);
        let scratch_blocks = profile.seqs.iter().map(|s| s.block_table.len()).sum();
        self.cache = CudaKvStorage::new(layout, layers, scratch_blocks, opts.dtype, &device)?;
        synchronize(&device)?;
        let before = pool.used()?;
        pool.reset_peak()?;
        self.forward(&profile)?;
        synchronize(&device)?;
        let peak = pool.peak()?.saturating_sub(before) as usize;
        self.cache = CudaKvStorage::empty(layout, opts.dtype);
        synchronize(&device)?;
        pool.trim()?;
        Ok(peak)
    }

    /// KV cache blocks from what `gpu_memory_utilization` leaves after the weights, everything
    /// else in use and the activation peak; fails, naming the knobs, when one `max_model_len`
    /// sequence cannot fit.
    fn plan_kv_cache(&self, opts: &CudaModelOptions, activation_peak: usize, graph_memory: usize) -> Result<usize> {
        let (free, total) = device_memory(self.kernels.stream())?;
        let weights = self.weights.size_bytes();
        let plan = MemoryPlan::new(
            MemoryPlan::total(total, opts.gpu_memory_limit),
            total - free,
            opts.gpu_memory_utilization,
            weights,
            activation_peak,
        )?
        .with_graphs(graph_memory);
        let mut per_block =
            CudaKvStorage::bytes_per_block(&self.cache.layout, self.config.num_hidden_layers, opts.dtype);
        let plan = match opts.kv {
            KvSizing::BudgetWithDraft { weight_bytes, bytes_per_block } => {
                per_block += bytes_per_block;
                plan.with_draft(weight_bytes + activation_peak + graph_memory)
            }
            _ => plan,
        };
        let num_blocks = plan.kv_cache / per_block;
        tracing::info!(plan = %plan.describe(), num_blocks, tokens = num_blocks * opts.block_size, "GPU memory plan");
        if num_blocks * opts.block_size < opts.max_model_len {
            return Err(WorkerError::invalid(
                "gpu_memory_utilization",
                format!(
                    "the KV cache gets {:.2} GiB ({}), {} tokens, fewer than max_model_len {}: raise --gpu-memory-utilization or lower --max-model-len (each token takes {} bytes)",
                    plan.kv_cache as f64 / (1u64 << 30) as f64,
                    plan.describe(),
                    num_blocks * opts.block_size,
                    opts.max_model_len,
                    per_block / opts.block_size
                ),
            ));
        }
        Ok(num_blocks)
    }

    /// A short prefill and a decode step (reduced on the device), so the first request meets
    /// loaded modules and tuned cuBLAS handles; their timings are not kept.
    fn warm_up(&mut self) -> Result<()> {
        let block_size = self.cache.layout.block_size;
        let mut prefill = ForwardBatch::default();
        prefill.push_seq(&[1, 2, 3], 0, &[0], block_size, true);
        self.forward(&prefill)?;
        let mut decode = ForwardBatch::default();
        decode.push_seq(&[4], 3, &[0], block_size, true);
        let greedy = [RowPlan { reduction: Reduction::Argmax, edits: Vec::new(), mask: None }];
        self.forward_reduced(&decode, &greedy, &mut ReducedRows::default())?;
        self.timing = StepTiming::decode();
        self.prefill_timing = StepTiming::prefill();
        Ok(())
    }

    /// Runs the layers and returns the logits rows on the device (`[rows, vocab]`, f32), or
    /// `None` when no row wants logits (prompt chunks that do not end their prompt). With
    /// `plans` (one per logits row), the rows are also edited and reduced on the device and the
    /// reduction's output (`kernels::cuda::sample`) comes second. The final-norm hidden states
    /// of `batch.hidden_rows` (pooling) are gathered on the device and copied into
    /// `self.hidden`: only those rows leave the GPU.
    fn run(
        &mut self,
        batch: &ForwardBatch,
        plans: &[RowPlan],
        meanwhile: &mut Meanwhile<'_>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let c = &self.config;
        let k = &self.kernels;
        let (m, heads, kv_heads) = (batch.num_tokens(), c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps;

        // A decode step that a captured graph replays is padded to the graph's size: padding
        // rows read token 0 at position 0 and write no cache slot (see kernels::cuda::graph).
        let graph_rows = self.graph_rows(batch);
        let pad = graph_rows.map_or(0, |rows| rows - m);
        self.pack.clear();
        let ids = self.pack.push(batch.token_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        let positions = self.pack.push(batch.positions.iter().copied().chain(std::iter::repeat_n(0, pad)));
        let slots = self.pack.push(batch.slot_mapping.iter().copied().chain(std::iter::repeat_n(PAD_SLOT, pad)));
        let rows = self.pack.push(batch.logits_rows.iter().map(|&r| r as u32));
        let hidden_rows = self.pack.push(batch.hidden_rows.iter().map(|&r| r as u32));
        let attention = AttentionPlan::new(&mut self.pack, &batch.seqs, heads, kv_heads, k.attention_setup())?;
        let packed_plans = (!plans.is_empty()).then(|| pack_plans(&mut self.pack, plans));
        let meta = self.pack.upload(k.device())?;

        k.begin_step(m);
        // Ordinary allocation until the layers start (also after a step that failed mid-layer),
        // and after a replay, whose layers used the scratch behind the host's back.
        if let Some(s) = k.scratch() {
            s.end_layers();
        }
        let (x, pending) = match graph_rows {
            Some(rows) => self.replay(rows, &attention, &meta, meta.ptr(ids))?,
            None => {
                self.ops.mark(self.kernels.stream(), "start")?;
                let x = self.kernels.alloc((m, self.config.hidden_size))?;
                self.embed_into(meta.ptr(ids), &x)?;
                self.ops.mark(self.kernels.stream(), "embed")?;
                let pending = self.layers(&x, meta.ptr(positions), meta.ptr(slots), &attention, &meta)?;
                (x, pending)
            }
        };
        let (k, w, stream) = (&self.kernels, &self.weights, self.kernels.stream());
        let vocab = self.vocab_size();
        let ops = &mut self.ops;
        // The device has the layers to run: the host's work for the engine goes here.
        meanwhile.call();
        // The last residual add and the final norm only matter for the rows that are read.
        let final_norm = |rows: u64, count: usize| -> Result<Tensor> {
            let last = k.gather_rows(&x, rows, count)?;
            let last_delta = match &pending {
                Some(d) => Some(k.gather_rows(d, rows, count)?),
                None => None,
            };
            k.add_rms_norm(&last, last_delta.as_ref(), &w.final_norm, eps)
        };
        self.hidden.clear();
        if !batch.hidden_rows.is_empty() {
            let normed = final_norm(meta.ptr(hidden_rows), batch.hidden_rows.len())?;
            self.hidden = normed
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| gpu_error("reading hidden states", e))?;
            ops.mark(stream, "pool")?;
        }
        if batch.logits_rows.is_empty() {
            return Ok(None);
        }
        let normed = final_norm(meta.ptr(rows), batch.logits_rows.len())?;
        let logits = k.linear(&normed, w.output())?;
        let logits = match &self.rank {
            Some(rank) => {
                let all = rank.gather_logits(k, &logits)?;
                if !rank.reads_outputs() {
                    // Only rank 0 reads the logits back: the others' part ends with the gather.
                    return Ok(Some((all, None)));
                }
                all
            }
            None => logits,
        };
        let logits = logits.to_dtype(DType::F32).map_err(|e| gpu_error("logits to f32", e))?;
        ops.mark(stream, "logits")?;
        let reduced = match packed_plans {
            Some(p) => {
                // Structured-output masks were computed on the host while the layers ran: they
                // are waited for, and uploaded, only now.
                let masks = match pack_masks(&mut self.mask_pack, plans, vocab) {
                    Some(section) => Some((self.mask_pack.upload(k.device())?, section)),
                    None => None,
                };
                let mask_ptr = masks.as_ref().map_or(0, |(pack, section)| pack.ptr(*section));
                Some(k.reduce_rows(&logits, meta.ptr(p.desc()), meta.ptr(p.edits()), mask_ptr)?)
            }
            None => None,
        };
        ops.mark(stream, "sample")?;
        Ok(Some((logits, reduced)))
    }

    /// The layers over the residual stream `x` (`[rows, hidden]`, updated in place but for the
    /// last layer's `down` projection, which is returned; `None` without layers), with the
    /// rows' positions and cache slots at the device addresses `positions` and `slots`.
    fn layers(
        &mut self,
        x: &Tensor,
        positions: u64,
        slots: u64,
        attention: &AttentionPlan,
        meta: &DevicePack,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        let (k, w, ops, rank) = (&self.kernels, &self.weights, &mut self.ops, self.rank.as_ref());
        let (heads, kv_heads, eps) = (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let block_size = self.cache.layout.block_size;
        let (stream, scratch) = (k.stream(), k.scratch());
        let mut pending: Option<Tensor> = None;
        for (li, layer) in w.layers.iter().enumerate() {
            if let Some(s) = scratch {
                s.begin_layer(li);
            }
            let xn = k.add_rms_norm(x, pending.as_ref(), &layer.attn_norm, eps)?;
            ops.mark(stream, "norm")?;
            let qkv = layer.qkv.apply(k, &xn)?;
            ops.mark(stream, "qkv")?;
            let (k_cache, v_cache) = (&self.cache.k[li], &self.cache.v[li]);
            k.rotary_and_cache(&qkv, heads, kv_heads, positions, slots, &self.rope, k_cache, v_cache, block_size)?;
            ops.mark(stream, "rotary_cache")?;
            let attn = k.paged_attention(attention, meta, &qkv, k_cache, v_cache, block_size, scale)?;
            ops.mark(stream, "attention")?;
            let o = layer.o.apply(k, &attn)?;
            if let Some(rank) = rank {
                rank.reduce(&o)?;
            }
            ops.mark(stream, "o")?;
            let xn = k.add_rms_norm(x, Some(&o), &layer.ffn_norm, eps)?;
            ops.mark(stream, "norm")?;
            let gate_up = layer.gate_up.apply(k, &xn)?;
            ops.mark(stream, "gate_up")?;
            let act = k.silu_mul(&gate_up)?;
            ops.mark(stream, "silu")?;
            let down = layer.down.apply(k, &act)?;
            if let Some(rank) = rank {
                rank.reduce(&down)?;
            }
            pending = Some(down);
            ops.mark(stream, "down")?;
        }
        if let Some(s) = scratch {
            s.end_layers();
        }
        Ok(pending)
    }
}

/// Most token rows whose layer outputs come from the scratch (larger steps allocate).
const SCRATCH_ROWS: usize = 256;
/// f32 values per scratch half, for attention's split partials.
const SCRATCH_F32: usize = 2 << 20;

/// Scratch for the outputs of one layer of up to `SCRATCH_ROWS` token rows (at most
/// `max_num_seqs`): the two norms, qkv, attention, o, gate/up, SwiGLU and down, each 16-byte
/// aligned.
fn layer_scratch(c: &LlamaConfig, opts: &CudaModelOptions, device: &Device) -> Result<LayerScratch> {
    let (h, d) = (c.hidden_size, c.head_dim);
    let per_row = 4 * h
        + c.num_attention_heads * d
        + (c.num_attention_heads + 2 * c.num_key_value_heads) * d
        + 3 * c.intermediate_size;
    // FP8 products of more rows than the GEMV takes quantize their input rows first: codes (in
    // bf16 units, two per value) and one f32 scale per row, for each of the four products.
    let (fp8_per_row, fp8_f32_per_row) = match opts.quantization {
        Quantization::Fp8(_) => ((2 * h + c.num_attention_heads * d + c.intermediate_size).div_ceil(2) + 4 * 8, 4),
        Quantization::None | Quantization::Int(_) => (0, 0),
    };
    let rows = scratch_rows(opts);
    LayerScratch::new(
        device,
        opts.dtype,
        rows * (per_row + fp8_per_row) + 8 * 16,
        SCRATCH_F32 + rows * fp8_f32_per_row + 4 * 4,
    )
}

/// Token rows the layer scratch holds, and so the largest decode graph: the scheduler's most
/// sequences, padded up to the next size of the graphs' ladder, at most `SCRATCH_ROWS`.
fn scratch_rows(opts: &CudaModelOptions) -> usize {
    ladder_top(opts.max_num_seqs.clamp(1, SCRATCH_ROWS)).min(SCRATCH_ROWS)
}

/// Waits for everything queued on the device.
fn synchronize(device: &Device) -> Result<()> {
    device.synchronize().map_err(|e| gpu_error("synchronizing", e))
}

/// The largest step the scheduler can form: `max_num_batched_tokens` tokens over up to
/// `max_num_seqs` fresh sequences, each wanting logits (as many rows as a drafted sequence
/// does), each within `max_model_len` (and, for a pooling model, every row's hidden state).
fn profiling_batch(opts: &CudaModelOptions) -> ForwardBatch {
    let tokens = opts.max_num_batched_tokens.max(1);
    let seqs = opts.max_num_seqs.clamp(1, tokens).max(tokens.div_ceil(opts.max_model_len.max(1)));
    let mut batch = ForwardBatch::default();
    let mut next_block = 0u32;
    let mut left = tokens;
    for i in 0..seqs {
        let len = (left / (seqs - i)).clamp(1, opts.max_model_len.max(1));
        left = left.saturating_sub(len);
        let blocks = len.div_ceil(opts.block_size) as u32;
        let table: Vec<u32> = (next_block..next_block + blocks).collect();
        next_block += blocks;
        let ids: Vec<u32> = (0..len as u32).map(|t| t % 7 + 1).collect();
        batch.push_seq(&ids, 0, &table, opts.block_size, true);
        // A drafted sequence's rows: the one before its draft and one per draft token.
        let rows = len.min(1 + opts.draft_tokens);
        let last = batch.logits_rows.pop().expect("the sequence's row");
        batch.logits_rows.extend(last + 1 - rows..=last);
    }
    if opts.pooling {
        batch.hidden_rows = (0..batch.num_tokens()).collect();
    }
    batch
}

impl CudaLlama {
    /// `x` (`[rows, hidden]`) becomes the embeddings of the ids at `ids` (a rank's share summed
    /// with the other ranks').
    fn embed_into(&self, ids: u64, x: &Tensor) -> Result<()> {
        match &self.rank {
            Some(rank) => rank.embed_into(&self.kernels, &self.weights.embed, ids, x),
            None => self.kernels.gather_rows_into(&self.weights.embed, ids, x),
        }
    }

    /// The whole model's vocabulary (a rank's weights hold a range of it).
    fn vocab_size(&self) -> usize {
        self.full_config().vocab_size
    }

    /// The whole model's config.
    fn full_config(&self) -> &LlamaConfig {
        self.rank.as_ref().map_or(&self.config, |r| &r.full)
    }

    /// Whether this model reads its steps' outputs back (a tensor-parallel model's rank 0).
    fn reads_outputs(&self) -> bool {
        self.rank.as_ref().is_none_or(RankPart::reads_outputs)
    }

    /// The last `forward`'s logits (every row in full).
    pub fn logits(&self) -> &[f32] {
        &self.full.logits
    }
}
