//! Linear layers on cuBLASLt with the algorithm chosen per product shape, as an alternative to
//! the plain cuBLAS call of `blas.rs` (`LUMEN_CUDA_GEMM`: `cublas`, `lt`, `lt-tuned`).
//!
//! cuBLAS's `cublasGemmEx` picks its algorithm from a heuristic on every call; at the decode
//! steps' 64-256 rows a Llama-3.1-8B layer sits between the memory and the compute limit, where
//! that pick is not always the fastest (`scripts/gpu/gemm_bench.cu` measures every candidate).
//! Here each shape `(m, n, k)` gets a plan once, kept for the model's life: its descriptors and
//! one algorithm, the heuristic's first (`lt`) or, under `lt-tuned`, the fastest of the
//! heuristic's candidates timed on the stream, for shapes first met outside a graph capture
//! (the model runs each decode graph's layers once eagerly before capturing it, so every
//! captured shape is tuned; a shape first met while capturing takes the heuristic's first).
//! Invariants: a plan's algorithm needs no more workspace than ours; products are written into
//! memory the caller allocated (the layer scratch), nothing is allocated per call; the same shape
//! always runs the same algorithm, eagerly and in a graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::{DType, Tensor};
use cudarc::cublas::sys::cublasOperation_t as op;
use cudarc::cublaslt::sys as lt;

use super::{alloc_tensor, device_ptr, gpu_error};
use crate::{Result, WorkerError};

/// Bytes of the cuBLASLt workspace (as the cuBLAS handle's).
const WORKSPACE_BYTES: usize = 32 << 20;
/// Candidates asked of the heuristic per shape.
const CANDIDATES: usize = 8;
/// Timed launches per candidate when tuning (after one untimed).
const TIMED_RUNS: usize = 5;

/// Which library multiplies the linear layers the GEMV does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLibrary {
    /// `cublasGemmEx` with the default algorithm (`blas.rs`).
    Cublas,
    /// cuBLASLt, the heuristic's first algorithm per shape.
    Lt,
    /// cuBLASLt, the fastest of the heuristic's candidates per shape.
    LtTuned,
}

impl GemmLibrary {
    /// `LUMEN_CUDA_GEMM` (`cublas`, `lt`, `lt-tuned`), else cuBLAS.
    pub fn from_env() -> Result<GemmLibrary> {
        match std::env::var("LUMEN_CUDA_GEMM").as_deref() {
            Err(_) | Ok("cublas") => Ok(GemmLibrary::Cublas),
            Ok("lt") => Ok(GemmLibrary::Lt),
            Ok("lt-tuned") => Ok(GemmLibrary::LtTuned),
            Ok(other) => {
                Err(WorkerError::invalid("LUMEN_CUDA_GEMM", format!("{other:?} is not one of cublas, lt, lt-tuned")))
            }
        }
    }
}

fn check(what: &str, status: lt::cublasStatus_t) -> Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(WorkerError::Engine(format!("cuda: cuBLASLt {what}: {status:?}")))
    }
}

/// One shape's descriptors and algorithm (destroyed with it).
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    w: lt::cublasLtMatrixLayout_t,
    x: lt::cublasLtMatrixLayout_t,
    y: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    /// An FP8 product whose epilogue applies a scale per row of W and per row of x.
    outer: bool,
}

/// What a plan multiplies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    /// The kernels' element type throughout.
    Dense,
    /// E4M3 codes by E4M3 codes into bf16; `outer`: both scale vectors in the epilogue.
    Fp8 { outer: bool },
}

/// The device addresses of an FP8 product `y = (x · Wᵀ) * x_scales[row] * w_scales[col]`: `x`
/// m rows of k codes, `W` n rows of k codes, `y` m rows of n bf16.
#[derive(Clone, Copy)]
pub struct Fp8Operands {
    pub x: u64,
    pub x_scales: u64,
    pub w: u64,
    pub w_scales: u64,
    pub y: u64,
}

/// `CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F` (cuBLASLt 12.9+): a vector of f32 scales along a
/// matrix's outer dimension.
const SCALE_OUTER_VEC_32F: u32 = 3;

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once by `Plan`'s maker and is destroyed once here.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.w);
            lt::cublasLtMatrixLayoutDestroy(self.x);
            lt::cublasLtMatrixLayoutDestroy(self.y);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans made so far.
