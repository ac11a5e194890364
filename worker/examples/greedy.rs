//! Development aid: greedy decoding of one chat prompt straight through the model (no engine),
//! printing the text and the decode speed. `cargo run --release -p lumen-worker --example greedy -- MODEL.gguf "prompt"`

use std::time::Instant;

use lumen_worker::model::gguf::GgufFile;
use lumen_worker::model::llama_cpu::{CpuLlama, CpuModelOptions};
use lumen_worker::model::{ForwardBatch, Model};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let prompt = args.get(2).map(String::as_str).unwrap_or("What is the capital of France?");
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let threads: usize = std::env::var("THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let gguf = GgufFile::open(std::path::Path::new(path))?;
    let config = gguf.llama_config()?;
    let tok = Tokenizer::from_gguf(&gguf.content)?;
    let messages = vec![serde_json::from_value::<ChatMessage>(serde_json::json!({"role": "user", "content": prompt}))?];
    let opts = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let ids = tok.encode_chat(&messages, &opts)?;
    let bs = 16;
    let format = std::env::var("FORMAT").unwrap_or_else(|_| "auto".into()).parse()?;
    let mut model = CpuLlama::load(
        config.clone(),
        &gguf,
        &CpuModelOptions { threads, weight_format: format, block_size: bs, num_blocks: 64, max_model_len: 1024 },
    )?;
    let table: Vec<u32> = (0..64).collect();
    let mut tokens = ids.clone();
    let t0 = Instant::now();
    let mut batch = ForwardBatch::default();
    batch.push_seq(&ids, 0, &table, bs, true);
    let first = model.forward(&batch)?.to_vec();
    let mut idx: Vec<usize> = (0..first.len()).collect();
    idx.sort_by(|&a, &b| first[b].total_cmp(&first[a]));
    eprintln!("top5 after prompt: {:?}", idx[..5].iter().map(|&i| (i, first[i])).collect::<Vec<_>>());
    let mut next = argmax(&first);
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    for _ in 0..steps {
        tokens.push(next);
        let mut b = ForwardBatch::default();
        b.push_seq(&[next], tokens.len() - 1, &table, bs, true);
        next = argmax(model.forward(&b)?);
    }
    let decode = t1.elapsed();
    println!("{}", tok.decode(&tokens[ids.len()..], false)?);
    println!("ids: {:?}", &tokens[ids.len()..]);
    println!(
        "{}: prompt {} tokens in {:.1} ms ({:.0} tok/s); decode {steps} tokens at {:.1} tok/s",
        model.describe(),
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        ids.len() as f64 / prefill.as_secs_f64(),
        steps as f64 / decode.as_secs_f64()
    );
    Ok(())
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
