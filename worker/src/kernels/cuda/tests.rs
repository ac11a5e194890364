//! Every CUDA kernel against its CPU reference on random inputs, in f32 and bf16 (needs a GPU:
//! run with `--features cuda` on a GPU machine, see `scripts/gpu/run-on-device.sh`).
//!
//! Inputs are rounded to the kernel's element type before the reference sees them, so the only
//! differences are arithmetic order and the rounding of outputs. Errors are measured as
//! ‖gpu − cpu‖ / ‖cpu‖.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::attention::{AttentionKind, AttentionPlan, PrefillTiles, Tiles};
use super::ops::RopeTables;
use super::pack::HostPack;
use super::scratch::LayerScratch;
use super::{CudaKernels, device_ptr, gemv};
use crate::kernels::cpu::attention::{CacheLayout, paged_attention, write_kv};
use crate::kernels::cpu::isa::Isa;
use crate::kernels::cpu::matmul::{Epilogue, Input, Matrix, WeightData, matmul};
use crate::kernels::cpu::ops::{RopeTable, rms_norm, silu_mul};
use crate::kernels::cpu::pool::ThreadPool;
use crate::model::batch::{BatchSeq, attention_queries};
use crate::splitmix::SplitMix64;

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

pub(super) fn device() -> Device {
    Device::new_cuda_with_stream(0).expect("a CUDA device (these tests run on a GPU machine)")
}

/// Relative L2 error allowed for a dtype's outputs.
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 { 2e-5 } else { 1e-2 }
}

/// Uniform values in [-scale, scale) from a SplitMix64 stream.
pub(super) fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut mix = SplitMix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    (0..n).map(|_| (mix.unit() * 2.0 - 1.0) * scale).collect()
}

/// `values` as the kernel's element type would hold them.
pub(super) fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

/// A device tensor of `dtype` holding `values`.
pub(super) fn upload_f32(values: &[f32], shape: &[usize], dtype: DType, device: &Device) -> crate::Result<Tensor> {
    Tensor::from_slice(values, shape, device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|e| super::gpu_error("uploading a tensor", e))
}