pub struct LtGemm {
    handle: lt::cublasLtHandle_t,
    workspace: Tensor,
    data_type: lt::cudaDataType,
    tune: bool,
    plans: RefCell<HashMap<(usize, usize, usize), Plan>>,
    fp8_plans: RefCell<HashMap<(usize, usize, usize), Plan>>,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

// SAFETY: the handle and the plans' descriptors are plain cuBLASLt objects with no tie to the
// thread that made them; the model that owns them uses them from one thread at a time.
unsafe impl Send for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        self.fp8_plans.borrow_mut().clear();
        // SAFETY: the handle was created by `LtGemm::new` and every plan using it is gone.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

impl LtGemm {
    /// A handle for products of `dtype` on `stream`, tuning each shape if `tune`.
    pub fn new(
        device: &candle_core::Device,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        dtype: DType,
        tune: bool,
    ) -> Result<LtGemm> {
        let data_type = match dtype {
            DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
            DType::F32 => lt::cudaDataType::CUDA_R_32F,
            other => return Err(WorkerError::Engine(format!("cuda gemm: {other:?} is not supported"))),
        };
        let mut handle = std::ptr::null_mut();
        // SAFETY: cublasLtCreate writes a new handle into `handle`.
        check("creating a handle", unsafe { lt::cublasLtCreate(&mut handle) })?;
        let workspace = alloc_tensor(device, (WORKSPACE_BYTES / 4).into(), DType::U32)?;
        Ok(LtGemm {
            handle,
            workspace,
            data_type,
            tune,
            plans: RefCell::new(HashMap::new()),
            fp8_plans: RefCell::new(HashMap::new()),
            stream: stream.clone(),
        })
    }

    /// Whether new shapes are tuned.
    pub fn tunes(&self) -> bool {
        self.tune
    }

    /// `y = x · Wᵀ` for `x` `[m, k]`, `W` `[n, k]`, `y` `[m, n]` (contiguous, checked by the
    /// caller), with the shape's plan (made now if new).
    pub fn gemm(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        (m, n, k): (usize, usize, usize),
        capturing: bool,
    ) -> Result<()> {
        let (xp, wp, yp) = (device_ptr(x)?, device_ptr(w)?, device_ptr(y)?);
        if !self.plans.borrow().contains_key(&(m, n, k)) {
            let plan = self.plan((m, n, k), PlanKind::Dense, (xp, wp, yp), self.tune && !capturing)?;
            self.plans.borrow_mut().insert((m, n, k), plan);
        }
        let plans = self.plans.borrow();
        let plan = &plans[&(m, n, k)];
        self.run(plan, (xp, wp, yp))
    }

    /// The FP8 product of `operands` for `(m, n, k)`; true when cuBLASLt applied the scales,
    /// false when the caller must (no algorithm of this cuBLASLt takes scale vectors for the
    /// shape on this GPU).
    pub fn gemm_fp8(&self, ops: Fp8Operands, (m, n, k): (usize, usize, usize)) -> Result<bool> {
        let key = (m, n, k);
        let operands = (ops.x, ops.w, ops.y);
        if !self.fp8_plans.borrow().contains_key(&key) {
            let plan = match self.plan(key, PlanKind::Fp8 { outer: true }, operands, false) {
                Ok(plan) => plan,
                Err(_) => self.plan(key, PlanKind::Fp8 { outer: false }, operands, false)?,
            };
            tracing::info!(m, n, k, scales_in_epilogue = plan.outer, "cuBLASLt fp8 plan");
            self.fp8_plans.borrow_mut().insert(key, plan);
        }
        let first = self.fp8_plans.borrow().get(&key).map(|p| self.run_fp8(p, ops));
        match first {
            Some(Ok(outer)) => Ok(outer),
            // An algorithm offered for scale vectors that then refuses to run: plain from now on.
            Some(Err(_)) if self.fp8_plans.borrow()[&key].outer => {
                let plan = self.plan(key, PlanKind::Fp8 { outer: false }, operands, false)?;
                let outer = self.run_fp8(&plan, ops)?;
                self.fp8_plans.borrow_mut().insert(key, plan);
                Ok(outer)
            }
            Some(Err(e)) => Err(e),
            None => Err(WorkerError::Engine("cuda: cuBLASLt fp8 plan missing".into())),
        }
    }

