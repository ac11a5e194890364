// Does a mixed step get cheaper when its decode rows and its prompt rows run side by side?
// (issue 22, item 6: "measure whether it pays").
//
// A step that carries prompt chunks (P: many token rows, its GEMMs bound by the tensor cores)
// and decodes (D: one row per sequence, its attention bound by reading the K/V cache) runs
// today as one pass: every layer's GEMMs over all rows, then the decode attention. P's rows and
// D's rows never meet inside a step (other sequences), so the two could also run as two
// independent passes on two streams, D's attention reading memory while P's GEMMs compute
// (NanoFlow's nano-batches). The price: D's GEMMs read the weights a second time.
//
// For Llama-3.1-8B's shape (32 layers; bf16; cuBLAS GEMMs as the engine calls them; the
// engine's decode attention kernel) this times one step's layers, over weights and K/V larger
// than the L2:
//   P alone         32 x (qkv, o, gate_up, down) at P's rows
//   D alone         32 x (the same at D's rows + decode attention)
//   one pass        32 x (the GEMMs at P + D rows + decode attention): the engine today
//   two streams     P on one stream, D on another, no priority / D high / P high
//   green contexts  the SMs split (D gets n of them), each pass on its own part (CUDA 12.4+)
// against the bounds max(P, D) (perfect overlap) and P + D (none). Norms, rotary and SwiGLU
// are left out (the same in every mode). Wall time from a synchronised start to both streams'
// end, median of 7.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o overlap-bench \
//        scripts/gpu/overlap_bench.cu -lcublas -lcuda
//   ./overlap-bench [--json FILE]
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../../worker/src/kernels/cuda/attention_mma.cu"
#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

namespace shape {
constexpr int LAYERS = 32, HIDDEN = 4096, INTER = 14336, HEADS = 32, KV_HEADS = 8, D = 128, BLOCK = 16;
constexpr int QKV = (HEADS + 2 * KV_HEADS) * D;
constexpr int MAX_ROWS = 4224;  // token rows of the largest pass
constexpr int BLOCKS_PER_LAYER = 10240;  // 256 sequences x 640 positions
}  // namespace shape

// The engine's default decode kernel (`LUMEN_CUDA_DECODE_ATTENTION=warp`).
__global__ void __launch_bounds__(128)
    decode_warp(bf16* out, float* part_acc, float* part_ml, const bf16* q, int q_stride, int out_stride,
                const bf16* k_cache, const bf16* v_cache, const int* tiles, const int* seqs, const int* tables,
                int kv_heads, int ratio, int heads_per_cta, int block_size, int chunks_per_split, float scale,
                unsigned int* counters) {
    paged_attention_mma<shape::D, 1, 1, 64, 3, 256, true>(out, part_acc, part_ml, q, q_stride, out_stride, k_cache,
                                                          v_cache, tiles, seqs, tables, kv_heads, ratio,
                                                          heads_per_cta, block_size, chunks_per_split, scale,
                                                          counters);
}

static void check_blas(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "%s: cuBLAS status %d\n", what, (int)s);
        exit(1);
    }
}

struct Weights {
    bf16 *qkv, *o, *gate_up, *down;
};

// One stream's means to run a pass: its cuBLAS handle and activation buffers.
struct Lane {
    cudaStream_t stream;
    cublasHandle_t blas;
    bf16 *x, *y;  // [MAX_ROWS, INTER] in, [MAX_ROWS, 2 * INTER] out
};

// The decode rows' attention inputs: seqs sequences of ctx positions, every layer its own blocks.
struct DecodeSet {
    int seqs, ctx;
    int *d_seqs, *d_tiles, *d_tables;
};

struct Model {
    std::vector<Weights> layers;
    bf16 *k_cache, *v_cache, *q, *attn_out;
    int smem;
};

