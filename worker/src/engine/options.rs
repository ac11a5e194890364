//! Engine options: one struct that is both the `lumen serve`/`lumen worker` flags (every flag
//! also an environment variable) and the `model:` section of a serve config, with the same names.

use serde::{Deserialize, Serialize};

pub use crate::scheduler::SchedulingPolicy;

use super::pooling::{Convert, PoolerConfig, PoolingParams, Runner};
use crate::WorkerError;
use crate::model::cpu_weights::CpuWeightFormat;
use crate::model::location::LoadFormat;
use crate::spec::SpeculativeConfig;

/// The model that `lumen serve` serves when none is named: SmolLM2-135M-Instruct, fetched by
/// `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// How to load the model and run the engine.
#[derive(Clone, Debug, clap::Args, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct EngineOptions {
    /// The model: a `.gguf` file, a Hugging Face model directory, or a hub id
    /// (`org/name[@revision]`, resolved through the local hub cache, downloaded with `HF_TOKEN`).
    #[arg(long, env = "LUMEN_MODEL", default_value = DEFAULT_MODEL)]
    #[serde(alias = "source")]
    pub model: String,

    /// The name clients use in `model`; defaults to the model argument.
    #[arg(long, env = "LUMEN_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// How weights are loaded: auto, safetensors, gguf, or dummy (random weights of the model's
    /// shape, for benchmarks).
    #[arg(long, env = "LUMEN_LOAD_FORMAT", default_value = "auto")]
    pub load_format: LoadFormat,

    /// The longest sequence (prompt + output); defaults to the model's context length.
    #[arg(long, env = "LUMEN_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// The most sequences decoded together in one step.
    #[arg(long, env = "LUMEN_MAX_NUM_SEQS", default_value_t = defaults::MAX_NUM_SEQS)]
    pub max_num_seqs: usize,

    /// The most tokens computed in one step (decode tokens first, then prompt chunks).
    #[arg(long, env = "LUMEN_MAX_NUM_BATCHED_TOKENS", default_value_t = defaults::MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,

    /// Inter-token latency goal under load, in ms: while sequences decode, the prompt tokens of
    /// a step are sized from measured step costs so the step takes about this long (decodes
    /// always run; prompts get at least 256 tokens a step). Default: 50 on a GPU, off on the
    /// CPU; 0 turns it off (prompt chunks fill `max_num_batched_tokens`, as in vLLM).
    #[arg(long, env = "LUMEN_ITL_GOAL_MS")]
    pub itl_goal_ms: Option<f64>,

    /// How waiting requests are ordered, as vLLM's `--scheduling-policy`: fcfs (arrival order;
    /// a request's `priority` must be 0) or priority (lower `priority` first, then arrival; a
    /// waiting request may preempt running ones of a higher value when the KV cache or
    /// `max_num_seqs` is full).
    #[arg(long, env = "LUMEN_SCHEDULING_POLICY", value_enum, default_value = "fcfs")]
    pub scheduling_policy: SchedulingPolicy,

    /// Tokens per KV cache block.
    #[arg(long, env = "LUMEN_BLOCK_SIZE", default_value_t = defaults::BLOCK_SIZE)]
    pub block_size: usize,

    /// Reuse the KV blocks of identical prompt prefixes across requests.
    #[arg(long, env = "LUMEN_ENABLE_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,

    /// KV cache size on the CPU, e.g. `2GiB` or `512MiB`.
    #[arg(long, env = "LUMEN_KV_CACHE_MEMORY", default_value = defaults::KV_CACHE_MEMORY)]
    pub kv_cache_memory: bytesize::ByteSize,

    /// CPU threads for the model (default: every available core).
    #[arg(long, env = "LUMEN_THREADS")]
    pub threads: Option<usize>,

    /// CPU weight storage: auto (keep Q4_0/Q4_1/Q8_0, other GGML types to Q8_0, floats to f32),
    /// f32, or q8_0.
    #[arg(long, env = "LUMEN_CPU_WEIGHT_FORMAT", default_value = "auto")]
    pub cpu_weight_format: CpuWeightFormat,

    /// Seed of the random weights of `--load-format dummy`.
    #[arg(long, env = "LUMEN_DUMMY_SEED", default_value_t = 0)]
    pub dummy_seed: u64,

    /// A chat template replacing the model's: a file path, or the Jinja template itself.
    #[arg(long, env = "LUMEN_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,

    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` for the N-th GPU (a build with
    /// `--features cuda`).
    #[arg(long, env = "LUMEN_DEVICE", default_value = "cpu")]
    pub device: String,

    /// The share of the GPU's memory Lumen takes: weights, the activation peak, and the KV cache
    /// in the rest.
    #[arg(long, env = "LUMEN_GPU_MEMORY_UTILIZATION", default_value_t = defaults::GPU_MEMORY_UTILIZATION)]
    pub gpu_memory_utilization: f64,

    /// Plan as if the GPU had at most this much memory (the total `gpu_memory_utilization`
    /// applies to), e.g. `22.3GiB` to plan on a larger card as on a 24 GB A10G; default: the
    /// device's own total.
    #[arg(long, env = "LUMEN_GPU_MEMORY_LIMIT")]
    pub gpu_memory_limit: Option<bytesize::ByteSize>,

    /// Element type of weights, activations and KV cache on the GPU: auto (bfloat16), bfloat16,
    /// or float32 (for exact comparisons with the CPU path).
    #[arg(long, env = "LUMEN_DTYPE", default_value = "auto")]
    pub dtype: GpuDType,

    /// Launch every GPU step's kernels one by one instead of replaying the CUDA graphs captured
    /// at start-up for decode steps (vLLM's `--enforce-eager`; graphs are on by default).
    #[arg(long, env = "LUMEN_ENFORCE_EAGER", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enforce_eager: bool,

    /// The runner, as vLLM's `--runner`: auto (generation for a Llama causal LM), generate, or
    /// pooling (embeddings through `/v1/embeddings`; generation endpoints then answer 400).
    #[arg(long, env = "LUMEN_RUNNER", value_enum, default_value = "auto")]
    pub runner: Runner,

    /// How the model is adapted to pooling, as vLLM's `--convert`: auto (embed under the pooling
    /// runner), none, or embed (a causal LM as an embedding model).
    #[arg(long, env = "LUMEN_CONVERT", value_enum, default_value = "auto")]
    pub convert: Convert,

    /// Ranks one replica is spread over (vLLM's `--tensor-parallel-size`): Megatron-style shards
    /// of every layer, meeting in an all-reduce twice a layer. On the CPU the ranks are threads
    /// sharing `--threads`; on GPUs, one GPU per rank (`cuda:N` and the next N-1), meeting over
    /// NCCL (`LUMEN_NCCL_LIBRARY` names libnccl when it is not on the loader's path).
    #[arg(long, env = "LUMEN_TENSOR_PARALLEL_SIZE", default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// Weight quantization, as vLLM's `--quantization`: default the checkpoint's own
    /// (`quantization_config`: FP8 `fp8` / `compressed-tensors`, `awq`, `gptq`); `fp8` on a
    /// float checkpoint quantizes its linear layers to FP8 E4M3 as they load (per output channel).
    #[arg(long, short = 'q', env = "LUMEN_QUANTIZATION")]
    pub quantization: Option<String>,

    /// The pooler, as vLLM's `--pooler-config` JSON: `{"pooling_type": "LAST" | "MEAN" | "CLS",
    /// "normalize": true | false}`; default LAST, normalized (vLLM's for a converted causal LM).
    #[arg(long, env = "LUMEN_POOLER_CONFIG", value_parser = PoolerConfig::parse_json)]
    pub pooler_config: Option<PoolerConfig>,

    /// Speculative decoding, as vLLM's `--speculative-config` JSON: `{"method": "ngram",
    /// "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}` (prompt
    /// lookup: no extra model) or `{"model": "<draft: GGUF, directory or hub id>",
    /// "num_speculative_tokens": 4}` (a draft model sharing the tokenizer), optionally
    /// `"disable_by_batch_size": N`; default off.
    #[arg(long, env = "LUMEN_SPECULATIVE_CONFIG", value_parser = SpeculativeConfig::parse_json)]
    pub speculative_config: Option<SpeculativeConfig>,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDevice {
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for ComputeDevice {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self, WorkerError> {
        let bad = || WorkerError::invalid("device", format!("`{s}` is not one of cpu, cuda, cuda:N"));
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(ComputeDevice::Cuda).ok_or_else(bad),
        }
    }
}

/// Element type of the GPU path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuDType {
    /// bfloat16.
    #[default]
    Auto,
    Bfloat16,
    Float32,
}

