//! Single-pass kernels over one row of logits (length = vocabulary size, up to ~128k).
//!
//! Contract shared by every function here: NaN counts as `-inf` (it never wins a comparison and
//! carries no probability mass), `+inf` counts as `f32::MAX`, and nothing panics on any input,
//! including an empty row. Loops are written over fixed-size chunks with straight-line bodies so
//! the compiler vectorises them; sums run in one fixed order (`f32` lanes within a chunk, `f64`
//! across chunks), so the same row always gives bit-identical results (reproducible seeded
//! sampling depends on that), with or without AVX2. The hot kernels are compiled twice, for the
//! baseline target and for AVX2, and pick one at run time.

use std::cmp::Ordering;

/// Elements per chunk of the chunked loops. `chunk_sum` and every walk over `chunk_sum`s use it,
/// so a cumulative walk ends exactly on the total computed by `exp_in_place`.
pub(crate) const CHUNK: usize = 64;

/// Defines `pub(crate) fn $name`, which runs the `#[inline(always)]` body `$generic` compiled for
/// AVX2 when the CPU has it and for the baseline target otherwise. Both builds perform the same
/// IEEE operations in the same order (Rust never contracts into FMA), so results are identical.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* fn $name:ident / $avx2:ident ($($arg:ident: $ty:ty),*) -> $ret:ty = $generic:ident) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

/// `x` with NaN mapped to `-inf` and `+inf` to `f32::MAX`.
#[inline(always)]
pub(crate) fn sanitize(x: f32) -> f32 {
    // `x >= -inf` is false only for NaN.
    let x = if x >= f32::NEG_INFINITY { x } else { f32::NEG_INFINITY };
    if x > f32::MAX { f32::MAX } else { x }
}

/// Ranking of (id, sanitized value) pairs: higher value first, then lower id. A total order on
/// sanitized values, so results never depend on the sort or selection algorithm.
#[inline]
pub(crate) fn rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// `e^x` for `x <= 0` (larger inputs are clamped to 0), with relative error about 2e-7, and
/// exactly 0 for `x < -87` (including `-inf`), so a masked token can never be drawn.
///
/// Branch-free so the exp pass over the vocabulary vectorises (libm's `expf` does not).
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = if x > 0.0 {
        0.0
    } else if underflow {
        -87.0
    } else {
        x
    };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r on |r| <= ln2/2: the degree-6 remainder is below 1.2e-7.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-126, 0]: 2^n is the normal float with biased exponent n + 127.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if underflow { 0.0 } else { p * scale }
}

/// Sum of one chunk of non-negative weights: eight `f32` lanes (at most `CHUNK / 8` terms each, so
/// the relative error stays near 1e-6), widened to `f64` for running totals. The one summation
/// order every caller shares.
#[inline(always)]
pub(crate) fn chunk_sum(chunk: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 8];
    let mut octets = chunk.chunks_exact(8);
    for o in &mut octets {
        for (lane, &v) in lanes.iter_mut().zip(o) {
            *lane += v;
        }
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    let mut total = f64::from(((a + b) + (c + d)) + ((e + f) + (g + h)));
    for &v in octets.remainder() {
        total += f64::from(v);
    }
    total
}

/// Largest raw value of a chunk, NaN ignored, `-inf` for an empty or all-NaN chunk; not sanitized.
#[inline(always)]
fn chunk_max(chunk: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut octets = chunk.chunks_exact(8);
    for o in &mut octets {
        for (lane, &v) in lanes.iter_mut().zip(o) {
            // NaN compares false and leaves the lane unchanged.
            *lane = if v > *lane { v } else { *lane };
        }
    }
    lanes.iter().chain(octets.remainder()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
fn max_value_generic(row: &[f32]) -> f32 {
    sanitize(row.chunks(CHUNK).map(chunk_max).fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m }))
}

avx2_dispatch! {
    /// The largest sanitized value of the row; `-inf` when the row is empty or holds only NaN/-inf.
    fn max_value / max_value_avx2(row: &[f32]) -> f32 = max_value_generic
}

