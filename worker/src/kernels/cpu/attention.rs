//! Paged attention over an f16 KV cache, for decode and prefill alike.
//!
//! Cache layout, per layer and separately for K and V: `[num_blocks, kv_heads, block_size,
//! head_dim]` f16. The token in slot `s` lives in block `s / block_size` at offset
//! `s % block_size`; a sequence's block table lists its blocks in position order.
//!
//! Each query token attends to positions `0..context_len` of its own sequence (causal: a prompt
//! token at position `p` has `context_len = p + 1`). Query heads `g * ratio .. (g + 1) * ratio`
//! share KV head `g` (grouped-query attention); K/V rows are read once per group, never copied per
//! query head. The softmax is computed online, block by block, in position order, so a token's
//! result does not depend on how the batch was formed or chunked.

use half::f16;

use super::isa::Isa;
use super::pool::{SharedMut, ThreadPool};

/// Shape of one layer's paged K (or V) cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CacheLayout {
    /// f16 elements per block (one of K or V, one layer).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    #[inline]
    fn row_offset(&self, block: usize, kv_head: usize, offset: usize) -> usize {
        ((block * self.kv_heads + kv_head) * self.block_size + offset) * self.head_dim
    }
}

/// Writes each token's K and V rows (`kv_heads * head_dim` values each) into its cache slot.
pub fn write_kv(layout: &CacheLayout, k: &[f32], v: &[f32], slots: &[u32], k_cache: &mut [f16], v_cache: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    let (hd, width) = (layout.head_dim, layout.kv_heads * layout.head_dim);
    for (t, &slot) in slots.iter().enumerate() {
        let (block, offset) = (slot as usize / layout.block_size, slot as usize % layout.block_size);
        for g in 0..layout.kv_heads {
            let dst = layout.row_offset(block, g, offset);
            let src = t * width + g * hd;
            k_cache[dst..dst + hd].convert_from_f32_slice(&k[src..src + hd]);
            v_cache[dst..dst + hd].convert_from_f32_slice(&v[src..src + hd]);
        }
    }
}

/// What one query token attends to.
#[derive(Clone, Copy, Debug)]
pub struct QueryRef<'a> {
    /// The sequence's blocks, in position order.
    pub block_table: &'a [u32],
    /// Positions `0..context_len` are visible (the token's own position is `context_len - 1`).
    pub context_len: usize,
}

/// `out[t] = softmax(q[t] · Kᵀ * scale) · V` for every query token `t`, all heads.
///
/// `q` and `out` hold `queries.len()` rows of `heads * head_dim`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    pool: &ThreadPool,
    isa: Isa,
    layout: &CacheLayout,
    heads: usize,
    scale: f32,
    q: &[f32],
    queries: &[QueryRef<'_>],
    k_cache: &[f16],
    v_cache: &[f16],
    out: &mut [f32],
) {
    let width = heads * layout.head_dim;
    assert!(q.len() >= queries.len() * width && out.len() >= queries.len() * width, "attention buffers too small");
    assert!(heads.is_multiple_of(layout.kv_heads), "heads must be a multiple of kv_heads");
    let items = queries.len() * layout.kv_heads;
    let out = SharedMut(out.as_mut_ptr());
    pool.run(&|t, threads| {
        let mut scratch = Scratch::new(heads / layout.kv_heads, layout);
        // Round-robin: later prompt tokens see longer contexts, so contiguous ranges would be uneven.
        for item in (t..items).step_by(threads) {
            let (token, g) = (item / layout.kv_heads, item % layout.kv_heads);
            let ratio = heads / layout.kv_heads;
            let q_rows = &q[token * width + g * ratio * layout.head_dim..][..ratio * layout.head_dim];
            // SAFETY: item (token, g) owns these output columns alone.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    out.get().add(token * width + g * ratio * layout.head_dim),
                    ratio * layout.head_dim,
                )
            };
            let args = Group { layout, kv_head: g, ratio, scale, query: queries[token], k_cache, v_cache };
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if layout.head_dim.is_multiple_of(8) => unsafe {
                    avx2::attend(&args, q_rows, o, &mut scratch)
                },
                _ => attend_scalar(&args, q_rows, o, &mut scratch),
            }
        }
    });
}

