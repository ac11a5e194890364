//! Top-p and min-p over relative weights, without sorting the vocabulary.
//!
//! Weights are `e^((x_i - max) / T)`: the best token weighs exactly 1 and all are in [0, 1]. The
//! filters apply in vLLM's documented order: top-k (done by the caller, see `row::top_k_into`),
//! then top-p over the remaining distribution renormalised, then min-p (keep weight >= `min_p`
//! times the best; the best token survives top-k and top-p, so this is an intersection). At least
//! one token (the best) always survives. Ranking is `row::rank`: weight, then lower id.
//!
//! The nucleus is a prefix of the ranking, so over a full row it is described by its last token
//! and applied by one masking pass. Finding that token never sorts the vocabulary: candidates
//! above a weight threshold are exactly a prefix of the ranking, and when they hold `p` of the
//! mass (a peaked LLM distribution: a few hundred tokens) only they are ranked. Otherwise a
//! radix histogram of the weights' bits (up to three 10-bit digits) locates the bucket the cut
//! falls in and only that bucket is ranked, by repeated selection (expected linear time).

use super::row::{gather_range, rank};

/// Candidates first gathered at this weight relative to the best token.
const FIRST_THRESHOLD: f32 = 1e-4;

/// Below this many candidates the nucleus is cut by sorting them.
const SORT_BELOW: usize = 64;

/// Weight buckets, radix style: a positive `f32`'s bits in three 10-bit digits, most significant
/// first (the first digit keeps sign and exponent plus 3 mantissa bits: 1/8 octave). Bits order
/// like the weights they encode, so bucket order is weight order at every level.
const DIGITS: [u32; 3] = [20, 10, 0];
const BUCKETS: usize = 1024;

fn digit(w: f32, shift: u32) -> usize {
    ((w.to_bits() >> shift) as usize) & (BUCKETS - 1)
}

/// The first gather gives up beyond this many candidates (a flat distribution) for the
/// histogram route.
const GATHER_LIMIT: usize = 4096;

/// Candidate sets above this size are narrowed by another radix digit before selection.
const REFINE_ABOVE: usize = 1024;

/// The last token (id, weight) of the top-p nucleus of a full row of weights summing to `total`:
/// the nucleus is every token ranked at or above it (see `row::mask_ranked_below`). `top_p >= 1`
/// keeps everything (`(u32::MAX, 0.0)`). `scratch` is reused.
pub(crate) fn nucleus_cut(weights: &[f32], total: f64, top_p: f32, scratch: &mut Vec<(u32, f32)>) -> (u32, f32) {
    const KEEP_ALL: (u32, f32) = (u32::MAX, 0.0);
    if top_p >= 1.0 {
        return KEEP_ALL;
    }
    let goal = f64::from(top_p) * total;
    let sparse = gather_range(weights, FIRST_THRESHOLD, f32::INFINITY, GATHER_LIMIT, scratch);
    let mut above = 0.0f64;
    let mut digits = &DIGITS[..];
    if !sparse || scratch.iter().map(|&(_, w)| f64::from(w)).sum::<f64>() < goal {
        // A flat head or a heavy tail: find the first-digit bucket the cut falls in and gather
        // only it, reading the row directly rather than copying it into candidates.
        let (b, mass_above) = boundary(weights.iter().copied(), DIGITS[0], 0.0, goal);
        above = mass_above;
        let lo = f32::from_bits((b as u32) << DIGITS[0]);
        let hi = f32::from_bits((b as u32 + 1) << DIGITS[0]);
        gather_range(weights, lo, hi, usize::MAX, scratch);
        digits = &DIGITS[1..];
    }
    // Narrow large candidate sets (flat distributions) digit by digit to the bucket of the cut.
    for &shift in digits {
        if scratch.len() <= REFINE_ABOVE {
            break;
        }
        let (b, mass_above) = boundary(scratch.iter().map(|&(_, w)| w), shift, above, goal);
        above = mass_above;
        scratch.retain(|&(_, w)| digit(w, shift) == b);
    }
    let n = cut_sorted_prefix(scratch, above, goal);
    n.checked_sub(1).and_then(|last| scratch.get(last)).copied().unwrap_or(KEEP_ALL)
}

