// Decode-step launch strategies on the GPU, measured against the memory's read rate.
//
// A Llama-3.1-8B-shaped decode step at one token is a chain of ~10 kernels per layer: four GEMVs
// that stream 436 MB of bf16 weights, and small kernels (norms, rotary, attention, SwiGLU) that
// read a few KB. This program times 32 such layers plus the logits GEMV, launched four ways:
//   plain        one launch after another (what the engine did first)
//   pdl          programmatic dependent launch: each kernel may start while its predecessor
//                finishes, and waits (griddepcontrol.wait) before it touches memory
//   graph        the plain launches captured once into a CUDA graph and replayed
//   graph+pdl    both
// each also with a stream-ordered allocation and free around every launch (as candle allocates
// every output); then each GEMV shape alone for several warp shapes. It prints ms per step,
// tokens/s, and the share of the read rate of a plain streaming kernel
// measured in the same run (the physical limit for a step that must read every weight once).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o decode-chain-bench \
//        scripts/gpu/decode_chain_bench.cu -lcuda
//   ./decode-chain-bench [--json FILE]
//
// The GEMV is the engine's own (worker/src/kernels/cuda/gemv.cu, m = 1); the small kernels only
// stand in for the engine's (same launch shapes and bytes), since the point is launch overhead.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../worker/src/kernels/cuda/gemv.cuh"
#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

__device__ __forceinline__ void grid_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Stand-in for a norm / rotary / SwiGLU: one CTA of 1024 threads reads n values, reduces, writes.
template <bool PDL>
__global__ void small_op(const bf16* __restrict__ x, bf16* __restrict__ y, int n) {
    if (PDL) {
        grid_launch_dependents();
        grid_wait();
    }
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += to_float(x[i]) * to_float(x[i]);
    s = block_sum(s);
    const float r = rsqrtf(s / n + 1e-5f);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = from_float<bf16>(to_float(x[i]) * r);
}

// The engine's GEMV at one token with R rows per warp and U loads in flight, optionally behind
// the PDL prologue (an early trigger for the next kernel, then the wait for this one's input).
using gemv_core::UNROLL;
using gemv_core::WARPS;

template <int R, int U, int S, bool PDL>
__global__ void __launch_bounds__(WARPS * 32) gemv_var(const bf16* w, const bf16* x, bf16* y, int n, int k) {
    if (PDL) {
        grid_launch_dependents();
        grid_wait();
    }
    gemv_core::gemv<gemv_core::Dense<bf16>, bf16, 1, R, U, S>(w, nullptr, x, y, n, k);
}