/// One work item: the query heads of one KV head for one token.
struct Group<'a> {
    layout: &'a CacheLayout,
    kv_head: usize,
    ratio: usize,
    scale: f32,
    query: QueryRef<'a>,
    k_cache: &'a [f16],
    v_cache: &'a [f16],
}

/// Per-thread working memory: scores of one block for each query head, and the accumulators.
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Scratch {
    fn new(ratio: usize, layout: &CacheLayout) -> Scratch {
        Scratch {
            scores: vec![0.0; ratio * layout.block_size.next_multiple_of(8)],
            acc: vec![0.0; ratio * layout.head_dim],
            max: vec![0.0; ratio],
            sum: vec![0.0; ratio],
        }
    }

    fn reset(&mut self) {
        self.acc.fill(0.0);
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
    }
}

fn attend_scalar(a: &Group<'_>, q: &[f32], out: &mut [f32], s: &mut Scratch) {
    let (bs, hd) = (a.layout.block_size, a.layout.head_dim);
    let stride = bs.next_multiple_of(8);
    s.reset();
    let blocks = a.query.context_len.div_ceil(bs);
    for (bi, &block) in a.query.block_table[..blocks].iter().enumerate() {
        let n = bs.min(a.query.context_len - bi * bs);
        for j in 0..n {
            let k = &a.k_cache[a.layout.row_offset(block as usize, a.kv_head, j)..][..hd];
            for r in 0..a.ratio {
                let qr = &q[r * hd..(r + 1) * hd];
                s.scores[r * stride + j] = qr.iter().zip(k).map(|(x, y)| x * y.to_f32()).sum::<f32>() * a.scale;
            }
        }
        for r in 0..a.ratio {
            let sc = &mut s.scores[r * stride..r * stride + n];
            let block_max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = s.max[r].max(block_max);
            let correction = (s.max[r] - new_max).exp();
            let mut block_sum = 0.0;
            for v in sc.iter_mut() {
                *v = (*v - new_max).exp();
                block_sum += *v;
            }
            s.sum[r] = s.sum[r] * correction + block_sum;
            s.acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= correction);
            s.max[r] = new_max;
        }
        for j in 0..n {
            let v = &a.v_cache[a.layout.row_offset(block as usize, a.kv_head, j)..][..hd];
            for r in 0..a.ratio {
                let p = s.scores[r * stride + j];
                for (x, y) in s.acc[r * hd..(r + 1) * hd].iter_mut().zip(v) {
                    *x += p * y.to_f32();
                }
            }
        }
    }
    for r in 0..a.ratio {
        let inv = if s.sum[r] > 0.0 { 1.0 / s.sum[r] } else { 0.0 };
        for (o, x) in out[r * hd..(r + 1) * hd].iter_mut().zip(&s.acc[r * hd..(r + 1) * hd]) {
            *o = x * inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)] // kernel bodies are one unsafe region: raw pointers and intrinsics
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::matmul::avx2::hsum;
    use super::super::ops::avx2::exp;
    use super::*;

    #[inline(always)]
    unsafe fn load_f16x8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(a: &Group<'_>, q: &[f32], out: &mut [f32], s: &mut Scratch) {
        let (bs, hd) = (a.layout.block_size, a.layout.head_dim);
        let stride = bs.next_multiple_of(8);
        let chunks = hd / 8;
        s.reset();
        let blocks = a.query.context_len.div_ceil(bs);
        let scale = _mm256_set1_ps(a.scale);
        for (bi, &block) in a.query.block_table[..blocks].iter().enumerate() {
            let n = bs.min(a.query.context_len - bi * bs);
            // Scores: q · k for each position of the block and each query head of the group.
            for j in 0..n {
                let k = a.k_cache.as_ptr().add(a.layout.row_offset(block as usize, a.kv_head, j));
                for r in 0..a.ratio {
                    let qr = q.as_ptr().add(r * hd);
                    let mut acc = _mm256_setzero_ps();
                    for c in 0..chunks {
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c * 8)), load_f16x8(k.add(c * 8)), acc);
                    }
                    *s.scores.get_unchecked_mut(r * stride + j) = hsum(acc);
                }
            }
            // Online softmax update, eight positions at a time; padding lanes hold -inf.
            for r in 0..a.ratio {
                let sc = s.scores.as_mut_ptr().add(r * stride);
                for j in n..n.next_multiple_of(8) {
                    *sc.add(j) = f32::NEG_INFINITY;
                }
                let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
                for c in (0..n).step_by(8) {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(sc.add(c)), scale);
                    _mm256_storeu_ps(sc.add(c), v);
                    vmax = _mm256_max_ps(vmax, v);
                }
                let m4 = _mm_max_ps(_mm256_extractf128_ps(vmax, 1), _mm256_castps256_ps128(vmax));
                let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                let block_max = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
                let old_max = *s.max.get_unchecked(r);
                let new_max = old_max.max(block_max);
                let correction = _mm256_cvtss_f32(exp(_mm256_set1_ps(old_max - new_max)));
                let vnew = _mm256_set1_ps(new_max);
                let mut vsum = _mm256_setzero_ps();
                for c in (0..n).step_by(8) {
                    let p = exp(_mm256_sub_ps(_mm256_loadu_ps(sc.add(c)), vnew));
                    _mm256_storeu_ps(sc.add(c), p);
                    vsum = _mm256_add_ps(vsum, p);
                }
                *s.sum.get_unchecked_mut(r) = *s.sum.get_unchecked(r) * correction + hsum(vsum);
                *s.max.get_unchecked_mut(r) = new_max;
                let vc = _mm256_set1_ps(correction);
                let acc = s.acc.as_mut_ptr().add(r * hd);
                for c in 0..chunks {
                    _mm256_storeu_ps(acc.add(c * 8), _mm256_mul_ps(_mm256_loadu_ps(acc.add(c * 8)), vc));
                }
            }
            // Weighted sum of the block's values.
            for j in 0..n {
                let v = a.v_cache.as_ptr().add(a.layout.row_offset(block as usize, a.kv_head, j));
                for r in 0..a.ratio {
                    let p = _mm256_set1_ps(*s.scores.get_unchecked(r * stride + j));
                    let acc = s.acc.as_mut_ptr().add(r * hd);
                    for c in 0..chunks {
                        let x = _mm256_fmadd_ps(p, load_f16x8(v.add(c * 8)), _mm256_loadu_ps(acc.add(c * 8)));
                        _mm256_storeu_ps(acc.add(c * 8), x);
                    }
                }
            }
        }
        for r in 0..a.ratio {
            let sum = *s.sum.get_unchecked(r);
            let inv = _mm256_set1_ps(if sum > 0.0 { 1.0 / sum } else { 0.0 });
            for c in 0..chunks {
                let x = _mm256_mul_ps(_mm256_loadu_ps(s.acc.as_ptr().add(r * hd + c * 8)), inv);
                _mm256_storeu_ps(out.as_mut_ptr().add(r * hd + c * 8), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// Dense f64 attention over explicit K/V histories (rounded through f16 like the cache).
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        heads: usize,
        layout: &CacheLayout,
        ctx: usize,
        scale: f32,
    ) -> Vec<f64> {
        let (kv_heads, hd) = (layout.kv_heads, layout.head_dim);
        let ratio = heads / kv_heads;
        let r16 = |x: f32| f16::from_f32(x).to_f64();
        let mut out = vec![0f64; heads * hd];
        for h in 0..heads {
            let g = h / ratio;
            let scores: Vec<f64> = (0..ctx)
                .map(|p| (0..hd).map(|i| q[h * hd + i] as f64 * r16(keys[p][g * hd + i])).sum::<f64>() * scale as f64)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..hd {
                out[h * hd + i] = (0..ctx).map(|p| w[p] * r16(values[p][g * hd + i])).sum::<f64>() / z;
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_dense_reference_across_blocks_and_isas() {
        let (heads, kv_heads, hd, bs) = (6, 2, 16, 4);
        let layout = CacheLayout { block_size: bs, kv_heads, head_dim: hd };
        let mut rng = Rng(0x9E3779B97F4A7C15);
        let num_blocks = 12;
        let mut k_cache = vec![f16::ZERO; num_blocks * layout.block_elems()];
        let mut v_cache = k_cache.clone();
        // Two sequences with scattered, non-contiguous blocks.
        let tables: [Vec<u32>; 2] = [vec![7, 2, 9, 0, 5], vec![3, 11, 1]];
        let lens = [19usize, 10];
        let mut histories = vec![];
        for (table, &len) in tables.iter().zip(&lens) {
            let keys: Vec<Vec<f32>> = (0..len).map(|_| rng.vec(kv_heads * hd)).collect();
            let values: Vec<Vec<f32>> = (0..len).map(|_| rng.vec(kv_heads * hd)).collect();
            let slots: Vec<u32> = (0..len).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
            write_kv(&layout, &keys.concat(), &values.concat(), &slots, &mut k_cache, &mut v_cache);
            histories.push((keys, values));
        }
        // Queries: the last token of each sequence, and a middle (causal prefill) token of the first.
        let queries = [
            QueryRef { block_table: &tables[0], context_len: 19 },
            QueryRef { block_table: &tables[1], context_len: 10 },
            QueryRef { block_table: &tables[0], context_len: 6 },
        ];
        let q = rng.vec(queries.len() * heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads);
            for isa in Isa::available() {
                let mut out = vec![0f32; q.len()];
                paged_attention(&pool, isa, &layout, heads, scale, &q, &queries, &k_cache, &v_cache, &mut out);
                for (t, (seq, ctx)) in [(0usize, 19usize), (1, 10), (0, 6)].into_iter().enumerate() {
                    let (keys, values) = &histories[seq];
                    let want =
                        reference(&q[t * heads * hd..(t + 1) * heads * hd], keys, values, heads, &layout, ctx, scale);
                    for (g, w) in out[t * heads * hd..(t + 1) * heads * hd].iter().zip(&want) {
                        assert!((*g as f64 - w).abs() < 1e-5, "{isa:?} token {t}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_query_sees_only_its_context() {
        // Changing K/V beyond the context length must not change the result.
        let layout = CacheLayout { block_size: 4, kv_heads: 1, head_dim: 8 };
        let mut rng = Rng(42);
        let mut k = vec![f16::ZERO; 3 * layout.block_elems()];
        let mut v = k.clone();
        let kv = rng.vec(12 * 8);
        let slots: Vec<u32> = (0..12).collect();
        write_kv(&layout, &kv, &kv, &slots, &mut k, &mut v);
        let table = [0u32, 1, 2];
        let q = rng.vec(8);
        let pool = ThreadPool::new(1);
        for isa in Isa::available() {
            let run = |k: &[f16], v: &[f16]| {
                let mut out = vec![0f32; 8];
                paged_attention(
                    &pool,
                    isa,
                    &layout,
                    1,
                    0.5,
                    &q,
                    &[QueryRef { block_table: &table, context_len: 6 }],
                    k,
                    v,
                    &mut out,
                );
                out
            };
            let before = run(&k, &v);
            let (mut k2, mut v2) = (k.clone(), v.clone());
            for i in 6 * 8..12 * 8 {
                k2[i] = f16::from_f32(9.0);
                v2[i] = f16::from_f32(-9.0);
            }
            assert_eq!(before, run(&k2, &v2), "{isa:?}");
        }
    }
}
