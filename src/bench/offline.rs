//! `lumen bench offline`: requests of fixed input/output lengths pushed through the engine
//! in-process at a fixed concurrency (no HTTP), timing every token as the engine emits it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lumen_worker::engine::{EngineEvent, EngineHandle, EngineOptions, EngineRequest, build_engine};
use lumen_worker::grammar::{CompiledGrammar, Constraint, ConstraintKind};
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use tokio::sync::Semaphore;

use super::datasets::{Dataset, text_prompts};
use super::report::{Report, RequestRecord};
use super::structured;
use super::workload::{LoadArgs, token_prompts};

/// Options of `lumen bench offline`.
#[derive(Clone, Debug, clap::Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub engine: EngineOptions,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub async fn run(args: OfflineArgs) -> anyhow::Result<Report> {
    structured::check_fraction(args.load.structured_fraction)?;
    let opts = args.engine.clone();
    let core = tokio::task::spawn_blocking(move || build_engine(&opts)).await??;
    let load = &args.load;
    let prompts = match load.dataset_name {
        Dataset::Random => {
            // Token ids from 100 up: the low ids are where special tokens live.
            let vocab = u32::try_from(core.limits().vocab_size).unwrap_or(u32::MAX).max(101);
            token_prompts(load.num_prompts, load.input_len, 100..vocab, load.seed)
        }
        dataset => text_prompts(dataset, load.num_prompts, load.seed)
            .iter()
            .map(|text| {
                let messages = [ChatMessage::new("user", text)];
                let options = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
                core.tokenizer().encode_chat(&messages, &options).context("applying the chat template")
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let (engine, _join) = EngineHandle::start(core, "bench").await?;
    // Warm up the kernels and threads with one short request.
    let warm = request("warmup".into(), prompts.first().cloned().unwrap_or_else(|| vec![1]), 4);
    drive(&engine, warm).await?;

    let constraint = schema_constraint(&engine, load.structured_fraction).await?;
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let engine = engine.clone();
        let mut req = request(format!("bench-{i}"), prompt, load.output_len);
        if structured::is_constrained(i, load.structured_fraction) {
            req.constraint = constraint.clone();
        }
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
    let stats = engine.stats().await?;
    let (masks, spec) = (stats.histograms.structured_output_mask, stats.spec_decode);
    engine.stop();
    let name = format!("lumen {}", engine.description());
    let mut report = Report::new(name, args.concurrency, load.input_len, load.output_len, duration, &records);
    report.structured_fraction = load.structured_fraction;
    let buckets = structured::Buckets {
        bounds: masks.bounds().to_vec(),
        cumulative: masks.cumulative_counts(),
        count: masks.count(),
    };
    report.mask_ms = structured::mask_ms(&buckets);
    report.spec_decode = (spec.drafts > 0).then_some((spec.drafts, spec.draft_tokens, spec.accepted_tokens));
    Ok(report)
}

/// The benchmark schema compiled for the engine (once: the cache serves every request), when
/// some requests use it.
async fn schema_constraint(engine: &EngineHandle, fraction: f64) -> anyhow::Result<Option<Arc<CompiledGrammar>>> {
    if fraction <= 0.0 {
        return Ok(None);
    }
    let grammars = Arc::clone(engine.grammars());
    let constraint = Constraint::new(ConstraintKind::JsonSchema(structured::schema().to_string()), "bench");
    let compiled = tokio::task::spawn_blocking(move || grammars.compile(&constraint)).await?;
    Ok(Some(compiled.context("compiling the benchmark schema")?))
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
            EngineEvent::PromptLogprobs(_) | EngineEvent::Embedding(_) => {}
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
