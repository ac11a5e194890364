//! `y = x · Wᵀ`: activations `x` (`m` rows of `cols`) times a weight matrix `W` (`rows` output
//! features of `cols` inputs, Hugging Face's `[out, in]` order).
//!
//! Quantized weights multiply activations quantized into [`QuantizedRows`]; f32 weights
//! multiply f32 activations. Threads split the output features; each output element is computed
//! by one thread with one fixed order of operations, whatever the batch size, the tile it falls in
//! or the thread count, so a sequence's results never depend on what else is in the batch.
//!

use super::isa::Isa;
use super::pool::{SharedMut, ThreadPool, split_range};
use super::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, Dequantize, QK, QuantizedRows, f16_to_f32};

/// The elements of a weight matrix, row-major.
#[derive(Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A weight matrix `[rows, cols]`.
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

/// The activation form a matrix multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    F32,
    Q8,
}

/// Activations: `m` rows, either f32 (`m * cols` values) or quantized.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Q8(&'a QuantizedRows),
}

/// What happens to each computed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `out[i, n] = y`.
    Store,
    /// `out[i, n] += y` (a residual connection).
    Add,
}

impl Matrix {
    pub fn input_kind(&self) -> InputKind {
        match self.data {
            WeightData::F32(_) => InputKind::F32,
            _ => InputKind::Q8,
        }
    }

    /// Bytes the weights occupy (what one decode step streams from memory).
    pub fn size_bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Q4_0(v) => std::mem::size_of_val(v.as_slice()),
            WeightData::Q4_1(v) => std::mem::size_of_val(v.as_slice()),
            WeightData::Q8_0(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    pub fn format_name(&self) -> &'static str {
        match self.data {
            WeightData::F32(_) => "f32",
            WeightData::Q4_0(_) => "q4_0",
            WeightData::Q4_1(_) => "q4_1",
            WeightData::Q8_0(_) => "q8_0",
        }
    }

    /// Writes row `row` as f32 into `out` (`cols` values): embedding lookups.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (c, b) = (self.cols, self.cols / QK);
        match &self.data {
            WeightData::F32(v) => out[..c].copy_from_slice(&v[row * c..(row + 1) * c]),
            WeightData::Q4_0(v) => BlockQ4_0::dequantize_into(&v[row * b..(row + 1) * b], out),
            WeightData::Q4_1(v) => BlockQ4_1::dequantize_into(&v[row * b..(row + 1) * b], out),
            WeightData::Q8_0(v) => BlockQ8_0::dequantize_into(&v[row * b..(row + 1) * b], out),
        }
    }

    /// A matrix made of the given rows of `self`, in that order.
    pub fn select_rows(&self, order: &[usize]) -> Matrix {
        fn pick<T: Copy>(v: &[T], per_row: usize, order: &[usize]) -> Vec<T> {
            order.iter().flat_map(|&r| v[r * per_row..(r + 1) * per_row].iter().copied()).collect()
        }
        let b = self.cols / QK;
        let data = match &self.data {
            WeightData::F32(v) => WeightData::F32(pick(v, self.cols, order)),
            WeightData::Q4_0(v) => WeightData::Q4_0(pick(v, b, order)),
            WeightData::Q4_1(v) => WeightData::Q4_1(pick(v, b, order)),
            WeightData::Q8_0(v) => WeightData::Q8_0(pick(v, b, order)),
        };
        Matrix { rows: order.len(), cols: self.cols, data }
    }

    /// Stacks matrices of one format and width on top of each other; `None` if they differ.
    pub fn concat_rows(parts: &[Matrix]) -> Option<Matrix> {
        let first = parts.first()?;
        let mut data = first.data.clone();
        for p in &parts[1..] {
            if p.cols != first.cols {
                return None;
            }
            match (&mut data, &p.data) {
                (WeightData::F32(a), WeightData::F32(b)) => a.extend_from_slice(b),
                (WeightData::Q4_0(a), WeightData::Q4_0(b)) => a.extend_from_slice(b),
                (WeightData::Q4_1(a), WeightData::Q4_1(b)) => a.extend_from_slice(b),
                (WeightData::Q8_0(a), WeightData::Q8_0(b)) => a.extend_from_slice(b),
                _ => return None,
            }
        }
        Some(Matrix { rows: parts.iter().map(|p| p.rows).sum(), cols: first.cols, data })
    }
}

