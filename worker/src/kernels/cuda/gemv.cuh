// The decode GEMV's core, shared by the dense kernels (gemv.cu: bf16 / f32 weights) and the FP8
// ones (fp8.cu: E4M3 weights, one f32 scale per output feature): y[m, n] = x[m, k] · W[n, k]ᵀ
// for m <= 8 token rows.
//
// Decode is memory-bound: a step must stream every weight once, so what matters is reading W at
// full bandwidth. One warp computes R output features (1, 2 or 4, growing with m; see Shape) for
// all m tokens: its lanes walk the R weight rows with 16-byte loads (U in flight per row), turn
// each load into its N values once, multiply them with the m activation rows (small, read
// through the cache) and reduce across the warp at the end; S warps may share R rows, each over
// a 1/S slice of k, their sums meeting in shared memory.
//
// A weight format W provides: `Code` (the stored element), `N` (values per 16-byte load),
// `unpack(raw, out)` (a load's N values as f32) and `SCALED` (whether each output feature is
// multiplied by its f32 scale at the end). Rows are 16-byte aligned, k a multiple of N;
// activations T (bf16 or f32) are loaded 16 bytes at a time, N * sizeof(T) / 16 per weight load.
// Accumulation is f32.
#pragma once

#include "common.cuh"

namespace gemv_core {
constexpr int WARPS = 8;
constexpr int UNROLL = 4;

// Weights of the activations' own type: 8 bf16 or 4 f32 per load, unscaled.
template <typename T>
struct Dense {
    using Code = T;
    static constexpr int N = 16 / sizeof(T);
    static constexpr bool SCALED = false;
    __device__ __forceinline__ static void unpack(const uint4& raw, float (&out)[N]) {
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float(v[i]);
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

// The m activation values matching one weight load v of a row, as f32.
template <typename T, int N>
__device__ __forceinline__ void load_activations(const T* __restrict__ xrow, int v, float (&out)[N]) {
    constexpr int LOADS = N * sizeof(T) / 16;
    constexpr int PER = 16 / sizeof(T);
    const uint4* p = reinterpret_cast<const uint4*>(xrow) + (size_t)v * LOADS;
#pragma unroll
    for (int l = 0; l < LOADS; ++l) {
        const uint4 raw = __ldg(p + l);
        const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < PER; ++i) out[l * PER + i] = to_float(vals[i]);
    }
}

// R output features per warp, U 16-byte weight loads in flight per row, S warps per group of R
// rows (see the header). `scale` is read only when W::SCALED.
template <typename W, typename T, int M, int R = Shape<M>::R, int U = Shape<M>::U, int S = 1>
__device__ void gemv(const typename W::Code* __restrict__ w, const float* __restrict__ scale, const T* __restrict__ x,
                     T* __restrict__ y, int n, int k) {
    static_assert(WARPS % S == 0, "whole row groups per block");
    static_assert(W::N * sizeof(T) % 16 == 0, "whole activation loads per weight load");
    constexpr int N = W::N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = warp / S, part = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + group) * R;
    if (S == 1 && row0 >= n) return;  // with S > 1 every warp reaches the __syncthreads below
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const uint4*>(w + (size_t)min(row0 + r, n - 1) * k);
    const int vecs = k / N;  // 16-byte weight loads per row
    const int slice = (vecs + S - 1) / S, end = min(vecs, (part + 1) * slice);
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    // One weight load per row at v: its values against every token's.
    auto step = [&](const uint4 (&raw)[R], int v) {
        float wf[R][N];
#pragma unroll
        for (int r = 0; r < R; ++r) W::unpack(raw[r], wf[r]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xf[N];
            load_activations<T, N>(x + (size_t)m * k, v, xf);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int i = 0; i < N; ++i) acc[r][m] += wf[r][i] * xf[i];
        }
    };
    int v = part * slice + lane;
    if (row0 >= n) v = end;  // an idle group (S > 1) only joins the reduction
    for (; v + 32 * (U - 1) < end; v += 32 * U) {
        uint4 raw[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) raw[u][r] = __ldg(wrow[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < U; ++u) step(raw[u], v + 32 * u);
    }
    for (; v < end; v += 32) {
        uint4 raw[R];
#pragma unroll
        for (int r = 0; r < R; ++r) raw[r] = __ldg(wrow[r] + v);
        step(raw, v);
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
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (row0 + r >= n) continue;
        const float s = W::SCALED ? scale[row0 + r] : 1.f;
#pragma unroll
        for (int m = 0; m < M; ++m) y[(size_t)m * n + row0 + r] = from_float<T>(W::SCALED ? acc[r][m] * s : acc[r][m]);
    }
}
}  // namespace gemv_core

// The kernels of one weight format: `gemv_<SUFFIX>_m1` .. `_m8` (Shape<M>), and two more shapes
// for one token chosen by the host from the output size (gemv.rs), as measured on the H200 for
// Llama-3.1-8B's bf16 projections (scripts/gpu/decode_chain_bench.cu): `_m1_wide`, two features
// per warp, for long outputs (gate_up 57 instead of 60 µs); `_m1_split`, two features per pair of
// warps, each warp over half of k, for short outputs (o 11.3 instead of 12.5 µs, down 31.4
// instead of 33.0 µs). Every kernel takes (w, scale, x, y, n, k); dense formats ignore scale.
#define LUMEN_GEMV_KERNEL(W, T, NAME, ...)                                                                     \
    extern "C" __global__ void __launch_bounds__(gemv_core::WARPS * 32)                                        \
        NAME(const typename W::Code* w, const float* scale, const T* x, T* y, int n, int k) {                  \
        await_previous_kernel();                                                                               \
        gemv_core::gemv<W, T, __VA_ARGS__>(w, scale, x, y, n, k);                                              \
    }
#define LUMEN_GEMV(W, T, SUFFIX)                                                                               \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m1, 1)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m2, 2)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m3, 3)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m4, 4)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m5, 5)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m6, 6)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m7, 7)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m8, 8)                                                             \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m1_wide, 1, 2)                                                     \
    LUMEN_GEMV_KERNEL(W, T, gemv_##SUFFIX##_m1_split, 1, 2, gemv_core::UNROLL, 2)
