// Reducing f32 logits rows on the device for the sampler (see `sampling::reduce` and sample.rs):
// the sampler's per-token edits (penalties, logit_bias, suppression) in place, then the argmax
// (greedy) or the k best (top-k sampling) of each row, so the host copies back a token or k
// candidates instead of a vocabulary row.
//
// Exactness: the results equal the CPU sampler's bit for bit. Edits use the _rn intrinsics (never
// contracted into FMAs, IEEE division); values are compared as the CPU sanitizes them (NaN as
// -inf, +inf as FLT_MAX, -0 equal to +0) through an order-preserving u32 key; ties go to the
// lower id, as in `row::argmax` and `row::top_k_into`.
//
// Structured outputs: a row may have a token mask (packed bits, bit i % 32 of word i / 32 set iff
// id i is allowed); a masked id reads as -inf in every pass of the reduction, exactly as the CPU
// sampler sets it to -inf (after the edits: -inf absorbs them, so the order does not matter).
// The row itself is never copied or rewritten for it.
//
// One block of THREADS threads per row. Per row, `desc` holds 5 u32: mode (0: leave the row, 1:
// argmax, 2: top-k), k, first edit, edit count, mask slot (NO_MASK: none; else the row's mask is
// `masks + slot * mask_words`); each edit is 5 u32: token, flags (1: repetition,
// 2: subtract, 4: bias, 8: suppress), then the f32 bits of repetition, subtract and bias. `out`
// holds OUT_STRIDE u32 per row: [0] the argmax (0xFFFFFFFF when every value is -inf) or the best
// candidate, [1, 1 + k) the candidates' ids best first, [1 + TOPK_MAX, 1 + TOPK_MAX + k) their
// sanitized values' bits.

#include "common.cuh"

#define TOPK_MAX 64
#define OUT_STRIDE (1 + 2 * TOPK_MAX)
#define THREADS 1024
#define NO_TOKEN 0xFFFFFFFFu
#define NO_MASK 0xFFFFFFFFu
#define DESC 5

__device__ __forceinline__ float sanitize(float x) {
    x = (x >= -INFINITY) ? x : -INFINITY;  // false only for NaN
    return x > 3.402823466e38f ? 3.402823466e38f : x;
}

