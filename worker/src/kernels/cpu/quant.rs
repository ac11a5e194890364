//! Block-quantized formats and activation quantization.
//!
//! Weights keep GGML's block layouts byte for byte (32 elements per block, scales as f16):
//! - `Q4_0`: `d`, 16 bytes of nibbles; element `j < 16` is `qs[j] & 15`, element `j + 16` is
//!   `qs[j] >> 4`; value = `d * (q - 8)`.
//! - `Q4_1`: `d`, `m`, nibbles as Q4_0; value = `d * q + m`.
//! - `Q8_0`: `d`, 32 signed bytes; value = `d * q`.
//!
//! Activations multiplying quantized weights are quantized per row and block of 32 into
//! [`QuantizedRows`]: signed bytes with scale `d = amax / 127` and `s = d * sum(q)` (the term
//! Q4_1's offset needs), both rounded through f16 as GGML's Q8_1 does, so integer dot products do
//! the bulk of the work.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::isa::Isa;
use super::pool::{SharedMut, ThreadPool, split_range};

/// Row counts from which per-row work is spread over threads.
pub const PARALLEL_ROWS: usize = 16;

/// Elements per quantization block.
pub const QK: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: u16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}

#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

#[inline]
fn round_through_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Activation rows quantized for the matmul kernels, grouped four rows at a time: for each group
/// and block, the four rows' 32 int8 values, their scales `d` and sums `s = d * sum(q)` side by
/// side, so a kernel loads one row's values with one instruction and four rows' scales with
/// another. The unused rows of the last group are zero.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActTile {
    pub qs: [[i8; QK]; 4],
    pub d: [f32; 4],
    pub s: [f32; 4],
}

/// Quantized activation rows in [`ActTile`] groups.
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    tiles: Vec<ActTile>,
    rows: usize,
    blocks: usize,
}

impl QuantizedRows {
    /// Quantizes `x` (rows of `cols` values, `cols` a multiple of 32), reusing the buffer.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], cols: usize) {
        debug_assert_eq!(cols % QK, 0);
        let (rows, blocks) = (x.len() / cols, cols / QK);
        self.tiles.clear();
        self.tiles.resize(rows.div_ceil(4) * blocks, ActTile::default());
        self.rows = rows;
        self.blocks = blocks;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { quantize_avx2(x, blocks, &mut self.tiles) },
            _ => quantize_with(x, blocks, &mut self.tiles, quantize_block_scalar),
        }
    }

    /// Like [`quantize`](Self::quantize), spreading groups of rows over the pool's threads when
    /// there are enough rows to pay for it.
    pub fn quantize_on(&mut self, pool: &ThreadPool, isa: Isa, x: &[f32], cols: usize) {
        let rows = x.len() / cols;
        if rows < PARALLEL_ROWS || pool.threads() == 1 {
            return self.quantize(isa, x, cols);
        }
        let blocks = cols / QK;
        self.tiles.clear();
        self.tiles.resize(rows.div_ceil(4) * blocks, ActTile::default());
        self.rows = rows;
        self.blocks = blocks;
        let tiles = SharedMut(self.tiles.as_mut_ptr());
        pool.run(&|t, n| {
            // Whole groups of four rows per thread, so threads write disjoint tiles.
            let r = split_range(rows, t, n, 4);
            let (first, groups) = (r.start / 4, r.len().div_ceil(4));
            // SAFETY: groups `first..first + groups` belong to this thread alone.
            let mine = unsafe { std::slice::from_raw_parts_mut(tiles.get().add(first * blocks), groups * blocks) };
            let xs = &x[r.start * cols..r.end * cols];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { quantize_avx2(xs, blocks, mine) },
                _ => quantize_with(xs, blocks, mine, quantize_block_scalar),
            }
        });
    }

    /// `x` quantized into a new buffer.
    pub fn from_rows(isa: Isa, x: &[f32], cols: usize) -> QuantizedRows {
        let mut q = QuantizedRows::default();
        q.quantize(isa, x, cols);
        q
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn blocks_per_row(&self) -> usize {
        self.blocks
    }

    pub fn tiles(&self) -> &[ActTile] {
        &self.tiles
    }

    /// Row `r`, block `b`: values, scale and sum.
    pub fn block(&self, r: usize, b: usize) -> (&[i8; QK], f32, f32) {
        let t = &self.tiles[(r / 4) * self.blocks + b];
        (&t.qs[r % 4], t.d[r % 4], t.s[r % 4])
    }
}