/// Computes `x · Wᵀ` for `m` rows of `x` into `out` (`m` rows of `W.rows`), on every thread of
/// `pool`.
///
/// Panics if the activation form does not match the weights or the slices are too short: callers
/// size them from the model's own shapes.
pub fn matmul(pool: &ThreadPool, isa: Isa, w: &Matrix, x: Input<'_>, m: usize, out: &mut [f32], epilogue: Epilogue) {
    let out_cols = w.rows;
    assert!(out.len() >= m * out_cols, "matmul output too small");
    match x {
        Input::F32(v) => assert!(v.len() >= m * w.cols && w.input_kind() == InputKind::F32, "matmul input mismatch"),
        Input::Q8(v) => assert!(
            v.rows() >= m && v.blocks_per_row() == w.cols / QK && w.input_kind() == InputKind::Q8,
            "matmul input mismatch"
        ),
    }
    if m == 0 {
        return;
    }
    let out = SharedMut(out.as_mut_ptr());
    let job = |t: usize, threads: usize| {
        let rows = split_range(w.rows, t, threads, 2);
        let sink = Sink { out, out_cols, epilogue };
        let nb = w.cols / QK;
        match (&w.data, x, isa) {
            #[cfg(target_arch = "x86_64")]
            (WeightData::Q4_0(b), Input::Q8(x), Isa::Avx2) => unsafe { avx2::quant_rows(b, nb, x, rows, m, &sink) },
            #[cfg(target_arch = "x86_64")]
            (WeightData::Q4_1(b), Input::Q8(x), Isa::Avx2) => unsafe { avx2::quant_rows(b, nb, x, rows, m, &sink) },
            #[cfg(target_arch = "x86_64")]
            (WeightData::Q8_0(b), Input::Q8(x), Isa::Avx2) => unsafe { avx2::quant_rows(b, nb, x, rows, m, &sink) },
            #[cfg(target_arch = "x86_64")]
            (WeightData::F32(v), Input::F32(x), Isa::Avx2) => unsafe { avx2::f32_rows(v, w.cols, x, rows, m, &sink) },
            (WeightData::Q4_0(b), Input::Q8(x), _) => {
                rows_loop(rows, m, &sink, |r, m0, t| scalar::quant_tile(b, nb, x, r, m0, t))
            }
            (WeightData::Q4_1(b), Input::Q8(x), _) => {
                rows_loop(rows, m, &sink, |r, m0, t| scalar::quant_tile(b, nb, x, r, m0, t))
            }
            (WeightData::Q8_0(b), Input::Q8(x), _) => {
                rows_loop(rows, m, &sink, |r, m0, t| scalar::quant_tile(b, nb, x, r, m0, t))
            }
            (WeightData::F32(v), Input::F32(x), _) => {
                rows_loop(rows, m, &sink, |r, m0, t| scalar::f32_tile(v, w.cols, x, r, m0, t))
            }
            _ => unreachable!("checked above"),
        }
    };
    pool.run(&job);
}

/// Up to this many activation rows share one pass over a weight row.
const MR: usize = 4;

/// A tile: `nr` (1 or 2) weight rows starting at `row` against `mr` (1..=4) activation rows
/// starting at `m0`; results in `t[i][r]`.
pub(crate) struct Tile {
    pub nr: usize,
    pub mr: usize,
    pub v: [[f32; MR]; 2],
}

pub(crate) struct Sink {
    out: SharedMut<f32>,
    out_cols: usize,
    epilogue: Epilogue,
}

impl Sink {
    /// Writes a finished tile. SAFETY of the writes: threads own disjoint row ranges of `W`, hence
    /// disjoint output columns.
    #[inline]
    fn put(&self, row: usize, m0: usize, t: &Tile) {
        for r in 0..t.mr {
            let base = (m0 + r) * self.out_cols;
            unsafe {
                match self.epilogue {
                    Epilogue::Store => (0..t.nr).for_each(|i| *self.out.0.add(base + row + i) = t.v[i][r]),
                    Epilogue::Add => (0..t.nr).for_each(|i| *self.out.0.add(base + row + i) += t.v[i][r]),
                }
            }
        }
    }
}