pub(super) fn download(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub(super) fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let diff: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

pub(super) fn assert_close(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    let err = relative_error(got, want);
    assert!(err < tolerance(dtype), "{what} ({dtype:?}): relative error {err:.2e}");
}

#[test]
fn add_rms_norm_matches_the_cpu_with_and_without_the_residual() {
    let dev = device();
    for (seed, dtype) in DTYPES.into_iter().enumerate() {
        let k = CudaKernels::load(&dev, dtype, 64).unwrap();
        let (rows, n, eps) = (5, 576, 1e-5);
        let x = rounded(&random(seed as u64 * 3 + 1, rows * n, 2.0), dtype);
        let delta = rounded(&random(seed as u64 * 3 + 2, rows * n, 2.0), dtype);
        let w = rounded(&random(seed as u64 * 3 + 3, n, 1.0), dtype);
        let w_dev = upload_f32(&w, &[n], dtype, &dev).unwrap();

        let x_dev = upload_f32(&x, &[rows, n], dtype, &dev).unwrap();
        let out = k.add_rms_norm(&x_dev, None, &w_dev, eps).unwrap();
        let mut want = vec![0f32; rows * n];
        rms_norm(Isa::detect(), &x, &w, eps, &mut want);
        assert_close("rms_norm", dtype, &download(&out), &want);
        assert_eq!(download(&x_dev), x, "x must be left alone without a residual");

        let delta_dev = upload_f32(&delta, &[rows, n], dtype, &dev).unwrap();
        let out = k.add_rms_norm(&x_dev, Some(&delta_dev), &w_dev, eps).unwrap();
        let sum = rounded(&x.iter().zip(&delta).map(|(a, b)| a + b).collect::<Vec<_>>(), dtype);
        rms_norm(Isa::detect(), &sum, &w, eps, &mut want);
        assert_close("add_rms_norm", dtype, &download(&out), &want);
        assert_eq!(download(&x_dev), sum, "the residual stream must hold x + delta");
    }
}

#[test]
fn rotary_and_cache_rotates_queries_in_place_and_writes_every_slot_like_the_cpu() {
    let dev = device();
    // SmolLM2's heads of 64 (a few tokens), Llama-3.1-8B's of 128 (a batch of 300).
    let shapes = [(64, 20, 9, 3, 8), (128, 300, 32, 8, 40)];
    for (seed, (dtype, (hd, tokens, heads, kv_heads, num_blocks))) in
        DTYPES.into_iter().flat_map(|d| shapes.map(|s| (d, s))).enumerate()
    {
        let k = CudaKernels::load(&dev, dtype, hd).unwrap();
        let layout = CacheLayout { block_size: 16, kv_heads, head_dim: hd };
        let (q_width, kv) = (heads * hd, kv_heads * hd);
        let width = q_width + 2 * kv;
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32)).collect();
        let table = RopeTable::new(&inv_freq, 512);
        let tables = RopeTables::new(&table, &dev).unwrap();
        let qkv = rounded(&random(seed as u64 + 30, tokens * width, 1.0), dtype);
        let positions: Vec<u32> = (0..tokens as u32).map(|t| (t * 73 + 5) % 512).collect();
        // Scattered, distinct slots across blocks (37 is prime to the slot count).
        let slots: Vec<u32> = (0..tokens as u32).map(|t| (t * 37 + 11) % (num_blocks * 16) as u32).collect();
        let elems = num_blocks * layout.block_elems();
        let k_cache = Tensor::zeros(elems, dtype, &dev).unwrap();
        let v_cache = Tensor::zeros(elems, dtype, &dev).unwrap();
        let mut pack = HostPack::default();
        let (pos, slot) = (pack.push(positions.iter().copied()), pack.push(slots.iter().copied()));
        let meta = pack.upload(&dev).unwrap();
        let qkv_dev = upload_f32(&qkv, &[tokens, width], dtype, &dev).unwrap();
        k.rotary_and_cache(&qkv_dev, heads, kv_heads, meta.ptr(pos), meta.ptr(slot), &tables, &k_cache, &v_cache, 16)
            .unwrap();

        // The CPU path: rotate queries and keys, then write K/V into an f16 cache.
        let mut rotated = qkv.clone();
        for (t, row) in rotated.chunks_exact_mut(width).enumerate() {
            table.apply(&mut row[..q_width + kv], positions[t] as usize);
        }
        let keys: Vec<f32> = rotated.chunks_exact(width).flat_map(|r| r[q_width..q_width + kv].to_vec()).collect();
        let values: Vec<f32> = rotated.chunks_exact(width).flat_map(|r| r[q_width + kv..].to_vec()).collect();
        let (mut k_want, mut v_want) = (vec![f16::ZERO; elems], vec![f16::ZERO; elems]);
        write_kv(&layout, &keys, &values, &slots, &mut k_want, &mut v_want);
        let to_f32 = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();

        let got = download(&qkv_dev);
        let q_of = |rows: &[f32]| rows.chunks_exact(width).flat_map(|r| r[..q_width].to_vec()).collect::<Vec<_>>();
        assert_close("rotated queries", dtype, &q_of(&got), &q_of(&rotated));
        // Keys are rotated on both sides (f16 rounding on the CPU): close, and zero where no
        // token went. Values are copied: identical at f16 precision.
        let k_got = download(&k_cache);
        let err = relative_error(&k_got, &to_f32(&k_want));
        assert!(err < tolerance(dtype).max(1e-3), "cached keys ({dtype:?}): relative error {err:.2e} (f16 reference)");
        let written: std::collections::HashSet<usize> = slots
            .iter()
            .flat_map(|&s| {
                let (b, o) = (s as usize / 16, s as usize % 16);
                (0..kv_heads).flat_map(move |g| {
                    let start = ((b * kv_heads + g) * 16 + o) * hd;
                    start..start + hd
                })
            })
            .collect();
        assert!(k_got.iter().enumerate().all(|(i, &v)| written.contains(&i) || v == 0.0), "a key outside the slots");
        let v_got: Vec<f16> = download(&v_cache).into_iter().map(f16::from_f32).collect();
        assert!(v_got == v_want, "cached values differ ({dtype:?})");
    }
}