#[inline(always)]
fn argmax_generic(row: &[f32]) -> Option<usize> {
    // A vectorised max pass, then the first chunk holding the max (found with one vector compare
    // per chunk), then the position inside it.
    let max = max_value_generic(row);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let is_max = |v: f32| sanitize(v) == max;
    row.chunks(CHUNK).enumerate().find_map(|(c, chunk)| {
        if chunk.iter().map(|&v| u32::from(is_max(v))).sum::<u32>() == 0 {
            return None;
        }
        chunk.iter().position(|&v| is_max(v)).map(|i| c * CHUNK + i)
    })
}

avx2_dispatch! {
    /// Index of the largest value (the lowest index among ties), or `None` when every value is
    /// NaN or `-inf`.
    fn argmax / argmax_avx2(row: &[f32]) -> Option<usize> = argmax_generic
}

#[inline(always)]
fn exp_in_place_generic(row: &mut [f32], max: f32, temperature: f32, floor: f32) -> f64 {
    let inv_t = 1.0 / temperature;
    let mut total = 0.0f64;
    for chunk in row.chunks_mut(CHUNK) {
        for x in chunk.iter_mut() {
            let w = exp_nonpos((sanitize(*x) - max) * inv_t);
            *x = if w >= floor { w } else { 0.0 };
        }
        total += chunk_sum(chunk);
    }
    total
}

avx2_dispatch! {
    /// Replaces every value `x` by its relative weight `e^((x - max) / temperature)` (the best
    /// token weighs 1 when `max` is the row's `max_value`), zeroes weights below `floor`, and
    /// returns the total weight. NaN weighs 0.
    fn exp_in_place / exp_in_place_avx2(row: &mut [f32], max: f32, temperature: f32, floor: f32) -> f64
        = exp_in_place_generic
}

#[inline(always)]
fn cumulative_pick_generic(weights: &[f32], target: f64) -> Option<usize> {
    let mut acc = 0.0f64;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let s = chunk_sum(chunk);
        if acc + s > target {
            let mut inner = acc;
            for (i, &w) in chunk.iter().enumerate() {
                inner += f64::from(w);
                if inner > target && w > 0.0 {
                    return Some(c * CHUNK + i);
                }
            }
        }
        acc += s;
    }
    weights.iter().rposition(|&w| w > 0.0)
}

avx2_dispatch! {
    /// Index of the weight where the running sum first exceeds `target`, walking chunk sums the
    /// way `exp_in_place` added them up. `None` only when no weight is positive; a target at or
    /// past the total (rounding) gives the last positive weight.
    fn cumulative_pick / cumulative_pick_avx2(weights: &[f32], target: f64) -> Option<usize>
        = cumulative_pick_generic
}

#[inline(always)]
fn log_sum_exp_generic(row: &[f32]) -> f64 {
    let max = max_value_generic(row);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut total = 0.0f64;
    let mut buf = [0.0f32; CHUNK];
    for chunk in row.chunks(CHUNK) {
        for (b, &x) in buf.iter_mut().zip(chunk) {
            *b = exp_nonpos(sanitize(x) - max);
        }
        total += chunk_sum(&buf[..chunk.len()]);
    }
    f64::from(max) + total.ln()
}

avx2_dispatch! {
    /// `ln Σ e^x` over the row, computed around the maximum so it cannot overflow; `-inf` when
    /// every value is NaN or `-inf`.
    fn log_sum_exp / log_sum_exp_avx2(row: &[f32]) -> f64 = log_sum_exp_generic
}