/// Activation rows processed against all of a thread's weight rows before moving on: enough to
/// reuse each weight row, few enough that their quantized tiles stay in the L2 cache.
const M_BLOCK: usize = 64;

/// Walks a thread's weight rows (one or two at a time) against the activation rows (up to `MR`
/// at a time), in blocks of `M_BLOCK` activation rows. Always inlined, so that inside the AVX2
/// entry points the whole loop nest is compiled with AVX2.
#[inline(always)]
fn rows_loop(rows: std::ops::Range<usize>, m: usize, sink: &Sink, tile: impl Fn(usize, usize, &mut Tile)) {
    let mut t = Tile { nr: 0, mr: 0, v: [[0.0; MR]; 2] };
    // Two weight rows per pass give decode (one or two activation rows) independent chains to
    // overlap; with more activation rows one weight row per pass keeps the tile in registers.
    // Each output element sees the same operations either way, so these choices are free.
    let pair = if m <= 2 { 2 } else { 1 };
    for m_start in (0..m).step_by(M_BLOCK) {
        let m_end = (m_start + M_BLOCK).min(m);
        let mut row = rows.start;
        while row < rows.end {
            t.nr = (rows.end - row).min(pair);
            let mut m0 = m_start;
            while m0 < m_end {
                t.mr = (m_end - m0).min(MR);
                tile(row, m0, &mut t);
                sink.put(row, m0, &t);
                m0 += t.mr;
            }
            row += t.nr;
        }
    }
}

/// Integer views of a weight block for the portable kernels.
pub(crate) trait QuantBlock: Copy + Send + Sync + 'static {
    /// The 32 quantized values (offsets such as Q4_0's -8 applied), scale and additive offset.
    fn ints(&self) -> ([i32; 32], f32, f32);
}

impl QuantBlock for BlockQ4_0 {
    fn ints(&self) -> ([i32; 32], f32, f32) {
        let mut q = [0i32; 32];
        for j in 0..16 {
            q[j] = (self.qs[j] & 15) as i32 - 8;
            q[j + 16] = (self.qs[j] >> 4) as i32 - 8;
        }
        (q, f16_to_f32(self.d), 0.0)
    }
}

impl QuantBlock for BlockQ4_1 {
    fn ints(&self) -> ([i32; 32], f32, f32) {
        let mut q = [0i32; 32];
        for j in 0..16 {
            q[j] = (self.qs[j] & 15) as i32;
            q[j + 16] = (self.qs[j] >> 4) as i32;
        }
        (q, f16_to_f32(self.d), f16_to_f32(self.m))
    }
}

impl QuantBlock for BlockQ8_0 {
    fn ints(&self) -> ([i32; 32], f32, f32) {
        (std::array::from_fn(|j| self.qs[j] as i32), f16_to_f32(self.d), 0.0)
    }
}

mod scalar {
    use super::*;

    pub(super) fn quant_tile<B: QuantBlock>(
        w: &[B],
        nb: usize,
        x: &QuantizedRows,
        row: usize,
        m0: usize,
        t: &mut Tile,
    ) {
        for i in 0..t.nr {
            for r in 0..t.mr {
                let (mut acc, mut mins) = (0f32, 0f32);
                for (b, wb) in w[(row + i) * nb..(row + i + 1) * nb].iter().enumerate() {
                    let (xq, xd, xs) = x.block(m0 + r, b);
                    let (q, d, m) = wb.ints();
                    let isum: i32 = q.iter().zip(xq).map(|(&a, &b)| a * b as i32).sum();
                    acc += isum as f32 * (d * xd);
                    mins = m.mul_add(xs, mins);
                }
                t.v[i][r] = acc + mins;
            }
        }
    }

