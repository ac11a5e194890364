//! Where a decode step's time goes, logged every [`DecodeTiming::EVERY`] single-token steps:
//! the wall time of `forward`, the host's share (until the last launch is queued) and the GPU's
//! span (event to event). With `LUMEN_CUDA_OP_TIMING=1` an event also follows every operation,
//! and the log adds the GPU time of each kind of operation (a diagnostic: the events themselves
//! cost a little).

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::Result;
use crate::kernels::cuda::gpu_error;

/// Events after each operation of one step, when enabled.
pub struct OpTimer {
    enabled: bool,
    marks: Vec<(&'static str, CudaEvent)>,
}

impl OpTimer {
    pub fn from_env() -> OpTimer {
        OpTimer { enabled: std::env::var("LUMEN_CUDA_OP_TIMING").is_ok_and(|v| v == "1"), marks: Vec::new() }
    }

    /// Records that the operations queued since the previous mark were of kind `name`.
    pub fn mark(&mut self, stream: &Arc<CudaStream>, name: &'static str) -> Result<()> {
        if self.enabled {
            let event =
                stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| gpu_error("event", e))?;
            self.marks.push((name, event));
        }
        Ok(())
    }

    /// Forgets the marks of a step that is not timed.
    pub fn discard(&mut self) {
        self.marks.clear();
    }

    /// GPU milliseconds per kind of operation in the finished step (empty when disabled).
    fn take(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let mut out = Vec::new();
        for pair in self.marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1).map_err(|e| gpu_error("event timing", e))?;
            out.push((pair[1].0, ms as f64));
        }
        self.marks.clear();
        Ok(out)
    }
}

/// Decode-step timings, summed until logged.
#[derive(Debug, Default)]
pub struct DecodeTiming {
    steps: u32,
    wall_ms: f64,
    host_ms: f64,
    gpu_ms: f64,
    ops_ms: BTreeMap<&'static str, f64>,
}

impl DecodeTiming {
    const EVERY: u32 = 256;

    /// Adds one finished single-token step (`ops` is drained either way).
    pub fn record(&mut self, wall_ms: f64, host_ms: f64, gpu_ms: f64, ops: &mut OpTimer) -> Result<()> {
        for (name, ms) in ops.take()? {
            *self.ops_ms.entry(name).or_default() += ms;
        }
        self.steps += 1;
        self.wall_ms += wall_ms;
        self.host_ms += host_ms;
        self.gpu_ms += gpu_ms;
        if self.steps == Self::EVERY {
            let n = self.steps as f64;
            let ops: Vec<String> = self.ops_ms.iter().map(|(k, v)| format!("{k}={:.3}", v / n)).collect();
            tracing::info!(
                steps = self.steps,
                wall_ms = self.wall_ms / n,
                host_ms = self.host_ms / n,
                gpu_ms = self.gpu_ms / n,
                ops_ms = %ops.join(" "),
                "decode step timing (per step, single-token batches)"
            );
            *self = DecodeTiming::default();
        }
        Ok(())
    }
}
