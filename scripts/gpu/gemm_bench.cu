// The linear layers of decode and mixed steps (8-4096 token rows) on cuBLAS: the call the engine
// makes (cublasGemmEx, default algorithm) against every algorithm cuBLASLt's heuristic offers for
// the same product, each timed, and against the product's physical limit; then the same products
// with FP8 E4M3 weights and activations (per-tensor scales in cuBLASLt's epilogue) against
// FP8's limit.
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
#include <cuda_fp8.h>
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

// E4M3 codes as bf16 (every E4M3 value is exact in bf16): the reference product's operands.
__global__ void fp8_to_bf16(const uint8_t* codes, bf16* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        __nv_fp8_e4m3 v;
        v.__x = codes[i];
        out[i] = __float2bfloat16((float)v);
    }
}

// Every algorithm cuBLASLt's heuristic offers for `op` on these layouts, run on `run(algo, copy)`
// (copy = which weight copy), checked against `want` (skipped past 2% of the largest value),
// timed per launch: returns {heuristic #0 us, best us, algorithms that ran, worst error}.
struct Candidates {
    double first_us = NAN, best_us = INFINITY, worst_err = 0;
    int valid = 0;
};
template <typename Run>
static Candidates time_candidates(cublasLtHandle_t lt, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                                  cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc, size_t ws_bytes, cudaStream_t s,
                                  int launches, const bf16* y, size_t y_elems, const std::vector<float>& want,
                                  const char* what, Run run) {
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                            sizeof ws_bytes));
    cublasLtMatmulHeuristicResult_t found[32];
    int n_found = 0;
    const cublasStatus_t asked = cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, found, &n_found);
    if (asked != CUBLAS_STATUS_SUCCESS || n_found == 0) {
        printf("  (%s: the heuristic answered status %d with %d algorithms)\n", what, (int)asked, n_found);
        n_found = 0;
    }
    Candidates c;
    for (int a = 0; a < n_found; ++a) {
        if (found[a].state != CUBLAS_STATUS_SUCCESS) continue;
        if (const cublasStatus_t ran = run(&found[a].algo, 0); ran != CUBLAS_STATUS_SUCCESS) {
            printf("  (algorithm %d of %s failed to run: status %d)\n", a, what, (int)ran);
            continue;
        }
        CHECK(cudaStreamSynchronize(s));
        const double err = relative_error(download(y, y_elems), want);
        if (err > 0.02) {
            printf("  (algorithm %d of %s differs from the reference by %.3g: skipped)\n", a, what, err);
            continue;
        }
        c.worst_err = std::max(c.worst_err, err);
        const double us = median_ms(s, 10, [&] {
                              for (int i = 0; i < launches; ++i) run(&found[a].algo, i);
                          }) *
                          1e3 / launches;
        if (c.valid == 0) c.first_us = us;
        c.best_us = std::min(c.best_us, us);
        ++c.valid;
    }
    CHECK(cudaGetLastError());
    cublasLtMatmulPreferenceDestroy(pref);
    return c;
}

