// What both paged attention kernels share (attention.cu on CUDA cores, attention_mma.cu on
// tensor cores): the merge of a split context's partial softmax sums, either by the last CTA of
// each split group inside the attention launch or by a second launch (`*_combine`).
//
// Partials: for the (tile, head group) of blockIdx.x, blockIdx.y, split s and row r of a kernel
// of ROWS rows per CTA, slot ((blockIdx.x * gridDim.y + blockIdx.y) * splits + s) * ROWS + r
// holds D unnormalised output sums in `part_acc` and (max, sum) in `part_ml`, both in natural-log
// units (a split that saw no position of a row stores max = -inf). Both kernels run 4 warps.
#pragma once

#include "common.cuh"

namespace attention_common {
constexpr int WARPS = 4;
}

// What the plan (attention.rs) gives the CTA at (blockIdx.x, blockIdx.y, blockIdx.z): tile x of
// the step's tiles, head group y (heads_per_cta query heads of one KV head), split z.
struct TileWork {
    int kv_head, head0;   // the group's KV head and first query head
    int split, splits;
    int first, count;     // the tile's first token within the sequence's query, and its tokens
    int query_start;      // the sequence's first packed row
    int query_len, context_len;
    int pos0;             // position of the tile's first token
    int rows;             // (token, head) rows: count * heads_per_cta
    const int* table;     // the sequence's block table

    __device__ __forceinline__ TileWork(const int* __restrict__ tiles, const int* __restrict__ seqs,
                                        const int* __restrict__ tables, int ratio, int heads_per_cta) {
        const int groups = ratio / heads_per_cta;
        kv_head = blockIdx.y / groups;
        head0 = kv_head * ratio + (blockIdx.y % groups) * heads_per_cta;
        split = blockIdx.z;
        splits = gridDim.z;
        const int* tile = tiles + blockIdx.x * 4;
        const int* seq = seqs + tile[0] * 4;
        first = tile[1];
        count = tile[2];
        query_start = seq[0];
        query_len = seq[1];
        context_len = seq[2];
        table = tables + seq[3];
        pos0 = context_len - query_len + first;
        rows = count * heads_per_cta;
    }
};

// Merges the partials of the splits of the (tile, head group) of blockIdx.x, blockIdx.y: run by
// the last split's CTA of the attention launch, or by a launch of its grid without the z
// dimension. Partials are read past L1 (__ldcg): other multiprocessors wrote them.
template <typename T, int D, int ROWS>
__device__ void combine_tile(T* __restrict__ out, const float* __restrict__ part_acc,
                                        const float* __restrict__ part_ml, int out_stride,
                                        const int* __restrict__ tiles, const int* __restrict__ seqs, int ratio,
                                        int heads_per_cta, int splits) {
    constexpr int DL = D / 32;
    const int groups = ratio / heads_per_cta;
    const int head0 = (blockIdx.y / groups) * ratio + (blockIdx.y % groups) * heads_per_cta;
    const int* tile = tiles + blockIdx.x * 4;
    const int query_start = seqs[tile[0] * 4];
    const int first = tile[1], rows = tile[2] * heads_per_cta;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t base = (size_t)(blockIdx.x * gridDim.y + blockIdx.y) * splits * ROWS;
    for (int r = warp; r < rows; r += attention_common::WARPS) {
        float m = -INFINITY;
        for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(part_ml + (base + s * ROWS + r) * 2));
        float sum = 0.f, o[DL];
#pragma unroll
        for (int j = 0; j < DL; ++j) o[j] = 0.f;
        for (int s = 0; s < splits; ++s) {
            const size_t slot = base + s * ROWS + r;
            const float ms = __ldcg(part_ml + slot * 2);
            if (ms == -INFINITY) continue;  // a split with nothing visible
            const float w = expf(ms - m);
            sum += w * __ldcg(part_ml + slot * 2 + 1);
#pragma unroll
            for (int j = 0; j < DL; ++j) o[j] += w * __ldcg(part_acc + slot * D + lane + 32 * j);
        }
        const int token = query_start + first + r / heads_per_cta, head = head0 + r % heads_per_cta;
        T* dst = out + (size_t)token * out_stride + head * D;
#pragma unroll
        for (int j = 0; j < DL; ++j) dst[lane + 32 * j] = from_float<T>(o[j] / sum);
    }
}

// After a split CTA wrote its partials (every thread calls this): the last split of this
// (tile, head group) to finish merges them, so no second launch is needed. Nothing to do
// without a split or without counters (the host then launches paged_attention_combine).
template <typename T, int D, int ROWS>
__device__ void merge_if_last(T* __restrict__ out, const float* __restrict__ part_acc,
                              const float* __restrict__ part_ml, int out_stride, const int* __restrict__ tiles,
                              const int* __restrict__ seqs, int ratio, int heads_per_cta,
                              unsigned int* __restrict__ counters) {
    const int splits = gridDim.z;
    if (splits == 1 || counters == nullptr) return;
    __shared__ bool last;
    __threadfence();  // this CTA's partials are visible device-wide before its ticket is
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* counter = counters + blockIdx.x * gridDim.y + blockIdx.y;
        last = atomicAdd(counter, 1u) == (unsigned int)(splits - 1);
        if (last) *counter = 0;  // ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    combine_tile<T, D, ROWS>(out, part_acc, part_ml, out_stride, tiles, seqs, ratio, heads_per_cta, splits);
}

