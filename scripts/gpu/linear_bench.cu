// Linear layers of a few tokens on the GPU: the engine's GEMV against cuBLAS and the memory's
// read rate, for Llama-3.1-8B's projections (bf16) at 1 to 64 token rows.
//
// A decode step of m tokens reads every weight once whatever m is, so the physical limit of each
// product is its weight bytes over the read rate of a plain streaming kernel (measured in the
// same run). For each shape and m this prints the time of
//   cuBLAS   cublasGemmEx, bf16 in and out, f32 compute (what candle's matmul calls)
//   gemv     the engine's CUDA-core GEMV (worker/src/kernels/cuda/gemv.cu, m <= 8), in the
//            variant the engine picks (gemv.rs)
// and which is faster: the engine gives a linear layer to the GEMV up to the row count where
// cuBLAS starts to win (gemv.rs, GEMV_DEFAULT_ROWS). Weights rotate over copies larger than
// the L2 cache, so every launch reads from memory.
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

#include "../../worker/src/kernels/cuda/gemv.cu"
#include "bench_common.cuh"

using bf16 = __nv_bfloat16;

template <int M>
__global__ void __launch_bounds__(WARPS * 32) gemv_m(const bf16* w, const bf16* x, bf16* y, int n, int k) {
    gemv<bf16, M>(w, x, y, n, k);
}
__global__ void __launch_bounds__(WARPS * 32) gemv_wide(const bf16* w, const bf16* x, bf16* y, int n, int k) {
    gemv<bf16, 1, 2>(w, x, y, n, k);
}
__global__ void __launch_bounds__(WARPS * 32) gemv_split(const bf16* w, const bf16* x, bf16* y, int n, int k) {
    gemv<bf16, 1, 2, UNROLL, 2>(w, x, y, n, k);
}

// The engine's GEMV for m rows and n outputs (the choice gemv.rs makes).
static void launch_gemv(int m, const bf16* w, const bf16* x, bf16* y, int n, int k, cudaStream_t s) {
    const dim3 block(WARPS * 32);
    auto blocks = [&](int per_warp) { return dim3((n + WARPS * per_warp - 1) / (WARPS * per_warp)); };
    switch (m) {
        case 1:
            if (n >= 16384) gemv_wide<<<blocks(2), block, 0, s>>>(w, x, y, n, k);
            else if (n <= 4096) gemv_split<<<blocks(1), block, 0, s>>>(w, x, y, n, k);
            else gemv_m<1><<<blocks(1), block, 0, s>>>(w, x, y, n, k);
            break;
        case 2: gemv_m<2><<<blocks(2), block, 0, s>>>(w, x, y, n, k); break;
        case 3: gemv_m<3><<<blocks(2), block, 0, s>>>(w, x, y, n, k); break;
        case 4: gemv_m<4><<<blocks(4), block, 0, s>>>(w, x, y, n, k); break;
        case 5: gemv_m<5><<<blocks(4), block, 0, s>>>(w, x, y, n, k); break;
        case 6: gemv_m<6><<<blocks(4), block, 0, s>>>(w, x, y, n, k); break;
        case 7: gemv_m<7><<<blocks(4), block, 0, s>>>(w, x, y, n, k); break;
        case 8: gemv_m<8><<<blocks(4), block, 0, s>>>(w, x, y, n, k); break;
        default: fprintf(stderr, "no gemv for m=%d\n", m); exit(1);
    }
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
    printf("%-20s %4s %10s %10s %8s %8s %9s %-7s\n", "shape", "m", "cuBLAS us", "gemv us", "cuBLAS%", "gemv%",
           "gemv err", "faster");
    FILE* out = json ? fopen(json, "w") : nullptr;
    if (out) fprintf(out, "{\"read_gbps\": %.1f, \"rows\": [", read_bw / 1e9);
    bool first_row = true;
    for (const Shape& sh : shapes) {
        LinearBuffers buf(sh.n, sh.k, MAX_M, s);
        bf16 *x = buf.x, *y = buf.y, *ref = buf.ref;
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
            float gemv_us = NAN;
            double err = NAN;
            if (m <= 8) {
                gemv_us = time_us(s, launches, [&] {
                    for (int i = 0; i < launches; ++i) launch_gemv(m, buf.weights(i), x, y, sh.n, sh.k, s);
                });
                cublas(buf.weights(0), ref);
                launch_gemv(m, buf.weights(0), x, y, sh.n, sh.k, s);
                CHECK(cudaStreamSynchronize(s));
                err = relative_error(download(y, (size_t)m * sh.n), download(ref, (size_t)m * sh.n));
            }
            CHECK(cudaGetLastError());
            auto share = [&](float us) { return 100.0 * buf.bytes / (us * 1e-6) / read_bw; };
            const char* faster = std::isnan(gemv_us) ? "" : gemv_us < blas_us ? "gemv" : "cuBLAS";
            printf("%-20s %4d %10.2f %10.2f %7.1f%% %7.1f%% %9.2e %-7s\n", sh.name, m, blas_us, gemv_us, share(blas_us),
                   share(gemv_us), err, faster);
            if (out) {
                fprintf(out, "%s{\"shape\": \"%s\", \"m\": %d, \"cublas_us\": %.3f", first_row ? "" : ", ", sh.name,
                        m, blas_us);
                if (!std::isnan(gemv_us)) fprintf(out, ", \"gemv_us\": %.3f, \"gemv_err\": %.3e", gemv_us, err);
                fprintf(out, "}");
                first_row = false;
            }
        }
    }
    if (out) {
        fprintf(out, "]}\n");
        fclose(out);
    }
    return 0;
}
