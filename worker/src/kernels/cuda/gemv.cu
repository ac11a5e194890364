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

template <typename T, int M>
__device__ void gemv(const T* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int n, int k) {
    constexpr int N = Vec16<T>::N;
    constexpr int R = Shape<M>::R, U = Shape<M>::U;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * WARPS + warp) * R;
    if (row0 >= n) return;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const uint4*>(w + (size_t)min(row0 + r, n - 1) * k);
    const int vecs = k / N;  // 16-byte vectors per row
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    int v = lane;
    for (; v + 32 * (U - 1) < vecs; v += 32 * U) {
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
    for (; v < vecs; v += 32) {
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
        for (int m = 0; m < M; ++m) {
            const float s = warp_sum(acc[r][m]);
            if (lane == 0 && row0 + r < n) y[(size_t)m * n + row0 + r] = from_float<T>(s);
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