#[test]
fn silu_mul_and_gather_rows_match_the_cpu() {
    let dev = device();
    for (seed, dtype) in DTYPES.into_iter().enumerate() {
        let k = CudaKernels::load(&dev, dtype, 64).unwrap();
        // 16-byte vectors (SmolLM2's and Llama-3.1-8B's widths), and a width that is not whole
        // vectors (one value at a time).
        for (rows, width) in [(3, 1536), (300, 14336), (5, 1001)] {
            let gu = rounded(&random(seed as u64 + 20 + width as u64, rows * 2 * width, 8.0), dtype);
            let gu_dev = upload_f32(&gu, &[rows, 2 * width], dtype, &dev).unwrap();
            let out = k.silu_mul(&gu_dev).unwrap();
            let mut want = vec![0f32; rows * width];
            silu_mul(Isa::detect(), &gu, width, &mut want);
            assert_close(&format!("silu_mul {rows}x{width}"), dtype, &download(&out), &want);
        }

        let (vocab, h) = (50, 96);
        let table = rounded(&random(seed as u64 + 21, vocab * h, 1.0), dtype);
        let table_dev = upload_f32(&table, &[vocab, h], dtype, &dev).unwrap();
        let ids = [7u32, 0, 49, 7, 13];
        let mut pack = HostPack::default();
        let section = pack.push(ids);
        let meta = pack.upload(&dev).unwrap();
        let got = download(&k.gather_rows(&table_dev, meta.ptr(section), ids.len()).unwrap());
        let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
        assert_eq!(got, want);

        // Three tensor-parallel ranks' vocabulary ranges (17 + 17 + 16 ids): each gives its
        // rows and zeros for the others' ids, so the sum is the whole table's rows.
        let mut sum = vec![0f32; ids.len() * h];
        for range in [0..17, 17..34, 34..50] {
            let shard = &table[range.start * h..range.end * h];
            let shard_dev = upload_f32(shard, &[range.len(), h], dtype, &dev).unwrap();
            let out = k.alloc((ids.len(), h)).unwrap();
            k.gather_rows_from(&shard_dev, range.start, meta.ptr(section), &out).unwrap();
            let got = download(&out);
            for (r, &id) in ids.iter().enumerate() {
                let row = &got[r * h..(r + 1) * h];
                if range.contains(&(id as usize)) {
                    assert_eq!(row, &table[id as usize * h..(id as usize + 1) * h], "id {id} in {range:?}");
                } else {
                    assert!(row.iter().all(|&v| v == 0.0), "id {id} outside {range:?} gave a nonzero row");
                }
                sum[r * h..(r + 1) * h].iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
        }
        assert_eq!(sum, want, "the ranks' rows summed");
    }
}

/// `x · Wᵀ` for `m` rows of `kk` against `n` outputs on the GPU (through `product`) and on the
/// CPU, in `dtype`.
fn check_linear(
    dev: &Device,
    pool: &ThreadPool,
    dtype: DType,
    seed: u64,
    (m, n, kk): (usize, usize, usize),
    product: impl Fn(&Tensor, &Tensor) -> crate::Result<Tensor>,
) {
    let w = rounded(&random(seed, n * kk, 0.05), dtype);
    let x = rounded(&random(seed + 1, m * kk, 1.0), dtype);
    let w_dev = upload_f32(&w, &[n, kk], dtype, dev).unwrap();
    let x_dev = upload_f32(&x, &[m, kk], dtype, dev).unwrap();
    let got = download(&product(&x_dev, &w_dev).unwrap());
    let matrix = Matrix { rows: n, cols: kk, data: WeightData::F32(w) };
    let mut want = vec![0f32; m * n];
    matmul(pool, Isa::detect(), &matrix, Input::F32(&x), m, &mut want, Epilogue::Store);
    assert_close(&format!("linear {m}x{kk} . {n}x{kk}"), dtype, &got, &want);
}

#[test]
fn the_gemv_matches_the_cpu_for_every_row_count_and_shape() {
    let dev = device();
    let pool = ThreadPool::new(2);
    for (seed, dtype) in DTYPES.into_iter().enumerate() {
        let k = CudaKernels::load(&dev, dtype, 64).unwrap();
        // 1000 outputs is not a multiple of the kernel's features per block, and k = 1032 leaves
        // a tail after the unrolled loop; one row takes the split variant up to 4096 outputs
        // (1000: pairs of warps over halves of k), the plain one above (6001), the wide one from
        // 16384 (16391: an odd tail); 2-8 rows take one instance each.
        let wide = gemv::GEMV_WIDE_N + 7;
        let mut cases = vec![(1, 1000, 1032), (1, 6001, 256), (1, wide, 264)];
        cases.extend((2..=gemv::GEMV_MAX_ROWS).map(|m| (m, 257 + 40 * m, if m % 2 == 0 { 1032 } else { 512 })));
        for (i, &case) in cases.iter().enumerate() {
            check_linear(&dev, &pool, dtype, 1000 + 20 * seed as u64 + i as u64, case, |x, w| k.gemv(x, w));
        }
    }
}

#[test]
fn linear_layers_match_the_cpu_matmul_through_gemv_and_cublas() {
    let dev = device();
    let pool = ThreadPool::new(2);
    for (seed, dtype) in DTYPES.into_iter().enumerate() {
        let k = CudaKernels::load(&dev, dtype, 64).unwrap();
        // Up to GEMV_DEFAULT_ROWS rows the GEMV, beyond cuBLAS (3, 9, 33 rows); k = 1028 in
        // bf16 is no whole number of 16-byte vectors, so cuBLAS takes even one row.
        let cases = [(1, 1000, 1032), (2, 300, 4096), (3, 64, 4096), (9, 96, 256), (33, 40, 128), (1, 70, 1028)];
        for (i, &case) in cases.iter().enumerate() {
            check_linear(&dev, &pool, dtype, 3000 + 20 * seed as u64 + i as u64, case, |x, w| k.linear(x, w));
        }
    }
}

#[test]
fn our_own_gemm_matches_the_cpu_through_cublas_and_cublaslt_plain_and_tuned() {
    use super::blas_lt::GemmLibrary;
    let dev = device();
    let pool = ThreadPool::new(2);
    for library in [GemmLibrary::Cublas, GemmLibrary::Lt, GemmLibrary::LtTuned] {
        for (seed, dtype) in DTYPES.into_iter().enumerate() {
            let mut k = CudaKernels::load(&dev, dtype, 64).unwrap();
            k.use_own_gemm_with(library).unwrap();
            // Past the GEMV's rows; odd sizes; (33, 40, 128) twice: the second reuses its plan.
            let cases = [(9, 96, 256), (33, 40, 128), (64, 512, 1024), (200, 384, 640), (33, 40, 128)];
            for (i, &case) in cases.iter().enumerate() {
                let seed = 5000 + 20 * seed as u64 + i as u64;
                check_linear(&dev, &pool, dtype, seed, case, |x, w| k.linear(x, w));
            }
        }
    }
}

#[test]
fn layer_scratch_hands_out_aligned_views_and_reuses_a_half_two_layers_later() {
    let dev = device();
    let scratch = LayerScratch::new(&dev, DType::BF16, 100, 10).unwrap();
    let take = |n: usize, dtype| scratch.take(&(n,).into(), dtype).unwrap();
    let ptr = |t: &Tensor| device_ptr(t).unwrap();
    assert!(take(3, DType::BF16).is_none(), "inactive outside the layers");
    scratch.begin_layer(0);
    let a = take(6, DType::BF16).unwrap();
    let b = take(5, DType::BF16).unwrap();
    assert_eq!(ptr(&b) - ptr(&a), 16, "6 bf16 values round up to one 16-byte step");
    assert!(take(100, DType::BF16).is_none(), "past the half: the caller allocates");
    assert!(take(4, DType::F32).is_some() && take(7, DType::F32).is_none(), "the f32 region holds 10");
    assert!(take(4, DType::U32).is_none(), "other element types allocate");
    scratch.begin_layer(1);
    let c = take(6, DType::BF16).unwrap();
    assert!(ptr(&c) >= ptr(&a) + 200 || ptr(&c) + 200 <= ptr(&a), "layer 1 uses the other half");
    scratch.begin_layer(2);
    assert_eq!(ptr(&take(6, DType::BF16).unwrap()), ptr(&a), "layer 2 reuses layer 0's half from its start");
    scratch.end_layers();
    assert!(take(3, DType::BF16).is_none());
}

/// One attention case: the sequences of a step as (context_len, query_len).
struct AttentionCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: Vec<(usize, usize)>,
}

