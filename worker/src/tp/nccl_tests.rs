//! NCCL's collectives on the GPUs of the machine (needs a GPU and libnccl: the `tp` step of
//! `scripts/gpu/run-on-device.sh` points `LUMEN_NCCL_LIBRARY` at the one it finds). With one GPU
//! the group has one rank: the calls, the library and graph capture are still exercised; the
//! sums over several ranks need a multi-GPU machine (issue 17's).

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use super::{Comm, ElementType, RawStream, group, version};

/// One rank's device, stream and buffers.
struct Rank {
    stream: Arc<CudaStream>,
    f32s: CudaSlice<f32>,
    bf16s: CudaSlice<bf16>,
    gathered: CudaSlice<f32>,
}

const COUNT: usize = 1 << 16;

/// Rank r's values: small integers times (r + 1), exact in bf16 and in every sum here.
fn values(rank: usize) -> Vec<f32> {
    (0..COUNT).map(|i| ((i % 7) as f32 - 3.0) * (rank + 1) as f32).collect()
}

fn ptr<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64
where
    CudaSlice<T>: DevicePtr<T>,
{
    slice.device_ptr(stream).0
}

fn raw(stream: &CudaStream) -> RawStream {
    stream.cu_stream() as RawStream
}

fn ranks() -> (Vec<Comm>, Vec<Rank>) {
    let (major, minor, patch) = version().expect("NCCL could not be loaded");
    assert!(major >= 2, "NCCL {major}.{minor}.{patch}");
    let gpus = CudaContext::device_count().expect("a CUDA device");
    let devices: Vec<i32> = (0..gpus).collect();
    let comms = Comm::init_all(&devices).expect("ncclCommInitAll");
    let ranks = devices
        .iter()
        .enumerate()
        .map(|(r, &d)| {
            let ctx = CudaContext::new(d as usize).unwrap();
            let stream = ctx.new_stream().unwrap();
            let mine = values(r);
            let halves: Vec<bf16> = mine.iter().map(|&v| bf16::from_f32(v)).collect();
            Rank {
                f32s: stream.clone_htod(&mine).unwrap(),
                bf16s: stream.clone_htod(&halves).unwrap(),
                gathered: stream.alloc_zeros::<f32>(COUNT * gpus as usize).unwrap(),
                stream,
            }
        })
        .collect();
    (comms, ranks)
}

#[test]
fn every_gpu_sums_and_gathers_through_nccl() {
    let (comms, ranks) = ranks();
    let n = ranks.len();
    assert_eq!(comms.len(), n);
    assert!(comms.iter().enumerate().all(|(r, c)| c.rank() == r && c.ranks() == n));
    group(|| {
        for (c, rank) in comms.iter().zip(&ranks) {
            let s = &rank.stream;
            // SAFETY: the buffers live on the rank's device until the stream is synchronised below.
            unsafe {
                c.all_gather(ptr(&rank.f32s, s), ptr(&rank.gathered, s), COUNT, ElementType::F32, raw(s))?;
            }
        }
        Ok(())
    })
    .unwrap();
    group(|| {
        for (c, rank) in comms.iter().zip(&ranks) {
            let s = &rank.stream;
            // SAFETY: as above; in place.
            unsafe {
                let f = ptr(&rank.f32s, s);
                c.all_reduce_sum(f, f, COUNT, ElementType::F32, raw(s))?;
                let h = ptr(&rank.bf16s, s);
                c.all_reduce_sum(h, h, COUNT, ElementType::Bf16, raw(s))?;
            }
        }
        Ok(())
    })
    .unwrap();
    let scale = (n * (n + 1) / 2) as f32;
    let want: Vec<f32> = values(0).iter().map(|v| v * scale).collect();
    for (r, (c, rank)) in comms.iter().zip(&ranks).enumerate() {
        rank.stream.synchronize().unwrap();
        c.async_error().unwrap();
        assert_eq!(rank.stream.clone_dtoh(&rank.f32s).unwrap(), want, "rank {r}: f32 sum");
        let halves: Vec<f32> = rank.stream.clone_dtoh(&rank.bf16s).unwrap().iter().map(|v| v.to_f32()).collect();
        assert_eq!(halves, want, "rank {r}: bf16 sum");
        let gathered = rank.stream.clone_dtoh(&rank.gathered).unwrap();
        for (from, part) in gathered.chunks(COUNT).enumerate() {
            assert_eq!(part, values(from).as_slice(), "rank {r}: rank {from}'s part of the gather");
        }
    }
}

/// A decode step's graph holds the rank's all-reduce: replaying it sums again (values double
/// per replay with one rank, grow by the rank count with n).
#[test]
fn an_all_reduce_captured_in_a_graph_replays() {
    let (comms, ranks) = ranks();
    let n = ranks.len() as f32;
    let graphs: Vec<_> = group(|| {
        Ok(comms
            .iter()
            .zip(&ranks)
            .map(|(c, rank)| {
                let s = &rank.stream;
                // The address first: taking it waits on the buffer's last write, which a capture
                // must not depend on (work queued before the capture began).
                let f = ptr(&rank.f32s, s);
                s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
                // SAFETY: as in the test above; captured, not run, until the graph is launched.
                unsafe { c.all_reduce_sum(f, f, COUNT, ElementType::F32, raw(s)).unwrap() };
                s.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph")
            })
            .collect())
    })
    .unwrap();
    for replay in 1..=3 {
        group(|| {
            for g in &graphs {
                g.launch().map_err(|e| crate::WorkerError::Engine(e.to_string()))?;
            }
            Ok(())
        })
        .unwrap();
        // After `replay` sums: rank r's start value summed over ranks, then times n each later time.
        let first: Vec<f32> = values(0).iter().map(|v| v * n * (n + 1.0) / 2.0).collect();
        let want: Vec<f32> = first.iter().map(|v| v * n.powi(replay - 1)).collect();
        for (r, rank) in ranks.iter().enumerate() {
            rank.stream.synchronize().unwrap();
            assert_eq!(rank.stream.clone_dtoh(&rank.f32s).unwrap(), want, "rank {r}, replay {replay}");
        }
    }
}

#[test]
fn an_aborted_communicator_refuses_further_collectives() {
    let (mut comms, ranks) = ranks();
    for c in comms.iter_mut() {
        c.abort();
    }
    let s = &ranks[0].stream;
    let f = ptr(&ranks[0].f32s, s);
    // SAFETY: refused before NCCL is called.
    let err = unsafe { comms[0].all_reduce_sum(f, f, COUNT, ElementType::F32, raw(s)) }.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
}