#[inline(always)]
fn top_k_into_generic(row: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if k == 0 {
        return;
    }
    // Candidates accumulate unsorted; when the buffer holds `cap` the best k are kept and the
    // k-th becomes the bar later values must beat. Chunks entirely at or below the bar are
    // skipped with one vectorised max, which is what makes this a fraction of a full pass.
    let cap = 2 * k.max(32);
    let mut bar: Option<f32> = None;
    for (c, chunk) in row.chunks(CHUNK).enumerate() {
        if bar.is_some_and(|bar| sanitize(chunk_max(chunk)) <= bar) {
            continue;
        }
        for (i, &x) in chunk.iter().enumerate() {
            let x = sanitize(x);
            // Scanning in id order, a later value equal to the bar ranks below it.
            if bar.is_some_and(|bar| x <= bar) {
                continue;
            }
            out.push(((c * CHUNK + i) as u32, x));
            if out.len() == cap {
                out.select_nth_unstable_by(k - 1, rank);
                out.truncate(k);
                bar = Some(out[k - 1].1);
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, rank);
        out.truncate(k);
    }
    out.sort_unstable_by(rank);
}

avx2_dispatch! {
    /// Fills `out` with the `k` largest sanitized values and their indices, sorted by `rank`
    /// (descending, ties: lower index first). `out`'s capacity is reused.
    fn top_k_into / top_k_into_avx2(row: &[f32], k: usize, out: &mut Vec<(u32, f32)>) -> ()
        = top_k_into_generic
}

#[inline(always)]
fn gather_range_generic(weights: &[f32], lo: f32, hi: f32, limit: usize, out: &mut Vec<(u32, f32)>) -> bool {
    let inside = |w: f32| w >= lo && w < hi && w > 0.0;
    out.clear();
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        // `chunk_max` is never NaN.
        if chunk_max(chunk) < lo {
            continue;
        }
        // Groups of 8 are tested with one vector compare; only groups with a hit are walked.
        for (g, group) in chunk.chunks(8).enumerate() {
            if group.iter().map(|&w| u32::from(inside(w))).sum::<u32>() == 0 {
                continue;
            }
            let first = (c * CHUNK + g * 8) as u32;
            out.extend((first..).zip(group).filter(|&(_, &w)| inside(w)).map(|(i, &w)| (i, w)));
        }
        if out.len() > limit {
            return false;
        }
    }
    true
}

avx2_dispatch! {
    /// Fills `out` with every (index, weight) whose weight is positive and in [`lo`, `hi`), in
    /// index order, skipping chunks that lie wholly below `lo`. Gives up, returning false, once
    /// more than `limit` are found. `out`'s capacity is reused.
    fn gather_range / gather_range_avx2(weights: &[f32], lo: f32, hi: f32, limit: usize, out: &mut Vec<(u32, f32)>) -> bool
        = gather_range_generic
}

#[inline(always)]
fn mask_ranked_below_generic(weights: &mut [f32], cut: (u32, f32), floor: f32) -> f64 {
    let (cut_id, cut_w) = cut;
    let mut total = 0.0f64;
    for (c, chunk) in weights.chunks_mut(CHUNK).enumerate() {
        let first = (c * CHUNK) as u32;
        for (i, w) in (first..).zip(chunk.iter_mut()) {
            let keep = (*w > cut_w || (*w == cut_w && i <= cut_id)) && *w >= floor;
            // An unconditional store of the masked bits: written as a select, the compiler emits
            // masked stores, which are microcoded and slow on AMD.
            *w = f32::from_bits(w.to_bits() & 0u32.wrapping_sub(u32::from(keep)));
        }
        total += chunk_sum(chunk);
    }
    total
}

