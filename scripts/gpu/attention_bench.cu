// Decode attention on the GPU against the memory's read rate: the tensor-core decode kernel of
// worker/src/kernels/cuda/attention_mma.cu (Llama-3.1-8B's shape: 32 query heads over 8 KV
// heads of 128, bf16, block size 16) at the concurrencies and contexts issue 22 names, in the
// variants worth comparing (positions per chunk, pipeline stages, the L2 prefetch hint of the
// K/V copies, each warp pipelining its own positions, how far the context is split across CTAs).
//
// Decode attention reads every K/V byte of the batch once, so its physical limit is those bytes
// over the read rate of a plain streaming kernel (measured in the same run). The cache is a pool
// of blocks larger than the L2, each launch using other blocks (random block tables), so every
// launch reads from memory. Each variant's output is checked against the first variant's (the
// run fails beyond a bf16 tolerance).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o attention-bench \
//        scripts/gpu/attention_bench.cu
//   ./attention-bench [--json FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../../worker/src/kernels/cuda/attention_mma.cu"
#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

namespace bench {
constexpr int D = 128, HEADS = 32, KV_HEADS = 8, RATIO = HEADS / KV_HEADS, BLOCK = 16;
constexpr int ROWS = 16, HEADS_PER_CTA = RATIO;  // the decode kernel's 16-row tile: one token's 4 heads
}  // namespace bench

#define ATTENTION_ARGS                                                                                          \
    bf16 *out, float *part_acc, float *part_ml, const bf16 *q, int q_stride, int out_stride, const bf16 *k_cache, \
        const bf16 *v_cache, const int *tiles, const int *seqs, const int *tables, int kv_heads, int ratio,       \
        int heads_per_cta, int block_size, int chunks_per_split, float scale, unsigned int *counters

template <int CHUNK, int STAGES, int PREFETCH, bool WARP_PIPE>
__global__ void __launch_bounds__(128) decode_variant(ATTENTION_ARGS) {
    paged_attention_mma<bench::D, 1, 1, CHUNK, STAGES, PREFETCH, WARP_PIPE>(out, part_acc, part_ml, q, q_stride, out_stride,
                                                                 k_cache, v_cache, tiles, seqs, tables, kv_heads,
                                                                 ratio, heads_per_cta, block_size, chunks_per_split,
                                                                 scale, counters);
}

struct Variant {
    const char* name;
    void (*kernel)(ATTENTION_ARGS);
    int chunk, smem;
};

template <int CHUNK, int STAGES, int PREFETCH, bool WARP_PIPE = false>
Variant variant(const char* name) {
    return Variant{name, decode_variant<CHUNK, STAGES, PREFETCH, WARP_PIPE>, CHUNK, smem_bytes<bench::D, 1, 16, CHUNK, STAGES>()};
}

struct Shape {
    const char* name;
    int seqs, ctx, spread;  // contexts ctx .. ctx + spread - 1
};