impl std::str::FromStr for GpuDType {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self, WorkerError> {
        match s {
            "auto" => Ok(GpuDType::Auto),
            "bfloat16" | "bf16" => Ok(GpuDType::Bfloat16),
            "float32" | "f32" => Ok(GpuDType::Float32),
            other => Err(WorkerError::invalid("dtype", format!("`{other}` is not one of auto, bfloat16, float32"))),
        }
    }
}

/// Defaults shared by the flags and the config file.
pub mod defaults {
    pub const MAX_NUM_SEQS: usize = 64;
    pub const MAX_NUM_BATCHED_TOKENS: usize = 2048;
    pub const BLOCK_SIZE: usize = 16;
    pub const KV_CACHE_MEMORY: &str = "2GiB";
    pub const GPU_MEMORY_UTILIZATION: f64 = 0.9;
    /// `itl_goal_ms` on a GPU when none is given.
    pub const GPU_ITL_GOAL_MS: f64 = 50.0;
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            model: DEFAULT_MODEL.to_string(),
            served_model_name: None,
            load_format: LoadFormat::Auto,
            max_model_len: None,
            max_num_seqs: defaults::MAX_NUM_SEQS,
            max_num_batched_tokens: defaults::MAX_NUM_BATCHED_TOKENS,
            itl_goal_ms: None,
            scheduling_policy: SchedulingPolicy::Fcfs,
            block_size: defaults::BLOCK_SIZE,
            enable_prefix_caching: true,
            kv_cache_memory: defaults::KV_CACHE_MEMORY.parse().expect("valid default size"),
            threads: None,
            cpu_weight_format: CpuWeightFormat::Auto,
            dummy_seed: 0,
            chat_template: None,
            device: "cpu".to_string(),
            gpu_memory_utilization: defaults::GPU_MEMORY_UTILIZATION,
            gpu_memory_limit: None,
            dtype: GpuDType::Auto,
            enforce_eager: false,
            runner: Runner::Auto,
            convert: Convert::Auto,
            pooler_config: None,
            tensor_parallel_size: 1,
            quantization: None,
            speculative_config: None,
        }
    }
}

