// Skinny matrix products for decode: y[m, n] = x[m, k] · W[n, k]ᵀ for m <= MAX_M tokens.
//
// Decode is memory-bound: a step must stream every weight once, so what matters is reading W at
// full bandwidth. One warp computes one output feature for all m tokens: its lanes walk the
// weight row with 16-byte loads (UNROLL of them in flight per lane), multiply each load with the
// m activation rows (small, read through the cache), and reduce across the warp at the end.
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

template <typename T, int M>
__device__ void gemv(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int n, int k) {
    constexpr int N = Vec16<T>::N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * WARPS + warp;
    if (row >= n) return;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const int vecs = k / N;  // 16-byte vectors per row
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    int v = lane;
    for (; v + 32 * (UNROLL - 1) < vecs; v += 32 * UNROLL) {
        Vec16<T> wv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) wv[u].raw = __ldg(wrow + v + 32 * u);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                Vec16<T> xv;
                xv.raw = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k) + v + 32 * u);
#pragma unroll
                for (int i = 0; i < N; ++i) acc[m] += wv[u].get(i) * xv.get(i);
            }
        }
    }
    for (; v < vecs; v += 32) {
        Vec16<T> wv;
        wv.raw = __ldg(wrow + v);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            Vec16<T> xv;
            xv.raw = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k) + v);
#pragma unroll
            for (int i = 0; i < N; ++i) acc[m] += wv.get(i) * xv.get(i);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) y[(size_t)m * n + row] = from_float<T>(s);
    }
}

#define LUMEN_GEMV_M(T, SUFFIX, M)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        gemv_##SUFFIX##_m##M(const T* w, const T* x, T* y, int n, int k) {                                     \
        gemv<T, M>(w, x, y, n, k);                                                                             \
    }
#define LUMEN_GEMV(T, SUFFIX)                                                                                  \
    LUMEN_GEMV_M(T, SUFFIX, 1)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 2)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 3)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 4)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 5)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 6)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 7)                                                                                 \
    LUMEN_GEMV_M(T, SUFFIX, 8)

LUMEN_GEMV(float, f32)
LUMEN_GEMV(__nv_bfloat16, bf16)
