//! Element-wise and row-wise operations of the Llama block: RMSNorm, rotary embeddings, and a
//! vectorised `exp` shared with attention.

use super::isa::Isa;

/// `out = x / sqrt(mean(x²) + eps) * weight`, for each row of `x` (`weight.len()` columns).
pub fn rms_norm(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let ss = sum_of_squares(isa, xr);
        let scale = 1.0 / (ss / cols as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

fn sum_of_squares(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::sum_of_squares(x) },
        _ => {
            // Eight interleaved partial sums, combined in the same order as the AVX2 path.
            let mut lanes = [0f32; 8];
            let full = x.len() / 8 * 8;
            for c in x[..full].chunks_exact(8) {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l = v.mul_add(v, *l);
                }
            }
            let mut s =
                ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
            for &v in &x[full..] {
                s += v * v;
            }
            s
        }
    }
}

/// `out = silu(gate) * up`, row by row, where each row of `gu` is `[gate (width) | up (width)]`
/// and `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(isa: Isa, gu: &[f32], width: usize, out: &mut [f32]) {
    for (row, o) in gu.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (gate, up) = row.split_at(width);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if width.is_multiple_of(8) => unsafe { avx2::silu_mul(gate, up, o) },
            _ => {
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
        }
    }
}

/// Rotary position tables: for each position, `attention_factor * cos` and `attention_factor *
/// sin` of `position * inv_freq[i]` (the factor is 1 except for yarn and longrope scaling, which
/// scale both queries and keys by it, as transformers does).
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..max_positions`, attention factor 1.
    pub fn new(inv_freq: &[f32], max_positions: usize) -> RopeTable {
        RopeTable::scaled(inv_freq, 1.0, max_positions)
    }

    /// Tables for positions `0..max_positions` with cos and sin multiplied by `attention_factor`.
    pub fn scaled(inv_freq: &[f32], attention_factor: f32, max_positions: usize) -> RopeTable {
        let half = inv_freq.len();
        let factor = attention_factor as f64;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let angle = p as f64 * f as f64;
                cos.push((angle.cos() * factor) as f32);
                sin.push((angle.sin() * factor) as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }

    /// Rotation pairs per head (half the head size).
    pub fn half(&self) -> usize {
        self.half
    }

    /// `attention_factor * cos(position * inv_freq[i])`, `[max_positions, half]` row-major (the GPU
    /// path uploads it).
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// `sin(position * inv_freq[i])`, like [`RopeTable::cos`].
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }

    /// Rotates every head of one token's vector `x` (`heads * 2 * half` values) in place, pairing
    /// element `i` with `i + half` within each head (Hugging Face's `rotate_half` convention).
    pub fn apply(&self, x: &mut [f32], position: usize) {
        let h = self.half;
        let (cos, sin) = (&self.cos[position * h..(position + 1) * h], &self.sin[position * h..(position + 1) * h]);
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)] // kernel bodies are one unsafe region: raw pointers and intrinsics
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::matmul::avx2::hsum;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sum_of_squares(x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let full = x.len() / 8 * 8;
        let mut i = 0;
        while i < full {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            acc = _mm256_fmadd_ps(v, v, acc);
            i += 8;
        }
        let mut s = hsum(acc);
        for &v in &x[full..] {
            s += v * v;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        for i in (0..out.len()).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, exp(_mm256_sub_ps(zero, g))));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
        }
    }

    /// `e^x` for eight lanes: range reduction by ln 2 and a degree-6 polynomial (relative error
    /// ~2e-7); inputs below -87 give 0, so `-inf` is safe.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.7));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // r = x - n ln2, in two parts for precision.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 120.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 24.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 6.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_definition_on_every_isa() {
        let x: Vec<f32> = (0..2 * 40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..40).map(|i| 0.5 + i as f32 / 40.0).collect();
        for isa in Isa::available() {
            let mut out = vec![0f32; 80];
            rms_norm(isa, &x, &w, 1e-5, &mut out);
            for r in 0..2 {
                let row = &x[r * 40..(r + 1) * 40];
                let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 40.0;
                for i in 0..40 {
                    let want = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                    assert!((out[r * 40 + i] as f64 - want).abs() < 1e-5, "{isa:?}");
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_half_a_head_apart_and_preserves_norms() {
        let inv = vec![1.0, 0.1];
        let table = RopeTable::new(&inv, 8);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        table.apply(&mut x, 3);
        // Pair (x0, x2) rotates by 3 rad, pair (x1, x3) by 0.3 rad.
        let want = [1.0 * 3f32.cos() - 3.0 * 3f32.sin(), 2.0 * 0.3f32.cos() - 4.0 * 0.3f32.sin()];
        assert!((x[0] - want[0]).abs() < 1e-5 && (x[1] - want[1]).abs() < 1e-5);
        assert!(((x[0] * x[0] + x[2] * x[2]) - 10.0).abs() < 1e-4);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        table.apply(&mut y, 0);
        assert_eq!(y, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn silu_mul_matches_the_definition_on_every_isa() {
        let width = 16;
        let gu: Vec<f32> = (0..2 * 2 * width).map(|i| (i as f32 * 0.71).sin() * 12.0).collect();
        for isa in Isa::available() {
            let mut out = vec![0f32; 2 * width];
            silu_mul(isa, &gu, width, &mut out);
            for r in 0..2 {
                for j in 0..width {
                    let (g, u) = (gu[r * 2 * width + j] as f64, gu[r * 2 * width + width + j] as f64);
                    let want = g / (1.0 + (-g).exp()) * u;
                    assert!((out[r * width + j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "{isa:?}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_accurate_and_saturates() {
        if !Isa::avx2_available() {
            return;
        }
        use std::arch::x86_64::*;
        let xs = [-100.0f32, -87.0, -10.5, -1.0, 0.0, 0.3, 5.0, 80.0];
        let mut out = [0f32; 8];
        unsafe {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn run(xs: &[f32; 8], out: &mut [f32; 8]) {
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(xs.as_ptr()))) }
            }
            run(&xs, &mut out);
        }
        for (&x, &y) in xs.iter().zip(&out) {
            let want = (x as f64).exp();
            if x < -87.5 {
                assert!(y < 1e-37);
            } else {
                assert!(((y as f64) - want).abs() <= want * 1e-6, "exp({x}) = {y}, want {want}");
            }
        }
        let neg_inf = unsafe {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn one(v: f32) -> f32 {
                unsafe { _mm256_cvtss_f32(avx2::exp(_mm256_set1_ps(v))) }
            }
            one(f32::NEG_INFINITY)
        };
        assert!(neg_inf < 1e-37);
    }
}
