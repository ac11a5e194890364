// What the GPU benchmark programs share: error checks, event timing, random bf16 data, output
// comparison, and the physical limit they compare against (the read rate of a plain streaming
// kernel over 4 GiB).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                               \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

// Every thread sums 16-byte loads, grid-stride (the sum is only kept from being optimised away).
__global__ void read_all(const uint4* __restrict__ src, size_t n, unsigned int* sink) {
    unsigned int acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldcs(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

// Median over `reps` runs of `body` on stream `s`, in ms, after one warm-up run.
template <typename F>
static float median_ms(cudaStream_t s, int reps, F body) {
    cudaEvent_t a, z;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&z));
    body();
    CHECK(cudaStreamSynchronize(s));
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
        CHECK(cudaEventRecord(a, s));
        body();
        CHECK(cudaEventRecord(z, s));
        CHECK(cudaEventSynchronize(z));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, z));
        t.push_back(ms);
    }
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(z));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// The memory's read rate in bytes per second: a streaming read of 4 GiB, median of 10.
static double read_rate(cudaStream_t s) {
    const size_t bytes = size_t(4) << 30;
    uint4* src;
    unsigned int* sink;
    CHECK(cudaMalloc(&src, bytes));
    CHECK(cudaMemset(src, 1, bytes));
    CHECK(cudaMalloc(&sink, 4));
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const float ms = median_ms(s, 10, [&] { read_all<<<sms * 8, 512, 0, s>>>(src, bytes / 16, sink); });
    CHECK(cudaFree(src));
    CHECK(cudaFree(sink));
    return bytes / (ms * 1e-3);
}

// Deterministic pseudo-random bf16 values uniform in [-scale, scale), grid-stride.
__global__ void fill_random(__nv_bfloat16* p, size_t n, unsigned seed, float scale = 1.f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2bfloat16_rn(scale * ((h & 0xffff) / 32768.f - 1.f));
    }
}

// Random finite E4M3 codes (no NaN: 0x7f / 0xff become 0x7e / 0xfe).
__global__ void fill_fp8(uint8_t* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        uint8_t c = (uint8_t)h;
        p[i] = (c & 0x7f) == 0x7f ? c - 1 : c;
    }
}

// `n` bf16 values from the device, as floats.
static std::vector<float> download(const __nv_bfloat16* p, size_t n) {
    std::vector<__nv_bfloat16> h(n);
    CHECK(cudaMemcpy(h.data(), p, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]);
    return f;
}

// Largest |a - b| over the largest |b|.
static double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, (double)std::fabs(a[i] - b[i]));
        scale = std::max(scale, (double)std::fabs(b[i]));
    }
    return diff / scale;
}

// The buffers for timing `x · Wᵀ` with an n x k bf16 weight at up to `max_m` rows: enough copies
// of the weight (values in +-0.05) that the L2 cache holds none of them from one launch to the
// next, `x` (values in +-1), an output and a reference output.
struct LinearBuffers {
    __nv_bfloat16 *pool, *x, *y, *ref;
    size_t elems, bytes;
    int copies;

    LinearBuffers(int n, int k, int max_m, cudaStream_t s) : elems((size_t)n * k), bytes(elems * sizeof(__nv_bfloat16)) {
        copies = (int)std::max<size_t>(2, (size_t(512) << 20) / bytes + 1);
        CHECK(cudaMalloc(&pool, bytes * copies));
        CHECK(cudaMalloc(&x, (size_t)max_m * k * sizeof(__nv_bfloat16)));
        CHECK(cudaMalloc(&y, (size_t)max_m * n * sizeof(__nv_bfloat16)));
        CHECK(cudaMalloc(&ref, (size_t)max_m * n * sizeof(__nv_bfloat16)));
        fill_random<<<264, 512, 0, s>>>(pool, elems * copies, 7, 0.05f);
        fill_random<<<264, 512, 0, s>>>(x, (size_t)max_m * k, 11, 1.f);
        CHECK(cudaStreamSynchronize(s));
    }
    ~LinearBuffers() {
        cudaFree(pool);
        cudaFree(x);
        cudaFree(y);
        cudaFree(ref);
    }
    LinearBuffers(const LinearBuffers&) = delete;
    LinearBuffers& operator=(const LinearBuffers&) = delete;

    // The weight copy launch `i` reads.
    const __nv_bfloat16* weights(int i) const { return pool + (size_t)(i % copies) * elems; }
};

