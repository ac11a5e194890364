//! GPU ranks against one GPU model, on a generated model (`generated_*`: needs only a GPU) and
//! on SmolLM2-135M's GGUF (`smollm2_*`: `models/`, or `LUMEN_GPU_TEST_MODEL`); the one-rank
//! NCCL case needs libnccl (see the `tp` step of `scripts/gpu/run-on-device.sh`).

use std::path::PathBuf;

use candle_core::DType;

use super::TensorParallelCuda;
use crate::model::gguf::GgufFile;
use crate::model::llama_cuda::weights::WeightOrigin;
use crate::model::llama_cuda::{CudaLlama, CudaModelOptions};
use crate::model::quant::Quantization;
use crate::model::{DummySource, LlamaConfig, TensorDType};
use crate::tp::tests::{Louder, assert_close, generated_config, run_greedy};

fn gguf() -> GgufFile {
    let path = std::env::var("LUMEN_GPU_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    GgufFile::open(&path).expect("SmolLM2's GGUF (scripts/fetch-model.sh, or LUMEN_GPU_TEST_MODEL)")
}

fn options(enforce_eager: bool) -> CudaModelOptions {
    CudaModelOptions {
        ordinal: 0,
        dtype: DType::F32,
        block_size: 16,
        max_model_len: 512,
        max_num_seqs: 8,
        max_num_batched_tokens: 512,
        gpu_memory_utilization: 0.2,
        gpu_memory_limit: None,
        pooling: false,
        enforce_eager,
        quantization: Quantization::None,
        draft_tokens: 0,
        kv: Default::default(),
    }
}

const PROMPTS: [&[u32]; 2] = [&[1, 504, 3303, 314, 260, 1470], &[1, 2683, 359, 346, 47, 2135, 30, 1004]];
/// Ids within the generated model's vocabulary, spread over the three ranks' ranges.
const GENERATED_PROMPTS: [&[u32]; 2] = [&[1, 300, 150, 7, 260, 99], &[1, 383, 128, 255, 47, 200, 30, 4]];

/// The CPU tests' generated model with a head size the GPU kernels take (64): 6 heads over 3
/// KV heads, so 3 ranks of 2 heads over one KV head; 768 intermediate rows (256 a rank); a
/// vocabulary of 384 (128 a rank).
fn generated() -> (LlamaConfig, Louder) {
    let c = LlamaConfig {
        vocab_size: 384,
        hidden_size: 384,
        intermediate_size: 768,
        num_attention_heads: 6,
        num_key_value_heads: 3,
        head_dim: 64,
        max_position_embeddings: 1024,
        ..generated_config()
    };
    let source = Louder(DummySource::new(&c, TensorDType::F32, 11).unwrap());
    (c, source)
}

/// Three ranks sharing GPU 0 (collectives staged through the host) give one GPU model's logits
/// to f32 rounding (the o and down sums added in another order, as on the CPU ranks), and its
/// greedy picks.
fn three_ranks_match_the_whole_model(
    c: &LlamaConfig,
    source: &WeightOrigin<'_>,
    prompts: [&[u32]; 2],
    tolerance: f32,
    what: &str,
) {
    let (want, fed) = {
        let mut one = CudaLlama::load(c.clone(), source, &options(true)).unwrap();
        run_greedy(&mut one, prompts, 16, None)
    };
    let mut tp = TensorParallelCuda::load(c.clone(), source, &options(true), 3, true).unwrap();
    let (got, _) = run_greedy(&mut tp, prompts, 16, Some(&fed));
    assert_close(&want, &got, c.vocab_size, tolerance, 0.95, what);
}

#[test]
fn generated_three_ranks_on_one_gpu_match_the_whole_model() {
    let (c, source) = generated();
    let source = WeightOrigin::Source(&source);
    three_ranks_match_the_whole_model(&c, &source, GENERATED_PROMPTS, 1e-4, "generated TP 3 on one GPU, f32");
}

#[test]
fn smollm2_three_ranks_on_one_gpu_match_the_whole_model() {
    let gguf = gguf();
    let c = gguf.llama_config().unwrap();
    let source = WeightOrigin::Source(&gguf);
    three_ranks_match_the_whole_model(&c, &source, PROMPTS, 5e-4, "SmolLM2 TP 3 on one GPU, f32");
}

/// One rank over NCCL, with decode graphs (the all-reduces captured): the same logits as the
/// plain model, bit for bit (a one-rank sum is the value itself).
#[test]
fn generated_one_nccl_rank_with_graphs_gives_the_plain_models_logits() {
    let (c, source) = generated();
    let source = WeightOrigin::Source(&source);
    let (want, fed) = {
        let mut one = CudaLlama::load(c.clone(), &source, &options(false)).unwrap();
        assert!(!one.graph_sizes().is_empty(), "the plain model captured graphs");
        run_greedy(&mut one, GENERATED_PROMPTS, 16, None)
    };
    let mut tp = TensorParallelCuda::load(c.clone(), &source, &options(false), 1, false).unwrap();
    let (got, _) = run_greedy(&mut tp, GENERATED_PROMPTS, 16, Some(&fed));
    assert_eq!(got, want, "one NCCL rank against the plain model");
}

/// A batch a rank refuses (a token outside the vocabulary) fails the step on every rank before
/// any collective, and the ranks serve the next step.
#[test]
fn generated_a_bad_batch_fails_the_step_and_the_ranks_go_on() {
    use crate::model::{ForwardBatch, Model};
    let (c, source) = generated();
    let mut tp = TensorParallelCuda::load(c.clone(), &WeightOrigin::Source(&source), &options(true), 3, true).unwrap();
    let mut bad = ForwardBatch::default();
    bad.push_seq(&[c.vocab_size as u32], 0, &[0], 16, true);
    let err = tp.forward(&bad).unwrap_err().to_string();
    assert!(err.contains(&c.vocab_size.to_string()), "{err}");
    let mut good = ForwardBatch::default();
    good.push_seq(&[1, 2, 3], 0, &[0], 16, true);
    assert_eq!(tp.forward(&good).unwrap().len(), c.vocab_size);
}
