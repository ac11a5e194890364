//! The worker's gRPC service end to end: a real tonic server on 127.0.0.1:0 over a real
//! `WorkerNode`, a real tonic client, and the SmolLM2-135M-Instruct GGUF.

mod common;

use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use lumen_proto::v1::worker_client::WorkerClient;
use lumen_worker::service::{PARAM_METADATA_KEY, WorkerNode, detect_resources, serve_worker};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

const REPLICA: &str = "smol-1";

struct Worker {
    client: WorkerClient<Channel>,
    node: WorkerNode,
    _shutdown: oneshot::Sender<()>,
}

/// The engine options of the tests as the head sends them, with a field the worker does not know.
fn options_json() -> String {
    let opts = common::options();
    serde_json::json!({
        "model": opts.model,
        "served_model_name": "smol",
        "threads": 2,
        "max_model_len": 1024,
        "kv_cache_memory": "64MiB",
        "reasoning_parser": "deepseek_r1",
    })
    .to_string()
}

async fn start_worker() -> Worker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = WorkerNode::new("test-worker", detect_resources());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(serve_worker(listener, node.clone(), async move {
        let _ = rx.await;
    }));
    let client = WorkerClient::connect(url).await.unwrap();
    Worker { client, node, _shutdown: tx }
}

async fn start_worker_with_replica() -> Worker {
    let mut w = start_worker().await;
    let request = pb::StartReplicaRequest { replica_id: REPLICA.into(), engine_options_json: options_json() };
    w.client.start_replica(request).await.unwrap();
    w
}

fn chat_prompt(text: &str) -> pb::generate_request::Prompt {
    let messages = serde_json::json!([{"role": "user", "content": text}]).to_string();
    pb::generate_request::Prompt::Chat(pb::ChatPrompt {
        messages_json: messages,
        add_generation_prompt: true,
        template_kwargs_json: String::new(),
    })
}

fn greedy() -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, ..Default::default() }
}

fn request(id: &str, prompt: pb::generate_request::Prompt, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        replica_id: REPLICA.into(),
        request_id: id.into(),
        prompt: Some(prompt),
        sampling: Some(greedy()),
        stop: Some(pb::StopParams { max_tokens, ignore_eos: true, ..Default::default() }),
        n: 1,
        skip_special_tokens: false,
        return_prompt: false,
        structured_output: None,
        prompt_logprobs: None,
        pooling: None,
        priority: 0,
        cache_salt: None,
        resume: None,
        return_prompt_token_ids: false,
        ..Default::default()
    }
}

async fn next_event(stream: &mut Streaming<pb::GenerateEvent>) -> pb::generate_event::Event {
    let event = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.expect("an event in time");
    event.expect("no error").expect("not the end").event.expect("an event")
}

fn param(status: &Status) -> Option<&str> {
    status.metadata().get(PARAM_METADATA_KEY).and_then(|v| v.to_str().ok())
}

