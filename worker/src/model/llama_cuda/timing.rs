//! Where a step's time goes, logged every 256 single-token (decode) steps and every 8 steps
//! that carry prompt tokens: the wall time of `forward`, the host's share (until the last
//! launch is queued, less the engine's work done while the step runs, `overlap_ms`), the GPU's
//! span (event to event) and the mean token rows per step. With `LUMEN_CUDA_OP_TIMING=1` an event also follows every operation,
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

    /// Whether each operation is timed (`LUMEN_CUDA_OP_TIMING=1`).
    pub fn enabled(&self) -> bool {
        self.enabled
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

/// Step timings of one kind (decode-only steps, or steps with prompt tokens), summed until
/// logged.
#[derive(Debug)]
pub struct StepTiming {
    decode: bool,
    every: u32,
    steps: u32,
    tokens: u64,
    wall_ms: f64,
    host_ms: f64,
    overlap_ms: f64,
    gpu_ms: f64,
    ops_ms: BTreeMap<&'static str, f64>,
}

impl StepTiming {
    /// Single-token steps, logged every 256.
    pub fn decode() -> StepTiming {
        StepTiming::new(true, 256)
    }

    /// Steps that carry prompt tokens, logged every 8.
    pub fn prefill() -> StepTiming {
        StepTiming::new(false, 8)
    }

    fn new(decode: bool, every: u32) -> StepTiming {
        StepTiming {
            decode,
            every,
            steps: 0,
            tokens: 0,
            wall_ms: 0.0,
            host_ms: 0.0,
            overlap_ms: 0.0,
            gpu_ms: 0.0,
            ops_ms: BTreeMap::new(),
        }
    }

    /// Adds one finished step of `tokens` token rows, its `[wall, host, overlap, gpu]` ms (`ops`
    /// is drained either way).
    pub fn record(&mut self, tokens: usize, ms: [f64; 4], ops: &mut OpTimer) -> Result<()> {
        let [wall_ms, host_ms, overlap_ms, gpu_ms] = ms;
        for (name, ms) in ops.take()? {
            *self.ops_ms.entry(name).or_default() += ms;
        }
        self.steps += 1;
        self.tokens += tokens as u64;
        self.wall_ms += wall_ms;
        self.host_ms += host_ms;
        self.overlap_ms += overlap_ms;
        self.gpu_ms += gpu_ms;
        if self.steps == self.every {
            let n = self.steps as f64;
            let ops: Vec<String> = self.ops_ms.iter().map(|(k, v)| format!("{k}={:.3}", v / n)).collect();
            let (wall_ms, host_ms, overlap_ms, gpu_ms, tokens) =
                (self.wall_ms / n, self.host_ms / n, self.overlap_ms / n, self.gpu_ms / n, self.tokens as f64 / n);
            let ops = ops.join(" ");
            if self.decode {
                tracing::info!(steps = self.steps, wall_ms, host_ms, overlap_ms, gpu_ms, tokens, ops_ms = %ops,
                    "decode step timing (per step, single-token batches)");
            } else {
                tracing::info!(steps = self.steps, wall_ms, host_ms, overlap_ms, gpu_ms, tokens, ops_ms = %ops,
                    "prefill step timing (per step, steps with prompt tokens)");
            }
            *self = StepTiming::new(self.decode, self.every);
        }
        Ok(())
    }
}
