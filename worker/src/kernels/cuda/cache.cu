// reshape_and_cache: scatters the keys and values of this step's tokens into their paged cache
// slots.
//
// Cache layout, per layer and separately for K and V (the CPU's layout): [num_blocks, kv_heads,
// block_size, head_dim]. The token in slot s lives in block s / block_size at offset
// s % block_size, so one KV head's positions of a block are contiguous.
#include "common.cuh"

// Token t's key is `qkv[t * stride + k_offset ..][kv_heads * head_dim]`, its value likewise at
// `v_offset` (the key/value parts of the fused QKV projection). One block per token.
template <typename T>
__device__ void reshape_and_cache(const T* __restrict__ qkv, int stride, int k_offset, int v_offset,
                                  const uint32_t* __restrict__ slots, T* __restrict__ k_cache,
                                  T* __restrict__ v_cache, int kv_heads, int head_dim, int block_size) {
    const size_t token = blockIdx.x;
    const size_t slot = slots[token];
    const size_t block = slot / block_size, offset = slot % block_size;
    const T* row = qkv + token * stride;
    for (int i = threadIdx.x; i < kv_heads * head_dim; i += blockDim.x) {
        const size_t head = i / head_dim, d = i % head_dim;
        const size_t dst = ((block * kv_heads + head) * block_size + offset) * head_dim + d;
        k_cache[dst] = row[k_offset + i];
        v_cache[dst] = row[v_offset + i];
    }
}

#define LUMEN_CACHE(T, SUFFIX)                                                                                  \
    extern "C" __global__ void reshape_and_cache_##SUFFIX(const T* qkv, int stride, int k_offset, int v_offset,  \
                                                          const uint32_t* slots, T* k_cache, T* v_cache,         \
                                                          int kv_heads, int head_dim, int block_size) {          \
        reshape_and_cache<T>(qkv, stride, k_offset, v_offset, slots, k_cache, v_cache, kv_heads, head_dim,       \
                             block_size);                                                                        \
    }

LUMEN_CACHE(float, f32)
LUMEN_CACHE(__nv_bfloat16, bf16)
