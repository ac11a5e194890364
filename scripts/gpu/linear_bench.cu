// Linear layers of a few tokens on the GPU: the engine's GEMV against cuBLAS and the memory's
// read rate, for Llama-3.1-8B's projections (bf16, and FP8 E4M3 weights) at 1 to 64 token rows.
//
// A decode step of m tokens reads every weight once whatever m is, so the physical limit of each
// product is its weight bytes over the read rate of a plain streaming kernel (measured in the
// same run). For each shape and m this prints the time of
//   cuBLAS   cublasGemmEx, bf16 in and out, f32 compute (what candle's matmul calls)
//   gemv     the engine's CUDA-core GEMV on bf16 weights (worker/src/kernels/cuda/gemv.cu,
//            m <= 8), in the variant the engine picks (gemv.rs)
//   fp8      the engine's GEMV on FP8 weights with a scale per row (fp8.cu, the same core and
//            variants), its share of the read rate counted on its own bytes (codes + scales)
// and which of cuBLAS / gemv is faster: the engine gives a linear layer to the GEMV up to the
// row count where cuBLAS starts to win (gemv.rs, GEMV_DEFAULT_ROWS). Both GEMVs are checked
// against cuBLAS (the FP8 one against cuBLAS on its codes dequantized to bf16). Weights rotate
// over copies larger than the L2 cache, so every launch reads from memory.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o linear-bench \
//        scripts/gpu/linear_bench.cu -lcublas
//   ./linear-bench [--json FILE]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../../worker/src/kernels/cuda/fp8.cu"
#include "../../worker/src/kernels/cuda/gemv.cu"
#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

