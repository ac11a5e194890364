// Paged attention over the KV cache, for prefill chunks and decode tokens alike: causal,
// variable lengths, grouped-query, online softmax, optionally split over the context.
//
// Inputs (all int32, built by the host for each step):
//   seqs   [num_seqs][4]  query_start (first packed row), query_len, context_len (tokens in the
//                         cache after this step), table_start (offset of its block table in `tables`)
//   tiles  [num_tiles][4] seq, first (offset in the sequence's query tokens), count, unused
//   tables                the block tables of all sequences, concatenated
// A token at position p sees positions 0..=p of its sequence, whose K/V the cache already holds
// (reshape_and_cache ran first), so prompt chunks that start after cached prefix blocks work the
// same as whole prompts. Cache layout as in cache.cu: [num_blocks, kv_heads, block_size, head_dim].
//
// One CTA (4 warps) takes one tile of tokens of one sequence, for `heads_per_cta` query heads
// sharing one KV head: at most ROWS (token, head) rows (16; 4 in the decode kernel, whose tiles
// have one token: fewer registers and less shared memory per CTA, so more CTAs per
// multiprocessor), so the K/V of a chunk of 32 positions is read from memory once for all of them. Per chunk, lane l scores position l of the chunk for the
// warp's row, then the lanes split head_dim to accumulate the values; the next chunk's K/V loads
// are in flight meanwhile (register double buffering). With gridDim.z > 1 each
// split handles `chunks_per_split` chunks and writes unnormalised partials (acc, max, sum) that
// `paged_attention_combine` merges.
#include "attention_common.cuh"

namespace {
constexpr int TILE_ROWS = 16;   // rows per CTA of the general kernel
constexpr int DECODE_ROWS = 4;  // rows per CTA of the decode kernel (one query token per tile)
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int CHUNK = 32;
}  // namespace

