// FP8 E4M3 linear layers (bf16 activations): quantizing rows, the decode GEMV on FP8 weights,
// and the two helpers of larger products (outer scaling after an FP8 tensor-core GEMM; FP8 rows
// dequantized to bf16 for GPUs without FP8 tensor cores).
//
// A quantized row is `q = round(v / s)` with `s = max|v| / 448` (1 for a zero row), rounded to
// nearest even and saturated (__NV_SATFINITE), the division IEEE-exact: the same codes and scales
// as the host's `model::quant::fp8::quantize`, bit for bit. Weights are row-major [n, k] bytes
// with one f32 scale per row; k must be a multiple of 16 for the GEMV (16-byte loads).
#include <cuda_fp8.h>

#include "gemv.cuh"

using bf16 = __nv_bfloat16;

namespace {
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

// The decode GEMV on FP8 weights: y[m, n] = (x[m, k] · q[n, k]ᵀ) * scale[n] for 1 to 8 tokens,
// through the decode GEMV core (gemv.cuh): each 16-byte load holds 16 codes, matched by two
// 16-byte loads of bf16 activations. `gemv_fp8_bf16_m1` .. `_m8`, `_m1_wide`, `_m1_split`.
struct E4M3 {
    using Code = uint8_t;
    static constexpr int N = 16;
    static constexpr bool SCALED = true;
    __device__ __forceinline__ static void unpack(const uint4& raw, float (&out)[N]) {
        const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const float2 f = fp8x2_to_float2(pairs[i]);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
};
LUMEN_GEMV(E4M3, bf16, fp8_bf16)

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