// Larger sanitized value <=> larger key; equal values (+0 and -0 included) <=> equal keys.
__device__ __forceinline__ uint32_t key_of(float x) {
    const float s = sanitize(x);
    uint32_t b = s == 0.f ? 0u : __float_as_uint(s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The key of row[i] under the token mask `allowed` (nullptr: no mask): a masked id is -inf.
__device__ __forceinline__ uint32_t masked_key(const float* row, const uint32_t* allowed, int i) {
    if (allowed != nullptr && ((allowed[i >> 5] >> (i & 31)) & 1u) == 0u) return key_of(-INFINITY);
    return key_of(row[i]);
}

__device__ __forceinline__ float value_of(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// (key, id) pairs: higher key first, then lower id.
__device__ __forceinline__ bool better(uint32_t ka, uint32_t ia, uint32_t kb, uint32_t ib) {
    return ka > kb || (ka == kb && ia < ib);
}

__device__ void apply_edits(float* row, int vocab, const uint32_t* edits, int count) {
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const uint32_t* ed = edits + 5 * e;
        const uint32_t token = ed[0], flags = ed[1];
        if (token >= (uint32_t)vocab) continue;
        float x = row[token];
        if (flags & 1u) {
            const float rep = __uint_as_float(ed[2]);
            x = x > 0.f ? __fdiv_rn(x, rep) : __fmul_rn(x, rep);
        }
        if (flags & 2u) x = __fsub_rn(x, __uint_as_float(ed[3]));
        if (flags & 4u) x = __fadd_rn(x, __uint_as_float(ed[4]));
        if (flags & 8u) x = -INFINITY;
        row[token] = x;
    }
}

__device__ void row_argmax(const float* row, const uint32_t* allowed, int vocab, uint32_t* out) {
    __shared__ uint32_t s_key[THREADS / 32], s_id[THREADS / 32];
    uint32_t bk = 0, bi = NO_TOKEN;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const uint32_t k = masked_key(row, allowed, i);
        if (k > bk) { bk = k; bi = i; }  // ids rise within a thread: the first of equals stays
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const uint32_t ok = __shfl_xor_sync(0xffffffffu, bk, off), oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (better(ok, oi, bk, bi)) { bk = ok; bi = oi; }
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) { s_key[warp] = bk; s_id[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        bk = lane < warps ? s_key[lane] : 0;
        bi = lane < warps ? s_id[lane] : NO_TOKEN;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const uint32_t ok = __shfl_xor_sync(0xffffffffu, bk, off), oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (better(ok, oi, bk, bi)) { bk = ok; bi = oi; }
        }
        // Every value -inf (or NaN): no token, as `row::argmax` answers None.
        if (lane == 0) out[0] = (bk <= key_of(-INFINITY)) ? NO_TOKEN : bi;
    }
}

__device__ void row_top_k(const float* row, const uint32_t* allowed, int vocab, int k, uint32_t* out) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_remaining, s_gt;
    __shared__ uint32_t warp_eq[THREADS / 32];
    __shared__ uint32_t cand_key[TOPK_MAX], cand_id[TOPK_MAX];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;

    // Radix select, 8 bits a pass from the top: the key of the k-th best value (`prefix`), and
    // how many of the values equal to it are among the k best (`remaining`).
    uint32_t prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int base = 0; base < vocab; base += blockDim.x) {
            const int i = base + threadIdx.x;
            const uint32_t key = i < vocab ? masked_key(row, allowed, i) : 0u;
            const uint32_t digit = (i < vocab && (key & mask) == prefix) ? (key >> shift) & 255u : 256u;
            // Logits crowd into few digits: one atomic per group of equal digits in the warp.
            const uint32_t peers = __match_any_sync(0xffffffffu, digit);
            if (digit != 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t above = 0;
            for (int d = 255; d >= 0; --d) {
                if (above + hist[d] >= remaining) {
                    s_prefix = prefix | ((uint32_t)d << shift);
                    s_remaining = remaining - above;
                    break;
                }
                above += hist[d];
            }
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
    }
    const uint32_t threshold = prefix, gt = k - remaining;

    // Collect: every value above the threshold, and the `remaining` lowest ids equal to it.
    if (threadIdx.x == 0) s_gt = 0;
    __syncthreads();
    uint32_t eq_before = 0;
    for (int base = 0; base < vocab; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const uint32_t key = i < vocab ? masked_key(row, allowed, i) : 0u;
        if (i < vocab && key > threshold) {
            const uint32_t slot = atomicAdd(&s_gt, 1u);
            cand_key[slot] = key;
            cand_id[slot] = i;
        }
        // Equal ones in id order: ranks within the warp (ballot) and across warps (warp_eq).
        const bool eq = i < vocab && key == threshold;
        const uint32_t ballot = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) warp_eq[warp] = __popc(ballot);
        __syncthreads();
        uint32_t offset = eq_before + __popc(ballot & ((1u << lane) - 1u)), total = 0;
        for (int w = 0; w < warps; ++w) {
            if (w < warp) offset += warp_eq[w];
            total += warp_eq[w];
        }
        if (eq && offset < remaining) {
            cand_key[gt + offset] = key;
            cand_id[gt + offset] = i;
        }
        eq_before += total;
        __syncthreads();
    }

    // Rank the k candidates (k <= 64: each counts the ones that beat it).
    if (threadIdx.x < k) {
        const uint32_t key = cand_key[threadIdx.x], id = cand_id[threadIdx.x];
        int rank = 0;
        for (int j = 0; j < k; ++j) rank += better(cand_key[j], cand_id[j], key, id);
        out[1 + rank] = id;
        out[1 + TOPK_MAX + rank] = __float_as_uint(value_of(key));
        if (rank == 0) out[0] = id;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) reduce_rows(float* logits, int vocab, const uint32_t* desc,
                                                                   const uint32_t* edits, const uint32_t* masks,
                                                                   int mask_words, uint32_t* out) {
    await_previous_kernel();
    const int r = blockIdx.x;
    const uint32_t* d = desc + DESC * (size_t)r;
    const uint32_t mode = d[0], k = d[1], slot = d[4];
    if (mode == 0) return;
    float* row = logits + (size_t)r * vocab;
    const uint32_t* allowed = slot == NO_MASK ? nullptr : masks + (size_t)slot * mask_words;
    apply_edits(row, vocab, edits + 5 * (size_t)d[2], (int)d[3]);
    __syncthreads();
    uint32_t* o = out + (size_t)r * OUT_STRIDE;
    if (mode == 1) {
        row_argmax(row, allowed, vocab, o);
    } else {
        const int kk = (int)min(min(k, (uint32_t)TOPK_MAX), (uint32_t)vocab);
        if (kk > 0) row_top_k(row, allowed, vocab, kk, o);
    }
}