// Two values of a shared-memory row as floats (4-byte aligned for bf16).
__device__ __forceinline__ float2 pair(const float* p) { return make_float2(p[0], p[1]); }
__device__ __forceinline__ float2 pair(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

template <typename T, int D, int ROWS>
__device__ void paged_attention(T* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,
                                const T* __restrict__ q, int q_stride, int out_stride, const T* __restrict__ k_cache,
                                const T* __restrict__ v_cache, const int* __restrict__ tiles,
                                const int* __restrict__ seqs, const int* __restrict__ tables, int kv_heads, int ratio,
                                int heads_per_cta, int block_size, int chunks_per_split, float scale,
                                unsigned int* __restrict__ counters) {
    constexpr int DL = D / 32;  // values of a row per lane
    constexpr int ROWS_PER_WARP = ROWS / WARPS;
    constexpr int PER_VEC = 16 / sizeof(T);  // elements per 16-byte load
    constexpr int VECS_PER_ROW = D / PER_VEC;
    constexpr int VECS_PER_THREAD = CHUNK * VECS_PER_ROW / THREADS;
    static_assert(CHUNK * VECS_PER_ROW % THREADS == 0, "whole loads per thread");
    constexpr int Q_VECS_PER_THREAD = (ROWS * VECS_PER_ROW + THREADS - 1) / THREADS;
    // K and V are staged as stored (bf16 takes half the shared memory of floats, so more CTAs
    // fit); a K row is padded to an odd number of 4-byte words, so lanes reading different rows
    // at one column hit different banks.
    constexpr int KPAD = 4 / sizeof(T);
    __shared__ float q_s[ROWS][D];
    __shared__ __align__(16) T k_s[CHUNK][D + KPAD];
    __shared__ __align__(16) T v_s[CHUNK][D];

    const TileWork work(tiles, seqs, tables, ratio, heads_per_cta);
    const int kv_head = work.kv_head, head0 = work.head0, split = work.split, splits = work.splits;
    const int first = work.first, count = work.count, query_start = work.query_start;
    const int pos0 = work.pos0, rows = work.rows;
    const int* table = work.table;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    // Queries: 16-byte loads issued now, stored to shared memory once the first chunk's K/V
    // loads are in flight too (one memory round trip for both).
    uint4 qraw[Q_VECS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < Q_VECS_PER_THREAD; ++j) {
        const int i = threadIdx.x + j * THREADS, r = i / VECS_PER_ROW;
        if (r < rows) {
            const int token = query_start + first + r / heads_per_cta, head = head0 + r % heads_per_cta;
            qraw[j] = reinterpret_cast<const uint4*>(q + (size_t)token * q_stride + head * D)[i % VECS_PER_ROW];
        }
    }

    const int span = pos0 + count;  // positions seen by the tile's last token
    const int num_chunks = (span + CHUNK - 1) / CHUNK;
    const int chunk_begin = split * chunks_per_split;
    const int chunk_end = min(num_chunks, chunk_begin + chunks_per_split);

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DL];
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < DL; ++j) acc[i][j] = 0.f;
    }

    // 16-byte loads of a chunk's K and V, VECS_PER_THREAD of each per thread, all issued before
    // any is used. The next chunk's loads are issued right after this chunk is in shared memory,
    // so they are in flight while this chunk is computed.
    uint4 kraw[VECS_PER_THREAD], vraw[VECS_PER_THREAD];
    auto load_chunk = [&](int c) {
#pragma unroll
        for (int j = 0; j < VECS_PER_THREAD; ++j) {
            const int i = threadIdx.x + j * THREADS, pos = c * CHUNK + i / VECS_PER_ROW;
            kraw[j] = vraw[j] = make_uint4(0, 0, 0, 0);
            if (pos < span) {
                const size_t block = table[pos / block_size];
                const size_t row = (block * kv_heads + kv_head) * block_size + pos % block_size;
                kraw[j] = reinterpret_cast<const uint4*>(k_cache + row * D)[i % VECS_PER_ROW];
                vraw[j] = reinterpret_cast<const uint4*>(v_cache + row * D)[i % VECS_PER_ROW];
            }
        }
    };
    if (chunk_begin < chunk_end) load_chunk(chunk_begin);

    for (int c = chunk_begin; c < chunk_end; ++c) {
        const int base = c * CHUNK;
        __syncthreads();  // the previous chunk fully used
        if (c == chunk_begin) {
#pragma unroll
            for (int j = 0; j < Q_VECS_PER_THREAD; ++j) {
                const int i = threadIdx.x + j * THREADS, r = i / VECS_PER_ROW, d0 = (i % VECS_PER_ROW) * PER_VEC;
                if (r >= rows) continue;
                const T* qv = reinterpret_cast<const T*>(&qraw[j]);
#pragma unroll
                for (int e = 0; e < PER_VEC; ++e) q_s[r][d0 + e] = to_float(qv[e]);
            }
        }
#pragma unroll
        for (int j = 0; j < VECS_PER_THREAD; ++j) {
            const int i = threadIdx.x + j * THREADS, p = i / VECS_PER_ROW, d0 = (i % VECS_PER_ROW) * PER_VEC;
            uint32_t* kdst = reinterpret_cast<uint32_t*>(&k_s[p][d0]);
            kdst[0] = kraw[j].x;
            kdst[1] = kraw[j].y;
            kdst[2] = kraw[j].z;
            kdst[3] = kraw[j].w;
            *reinterpret_cast<uint4*>(&v_s[p][d0]) = vraw[j];
        }
        if (c + 1 < chunk_end) load_chunk(c + 1);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) {
            const int r = warp + i * WARPS;
            const int row_pos = pos0 + r / heads_per_cta;
            if (r >= rows || base > row_pos) continue;  // uniform across the warp
            const int key_pos = base + lane;
            const bool visible = key_pos <= row_pos;
            float s = -INFINITY;
            if (visible) {
                float dot = 0.f;
#pragma unroll 16
                for (int d = 0; d < D; d += 2) {
                    const float2 kk = pair(&k_s[lane][d]);
                    dot += q_s[r][d] * kk.x + q_s[r][d + 1] * kk.y;
                }
                s = dot * scale;
            }
            const float m_new = fmaxf(m[i], warp_max(s));  // finite: position `base` is visible
            const float p = visible ? expf(s - m_new) : 0.f;
            const float correction = expf(m[i] - m_new);
            l[i] = l[i] * correction + warp_sum(p);
            m[i] = m_new;
#pragma unroll
            for (int j = 0; j < DL; ++j) acc[i][j] *= correction;
            const int last = min(CHUNK, row_pos - base + 1);
            for (int k = 0; k < last; ++k) {
                const float pk = __shfl_sync(0xffffffffu, p, k);
#pragma unroll
                for (int j = 0; j < DL; ++j) acc[i][j] += pk * to_float(v_s[k][lane + 32 * j]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int r = warp + i * WARPS;
        if (r >= rows) continue;
        const int token = query_start + first + r / heads_per_cta, head = head0 + r % heads_per_cta;
        if (splits == 1) {
            const float inv = 1.f / l[i];
            T* o = out + (size_t)token * out_stride + head * D;
#pragma unroll
            for (int j = 0; j < DL; ++j) o[lane + 32 * j] = from_float<T>(acc[i][j] * inv);
        } else {
            const size_t slot = ((size_t)(blockIdx.x * gridDim.y + blockIdx.y) * splits + split) * ROWS + r;
#pragma unroll
            for (int j = 0; j < DL; ++j) part_acc[slot * D + lane + 32 * j] = acc[i][j];
            if (lane == 0) {
                part_ml[slot * 2] = m[i];
                part_ml[slot * 2 + 1] = l[i];
            }
        }
    }
    merge_if_last<T, D, ROWS>(out, part_acc, part_ml, out_stride, tiles, seqs, ratio, heads_per_cta, counters);
}

#define LUMEN_ATTENTION_ROWS(T, NAME, D, ROWS)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        NAME(T* out, float* part_acc, float* part_ml, const T* q, int q_stride, int out_stride, const T* k_cache, \
             const T* v_cache, const int* tiles, const int* seqs, const int* tables, int kv_heads, int ratio,   \
             int heads_per_cta, int block_size, int chunks_per_split, float scale, unsigned int* counters) {   \
        await_previous_kernel();                                                                               \
        paged_attention<T, D, ROWS>(out, part_acc, part_ml, q, q_stride, out_stride, k_cache, v_cache, tiles,  \
                                    seqs, tables, kv_heads, ratio, heads_per_cta, block_size, chunks_per_split, \
                                    scale, counters);                                                          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                      \
        NAME##_combine(T* out, const float* part_acc, const float* part_ml, int out_stride, const int* tiles,  \
                       const int* seqs, int ratio, int heads_per_cta, int splits) {                            \
        await_previous_kernel();                                                                               \
        combine_tile<T, D, ROWS>(out, part_acc, part_ml, out_stride, tiles, seqs, ratio, heads_per_cta,        \
                                 splits);                                                                      \
    }
// paged_attention_<type>_d<D>[_combine]: tiles of up to 16 rows; paged_attention_decode_...: 4.
#define LUMEN_ATTENTION(T, SUFFIX, D)                                                                          \
    LUMEN_ATTENTION_ROWS(T, paged_attention_##SUFFIX##_d##D, D, TILE_ROWS)                                     \
    LUMEN_ATTENTION_ROWS(T, paged_attention_decode_##SUFFIX##_d##D, D, DECODE_ROWS)

LUMEN_ATTENTION(float, f32, 64)
LUMEN_ATTENTION(float, f32, 128)
LUMEN_ATTENTION(__nv_bfloat16, bf16, 64)
LUMEN_ATTENTION(__nv_bfloat16, bf16, 128)
