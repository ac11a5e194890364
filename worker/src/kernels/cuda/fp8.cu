// FP8 E4M3 linear layers (bf16 activations): quantizing rows, the decode GEMV on FP8 weights,
// and the two helpers of larger products (outer scaling after an FP8 tensor-core GEMM; FP8 rows
// dequantized to bf16 for GPUs without FP8 tensor cores).
//
// A quantized row is `q = round(v / s)` with `s = max|v| / 448` (1 for a zero row), rounded to
// nearest even and saturated (__NV_SATFINITE), the division IEEE-exact: the same codes and scales
// as the host's `model::quant::fp8::quantize`, bit for bit. Weights are row-major [n, k] bytes
// with one f32 scale per row; k must be a multiple of 16 for the GEMV (16-byte loads).
#include <cuda_fp8.h>

#include "common.cuh"

using bf16 = __nv_bfloat16;

namespace {
constexpr int WARPS = 8;

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.f;
    return warp_max(v);
}

// Two E4M3 codes (low byte first) as floats.
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t pair) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
}  // namespace

// One block per row of x [rows, k]: its scale into scale[row], its codes into q [rows, k].
template <typename T>
__device__ void quantize_rows(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale, int k) {
    const T* xr = x + (size_t)blockIdx.x * k;
    float m = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) m = fmaxf(m, fabsf(to_float(xr[i])));
    m = block_max(m);
    const float s = (m > 0.f && isfinite(m)) ? __fdiv_rn(m, 448.f) : 1.f;
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    uint8_t* qr = q + (size_t)blockIdx.x * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x)
        qr[i] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(xr[i]), s), __NV_SATFINITE, __NV_E4M3);
}

// bf16 rows: activations, and weights drawn on the device; f32 rows: a checkpoint's float
// weights quantized as they load (the host's reference quantizes the same f32 values).
extern "C" __global__ void __launch_bounds__(256)
    quantize_rows_fp8_bf16(const bf16* x, uint8_t* q, float* scale, int k) {
    await_previous_kernel();
    quantize_rows(x, q, scale, k);
}
extern "C" __global__ void __launch_bounds__(256) quantize_rows_fp8_f32(const float* x, uint8_t* q, float* scale, int k) {
    await_previous_kernel();
    quantize_rows(x, q, scale, k);
}

// y[m, n] = (x[m, k] · q[n, k]ᵀ) * scale[n] for M tokens: as gemv.cu's kernel, R output rows per
// warp, each lane streaming 16 codes per load and the matching 16 activations (two loads).
template <int M, int R>
__device__ void gemv_fp8(const uint8_t* __restrict__ w, const float* __restrict__ wscale, const bf16* __restrict__ x,
                         bf16* __restrict__ y, int n, int k) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * WARPS + warp) * R;
    if (row0 >= n) return;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const uint4*>(w + (size_t)min(row0 + r, n - 1) * k);
    const int vecs = k / 16;
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int v = lane; v < vecs; v += 32) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r] = __ldg(wrow[r] + v);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4* xrow = reinterpret_cast<const uint4*>(x + (size_t)m * k) + 2 * v;
            uint4 xv[2] = {__ldg(xrow), __ldg(xrow + 1)};
            const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(xv);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint16_t* wp = reinterpret_cast<const uint16_t*>(&wv[r]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float2 wf = fp8x2_to_float2(wp[i]);
                    const float2 xf = __bfloat1622float2(xp[i]);
                    acc[r][m] += wf.x * xf.x + wf.y * xf.y;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (row0 + r >= n) continue;
        const float s = wscale[row0 + r];
#pragma unroll
        for (int m = 0; m < M; ++m) y[(size_t)m * n + row0 + r] = __float2bfloat16_rn(acc[r][m] * s);
    }
}

#define LUMEN_GEMV_FP8(M, R)                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                        \
        gemv_fp8_bf16_m##M(const uint8_t* w, const float* wscale, const bf16* x, bf16* y, int n, int k) {           \
        await_previous_kernel();                                                                                    \
        gemv_fp8<M, R>(w, wscale, x, y, n, k);                                                                      \
    }
LUMEN_GEMV_FP8(1, 1)
LUMEN_GEMV_FP8(2, 2)
LUMEN_GEMV_FP8(3, 2)
LUMEN_GEMV_FP8(4, 4)
LUMEN_GEMV_FP8(5, 4)
LUMEN_GEMV_FP8(6, 4)
LUMEN_GEMV_FP8(7, 2)
LUMEN_GEMV_FP8(8, 2)

// y[i, j] *= row_scale[i] * col_scale[j] for y [m, n] (an FP8 GEMM's unscaled product).
extern "C" __global__ void __launch_bounds__(256)
    scale_outer_bf16(bf16* __restrict__ y, const float* __restrict__ row_scale, const float* __restrict__ col_scale,
                     int m, int n) {
    await_previous_kernel();
    const size_t total = (size_t)m * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const float v = __bfloat162float(y[i]) * row_scale[i / n] * col_scale[i % n];
        y[i] = __float2bfloat16_rn(v);
    }
}

// out[r, k] = q[r, k] * scale[r] in bf16, for `rows` rows (one block per row).
extern "C" __global__ void __launch_bounds__(256)
    dequantize_rows_fp8_bf16(const uint8_t* __restrict__ q, const float* __restrict__ scale, bf16* __restrict__ out,
                             int k) {
    await_previous_kernel();
    const uint8_t* qr = q + (size_t)blockIdx.x * k;
    bf16* orow = out + (size_t)blockIdx.x * k;
    const float s = scale[blockIdx.x];
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw(qr[i], __NV_E4M3);
        orow[i] = __float2bfloat16_rn(__half2float(*reinterpret_cast<const __half*>(&h)) * s);
    }
}