int main(int argc, char** argv) {
    using namespace bench;
    const char* json_path = argc > 2 && !strcmp(argv[1], "--json") ? argv[2] : nullptr;
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    const double rate = read_rate(s);
    printf("%s, %d SMs, read rate %.0f GB/s\n", prop.name, sms, rate / 1e9);

    std::vector<Variant> variants = {
        variant<64, 3, 0>("c64 s3"),          // the engine's decode kernel
        variant<64, 3, 256>("c64 s3 L2:256"), variant<64, 3, 128>("c64 s3 L2:128"),
        variant<64, 2, 0>("c64 s2"),          variant<64, 2, 256>("c64 s2 L2:256"),
        variant<64, 4, 256>("c64 s4 L2:256"), variant<128, 2, 256>("c128 s2 L2:256"),
        // Each warp copies and waits for its own positions only (no CTA barrier per chunk).
        variant<64, 3, 0, true>("c64 s3 warp"),   variant<64, 3, 256, true>("c64 s3 warp L2:256"),
        variant<64, 2, 256, true>("c64 s2 warp L2:256"), variant<64, 4, 256, true>("c64 s4 warp L2:256"),
    };
    std::vector<int> occupancy;
    for (auto& v : variants) {
        CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.kernel, 128, v.smem));
        occupancy.push_back(per_sm);
    }
    const std::vector<Shape> shapes = {
        {"32 x 1k", 32, 1024, 1},   {"128 x 2k", 128, 2048, 1}, {"64 x 600", 64, 600, 1},
        {"256 x 512-767", 256, 512, 256}, {"8 x 4k", 8, 4096, 1}, {"1 x 8k", 1, 8192, 1},
    };
    // CTAs a launch aims for, per SM (0: no split); each variant also its own resident CTAs per
    // SM, the engine's target (`LUMEN_CUDA_SPLIT_CTAS_PER_SM` unset).
    const std::vector<int> split_targets = {0, 2, 4, 8};
    const float tolerance = 0.03f;  // bf16 outputs in [-1, 1]: rounding and the split's merge order
    bool all_match = true;

    // The block pool: 2 x 1 GiB of K and V, larger than any shape times the L2.
    const size_t block_elems = (size_t)KV_HEADS * BLOCK * D;
    const int pool = 32768;
    bf16 *k_cache, *v_cache;
    CHECK(cudaMalloc(&k_cache, pool * block_elems * sizeof(bf16)));
    CHECK(cudaMalloc(&v_cache, pool * block_elems * sizeof(bf16)));
    fill_random<<<4 * sms, 256, 0, s>>>(k_cache, pool * block_elems, 1);
    fill_random<<<4 * sms, 256, 0, s>>>(v_cache, pool * block_elems, 2);
    std::mt19937 rng(7);
    std::vector<int> perm(pool);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);

    FILE* json = json_path ? fopen(json_path, "w") : nullptr;
    if (json) fprintf(json, "{\"gpu\": \"%s\", \"read_rate_gbs\": %.1f, \"runs\": [\n", prop.name, rate / 1e9);
    bool first_json = true;
    printf("%-15s %-16s %6s %6s %7s %9s %8s %6s %9s\n", "shape", "variant", "CTA/SM", "split", "splits", "us",
           "GB/s", "%read", "max diff");
    for (const Shape& sh : shapes) {
        std::vector<int> ctx(sh.seqs);
        for (int i = 0; i < sh.seqs; ++i) ctx[i] = sh.ctx + (int)((i * 7919u) % sh.spread);
        std::vector<int> order(sh.seqs);  // tiles longest first, as the engine plans them
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int a, int b) { return ctx[a] > ctx[b]; });
        size_t blocks = 0, kv_bytes = 0;
        for (int c : ctx) {
            blocks += (c + BLOCK - 1) / BLOCK;
            kv_bytes += (size_t)c * KV_HEADS * D * 2 * sizeof(bf16);
        }
        if (blocks > (size_t)pool) {
            fprintf(stderr, "shape %s needs %zu blocks, the pool has %d\n", sh.name, blocks, pool);
            return 1;
        }
        const int copies = std::max<int>(1, std::min<int>(8, pool / blocks));
        // Descriptors of each copy (other blocks of the pool): seqs, tiles, tables.
        std::vector<int> h_seqs, h_tiles, h_tables;
        for (int copy = 0; copy < copies; ++copy) {
            size_t next = copy * blocks;
            for (int i = 0; i < sh.seqs; ++i) {
                h_seqs.insert(h_seqs.end(), {i, 1, ctx[i], (int)next});
                for (int b = 0; b < (ctx[i] + BLOCK - 1) / BLOCK; ++b) h_tables.push_back(perm[next++]);
            }
        }
        for (int i : order) h_tiles.insert(h_tiles.end(), {i, 0, 1, 0});
        int *d_seqs, *d_tiles, *d_tables;
        CHECK(cudaMalloc(&d_seqs, h_seqs.size() * 4));
        CHECK(cudaMalloc(&d_tiles, h_tiles.size() * 4));
        CHECK(cudaMalloc(&d_tables, h_tables.size() * 4));
        CHECK(cudaMemcpy(d_seqs, h_seqs.data(), h_seqs.size() * 4, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(d_tiles, h_tiles.data(), h_tiles.size() * 4, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(d_tables, h_tables.data(), h_tables.size() * 4, cudaMemcpyHostToDevice));
        const size_t q_elems = (size_t)sh.seqs * HEADS * D;
        bf16 *q, *out;
        CHECK(cudaMalloc(&q, q_elems * sizeof(bf16)));
        CHECK(cudaMalloc(&out, q_elems * sizeof(bf16)));
        fill_random<<<sms, 256, 0, s>>>(q, q_elems, 3);
        const int groups = KV_HEADS * (RATIO / HEADS_PER_CTA);
        const int ctas = sh.seqs * groups;
        const int max_ctx = *std::max_element(ctx.begin(), ctx.end());
        std::vector<bf16> reference, got(q_elems);
        for (size_t vi = 0; vi < variants.size(); ++vi) {
            const Variant& v = variants[vi];
            const int max_chunks = (max_ctx + v.chunk - 1) / v.chunk;
            std::vector<int> targets = split_targets;
            if (std::find(targets.begin(), targets.end(), occupancy[vi]) == targets.end())
                targets.push_back(occupancy[vi]);
            for (int target : targets) {
                int splits = target == 0 ? 1 : std::clamp(target * sms / ctas, 1, max_chunks);
                const int per_split = (max_chunks + splits - 1) / splits;
                splits = (max_chunks + per_split - 1) / per_split;
                if (target != 0 && splits == 1) continue;  // the same launch as no split
                float *part_acc, *part_ml;
                unsigned int* counters;
                CHECK(cudaMalloc(&part_acc, (size_t)ctas * splits * ROWS * D * 4 + 4));
                CHECK(cudaMalloc(&part_ml, (size_t)ctas * splits * ROWS * 2 * 4 + 4));
                CHECK(cudaMalloc(&counters, (size_t)ctas * 4));
                CHECK(cudaMemset(counters, 0, (size_t)ctas * 4));
                int copy = 0;
                auto launch = [&] {
                    v.kernel<<<dim3(sh.seqs, groups, splits), 128, v.smem, s>>>(
                        out, part_acc, part_ml, q, HEADS * D, HEADS * D, k_cache, v_cache, d_tiles,
                        d_seqs + copy * sh.seqs * 4, d_tables, KV_HEADS, RATIO, HEADS_PER_CTA, BLOCK, per_split,
                        1.f / sqrtf((float)D), splits > 1 ? counters : nullptr);
                    copy = (copy + 1) % copies;
                };
                launch();
                CHECK(cudaStreamSynchronize(s));
                CHECK(cudaGetLastError());
                // Output of copy 0, against the first variant's unsplit run.
                copy = 0;
                launch();
                CHECK(cudaMemcpyAsync(got.data(), out, q_elems * 2, cudaMemcpyDeviceToHost, s));
                CHECK(cudaStreamSynchronize(s));
                float diff = 0.f;
                if (reference.empty()) reference = got;
                for (size_t i = 0; i < q_elems; ++i)
                    diff = fmaxf(diff, fabsf(__bfloat162float(got[i]) - __bfloat162float(reference[i])));
                all_match = all_match && diff <= tolerance;
                const float ms = median_ms(s, 30, launch);
                const double gbs = kv_bytes / (ms * 1e-3) / 1e9;
                char split_name[16];
                snprintf(split_name, sizeof split_name, target ? "%d/SM" : "none", target);
                printf("%-15s %-16s %6d %6s %7d %9.1f %8.0f %5.0f%% %9.4f\n", sh.name, v.name, occupancy[vi],
                       split_name, splits, ms * 1e3, gbs, 100.0 * gbs * 1e9 / rate, diff);
                if (json) {
                    fprintf(json,
                            "%s  {\"shape\": \"%s\", \"variant\": \"%s\", \"ctas_per_sm\": %d, \"split_target_per_sm\": "
                            "%d, \"splits\": %d, \"us\": %.2f, \"kv_gbs\": %.1f, \"of_read_rate\": %.3f, "
                            "\"max_diff\": %.5f}",
                            first_json ? "" : ",\n", sh.name, v.name, occupancy[vi], target, splits, ms * 1e3, gbs,
                            gbs * 1e9 / rate, diff);
                    first_json = false;
                }
                CHECK(cudaFree(part_acc));
                CHECK(cudaFree(part_ml));
                CHECK(cudaFree(counters));
            }
        }
        CHECK(cudaFree(d_seqs));
        CHECK(cudaFree(d_tiles));
        CHECK(cudaFree(d_tables));
        CHECK(cudaFree(q));
        CHECK(cudaFree(out));
    }
    if (json) {
        fprintf(json, "\n]}\n");
        fclose(json);
    }
    if (!all_match) {
        fprintf(stderr, "some variant's output differs from the engine kernel's by more than %.3f\n", tolerance);
        return 1;
    }
    return 0;
}
