// Skinny matrix products for decode: y[m, n] = x[m, k] · W[n, k]ᵀ for m <= MAX_M tokens.
//
// Decode is memory-bound: a step must stream every weight once, so what matters is reading W at
// full bandwidth. One warp computes R output features (1, 2 or 4, growing with m; see Shape) for
// all m tokens: its lanes walk the R weight rows with 16-byte loads (several in flight per lane),
// multiply them with the m activation rows (small, read through the cache), and reduce across
// the warp at the end.
// W is row-major [n, k] (a linear layer's Hugging Face layout), k a multiple of 8 (bf16) or 4
// (f32) and rows 16-byte aligned; accumulation is f32.
#include "common.cuh"

namespace {
constexpr int WARPS = 8;
constexpr int UNROLL = 4;
}  // namespace

// 16 bytes of T: 8 bf16 or 4 f32.
template <typename T>
struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
    uint4 raw;
    __device__ __forceinline__ float get(int i) const {
        const T* v = reinterpret_cast<const T*>(&raw);
        return to_float(v[i]);
    }
};

// Output features per warp for m tokens: each activation load then serves R weight rows, which
// keeps the activation traffic (L1/L2) under the weight stream once m grows (at m = 8 and one row
// per warp it was 8 activation loads per weight load, and the step took twice as long as at m = 1).
template <int M>
struct Shape {
    static constexpr int R = M >= 4 ? 4 : (M >= 2 ? 2 : 1);
    static constexpr int U = R == 1 ? UNROLL : 2;  // 16-byte weight loads in flight per row
};

// R output features per warp, U 16-byte loads in flight per row (Shape<M> unless a benchmark
// tries others: scripts/gpu/decode_chain_bench.cu), and S warps sharing each group of R rows,
// each over a 1/S slice of k (their sums meet in shared memory).
template <typename T, int M, int R = Shape<M>::R, int U = Shape<M>::U, int S = 1>
__device__ void gemv(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int n, int k) {
    static_assert(WARPS % S == 0, "whole row groups per block");
    constexpr int N = Vec16<T>::N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = warp / S, part = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + group) * R;
    if (S == 1 && row0 >= n) return;  // with S > 1 every warp reaches the __syncthreads below
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const uint4*>(w + (size_t)min(row0 + r, n - 1) * k);
    const int vecs = k / N;  // 16-byte vectors per row
    const int slice = (vecs + S - 1) / S, end = min(vecs, (part + 1) * slice);
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    int v = part * slice + lane;
    if (row0 >= n) v = end;  // an idle group (S > 1) only joins the reduction
    for (; v + 32 * (U - 1) < end; v += 32 * U) {
        Vec16<T> wv[R][U];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) wv[r][u].raw = __ldg(wrow[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                Vec16<T> xv;
                xv.raw = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k) + v + 32 * u);
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int i = 0; i < N; ++i) acc[r][m] += wv[r][u].get(i) * xv.get(i);
            }
        }
    }
    for (; v < end; v += 32) {
        Vec16<T> wv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r].raw = __ldg(wrow[r] + v);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            Vec16<T> xv;
            xv.raw = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k) + v);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int i = 0; i < N; ++i) acc[r][m] += wv[r].get(i) * xv.get(i);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (S > 1) {
        __shared__ float partial[WARPS][R][M];
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int m = 0; m < M; ++m) partial[warp][r][m] = acc[r][m];
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m)
                for (int p = 1; p < S; ++p) acc[r][m] += partial[warp + p][r][m];
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m)
            if (lane == 0 && row0 + r < n) y[(size_t)m * n + row0 + r] = from_float<T>(acc[r][m]);
}

#define LUMEN_GEMV_M(T, SUFFIX, M)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        gemv_##SUFFIX##_m##M(const T* w, const T* x, T* y, int n, int k) {                                     \
        await_previous_kernel();                                                                               \
        gemv<T, M>(w, x, y, n, k);                                                                             \
    }
// Two more shapes for one token, chosen by the host from the output size (gemv.rs), as measured
// on the H200 for Llama-3.1-8B's projections (scripts/gpu/decode_chain_bench.cu):
// `m1_wide`, two output features per warp, for long outputs (gate_up 57 instead of 60 µs);
// `m1_split`, two features per pair of warps, each warp over half of k, for short outputs
// (o 11.3 instead of 12.5 µs, down 31.4 instead of 33.0 µs). qkv kept one feature per warp.
#define LUMEN_GEMV(T, SUFFIX)                                                                                  \
    LUMEN_GEMV_M(T, SUFFIX, 1)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 2)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 3)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 4)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 5)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 6)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 7)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 8)                                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        gemv_##SUFFIX##_m1_wide(const T* w, const T* x, T* y, int n, int k) {                                  \
        await_previous_kernel();                                                                               \
        gemv<T, 1, 2>(w, x, y, n, k);                                                                          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        gemv_##SUFFIX##_m1_split(const T* w, const T* x, T* y, int n, int k) {                                 \
        await_previous_kernel();                                                                               \
        gemv<T, 1, 2, UNROLL, 2>(w, x, y, n, k);                                                               \
    }

LUMEN_GEMV(float, f32)
LUMEN_GEMV(__nv_bfloat16, bf16)