/// Over weights that share every digit above `shift` and rank below mass `above`: the highest
/// digit value at which the mass so far reaches `goal` (the bucket holding the cut), and the mass
/// ranked above that bucket.
fn boundary(weights: impl Iterator<Item = f32>, shift: u32, mut above: f64, goal: f64) -> (usize, f64) {
    // Four interleaved histograms, so runs of equal buckets do not serialise on one counter.
    let mut hist = [[0.0f64; BUCKETS]; 4];
    for (i, w) in weights.enumerate() {
        hist[i & 3][digit(w, shift)] += f64::from(w);
    }
    // If rounding keeps the goal out of reach, the cut is the last token: the lowest non-empty
    // bucket.
    let mut last = (0, above);
    for b in (0..BUCKETS).rev() {
        let mass = (hist[0][b] + hist[1][b]) + (hist[2][b] + hist[3][b]);
        if above + mass >= goal {
            return (b, above);
        }
        if mass > 0.0 {
            last = (b, above);
        }
        above += mass;
    }
    last
}

/// Top-p then min-p over a complete candidate set (`kept` holds the whole distribution being
/// cut, e.g. the top-k tokens, weights relative to the best); `top_p >= 1` keeps everything.
pub(crate) fn top_p_min_p_set(kept: &mut Vec<(u32, f32)>, top_p: f32, min_p: f32) {
    if top_p < 1.0 {
        let goal = f64::from(top_p) * kept.iter().map(|&(_, w)| f64::from(w)).sum::<f64>();
        let n = cut_sorted_prefix(kept, 0.0, goal);
        kept.truncate(n.max(1));
    }
    if min_p > 0.0 {
        kept.retain(|&(_, w)| w >= min_p);
    }
}

/// Within `slice` (tokens ranked below everything before it, whose mass is `above`), how many
/// best-ranked tokens the nucleus keeps; `slice` ends with those first, in rank order. Repeated
/// selection halves the range (expected O(n)); the last few are sorted.
fn cut_sorted_prefix(slice: &mut [(u32, f32)], mut above: f64, goal: f64) -> usize {
    // Invariant: slice[..lo] are kept, ranked best, with `above` < goal including them; the cut
    // lies in [lo, hi] and slice[lo..hi] are the next-ranked tokens.
    let (mut lo, mut hi) = (0, slice.len());
    while hi - lo > SORT_BELOW {
        let mid = lo + (hi - lo) / 2;
        slice[lo..hi].select_nth_unstable_by(mid - lo, rank);
        let mass: f64 = slice[lo..mid].iter().map(|&(_, w)| f64::from(w)).sum();
        if above + mass >= goal {
            hi = mid;
        } else {
            above += mass;
            lo = mid;
        }
    }
    slice[lo..hi].sort_unstable_by(rank);
    for (i, &(_, w)) in slice[lo..hi].iter().enumerate() {
        if above >= goal {
            return lo + i;
        }
        above += f64::from(w);
    }
    hi
}