async fn replica_stats(client: &mut WorkerClient<Channel>) -> pb::ReplicaStats {
    let stats = client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    stats.replicas.into_iter().find(|r| r.replica_id == REPLICA).expect("the replica's stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_replica_then_chat_generate_streams_started_deltas_and_finished() {
    let mut w = start_worker().await;
    let start = pb::StartReplicaRequest { replica_id: REPLICA.into(), engine_options_json: options_json() };
    let info = w.client.start_replica(start.clone()).await.unwrap().into_inner();
    assert_eq!(info.replica_id, REPLICA);
    assert_eq!(info.model_name, "smol");
    assert_eq!(info.max_model_len, 1024);
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.state, pb::ReplicaState::Running as i32);
    assert!(!info.description.is_empty());
    assert_eq!(info.engine_options_json, start.engine_options_json, "echoed for a restarted head's version check");
    let again = w.client.start_replica(start).await.unwrap().into_inner();
    assert_eq!(again, info, "starting an existing replica id is idempotent");

    let mut req = request("chat-1", chat_prompt("What is the capital of France?"), 24);
    req.return_prompt = true;
    let mut stream = w.client.generate(req).await.unwrap().into_inner();
    let pb::generate_event::Event::Started(started) = next_event(&mut stream).await else {
        panic!("the first event must be `started`")
    };
    let tokenizer = w.node.replica(REPLICA).unwrap().handle().tokenizer().clone();
    let messages = vec![ChatMessage::new("user", "What is the capital of France?")];
    let expected_prompt = tokenizer
        .encode_chat(&messages, &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() })
        .unwrap();
    assert_eq!(started.prompt_token_ids, expected_prompt);
    assert_eq!(started.prompt_tokens as usize, expected_prompt.len());
    assert!(started.prompt_text.contains("What is the capital of France?"), "{}", started.prompt_text);

    let (mut text, mut ids, mut last_finish) = (String::new(), Vec::new(), 0);
    let finished = loop {
        match next_event(&mut stream).await {
            pb::generate_event::Event::Delta(d) => {
                assert_eq!(d.index, 0);
                text.push_str(&d.text);
                ids.extend(d.token_ids);
                last_finish = d.finish_reason;
            }
            pb::generate_event::Event::Finished(f) => break f,
            pb::generate_event::Event::Started(_) => panic!("a second `started`"),
            pb::generate_event::Event::PromptLogprobs(_) => panic!("prompt logprobs were not asked for"),
            pb::generate_event::Event::Embedding(_) => panic!("not an embedding request"),
        }
    };
    assert!(stream.message().await.unwrap().is_none(), "nothing after `finished`");
    assert_eq!(ids.len(), 24);
    assert_eq!(last_finish, pb::FinishReason::Length as i32);
    let detok = pb::DetokenizeRequest { replica_id: REPLICA.into(), token_ids: ids.clone() };
    let decoded = w.client.detokenize(detok).await.unwrap().into_inner().text;
    assert_eq!(text, decoded, "the deltas' text is the detokenized token ids");
    let usage = finished.usage.expect("usage");
    assert_eq!(usage.prompt_tokens, started.prompt_tokens);
    assert_eq!(usage.completion_tokens as usize, ids.len());
    let timings = finished.timings.expect("timings");
    assert!(timings.first_token_us > 0 && timings.total_us >= timings.first_token_us, "{timings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_round_trips_and_chat_tokenization_matches_encode_chat() {
    let mut w = start_worker_with_replica().await;
    let text = "Hello world, how are you today?";
    let reply = w
        .client
        .tokenize(pb::TokenizeRequest {
            replica_id: REPLICA.into(),
            input: Some(pb::tokenize_request::Input::Text(pb::TextPrompt {
                text: text.into(),
                add_special_tokens: false,
            })),
            return_token_strs: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.count as usize, reply.token_ids.len());
    assert!(reply.count > 3);
    assert_eq!(reply.max_model_len, 1024);
    assert_eq!(reply.token_strs.len(), reply.token_ids.len());
    // Byte-level BPE spells a leading space `Ġ`.
    assert_eq!(reply.token_strs.concat().replace('Ġ', " "), text);
    let detok = pb::DetokenizeRequest { replica_id: REPLICA.into(), token_ids: reply.token_ids.clone() };
    assert_eq!(w.client.detokenize(detok).await.unwrap().into_inner().text, text);

    let pb::generate_request::Prompt::Chat(chat) = chat_prompt("Name three colours.") else { unreachable!() };
    let chat_reply = w
        .client
        .tokenize(pb::TokenizeRequest {
            replica_id: REPLICA.into(),
            input: Some(pb::tokenize_request::Input::Chat(chat)),
            return_token_strs: false,
        })
        .await
        .unwrap()
        .into_inner();
    let tokenizer = w.node.replica(REPLICA).unwrap().handle().tokenizer().clone();
    let expected = tokenizer
        .encode_chat(
            &[ChatMessage::new("user", "Name three colours.")],
            &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() },
        )
        .unwrap();
    assert_eq!(chat_reply.token_ids, expected);
    assert!(chat_reply.token_strs.is_empty());

    let bad = pb::DetokenizeRequest { replica_id: REPLICA.into(), token_ids: vec![1, 999_999] };
    let status = w.client.detokenize(bad).await.unwrap_err();
    assert_eq!((status.code(), param(&status)), (Code::InvalidArgument, Some("tokens")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_invalid_argument_naming_the_parameter() {
    let mut w = start_worker_with_replica().await;
    let base = request("bad", chat_prompt("Hi"), 8);
    let with_sampling = |s: pb::SamplingParams| pb::GenerateRequest { sampling: Some(s), ..base.clone() };
    let cases = vec![
        (with_sampling(pb::SamplingParams { temperature: -1.0, ..greedy() }), "temperature"),
        (with_sampling(pb::SamplingParams { top_p: 1.5, ..greedy() }), "top_p"),
        (with_sampling(pb::SamplingParams { repetition_penalty: 0.0, ..greedy() }), "repetition_penalty"),
        (with_sampling(pb::SamplingParams { logprobs: Some(50), ..greedy() }), "logprobs"),
        (
            pb::GenerateRequest {
                stop: Some(pb::StopParams { max_tokens: 5000, ..Default::default() }),
                ..base.clone()
            },
            "max_tokens",
        ),
        (pb::GenerateRequest { n: 99, ..base.clone() }, "n"),
        (
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                    messages_json: "not json".into(),
                    ..Default::default()
                })),
                ..base.clone()
            },
            "messages",
        ),
        (pb::GenerateRequest { prompt: None, ..base.clone() }, "prompt"),
    ];
    for (req, want) in cases {
        let status = w.client.generate(req).await.expect_err(want);
        assert_eq!(status.code(), Code::InvalidArgument, "{want}: {}", status.message());
        assert_eq!(param(&status), Some(want), "{}", status.message());
    }

    let long = pb::generate_request::Prompt::Tokens(pb::TokenPrompt { token_ids: vec![42; 1100] });
    let status = w.client.generate(request("long", long, 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(param(&status), Some("prompt"));
    assert!(
        status.message().contains("1100") && status.message().contains("1024"),
        "the message states both numbers: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_replicas_are_not_found_and_failed_loads_say_why() {
    let mut w = start_worker().await;
    let status = w.client.generate(request("x", chat_prompt("Hi"), 4)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    let status = w.client.abort(pb::AbortRequest { replica_id: "nope".into(), request_id: "x".into() }).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
    let detok = pb::DetokenizeRequest { replica_id: "nope".into(), token_ids: vec![1] };
    assert_eq!(w.client.detokenize(detok).await.unwrap_err().code(), Code::NotFound);
    let stop = pb::StopReplicaRequest { replica_id: "nope".into(), drain_timeout_ms: 0 };
    w.client.stop_replica(stop).await.expect("stopping an unknown replica is a no-op");

    let missing = pb::StartReplicaRequest {
        replica_id: "broken".into(),
        engine_options_json: r#"{"model": "/nonexistent/model.gguf"}"#.into(),
    };
    let status = w.client.start_replica(missing).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("/nonexistent/model.gguf"), "{}", status.message());
    let bad_json = pb::StartReplicaRequest { replica_id: "broken".into(), engine_options_json: "{".into() };
    let status = w.client.start_replica(bad_json).await.unwrap_err();
    assert_eq!((status.code(), param(&status)), (Code::InvalidArgument, Some("engine_options_json")));
    let stats = w.client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.worker_id, "test-worker");
    assert!(stats.replicas.is_empty(), "a failed load leaves nothing behind: {:?}", stats.replicas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_generate_stream_aborts_the_request_at_once() {
    let mut w = start_worker_with_replica().await;
    let mut stream =
        w.client.generate(request("long-run", chat_prompt("Tell me a long story."), 900)).await.unwrap().into_inner();
    assert!(matches!(next_event(&mut stream).await, pb::generate_event::Event::Started(_)));
    for _ in 0..2 {
        assert!(matches!(next_event(&mut stream).await, pb::generate_event::Event::Delta(_)));
    }
    let busy = replica_stats(&mut w.client).await;
    assert_eq!(busy.running, 1);
    assert!(busy.kv_blocks_used > 0);

    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let s = replica_stats(&mut w.client).await;
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 {
            assert_eq!(s.requests_finished_abort, 1);
            assert!(s.generation_tokens_total < 900);
            break;
        }
        assert!(Instant::now() < deadline, "still busy a second after the client went away: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_replica_drains_running_requests_then_removes_the_replica() {
    let mut w = start_worker_with_replica().await;
    let mut stream =
        w.client.generate(request("draining", chat_prompt("Count to ten."), 12)).await.unwrap().into_inner();
    assert!(matches!(next_event(&mut stream).await, pb::generate_event::Event::Started(_)));

    let mut stopper = w.client.clone();
    let stop = tokio::spawn(async move {
        stopper.stop_replica(pb::StopReplicaRequest { replica_id: REPLICA.into(), drain_timeout_ms: 30_000 }).await
    });
    let mut tokens = 0;
    let last_finish = loop {
        match next_event(&mut stream).await {
            pb::generate_event::Event::Delta(d) => {
                tokens += d.token_ids.len();
                if d.finish_reason != 0 {
                    break d.finish_reason;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(last_finish, pb::FinishReason::Length as i32, "the drain let the request finish");
    assert_eq!(tokens, 12);
    stop.await.unwrap().expect("stop succeeds");

    let status = w.client.generate(request("after", chat_prompt("Hi"), 4)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let stats = w.client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.replicas.is_empty());
    assert!(w.node.replicas().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_health_reports_a_working_engine_healthy_while_idle_and_while_generating() {
    let mut w = start_worker_with_replica().await;
    let probe = |stall_timeout_ms| pb::CheckHealthRequest { replica_id: REPLICA.into(), stall_timeout_ms };
    let idle = w.client.check_health(probe(5_000)).await.unwrap().into_inner();
    assert!(idle.healthy, "{}", idle.message);
    assert_eq!((idle.running, idle.waiting, idle.stalled_for_ms), (0, 0, 0));

    let mut stream =
        w.client.generate(request("probed", chat_prompt("Tell me a long story."), 200)).await.unwrap().into_inner();
    assert!(matches!(next_event(&mut stream).await, pb::generate_event::Event::Started(_)));
    assert!(matches!(next_event(&mut stream).await, pb::generate_event::Event::Delta(_)));
    let first = w.client.check_health(probe(5_000)).await.unwrap().into_inner();
    assert!(first.healthy, "{}", first.message);
    // The delta leaves the engine during its step; the snapshot published after that step may
    // not be taken yet, so the request may still show as waiting (the pre-step snapshot).
    assert_eq!(first.running + first.waiting, 1, "the request is in the engine: {first:?}");
    for _ in 0..4 {
        next_event(&mut stream).await;
    }
    let later = w.client.check_health(probe(5_000)).await.unwrap().into_inner();
    assert!(later.healthy, "{}", later.message);
    assert!(later.steps_total > first.steps_total, "the engine stepped: {first:?} then {later:?}");
    drop(stream);

    let unknown = w.client.check_health(pb::CheckHealthRequest { replica_id: "nope".into(), stall_timeout_ms: 0 });
    assert_eq!(unknown.await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooling_replica_answers_embedding_requests_only_and_a_generating_one_refuses_them() {
    let mut w = start_worker_with_replica().await;
    let mut options: serde_json::Value = serde_json::from_str(&options_json()).unwrap();
    options["runner"] = "pooling".into();
    let start = pb::StartReplicaRequest { replica_id: "smol-e".into(), engine_options_json: options.to_string() };
    let info = w.client.start_replica(start).await.unwrap().into_inner();
    assert_eq!(info.runner, "pooling");
    let embed = |replica: &str, truncate: Option<u32>| pb::GenerateRequest {
        replica_id: replica.into(),
        request_id: format!("e-{replica}-{truncate:?}"),
        prompt: Some(pb::generate_request::Prompt::Text(pb::TextPrompt {
            text: "The cat sat on the mat, and then it slept.".into(),
            add_special_tokens: true,
        })),
        pooling: Some(pb::PoolingRequest { normalize: None, truncate_prompt_tokens: truncate }),
        priority: 0,
        cache_salt: None,
        ..Default::default()
    };

    // Started, one Embedding (a unit vector of hidden_size values), Finished, and nothing more.
    for (truncate, tokens) in [(None, None), (Some(4), Some(4))] {
        let mut stream = w.client.generate(embed("smol-e", truncate)).await.unwrap().into_inner();
        let pb::generate_event::Event::Started(started) = next_event(&mut stream).await else {
            panic!("started first")
        };
        if let Some(tokens) = tokens {
            assert_eq!(started.prompt_tokens, tokens, "truncated to the last tokens");
        }
        let pb::generate_event::Event::Embedding(e) = next_event(&mut stream).await else { panic!("an embedding") };
        assert_eq!(e.values.len(), 576);
        let norm: f32 = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
        let pb::generate_event::Event::Finished(f) = next_event(&mut stream).await else { panic!("finished") };
        let usage = f.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (started.prompt_tokens, 0));
        assert!(stream.message().await.unwrap().is_none(), "nothing after `finished`");
    }

    // The other kind of request on each replica is INVALID_ARGUMENT naming `model`.
    let generate = request("g-on-e", chat_prompt("Hi"), 4);
    let status = w.client.generate(pb::GenerateRequest { replica_id: "smol-e".into(), ..generate }).await.unwrap_err();
    assert_eq!((status.code(), param(&status)), (Code::InvalidArgument, Some("model")), "{status:?}");
    let status = w.client.generate(embed(REPLICA, None)).await.unwrap_err();
    assert_eq!((status.code(), param(&status)), (Code::InvalidArgument, Some("model")), "{status:?}");
    assert!(status.message().contains("does not support Embeddings API"), "{}", status.message());
}

/// A request's output as the head sees it: prompt ids (when asked for), each delta's tokens and
/// text, logprobs, the last finish reason and the usage.
#[derive(Debug, Default)]
struct Output {
    prompt_ids: Vec<u32>,
    resumed_tokens: u32,
    deltas: Vec<(Vec<u32>, String)>,
    /// Each choice's token ids.
    choices: std::collections::BTreeMap<u32, Vec<u32>>,
    logprobs: Vec<pb::TokenLogprob>,
    finish: i32,
    usage: pb::Usage,
}

impl Output {
    fn ids(&self) -> Vec<u32> {
        self.deltas.iter().flat_map(|(ids, _)| ids.clone()).collect()
    }
    fn text(&self) -> String {
        self.deltas.iter().map(|(_, t)| t.as_str()).collect()
    }
}

async fn run(client: &mut WorkerClient<Channel>, req: pb::GenerateRequest) -> Output {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut out = Output::default();
    loop {
        match next_event(&mut stream).await {
            pb::generate_event::Event::Started(s) => {
                out.prompt_ids = s.prompt_token_ids;
                out.resumed_tokens = s.resumed_tokens;
            }
            pb::generate_event::Event::Delta(d) => {
                out.choices.entry(d.index).or_default().extend(&d.token_ids);
                out.deltas.push((d.token_ids, d.text));
                out.logprobs.extend(d.logprobs);
                out.finish = d.finish_reason;
            }
            pb::generate_event::Event::Finished(f) => {
                out.usage = f.usage.expect("usage");
                return out;
            }
            pb::generate_event::Event::PromptLogprobs(_) => panic!("not asked for"),
            pb::generate_event::Event::Embedding(_) => panic!("not a pooling request"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_token_for_token_with_the_same_text_logprobs_and_usage() {
    let mut w = start_worker_with_replica().await;
    let seeded = pb::SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        frequency_penalty: 0.4,
        repetition_penalty: 1.1,
        seed: Some(1234),
        logprobs: Some(2),
        ..greedy()
    };
    for (name, sampling) in [("greedy", greedy()), ("seeded", seeded)] {
        let mut first = request(&format!("{name}-whole"), chat_prompt("Write a short poem about the sea."), 40);
        first.sampling = Some(sampling.clone());
        first.stop.as_mut().unwrap().min_tokens = 8;
        first.return_prompt_token_ids = true;
        let whole = run(&mut w.client, first.clone()).await;
        assert!(!whole.prompt_ids.is_empty(), "the prompt's ids come back when asked for");
        let ids = whole.ids();
        assert_eq!(ids.len(), 40);
        for cut in [1, 5, 23] {
            let resumed = pb::GenerateRequest {
                request_id: format!("{name}-from-{cut}"),
                prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenPrompt {
                    token_ids: whole.prompt_ids.clone(),
                })),
                resume: Some(pb::Resume { output_token_ids: ids[..cut].to_vec(), choices: Vec::new() }),
                return_prompt_token_ids: false,
                ..first.clone()
            };
            let rest = run(&mut w.client, resumed).await;
            assert_eq!(rest.resumed_tokens as usize, cut, "`started` says the resumed tokens were taken");
            assert_eq!(rest.ids(), ids[cut..], "{name} resumed after {cut} tokens");
            let delivered: String = whole.deltas[..cut].iter().map(|(_, t)| t.as_str()).collect();
            assert_eq!(delivered + &rest.text(), whole.text(), "{name} after {cut}: the text goes on where it stopped");
            assert_eq!(rest.usage.prompt_tokens, whole.usage.prompt_tokens, "the prompt counts once");
            assert_eq!(rest.usage.completion_tokens, 40, "the usage covers the whole output");
            assert_eq!(rest.finish, whole.finish);
            let tokens = |l: &[pb::TokenLogprob]| l.iter().map(|l| l.token_id).collect::<Vec<_>>();
            assert_eq!(tokens(&rest.logprobs), tokens(&whole.logprobs[whole.logprobs.len().min(cut)..]));
        }
    }
    let mut refused = request("resume-too-long", chat_prompt("Hi"), 4);
    refused.resume = Some(pb::Resume { output_token_ids: vec![1, 2, 3, 4], choices: Vec::new() });
    let status = w.client.generate(refused).await.expect_err("as many resumed tokens as max_tokens");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(param(&status), Some("resume"));
}

/// A structured output resumes from its matcher's state: seeded sampling under a JSON schema
/// whose documents outlast `max_tokens` (only the masks keep the output valid, so a matcher that
/// did not take the resumed tokens would sample other ones) continues token for token; resumed
/// tokens the constraint refuses fail the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_structured_output_continues_from_the_matchers_state() {
    let mut w = start_worker_with_replica().await;
    let schema = r#"{"type": "object", "required": ["lights"], "additionalProperties": false,
        "properties": {"lights": {"type": "array", "minItems": 40, "items": {"type": "object",
        "required": ["name", "year"], "additionalProperties": false,
        "properties": {"name": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}}}}}}"#;
    let mut first = request("structured-whole", chat_prompt("List lighthouses as JSON."), 48);
    first.sampling = Some(pb::SamplingParams { temperature: 0.9, seed: Some(77), ..greedy() });
    first.structured_output = Some(pb::StructuredOutput {
        kind: Some(pb::structured_output::Kind::JsonSchema(schema.into())),
        ..Default::default()
    });
    first.return_prompt_token_ids = true;
    let whole = run(&mut w.client, first.clone()).await;
    let ids = whole.ids();
    assert_eq!(ids.len(), 48);
    let compact: String = whole.text().split_whitespace().collect();
    assert!(compact.starts_with("{\"lights\":[{\"name\":"), "{}", whole.text());
    let resumed = |id: &str, output: Vec<u32>| pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenPrompt { token_ids: whole.prompt_ids.clone() })),
        resume: Some(pb::Resume { output_token_ids: output, choices: Vec::new() }),
        return_prompt_token_ids: false,
        ..first.clone()
    };
    for cut in [2, 19] {
        let rest = run(&mut w.client, resumed(&format!("structured-from-{cut}"), ids[..cut].to_vec())).await;
        assert_eq!(rest.resumed_tokens as usize, cut);
        assert_eq!(rest.ids(), ids[cut..], "resumed after {cut} tokens");
    }
    let prose = pb::TokenizeRequest {
        replica_id: REPLICA.into(),
        input: Some(pb::tokenize_request::Input::Text(pb::TextPrompt {
            text: "Hello there".into(),
            add_special_tokens: false,
        })),
        return_token_strs: false,
    };
    let prose = w.client.tokenize(prose).await.unwrap().into_inner().token_ids;
    let mut stream = w.client.generate(resumed("structured-refused", prose)).await.unwrap().into_inner();
    let failure = loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await.expect("an event in time") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without the failure"),
            Err(status) => break status,
        }
    };
    assert!(failure.message().contains("does not match the constraint"), "{failure:?}");
}

fn resumed_choice(index: u32, ids: &[u32], finished: bool) -> pb::ResumedChoice {
    pb::ResumedChoice { index, output_token_ids: ids.to_vec(), finished }
}

/// `n = 3`, seeded: each choice resumes from its own tokens on its own seeded stream (choice 0
/// after 5 tokens, choice 1 after 17, choice 2 finished and not continued) and goes on as in the
/// undisturbed run; the usage covers all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_of_several_choices_continues_each_from_its_own_tokens() {
    let mut w = start_worker_with_replica().await;
    let mut first = request("choices-whole", chat_prompt("Write a short poem about the sea."), 24);
    first.n = 3;
    first.sampling =
        Some(pb::SamplingParams { temperature: 0.9, top_p: 0.95, frequency_penalty: 0.4, seed: Some(77), ..greedy() });
    first.return_prompt_token_ids = true;
    let whole = run(&mut w.client, first.clone()).await;
    let ids = |i: u32| whole.choices[&i].clone();
    assert!((0..3).all(|i| ids(i).len() == 24), "{:?}", whole.choices);
    assert_ne!(ids(0), ids(1), "the choices sample their own streams");
    let resume = |choices: Vec<pb::ResumedChoice>| pb::GenerateRequest {
        request_id: format!("choices-resumed-{}", choices.len()),
        prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenPrompt { token_ids: whole.prompt_ids.clone() })),
        resume: Some(pb::Resume { output_token_ids: Vec::new(), choices }),
        return_prompt_token_ids: false,
        ..first.clone()
    };
    let choices = vec![
        resumed_choice(0, &ids(0)[..5], false),
        resumed_choice(1, &ids(1)[..17], false),
        resumed_choice(2, &ids(2), true),
    ];
    let rest = run(&mut w.client, resume(choices)).await;
    assert_eq!(rest.resumed_tokens, 5 + 17 + 24);
    assert_eq!(rest.choices.get(&0), Some(&ids(0)[5..].to_vec()), "choice 0 resumed after 5 tokens");
    assert_eq!(rest.choices.get(&1), Some(&ids(1)[17..].to_vec()), "choice 1 resumed after 17 tokens");
    assert!(!rest.choices.contains_key(&2), "a finished choice is not continued");
    assert_eq!(rest.usage.completion_tokens, 72, "the usage covers every choice once");

    for wrong in [
        vec![resumed_choice(0, &ids(0)[..5], false), resumed_choice(2, &ids(2)[..5], false)],
        vec![resumed_choice(0, &ids(0), true), resumed_choice(1, &ids(1), true), resumed_choice(2, &ids(2), true)],
    ] {
        let status = w.client.generate(resume(wrong)).await.expect_err("refused");
        assert_eq!((status.code(), param(&status)), (Code::InvalidArgument, Some("resume")), "{status:?}");
    }
}
