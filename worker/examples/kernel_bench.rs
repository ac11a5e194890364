//! Development aid: speed of the CPU matmul on SmolLM2's real matrices, as effective weight
//! bandwidth (GB/s) and time per call, for several batch sizes and thread counts.
//! `cargo run --release -p lumen-worker --example kernel_bench [MODEL.gguf]`

use std::time::Instant;

use lumen_worker::kernels::cpu::isa::Isa;
use lumen_worker::kernels::cpu::matmul::{Epilogue, Input, matmul};
use lumen_worker::kernels::cpu::pool::ThreadPool;
use lumen_worker::kernels::cpu::quant::QuantizedRows;
use lumen_worker::model::TensorSource;
use lumen_worker::model::cpu_weights::{CpuWeightFormat, to_matrix};
use lumen_worker::model::gguf::GgufFile;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let gguf = GgufFile::open(std::path::Path::new(&path))?;
    let isa = Isa::detect();
    println!("isa {}", isa.name());
    println!("{:<40} {:>4} {:>3} {:>10} {:>8}", "matrix", "M", "thr", "us/call", "GB/s");
    let filter = std::env::var("KB_FILTER").unwrap_or_default();
    for name in
        ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"]
    {
        if !name.contains(&filter) {
            continue;
        }
        let w = to_matrix(&gguf.tensor(name)?, CpuWeightFormat::Auto)?;
        let threads_list: Vec<usize> = std::env::var("KB_THREADS")
            .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or(vec![1, 2]);
        let m_list: Vec<usize> = std::env::var("KB_M")
            .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or(vec![1, 4, 16]);
        for &threads in &threads_list {
            let pool = ThreadPool::new(threads);
            for &m in &m_list {
                let x: Vec<f32> = (0..m * w.cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
                let xq = QuantizedRows::from_rows(isa, &x, w.cols);
                let mut out = vec![0f32; m * w.rows];
                let reps = (2_000_000_000 / (w.size_bytes() * m.max(4))).clamp(3, 2000);
                matmul(&pool, isa, &w, Input::Q8(&xq), m, &mut out, Epilogue::Store);
                let t = Instant::now();
                for _ in 0..reps {
                    matmul(&pool, isa, &w, Input::Q8(&xq), m, &mut out, Epilogue::Store);
                }
                let per = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{:<40} {:>4} {:>3} {:>10.1} {:>8.2}",
                    format!("{name} {}", w.format_name()),
                    m,
                    threads,
                    per * 1e6,
                    w.size_bytes() as f64 / per / 1e9
                );
            }
        }
    }
    Ok(())
}
