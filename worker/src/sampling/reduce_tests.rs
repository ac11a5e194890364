//! A reduced row must give the very token the full row gives (`sample` vs `sample_reduced` on
//! the reference reduction), whatever the penalties, bias, suppression, ties and seeds.

use super::*;
use crate::TokenId;
use crate::sampling::{SamplingParams, SequenceSampler};
use crate::splitmix::SplitMix64;

const VOCAB: usize = 3000;

/// Logits with many exact ties (a coarse grid), a few NaN and infinities.
fn row(s: &mut SplitMix64) -> Vec<f32> {
    (0..VOCAB)
        .map(|_| match s.below(200) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -0.0,
            _ => (s.below(64) as f32 - 40.0) * 0.25,
        })
        .collect()
}

fn params(s: &mut SplitMix64, case: usize) -> SamplingParams {
    let mut p = SamplingParams { seed: Some(s.next_u64()), ..SamplingParams::default() };
    match case % 4 {
        0 => p.temperature = 0.0,
        1 => p.top_k = Some(1 + s.below(DEVICE_TOP_K_MAX)),
        2 => {
            p.top_k = Some(1 + s.below(DEVICE_TOP_K_MAX));
            p.top_p = 0.7;
            p.min_p = 0.05;
            p.temperature = 0.6;
        }
        _ => {
            p.top_k = Some(DEVICE_TOP_K_MAX);
            p.temperature = 1.4;
        }
    }
    if !case.is_multiple_of(3) {
        p.repetition_penalty = 1.3;
        p.frequency_penalty = 0.5;
        p.presence_penalty = -0.25;
    }
    p.logit_bias = (0..s.below(5)).map(|i| ((i * 577 + s.below(500)) as TokenId, 3.5)).collect();
    p
}

/// The first reduced row of `out`, as the sampler takes it.
fn first_row(out: &ReducedRows) -> Reduced<'_> {
    match &out.rows[0] {
        RowResult::Token(t) => Reduced::Token(*t),
        RowResult::TopK(r) => Reduced::TopK(&out.candidates[r.clone()]),
        RowResult::Full(_) => unreachable!("planned a reduction"),
    }
}

#[test]
fn a_reduced_row_samples_the_same_token_as_the_full_row() {
    let mut s = SplitMix64(7);
    let mut devicewise = 0;
    for case in 0..400 {
        let p = params(&mut s, case);
        let prompt: Vec<TokenId> = (0..20).map(|_| s.below(VOCAB) as TokenId).collect();
        let mut full = SequenceSampler::new(&p, 0, &prompt, VOCAB);
        let mut reduced = full.clone();
        for _ in 0..s.below(6) {
            let t = s.below(VOCAB) as TokenId;
            full.record(t);
            reduced.record(t);
        }
        let suppress: Vec<TokenId> = (0..s.below(3)).map(|_| s.below(VOCAB) as TokenId).collect();
        for _ in 0..3 {
            let row = row(&mut s);
            let plan = reduced.plan_row(&p, &suppress);
            assert_ne!(plan.reduction, Reduction::Full, "case {case}: {p:?}");
            devicewise += 1;
            let mut out = ReducedRows::default();
            reduce_row(&mut row.clone(), &plan, &mut out);
            let got = reduced.sample_reduced(first_row(&out), &p, &suppress, None).token;
            let want = full.sample(&mut row.clone(), &p, &suppress).token;
            assert_eq!(got, want, "case {case}: {p:?}");
            full.record(want);
            reduced.record(got);
        }
    }
    assert_eq!(devicewise, 1200);
}

#[test]
fn rows_the_device_cannot_reduce_exactly_are_planned_full() {
    let sampler = |p: &SamplingParams| SequenceSampler::new(p, 0, &[], VOCAB);
    let logprobs = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
    let whole_vocab = SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() };
    let big_k = SamplingParams { top_k: Some(DEVICE_TOP_K_MAX + 1), ..Default::default() };
    let twice = SamplingParams { temperature: 0.0, logit_bias: vec![(5, 1.0), (5, 2.0)], ..Default::default() };
    for p in [logprobs, whole_vocab, big_k, twice] {
        assert_eq!(sampler(&p).plan_row(&p, &[]), RowPlan::full(), "{p:?}");
    }
    // Greedy with a bias and a suppressed id: argmax after one edit per token.
    let p = SamplingParams { temperature: 0.0, logit_bias: vec![(9, 2.0)], ..Default::default() };
    let plan = sampler(&p).plan_row(&p, &[9, 4000]);
    assert_eq!(plan.reduction, Reduction::Argmax);
    assert_eq!(plan.edits, vec![TokenEdit { bias: Some(2.0), suppress: true, ..TokenEdit::new(9) }]);
}

#[test]
fn every_value_at_minus_infinity_falls_back_like_the_full_row() {
    let p = SamplingParams { top_k: Some(3), seed: Some(1), ..Default::default() };
    let mut a = SequenceSampler::new(&p, 0, &[], 10);
    let mut b = a.clone();
    let row = vec![f32::NEG_INFINITY; 10];
    let plan = a.plan_row(&p, &[0, 1]);
    let mut out = ReducedRows::default();
    reduce_row(&mut row.clone(), &plan, &mut out);
    let RowResult::TopK(r) = out.rows[0].clone() else { panic!("top-k planned") };
    let got = a.sample_reduced(Reduced::TopK(&out.candidates[r]), &p, &[0, 1], None).token;
    assert_eq!(got, b.sample(&mut row.clone(), &p, &[0, 1]).token);
    assert_eq!(got, 2);
}

/// A structured-output mask: every id allowed with odds 1 in `sparsity`, plus one id.
fn mask(s: &mut SplitMix64, sparsity: usize) -> Vec<u32> {
    let mut words = vec![0u32; VOCAB.div_ceil(32)];
    let one = s.below(VOCAB);
    for id in (0..VOCAB).filter(|_| s.below(sparsity) == 0).chain([one]) {
        words[id / 32] |= 1 << (id % 32);
    }
    words
}

#[test]
fn a_masked_reduced_row_samples_the_same_allowed_token_as_the_masked_full_row() {
    let mut s = SplitMix64(23);
    for case in 0..300 {
        let p = params(&mut s, case);
        let mut full = SequenceSampler::new(&p, 0, &[1, 2, 3], VOCAB);
        let mut reduced = full.clone();
        let words = mask(&mut s, [2, 8, 500, VOCAB][case % 4]);
        let suppress: Vec<TokenId> = (0..s.below(3)).map(|_| s.below(VOCAB) as TokenId).collect();
        let row = row(&mut s);
        let mut plan = reduced.plan_row(&p, &suppress);
        plan.mask = Some(crate::grammar::TokenMask::from_words(words.clone()));
        let mut out = ReducedRows::default();
        reduce_row(&mut row.clone(), &plan, &mut out);
        let got = reduced.sample_reduced(first_row(&out), &p, &suppress, Some(&words)).token;
        let want = full.sample_masked(&mut row.clone(), &p, &suppress, Some(&words)).token;
        assert_eq!(got, want, "case {case}: {p:?}");
        assert!(words[got as usize / 32] & (1 << (got % 32)) != 0, "case {case}: {got} is not allowed");
    }
}
