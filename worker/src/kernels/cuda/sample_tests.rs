//! `reduce_rows` (sample.cu) against its CPU reference `sampling::reduce::reduce_row` on random
//! rows full of ties, NaN and infinities, with random edits and structured-output masks (dense,
//! sparse, one id, none at all): the results must be identical (the device path is exact, not
//! approximate). Needs a GPU.

use candle_core::{DType, Device, Tensor};

use super::CudaKernels;
use super::pack::HostPack;
use super::sample::{OUT_STRIDE, pack_masks, pack_plans, unpack};
use crate::grammar::{TokenMask, mask_words};
use crate::sampling::reduce::{DEVICE_TOP_K_MAX, ReducedRows, Reduction, RowPlan, RowResult, TokenEdit, reduce_row};
use crate::splitmix::SplitMix64;

/// One row: `coarse` rows sit on a grid of 128 values (ties everywhere, like bf16 logits),
/// the others are spread out; a few NaN, infinities and signed zeros in both.
fn row(s: &mut SplitMix64, vocab: usize, coarse: bool) -> Vec<f32> {
    (0..vocab)
        .map(|_| match s.below(4000) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -0.0,
            4 => 0.0,
            _ if coarse => (s.below(128) as f32 - 100.0) * 0.125,
            _ => s.unit() * 30.0 - 20.0,
        })
        .collect()
}

fn plan(s: &mut SplitMix64, vocab: usize) -> RowPlan {
    let reduction = match s.below(5) {
        0 => Reduction::Full,
        1 | 2 => Reduction::Argmax,
        _ => Reduction::TopK([1, 2, 17, DEVICE_TOP_K_MAX][s.below(4)]),
    };
    let mut tokens: Vec<u32> = (0..s.below(300)).map(|_| s.below(vocab) as u32).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let edits = tokens
        .into_iter()
        .map(|token| TokenEdit {
            token,
            repetition: (s.below(2) == 0).then(|| 1.0 + s.unit()),
            subtract: (s.below(2) == 0).then(|| s.unit() * 3.0 - 1.0),
            bias: (s.below(3) == 0).then(|| s.unit() * 200.0 - 100.0),
            suppress: s.below(5) == 0,
        })
        .collect();
    RowPlan { reduction, edits, mask: (s.below(3) == 0).then(|| mask(s, vocab)) }
}

/// A structured-output mask: half the ids, one in 64, a single id, or none.
fn mask(s: &mut SplitMix64, vocab: usize) -> TokenMask {
    let mut words = vec![0u32; mask_words(vocab)];
    let odds = [2, 64, 0, usize::MAX][s.below(4)];
    let mut allow = |id: usize| words[id / 32] |= 1 << (id % 32);
    match odds {
        0 => allow(s.below(vocab)),
        usize::MAX => {}
        n => (0..vocab).filter(|_| s.below(n) == 0).for_each(&mut allow),
    }
    TokenMask::from_words(words)
}

#[test]
fn reduce_rows_gives_exactly_the_cpu_references_tokens_and_candidates() {
    let dev = Device::new_cuda_with_stream(0).expect("a CUDA device (these tests run on a GPU machine)");
    let k = CudaKernels::load(&dev, DType::F32, 64).unwrap();
    let mut s = SplitMix64(11);
    for (vocab, rows) in [(1000, 24), (49_152, 12), (128_256, 40)] {
        let mut logits: Vec<f32> = Vec::new();
        let mut plans = Vec::new();
        for r in 0..rows {
            let mut row = row(&mut s, vocab, r % 2 == 0);
            if r == 3 {
                row.fill(f32::NEG_INFINITY); // nothing to choose: argmax None, top-k of -inf
            }
            logits.extend(row);
            plans.push(plan(&mut s, vocab));
        }
        plans[3].reduction = Reduction::TopK(5);
        plans[3].mask = None;
        plans[5].reduction = Reduction::Argmax;
        plans[5].edits.clear();
        // A greedy and a top-k row that the mask alone decides (its one allowed id, or nothing).
        let only = |id: usize| {
            let mut words = vec![0u32; mask_words(vocab)];
            words[id / 32] |= 1 << (id % 32);
            TokenMask::from_words(words)
        };
        plans[6].reduction = Reduction::Argmax;
        plans[6].mask = Some(only(vocab - 1));
        plans[7].reduction = Reduction::TopK(3);
        plans[7].mask = Some(TokenMask::from_words(vec![0; mask_words(vocab)]));

        let mut want = ReducedRows::default();
        for (row, plan) in logits.chunks_exact(vocab).zip(&plans) {
            reduce_row(&mut row.to_vec(), plan, &mut want);
        }

        let device_logits = Tensor::from_slice(&logits, (rows, vocab), &dev).unwrap();
        let mut pack = HostPack::default();
        let packed = pack_plans(&mut pack, &plans);
        let meta = pack.upload(&dev).unwrap();
        let mut mask_pack = HostPack::default();
        let masks = pack_masks(&mut mask_pack, &plans, vocab).map(|section| (mask_pack.upload(&dev).unwrap(), section));
        assert!(masks.is_some(), "some reduced rows are masked");
        let mask_ptr = masks.as_ref().map_or(0, |(pack, section)| pack.ptr(*section));
        let out = k.reduce_rows(&device_logits, meta.ptr(packed.desc()), meta.ptr(packed.edits()), mask_ptr).unwrap();
        let words = out.to_vec1::<u32>().unwrap();
        assert_eq!(words.len(), rows * OUT_STRIDE);
        let mut got = ReducedRows::default();
        unpack(&words, &plans, vocab, &mut got).unwrap();
        // Full rows come back as ranges of the caller's copy of those rows: compare the rest.
        let after = device_logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (r, plan) in plans.iter().enumerate() {
            let (got_row, want_row) = (&got.rows[r], &want.rows[r]);
            match (got_row, want_row) {
                (RowResult::Full(_), RowResult::Full(_)) => {
                    let (a, b) = (&after[r * vocab..(r + 1) * vocab], &logits[r * vocab..(r + 1) * vocab]);
                    assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "row {r}: a Full row changed");
                }
                (RowResult::TopK(g), RowResult::TopK(w)) => {
                    assert_eq!(&got.candidates[g.clone()], &want.candidates[w.clone()], "row {r} ({vocab}): {plan:?}");
                }
                _ => assert_eq!(got_row, want_row, "row {r} ({vocab}), {} edits", plan.edits.len()),
            }
        }
        // A row of -inf stays -inf under any edit: its 5 best are its first 5 ids.
        let RowResult::TopK(r3) = got.rows[3].clone() else { panic!("row 3 is planned top-k") };
        assert_eq!(got.candidates[r3].iter().map(|c| c.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        // A mask that allows nothing reads the whole row as -inf: the 3 best are the first 3 ids.
        let RowResult::TopK(r7) = got.rows[7].clone() else { panic!("row 7 is planned top-k") };
        assert_eq!(got.candidates[r7].iter().map(|c| c.0).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
