//! Compute kernels. `cpu`: SIMD kernels chosen at run time (AVX2+FMA+F16C, with a portable scalar
//! fallback that doubles as the reference the SIMD paths are tested against). `cuda` (the `cuda`
//! feature): our CUDA kernels, tested against the CPU ones.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
