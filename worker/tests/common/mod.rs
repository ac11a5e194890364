//! Shared helpers for the engine tests on the real SmolLM2-135M-Instruct GGUF
//! (fetched into `models/` by `scripts/fetch-model.sh`).

#![allow(dead_code)]

pub mod hf;

use std::collections::HashMap;
use std::path::PathBuf;

use lumen_worker::TokenId;
use lumen_worker::engine::{
    EngineCore, EngineEvent, EngineOptions, EngineRequest, EngineStats, FinishReason, TokenLogprob, Usage, build_engine,
};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-model.sh first", p.display());
    p
}

/// Engine options for tests: the SmolLM2 GGUF, 2 threads, a modest cache.
pub fn options() -> EngineOptions {
    EngineOptions {
        model: model_path().display().to_string(),
        threads: Some(2),
        max_model_len: Some(1024),
        kv_cache_memory: "64MiB".parse().unwrap(),
        ..EngineOptions::default()
    }
}

/// [`options`] with a cache too small for the sixteen [`PROMPTS`] at once (and no prefix
/// caching): sequences are preempted and recomputed.
pub fn preempting_options() -> EngineOptions {
    EngineOptions {
        kv_cache_memory: "12MiB".parse().unwrap(),
        max_model_len: Some(256),
        enable_prefix_caching: false,
        ..options()
    }
}

pub fn engine(opts: &EngineOptions) -> EngineCore {
    build_engine(opts).expect("building the engine")
}

pub fn chat(core: &EngineCore, text: &str) -> Vec<TokenId> {
    let messages = vec![ChatMessage::new("user", text)];
    core.tokenizer()
        .encode_chat(&messages, &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() })
        .unwrap()
}

/// Everything one request produced.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Per choice: tokens, text, finish reason, logprobs.
    pub tokens: HashMap<usize, Vec<TokenId>>,
    pub text: HashMap<usize, String>,
    pub finish: HashMap<usize, FinishReason>,
    pub logprobs: HashMap<usize, Vec<TokenLogprob>>,
    /// The `PromptLogprobs` event's entries, and how many such events came.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub prompt_logprob_events: usize,
    pub usage: Option<Usage>,
    pub failed: Option<String>,
    /// The `Embedding` events' vectors (a pooling request sends one).
    pub embeddings: Vec<Vec<f32>>,
}

/// Submits requests and steps the engine until all are done.
pub fn run(core: &mut EngineCore, requests: Vec<EngineRequest>) -> Vec<Outcome> {
    let mut rxs: Vec<UnboundedReceiver<EngineEvent>> = Vec::new();
    for req in requests {
        let (tx, rx) = unbounded_channel();
        core.add_request(req, tx);
        rxs.push(rx);
    }
    while core.has_work() {
        core.step().expect("engine step");
    }
    rxs.into_iter().map(collect).collect()
}

pub fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> Outcome {
    let mut o = Outcome::default();
    while let Ok(event) = rx.try_recv() {
        match event {
            EngineEvent::Delta(d) => {
                o.tokens.entry(d.index).or_default().extend(&d.token_ids);
                o.text.entry(d.index).or_default().push_str(&d.text);
                o.logprobs.entry(d.index).or_default().extend(d.logprobs);
                if let Some(f) = d.finish_reason {
                    o.finish.insert(d.index, f);
                }
            }
            EngineEvent::PromptLogprobs(p) => {
                assert!(o.tokens.is_empty(), "prompt logprobs come before the first delta");
                o.prompt_logprobs = Some(p.tokens);
                o.prompt_logprob_events += 1;
            }
            EngineEvent::Embedding(v) => {
                assert!(o.usage.is_none(), "the embedding comes before `Finished`");
                o.embeddings.push(v);
            }
            EngineEvent::Finished { usage, .. } => o.usage = Some(usage),
            EngineEvent::Failed(e) => o.failed = Some(e),
        }
    }
    o
}

pub fn stats(core: &EngineCore) -> EngineStats {
    core.stats()
}

/// Sixteen chat prompts of mixed lengths.
pub const PROMPTS: [&str; 16] = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci and describe it briefly, mentioning where it is displayed today.",
    "Give me a Python function that reverses a string.",
    "Why do cats purr?",
    "Summarise the plot of Romeo and Juliet in two sentences, including how the story ends for both of them.",
    "What is the boiling point of water in Fahrenheit?",
    "Tell me a joke about computers.",
    "How many legs does a spider have?",
    "Describe a sunrise over the mountains, the colours of the sky, the sounds of the morning and the feeling of the cold air.",
    "Hello, who are you?",
];
