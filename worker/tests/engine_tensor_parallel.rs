//! `tensor_parallel_size` through the engine on the real SmolLM2-135M-Instruct GGUF (9 heads, 3
//! KV heads: 3 ranks): the ranks serve a batch of sixteen mixed prompts with chunked prefill and
//! preemption, free every block, and decode what one model decodes; a size that does not divide
//! the model is refused naming the option.

mod common;

use common::{PROMPTS, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest, FinishReason};
use lumen_worker::sampling::{SamplingParams, StopParams};

const OUTPUT_TOKENS: usize = 24;

fn batch(core: &EngineCore) -> Vec<EngineRequest> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            EngineRequest::new(
                format!("r{i}"),
                chat(core, p),
                SamplingParams::greedy(),
                StopParams { max_tokens: OUTPUT_TOKENS, ignore_eos: true, ..Default::default() },
            )
        })
        .collect()
}

fn outputs(core: &mut EngineCore) -> Vec<Vec<TokenId>> {
    let reqs = batch(core);
    run(core, reqs)
        .into_iter()
        .map(|o| {
            assert_eq!(o.finish[&0], FinishReason::Length);
            o.tokens[&0].clone()
        })
        .collect()
}

#[test]
fn three_ranks_decode_what_one_model_decodes() {
    // f32 weights: the ranks' logits equal one model's to f32 rounding (tp::tests), so greedy
    // picks differ only at near ties; quantized weights add 8-bit steps (see tp::tests).
    let f32_weights = |opts: EngineOptions| EngineOptions { cpu_weight_format: "f32".parse().unwrap(), ..opts };
    let mut one = engine(&f32_weights(EngineOptions { max_num_batched_tokens: 64, ..options() }));
    let want = outputs(&mut one);

    let tp = |opts: EngineOptions| EngineOptions { tensor_parallel_size: 3, ..f32_weights(opts) };
    // Chunked prefill (64-token budget) and, with the small cache, preemption and recompute.
    for (what, opts) in [
        ("chunked", tp(EngineOptions { max_num_batched_tokens: 64, ..options() })),
        ("preempted", tp(preempting_options())),
    ] {
        let mut core = engine(&opts);
        assert!(core.model().describe().starts_with("3 x cpu"), "{what}: {}", core.model().describe());
        let got = outputs(&mut core);
        // Measured: all sixteen equal. One near tie may flip a sequence's tail on another CPU.
        let same = want.iter().zip(&got).filter(|(a, b)| a == b).count();
        assert!(same >= 15, "{what}: {same} of 16 greedy outputs equal one model's\n{want:?}\n{got:?}");
        let stats = core.stats();
        assert_eq!(stats.kv_blocks_used, 0, "{what}: every block is free again");
        if what == "preempted" {
            assert!(stats.preemptions_total > 0, "the small cache should force preemption: {stats:?}");
        }
    }
}

#[test]
fn a_size_that_does_not_divide_the_model_is_refused() {
    let opts = EngineOptions { tensor_parallel_size: 2, ..options() };
    let Err(err) = lumen_worker::engine::build_engine(&opts) else { panic!("9 heads do not split in two") };
    let err = err.to_string();
    assert!(err.contains("tensor_parallel_size") && err.contains("9 attention heads"), "{err}");
}
