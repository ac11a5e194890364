// The linear layers of decode and mixed steps (64-4096 token rows) on cuBLAS: the call the engine
// makes (cublasGemmEx, default algorithm) against every algorithm cuBLASLt's heuristic offers for
// the same product, each timed, and against the product's physical limit.
//
// At 128-256 rows a Llama-3.1-8B linear layer is neither clearly memory- nor compute-bound: its
// limit is the larger of (weight bytes / the read rate of a streaming kernel, measured here) and
// (FLOPs / the tensor-core rate cuBLAS reaches on this card's largest product here, measured
// here). Weights rotate over copies larger than the L2 cache, so every launch reads from
// memory. Outputs of every algorithm are compared with the default's (bf16 tolerance).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gemm-bench \
//        scripts/gpu/gemm_bench.cu -lcublas -lcublasLt
//   ./gemm-bench [--json FILE]
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

#define LT(call)                                                                             \
    do {                                                                                     \
        cublasStatus_t st_ = (call);                                                         \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                                  \
            fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #call, st_); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

int main(int argc, char** argv) {
    const char* json_path = argc > 2 && !strcmp(argv[1], "--json") ? argv[2] : nullptr;
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    LT(cublasCreate(&blas));
    LT(cublasSetStream(blas, s));
    LT(cublasLtCreate(&lt));
    const size_t ws_bytes = 32 << 20;  // the engine's cuBLAS workspace
    void* ws;
    CHECK(cudaMalloc(&ws, ws_bytes));
    LT(cublasSetWorkspace(blas, ws, ws_bytes));
    void* lt_ws;
    CHECK(cudaMalloc(&lt_ws, ws_bytes));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    const double read_bw = read_rate(s);

    struct Shape {
        const char* name;
        int n, k;
    } shapes[] = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};
    const std::vector<int> ms = {4096, 64, 128, 192, 256, 384, 512, 1024, 2048};  // 4096 first: the rate
    constexpr int MAX_M = 4096;
    double peak_flops = 0;  // the best rate seen at 4096 rows, the compute limit for the rest

    printf("%s, read rate %.0f GB/s\n\n", prop.name, read_bw / 1e9);
    printf("%-8s %5s %10s %10s %10s %5s %10s %8s %8s %9s\n", "layer", "m", "default us", "lt #0 us", "lt best us",
           "algos", "limit us", "default%", "best%", "max err");
    FILE* json = json_path ? fopen(json_path, "w") : nullptr;
    if (json) fprintf(json, "{\"gpu\": \"%s\", \"read_gbs\": %.1f, \"rows\": [", prop.name, read_bw / 1e9);
    bool first_row = true;
    // Per m, the four layers' sum x 32 layers: one step's linear layers (without the logits).
    std::vector<double> step_default(ms.size()), step_best(ms.size()), step_limit(ms.size());
    for (const Shape& sh : shapes) {
        LinearBuffers buf(sh.n, sh.k, MAX_M, s);
        bf16 *x = buf.x, *y = buf.y, *ref = buf.ref;
        for (size_t mi = 0; mi < ms.size(); ++mi) {
            const int m = ms[mi];
            const float alpha = 1.f, beta = 0.f;
            const int launches = buf.copies * 2;
            auto per_launch = [&](auto body) { return median_ms(s, 10, body) * 1e3 / launches; };
            auto gemm_default = [&](const bf16* w, bf16* out) {
                LT(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, m, sh.k, &alpha, w, CUDA_R_16BF, sh.k, x,
                                CUDA_R_16BF, sh.k, &beta, out, CUDA_R_16BF, sh.n, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
            };
            const double default_us = per_launch([&] {
                for (int i = 0; i < launches; ++i) gemm_default(buf.weights(i), y);
            });
            gemm_default(buf.weights(0), ref);
            CHECK(cudaStreamSynchronize(s));
            const std::vector<float> want = download(ref, (size_t)m * sh.n);

            // The same product through cuBLASLt: W row-major [n, k] is column-major [k, n], read
            // transposed; X row-major [m, k] is column-major [k, m]; Y column-major [n, m].
            cublasLtMatmulDesc_t op;
            LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
            const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
            LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
            LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
            cublasLtMatrixLayout_t la, lb, lc;
            LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, sh.k, sh.n, sh.k));
            LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, sh.k, m, sh.k));
            LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, sh.n, m, sh.n));
            cublasLtMatmulPreference_t pref;
            LT(cublasLtMatmulPreferenceCreate(&pref));
            LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                    sizeof ws_bytes));
            cublasLtMatmulHeuristicResult_t found[32];
            int n_found = 0;
            LT(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, found, &n_found));
            double first_us = NAN, best_us = INFINITY, worst_err = 0;
            int valid = 0;
            for (int a = 0; a < n_found; ++a) {
                if (found[a].state != CUBLAS_STATUS_SUCCESS) continue;
                auto run = [&](const bf16* w, bf16* out) {
                    return cublasLtMatmul(lt, op, &alpha, w, la, x, lb, &beta, out, lc, out, lc, &found[a].algo, lt_ws,
                                          ws_bytes, s);
                };
                if (run(buf.weights(0), y) != CUBLAS_STATUS_SUCCESS) continue;
                CHECK(cudaStreamSynchronize(s));
                const double err = relative_error(download(y, (size_t)m * sh.n), want);
                if (err > 0.02) {
                    printf("  (algorithm %d of %s m=%d differs from the default by %.3g: skipped)\n", a, sh.name, m,
                           err);
                    continue;
                }
                worst_err = std::max(worst_err, err);
                const double us = per_launch([&] {
                    for (int i = 0; i < launches; ++i) run(buf.weights(i), y);
                });
                if (valid == 0) first_us = us;
                best_us = std::min(best_us, us);
                ++valid;
            }
            CHECK(cudaGetLastError());
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(op);

            const double flops = 2.0 * m * sh.n * sh.k;
            if (m == 4096) peak_flops = std::max(peak_flops, flops / (std::min(default_us, best_us) * 1e-6));
            const double limit_us =
                std::max(buf.bytes / read_bw, peak_flops > 0 ? flops / peak_flops : 0.0) * 1e6;
            const double best = std::min(default_us, best_us);
            printf("%-8s %5d %10.1f %10.1f %10.1f %5d %10.1f %7.0f%% %7.0f%% %9.1e\n", sh.name, m, default_us, first_us,
                   best_us, valid, limit_us, 100 * limit_us / default_us, 100 * limit_us / best, worst_err);
            step_default[mi] += 32 * default_us;
            step_best[mi] += 32 * best;
            step_limit[mi] += 32 * limit_us;
            if (json) {
                fprintf(json,
                        "%s{\"layer\": \"%s\", \"m\": %d, \"default_us\": %.2f, \"lt_first_us\": %.2f, "
                        "\"lt_best_us\": %.2f, \"algos\": %d, \"limit_us\": %.2f}",
                        first_row ? "" : ", ", sh.name, m, default_us, first_us, best_us, valid, limit_us);
                first_row = false;
            }
        }
    }
    printf("\ncompute limit: %.0f TFLOP/s (the best rate at 4096 rows)\n", peak_flops / 1e12);
    printf("one step's linear layers (32 x qkv, o, gate_up, down):\n%6s %12s %12s %12s\n", "rows", "default ms",
           "best ms", "limit ms");
    for (size_t mi = 0; mi < ms.size(); ++mi)
        printf("%6d %12.2f %12.2f %12.2f\n", ms[mi], step_default[mi] / 1e3, step_best[mi] / 1e3,
               step_limit[mi] / 1e3);
    if (json) {
        fprintf(json, "], \"peak_tflops\": %.1f}\n", peak_flops / 1e12);
        fclose(json);
    }
    return 0;
}