    pub(super) fn f32_tile(w: &[f32], cols: usize, x: &[f32], row: usize, m0: usize, t: &mut Tile) {
        for i in 0..t.nr {
            for r in 0..t.mr {
                let wr = &w[(row + i) * cols..(row + i + 1) * cols];
                let xr = &x[(m0 + r) * cols..(m0 + r + 1) * cols];
                t.v[i][r] = wr.iter().zip(xr).map(|(a, b)| a * b).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)] // kernel bodies are one unsafe region: raw pointers and intrinsics
pub(crate) mod avx2;

#[cfg(test)]
mod tests {
    use super::super::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    }

    fn matrices(rows: usize, cols: usize) -> Vec<Matrix> {
        let w = sample(rows * cols, 1);
        vec![
            Matrix { rows, cols, data: WeightData::F32(w.clone()) },
            Matrix { rows, cols, data: WeightData::Q4_0(quantize_q4_0(&w)) },
            Matrix { rows, cols, data: WeightData::Q4_1(quantize_q4_1(&w)) },
            Matrix { rows, cols, data: WeightData::Q8_0(quantize_q8_0(&w)) },
        ]
    }

    /// f64 reference over the dequantized weights and (for quantized formats) dequantized inputs.
    fn reference(w: &Matrix, x: &[f32], m: usize) -> Vec<f64> {
        let mut wrow = vec![0f32; w.cols];
        let xq = QuantizedRows::from_rows(Isa::Scalar, &x[..m * w.cols], w.cols);
        let mut out = vec![0f64; m * w.rows];
        for n in 0..w.rows {
            w.dequantize_row(n, &mut wrow);
            for i in 0..m {
                out[i * w.rows + n] = (0..w.cols)
                    .map(|k| {
                        let xv = match w.input_kind() {
                            InputKind::F32 => x[i * w.cols + k],
                            InputKind::Q8 => {
                                let (qs, d, _) = xq.block(i, k / QK);
                                d * qs[k % QK] as f32
                            }
                        };
                        wrow[k] as f64 * xv as f64
                    })
                    .sum();
            }
        }
        out
    }

    fn run(pool: &ThreadPool, isa: Isa, w: &Matrix, x: &[f32], m: usize, ep: Epilogue, out: &mut [f32]) {
        let xq = QuantizedRows::from_rows(isa, &x[..m * w.cols], w.cols);
        let input = match w.input_kind() {
            InputKind::F32 => Input::F32(x),
            InputKind::Q8 => Input::Q8(&xq),
        };
        matmul(pool, isa, w, input, m, out, ep);
    }

    #[test]
    fn every_format_and_isa_matches_the_f64_reference() {
        let (rows, cols) = (14, 96);
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for w in matrices(rows, cols) {
                for m in [1, 3, 4, 9] {
                    let x = sample(m * cols, 9 + m as u32);
                    let want = reference(&w, &x, m);
                    for isa in Isa::available() {
                        let mut out = vec![0f32; m * rows];
                        run(&pool, isa, &w, &x, m, Epilogue::Store, &mut out);
                        for (g, r) in out.iter().zip(&want) {
                            // Scales are rounded through f16, so allow a relative error of ~1e-3.
                            assert!(
                                (*g as f64 - r).abs() < 2e-3 * (1.0 + r.abs()),
                                "{} {isa:?} m={m}: {g} vs {r}",
                                w.format_name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_row_is_bitwise_the_same_whatever_the_batch_and_thread_count() {
        let (rows, cols) = (10, 64);
        for w in matrices(rows, cols) {
            for isa in Isa::available() {
                let x = sample(7 * cols, 5);
                let mut alone = vec![0f32; rows];
                run(&ThreadPool::new(1), isa, &w, &x[2 * cols..3 * cols], 1, Epilogue::Store, &mut alone);
                for (threads, m) in [(2, 7), (3, 5), (1, 4)] {
                    let mut batch = vec![0f32; m * rows];
                    run(&ThreadPool::new(threads), isa, &w, &x[..m * cols], m, Epilogue::Store, &mut batch);
                    assert_eq!(&batch[2 * rows..3 * rows], &alone[..], "{} {isa:?}", w.format_name());
                }
            }
        }
    }

    #[test]
    fn the_add_epilogue_accumulates_into_the_output() {
        let (rows, cols, m) = (8, 64, 3);
        let pool = ThreadPool::new(2);
        for w in matrices(rows, cols) {
            for isa in Isa::available() {
                let x = sample(m * cols, 2);
                let mut plain = vec![0f32; m * rows];
                run(&pool, isa, &w, &x, m, Epilogue::Store, &mut plain);
                let mut added = vec![1.5f32; m * rows];
                run(&pool, isa, &w, &x, m, Epilogue::Add, &mut added);
                assert!(added.iter().zip(&plain).all(|(a, p)| (a - (p + 1.5)).abs() < 1e-6));
            }
        }
    }
}