// JSON has no NaN or infinity: a product no algorithm ran is written as -1.
static double json_num(double v) { return std::isfinite(v) ? v : -1; }

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
    // 4096 first: the compute rate the others' limits use. 8-32 rows: decode at 8-32 streams.
    const std::vector<int> ms = {4096, 8, 16, 32, 64, 128, 192, 256, 384, 512, 1024, 2048};
    constexpr int MAX_M = 4096;
    double peak_flops = 0, fp8_peak_flops = 0;  // the best rates seen at 4096 rows

    printf("%s, read rate %.0f GB/s\n\n", prop.name, read_bw / 1e9);
    printf("bf16 weights and activations (cublasGemmEx, the engine's call, against cuBLASLt's candidates):\n");
    printf("%-8s %5s %10s %10s %10s %5s %10s %8s %8s %9s\n", "layer", "m", "default us", "lt #0 us", "lt best us",
           "algos", "limit us", "default%", "best%", "max err");
    FILE* json = json_path ? fopen(json_path, "w") : nullptr;
    if (json) fprintf(json, "{\"gpu\": \"%s\", \"read_gbs\": %.1f, \"rows\": [", prop.name, read_bw / 1e9);
    bool first_row = true;
    // Per m, the four layers' sum x 32 layers: one step's linear layers (without the logits).
    std::vector<double> step_default(ms.size()), step_best(ms.size()), step_limit(ms.size());
    std::vector<double> step_fp8(ms.size()), step_fp8_limit(ms.size());
    for (const Shape& sh : shapes) {
        LinearBuffers buf(sh.n, sh.k, MAX_M, s);
        bf16 *x = buf.x, *y = buf.y, *ref = buf.ref;
        for (size_t mi = 0; mi < ms.size(); ++mi) {
            const int m = ms[mi];
            const float alpha = 1.f, beta = 0.f;
            const int launches = buf.copies * 2;
            auto gemm_default = [&](const bf16* w, bf16* out) {
                LT(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, m, sh.k, &alpha, w, CUDA_R_16BF, sh.k, x,
                                CUDA_R_16BF, sh.k, &beta, out, CUDA_R_16BF, sh.n, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
            };
            const double default_us = median_ms(s, 10, [&] {
                                          for (int i = 0; i < launches; ++i) gemm_default(buf.weights(i), y);
                                      }) *
                                      1e3 / launches;
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
            char what[64];
            snprintf(what, sizeof what, "bf16 %s m=%d", sh.name, m);
            const Candidates c = time_candidates(
                lt, op, la, lb, lc, ws_bytes, s, launches, y, (size_t)m * sh.n, want, what,
                [&](const cublasLtMatmulAlgo_t* algo, int i) {
                    return cublasLtMatmul(lt, op, &alpha, buf.weights(i), la, x, lb, &beta, y, lc, y, lc, algo, lt_ws,
                                          ws_bytes, s);
                });
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(op);

            const double flops = 2.0 * m * sh.n * sh.k;
            if (m == 4096) peak_flops = std::max(peak_flops, flops / (std::min(default_us, c.best_us) * 1e-6));
            const double limit_us =
                std::max(buf.bytes / read_bw, peak_flops > 0 ? flops / peak_flops : 0.0) * 1e6;
            const double best = std::min(default_us, c.best_us);
            printf("%-8s %5d %10.1f %10.1f %10.1f %5d %10.1f %7.0f%% %7.0f%% %9.1e\n", sh.name, m, default_us,
                   c.first_us, c.best_us, c.valid, limit_us, 100 * limit_us / default_us, 100 * limit_us / best,
                   c.worst_err);
            step_default[mi] += 32 * default_us;
            step_best[mi] += 32 * best;
            step_limit[mi] += 32 * limit_us;
            if (json) {
                fprintf(json,
                        "%s{\"format\": \"bf16\", \"layer\": \"%s\", \"m\": %d, \"default_us\": %.2f, "
                        "\"lt_first_us\": %.2f, \"lt_best_us\": %.2f, \"algos\": %d, \"limit_us\": %.2f}",
                        first_row ? "" : ", ", sh.name, m, default_us, json_num(c.first_us), json_num(c.best_us), c.valid,
                        limit_us);
                first_row = false;
            }
        }
    }

    // FP8 (E4M3) weights and activations with one f32 scale each, given to cuBLASLt as scalars it
    // applies in its epilogue (vLLM's per-tensor scheme; the engine today scales per row and
    // per token after the product), bf16 out: what the tensor cores give at each row count,
    // against the product's limit in FP8 (half the weight bytes; FLOPs at the best FP8 rate at
    // 4096 rows). Checked against cublasGemmEx on the same codes in bf16.
    printf("\nFP8 E4M3 weights and activations, bf16 out (cuBLASLt): per-tensor scales in the epilogue; "
           "vec: per-row weight scales as alpha's device vector\n");
    printf("%-8s %5s %10s %10s %5s %10s %8s %9s %10s %5s\n", "layer", "m", "lt #0 us", "lt best us", "algos",
           "limit us", "best%", "max err", "vec best", "algos");
    for (const Shape& sh : shapes) {
        const size_t elems = (size_t)sh.n * sh.k;
        const int copies = (int)std::max<size_t>(2, (size_t(512) << 20) / elems + 1);
        uint8_t *pool, *xq;
        bf16 *w_ref, *x_ref, *y, *ref;
        float* scales;  // [weight scale, activation scale]
        CHECK(cudaMalloc(&pool, elems * copies));
        CHECK(cudaMalloc(&xq, (size_t)MAX_M * sh.k));
        CHECK(cudaMalloc(&w_ref, elems * sizeof(bf16)));
        CHECK(cudaMalloc(&x_ref, (size_t)MAX_M * sh.k * sizeof(bf16)));
        CHECK(cudaMalloc(&y, (size_t)MAX_M * sh.n * sizeof(bf16)));
        CHECK(cudaMalloc(&ref, (size_t)MAX_M * sh.n * sizeof(bf16)));
        CHECK(cudaMalloc(&scales, 2 * sizeof(float)));
        float* row_scales;  // the weight's scale for every output row (all equal here)
        CHECK(cudaMalloc(&row_scales, sh.n * sizeof(float)));
        fill_fp8<<<264, 512, 0, s>>>(pool, elems * copies, 5);
        fill_fp8<<<264, 512, 0, s>>>(xq, (size_t)MAX_M * sh.k, 9);
        fp8_to_bf16<<<264, 512, 0, s>>>(pool, w_ref, elems);
        fp8_to_bf16<<<264, 512, 0, s>>>(xq, x_ref, (size_t)MAX_M * sh.k);
        const float host_scales[2] = {1.f / 448.f, 1.f / 448.f};
        CHECK(cudaMemcpy(scales, host_scales, sizeof host_scales, cudaMemcpyHostToDevice));
        const std::vector<float> host_row_scales(sh.n, host_scales[0]);
        CHECK(cudaMemcpy(row_scales, host_row_scales.data(), sh.n * sizeof(float), cudaMemcpyHostToDevice));
        for (size_t mi = 0; mi < ms.size(); ++mi) {
            const int m = ms[mi];
            const float ref_alpha = host_scales[0] * host_scales[1], alpha = 1.f, beta = 0.f;
            LT(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, m, sh.k, &ref_alpha, w_ref, CUDA_R_16BF, sh.k,
                            x_ref, CUDA_R_16BF, sh.k, &beta, ref, CUDA_R_16BF, sh.n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
            CHECK(cudaStreamSynchronize(s));
            const std::vector<float> want = download(ref, (size_t)m * sh.n);
            // Two ways to give cuBLASLt the scales: both as scalars (per-tensor weight and
            // activation scales), or the weight's per-output-row scales as a device vector of
            // alpha (ALPHA_DEVICE_VECTOR_BETA_ZERO) and the activation's as a scalar: per-channel
            // weights with per-tensor activations, fused, if the library offers it for FP8.
            Candidates found[2];
            for (int variant = 0; variant < 2; ++variant) {
                cublasLtMatmulDesc_t op;
                LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
                const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
                LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
                LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
                const float* b_scale = scales + 1;
                LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale,
                                                  sizeof b_scale));
                if (variant == 0) {
                    const float* a_scale = scales;
                    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale,
                                                      sizeof a_scale));
                } else {
                    const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
                    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof mode));
                }
                cublasLtMatrixLayout_t la, lb, lc;
                LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, sh.k, sh.n, sh.k));
                LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, sh.k, m, sh.k));
                LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, sh.n, m, sh.n));
                const int launches = copies * 2;
                char what[64];
                snprintf(what, sizeof what, "fp8 %s %s m=%d", variant ? "alpha-vector" : "scalar", sh.name, m);
                // Host alpha for scalars; the device vector of per-row scales otherwise (beta zero).
                const void* alpha_arg = variant ? (const void*)row_scales : (const void*)&alpha;
                found[variant] = time_candidates(
                    lt, op, la, lb, lc, ws_bytes, s, launches, y, (size_t)m * sh.n, want, what,
                    [&](const cublasLtMatmulAlgo_t* algo, int i) {
                        return cublasLtMatmul(lt, op, alpha_arg, pool + (size_t)(i % copies) * elems, la, xq, lb,
                                              &beta, y, lc, y, lc, algo, lt_ws, ws_bytes, s);
                    });
                cublasLtMatrixLayoutDestroy(la);
                cublasLtMatrixLayoutDestroy(lb);
                cublasLtMatrixLayoutDestroy(lc);
                cublasLtMatmulDescDestroy(op);
            }
            const Candidates& c = found[0];
            const Candidates& v = found[1];

            const double flops = 2.0 * m * sh.n * sh.k;
            if (m == 4096 && c.valid) fp8_peak_flops = std::max(fp8_peak_flops, flops / (c.best_us * 1e-6));
            const double limit_us =
                std::max(elems / read_bw, fp8_peak_flops > 0 ? flops / fp8_peak_flops : 0.0) * 1e6;
            printf("%-8s %5d %10.1f %10.1f %5d %10.1f %7.0f%% %9.1e %10.1f %5d\n", sh.name, m, c.first_us, c.best_us,
                   c.valid, limit_us, c.valid ? 100 * limit_us / c.best_us : 0.0, c.worst_err, v.best_us, v.valid);
            step_fp8[mi] += 32 * (c.valid ? c.best_us : NAN);
            step_fp8_limit[mi] += 32 * limit_us;
            if (json) {
                fprintf(json,
                        ", {\"format\": \"fp8\", \"layer\": \"%s\", \"m\": %d, \"lt_first_us\": %.2f, "
                        "\"lt_best_us\": %.2f, \"algos\": %d, \"limit_us\": %.2f, \"alpha_vector_best_us\": %.2f, "
                        "\"alpha_vector_algos\": %d}",
                        sh.name, m, json_num(c.first_us), json_num(c.best_us), c.valid, limit_us, json_num(v.best_us), v.valid);
            }
        }
        cudaFree(pool);
        cudaFree(xq);
        cudaFree(w_ref);
        cudaFree(x_ref);
        cudaFree(y);
        cudaFree(ref);
        cudaFree(scales);
        cudaFree(row_scales);
    }

    printf("\ncompute limit: bf16 %.0f TFLOP/s, fp8 %.0f TFLOP/s (the best rates at 4096 rows)\n", peak_flops / 1e12,
           fp8_peak_flops / 1e12);
    printf("one step's linear layers (32 x qkv, o, gate_up, down), ms:\n%6s %12s %12s %12s %12s %12s\n", "rows",
           "bf16 default", "bf16 best", "bf16 limit", "fp8 best", "fp8 limit");
    for (size_t mi = 0; mi < ms.size(); ++mi)
        printf("%6d %12.2f %12.2f %12.2f %12.2f %12.2f\n", ms[mi], step_default[mi] / 1e3, step_best[mi] / 1e3,
               step_limit[mi] / 1e3, step_fp8[mi] / 1e3, step_fp8_limit[mi] / 1e3);
    if (json) {
        fprintf(json, "], \"peak_tflops\": %.1f, \"fp8_peak_tflops\": %.1f}\n", peak_flops / 1e12,
                fp8_peak_flops / 1e12);
        fclose(json);
    }
    return 0;
}
