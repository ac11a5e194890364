//! The GPU ranks' collectives on this machine's GPUs: three ranks sharing GPU 0 (staged through
//! the host, threads as in a tensor-parallel step) and one rank per GPU over NCCL (one rank on a
//! one-GPU machine). Needs a GPU (and, for NCCL, libnccl: see the `tp` step of
//! `scripts/gpu/run-on-device.sh`).

use candle_core::{DType, Device, Tensor};

use super::RankComm;

const COUNT: usize = 4099;

/// Rank r's values: small integers, exact in bf16 and in their sums.
fn values(rank: usize) -> Vec<f32> {
    (0..COUNT).map(|i| ((i * 7 + rank * 3) % 11) as f32 - 5.0).collect()
}

fn tensor(values: &[f32], dtype: DType, device: &Device) -> Tensor {
    Tensor::from_slice(values, values.len(), device).unwrap().to_dtype(dtype).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// Each rank on a thread of its own, with its own stream on `devices[rank]`: sums in both types,
/// then a gather; returns what every rank saw.
fn run(comms: Vec<RankComm>, devices: &[usize]) -> Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(devices)
            .map(|(comm, &d)| {
                s.spawn(move || {
                    let device = Device::new_cuda_with_stream(d).unwrap();
                    let mine = values(comm.rank());
                    let (f, h) = (tensor(&mine, DType::F32, &device), tensor(&mine, DType::BF16, &device));
                    comm.all_reduce_sum(&f).unwrap();
                    comm.all_reduce_sum(&h).unwrap();
                    let out = Tensor::zeros(COUNT * comm.ranks(), DType::F32, &device).unwrap();
                    comm.all_gather(&tensor(&mine, DType::F32, &device), &out).unwrap();
                    (host(&f), host(&h), host(&out))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(seen: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>) {
    let n = seen.len();
    let sum: Vec<f32> = (0..COUNT).map(|i| (0..n).map(|r| values(r)[i]).sum()).collect();
    let gathered: Vec<f32> = (0..n).flat_map(values).collect();
    for (rank, (f, h, g)) in seen.into_iter().enumerate() {
        assert_eq!(f, sum, "rank {rank}: f32 sum");
        assert_eq!(h, sum, "rank {rank}: bf16 sum");
        assert_eq!(g, gathered, "rank {rank}: gather");
    }
}

#[test]
fn ranks_sharing_one_gpu_sum_and_gather_through_the_host() {
    let devices = [0, 0, 0];
    let comms = RankComm::group(&devices).unwrap();
    assert!(comms.iter().all(|c| !c.capturable() && c.ranks() == 3));
    check(run(comms, &devices));
}

#[test]
fn ranks_on_their_own_gpus_sum_and_gather_over_nccl() {
    let gpus = cudarc::driver::CudaContext::device_count().unwrap() as usize;
    let devices: Vec<usize> = (0..gpus).collect();
    let comms = RankComm::group(&devices).unwrap();
    assert!(comms.iter().all(|c| c.capturable() && c.ranks() == gpus));
    check(run(comms, &devices));
}

#[test]
fn a_rank_that_aborts_releases_the_others() {
    let mut comms = RankComm::group(&[0, 0]).unwrap();
    let waiting = comms.pop().unwrap();
    let failing = comms.pop().unwrap().handle();
    let outcome = std::thread::scope(|s| {
        let waiter = s.spawn(move || {
            let device = Device::new_cuda_with_stream(0).unwrap();
            waiting.all_reduce_sum(&tensor(&values(1), DType::F32, &device))
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        failing.abort();
        waiter.join().unwrap()
    });
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("another rank failed"), "{err}");
}

#[test]
fn ranks_split_over_some_shared_gpus_are_refused() {
    let err = RankComm::group(&[0, 0, 1]).err().expect("refused").to_string();
    assert!(err.contains("tensor_parallel_size"), "{err}");
}
