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

// Rotary embeddings and reshape_and_cache in one pass. Block t takes token t's row of the fused
// QKV projection (`stride` values: query heads, key heads, value heads); each thread takes N =
// 16 / sizeof(T) rotation pairs of a head at a time (element i with i + half, Hugging Face's
// rotate_half: 16-byte loads of both halves, the angles of the token's position from the
// cos/sin tables, `[positions, half]` floats):
// - a query head is rotated in place (attention reads it from there);
// - a key head is rotated into the token's cache slot, and the matching value head copied there.
// Cache layout (as in attention.cu): [num_blocks, kv_heads, block_size, head_dim]; the token in
// slot s lives in block s / block_size at offset s % block_size. Needs half % N == 0 and 16-byte
// aligned rows (the host checks).
// The slot of a row that has none (the padding rows of a CUDA graph's batch): its key and value
// are not written (must match `PAD_SLOT` in graph.rs).
constexpr size_t PAD_SLOT = 0xffffffffu;

template <typename T>
__device__ void rotary_and_cache(T* __restrict__ qkv, int stride, const uint32_t* __restrict__ positions,
                                 const uint32_t* __restrict__ slots, const float* __restrict__ cos_table,
                                 const float* __restrict__ sin_table, T* __restrict__ k_cache,
                                 T* __restrict__ v_cache, int q_heads, int kv_heads, int half, int block_size) {
    using P = Pack16<T>;
    constexpr int N = P::N;
    const size_t token = blockIdx.x;
    const size_t pos = positions[token], slot = slots[token];
    T* row = qkv + token * stride;
    const int per_head = half / N;
    const int items = (q_heads + kv_heads) * per_head;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
        const int head = i / per_head, j = (i % per_head) * N;
        T* h = row + head * 2 * half;
        float x0[N], x1[N], c[N], s[N], r0[N], r1[N];
        P::unpack(*reinterpret_cast<const uint4*>(h + j), x0);
        P::unpack(*reinterpret_cast<const uint4*>(h + j + half), x1);
#pragma unroll
        for (int e = 0; e < N; e += 4) {
            const float4 cv = *reinterpret_cast<const float4*>(cos_table + pos * half + j + e);
            const float4 sv = *reinterpret_cast<const float4*>(sin_table + pos * half + j + e);
            c[e] = cv.x, c[e + 1] = cv.y, c[e + 2] = cv.z, c[e + 3] = cv.w;
            s[e] = sv.x, s[e + 1] = sv.y, s[e + 2] = sv.z, s[e + 3] = sv.w;
        }
#pragma unroll
        for (int e = 0; e < N; ++e) {
            r0[e] = x0[e] * c[e] - x1[e] * s[e];
            r1[e] = x1[e] * c[e] + x0[e] * s[e];
        }
        if (head < q_heads) {
            *reinterpret_cast<uint4*>(h + j) = P::pack(r0);
            *reinterpret_cast<uint4*>(h + j + half) = P::pack(r1);
            continue;
        }
        if (slot == PAD_SLOT) continue;  // a padding row of a graph replay: no cache slot
        const size_t g = head - q_heads;
        const size_t dst = (((slot / block_size) * kv_heads + g) * block_size + slot % block_size) * 2 * half;
        const T* v = row + (q_heads + kv_heads + g) * 2 * half;
        *reinterpret_cast<uint4*>(k_cache + dst + j) = P::pack(r0);
        *reinterpret_cast<uint4*>(k_cache + dst + j + half) = P::pack(r1);
        *reinterpret_cast<uint4*>(v_cache + dst + j) = *reinterpret_cast<const uint4*>(v + j);
        *reinterpret_cast<uint4*>(v_cache + dst + j + half) = *reinterpret_cast<const uint4*>(v + j + half);
    }
}

// `out[r, j] = silu(gu[r, j]) * gu[r, width + j]` with `silu(g) = g / (1 + e^-g)`: each row of
// `gu` is [gate | up]. Block (r, b) takes row r's vectors of N = 16 / sizeof(T) outputs from
// b * blockDim.x on (16-byte loads when width is a multiple of N, else one value at a time).
template <typename T>
__device__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int width) {
    using P = Pack16<T>;
    constexpr int N = P::N;
    const int j = (blockIdx.y * blockDim.x + threadIdx.x) * N;
    if (j >= width) return;
    const T* g = gu + (size_t)blockIdx.x * 2 * width;
    const T* u = g + width;
    T* o = out + (size_t)blockIdx.x * width;
    if (width % N == 0) {
        float gv[N], uv[N];
        P::unpack(*reinterpret_cast<const uint4*>(g + j), gv);
        P::unpack(*reinterpret_cast<const uint4*>(u + j), uv);
#pragma unroll
        for (int e = 0; e < N; ++e) gv[e] = gv[e] / (1.f + expf(-gv[e])) * uv[e];
        *reinterpret_cast<uint4*>(o + j) = P::pack(gv);
    } else {
        for (int e = j; e < min(j + N, width); ++e) {
            const float x = to_float(g[e]);
            o[e] = from_float<T>(x / (1.f + expf(-x)) * to_float(u[e]));
        }
    }
}

// `out[r] = src[ids[r] - first]` for rows of `width` values, where `src` holds the `src_rows`
// rows of ids `first..first + src_rows`; a row whose id is outside them is zeros (a tensor-parallel
// rank's share of the embeddings: the ranks' rows summed give every row once). One block per
// output row.
template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const uint32_t* __restrict__ ids, T* __restrict__ out,
                            int width, uint32_t first, uint32_t src_rows) {
    const uint32_t id = ids[blockIdx.x] - first;  // wraps below `first`: outside too
    T* o = out + (size_t)blockIdx.x * width;
    if (id >= src_rows) {
        for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = T(0.f);
        return;
    }
    const T* s = src + (size_t)id * width;
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
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gu, T* out, int width) {                              \
        await_previous_kernel();                                                                                  \
        silu_mul<T>(gu, out, width);                                                                             \
    }                                                                                                             \
    extern "C" __global__ void gather_rows_##SUFFIX(const T* src, const uint32_t* ids, T* out, int width,       \
                                                    uint32_t first, uint32_t src_rows) {                         \
        await_previous_kernel();                                                                                  \
        gather_rows<T>(src, ids, out, width, first, src_rows);                                                   \
    }

LUMEN_OPS(float, f32)
LUMEN_OPS(__nv_bfloat16, bf16)
