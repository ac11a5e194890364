//! The AVX2 + FMA tiles of [`super::matmul`] (x86-64): quantized blocks against quantized
//! activations, and f32 against f32. Kernel bodies are one unsafe region (raw pointers and
//! intrinsics).

use std::arch::x86_64::*;

use super::super::quant::ActTile;
use super::*;

/// How far ahead of the current weight block to prefetch.
const PREFETCH_BYTES: usize = 1024;

/// A weight block as AVX2 sees it.
pub(crate) trait AvxBlock: Copy {
    /// The 32 values as bytes, in element order: unsigned when `UNSIGNED`, else signed.
    unsafe fn bytes(&self) -> __m256i;
    const UNSIGNED: bool;
    /// `[scale, offset, 0, 0]` (offset: Q4_1's `m`; 0 for the other formats).
    unsafe fn scales(&self) -> __m128;
}

/// f16 bits (one or two halves packed in a u32) to f32 lanes with the F16C instruction.
#[inline(always)]
unsafe fn halves(bits: u32) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F))
}

impl AvxBlock for BlockQ4_0 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        _mm256_sub_epi8(nibbles(&self.qs), _mm256_set1_epi8(8))
    }
    const UNSIGNED: bool = false;
    #[inline(always)]
    unsafe fn scales(&self) -> __m128 {
        halves(self.d as u32)
    }
}

impl AvxBlock for BlockQ4_1 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        nibbles(&self.qs)
    }
    const UNSIGNED: bool = true;
    #[inline(always)]
    unsafe fn scales(&self) -> __m128 {
        halves(self.d as u32 | (self.m as u32) << 16)
    }
}

impl AvxBlock for BlockQ8_0 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
    }
    const UNSIGNED: bool = false;
    #[inline(always)]
    unsafe fn scales(&self) -> __m128 {
        halves(self.d as u32)
    }
}

/// Sum of the eight lanes, in a fixed order.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    let x = _mm_add_ss(x, _mm_movehdup_ps(x));
    _mm_cvtss_f32(x)
}

/// 32 products of weight bytes and activation bytes, summed in groups of four into i32 lanes.
#[inline(always)]
unsafe fn dot_bytes(unsigned: bool, w: __m256i, x: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let pairs = if unsigned {
        _mm256_maddubs_epi16(w, x)
    } else {
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    };
    _mm256_madd_epi16(pairs, ones)
}

/// One thread's rows of a quantized matmul.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quant_rows<B: AvxBlock>(
    w: &[B],
    nb: usize,
    x: &QuantizedRows,
    rows: std::ops::Range<usize>,
    m: usize,
    sink: &Sink,
) {
    let tiles = x.tiles();
    rows_loop(rows, m, sink, |row, m0, t| match (t.nr, t.mr) {
        (2, 4) => quant_kernel::<B, 2, 4>(w, nb, tiles, row, m0, t),
        (2, 3) => quant_kernel::<B, 2, 3>(w, nb, tiles, row, m0, t),
        (2, 2) => quant_kernel::<B, 2, 2>(w, nb, tiles, row, m0, t),
        (2, 1) => quant_kernel::<B, 2, 1>(w, nb, tiles, row, m0, t),
        (1, 4) => quant_kernel::<B, 1, 4>(w, nb, tiles, row, m0, t),
        (1, 3) => quant_kernel::<B, 1, 3>(w, nb, tiles, row, m0, t),
        (1, 2) => quant_kernel::<B, 1, 2>(w, nb, tiles, row, m0, t),
        _ => quant_kernel::<B, 1, 1>(w, nb, tiles, row, m0, t),
    })
}