/// The id drawn from `kept` in proportion to its weight, `u` uniform in [0, 1); `None` only when
/// `kept` is empty. Deterministic for a given `kept` order and `u`.
pub(crate) fn pick(kept: &[(u32, f32)], u: f64) -> Option<u32> {
    let total: f64 = kept.iter().map(|&(_, w)| f64::from(w)).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    for &(id, w) in kept {
        acc += f64::from(w);
        if acc > target && w > 0.0 {
            return Some(id);
        }
    }
    // Only reached when rounding put the target at the total, or every weight is 0.
    kept.iter().rev().find(|&&(_, w)| w > 0.0).or(kept.last()).map(|&(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::row::mask_ranked_below;

    fn sorted_ids(kept: &[(u32, f32)]) -> Vec<u32> {
        let mut ids: Vec<u32> = kept.iter().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        ids
    }

    /// The ids a full row keeps under top-p then min-p, as the sampler applies them.
    fn row(weights: &[f32], top_p: f32, min_p: f32) -> Vec<u32> {
        let total = weights.iter().map(|&w| f64::from(w)).sum();
        let mut w = weights.to_vec();
        let cut = nucleus_cut(&w, total, top_p, &mut Vec::new());
        mask_ranked_below(&mut w, cut, min_p);
        (0..w.len() as u32).filter(|&i| w[i as usize] > 0.0).collect()
    }

    /// The nucleus by the definition: sort everything, keep while the mass above is short of p.
    fn reference_nucleus(weights: &[f32], top_p: f32) -> Vec<u32> {
        let mut all: Vec<(u32, f32)> = weights.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
        all.sort_by(rank);
        let goal = f64::from(top_p) * weights.iter().map(|&w| f64::from(w)).sum::<f64>();
        let mut above = 0.0;
        let n = all
            .iter()
            .take_while(|&&(_, w)| {
                let keep = above < goal;
                above += f64::from(w);
                keep
            })
            .count();
        sorted_ids(&all[..n.max(1)])
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // Probabilities 0.3, 0.4, 0.1, 0.2 as weights relative to the best.
        let w = [0.75, 1.0, 0.25, 0.5];
        assert_eq!(row(&w, 0.5, 0.0), vec![0, 1]);
        assert_eq!(row(&w, 0.35, 0.0), vec![1]);
        assert_eq!(row(&w, 0.75, 0.0), vec![0, 1, 3]);
        assert_eq!(row(&w, 0.01, 0.0), vec![1]);
        assert_eq!(row(&w, 1.0, 0.0), vec![0, 1, 2, 3]);
        // Mass above the second token is exactly p: the nucleus is complete without it.
        assert_eq!(row(&[1.0, 0.5, 0.5], 0.5, 0.0), vec![0]);
    }

    #[test]
    fn top_p_matches_the_sorting_definition_on_large_rows() {
        // Peaked, long-tailed and flat rows, exercising every threshold and the selection loop.
        let peaked: Vec<f32> = (0..20_000u32).map(|i| (-((i * 7919 % 20_000) as f32) / 300.0).exp()).collect();
        let tail: Vec<f32> =
            (0..20_000u32).map(|i| if i == 3 { 1.0 } else { 5e-5 * (1.0 + (i % 7) as f32 / 10.0) }).collect();
        let flat: Vec<f32> = (0..5_000u32).map(|i| 0.5 + ((i * 31) % 97) as f32 / 194.0).collect();
        for (name, w) in [("peaked", &peaked), ("tail", &tail), ("flat", &flat)] {
            for p in [0.05, 0.5, 0.9, 0.999] {
                assert_eq!(row(w, p, 0.0), reference_nucleus(w, p), "{name} p = {p}");
            }
        }
    }

    #[test]
    fn top_p_applies_to_the_renormalised_candidate_set() {
        // The top-2 set {1.0, 0.9}: p = 0.5 of 1.9 is reached by the first token alone.
        let mut kept = vec![(0, 1.0), (1, 0.9)];
        top_p_min_p_set(&mut kept, 0.5, 0.0);
        assert_eq!(sorted_ids(&kept), vec![0]);
        let mut kept = vec![(0, 1.0), (1, 0.9)];
        top_p_min_p_set(&mut kept, 0.6, 0.0);
        assert_eq!(sorted_ids(&kept), vec![0, 1]);
        let mut kept = vec![(0, 1.0), (1, 0.5)];
        top_p_min_p_set(&mut kept, 0.5, 0.0);
        assert_eq!(sorted_ids(&kept), vec![0]);
    }

    #[test]
    fn min_p_drops_tokens_below_the_fraction_of_the_best() {
        let w = [1.0, 0.5, 0.09, 0.1, 0.2];
        assert_eq!(row(&w, 1.0, 0.1), vec![0, 1, 3, 4]);
        assert_eq!(row(&w, 0.9, 0.3), vec![0, 1]);
        assert_eq!(row(&w, 1.0, 1.0), vec![0]);
        // The same over a candidate set, as after top-k.
        let mut kept = vec![(0, 1.0), (1, 0.5), (2, 0.09), (3, 0.1)];
        top_p_min_p_set(&mut kept, 1.0, 0.1);
        assert_eq!(sorted_ids(&kept), vec![0, 1, 3]);
    }

    #[test]
    fn pick_walks_the_kept_weights_in_order() {
        let kept = [(7u32, 1.0f32), (3, 0.5), (9, 0.5)];
        assert_eq!(pick(&kept, 0.0), Some(7));
        assert_eq!(pick(&kept, 0.49), Some(7));
        assert_eq!(pick(&kept, 0.51), Some(3));
        assert_eq!(pick(&kept, 0.99), Some(9));
        assert_eq!(pick(&[(4, 0.0), (5, 0.0)], 0.5), Some(5));
        assert_eq!(pick(&[], 0.5), None);
    }
}