/// Quantizes every block of every row into its tile lane with `block`.
#[inline(always)]
fn quantize_with(x: &[f32], blocks: usize, tiles: &mut [ActTile], block: impl Fn(&[f32], &mut [i8; QK]) -> (f32, f32)) {
    for (r, row) in x.chunks_exact(blocks * QK).enumerate() {
        let (group, lane) = (r / 4, r % 4);
        for (b, xs) in row.chunks_exact(QK).enumerate() {
            let t = &mut tiles[group * blocks + b];
            let (d, s) = block(xs, &mut t.qs[lane]);
            t.d[lane] = d;
            t.s[lane] = s;
        }
    }
}

/// One block: `q = round(x * 127 / amax)`, ties to even; returns the f16-rounded `d` and `s`.
fn quantize_block_scalar(xs: &[f32], qs: &mut [i8; QK]) -> (f32, f32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (round_through_f16(d), round_through_f16(d * sum as f32))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_avx2(x: &[f32], blocks: usize, tiles: &mut [ActTile]) {
    quantize_with(x, blocks, tiles, |xs, qs| unsafe { quantize_block_avx2(xs, qs) })
}

/// The AVX2 twin of [`quantize_block_scalar`] (bit-identical results).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(unsafe_op_in_unsafe_fn)]
unsafe fn quantize_block_avx2(xs: &[f32], qs: &mut [i8; QK]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let sign_mask = _mm256_set1_ps(-0.0);
    let p = xs.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let mut m = _mm256_andnot_ps(sign_mask, v[0]);
    for item in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, *item));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let r: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
    });
    let sum_vec = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum_vec), _mm256_extracti128_si256(sum_vec, 1));
    let s4 = _mm_hadd_epi32(s4, s4);
    let s4 = _mm_hadd_epi32(s4, s4);
    let sum = _mm_cvtsi128_si32(s4);
    // Pack 32 i32 -> 32 i8 in element order (packs interleave 128-bit lanes; undo with a permute).
    let a = _mm256_packs_epi32(r[0], r[1]);
    let b = _mm256_packs_epi32(r[2], r[3]);
    let bytes = _mm256_packs_epi16(a, b);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
    (round_through_f16(d), round_through_f16(d * sum as f32))
}

/// Dequantizes blocks of a weight row into f32 (`out.len()` = blocks * 32).
pub trait Dequantize {
    fn dequantize_into(blocks: &[Self], out: &mut [f32])
    where
        Self: Sized;
}

impl Dequantize for BlockQ4_0 {
    fn dequantize_into(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = f16_to_f32(b.d);
            for j in 0..16 {
                o[j] = d * ((b.qs[j] & 15) as i32 - 8) as f32;
                o[j + 16] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
            }
        }
    }
}

impl Dequantize for BlockQ4_1 {
    fn dequantize_into(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
            for j in 0..16 {
                o[j] = d * (b.qs[j] & 15) as f32 + m;
                o[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
            }
        }
    }
}

impl Dequantize for BlockQ8_0 {
    fn dequantize_into(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = f16_to_f32(b.d);
            for (v, &q) in o.iter_mut().zip(&b.qs) {
                *v = d * q as f32;
            }
        }
    }
}

/// Reference quantizers (weights), used to build test matrices and to requantize formats that
/// have no kernel of their own.
pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    x.chunks_exact(QK)
        .map(|xs| {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
            }
            BlockQ8_0 { d: f16::from_f32(d).to_bits(), qs }
        })
        .collect()
}