struct Variant {
    const char* name;
    int rows_per_warp, warps_per_row;
    const void* plain;
    const void* pdl;
};
#define VARIANT(R, U, S) \
    {"R=" #R " U=" #U " S=" #S, R, S, (const void*)gemv_var<R, U, S, false>, (const void*)gemv_var<R, U, S, true>}
static const Variant VARIANTS[] = {VARIANT(1, 4, 1), VARIANT(2, 4, 1), VARIANT(1, 4, 2), VARIANT(1, 8, 2),
                                   VARIANT(1, 4, 4), VARIANT(1, 4, 8), VARIANT(2, 4, 2), VARIANT(2, 4, 4)};
static const Variant* g_variant = &VARIANTS[0];
// Allocate each kernel's output stream-ordered before its launch and free it after, as candle does.
static bool g_alloc = false;

struct Layer {
    bf16 *qkv, *o, *gate_up, *down;
};

struct Buffers {
    std::vector<Layer> layers;
    bf16 *logits_w, *h, *a, *b, *big, *logits;
};

enum class Mode { Plain, Pdl };

constexpr int HIDDEN = 4096, QKV = 6144, INTER = 14336, VOCAB = 128256, LAYERS = 32;

static void launch(const void* fn, dim3 grid, dim3 block, void** args, cudaStream_t s, bool pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    void* scratch = nullptr;
    if (g_alloc) CHECK(cudaMallocAsync(&scratch, 1 << 16, s));
    CHECK(cudaLaunchKernelExC(&cfg, fn, args));
    if (g_alloc) CHECK(cudaFreeAsync(scratch, s));
}

static void small(const bf16* x, bf16* y, int n, cudaStream_t s, Mode mode) {
    void* args[] = {&x, &y, &n};
    const bool pdl = mode != Mode::Plain;
    launch(pdl ? (const void*)small_op<true> : (const void*)small_op<false>, dim3(1), dim3(1024), args, s, pdl);
}

static void matvec(const bf16* w, const bf16* x, bf16* y, int n, int k, cudaStream_t s, Mode mode) {
    const int per_block = WARPS / g_variant->warps_per_row * g_variant->rows_per_warp;
    const dim3 grid((n + per_block - 1) / per_block), block(WARPS * 32);
    void* args[] = {&w, &x, &y, &n, &k};
    launch(mode == Mode::Pdl ? g_variant->pdl : g_variant->plain, grid, block, args, s, mode == Mode::Pdl);
}

// One decode step: per layer norm, qkv, rotary+cache and attention (two small kernels), o, norm,
// gate_up, SwiGLU, down; then the final norm and the logits.
static void step(const Buffers& b, cudaStream_t s, Mode mode) {
    for (const Layer& l : b.layers) {
        small(b.h, b.a, HIDDEN, s, mode);
        matvec(l.qkv, b.a, b.big, QKV, HIDDEN, s, mode);
        small(b.big, b.b, QKV, s, mode);
        small(b.b, b.a, HIDDEN, s, mode);
        matvec(l.o, b.a, b.h, HIDDEN, HIDDEN, s, mode);
        small(b.h, b.a, HIDDEN, s, mode);
        matvec(l.gate_up, b.a, b.big, 2 * INTER, HIDDEN, s, mode);
        small(b.big, b.b, INTER, s, mode);
        matvec(l.down, b.b, b.h, HIDDEN, INTER, s, mode);
    }
    small(b.h, b.a, HIDDEN, s, mode);
    matvec(b.logits_w, b.a, b.logits, VOCAB, HIDDEN, s, mode);
}

static bf16* alloc_random(size_t elems) {
    bf16* p;
    CHECK(cudaMalloc(&p, elems * sizeof(bf16)));
    // Small values so sums stay finite; the content does not matter for timing.
    CHECK(cudaMemset(p, 0x3c, elems * sizeof(bf16)));
    return p;
}

int main(int argc, char** argv) {
    const char* json = nullptr;
    for (int i = 1; i + 1 < argc; ++i)
        if (!strcmp(argv[i], "--json")) json = argv[i + 1];
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    // The physical limit: a streaming read of 4 GiB.
    const double read_bw = read_rate(s);

    Buffers b;
    for (int i = 0; i < LAYERS; ++i)
        b.layers.push_back({alloc_random((size_t)QKV * HIDDEN), alloc_random((size_t)HIDDEN * HIDDEN),
                            alloc_random((size_t)2 * INTER * HIDDEN), alloc_random((size_t)HIDDEN * INTER)});
    b.logits_w = alloc_random((size_t)VOCAB * HIDDEN);
    b.h = alloc_random(HIDDEN);
    b.a = alloc_random(2 * INTER);
    b.b = alloc_random(2 * INTER);
    b.big = alloc_random(2 * INTER);
    b.logits = alloc_random(VOCAB);
    const double weight_bytes =
        2.0 * ((double)LAYERS * ((double)QKV * HIDDEN + (double)HIDDEN * HIDDEN + 3.0 * INTER * HIDDEN) +
               (double)VOCAB * HIDDEN);

    struct Row {
        std::string name;
        float ms;
    };
    std::vector<Row> rows;
    const int reps = 20;
    auto graph_of = [&](Mode mode) {
        cudaGraph_t g;
        cudaGraphExec_t e;
        CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        step(b, s, mode);
        CHECK(cudaStreamEndCapture(s, &g));
        CHECK(cudaGraphInstantiate(&e, g, 0));
        return e;
    };
    for (bool alloc : {false, true}) {
        g_alloc = alloc;
        const std::string tag = alloc ? " +alloc" : "";
        rows.push_back({"plain" + tag, median_ms(s, reps, [&] { step(b, s, Mode::Plain); })});
        rows.push_back({"pdl" + tag, median_ms(s, reps, [&] { step(b, s, Mode::Pdl); })});
        cudaGraphExec_t plain_graph = graph_of(Mode::Plain), pdl_graph = graph_of(Mode::Pdl);
        rows.push_back({"graph" + tag, median_ms(s, reps, [&] { CHECK(cudaGraphLaunch(plain_graph, s)); })});
        rows.push_back({"graph+pdl" + tag, median_ms(s, reps, [&] { CHECK(cudaGraphLaunch(pdl_graph, s)); })});
    }
    g_alloc = false;

    // Each GEMV shape alone, plain launches cycling through the 32 layers' matrices (so the L2
    // holds none of them), for each variant, against the read rate.
    struct Shape {
        const char* name;
        int n, k;
        bf16* Layer::*w;
    } shapes[] = {{"qkv 6144x4096", QKV, HIDDEN, &Layer::qkv},
                  {"o 4096x4096", HIDDEN, HIDDEN, &Layer::o},
                  {"gate_up 28672x4096", 2 * INTER, HIDDEN, &Layer::gate_up},
                  {"down 4096x14336", HIDDEN, INTER, &Layer::down}};

    printf("read rate (4 GiB streaming read): %.0f GB/s; weights per step %.2f GB; limit %.1f tok/s (%.3f ms)\n",
           read_bw / 1e9, weight_bytes / 1e9, read_bw / weight_bytes, weight_bytes / read_bw * 1e3);
    printf("\n%-32s %10s %10s %12s\n", "launch strategy (32 layers)", "ms/step", "tok/s", "of read rate");
    for (const Row& r : rows)
        printf("%-32s %10.3f %10.1f %11.1f%%\n", r.name.c_str(), r.ms, 1e3 / r.ms,
               100.0 * weight_bytes / (r.ms * 1e-3) / read_bw);
    printf("\n%-24s %-14s %10s %10s %12s\n", "GEMV alone (32 layers)", "variant", "us each", "GB/s", "of read rate");
    FILE* out = json ? fopen(json, "w") : nullptr;
    if (out) fprintf(out, "{\"read_gbps\": %.1f, \"weight_bytes\": %.0f, \"steps\": [", read_bw / 1e9, weight_bytes);
    for (size_t i = 0; out && i < rows.size(); ++i)
        fprintf(out, "%s{\"name\": \"%s\", \"ms\": %.4f}", i ? ", " : "", rows[i].name.c_str(), rows[i].ms);
    if (out) fprintf(out, "], \"gemv\": [");
    bool first = true;
    for (const Shape& sh : shapes) {
        for (const Variant& v : VARIANTS) {
            g_variant = &v;
            const float ms = median_ms(s, reps, [&] {
                for (const Layer& l : b.layers) matvec(l.*sh.w, b.a, b.big, sh.n, sh.k, s, Mode::Plain);
            }) / LAYERS;
            const double bytes = 2.0 * sh.n * sh.k;
            printf("%-24s %-14s %10.2f %10.0f %11.1f%%\n", sh.name, v.name, ms * 1e3, bytes / (ms * 1e-3) / 1e9,
                   100.0 * bytes / (ms * 1e-3) / read_bw);
            if (out) fprintf(out, "%s{\"shape\": \"%s\", \"variant\": \"%s\", \"us\": %.3f}", first ? "" : ", ", sh.name, v.name, ms * 1e3);
            first = false;
        }
    }
    if (out) {
        fprintf(out, "]}\n");
        fclose(out);
    }
    return 0;
}
