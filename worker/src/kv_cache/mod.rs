//! The paged KV cache: block pool with ref counts and prefix caching, and the cache storage.

pub mod block_pool;
pub mod cpu_storage;
#[cfg(feature = "cuda")]
pub mod cuda_storage;

pub use block_pool::{BlockHash, BlockId, BlockPool, PrefixCacheStats};