impl EngineOptions {
    /// The name clients address the model by.
    pub fn served_name(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.model)
    }

    /// The parsed `device` option.
    pub fn compute_device(&self) -> Result<ComputeDevice, WorkerError> {
        self.device.parse()
    }

    /// How the model pools its prompts; `None` when it is served for generation.
    pub fn pooling(&self) -> Result<Option<PoolingParams>, WorkerError> {
        PoolingParams::of_model(self.runner, self.convert, self.pooler_config)
    }

    /// Model threads: the flag, or every available core.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineOptions,
    }

    #[test]
    fn flags_and_config_share_names_and_defaults() {
        let from_flags = Cli::try_parse_from(["x"]).unwrap().engine;
        let from_config: EngineOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(from_flags, from_config);
        assert_eq!(from_flags, EngineOptions::default());
        let cli = Cli::try_parse_from([
            "x",
            "--max-num-seqs",
            "8",
            "--kv-cache-memory",
            "512MiB",
            "--enable-prefix-caching",
            "false",
            "--load-format",
            "dummy",
        ])
        .unwrap()
        .engine;
        let cfg: EngineOptions = serde_json::from_str(r#"{"max_num_seqs": 8, "kv_cache_memory": "512MiB", "enable_prefix_caching": false, "load_format": "dummy"}"#).unwrap();
        assert_eq!(cli, cfg);
        assert_eq!(cli.kv_cache_memory.as_u64(), 512 << 20);
    }

    #[test]
    fn options_survive_a_json_round_trip() {
        let opts = EngineOptions { max_num_seqs: 3, kv_cache_memory: "3MiB".parse().unwrap(), ..Default::default() };
        let back: EngineOptions = serde_json::from_str(&serde_json::to_string(&opts).unwrap()).unwrap();
        assert_eq!(back, opts);
    }

    #[test]
    fn devices_and_gpu_dtypes_parse_or_name_the_option() {
        let cli = Cli::try_parse_from(["x", "--device", "cuda:1", "--dtype", "float32"]).unwrap().engine;
        assert_eq!(cli.compute_device().unwrap(), ComputeDevice::Cuda(1));
        assert_eq!(cli.dtype, GpuDType::Float32);
        assert_eq!(EngineOptions::default().compute_device().unwrap(), ComputeDevice::Cpu);
        assert_eq!("cuda".parse::<ComputeDevice>().unwrap(), ComputeDevice::Cuda(0));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let err = bad.parse::<ComputeDevice>().unwrap_err().to_string();
            assert!(err.contains("`device`"), "{err}");
        }
        let cfg: EngineOptions =
            serde_json::from_str(r#"{"device": "cuda:0", "gpu_memory_utilization": 0.5, "dtype": "bfloat16"}"#)
                .unwrap();
        assert_eq!((cfg.gpu_memory_utilization, cfg.dtype), (0.5, GpuDType::Bfloat16));
        assert!(Cli::try_parse_from(["x", "--dtype", "f8"]).is_err());
    }

    #[test]
    fn pooling_flags_and_config_share_vllm_names() {
        use super::super::pooling::PoolingType;
        let cli = Cli::try_parse_from([
            "x",
            "--runner",
            "pooling",
            "--convert",
            "embed",
            "--pooler-config",
            r#"{"pooling_type": "MEAN", "normalize": false}"#,
        ])
        .unwrap()
        .engine;
        let cfg: EngineOptions = serde_json::from_str(
            r#"{"runner": "pooling", "convert": "embed", "pooler_config": {"pooling_type": "MEAN", "normalize": false}}"#,
        )
        .unwrap();
        assert_eq!(cli, cfg);
        let pooling = cli.pooling().unwrap().unwrap();
        assert_eq!((pooling.pooling_type, pooling.normalize), (PoolingType::Mean, false));
        assert_eq!(EngineOptions::default().pooling().unwrap(), None);
        assert!(Cli::try_parse_from(["x", "--runner", "embed"]).is_err());
        assert!(Cli::try_parse_from(["x", "--pooler-config", "{\"pooling_type\": \"STEP\"}"]).is_err());
    }

    #[test]
    fn the_config_accepts_source_for_model() {
        let cfg: EngineOptions = serde_json::from_str(r#"{"source": "org/name"}"#).unwrap();
        assert_eq!(cfg.model, "org/name");
    }
}
