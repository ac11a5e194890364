// Row-wise and element-wise operations of the Llama block: RMSNorm (with the residual add fused
// in), rotary embeddings fused with reshape_and_cache, SwiGLU, and a row gather (embedding
// lookup, picking logits rows).
#include "common.cuh"

// 16 bytes of T as floats, and back.
template <typename T>
struct Pack16 {
    static constexpr int N = 16 / sizeof(T);
    __device__ __forceinline__ static void unpack(const uint4& raw, float* out) {
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float(v[i]);
    }
    __device__ __forceinline__ static uint4 pack(const float* in) {
        alignas(16) T v[N];
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = from_float<T>(in[i]);
        return *reinterpret_cast<const uint4*>(v);
    }
};

// Most 16-byte vectors of a row each thread of add_rms_norm keeps in registers.
constexpr int NORM_VECS = 4;

// One block per row of `n` values (n a multiple of 16 bytes, at most NORM_VECS vectors per
// thread). When `delta` is given, first `x[row] += delta[row]` (stored back in T: `x` is the
// residual stream); then `out[row] = x / sqrt(mean(x^2) + eps) * weight`. Every load is issued
// before the first use, so a row costs about one memory round trip plus the reduction.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ weight,
                             T* __restrict__ out, int n, float eps) {
    using P = Pack16<T>;
    const int vecs = n / P::N;
    uint4* xr = reinterpret_cast<uint4*>(x + (size_t)blockIdx.x * n);
    const uint4* dr = delta != nullptr ? reinterpret_cast<const uint4*>(delta + (size_t)blockIdx.x * n) : nullptr;
    const uint4* wr = reinterpret_cast<const uint4*>(weight);
    uint4* orow = reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * n);
    uint4 xraw[NORM_VECS], draw[NORM_VECS], wraw[NORM_VECS];
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < vecs) {
            xraw[j] = xr[i];
            wraw[j] = wr[i];
            if (dr != nullptr) draw[j] = dr[i];
        }
    }
    float v[NORM_VECS][P::N];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i >= vecs) continue;
        P::unpack(xraw[j], v[j]);
        if (dr != nullptr) {
            float d[P::N];
            P::unpack(draw[j], d);
#pragma unroll
            for (int e = 0; e < P::N; ++e) v[j][e] = to_float(from_float<T>(v[j][e] + d[e]));
            xr[i] = P::pack(v[j]);
        }
#pragma unroll
        for (int e = 0; e < P::N; ++e) ss += v[j][e] * v[j][e];
    }
    ss = block_sum(ss);
    const float scale = 1.f / sqrtf(ss / n + eps);
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i >= vecs) continue;
        float w[P::N];
        P::unpack(wraw[j], w);
#pragma unroll
        for (int e = 0; e < P::N; ++e) w[e] = v[j][e] * scale * w[e];
        orow[i] = P::pack(w);
    }
}

// Rotary embeddings and reshape_and_cache in one pass. Block (t, h) takes head h of token t's
// row of the fused QKV projection (`stride` values per row: query heads, key heads, value
// heads), one rotation pair per thread (element i with i + half, Hugging Face's rotate_half), by
// the angles of the token's position in the cos/sin tables (`[positions, half]` floats):
// - a query head is rotated in place (attention reads it from there);
// - a key head is rotated into the token's cache slot, and the matching value head copied there.
// Cache layout (as in attention.cu): [num_blocks, kv_heads, block_size, head_dim]; the token in
// slot s lives in block s / block_size at offset s % block_size.
template <typename T>
__device__ void rotary_and_cache(T* __restrict__ qkv, int stride, const uint32_t* __restrict__ positions,
                                 const uint32_t* __restrict__ slots, const float* __restrict__ cos_table,
                                 const float* __restrict__ sin_table, T* __restrict__ k_cache,
                                 T* __restrict__ v_cache, int q_heads, int kv_heads, int half, int block_size) {
    const size_t token = blockIdx.x;
    const int head = blockIdx.y, j = threadIdx.x;
    if (j >= half) return;
    const size_t pos = positions[token];
    T* row = qkv + token * stride;
    T* h = row + head * 2 * half;
    const float x0 = to_float(h[j]), x1 = to_float(h[j + half]);
    const float c = cos_table[pos * half + j], s = sin_table[pos * half + j];
    const T r0 = from_float<T>(x0 * c - x1 * s), r1 = from_float<T>(x1 * c + x0 * s);
    if (head < q_heads) {
        h[j] = r0;
        h[j + half] = r1;
        return;
    }
    const size_t g = head - q_heads, slot = slots[token];
    const size_t dst = (((slot / block_size) * kv_heads + g) * block_size + slot % block_size) * 2 * half;
    const T* v = row + (q_heads + kv_heads + g) * 2 * half;
    k_cache[dst + j] = r0;
    k_cache[dst + j + half] = r1;
    v_cache[dst + j] = v[j];
    v_cache[dst + j + half] = v[j + half];
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
        await_previous_kernel();                                                                                  \
        add_rms_norm<T>(x, delta, weight, out, n, eps);                                                          \
    }                                                                                                             \
    extern "C" __global__ void rotary_and_cache_##SUFFIX(                                                        \
        T* qkv, int stride, const uint32_t* positions, const uint32_t* slots, const float* cos_table,            \
        const float* sin_table, T* k_cache, T* v_cache, int q_heads, int kv_heads, int half, int block_size) {   \
        await_previous_kernel();                                                                                  \
        rotary_and_cache<T>(qkv, stride, positions, slots, cos_table, sin_table, k_cache, v_cache, q_heads,      \
                            kv_heads, half, block_size);                                                         \
    }                                                                                                             \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gu, T* out, int width, size_t total) {                \
        await_previous_kernel();                                                                                  \
        silu_mul<T>(gu, out, width, total);                                                                      \
    }                                                                                                             \
    extern "C" __global__ void gather_rows_##SUFFIX(const T* src, const uint32_t* ids, T* out, int width) {     \
        await_previous_kernel();                                                                                  \
        gather_rows<T>(src, ids, out, width);                                                                    \
    }

LUMEN_OPS(float, f32)
LUMEN_OPS(__nv_bfloat16, bf16)
