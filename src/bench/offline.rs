//! `lumen bench offline`: requests of fixed input/output lengths pushed through the engine
//! in-process at a fixed concurrency (no HTTP), timing every token as the engine emits it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lumen_worker::engine::{EngineEvent, EngineHandle, EngineOptions, EngineRequest, build_engine};
use lumen_worker::sampling::{SamplingParams, StopParams};
use tokio::sync::Semaphore;

use super::report::{Report, RequestRecord};

/// Options of `lumen bench offline`.
#[derive(Clone, Debug, clap::Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub engine: EngineOptions,
    /// Prompt tokens per request (random token ids, different for every request).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Output tokens per request (generated with ignore_eos).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests in the run.
    #[arg(long, default_value_t = 16)]
    pub num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub async fn run(args: OfflineArgs) -> anyhow::Result<Report> {
    let opts = args.engine.clone();
    let core = tokio::task::spawn_blocking(move || build_engine(&opts)).await??;
    let (engine, _join) = EngineHandle::start(core, "bench").await?;
    let vocab = engine.limits().vocab_size as u64;
    let prompts: Vec<Vec<u32>> =
        (0..args.num_prompts).map(|i| random_prompt(args.seed, i as u64, args.input_len, vocab)).collect();
    // Warm up the kernels and threads with one short request.
    let warm = request("warmup".into(), prompts.first().cloned().unwrap_or_else(|| vec![1]), 4);
    drive(&engine, warm).await?;

    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let engine = engine.clone();
        let req = request(format!("bench-{i}"), prompt, args.output_len);
        tasks.push(tokio::spawn(async move {
            let record = drive(&engine, req).await;
            drop(permit);
            record
        }));
    }
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await??);
    }
    let duration = started.elapsed();
    engine.stop();
    let name = format!("lumen {}", engine.description());
    Ok(Report::new(name, args.concurrency, args.input_len, args.output_len, duration, &records))
}

fn request(id: String, prompt: Vec<u32>, output_len: usize) -> EngineRequest {
    let stop = StopParams { max_tokens: output_len, ignore_eos: true, ..Default::default() };
    EngineRequest::new(id, prompt, SamplingParams::greedy(), stop)
}

/// Runs one request to the end, timing its tokens.
async fn drive(engine: &EngineHandle, req: EngineRequest) -> anyhow::Result<RequestRecord> {
    let arrival = Instant::now();
    let prompt_tokens = req.prompt_token_ids.len();
    let mut stream = engine.generate(req).await.context("submitting a benchmark request")?;
    let mut record = RequestRecord { prompt_tokens, ..Default::default() };
    let mut last: Option<Instant> = None;
    while let Some(event) = stream.recv().await {
        match event {
            EngineEvent::Delta(d) => {
                let now = Instant::now();
                for _ in &d.token_ids {
                    match last {
                        None => record.ttft = now - arrival,
                        Some(prev) => record.itl.push(now - prev),
                    }
                    last = Some(now);
                    record.output_tokens += 1;
                }
            }
            EngineEvent::Finished { .. } => break,
            EngineEvent::Failed(e) => anyhow::bail!("benchmark request failed: {e}"),
        }
    }
    record.e2e = arrival.elapsed();
    if record.ttft == Duration::ZERO {
        record.ttft = record.e2e;
    }
    Ok(record)
}

/// Deterministic random token ids in `[100, vocab)`, avoiding the low ids where special tokens live.
fn random_prompt(seed: u64, index: u64, len: usize, vocab: u64) -> Vec<u32> {
    let mut s = seed ^ (index.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (100 + s % vocab.saturating_sub(100).max(1)) as u32
        })
        .collect()
}