/// `NR` weight rows against the first `MRT` rows of the activation group starting at row
/// `m0` (a multiple of 4). Per block: the integer dot product of each row pair, scaled by
/// `d_w * d_x` into a float accumulator; for offset formats, `m_w * s_x` accumulated for the
/// four rows at once in one vector. Every output element sees the same operations in the
/// same order whatever the tile shape, which keeps results independent of the batch.
#[inline(always)]
unsafe fn quant_kernel<B: AvxBlock, const NR: usize, const MRT: usize>(
    w: &[B],
    nb: usize,
    tiles: &[ActTile],
    row: usize,
    m0: usize,
    t: &mut Tile,
) {
    let mut acc = [[_mm256_setzero_ps(); MRT]; NR];
    let mut mins = [_mm_setzero_ps(); NR];
    let wrows: [*const B; NR] = std::array::from_fn(|i| w.as_ptr().add((row + i) * nb));
    let group = tiles.as_ptr().add(m0 / 4 * nb);
    let mut scale = [0f32; 4];
    for b in 0..nb {
        // Weights stream from memory once per call: fetch well ahead of use.
        for &wr in &wrows {
            _mm_prefetch::<_MM_HINT_T0>((wr.add(b) as *const i8).add(PREFETCH_BYTES));
        }
        let tile = &*group.add(b);
        let xd = _mm_load_ps(tile.d.as_ptr());
        for i in 0..NR {
            let wb = &*wrows[i].add(b);
            let wbytes = wb.bytes();
            let ws = wb.scales();
            _mm_storeu_ps(scale.as_mut_ptr(), _mm_mul_ps(_mm_broadcastss_ps(ws), xd));
            if B::UNSIGNED {
                mins[i] = _mm_fmadd_ps(_mm_shuffle_ps::<0b01_01_01_01>(ws, ws), _mm_load_ps(tile.s.as_ptr()), mins[i]);
            }
            for r in 0..MRT {
                let xv = _mm256_load_si256(tile.qs[r].as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(dot_bytes(B::UNSIGNED, wbytes, xv));
                acc[i][r] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&scale[r]), acc[i][r]);
            }
        }
    }
    for i in 0..NR {
        let mut offsets = [0f32; 4];
        if B::UNSIGNED {
            _mm_storeu_ps(offsets.as_mut_ptr(), mins[i]);
        }
        for r in 0..MRT {
            t.v[i][r] = hsum(acc[i][r]) + offsets[r];
        }
    }
}

/// One thread's rows of an f32 matmul.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_rows(w: &[f32], cols: usize, x: &[f32], rows: std::ops::Range<usize>, m: usize, sink: &Sink) {
    rows_loop(rows, m, sink, |row, m0, t| f32_tile(w, cols, x, row, m0, t))
}

#[inline(always)]
unsafe fn f32_tile(w: &[f32], cols: usize, x: &[f32], row: usize, m0: usize, t: &mut Tile) {
    match (t.nr, t.mr) {
        (2, 4) => f32_kernel::<2, 4>(w, cols, x, row, m0, t),
        (2, 3) => f32_kernel::<2, 3>(w, cols, x, row, m0, t),
        (2, 2) => f32_kernel::<2, 2>(w, cols, x, row, m0, t),
        (2, 1) => f32_kernel::<2, 1>(w, cols, x, row, m0, t),
        (1, 4) => f32_kernel::<1, 4>(w, cols, x, row, m0, t),
        (1, 3) => f32_kernel::<1, 3>(w, cols, x, row, m0, t),
        (1, 2) => f32_kernel::<1, 2>(w, cols, x, row, m0, t),
        _ => f32_kernel::<1, 1>(w, cols, x, row, m0, t),
    }
}

#[inline(always)]
unsafe fn f32_kernel<const NR: usize, const MRT: usize>(
    w: &[f32],
    cols: usize,
    x: &[f32],
    row: usize,
    m0: usize,
    t: &mut Tile,
) {
    let mut acc = [[_mm256_setzero_ps(); MRT]; NR];
    let wrows: [*const f32; NR] = std::array::from_fn(|i| w.as_ptr().add((row + i) * cols));
    let xrows: [*const f32; MRT] = std::array::from_fn(|r| x.as_ptr().add((m0 + r) * cols));
    let full = cols / 8 * 8;
    let mut c = 0;
    while c < full {
        let wv: [__m256; NR] = std::array::from_fn(|i| _mm256_loadu_ps(wrows[i].add(c)));
        for r in 0..MRT {
            let xv = _mm256_loadu_ps(xrows[r].add(c));
            for i in 0..NR {
                acc[i][r] = _mm256_fmadd_ps(wv[i], xv, acc[i][r]);
            }
        }
        c += 8;
    }
    for i in 0..NR {
        for r in 0..MRT {
            let mut s = hsum(acc[i][r]);
            for k in full..cols {
                s += *wrows[i].add(k) * *xrows[r].add(k);
            }
            t.v[i][r] = s;
        }
    }
}