static void linear(Lane& lane, const bf16* w, int n, int k, int m) {
    const float alpha = 1.f, beta = 0.f;
    check_blas(cublasGemmEx(lane.blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, lane.x,
                            CUDA_R_16BF, k, &beta, lane.y, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "gemm");
}

// One layer of a pass: its GEMMs over `rows` token rows, and decode attention over `decode`.
static void layer(Model& model, Lane& lane, int li, int rows, const DecodeSet* decode) {
    using namespace shape;
    const Weights& w = model.layers[li];
    if (rows > 0) linear(lane, w.qkv, QKV, HIDDEN, rows);
    if (decode) {
        const size_t layer_elems = (size_t)BLOCKS_PER_LAYER * KV_HEADS * BLOCK * D;
        decode_warp<<<dim3(decode->seqs, KV_HEADS, 1), 128, model.smem, lane.stream>>>(
            model.attn_out, nullptr, nullptr, model.q, HEADS * D, HEADS * D, model.k_cache + li * layer_elems,
            model.v_cache + li * layer_elems, decode->d_tiles, decode->d_seqs, decode->d_tables, KV_HEADS,
            HEADS / KV_HEADS, HEADS / KV_HEADS, BLOCK, 1 << 20, 1.f / sqrtf((float)D), nullptr);
    }
    if (rows > 0) {
        linear(lane, w.o, HIDDEN, HIDDEN, rows);
        linear(lane, w.gate_up, 2 * INTER, HIDDEN, rows);
        linear(lane, w.down, HIDDEN, INTER, rows);
    }
}

// Median wall ms of `body` (which queues work on the lanes) from a synchronised start to every
// lane's end.
static double wall_ms(std::vector<Lane*> lanes, const std::function<void()>& body) {
    auto sync = [&] {
        for (Lane* l : lanes) CHECK(cudaStreamSynchronize(l->stream));
    };
    body();
    sync();
    std::vector<double> t;
    for (int i = 0; i < 7; ++i) {
        sync();
        const auto start = std::chrono::steady_clock::now();
        body();
        sync();
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static DecodeSet decode_set(int seqs, int ctx, std::mt19937& rng) {
    using namespace shape;
    const int per_seq = (ctx + BLOCK - 1) / BLOCK;
    if (seqs * per_seq > BLOCKS_PER_LAYER) {
        fprintf(stderr, "%d x %d needs more than %d blocks\n", seqs, ctx, BLOCKS_PER_LAYER);
        exit(1);
    }
    std::vector<int> perm(BLOCKS_PER_LAYER);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int> h_seqs, h_tiles, h_tables;
    for (int i = 0; i < seqs; ++i) {
        h_seqs.insert(h_seqs.end(), {i, 1, ctx, (int)h_tables.size()});
        for (int b = 0; b < per_seq; ++b) h_tables.push_back(perm[i * per_seq + b]);
        h_tiles.insert(h_tiles.end(), {i, 0, 1, 0});
    }
    DecodeSet set{seqs, ctx, nullptr, nullptr, nullptr};
    auto upload = [](int** dst, const std::vector<int>& src) {
        CHECK(cudaMalloc(dst, src.size() * 4));
        CHECK(cudaMemcpy(*dst, src.data(), src.size() * 4, cudaMemcpyHostToDevice));
    };
    upload(&set.d_seqs, h_seqs);
    upload(&set.d_tiles, h_tiles);
    upload(&set.d_tables, h_tables);
    return set;
}

static Lane make_lane(cudaStream_t stream) {
    using namespace shape;
    Lane lane{stream, nullptr, nullptr, nullptr};
    check_blas(cublasCreate(&lane.blas), "cublasCreate");
    check_blas(cublasSetStream(lane.blas, stream), "cublasSetStream");
    CHECK(cudaMalloc(&lane.x, (size_t)MAX_ROWS * INTER * sizeof(bf16)));
    CHECK(cudaMalloc(&lane.y, (size_t)MAX_ROWS * 2 * INTER * sizeof(bf16)));
    fill_random<<<264, 256, 0, stream>>>(lane.x, (size_t)MAX_ROWS * INTER, 11, 0.05f);
    return lane;
}

// Two lanes on green contexts: `d_sms` multiprocessors for D, the rest for P. Empty (with the
// reason printed) where the driver has no green contexts or refuses the split.
static std::vector<Lane> green_lanes(int d_sms, int* got_d, int* got_p) {
    auto ok = [](CUresult r, const char* what) {
        if (r == CUDA_SUCCESS) return true;
        const char* msg = nullptr;
        cuGetErrorString(r, &msg);
        printf("  green contexts: %s failed: %s\n", what, msg ? msg : "?");
        return false;
    };
    CUdevice dev;
    CUdevResource all, part, rest;
    unsigned int groups = 1;
    if (!ok(cuDeviceGet(&dev, 0), "cuDeviceGet") ||
        !ok(cuDeviceGetDevResource(dev, &all, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource") ||
        !ok(cuDevSmResourceSplitByCount(&part, &groups, &all, &rest, 0, d_sms), "cuDevSmResourceSplitByCount"))
        return {};
    *got_d = part.sm.smCount;
    *got_p = rest.sm.smCount;
    std::vector<Lane> lanes;
    CUcontext primary;
    cuCtxGetCurrent(&primary);
    for (CUdevResource* r : {&part, &rest}) {
        CUdevResourceDesc desc;
        CUgreenCtx green;
        CUcontext ctx;
        CUstream stream;
        if (!ok(cuDevResourceGenerateDesc(&desc, r, 1), "cuDevResourceGenerateDesc") ||
            !ok(cuGreenCtxCreate(&green, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate") ||
            !ok(cuCtxFromGreenCtx(&ctx, green), "cuCtxFromGreenCtx") ||
            !ok(cuGreenCtxStreamCreate(&stream, green, CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate"))
            return {};
        cuCtxSetCurrent(ctx);
        lanes.push_back(make_lane((cudaStream_t)stream));
    }
    cuCtxSetCurrent(primary);
    return lanes;
}

int main(int argc, char** argv) {
    using namespace shape;
    const char* json_path = argc > 2 && !strcmp(argv[1], "--json") ? argv[2] : nullptr;
    CHECK(cudaFree(nullptr));  // the primary context, current from here on
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    int low, high;
    CHECK(cudaDeviceGetStreamPriorityRange(&low, &high));
    cudaStream_t s_plain[2], s_high, s_low;
    CHECK(cudaStreamCreateWithFlags(&s_plain[0], cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&s_plain[1], cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithPriority(&s_high, cudaStreamNonBlocking, high));
    CHECK(cudaStreamCreateWithPriority(&s_low, cudaStreamNonBlocking, low));
    const double rate = read_rate(s_plain[0]);
    printf("%s, %d SMs, read rate %.0f GB/s\n", prop.name, prop.multiProcessorCount, rate / 1e9);

    Model model;
    const size_t layer_kv = (size_t)BLOCKS_PER_LAYER * KV_HEADS * BLOCK * D;
    CHECK(cudaMalloc(&model.k_cache, LAYERS * layer_kv * sizeof(bf16)));
    CHECK(cudaMalloc(&model.v_cache, LAYERS * layer_kv * sizeof(bf16)));
    fill_random<<<1024, 256, 0, s_plain[0]>>>(model.k_cache, LAYERS * layer_kv, 1, 0.05f);
    fill_random<<<1024, 256, 0, s_plain[0]>>>(model.v_cache, LAYERS * layer_kv, 2, 0.05f);
    CHECK(cudaMalloc(&model.q, (size_t)256 * HEADS * D * sizeof(bf16)));
    CHECK(cudaMalloc(&model.attn_out, (size_t)256 * HEADS * D * sizeof(bf16)));
    fill_random<<<264, 256, 0, s_plain[0]>>>(model.q, (size_t)256 * HEADS * D, 3, 0.05f);
    size_t weight_bytes = 0;
    for (int l = 0; l < LAYERS; ++l) {
        Weights w;
        const size_t sizes[4] = {(size_t)QKV * HIDDEN, (size_t)HIDDEN * HIDDEN, (size_t)2 * INTER * HIDDEN,
                                 (size_t)HIDDEN * INTER};
        bf16** ptrs[4] = {&w.qkv, &w.o, &w.gate_up, &w.down};
        for (int i = 0; i < 4; ++i) {
            CHECK(cudaMalloc(ptrs[i], sizes[i] * sizeof(bf16)));
            fill_random<<<1024, 256, 0, s_plain[0]>>>(*ptrs[i], sizes[i], 100 + 4 * l + i, 0.05f);
            weight_bytes += sizes[i] * sizeof(bf16);
        }
        model.layers.push_back(w);
    }
    model.smem = smem_bytes<D, 1, 16, 64, 3>();
    CHECK(cudaFuncSetAttribute(decode_warp, cudaFuncAttributeMaxDynamicSharedMemorySize, model.smem));
    CHECK(cudaDeviceSynchronize());

    Lane plain0 = make_lane(s_plain[0]), plain1 = make_lane(s_plain[1]);
    Lane high_lane = make_lane(s_high), low_lane = make_lane(s_low);
    CHECK(cudaDeviceSynchronize());

    struct Case {
        int p_rows, seqs, ctx;
    };
    const std::vector<Case> cases = {{1536, 256, 640}, {512, 256, 640}, {1536, 128, 1024}, {4096, 64, 1024}};
    const std::vector<int> green_splits = {16, 32, 48, 66};
    std::mt19937 rng(7);
    FILE* json = json_path ? fopen(json_path, "w") : nullptr;
    if (json) fprintf(json, "{\"gpu\": \"%s\", \"read_rate_gbs\": %.1f, \"cases\": [\n", prop.name, rate / 1e9);
    std::vector<std::string> summary;
    for (size_t ci = 0; ci < cases.size(); ++ci) {
        const Case& c = cases[ci];
        DecodeSet set = decode_set(c.seqs, c.ctx, rng);
        auto pass = [&](Lane& lane, int rows, const DecodeSet* decode) {
            for (int l = 0; l < LAYERS; ++l) layer(model, lane, l, rows, decode);
        };
        // P and D side by side: layer l of each queued in turn, so both streams stay fed.
        auto side_by_side = [&](Lane& p, Lane& d) {
            for (int l = 0; l < LAYERS; ++l) {
                layer(model, p, l, c.p_rows, nullptr);
                layer(model, d, l, c.seqs, &set);
            }
        };
        const double kv_gb = (double)c.seqs * c.ctx * KV_HEADS * D * 2 * 2 * LAYERS / 1e9;
        const double p_ms = wall_ms({&plain0}, [&] { pass(plain0, c.p_rows, nullptr); });
        const double d_ms = wall_ms({&plain0}, [&] { pass(plain0, c.seqs, &set); });
        const double one_ms = wall_ms({&plain0}, [&] { pass(plain0, c.p_rows + c.seqs, &set); });
        const double attn_ms = wall_ms({&plain0}, [&] { pass(plain0, 0, &set); });
        printf("\nP %d prompt rows, D %d decodes x %d context (K/V %.1f GB; attention alone %.2f ms = %.0f%% of the "
               "read rate; weights %.1f GB)\n",
               c.p_rows, c.seqs, c.ctx, kv_gb, attn_ms, 100.0 * kv_gb * 1e9 / (attn_ms * 1e-3) / rate,
               weight_bytes / 1e9);
        printf("  %-34s %9s %14s\n", "mode", "ms", "vs one pass");
        std::vector<std::pair<std::string, double>> rows = {
            {"P alone", p_ms}, {"D alone", d_ms}, {"bound: P + D (no overlap)", p_ms + d_ms},
            {"bound: max(P, D) (full overlap)", std::max(p_ms, d_ms)}, {"one pass (the engine today)", one_ms}};
        rows.push_back({"two streams", wall_ms({&plain0, &plain1}, [&] { side_by_side(plain0, plain1); })});
        rows.push_back({"two streams, D high priority", wall_ms({&low_lane, &high_lane}, [&] {
                            side_by_side(low_lane, high_lane);
                        })});
        rows.push_back({"two streams, P high priority", wall_ms({&high_lane, &low_lane}, [&] {
                            side_by_side(high_lane, low_lane);
                        })});
        if (ci == 0 || ci == 2) {
            for (int n : green_splits) {
                int got_d = 0, got_p = 0;
                std::vector<Lane> g = green_lanes(n, &got_d, &got_p);
                if (g.size() != 2) break;
                char name[64];
                snprintf(name, sizeof name, "green: D %d SMs, P %d SMs", got_d, got_p);
                rows.push_back({name, wall_ms({&g[1], &g[0]}, [&] { side_by_side(g[1], g[0]); })});
                char dname[64];
                snprintf(dname, sizeof dname, "  D alone on its %d SMs", got_d);
                rows.push_back({dname, wall_ms({&g[0]}, [&] { pass(g[0], c.seqs, &set); })});
            }
        }
        for (size_t i = 0; i < rows.size(); ++i) {
            printf("  %-34s %9.2f %13.2fx\n", rows[i].first.c_str(), rows[i].second, one_ms / rows[i].second);
            if (json)
                fprintf(json, "%s  {\"p_rows\": %d, \"seqs\": %d, \"ctx\": %d, \"mode\": \"%s\", \"ms\": %.3f}",
                        ci == 0 && i == 0 ? "" : ",\n", c.p_rows, c.seqs, c.ctx, rows[i].first.c_str(),
                        rows[i].second);
        }
        double best = one_ms;
        std::string best_name = "one pass";
        for (size_t i = 5; i < rows.size(); ++i)
            if (rows[i].first[0] != ' ' && rows[i].second < best) best = rows[i].second, best_name = rows[i].first;
        char line[256];
        snprintf(line, sizeof line, "P %4d + D %3d x %4d: one pass %.2f ms, best %s %.2f ms (%.2fx); bounds %.2f..%.2f",
                 c.p_rows, c.seqs, c.ctx, one_ms, best_name.c_str(), best, one_ms / best, std::max(p_ms, d_ms),
                 p_ms + d_ms);
        summary.push_back(line);
    }
    if (json) {
        fprintf(json, "\n]}\n");
        fclose(json);
    }
    printf("\n");
    for (auto& s : summary) printf("%s\n", s.c_str());
    return 0;
}
