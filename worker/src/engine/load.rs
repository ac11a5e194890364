//! Building an engine from [`EngineOptions`]: find the model, read its config and tokenizer,
//! size the KV cache, load the weights.

use std::path::Path;
use std::time::Instant;

use super::core::{CoreConfig, EngineCore};
use super::load_draft::{DraftParts, open_draft};
use super::options::{ComputeDevice, EngineOptions};
use crate::kernels::cpu::attention::CacheLayout;
use crate::kv_cache::cpu_storage::CpuKvStorage;
use crate::model::cpu_weights::CpuWeightFormat;
use crate::model::generation_config::GenerationConfig;
use crate::model::gguf::GgufFile;
use crate::model::llama_cpu::{CpuLlama, CpuModelOptions};
use crate::model::location::{LoadFormat, ModelLocation, resolve_model};
use crate::model::quant::Quantization;
use crate::model::quant::source::DequantizedSource;
use crate::model::{DummySource, LlamaConfig, Model, SafetensorsSource, TensorDType, TensorSource};
use crate::spec::draft_model::DraftModel;
use crate::tokenizer::Tokenizer;
use crate::tp::cpu::TensorParallelCpu;
use crate::{Result, WorkerError};

/// Loads the model named by `opts` and builds an engine around it (blocking: may read gigabytes
/// or download; call it off the async runtime).
pub fn build_engine(opts: &EngineOptions) -> Result<EngineCore> {
    let started = Instant::now();
    let device = opts.compute_device()?;
    let pooling = opts.pooling()?;
    let speculative = speculative(opts, pooling.is_some())?;
    let location = resolve_model(&opts.model, opts.load_format)?;
    let (config, mut tokenizer, source) = open_model(&location, opts)?;
    if let Some(template) = &opts.chat_template {
        tokenizer = tokenizer.with_chat_template(read_chat_template(template)?)?;
    }
    let max_model_len = opts.max_model_len.unwrap_or(config.max_position_embeddings);
    if max_model_len == 0 {
        return Err(WorkerError::invalid("max_model_len", "must be at least 1"));
    }
    config.check_max_model_len(max_model_len)?;
    if opts.block_size == 0 || opts.max_num_seqs == 0 || opts.max_num_batched_tokens == 0 {
        return Err(WorkerError::invalid(
            "block_size",
            "block_size, max_num_seqs and max_num_batched_tokens must be positive",
        ));
    }
    if opts.tensor_parallel_size == 0 {
        return Err(WorkerError::invalid("tensor_parallel_size", "must be at least 1"));
    }
    let quantization = Quantization::resolve(config.quantization.as_ref(), opts.quantization.as_deref())?;
    let draft = open_draft(opts, &config, &tokenizer, max_model_len)?;
    let draft_name = draft.as_ref().map(|d| d.name.clone());
    let (model, draft): Loaded = match device {
        ComputeDevice::Cpu => {
            let draft_per_block = draft.as_ref().map_or(0, |d| cpu_bytes_per_block(&d.config, opts.block_size));
            let model = load_cpu(config, source.as_ref(), opts, &quantization, max_model_len, draft_per_block)?;
            let draft = match draft {
                Some(d) => {
                    let cpu = cpu_options(opts, max_model_len, model.num_blocks());
                    Some(load_cpu_model(d.config, d.source.as_ref(), &cpu, &d.quantization, 1)?)
                }
                None => None,
            };
            (model, draft)
        }
        ComputeDevice::Cuda(ordinal) => {
            load_cuda(config, source.as_ref(), opts, max_model_len, ordinal, &quantization, draft)?
        }
    };
    let core_cfg = CoreConfig {
        max_model_len,
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        enable_prefix_caching: opts.enable_prefix_caching,
        itl_goal_ms: itl_goal(opts),
        // An experiment, measured on a GPU before it gets a flag (see `step_cost`).
        itl_goal_min_pressure: std::env::var("LUMEN_ITL_GOAL_MIN_PRESSURE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        scheduling_policy: opts.scheduling_policy,
        speculative,
    };
    let num_blocks = model.num_blocks();
    tracing::info!(model = %opts.model, max_model_len, num_blocks, ?pooling, seconds = started.elapsed().as_secs_f32(), "engine ready");
    let core = EngineCore::new(model, tokenizer, &core_cfg);
    Ok(match draft {
        Some(draft) => {
            tracing::info!(draft = ?draft_name, device = %draft.describe(), blocks = draft.num_blocks(), "draft model ready");
            core.with_draft_model(DraftModel::new(draft, opts.max_num_batched_tokens))
        }
        None => core,
    })
}

/// Device memory a draft model takes besides its weights, cache and activations (its layer
/// scratch, rotary tables, cuBLAS workspace and stream), kept free for it by the target.
#[cfg(feature = "cuda")]
const DRAFT_FIXED_BYTES: usize = 512 << 20;

/// A loaded target model and its draft model, if any.
type Loaded = (Box<dyn Model>, Option<Box<dyn Model>>);

/// The checked `speculative_config` (a pooling model never samples, so it takes none).
fn speculative(opts: &EngineOptions, pooling: bool) -> Result<Option<crate::spec::SpecSettings>> {
    let Some(config) = &opts.speculative_config else { return Ok(None) };
    if pooling {
        return Err(WorkerError::invalid(
            "speculative_config",
            "a pooling model (`--runner pooling`) generates nothing to speculate on",
        ));
    }
    let settings = crate::spec::settings(config)?;
    tracing::info!(?settings, "speculative decoding on");
    Ok(Some(settings))
}

/// The most speculative tokens a sequence carries in a step (0: speculation off or refused).
#[cfg(feature = "cuda")]
fn speculative_tokens(opts: &EngineOptions) -> usize {
    opts.speculative_config.as_ref().and_then(|c| c.settings().ok()).map_or(0, |s| s.num_tokens)
}

/// The step-time goal the engine schedules for: `--itl-goal-ms` (0: none), by default one on a
/// GPU (where a full budget of prompt tokens holds every stream for a long step) and none on
/// the CPU.
fn itl_goal(opts: &EngineOptions) -> Option<f64> {
    match opts.itl_goal_ms {
        Some(goal) => (goal > 0.0).then_some(goal),
        None => match opts.device.parse::<ComputeDevice>() {
            Ok(ComputeDevice::Cuda(_)) => Some(super::options::defaults::GPU_ITL_GOAL_MS),
            _ => None,
        },
    }
}

/// Bytes a KV block of `config`'s model takes on the CPU.
fn cpu_bytes_per_block(config: &LlamaConfig, block_size: usize) -> usize {
    let layout = CacheLayout { block_size, kv_heads: config.num_key_value_heads, head_dim: config.head_dim };
    CpuKvStorage::bytes_per_block(&layout, config.num_hidden_layers)
}

/// The CPU model options `opts` ask for, with a KV cache of `num_blocks` blocks.
fn cpu_options(opts: &EngineOptions, max_model_len: usize, num_blocks: usize) -> CpuModelOptions {
    CpuModelOptions {
        threads: opts.threads(),
        weight_format: opts.cpu_weight_format,
        block_size: opts.block_size,
        num_blocks,
        max_model_len,
    }
}

/// A model on the CPU, whole or split over `ranks` ranks. The CPU computes in floats: FP8
/// weights as the values they mean, and a quantized checkpoint's values requantized to Q8_0
/// under `auto`, not widened to f32 (four times an FP8 model's bytes, eight times a 4-bit one's).
fn load_cpu_model(
    config: LlamaConfig,
    source: &dyn TensorSource,
    cpu: &CpuModelOptions,
    quantization: &Quantization,
    ranks: usize,
) -> Result<Box<dyn Model>> {
    let dequantized = DequantizedSource::wrap(source, quantization);
    let source = dequantized.as_ref().map_or(source, |d| d as &dyn TensorSource);
    let weight_format = match (cpu.weight_format, quantization) {
        (CpuWeightFormat::Auto, Quantization::Fp8(_) | Quantization::Int(_)) => CpuWeightFormat::Q8_0,
        (format, _) => format,
    };
    let cpu = CpuModelOptions { weight_format, ..cpu.clone() };
    Ok(match ranks {
        1 => Box::new(CpuLlama::load(config, source, &cpu)?),
        ranks => Box::new(TensorParallelCpu::load(config, source, &cpu, ranks)?),
    })
}

/// The CPU model, its KV cache sized by `--kv-cache-memory` (with `--tensor-parallel-size`
/// N, N ranks, each holding its KV heads' share of every block; with a draft model taking
/// `draft_per_block` bytes a block, both caches get as many blocks).
fn load_cpu(
    config: LlamaConfig,
    source: &dyn TensorSource,
    opts: &EngineOptions,
    quantization: &Quantization,
    max_model_len: usize,
    draft_per_block: usize,
) -> Result<Box<dyn Model>> {
    let per_block = cpu_bytes_per_block(&config, opts.block_size) + draft_per_block;
    let num_blocks = (opts.kv_cache_memory.as_u64() as usize) / per_block;
    if num_blocks * opts.block_size < max_model_len {
        return Err(WorkerError::invalid(
            "kv_cache_memory",
            format!(
                "a KV cache of {} holds {} tokens, fewer than max_model_len {max_model_len}: raise --kv-cache-memory (each token takes {} bytes{}) or lower --max-model-len",
                opts.kv_cache_memory,
                num_blocks * opts.block_size,
                per_block / opts.block_size,
                if draft_per_block > 0 { ", the draft model's included" } else { "" }
            ),
        ));
    }
    let cpu = cpu_options(opts, max_model_len, num_blocks);
    load_cpu_model(config, source, &cpu, quantization, opts.tensor_parallel_size)
}

/// The GPU model, its KV cache sized by `--gpu-memory-utilization` (dummy weights are drawn on
/// the device rather than generated on the host).
#[cfg(feature = "cuda")]
fn load_cuda(
    config: LlamaConfig,
    source: &dyn TensorSource,
    opts: &EngineOptions,
    max_model_len: usize,
    ordinal: usize,
    quantization: &Quantization,
    draft: Option<DraftParts>,
) -> Result<Loaded> {
    use super::options::GpuDType;
    use crate::kv_cache::cuda_storage::CudaKvStorage;
    use crate::model::llama_cuda::weights::WeightOrigin;
    use crate::model::llama_cuda::{CudaLlama, CudaModelOptions, KvSizing};
    use crate::tp::cuda::TensorParallelCuda;
    let origin = |source| match opts.load_format {
        LoadFormat::Dummy => WeightOrigin::Random { seed: opts.dummy_seed },
        _ => WeightOrigin::Source(source),
    };
    let dtype = match opts.dtype {
        GpuDType::Auto | GpuDType::Bfloat16 => candle_core::DType::BF16,
        GpuDType::Float32 => candle_core::DType::F32,
    };
    // The draft's weights and cache blocks, for the target to keep room for.
    let kv = match &draft {
        Some(d) => {
            let c = &d.config;
            let layout =
                CacheLayout { block_size: opts.block_size, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
            let mut params: usize =
                crate::model::dummy::llama_tensor_shapes(c).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            if c.tie_word_embeddings {
                params += c.vocab_size * c.hidden_size; // a checkpoint may still carry lm_head
            }
            KvSizing::BudgetWithDraft {
                // And the draft's own fixed buffers: layer scratch, rotary tables, a cuBLAS
                // workspace, its stream.
                weight_bytes: params * dtype.size_in_bytes() + DRAFT_FIXED_BYTES,
                bytes_per_block: CudaKvStorage::bytes_per_block(&layout, c.num_hidden_layers, dtype),
            }
        }
        None => KvSizing::Budget,
    };
    let cuda = CudaModelOptions {
        ordinal,
        dtype,
        block_size: opts.block_size,
        max_model_len,
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        gpu_memory_utilization: opts.gpu_memory_utilization,
        gpu_memory_limit: opts.gpu_memory_limit.map(|b| b.as_u64() as usize),
        pooling: opts.pooling()?.is_some(),
        enforce_eager: opts.enforce_eager,
        quantization: quantization.clone(),
        draft_tokens: speculative_tokens(opts),
        kv,
    };
    let ranks = opts.tensor_parallel_size;
    if ranks == 1 {
        let model = CudaLlama::load(config, &origin(source), &cuda)?;
        let draft = match draft {
            Some(d) => {
                let draft_opts = CudaModelOptions {
                    quantization: d.quantization.clone(),
                    draft_tokens: 0,
                    kv: KvSizing::Blocks(model.num_blocks()),
                    ..cuda
                };
                Some(Box::new(CudaLlama::load(d.config, &origin(d.source.as_ref()), &draft_opts)?) as Box<dyn Model>)
            }
            None => None,
        };
        return Ok((Box::new(model), draft));
    }
    if let Some(d) = draft {
        return Err(WorkerError::invalid(
            "speculative_config",
            format!(
                "a draft model ({:?}) beside a target split over GPUs (tensor_parallel_size {ranks}) is not built yet",
                d.name
            ),
        ));
    }
    // Ranks on GPUs ordinal.. (one each), or all on one GPU when LUMEN_TP_SHARE_GPU=1 (slow:
    // the collectives go through the host; how a one-GPU machine tests a split model).
    let shared = std::env::var("LUMEN_TP_SHARE_GPU").is_ok_and(|v| v == "1");
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0).max(0) as usize;
    if !shared && ordinal + ranks > gpus {
        return Err(WorkerError::invalid(
            "tensor_parallel_size",
            format!(
                "{ranks} ranks from cuda:{ordinal} need GPUs {ordinal}..{} but this machine has {gpus}",
                ordinal + ranks - 1
            ),
        ));
    }
    Ok((Box::new(TensorParallelCuda::load(config, &origin(source), &cuda, ranks, shared)?), None))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _config: LlamaConfig,
    _source: &dyn TensorSource,
    _opts: &EngineOptions,
    _max_model_len: usize,
    ordinal: usize,
    _quantization: &Quantization,
    _draft: Option<DraftParts>,
) -> Result<Loaded> {
    Err(WorkerError::invalid(
        "device",
        format!("cuda:{ordinal} needs a lumen built with `--features cuda`; this build runs on the CPU only"),
    ))
}

/// `--chat-template`: a file's contents when it names a file (or looks like a path), else the
/// template itself.
fn read_chat_template(arg: &str) -> Result<String> {
    let path = Path::new(arg);
    let looks_like_path = !arg.contains("{{") && !arg.contains("{%");
    if path.is_file() || looks_like_path {
        return std::fs::read_to_string(path)
            .map_err(|e| WorkerError::model_file(path, format!("cannot read the chat template: {e}")));
    }
    Ok(arg.to_string())
}

/// Config, tokenizer and weights of a located model.
pub fn open_model(
    location: &ModelLocation,
    opts: &EngineOptions,
) -> Result<(LlamaConfig, Tokenizer, Box<dyn TensorSource>)> {
    match location {
        ModelLocation::Gguf(path) => {
            let gguf = GgufFile::open(path)?;
            let config = gguf.llama_config()?;
            let tokenizer = Tokenizer::from_gguf(&gguf.content)?;
            Ok((config, tokenizer, Box::new(gguf)))
        }
        ModelLocation::HfDir(dir) => {
            let mut config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
            if config.quantization.is_none() {
                config.quantization = crate::model::quant::from_sidecar(dir)?;
            }
            if let Some(generation) = GenerationConfig::from_dir(dir)? {
                config.eos_token_ids = generation.merged_eos_ids(&config.eos_token_ids);
            }
            let mut tokenizer = open_tokenizer(dir)?;
            tokenizer.add_eos_token_ids(config.eos_token_ids.iter().copied());
            let source: Box<dyn TensorSource> = if opts.load_format == LoadFormat::Dummy {
                let dtype = match config.dtype.as_deref() {
                    Some("float32") => TensorDType::F32,
                    Some("float16") => TensorDType::F16,
                    _ => TensorDType::BF16,
                };
                Box::new(DummySource::new(&config, dtype, opts.dummy_seed)?)
            } else {
                Box::new(SafetensorsSource::open(dir)?)
            };
            Ok((config, tokenizer, source))
        }
    }
}

fn open_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if !json.is_file() {
        return Err(WorkerError::model_file(&json, "missing: a Hugging Face model directory needs tokenizer.json"));
    }
    let config = dir.join("tokenizer_config.json");
    Tokenizer::from_files(&json, config.is_file().then_some(config.as_path()))
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_device_without_the_cuda_build_names_the_feature() {
        let opts = EngineOptions {
            model: concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf").into(),
            device: "cuda:0".into(),
            ..EngineOptions::default()
        };
        let err = build_engine(&opts).expect_err("no GPU path in this build").to_string();
        assert!(err.contains("`device`") && err.contains("--features cuda"), "{err}");
    }
}
