//! The GPU memory plan: `total × gpu_memory_utilization − weights − activation peak − other`
//! is the KV cache. The activation peak is measured, not guessed: a profiling forward at the
//! largest batch the scheduler can form runs with the stream-ordered allocator's high-water
//! mark reset, and the mark is read afterwards.

use cudarc::driver::sys::{self, CUmemPool_attribute};
use cudarc::driver::{CudaStream, result};

use crate::kernels::cuda::gpu_error;
use crate::{Result, WorkerError};

/// The device's default memory pool, which candle's (cudarc's) stream-ordered allocations use.
pub struct MemoryPool {
    pool: sys::CUmemoryPool,
}

impl MemoryPool {
    pub fn of(stream: &CudaStream) -> Result<MemoryPool> {
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| gpu_error("binding the context", e))?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer; the device handle comes from the live context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| gpu_error("reading the default memory pool", e))?;
        Ok(MemoryPool { pool })
    }

    fn get(&self, attr: CUmemPool_attribute) -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: the attributes read here are 64-bit values.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut value as *mut u64).cast()) }
            .result()
            .map_err(|e| gpu_error("reading a memory pool attribute", e))?;
        Ok(value)
    }

    fn set(&self, attr: CUmemPool_attribute, mut value: u64) -> Result<()> {
        // SAFETY: the attributes written here are 64-bit values.
        unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, (&mut value as *mut u64).cast()) }
            .result()
            .map_err(|e| gpu_error("setting a memory pool attribute", e))
    }

    /// Bytes currently allocated from the pool.
    pub fn used(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes allocated at once since the last [`MemoryPool::reset_peak`].
    pub fn peak(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    pub fn reset_peak(&self) -> Result<()> {
        self.set(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    }

    /// Returns the pool's unused memory to the device (so free-memory queries see it).
    pub fn trim(&self) -> Result<()> {
        // SAFETY: plain driver call on a valid pool.
        unsafe { sys::cuMemPoolTrimTo(self.pool, 0) }.result().map_err(|e| gpu_error("trimming the memory pool", e))
    }

    /// Keeps freed memory in the pool instead of returning it at every synchronisation, so steps
    /// reuse their activation memory without mapping it again.
    pub fn keep_freed_memory(&self) -> Result<()> {
        self.set(CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
    }
}

/// Free and total device memory.
pub fn device_memory(stream: &CudaStream) -> Result<(usize, usize)> {
    stream.context().bind_to_thread().map_err(|e| gpu_error("binding the context", e))?;
    result::mem_get_info().map_err(|e| gpu_error("reading free device memory", e))
}

/// How the device's memory is shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub total: usize,
    /// `total × gpu_memory_utilization`.
    pub budget: usize,
    pub weights: usize,
    pub activation_peak: usize,
    /// Everything else in use on the device: the CUDA context, cuBLAS workspaces, the rotary
    /// tables, other processes.
    pub other: usize,
    /// Set aside for CUDA graphs (captured once the KV cache is in place).
    pub graphs: usize,
    /// Set aside for a draft model's weights, activations and graphs (its KV cache is in
    /// `kv_cache`, shared by block).
    pub draft: usize,
    pub kv_cache: usize,
}

impl MemoryPlan {
    /// The KV cache is what the budget leaves; `total` is the device's memory (or the
    /// `gpu_memory_limit` below it), `used` the device memory in use now (weights and everything
    /// else, the profiling activations already freed).
    pub fn new(total: usize, used: usize, utilization: f64, weights: usize, activation_peak: usize) -> Result<Self> {
        if !(utilization > 0.0 && utilization <= 1.0) {
            return Err(WorkerError::invalid(
                "gpu_memory_utilization",
                format!("{utilization} is not a fraction in (0, 1]"),
            ));
        }
        let budget = (total as f64 * utilization) as usize;
        let other = used.saturating_sub(weights);
        let kv_cache = budget.saturating_sub(used + activation_peak);
        Ok(MemoryPlan { total, budget, weights, activation_peak, other, graphs: 0, draft: 0, kv_cache })
    }

    /// The plan with `bytes` set aside for CUDA graphs, out of the KV cache.
    pub fn with_graphs(self, bytes: usize) -> Self {
        MemoryPlan { graphs: bytes, kv_cache: self.kv_cache.saturating_sub(bytes), ..self }
    }

    /// The plan with `bytes` set aside for a draft model, out of the KV cache.
    pub fn with_draft(self, bytes: usize) -> Self {
        MemoryPlan { draft: bytes, kv_cache: self.kv_cache.saturating_sub(bytes), ..self }
    }

    /// The total a plan starts from: the device's memory, or `limit` (`gpu_memory_limit`) when
    /// that is less.
    pub fn total(device_total: usize, limit: Option<usize>) -> usize {
        limit.map_or(device_total, |l| l.min(device_total))
    }

    /// One line for the log, in GiB.
    pub fn describe(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        format!(
            "device {:.2} GiB, budget {:.2} GiB: weights {:.2} GiB, activation peak {:.2} GiB, other {:.2} GiB, CUDA graphs {:.2} GiB, draft model {:.2} GiB, KV cache {:.2} GiB",
            gib(self.total),
            gib(self.budget),
            gib(self.weights),
            gib(self.activation_peak),
            gib(self.other),
            gib(self.graphs),
            gib(self.draft),
            gib(self.kv_cache)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kv_cache_gets_what_the_budget_leaves() {
        let gib = 1usize << 30;
        let plan = MemoryPlan::new(100 * gib, 20 * gib, 0.9, 16 * gib, 2 * gib).unwrap();
        assert_eq!(plan.budget, 90 * gib);
        assert_eq!(plan.other, 4 * gib);
        assert_eq!(plan.kv_cache, 68 * gib);
        let starved = MemoryPlan::new(100 * gib, 20 * gib, 0.2, 16 * gib, 2 * gib).unwrap();
        assert_eq!(starved.kv_cache, 0);
        assert!(MemoryPlan::new(100 * gib, 0, 1.5, 0, 0).is_err());
        let with_graphs = plan.with_graphs(gib / 4);
        assert_eq!((with_graphs.graphs, with_graphs.kv_cache), (gib / 4, 68 * gib - gib / 4));
        assert_eq!(starved.with_graphs(gib).kv_cache, 0);
    }

    #[test]
    fn a_memory_limit_below_the_device_caps_the_total() {
        let gib = 1usize << 30;
        // An 80 GiB card planned as a 24 GB A10G (22 GiB usable).
        let limited =
            MemoryPlan::new(MemoryPlan::total(80 * gib, Some(22 * gib)), 16 * gib, 0.9, 15 * gib, gib).unwrap();
        assert_eq!((limited.total, limited.budget), (22 * gib, (22.0 * 0.9 * gib as f64) as usize));
        assert_eq!(limited.kv_cache, limited.budget - 17 * gib);
        // A limit above the device's memory changes nothing.
        assert_eq!(MemoryPlan::total(80 * gib, Some(100 * gib)), 80 * gib);
        assert_eq!(MemoryPlan::total(80 * gib, None), 80 * gib);
    }
}
