// Row-wise and element-wise operations of the Llama block: RMSNorm (with the residual add fused
// in), rotary embeddings, SwiGLU, and a row gather (embedding lookup, picking logits rows).
#include "common.cuh"

// One block per row of `n` values. When `delta` is given, first `x[row] += delta[row]` (stored
// back in T: `x` is the residual stream); then `out[row] = x / sqrt(mean(x^2) + eps) * weight`.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ weight,
                             T* __restrict__ out, int n, float eps) {
    const size_t row = blockIdx.x;
    T* xr = x + row * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = to_float(xr[i]);
        if (delta != nullptr) {
            const T sum = from_float<T>(v + to_float(delta[row * n + i]));
            xr[i] = sum;
            v = to_float(sum);
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    const float scale = 1.f / sqrtf(ss / n + eps);
    T* orow = out + row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        orow[i] = from_float<T>(to_float(xr[i]) * scale * to_float(weight[i]));
    }
}

// Rotates, in place, the first `heads` heads of every token row of `qkv` (row stride `stride`;
// the query heads then the key heads), pairing element i with i + half within each head
// (Hugging Face's rotate_half), by the angles of the token's position in the cos/sin tables
// (`[positions, half]` floats). One block per token.
template <typename T>
__device__ void rotary(T* __restrict__ qkv, int stride, const uint32_t* __restrict__ positions,
                       const float* __restrict__ cos_table, const float* __restrict__ sin_table, int heads, int half) {
    const size_t token = blockIdx.x;
    const size_t pos = positions[token];
    T* row = qkv + token * stride;
    const float* c = cos_table + pos * half;
    const float* s = sin_table + pos * half;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int head = i / half, j = i % half;
        T* h = row + head * 2 * half;
        const float x0 = to_float(h[j]), x1 = to_float(h[j + half]);
        h[j] = from_float<T>(x0 * c[j] - x1 * s[j]);
        h[j + half] = from_float<T>(x1 * c[j] + x0 * s[j]);
    }
}

// `out[r, j] = silu(gu[r, j]) * gu[r, width + j]` with `silu(g) = g / (1 + e^-g)`: each row of
// `gu` is [gate | up].
template <typename T>
__device__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int width, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / width, j = i % width;
        const float g = to_float(gu[r * 2 * width + j]);
        const float u = to_float(gu[r * 2 * width + width + j]);
        out[i] = from_float<T>(g / (1.f + expf(-g)) * u);
    }
}

// `out[r] = src[ids[r]]` for rows of `width` values. One block per output row.
template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const uint32_t* __restrict__ ids, T* __restrict__ out,
                            int width) {
    const T* s = src + (size_t)ids[blockIdx.x] * width;
    T* o = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = s[i];
}

#define LUMEN_OPS(T, SUFFIX)                                                                                      \
    extern "C" __global__ void add_rms_norm_##SUFFIX(T* x, const T* delta, const T* weight, T* out, int n,       \
                                                      float eps) {                                               \
        add_rms_norm<T>(x, delta, weight, out, n, eps);                                                          \
    }                                                                                                             \
    extern "C" __global__ void rotary_##SUFFIX(T* qkv, int stride, const uint32_t* positions,                    \
                                               const float* cos_table, const float* sin_table, int heads,        \
                                               int half) {                                                       \
        rotary<T>(qkv, stride, positions, cos_table, sin_table, heads, half);                                    \
    }                                                                                                             \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gu, T* out, int width, size_t total) {                \
        silu_mul<T>(gu, out, width, total);                                                                      \
    }                                                                                                             \
    extern "C" __global__ void gather_rows_##SUFFIX(const T* src, const uint32_t* ids, T* out, int width) {     \
        gather_rows<T>(src, ids, out, width);                                                                    \
    }

LUMEN_OPS(float, f32)
LUMEN_OPS(__nv_bfloat16, bf16)
