use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::engine::EngineOptions;
use crate::sampling::{SamplingParams, StopParams};

fn tokenizer() -> Tokenizer {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/llama3.1-tokenizer");
    Tokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model.sh)"))
}

async fn start(max_num_seqs: usize, step_ms: u64) -> EngineHandle {
    let engine = SimulatedEngine { step: Duration::from_millis(step_ms), ..SimulatedEngine::default() };
    let opts = EngineOptions { max_num_seqs, max_model_len: Some(512), ..EngineOptions::default() };
    engine.start(&opts, tokenizer(), "sim").await.expect("starts").0
}

fn request(id: &str, max_tokens: usize) -> EngineRequest {
    let stop = StopParams { max_tokens, ..StopParams::default() };
    EngineRequest::new(id, vec![1, 2, 3, 4, 5], SamplingParams::default(), stop)
}

/// Reads a stream to its end: the deltas' texts and the final event.
async fn drain(mut stream: RequestStream) -> (Vec<ChoiceDelta>, EngineEvent) {
    let mut deltas = Vec::new();
    loop {
        match stream.recv().await.expect("an event") {
            EngineEvent::Delta(d) => deltas.push(d),
            other => return (deltas, other),
        }
    }
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

#[test]
fn stamps_read_back_what_was_stamped() {
    let at = UNIX_EPOCH + Duration::from_micros(1_733_563_000_123_456);
    let text = format!("{}{}", stamp(at), stamp(at + Duration::from_micros(7)));
    assert_eq!(stamps(&text).collect::<Vec<_>>(), [1_733_563_000_123_456, 1_733_563_000_123_463]);
    assert_eq!(stamps("no <t stamp> here <t12").count(), 0);
}

#[tokio::test]
async fn a_request_gets_max_tokens_stamped_tokens_then_its_usage() {
    let engine = start(8, 2).await;
    let before = now_micros();
    let (deltas, end) = drain(engine.generate(request("a", 6)).await.expect("queued")).await;
    let after = now_micros();
    assert_eq!(deltas.len(), 6);
    let times: Vec<u64> = deltas.iter().flat_map(|d| stamps(&d.text)).collect();
    assert_eq!(times.len(), 6, "one stamp per token: {deltas:?}");
    assert!(times.windows(2).all(|w| w[0] < w[1]) && times[0] >= before && times[5] <= after, "{times:?}");
    assert_eq!(deltas.iter().filter(|d| d.finish_reason.is_some()).count(), 1);
    assert_eq!(deltas[5].finish_reason, Some(FinishReason::Length));
    let EngineEvent::Finished { usage, timings } = end else { panic!("ended with {end:?}") };
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 6));
    assert!(timings.first_token.is_some() && timings.total >= Duration::from_millis(10));
    let stats = engine.stats().await.expect("stats");
    assert_eq!((stats.generation_tokens_total, stats.prompt_tokens_total), (6, 5));
    assert_eq!((stats.requests_finished_length, stats.running, stats.waiting), (1, 0, 0));
    assert_eq!(stats.histograms.e2e_latency.count(), 1);
}

#[tokio::test]
async fn requests_beyond_max_num_seqs_wait_and_their_load_is_reported() {
    let engine = start(1, 5).await;
    let first = engine.generate(request("first", 40)).await.expect("queued");
    let second = engine.generate(request("second", 2)).await.expect("queued");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let stats = engine.stats().await.expect("stats");
    assert_eq!((stats.running, stats.waiting), (1, 1));
    assert!(stats.kv_blocks_used >= 1 && stats.kv_blocks_total == SimulatedEngine::default().kv_blocks);
    // Dropping the running request's stream aborts it; the waiting one then runs to its end.
    drop(first);
    let (deltas, end) = drain(second).await;
    assert_eq!(deltas.len(), 2);
    assert!(matches!(end, EngineEvent::Finished { .. }), "{end:?}");
    let stats = engine.stats().await.expect("stats");
    assert_eq!((stats.requests_finished_abort, stats.requests_finished_length), (1, 1));
    assert_eq!((stats.running, stats.waiting, stats.kv_blocks_used), (0, 0, 0));
}

#[tokio::test]
async fn bad_requests_get_the_real_engines_errors_and_a_stop_ends_streams() {
    let engine = start(4, 50).await;
    let too_long = engine.generate(request("long", 600)).await.err().expect("refused");
    assert!(matches!(too_long, WorkerError::ContextTooLong { .. }), "{too_long}");
    let stream = engine.generate(request("cut", 100)).await.expect("queued");
    engine.stop();
    let (_, end) = drain(stream).await;
    assert!(matches!(end, EngineEvent::Failed(ref m) if m.contains("stopped")), "{end:?}");
}

#[tokio::test]
async fn a_continuation_goes_on_from_each_choices_output_and_leaves_finished_ones_alone() {
    let engine = start(8, 2).await;
    let mut req = request("moved", 5);
    req.n = 2;
    req.resumed = vec![
        crate::engine::request::ResumedChoice { index: 0, output: vec![11, 12, 13], finished: true },
        crate::engine::request::ResumedChoice { index: 1, output: vec![21, 22], finished: false },
    ];
    let (deltas, end) = drain(engine.generate(req).await.expect("queued")).await;
    assert!(deltas.iter().all(|d| d.index == 1), "the finished choice gets nothing more: {deltas:?}");
    assert_eq!(deltas.len(), 3, "choice 1 goes from 2 tokens to max_tokens 5");
    assert_eq!(deltas.iter().filter(|d| d.finish_reason == Some(FinishReason::Length)).count(), 1);
    let EngineEvent::Finished { usage, .. } = end else { panic!("ended with {end:?}") };
    assert_eq!(usage.completion_tokens, 3 + 5);
}
