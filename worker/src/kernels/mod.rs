//! Compute kernels. `cpu`: SIMD kernels chosen at run time (AVX2+FMA, with a portable fallback).