/// The attention kernels each dtype runs: SIMT for f32; tensor cores (prefill tiles of 64 and of
/// 128 rows) and SIMT for bf16.
const ATTENTION_KINDS: [Kernels; 4] = [
    (DType::F32, AttentionKind::Simt, PrefillTiles::Short),
    (DType::BF16, AttentionKind::TensorCore, PrefillTiles::Short),
    (DType::BF16, AttentionKind::TensorCore, PrefillTiles::Tall),
    (DType::BF16, AttentionKind::Simt, PrefillTiles::Short),
];

/// Element type, attention kernels and prefill tiles of one attention test run.
type Kernels = (DType, AttentionKind, PrefillTiles);

/// Runs the GPU kernel and the CPU reference on random queries and caches; returns the
/// relative error and the plan's split count.
fn attention_error(case: &AttentionCase, kernels: Kernels, seed: u64) -> (f64, usize) {
    attention_error_merging(case, kernels, seed, true)
}

/// As `attention_error`, with split contexts merged by their last CTA or by a second launch.
fn attention_error_merging(
    case: &AttentionCase,
    (dtype, kind, tiles): Kernels,
    seed: u64,
    merge_in_place: bool,
) -> (f64, usize) {
    let dev = device();
    let mut k = CudaKernels::load_with(&dev, dtype, case.head_dim, kind).unwrap();
    k.merge_splits = merge_in_place;
    k.prefill_tiles = tiles;
    let layout = CacheLayout { block_size: case.block_size, kv_heads: case.kv_heads, head_dim: case.head_dim };
    let blocks_needed: usize = case.seqs.iter().map(|&(ctx, _)| ctx.div_ceil(case.block_size)).sum();
    let num_blocks = blocks_needed + 3;
    // Block tables: a shuffled assignment of the pool's blocks.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    let order = random(seed + 1, num_blocks, 1.0);
    ids.sort_by(|&a, &b| order[a as usize].total_cmp(&order[b as usize]));
    let mut seqs = Vec::new();
    let (mut next, mut row) = (0, 0);
    for &(ctx, qlen) in &case.seqs {
        let n = ctx.div_ceil(case.block_size);
        seqs.push(BatchSeq {
            query_start: row,
            query_len: qlen,
            context_len: ctx,
            block_table: ids[next..next + n].to_vec(),
        });
        next += n;
        row += qlen;
    }
    let tokens = row;
    // Caches hold values exact in f16 (the CPU cache) and in the kernel's type.
    let elems = num_blocks * layout.block_elems();
    let k_vals: Vec<f32> =
        rounded(&random(seed + 2, elems, 1.0), dtype).into_iter().map(|v| f16::from_f32(v).to_f32()).collect();
    let v_vals: Vec<f32> =
        rounded(&random(seed + 3, elems, 1.0), dtype).into_iter().map(|v| f16::from_f32(v).to_f32()).collect();
    let q_width = case.heads * case.head_dim;
    let stride = q_width + 2 * case.kv_heads * case.head_dim;
    let q = rounded(&random(seed + 4, tokens * stride, 2.0), dtype);

    let mut pack = HostPack::default();
    let plan = AttentionPlan::new(&mut pack, &seqs, case.heads, case.kv_heads, k.attention_setup()).unwrap();
    let decodes = seqs.iter().filter(|s| s.query_len == 1).count();
    let parts: Vec<Tiles> = plan.launches().iter().map(|&(tiles, _)| tiles).collect();
    let prefill = if tiles == PrefillTiles::Tall && kind == AttentionKind::TensorCore {
        Tiles::PrefillTall
    } else {
        Tiles::Prefill
    };
    let want: Vec<Tiles> = [(decodes > 0).then_some(Tiles::Decode), (decodes < seqs.len()).then_some(prefill)]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(parts, want, "decode sequences take the decode kernel, the rest the prefill kernel");
    let meta = pack.upload(&dev).unwrap();
    let k_cache = upload_f32(&k_vals, &[elems], dtype, &dev).unwrap();
    let v_cache = upload_f32(&v_vals, &[elems], dtype, &dev).unwrap();
    let q_dev = upload_f32(&q, &[tokens, stride], dtype, &dev).unwrap();
    let scale = 1.0 / (case.head_dim as f32).sqrt();
    let out = k.paged_attention(&plan, &meta, &q_dev, &k_cache, &v_cache, case.block_size, scale).unwrap();
    assert_eq!(out.dims(), [tokens, q_width]);
    // A second launch with the same kernels (and split counters) must give the same result.
    let again = k.paged_attention(&plan, &meta, &q_dev, &k_cache, &v_cache, case.block_size, scale).unwrap();
    assert_eq!(download(&again), download(&out), "a repeated launch differs (split counters not reset?)");
    assert!(device_ptr(&out).is_ok());

    let k_f16: Vec<f16> = k_vals.iter().map(|&v| f16::from_f32(v)).collect();
    let v_f16: Vec<f16> = v_vals.iter().map(|&v| f16::from_f32(v)).collect();
    let q_rows: Vec<f32> = q.chunks_exact(stride).flat_map(|r| r[..q_width].to_vec()).collect();
    let queries = attention_queries(&seqs);
    let mut want = vec![0f32; tokens * q_width];
    let pool = ThreadPool::new(2);
    paged_attention(&pool, Isa::detect(), &layout, case.heads, scale, &q_rows, &queries, &k_f16, &v_f16, &mut want);
    (relative_error(&download(&out), &want), plan.splits())
}

