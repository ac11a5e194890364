// Skinny matrix products for decode: y[m, n] = x[m, k] · W[n, k]ᵀ for m <= 8 tokens, W of the
// activations' type (bf16 or f32), through the decode GEMV core (gemv.cuh, where the scheme is
// described). W is row-major [n, k] (a linear layer's Hugging Face layout), k a multiple of 8
// (bf16) or 4 (f32) and rows 16-byte aligned; accumulation is f32. Each kernel takes
// (w, scale, x, y, n, k); `scale` is unused here (the FP8 kernels in fp8.cu read it).
#include "gemv.cuh"

LUMEN_GEMV(gemv_core::Dense<float>, float, f32)
LUMEN_GEMV(gemv_core::Dense<__nv_bfloat16>, __nv_bfloat16, bf16)