avx2_dispatch! {
    /// Zeroes every weight that `rank`s below the token `cut` (id, weight) or lies below `floor`,
    /// and returns the remaining total, summed the way `cumulative_pick` walks.
    fn mask_ranked_below / mask_ranked_below_avx2(weights: &mut [f32], cut: (u32, f32), floor: f32) -> f64
        = mask_ranked_below_generic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_f64_exp_to_float_precision() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpos(x));
            assert!(((got - want) / want).abs() < 4e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn argmax_takes_the_lowest_index_among_ties_and_ignores_nan() {
        let mut row = vec![0.0f32; 100];
        row[7] = f32::NAN;
        row[40] = 3.0;
        row[77] = 3.0;
        assert_eq!(argmax(&row), Some(40));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), None);
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::INFINITY, f32::INFINITY]), Some(2));
    }

    #[test]
    fn cumulative_pick_lands_on_the_weight_covering_the_target() {
        let weights: Vec<f32> = (0..50).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
        let total: f64 = weights.chunks(CHUNK).map(chunk_sum).sum();
        assert_eq!(total, 17.0);
        assert_eq!(cumulative_pick(&weights, 0.0), Some(0));
        assert_eq!(cumulative_pick(&weights, 1.5), Some(3));
        assert_eq!(cumulative_pick(&weights, 16.99), Some(48));
        assert_eq!(cumulative_pick(&weights, 17.0), Some(48));
        assert_eq!(cumulative_pick(&[0.0; 5], 0.0), None);
    }

    fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut out = Vec::new();
        top_k_into(row, k, &mut out);
        out
    }

    #[test]
    fn top_k_is_sorted_descending_with_ties_by_index() {
        let row = [1.0, 5.0, f32::NAN, 5.0, 2.0, -1.0];
        assert_eq!(top_k(&row, 3), vec![(1, 5.0), (3, 5.0), (4, 2.0)]);
        assert_eq!(top_k(&row, 0), vec![]);
        assert_eq!(top_k(&row, 10).len(), 6);
        assert_eq!(top_k(&row, 10)[5], (2, f32::NEG_INFINITY));
    }

    #[test]
    fn top_k_matches_a_full_sort_on_long_rows() {
        // Long enough to compact the buffer many times and skip chunks; values repeat, so ties
        // must still go to the lower index.
        let row: Vec<f32> = (0..50_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 20) % 3000) as f32).collect();
        let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
        all.sort_by(rank);
        for k in [1, 20, 33, 64, 1000] {
            assert_eq!(top_k(&row, k), all[..k].to_vec(), "k = {k}");
        }
    }

    #[test]
    fn gather_keeps_positive_weights_in_the_range_in_index_order() {
        let mut w = vec![0.0f32; 300];
        w[5] = 0.5;
        w[70] = 0.1;
        w[200] = 0.09;
        w[299] = 1.0;
        let mut out = Vec::new();
        assert!(gather_range(&w, 0.1, f32::INFINITY, usize::MAX, &mut out));
        assert_eq!(out, vec![(5, 0.5), (70, 0.1), (299, 1.0)]);
        assert!(gather_range(&w, 0.0, 1.0, 3, &mut out));
        assert_eq!(out, vec![(5, 0.5), (70, 0.1), (200, 0.09)]);
        assert!(!gather_range(&w, 0.0, 1.0, 2, &mut out));
    }

    #[test]
    fn masking_keeps_exactly_the_tokens_ranked_at_or_above_the_cut() {
        let mut w = vec![0.5f32, 1.0, 0.5, 0.25, 0.5, 0.75];
        // Cut at (2, 0.5): ids 0 and 2 tie with it and rank above or at it, id 4 ranks below.
        let total = mask_ranked_below(&mut w, (2, 0.5), 0.0);
        assert_eq!(w, vec![0.5, 1.0, 0.5, 0.0, 0.0, 0.75]);
        assert_eq!(total, 2.75);
        let total = mask_ranked_below(&mut w, (u32::MAX, 0.0), 0.6);
        assert_eq!((w, total), (vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.75], 1.75));
    }

    #[test]
    fn avx2_and_baseline_builds_agree_bit_for_bit() {
        let row: Vec<f32> = (0..10_007u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0) * 30.0 - 20.0)
            .collect();
        let (mut a, mut b) = (row.clone(), row.clone());
        let max = max_value(&row);
        let total_a = exp_in_place(&mut a, max, 0.7, 1e-3);
        let total_b = exp_in_place_generic(&mut b, max, 0.7, 1e-3);
        assert_eq!(total_a.to_bits(), total_b.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(log_sum_exp(&row).to_bits(), log_sum_exp_generic(&row).to_bits());
        let cut = (5000, a[5000]);
        assert_eq!(
            mask_ranked_below(&mut a, cut, 0.0).to_bits(),
            mask_ranked_below_generic(&mut b, cut, 0.0).to_bits()
        );
    }

    #[test]
    fn log_sum_exp_is_stable_for_large_logits() {
        let row = [1000.0f32, 1000.0, f32::NAN, f32::NEG_INFINITY];
        let want = 1000.0 + 2f64.ln();
        assert!((log_sum_exp(&row) - want).abs() < 1e-9);
        assert_eq!(log_sum_exp(&[f32::NAN]), f64::NEG_INFINITY);
    }
}