#[test]
fn paged_decode_attention_matches_the_cpu_and_splits_long_contexts() {
    let case = AttentionCase {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        seqs: vec![(1, 1), (17, 1), (300, 1), (1500, 1)],
    };
    for (i, kernels) in ATTENTION_KINDS.into_iter().enumerate() {
        let (dtype, kind, _) = kernels;
        for merge_in_place in [true, false] {
            let (err, splits) = attention_error_merging(&case, kernels, 100 + i as u64, merge_in_place);
            assert!(splits > 1, "four decode sequences should split the context (got {splits})");
            assert!(
                err < tolerance(dtype),
                "decode attention ({dtype:?} {kind:?}, merged in place: {merge_in_place}): relative error {err:.2e}"
            );
        }
    }
    // Eight query heads per KV head (the SIMT decode kernel's 4 rows take half a group per CTA).
    let wide_groups =
        AttentionCase { heads: 16, kv_heads: 2, head_dim: 128, block_size: 8, seqs: vec![(90, 1), (129, 1), (5, 1)] };
    for (i, kernels) in ATTENTION_KINDS.into_iter().enumerate() {
        let (dtype, kind, _) = kernels;
        let (err, _) = attention_error(&wide_groups, kernels, 120 + i as u64);
        assert!(err < tolerance(dtype), "decode, 8 heads per KV head ({dtype:?} {kind:?}): relative error {err:.2e}");
    }
    // Many decode sequences (a split of at most 2), SmolLM2's 3 heads per KV head of 64, blocks of 8.
    let many = AttentionCase {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        block_size: 8,
        seqs: (0..150).map(|i| (1 + (i * 37) % 300, 1)).collect(),
    };
    for (i, kernels) in ATTENTION_KINDS.into_iter().enumerate() {
        let (dtype, kind, _) = kernels;
        let (err, splits) = attention_error(&many, kernels, 150 + i as u64);
        assert!(
            err < tolerance(dtype),
            "150 decode sequences ({dtype:?} {kind:?}, {splits} splits): relative error {err:.2e}"
        );
    }
}

