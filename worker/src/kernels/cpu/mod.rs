//! CPU kernels: a fork-join pool, block-quantized formats, matrix multiplication, element-wise
//! operations and paged attention. Every kernel has a portable scalar path and an AVX2 path picked
//! at run time ([`isa::Isa::detect`]).

pub mod attention;
pub mod isa;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