    fn run_fp8(&self, plan: &Plan, ops: Fp8Operands) -> Result<bool> {
        if plan.outer {
            for (attr, ptr) in [
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, ops.w_scales),
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, ops.x_scales),
            ] {
                // SAFETY: the attribute is a device pointer, set from a u64 address of n (A) or
                // m (B) f32 values.
                check("setting a scale vector", unsafe {
                    lt::cublasLtMatmulDescSetAttribute(plan.desc, attr, (&ptr as *const u64).cast(), 8)
                })?;
            }
        }
        self.run(plan, (ops.x, ops.w, ops.y))?;
        Ok(plan.outer)
    }

    fn run(&self, plan: &Plan, (x, w, y): (u64, u64, u64)) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = self.stream.cu_stream() as lt::cudaStream_t;
        // SAFETY: the plan's layouts describe W (n rows of k), x (m rows of k) and y (m rows of
        // n) as the caller holds them on this device; the workspace has WORKSPACE_BYTES bytes
        // and no plan's algorithm asks for more; alpha and beta are f32 (the f32 scale type).
        let status = unsafe {
            lt::cublasLtMatmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                plan.w,
                x as *const c_void,
                plan.x,
                (&beta as *const f32).cast(),
                y as *const c_void,
                plan.y,
                y as *mut c_void,
                plan.y,
                &plan.algo,
                device_ptr(&self.workspace)? as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        };
        check("matmul", status)
    }

    /// The descriptors of `(m, n, k)` for `kind` and its algorithm: the heuristic's first, or
    /// with `tune` the fastest of its candidates run on the operands given.
    fn plan(
        &self,
        (m, n, k): (usize, usize, usize),
        kind: PlanKind,
        operands: (u64, u64, u64),
        tune: bool,
    ) -> Result<Plan> {
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
            outer: kind == PlanKind::Fp8 { outer: true },
        };
        let (in_type, out_type) = match kind {
            PlanKind::Dense => (self.data_type, self.data_type),
            PlanKind::Fp8 { .. } => (lt::cudaDataType::CUDA_R_8F_E4M3, lt::cudaDataType::CUDA_R_16BF),
        };
        let (t, nt) = (op::CUBLAS_OP_T, op::CUBLAS_OP_N);
        let size_of = std::mem::size_of::<op>();
        // SAFETY: each create writes one descriptor into the plan (destroyed by its Drop, also
        // on an early return); attributes are set from values of the attribute's type.
        unsafe {
            check(
                "creating a matmul descriptor",
                lt::cublasLtMatmulDescCreate(
                    &mut plan.desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType::CUDA_R_32F,
                ),
            )?;
            for (attr, value) in [
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &t),
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &nt),
            ] {
                check(
                    "setting an operation",
                    lt::cublasLtMatmulDescSetAttribute(plan.desc, attr, (value as *const op).cast(), size_of),
                )?;
            }
            // Column-major: W row-major [n, k] is k x n read transposed; x is k x m; y is n x m.
            let (m, n, k) = (m as u64, n as u64, k as u64);
            check("a layout", lt::cublasLtMatrixLayoutCreate(&mut plan.w, in_type, k, n, k as i64))?;
            check("a layout", lt::cublasLtMatrixLayoutCreate(&mut plan.x, in_type, k, m, k as i64))?;
            check("a layout", lt::cublasLtMatrixLayoutCreate(&mut plan.y, out_type, n, m, n as i64))?;
            if plan.outer {
                for attr in [
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                ] {
                    check(
                        "setting a scale mode",
                        lt::cublasLtMatmulDescSetAttribute(
                            plan.desc,
                            attr,
                            (&SCALE_OUTER_VEC_32F as *const u32).cast(),
                            std::mem::size_of::<u32>(),
                        ),
                    )?;
                }
            }
        }
        let candidates = self.candidates(&plan, operand_alignment(operands))?;
        let Some(first) = candidates.first() else {
            return Err(WorkerError::Engine(format!("cuda: cuBLASLt offers no algorithm for {m} x {k} by {n} x {k}")));
        };
        plan.algo = *first;
        if tune && candidates.len() > 1 {
            let timings = candidates
                .iter()
                .map(|algo| {
                    plan.algo = *algo;
                    self.time(&plan, operands).unwrap_or(f32::INFINITY)
                })
                .collect::<Vec<_>>();
            let fastest = (0..timings.len()).min_by(|&a, &b| timings[a].total_cmp(&timings[b])).unwrap_or(0);
            plan.algo = candidates[fastest];
            tracing::debug!(
                m,
                n,
                k,
                candidates = candidates.len(),
                fastest,
                first_ms = timings[0],
                best_ms = timings[fastest],
                "cuBLASLt tuned a shape"
            );
        }
        Ok(plan)
    }

    /// The heuristic's candidates for the plan's shape that fit the workspace and operands
    /// aligned to `align` bytes, best first.
    fn candidates(&self, plan: &Plan, align: u32) -> Result<Vec<lt::cublasLtMatmulAlgo_t>> {
        let mut pref = std::ptr::null_mut();
        let bytes = WORKSPACE_BYTES as u64;
        use lt::cublasLtMatmulPreferenceAttributes_t as attr;
        let mut found = vec![
            lt::cublasLtMatmulHeuristicResult_t {
                algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                wavesCount: 0.0,
                reserved: [0; 4],
            };
            CANDIDATES
        ];
        let mut count = 0;
        // SAFETY: the preference is created, set from a u64 (the workspace limit's type) and u32s
        // (the alignments' type), used and destroyed here; `found` has room for CANDIDATES
        // results.
        unsafe {
            check("creating a preference", lt::cublasLtMatmulPreferenceCreate(&mut pref))?;
            let asked = check(
                "setting the workspace limit",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                ),
            )
            .and_then(|()| {
                // The heuristic assumes 256-byte-aligned operands unless told otherwise; ours
                // (layer scratch, row slices) may be aligned to 16 bytes only.
                for which in [
                    attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    check(
                        "setting an operand alignment",
                        lt::cublasLtMatmulPreferenceSetAttribute(
                            pref,
                            which,
                            (&align as *const u32).cast(),
                            std::mem::size_of::<u32>(),
                        ),
                    )?;
                }
                check(
                    "the algorithm heuristic",
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        plan.desc,
                        plan.w,
                        plan.x,
                        plan.y,
                        plan.y,
                        pref,
                        CANDIDATES as i32,
                        found.as_mut_ptr(),
                        &mut count,
                    ),
                )
            });
            lt::cublasLtMatmulPreferenceDestroy(pref);
            asked?;
        }
        Ok(found
            .into_iter()
            .take(count.max(0) as usize)
            .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE_BYTES)
            .map(|r| r.algo)
            .collect())
    }

    /// Milliseconds per run of the plan's algorithm on the operands (one untimed run first).
    fn time(&self, plan: &Plan, operands: (u64, u64, u64)) -> Result<f32> {
        let event = |what| {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| gpu_error(what, e))
        };
        self.run(plan, operands)?;
        let start = event("recording an event")?;
        for _ in 0..TIMED_RUNS {
            self.run(plan, operands)?;
        }
        let end = event("recording an event")?;
        end.synchronize().map_err(|e| gpu_error("waiting for an event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| gpu_error("timing an event", e))?;
        Ok(ms / TIMED_RUNS as f32)
    }
}

/// The alignment every operand address has, in bytes, at most 16 (what the layer scratch
/// guarantees: a plan is kept per shape and met again with other buffers of the same kind).
fn operand_alignment((x, w, y): (u64, u64, u64)) -> u32 {
    let bits = (x | w | y | 16).trailing_zeros();
    1 << bits.min(4)
}

#[cfg(test)]
mod alignment_tests {
    use super::operand_alignment;

    #[test]
    fn the_alignment_is_the_least_aligned_operands_up_to_16_bytes() {
        assert_eq!(operand_alignment((0x1000, 0x2000, 0x3000)), 16);
        assert_eq!(operand_alignment((0x1000, 0x2008, 0x3000)), 8);
        assert_eq!(operand_alignment((0x1002, 0x2000, 0x3010)), 2);
        assert_eq!(operand_alignment((0x1010, 0x2100, 0x3040)), 16);
    }
}