#[test]
fn paged_prefill_attention_is_causal_over_cached_prefixes_and_mixed_batches() {
    let cases = [
        // SmolLM2's shape: 9 heads over 3 KV heads of 64; a fresh prompt, a chunk after a cached
        // prefix, and two decodes.
        AttentionCase {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(40, 40), (100, 37), (1, 1), (70, 1)],
        },
        // Llama-3.1-8B's shape with a long chunked prompt and blocks of 32.
        AttentionCase {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            block_size: 32,
            seqs: vec![(700, 300), (5, 5), (33, 1)],
        },
        // Eight query heads per KV head, block size 8.
        AttentionCase { heads: 16, kv_heads: 2, head_dim: 128, block_size: 8, seqs: vec![(90, 90), (129, 2)] },
    ];
    for (c, case) in cases.iter().enumerate() {
        for (i, kernels) in ATTENTION_KINDS.into_iter().enumerate() {
            let (dtype, kind, tiles) = kernels;
            let (err, _) = attention_error(case, kernels, 200 + 10 * c as u64 + i as u64);
            assert!(err < tolerance(dtype), "case {c} ({dtype:?} {kind:?} {tiles:?}): relative error {err:.2e}");
        }
    }
}

/// The shapes the tensor-core kernels must cover: both head sizes, blocks of 16, 1, 4 and 8
/// query heads per KV head, contexts from 1 to 8k, decode split (few sequences) and unsplit
/// (many), prompt chunks of 200-700 tokens over contexts up to 2k and beside decodes.
#[test]
fn tensor_core_attention_covers_head_sizes_group_ratios_and_long_contexts() {
    let mut cases = Vec::new();
    for head_dim in [64, 128] {
        for (heads, kv_heads) in [(8, 8), (16, 4), (32, 4)] {
            cases.push(AttentionCase {
                heads,
                kv_heads,
                head_dim,
                block_size: 16,
                seqs: vec![(1, 1), (8192, 1), (4097, 1), (65, 1)],
            });
            cases.push(AttentionCase {
                heads,
                kv_heads,
                head_dim,
                block_size: 16,
                seqs: vec![(700, 700), (2048, 200), (17, 1), (3000, 1)],
            });
        }
    }
    cases.push(AttentionCase {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        seqs: (0..256).map(|i| (1 + (i * 97) % 2048, 1)).collect(),
    });
    for (c, case) in cases.iter().enumerate() {
        for tiles in [PrefillTiles::Short, PrefillTiles::Tall] {
            let (err, splits) = attention_error(case, (DType::BF16, AttentionKind::TensorCore, tiles), 300 + c as u64);
            let ratio = case.heads / case.kv_heads;
            assert!(
                err < tolerance(DType::BF16),
                "case {c} ({tiles:?} prefill tiles; head_dim {}, {ratio} heads per KV head, {} sequences, {splits} splits): relative error {err:.2e}",
                case.head_dim,
                case.seqs.len()
            );
            if case.seqs.len() == 4 && case.seqs.iter().all(|s| s.1 == 1) {
                assert!(splits > 1, "case {c}: four long decodes should split the context");
            }
            if case.seqs.len() == 256 {
                assert_eq!(splits, 1, "256 decode sequences fill the GPU without a split");
            }
        }
    }
}
