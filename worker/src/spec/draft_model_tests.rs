//! The draft-model proposer on a generated model: every proposal equals the draft's greedy
//! continuation computed from scratch, across accepted, rejected and corrected drafts, chunked
//! catch-up and a pool too small for every draft; finished sequences give their blocks back.

use super::*;
use crate::model::llama_cpu::{CpuLlama, CpuModelOptions};
use crate::splitmix::SplitMix64;
use crate::tp::tests::{Louder, generated_config};

fn draft(num_blocks: usize, max_batched_tokens: usize) -> DraftModel {
    DraftModel::new(Box::new(model(num_blocks)), max_batched_tokens)
}

fn model(num_blocks: usize) -> CpuLlama {
    let config = generated_config();
    let source = Louder(crate::model::DummySource::new(&config, crate::model::TensorDType::F32, 7).unwrap());
    let opts = CpuModelOptions {
        threads: 1,
        weight_format: Default::default(),
        block_size: 4,
        num_blocks,
        max_model_len: 256,
    };
    CpuLlama::load(config, &source, &opts).unwrap()
}

/// `len` token ids stepping by `step` through the generated model's vocabulary of 101.
fn spread(len: usize, step: usize) -> Vec<TokenId> {
    (0..len).map(|i| (i * step % 101) as TokenId).collect()
}

/// The greedy continuation of `tokens` by `reference`, each token from a forward over the whole
/// sequence in a fresh cache.
fn continuation(reference: &mut CpuLlama, tokens: &[TokenId], k: usize) -> Vec<TokenId> {
    let vocab = reference.config().vocab_size;
    let mut seq = tokens.to_vec();
    for _ in 0..k {
        let mut batch = ForwardBatch::default();
        let table: Vec<u32> = (0..seq.len().div_ceil(4) as u32).collect();
        batch.push_seq(&seq, 0, &table, 4, true);
        let row = reference.forward(&batch).unwrap();
        seq.push(argmax(&row[..vocab]).unwrap() as TokenId);
    }
    seq.split_off(tokens.len())
}

#[test]
fn proposals_are_the_greedy_continuation_across_accepted_and_rejected_drafts() {
    let mut proposer = draft(256, 512);
    let mut reference = model(64);
    let mut rng = SplitMix64(11);
    let mut seqs: Vec<(SeqId, Vec<TokenId>)> =
        (0..3).map(|id| (id, (0..5 + 7 * id as usize).map(|_| rng.below(101) as TokenId).collect())).collect();
    let mut next_id = 3;
    let mut out = Vec::new();
    for round in 0..24 {
        let running: Vec<SeqId> = seqs.iter().map(|s| s.0).collect();
        // Now and then a sequence decodes a step without a draft (the controller gave it none).
        let asked: Vec<bool> = seqs.iter().map(|_| rng.below(4) != 0).collect();
        let asks: Vec<DraftAsk<'_>> = seqs
            .iter()
            .zip(&asked)
            .filter(|(_, asked)| **asked)
            .map(|((id, t), _)| DraftAsk { id: *id, tokens: t, max: 1 + (round + *id as usize) % 5 })
            .collect();
        proposer.propose(&running, &asks, &mut out).unwrap();
        for (ask, proposed) in asks.iter().zip(&out) {
            assert_eq!(proposed.len(), ask.max, "round {round}: sequence {} drafts in full", ask.id);
            assert_eq!(
                proposed,
                &continuation(&mut reference, ask.tokens, ask.max),
                "round {round}: sequence {}",
                ask.id
            );
        }
        // The target's verdict: some prefix accepted, then a token of its own (sometimes the
        // draft's next one: everything accepted, then a bonus token).
        let mut drafts = out.clone().into_iter();
        for ((_, tokens), asked) in seqs.iter_mut().zip(&asked) {
            if *asked {
                let proposed = drafts.next().unwrap();
                let accepted = rng.below(proposed.len() + 1);
                tokens.extend_from_slice(&proposed[..accepted]);
            }
            tokens.push(rng.below(101) as TokenId);
        }
        // A sequence ends now and then, and a new one starts.
        if round % 7 == 6 {
            seqs.remove(0);
            let len = 3 + rng.below(20);
            seqs.push((next_id, (0..len).map(|_| rng.below(101) as TokenId).collect()));
            next_id += 1;
        }
    }
    assert_eq!(proposer.num_seqs(), 3);
    let held: usize = seqs.iter().map(|(_, t)| (t.len() + 4).div_ceil(4)).sum();
    assert!(proposer.blocks_used() <= held + 3, "{} blocks for {held}", proposer.blocks_used());
    proposer.retain_running(&[]);
    assert_eq!((proposer.num_seqs(), proposer.blocks_used()), (0, 0), "finished sequences give their blocks back");
}

