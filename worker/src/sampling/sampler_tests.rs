//! Behaviour of `SequenceSampler` as the engine sees it.

use super::*;

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams { seed: Some(seed), ..Default::default() }
}

/// A fixed, varied row of logits in [-4, 4).
fn varied_logits(vocab: usize, salt: u64) -> Vec<f32> {
    (0..vocab as u64)
        .map(|i| {
            let h = expand_seed(i ^ (salt << 32));
            (u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as f32 / u32::MAX as f32) * 8.0 - 4.0
        })
        .collect()
}

/// Draws `n` tokens, each from a fresh copy of `logits`, without recording them.
fn draws(sampler: &mut SequenceSampler, logits: &[f32], params: &SamplingParams, n: usize) -> Vec<TokenId> {
    (0..n).map(|_| sampler.sample(&mut logits.to_vec(), params, &[]).token).collect()
}

/// Empirical frequency of each token over `n` draws.
fn frequencies(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
    let mut sampler = SequenceSampler::new(params, 0, &[], logits.len());
    let mut counts = vec![0usize; logits.len()];
    for t in draws(&mut sampler, logits, params, n) {
        counts[t as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / n as f64).collect()
}

fn softmax_f64(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let e: Vec<f64> = logits.iter().map(|&x| ((f64::from(x) - max) / temperature).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[test]
fn greedy_picks_the_argmax_with_ties_to_the_lowest_id() {
    let params = SamplingParams::greedy();
    let mut sampler = SequenceSampler::new(&params, 0, &[], 1000);
    let mut logits = varied_logits(1000, 1);
    logits[613] = 9.0;
    logits[808] = 9.0;
    assert_eq!(sampler.sample(&mut logits.clone(), &params, &[]).token, 613);
    // top_k = 1 is greedy too, whatever the temperature.
    let top1 = SamplingParams { top_k: Some(1), temperature: 1.5, ..seeded(3) };
    assert_eq!(sampler.sample(&mut logits, &top1, &[]).token, 613);
}

#[test]
fn same_seed_gives_the_same_tokens_and_different_seeds_differ() {
    let logits = varied_logits(500, 2);
    let run = |seed| {
        let params = SamplingParams { temperature: 1.3, ..seeded(seed) };
        let mut sampler = SequenceSampler::new(&params, 0, &[], 500);
        draws(&mut sampler, &logits, &params, 200)
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn seed_streams_differ_from_each_other_but_reproduce() {
    let logits = varied_logits(500, 3);
    let params = SamplingParams { temperature: 1.3, ..seeded(7) };
    let parent = SequenceSampler::new(&params, 0, &[], 500);
    let stream = |s| draws(&mut parent.fork(s), &logits, &params, 200);
    assert_eq!(stream(1), stream(1));
    assert_ne!(stream(1), stream(2));
    let mut direct = SequenceSampler::new(&params, 2, &[], 500);
    assert_eq!(stream(2), draws(&mut direct, &logits, &params, 200));
}

#[test]
fn unseeded_forks_share_a_key_so_equal_streams_agree() {
    let logits = varied_logits(500, 4);
    let params = SamplingParams { temperature: 1.3, ..Default::default() };
    let parent = SequenceSampler::new(&params, 0, &[], 500);
    let a = draws(&mut parent.fork(5), &logits, &params, 100);
    assert_eq!(a, draws(&mut parent.fork(5), &logits, &params, 100));
    assert_ne!(a, draws(&mut parent.fork(6), &logits, &params, 100));
}

#[test]
fn temperature_sampling_follows_the_softmax_distribution() {
    let logits = [1.0f32, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, 0.2];
    for temperature in [0.7f32, 1.0, 2.0] {
        let params = SamplingParams { temperature, ..seeded(11) };
        let got = frequencies(&params, &logits, 100_000);
        let want = softmax_f64(&logits, f64::from(temperature));
        for (g, w) in got.iter().zip(&want) {
            // Five standard deviations of a frequency over 100k draws is at most 0.008.
            assert!((g - w).abs() < 0.008, "T={temperature}: got {got:?}, want {want:?}");
        }
    }
}

#[test]
fn top_k_two_never_samples_outside_the_top_two() {
    let mut logits = vec![2.9f32; 1000];
    logits[100] = 3.0;
    logits[900] = 3.05;
    let params = SamplingParams { top_k: Some(2), temperature: 5.0, ..seeded(5) };
    let freq = frequencies(&params, &logits, 20_000);
    let outside: f64 = freq.iter().enumerate().filter(|&(i, _)| i != 100 && i != 900).map(|(_, f)| f).sum();
    assert_eq!(outside, 0.0);
    assert!(freq[100] > 0.4 && freq[900] > 0.4, "{} {}", freq[100], freq[900]);
}

#[test]
fn top_p_half_samples_only_the_nucleus_in_proportion() {
    // Probabilities 0.1, 0.4, 0.2, 0.3: the nucleus for p = 0.5 is {1, 3}.
    let logits: Vec<f32> = [0.1f32, 0.4, 0.2, 0.3].iter().map(|p| p.ln()).collect();
    let params = SamplingParams { top_p: 0.5, ..seeded(9) };
    let freq = frequencies(&params, &logits, 50_000);
    assert_eq!(freq[0] + freq[2], 0.0, "{freq:?}");
    assert!((freq[1] - 4.0 / 7.0).abs() < 0.01, "{freq:?}");
}

#[test]
fn min_p_drops_tokens_below_the_fraction_of_the_best() {
    // Probabilities 0.5, 0.3, 0.04, 0.16; min_p = 0.1 keeps p >= 0.05.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.04, 0.16].iter().map(|p| p.ln()).collect();
    let params = SamplingParams { min_p: 0.1, ..seeded(13) };
    let freq = frequencies(&params, &logits, 50_000);
    assert_eq!(freq[2], 0.0, "{freq:?}");
    for (i, want) in [(0, 0.5 / 0.96), (1, 0.3 / 0.96), (3, 0.16 / 0.96)] {
        assert!((freq[i] - want).abs() < 0.01, "{freq:?}");
    }
}

#[test]
fn penalties_change_logits_exactly_as_the_formulas_say() {
    let params = SamplingParams {
        repetition_penalty: 2.0,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::greedy()
    };
    // Prompt {1, 2}; output 2, 3, 3, and 9 (outside the row of 6, ignored).
    let mut sampler = SequenceSampler::new(&params, 0, &[1, 2, 2], 6);
    for t in [2, 3, 3, 9] {
        sampler.record(t);
    }
    let raw = [1.0f32, 3.0, -1.0, 4.0, 2.0, -2.0];
    let mut logits = raw;
    sampler.process(&mut logits, &params, &[]);
    let (rep, freq, presence) = (2.0, 0.5, 0.25);
    let want = [
        raw[0],                                 // unseen
        raw[1] / rep,                           // prompt only, positive: divided
        raw[2] * rep - (freq + presence),       // prompt + once in the output, negative: multiplied
        raw[3] / rep - (2.0 * freq + presence), // twice in the output
        raw[4],
        raw[5],
    ];
    assert_eq!(logits, want);

    // Without a repetition penalty the prompt is not tracked at all.
    let params = SamplingParams { frequency_penalty: 1.0, ..SamplingParams::greedy() };
    let mut sampler = SequenceSampler::new(&params, 0, &[0, 1], 3);
    sampler.record(1);
    let mut logits = [1.0f32, 1.0, 1.0];
    sampler.process(&mut logits, &params, &[]);
    assert_eq!(logits, [1.0, 0.0, 1.0]);
}

#[test]
fn penalty_free_samplers_keep_no_history() {
    let mut sampler = SequenceSampler::new(&SamplingParams::greedy(), 0, &[1, 2, 3], 10);
    sampler.record(4);
    assert!(sampler.history.is_none());
}

#[test]
fn logit_bias_plus_100_forces_a_token_and_minus_100_forbids_it() {
    let logits = varied_logits(2000, 6);
    let best = argmax(&logits).unwrap() as TokenId;
    let params = SamplingParams { logit_bias: vec![(1234, 100.0), (best, -100.0)], ..seeded(1) };
    let freq = frequencies(&params, &logits, 2000);
    assert_eq!(freq[1234], 1.0);
    let forbid = SamplingParams { logit_bias: vec![(best, -100.0)], ..SamplingParams::greedy() };
    let mut sampler = SequenceSampler::new(&forbid, 0, &[], 2000);
    assert_ne!(sampler.sample(&mut logits.clone(), &forbid, &[]).token, best);
    let forbid = SamplingParams { temperature: 2.0, ..forbid };
    assert_eq!(frequencies(&forbid, &logits, 5000)[best as usize], 0.0);
}

#[test]
fn suppressed_ids_are_never_chosen() {
    let mut logits = vec![0.0f32; 50];
    logits[7] = 10.0;
    logits[8] = 9.0;
    let suppress = [7, 8, 1000];
    let greedy = SamplingParams::greedy();
    let mut sampler = SequenceSampler::new(&greedy, 0, &[], 50);
    assert_eq!(sampler.sample(&mut logits.clone(), &greedy, &suppress).token, 0);
    let params = SamplingParams { top_p: 0.9, ..seeded(2) };
    let mut sampler = SequenceSampler::new(&params, 0, &[], 50);
    for _ in 0..2000 {
        let t = sampler.sample(&mut logits.clone(), &params, &suppress).token;
        assert!(t != 7 && t != 8);
    }
}

#[test]
fn logprobs_are_the_raw_log_softmax_sorted_descending() {
    let logits = varied_logits(3000, 8);
    let want = softmax_f64(&logits, 1.0);
    // Penalties, bias and temperature must not leak into the reported logprobs.
    let params = SamplingParams {
        logprobs: Some(5),
        repetition_penalty: 1.5,
        logit_bias: vec![(17, 30.0)],
        temperature: 0.5,
        ..seeded(4)
    };
    let mut sampler = SequenceSampler::new(&params, 0, &[1, 2, 3], 3000);
    let out = sampler.sample(&mut logits.clone(), &params, &[]);
    assert_eq!(out.token, 17);
    assert!((f64::from(out.logprob) - want[17].ln()).abs() < 1e-4, "{} vs {}", out.logprob, want[17].ln());
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    assert_eq!(out.top_logprobs.len(), 5);
    for (&(id, lp), &i) in out.top_logprobs.iter().zip(&order) {
        assert_eq!(id as usize, i);
        assert!((f64::from(lp) - want[i].ln()).abs() < 1e-4);
    }
    assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));

    let none = SamplingParams::greedy();
    let out = SequenceSampler::new(&none, 0, &[], 3000).sample(&mut logits.clone(), &none, &[]);
    assert!(out.top_logprobs.is_empty());
}

#[test]
fn nan_and_infinite_logits_never_panic_or_leave_the_row() {
    let greedy = SamplingParams { logprobs: Some(3), ..SamplingParams::greedy() };
    let sampled = SamplingParams { logprobs: Some(3), top_p: 0.8, ..seeded(1) };
    let plain = seeded(1);
    let nan = f32::NAN;
    let rows: [(&[f32], &[TokenId], TokenId); 6] = [
        (&[nan, 20.0, nan, 0.5], &[], 1),
        (&[nan, nan, nan], &[], 0),
        (&[f32::NEG_INFINITY; 4], &[0, 1], 2),
        (&[1.0, 2.0], &[0, 1], 0),
        (&[], &[], 0),
        (&[0.0, f32::INFINITY, nan, 5.0], &[], 1),
    ];
    for (row, suppress, want) in rows {
        for params in [&greedy, &sampled, &plain] {
            let mut sampler = SequenceSampler::new(params, 0, &[], row.len());
            let out = sampler.sample(&mut row.to_vec(), params, suppress);
            assert_eq!(out.token, want, "{row:?} {params:?}");
            assert!(!out.logprob.is_nan(), "{row:?}");
            assert!(out.top_logprobs.iter().all(|&(t, lp)| (t as usize) < row.len() && !lp.is_nan()));
        }
    }
    // A NaN next to finite values is never drawn.
    let params = SamplingParams { temperature: 3.0, ..seeded(2) };
    let freq = frequencies(&params, &[0.0, nan, 0.0, nan], 5000);
    assert_eq!(freq[1] + freq[3], 0.0);
}

#[test]
fn large_vocabulary_top_p_and_top_k_stay_inside_the_reference_sets() {
    let vocab = 128_256;
    let logits: Vec<f32> = varied_logits(vocab, 10).iter().map(|x| x * 3.0).collect();
    let probs = softmax_f64(&logits, 1.0);
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut nucleus = vec![false; vocab];
    let mut above = 0.0;
    for &i in &order {
        if above >= 0.9 {
            break;
        }
        nucleus[i] = true;
        above += probs[i];
    }
    let top_p = SamplingParams { top_p: 0.9, ..seeded(21) };
    let top_k = SamplingParams { top_k: Some(50), ..seeded(21) };
    let mut a = SequenceSampler::new(&top_p, 0, &[], vocab);
    let mut b = SequenceSampler::new(&top_k, 0, &[], vocab);
    for _ in 0..200 {
        assert!(nucleus[a.sample(&mut logits.clone(), &top_p, &[]).token as usize]);
        let t = b.sample(&mut logits.clone(), &top_k, &[]).token as usize;
        assert!(order[..50].contains(&t));
    }
}

#[test]
fn a_mask_confines_every_sampling_mode_and_logprobs_describe_the_masked_distribution() {
    let vocab = 3000;
    let logits = varied_logits(vocab, 9);
    // Allowed: every 7th id; the row's argmax is almost surely outside that set.
    let mut words = vec![0u32; vocab.div_ceil(32)];
    for id in (0..vocab).step_by(7) {
        words[id / 32] |= 1 << (id % 32);
    }
    let modes = [
        SamplingParams { temperature: 0.0, ..seeded(1) },
        seeded(2),
        SamplingParams { top_k: Some(5), ..seeded(3) },
        SamplingParams { top_p: 0.5, ..seeded(4) },
        SamplingParams { min_p: 0.3, ..seeded(5) },
        SamplingParams { repetition_penalty: 1.5, frequency_penalty: 1.0, logit_bias: vec![(1, 100.0)], ..seeded(6) },
        SamplingParams { logprobs: Some(4), ..seeded(7) },
    ];
    for p in modes {
        let mut sampler = SequenceSampler::new(&p, 0, &[1, 2], vocab);
        for _ in 0..50 {
            let s = sampler.sample_masked(&mut logits.clone(), &p, &[], Some(&words));
            assert_eq!(s.token % 7, 0, "{p:?}: {} is masked", s.token);
            sampler.record(s.token);
            if p.logprobs.is_some() {
                // Log-softmax over the allowed ids only (vLLM: the bitmask comes before logprobs).
                let allowed: Vec<f32> = (0..vocab).step_by(7).map(|i| logits[i]).collect();
                let lse = allowed.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
                let want = f64::from(logits[s.token as usize]) - lse;
                assert!((f64::from(s.logprob) - want).abs() < 1e-4, "{} vs {want}", s.logprob);
                assert!(s.top_logprobs.iter().all(|&(t, lp)| t % 7 == 0 && lp.is_finite()));
            }
        }
    }
    // Nothing allowed is finite: the lowest allowed id, not the row's lowest id.
    let mut row = vec![f32::NEG_INFINITY; 40];
    let s = SequenceSampler::new(&seeded(1), 0, &[], 40).sample_masked(&mut row, &seeded(1), &[], Some(&[1 << 9, 0]));
    assert_eq!(s.token, 9);
}

/// Samples the tokens of `steps`, each from its own row and recorded, as the engine does.
fn generate(sampler: &mut SequenceSampler, params: &SamplingParams, steps: std::ops::Range<u64>) -> Vec<TokenId> {
    steps
        .map(|step| {
            let token = sampler.sample(&mut varied_logits(64, step), params, &[]).token;
            sampler.record(token);
            token
        })
        .collect()
}

#[test]
fn a_resumed_sampler_continues_the_seeded_stream_and_penalties_where_the_first_stopped() {
    let sampled = SamplingParams { temperature: 1.2, top_p: 0.9, frequency_penalty: 0.7, ..seeded(17) };
    let top_k = SamplingParams { top_k: Some(8), presence_penalty: 0.5, repetition_penalty: 1.3, ..seeded(5) };
    let greedy = SamplingParams { temperature: 0.0, frequency_penalty: 1.5, ..seeded(3) };
    for params in [sampled, top_k, greedy] {
        let prompt = [1, 2, 3];
        let whole = generate(&mut SequenceSampler::new(&params, 0, &prompt, 64), &params, 0..24);
        for cut in [1, 9, 23] {
            let mut resumed = SequenceSampler::new(&params, 0, &prompt, 64);
            resumed.resume(&params, &whole[..cut]);
            let rest = generate(&mut resumed, &params, cut as u64..24);
            assert_eq!(rest, whole[cut..], "{params:?} resumed after {cut} tokens");
        }
    }
}