/// Reference Q4_1 quantizer (min/max per block).
pub fn quantize_q4_1(x: &[f32]) -> Vec<BlockQ4_1> {
    x.chunks_exact(QK)
        .map(|xs| {
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0u8; 16];
            for j in 0..16 {
                let lo = ((xs[j] - min) * id + 0.5).clamp(0.0, 15.0) as u8;
                let hi = ((xs[j + 16] - min) * id + 0.5).clamp(0.0, 15.0) as u8;
                qs[j] = lo | (hi << 4);
            }
            BlockQ4_1 { d: f16::from_f32(d).to_bits(), m: f16::from_f32(min).to_bits(), qs }
        })
        .collect()
}

/// Reference Q4_0 quantizer (signed max per block).
pub fn quantize_q4_0(x: &[f32]) -> Vec<BlockQ4_0> {
    x.chunks_exact(QK)
        .map(|xs| {
            let max = xs.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0u8; 16];
            for j in 0..16 {
                let lo = (xs[j] * id + 8.5).clamp(0.0, 15.0) as u8;
                let hi = (xs[j + 16] * id + 8.5).clamp(0.0, 15.0) as u8;
                qs[j] = lo | (hi << 4);
            }
            BlockQ4_0 { d: f16::from_f32(d).to_bits(), qs }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn activation_quantization_is_identical_across_instruction_sets() {
        // 6 rows of 4 blocks: two tile groups, the second half full.
        let (rows, cols) = (6, 128);
        let x = sample(rows * cols, 7);
        let reference = QuantizedRows::from_rows(Isa::Scalar, &x, cols);
        assert_eq!((reference.rows(), reference.blocks_per_row(), reference.tiles().len()), (6, 4, 8));
        for isa in Isa::available() {
            let got = QuantizedRows::from_rows(isa, &x, cols);
            for r in 0..rows {
                for b in 0..4 {
                    assert_eq!(got.block(r, b), reference.block(r, b), "{isa:?}");
                }
            }
            // Spread over threads (many rows), the result is the same as row by row.
            let many: Vec<f32> = (0..40).flat_map(|_| x[..cols].iter().copied()).collect();
            let mut parallel = QuantizedRows::default();
            parallel.quantize_on(&ThreadPool::new(3), isa, &many, cols);
            let serial = QuantizedRows::from_rows(isa, &many, cols);
            assert_eq!(parallel.tiles().len(), serial.tiles().len());
            for r in 0..40 {
                assert_eq!(parallel.block(r, 2), serial.block(r, 2));
            }
            // Padding rows of the last group stay zero.
            assert_eq!(got.block(7, 3), (&[0i8; 32], 0.0, 0.0));
        }
        // And it is a faithful quantization: every value within half a step, sums consistent.
        for r in 0..rows {
            for b in 0..4 {
                let (qs, d, s) = reference.block(r, b);
                for (j, &q) in qs.iter().enumerate() {
                    let v = x[r * cols + b * 32 + j];
                    assert!((q as f32 * d - v).abs() <= d * 0.51 + 1e-3, "{v} vs {}", q as f32 * d);
                }
                let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                assert!((s - d * sum as f32).abs() <= (d * sum as f32).abs() * 1e-3 + 1e-6);
            }
        }
    }

    #[test]
    fn all_zero_blocks_quantize_to_zero() {
        for isa in Isa::available() {
            let q = QuantizedRows::from_rows(isa, &[0.0; 32], 32);
            assert_eq!(q.block(0, 0), (&[0i8; 32], 0.0, 0.0));
        }
    }

    #[test]
    fn weight_quantizers_round_trip_within_their_step() {
        let x = sample(32 * 8, 3);
        let mut y = vec![0f32; x.len()];
        BlockQ8_0::dequantize_into(&quantize_q8_0(&x), &mut y);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 2.0 / 127.0 + 1e-3));
        BlockQ4_1::dequantize_into(&quantize_q4_1(&x), &mut y);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 4.0 / 15.0 * 0.51 + 1e-2));
        BlockQ4_0::dequantize_into(&quantize_q4_0(&x), &mut y);
        // The clamped end of the Q4_0 range (7d vs -8d) may be off by one full step.
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 2.0 / 8.0 + 1e-2));
    }
}