// One weight format's GEMV kernels (the engine's own), by the shape gemv.rs's Variant picks.
struct GemvSet {
    const void* rows[8];
    const void* wide;
    const void* split;
};
#define GEMV_SET(SUFFIX)                                                                                  \
    GemvSet {                                                                                             \
        {(const void*)gemv_##SUFFIX##_m1, (const void*)gemv_##SUFFIX##_m2, (const void*)gemv_##SUFFIX##_m3, \
         (const void*)gemv_##SUFFIX##_m4, (const void*)gemv_##SUFFIX##_m5, (const void*)gemv_##SUFFIX##_m6, \
         (const void*)gemv_##SUFFIX##_m7, (const void*)gemv_##SUFFIX##_m8},                                \
            (const void*)gemv_##SUFFIX##_m1_wide, (const void*)gemv_##SUFFIX##_m1_split                     \
    }

// The engine's GEMV for m rows and n outputs (the choice gemv.rs makes); `scale` only for FP8.
static void launch_gemv(const GemvSet& set, int m, const void* w, const float* scale, const bf16* x, bf16* y, int n,
                        int k, cudaStream_t s) {
    const void* f;
    int per_warp;
    if (m == 1 && n >= 16384) f = set.wide, per_warp = 2;
    else if (m == 1 && n <= 4096) f = set.split, per_warp = 1;
    else f = set.rows[m - 1], per_warp = m == 1 ? 1 : m <= 3 ? 2 : 4;
    const dim3 grid((n + gemv_core::WARPS * per_warp - 1) / (gemv_core::WARPS * per_warp));
    void* args[] = {&w, &scale, &x, &y, &n, &k};
    CHECK(cudaLaunchKernel(f, grid, dim3(gemv_core::WARPS * 32), args, 0, s));
}

// Median time of one of the `launches` launches `body` makes, in µs.
template <typename F>
static float time_us(cudaStream_t s, int launches, F body) {
    return median_ms(s, 15, body) * 1e3f / launches;
}

int main(int argc, char** argv) {
    const char* json = nullptr;
    for (int i = 1; i + 1 < argc; ++i)
        if (!strcmp(argv[i], "--json")) json = argv[i + 1];
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(blas, s) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cuBLAS unavailable\n");
        return 1;
    }
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));

    const double read_bw = read_rate(s);

    struct Shape {
        const char* name;
        int n, k;
    } shapes[] = {{"qkv 6144x4096", 6144, 4096},
                  {"o 4096x4096", 4096, 4096},
                  {"gate_up 28672x4096", 28672, 4096},
                  {"down 4096x14336", 4096, 14336},
                  {"logits 128256x4096", 128256, 4096}};
    const int ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64};
    constexpr int MAX_M = 64;

    printf("read rate (4 GiB streaming read): %.0f GB/s\n\n", read_bw / 1e9);
    printf("%-20s %4s %10s %10s %10s %8s %8s %8s %9s %9s %-7s\n", "shape", "m", "cuBLAS us", "gemv us", "fp8 us",
           "cuBLAS%", "gemv%", "fp8%", "gemv err", "fp8 err", "faster");
    const GemvSet bf16_set = GEMV_SET(bf16), fp8_set = GEMV_SET(fp8_bf16);
    FILE* out = json ? fopen(json, "w") : nullptr;
    if (out) fprintf(out, "{\"read_gbps\": %.1f, \"rows\": [", read_bw / 1e9);
    bool first_row = true;
    for (const Shape& sh : shapes) {
        LinearBuffers buf(sh.n, sh.k, MAX_M, s);
        bf16 *x = buf.x, *y = buf.y, *ref = buf.ref;
        // FP8 copies of the same count (half the bytes: still past the L2 cache), one scale per
        // row, and copy 0 dequantized to bf16 for the reference.
        uint8_t* codes;
        float* scales;
        bf16* dequantized;
        CHECK(cudaMalloc(&codes, buf.elems * buf.copies));
        CHECK(cudaMalloc(&scales, sh.n * sizeof(float)));
        CHECK(cudaMalloc(&dequantized, buf.elems * sizeof(bf16)));
        fill_fp8<<<264, 512, 0, s>>>(codes, buf.elems * buf.copies, 5);
        const std::vector<float> ones(sh.n, 1.f / 448.f);
        CHECK(cudaMemcpy(scales, ones.data(), sh.n * sizeof(float), cudaMemcpyHostToDevice));
        dequantize_rows_fp8_bf16<<<sh.n, 256, 0, s>>>(codes, scales, dequantized, sh.k);
        const double fp8_bytes = (double)buf.elems + sh.n * sizeof(float);
        for (int m : ms) {
            const float alpha = 1.f, beta = 0.f;
            auto cublas = [&](const bf16* w, bf16* out_y) {
                cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, m, sh.k, &alpha, w, CUDA_R_16BF, sh.k, x,
                             CUDA_R_16BF, sh.k, &beta, out_y, CUDA_R_16BF, sh.n, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
            };
            const int launches = buf.copies * 4;
            const float blas_us = time_us(s, launches, [&] {
                for (int i = 0; i < launches; ++i) cublas(buf.weights(i), y);
            });
            float gemv_us = NAN, fp8_us = NAN;
            double err = NAN, fp8_err = NAN;
            if (m <= 8) {
                gemv_us = time_us(s, launches, [&] {
                    for (int i = 0; i < launches; ++i)
                        launch_gemv(bf16_set, m, buf.weights(i), nullptr, x, y, sh.n, sh.k, s);
                });
                cublas(buf.weights(0), ref);
                launch_gemv(bf16_set, m, buf.weights(0), nullptr, x, y, sh.n, sh.k, s);
                CHECK(cudaStreamSynchronize(s));
                err = relative_error(download(y, (size_t)m * sh.n), download(ref, (size_t)m * sh.n));
                fp8_us = time_us(s, launches, [&] {
                    for (int i = 0; i < launches; ++i)
                        launch_gemv(fp8_set, m, codes + (size_t)(i % buf.copies) * buf.elems, scales, x, y, sh.n,
                                    sh.k, s);
                });
                cublas(dequantized, ref);
                launch_gemv(fp8_set, m, codes, scales, x, y, sh.n, sh.k, s);
                CHECK(cudaStreamSynchronize(s));
                fp8_err = relative_error(download(y, (size_t)m * sh.n), download(ref, (size_t)m * sh.n));
            }
            CHECK(cudaGetLastError());
            auto share = [&](double bytes, float us) { return 100.0 * bytes / (us * 1e-6) / read_bw; };
            const char* faster = std::isnan(gemv_us) ? "" : gemv_us < blas_us ? "gemv" : "cuBLAS";
            printf("%-20s %4d %10.2f %10.2f %10.2f %7.1f%% %7.1f%% %7.1f%% %9.2e %9.2e %-7s\n", sh.name, m, blas_us,
                   gemv_us, fp8_us, share(buf.bytes, blas_us), share(buf.bytes, gemv_us), share(fp8_bytes, fp8_us),
                   err, fp8_err, faster);
            if (out) {
                fprintf(out, "%s{\"shape\": \"%s\", \"m\": %d, \"cublas_us\": %.3f", first_row ? "" : ", ",
                        sh.name, m, blas_us);
                if (!std::isnan(gemv_us))
                    fprintf(out, ", \"gemv_us\": %.3f, \"gemv_err\": %.3e, \"fp8_us\": %.3f, \"fp8_err\": %.3e",
                            gemv_us, err, fp8_us, fp8_err);
                fprintf(out, "}");
                first_row = false;
            }
        }
        cudaFree(codes);
        cudaFree(scales);
        cudaFree(dequantized);
    }
    if (out) {
        fprintf(out, "]}\n");
        fclose(out);
    }
    return 0;
}