#[test]
fn a_long_sequence_catches_up_in_chunks_of_the_budget() {
    let mut proposer = draft(64, 8);
    let mut reference = model(64);
    let tokens = spread(30, 7);
    let mut out = Vec::new();
    let ask = [DraftAsk { id: 5, tokens: &tokens, max: 3 }];
    // 30 tokens at 8 a proposal: three chunks without a draft, then the last 6 and the draft.
    for step in 0..3 {
        proposer.propose(&[5], &ask, &mut out).unwrap();
        assert!(out[0].is_empty(), "step {step}: still catching up");
    }
    proposer.propose(&[5], &ask, &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &tokens, 3));
    // A second sequence shares the budget: the first (already caught up) drafts, the second
    // gets the rest of the budget as a chunk.
    let other = spread(20, 3);
    let asks = [DraftAsk { id: 5, tokens: &tokens, max: 2 }, DraftAsk { id: 6, tokens: &other, max: 2 }];
    proposer.propose(&[5, 6], &asks, &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &tokens, 2));
    assert!(out[1].is_empty());
}

#[test]
fn a_pool_too_small_for_the_draft_shortens_it_and_never_takes_anothers_blocks() {
    // 8 blocks of 4: 32 positions.
    let mut proposer = draft(8, 512);
    let mut reference = model(64);
    let a = spread(20, 5);
    let b = spread(10, 11);
    let mut out = Vec::new();
    // a: 20 positions + 5 fed draft tokens = 25 (7 blocks); b's 10 tokens do not fit in the one
    // block left, so b gets no draft.
    let asks = [DraftAsk { id: 1, tokens: &a, max: 6 }, DraftAsk { id: 2, tokens: &b, max: 6 }];
    proposer.propose(&[1, 2], &asks, &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &a, 6));
    assert!(out[1].is_empty());
    assert_eq!(proposer.blocks_used(), 7);
    // With a gone, b drafts; asking more than the pool holds cuts the draft to what fits:
    // 10 tokens + 22 fed = 32 positions, so 23 tokens.
    let asks = [DraftAsk { id: 2, tokens: &b, max: 30 }];
    proposer.propose(&[2], &asks, &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &b, 23));
    assert_eq!(proposer.num_seqs(), 1);
}

#[test]
fn a_sequence_short_of_blocks_takes_those_of_sequences_not_asked_this_step() {
    // 8 blocks of 4: 32 positions. Sequence 1 (20 tokens + 3 fed) holds 6 blocks.
    let mut proposer = draft(8, 512);
    let mut reference = model(64);
    let a = spread(20, 5);
    let b = spread(14, 13);
    let mut out = Vec::new();
    proposer.propose(&[1], &[DraftAsk { id: 1, tokens: &a, max: 4 }], &mut out).unwrap();
    assert_eq!(proposer.blocks_used(), 6);
    // Both run; only 2 is asked and needs 14 + 3 positions (5 blocks): 1's state gives way.
    proposer.propose(&[1, 2], &[DraftAsk { id: 2, tokens: &b, max: 4 }], &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &b, 4));
    assert_eq!((proposer.num_seqs(), proposer.blocks_used()), (1, 5));
    // Asked again, 1 catches up from scratch and drafts what it would have.
    proposer.propose(&[1, 2], &[DraftAsk { id: 1, tokens: &a, max: 2 }], &mut out).unwrap();
    assert_eq!(out[0], continuation(&mut reference, &a, 2));
    let (ms, tokens) = proposer.last_rounds();
    assert_eq!(tokens, 1, "one single-token round after the first forward");
    assert!(ms >= 0.0);
}
