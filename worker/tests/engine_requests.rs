//! Request-level behaviour of the engine on the real SmolLM2-135M-Instruct GGUF: seeded sampling,
//! `n > 1`, stop strings and tokens, `min_tokens`, `max_tokens`, log-probabilities, validation,
//! and the async handle (a dropped stream aborts its request at once).

mod common;

use std::time::Duration;

use common::{chat, engine, options, run};
use lumen_worker::engine::{EngineEvent, EngineHandle, EngineRequest, FinishReason, StopReason};
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};

fn sampled(seed: Option<u64>) -> SamplingParams {
    SamplingParams { temperature: 0.9, top_p: 0.95, seed, ..Default::default() }
}

#[test]
fn the_same_seed_gives_the_same_text_and_choices_differ() {
    let mut core = engine(&options());
    let prompt = chat(&core, "Tell me a story about a dragon.");
    let stop = StopParams { max_tokens: 24, ignore_eos: true, ..Default::default() };
    let a = run(&mut core, vec![EngineRequest::new("a", prompt.clone(), sampled(Some(7)), stop.clone())]).remove(0);
    let b = run(&mut core, vec![EngineRequest::new("b", prompt.clone(), sampled(Some(7)), stop.clone())]).remove(0);
    let c = run(&mut core, vec![EngineRequest::new("c", prompt.clone(), sampled(Some(8)), stop.clone())]).remove(0);
    assert_eq!(a.tokens[&0], b.tokens[&0], "same seed, same tokens");
    assert_ne!(a.tokens[&0], c.tokens[&0], "another seed, other tokens");

    // n = 4 with a seed: four distinct choices, reproducible as a whole.
    let mut req = EngineRequest::new("n", prompt.clone(), sampled(Some(3)), stop.clone());
    req.n = 4;
    let first = run(&mut core, vec![req.clone()]).remove(0);
    req.id = "n2".into();
    let second = run(&mut core, vec![req]).remove(0);
    assert_eq!(first.tokens.len(), 4);
    assert_eq!(first.tokens, second.tokens);
    let distinct: std::collections::HashSet<_> = first.tokens.values().collect();
    assert!(distinct.len() >= 3, "choices should differ: {:?}", first.tokens);
    let usage = first.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (prompt.len(), 4 * 24));
    assert!(first.finish.values().all(|&f| f == FinishReason::Length));
    assert_eq!(core.stats().kv_blocks_used, 0);
}

#[test]
fn stop_strings_cut_the_text_and_report_the_match() {
    let mut core = engine(&options());
    let prompt = chat(&core, "Count from 1 to 20, separated by commas.");
    let greedy = |max| StopParams { max_tokens: max, ignore_eos: true, ..Default::default() };
    let full = run(&mut core, vec![EngineRequest::new("full", prompt.clone(), SamplingParams::greedy(), greedy(48))])
        .remove(0);
    let text = full.text[&0].clone();
    // Stop at the first "5" the model writes (wherever tokens split it).
    let cut = text.find('5').expect("the model counts past 5");
    let stop = StopParams { stop: vec!["5".into()], ..greedy(48) };
    let out = run(&mut core, vec![EngineRequest::new("s", prompt.clone(), SamplingParams::greedy(), stop)]).remove(0);
    assert_eq!(out.text[&0], text[..cut]);
    assert_eq!(out.finish[&0], FinishReason::Stop);
    let inclusive = StopParams { stop: vec!["5".into()], include_stop_str_in_output: true, ..greedy(48) };
    let out = run(&mut core, vec![EngineRequest::new("i", prompt, SamplingParams::greedy(), inclusive)]).remove(0);
    assert_eq!(out.text[&0], text[..=cut]);
}

#[test]
fn eos_stop_tokens_min_tokens_and_max_tokens_end_choices_as_specified() {
    let mut core = engine(&options());
    // A conversation the model answers briefly ("The largest planet ... is Jupiter.").
    let messages = [
        ("user", "Hi! My name is Alice and I like astronomy."),
        ("assistant", "Hello Alice! Astronomy is fascinating. What would you like to know?"),
        ("user", "Which planet is the largest in our solar system?"),
    ];
    let messages: Vec<ChatMessage> = messages.iter().map(|(r, t)| ChatMessage::new(*r, *t)).collect();
    let prompt = core
        .tokenizer()
        .encode_chat(&messages, &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() })
        .unwrap();
    let eos = core.tokenizer().eos_token_ids().to_vec();
    // Run to the model's own end-of-sequence.
    let natural = run(
        &mut core,
        vec![EngineRequest::new(
            "e",
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 200, ..Default::default() },
        )],
    )
    .remove(0);
    let toks = natural.tokens[&0].clone();
    assert_eq!(natural.finish[&0], FinishReason::Stop);
    assert!(eos.contains(toks.last().unwrap()), "ends with EOS: {toks:?}");
    assert!(!natural.text[&0].contains("<|im_end|>"), "the EOS token is not shown as text");

    // A stop token id: the third generated token.
    let third = toks[2];
    let stop = StopParams { max_tokens: 200, stop_token_ids: vec![third], ..Default::default() };
    let out = run(&mut core, vec![EngineRequest::new("t", prompt.clone(), SamplingParams::greedy(), stop)]).remove(0);
    assert_eq!(out.tokens[&0], toks[..3].to_vec());
    assert_eq!(out.finish[&0], FinishReason::Stop);

    // min_tokens keeps EOS away until that many tokens exist.
    let min = toks.len() + 5;
    let stop = StopParams { max_tokens: min + 20, min_tokens: min, ..Default::default() };
    let out = run(&mut core, vec![EngineRequest::new("m", prompt.clone(), SamplingParams::greedy(), stop)]).remove(0);
    assert!(out.tokens[&0].len() >= min);
    assert!(out.tokens[&0][..min - 1].iter().all(|t| !eos.contains(t)));

    // max_tokens: exactly that many, finish reason length.
    let out = run(
        &mut core,
        vec![EngineRequest::new(
            "l",
            prompt,
            SamplingParams::greedy(),
            StopParams { max_tokens: 3, ..Default::default() },
        )],
    )
    .remove(0);
    assert_eq!((out.tokens[&0].len(), out.finish[&0]), (3, FinishReason::Length));
    let _ = StopReason::Token(0);
}

#[test]
fn logprobs_report_the_chosen_token_and_sorted_alternatives() {
    let mut core = engine(&options());
    let prompt = chat(&core, "Say hello.");
    let sampling = SamplingParams { logprobs: Some(3), ..SamplingParams::greedy() };
    let out = run(
        &mut core,
        vec![EngineRequest::new(
            "lp",
            prompt,
            sampling,
            StopParams { max_tokens: 6, ignore_eos: true, ..Default::default() },
        )],
    )
    .remove(0);
    let lps = &out.logprobs[&0];
    assert_eq!(lps.len(), 6);
    for (lp, &tok) in lps.iter().zip(&out.tokens[&0]) {
        assert_eq!(lp.token, tok);
        assert_eq!(lp.top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].0, tok);
        assert!((lp.top[0].2 - lp.logprob).abs() < 1e-6);
        assert!(lp.top.windows(2).all(|w| w[0].2 >= w[1].2));
        assert!(lp.logprob <= 0.0);
        assert_eq!(lp.piece, core.tokenizer().token_piece(tok));
    }
}

#[test]
fn invalid_requests_fail_with_a_message_naming_the_problem() {
    let mut core = engine(&options());
    let limits = core.limits().clone();
    let too_long = EngineRequest::new(
        "x",
        vec![1; 1000],
        SamplingParams::greedy(),
        StopParams { max_tokens: 100, ..Default::default() },
    );
    let err = limits.validate(&too_long).unwrap_err().to_string();
    assert!(err.contains("max_model_len"), "{err}");
    let bad_token = EngineRequest::new("y", vec![u32::MAX], SamplingParams::greedy(), StopParams::default());
    assert!(limits.validate(&bad_token).unwrap_err().to_string().contains("vocabulary"));
    let empty = EngineRequest::new("z", vec![], SamplingParams::greedy(), StopParams::default());
    assert!(limits.validate(&empty).is_err());
    // The core answers an invalid request with one Failed event and keeps no state for it.
    let out = run(&mut core, vec![too_long]).remove(0);
    assert!(out.failed.unwrap().contains("max_model_len"));
    assert_eq!(core.stats().waiting, 0);
}

#[test]
fn dropping_a_stream_aborts_its_request_and_frees_its_blocks() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let core = tokio::task::spawn_blocking(|| engine(&options())).await.unwrap();
        let prompt = chat(&core, "Write a long essay about the ocean.");
        let (handle, _join) = EngineHandle::start(core, "test").await.unwrap();
        let req = EngineRequest::new(
            "long",
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 500, ignore_eos: true, ..Default::default() },
        );
        let mut stream = handle.generate(req).await.unwrap();
        // Take a few tokens, then walk away.
        let mut got = 0;
        while got < 3 {
            if let Some(EngineEvent::Delta(d)) = stream.recv().await {
                got += d.token_ids.len();
            }
        }
        assert_eq!(handle.stats().await.unwrap().running, 1);
        drop(stream);
        let mut freed = false;
        for _ in 0..200 {
            let s = handle.stats().await.unwrap();
            if s.running == 0 && s.kv_blocks_used == 0 {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(freed, "the aborted request's blocks should be freed");
        // The engine keeps serving.
        let req = EngineRequest::new(
            "next",
            prompt,
            SamplingParams::greedy(),
            StopParams { max_tokens: 2, ..Default::default() },
        );
        let mut stream = handle.generate(req).await.unwrap();
        let mut finished = false;
        while let Some(e) = stream.recv().await {
            finished |= matches!(e, EngineEvent::Finished { .. });
        }
        assert!(finished);
        // Bad input is refused by the actor before it reaches the engine thread.
        let bad = EngineRequest::new("bad", vec![], SamplingParams::greedy(), StopParams::default());
        assert!(handle.generate(bad).await.is_err());
        handle.stop();
    });
}

/// A sampled token that ends nothing is sent while the next step runs (`core_deferred.rs`): one
/// token per choice waits after a step, the engine reports work while one is,
/// and an abort delivers it before the choice's `abort` finish, so the stream is the undisturbed
/// run's prefix.
#[test]
fn a_deferred_token_is_sent_by_the_next_step_or_before_an_abort() {
    let mut core = engine(&options());
    let prompt = chat(&core, "Write a haiku about the sea.");
    let req = |id: &str, max_tokens| {
        EngineRequest::new(
            id,
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens, ignore_eos: true, ..Default::default() },
        )
    };
    let full = run(&mut core, vec![req("full", 12)]).remove(0);
    assert_eq!(full.tokens[&0].len(), 12);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(req("cut", 12), tx);
    let mut delivered: Vec<u32> = Vec::new();
    for step in 1..=6 {
        core.step().expect("engine step");
        while let Ok(event) = rx.try_recv() {
            match event {
                EngineEvent::Delta(d) => {
                    assert!(d.finish_reason.is_none(), "nothing ends this choice before 12 tokens");
                    delivered.extend(&d.token_ids);
                }
                other => panic!("unexpected event before the abort: {other:?}"),
            }
        }
        // `step` tokens were sampled; the last waits for the next step.
        assert_eq!(delivered.len() + 1, step, "step {step}: the tokens before the last are sent");
        assert!(core.has_work());
    }
    core.abort("cut");
    let mut finish = None;
    while let Ok(event) = rx.try_recv() {
        match event {
            EngineEvent::Delta(d) => {
                assert!(finish.is_none(), "no delta after the choice's finish");
                delivered.extend(&d.token_ids);
                finish = d.finish_reason;
            }
            EngineEvent::Finished { usage, .. } => assert_eq!(usage.completion_tokens, 6),
            other => panic!("unexpected event: {other:?}"),
        }
    }
    assert_eq!(finish, Some(FinishReason::Abort));
    assert_eq!(delivered, full.tokens[&0][..6], "every sampled token, in order, before the abort");
    assert!(!core.has_work());
}

/// vLLM's `priority`: refused unless the engine schedules by priority; with the priority policy
/// and room for one sequence, a request of a lower value arriving while another runs preempts
/// it, finishes first, and the preempted one then completes with the output it would have had
/// alone (recomputed, not lost).
#[test]
fn priority_requests_need_the_policy_and_preempt_worse_ones_without_changing_their_output() {
    use lumen_worker::engine::EngineOptions;
    use lumen_worker::engine::options::SchedulingPolicy;
    let mut fcfs = engine(&options());
    let prompt = chat(&fcfs, "Write a haiku about the sea.");
    let req = |id: &str, priority: i64| {
        let mut r = EngineRequest::new(
            id,
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 8, ignore_eos: true, ..Default::default() },
        );
        r.priority = priority;
        r
    };
    let refused = run(&mut fcfs, vec![req("p", 3)]).remove(0);
    let message = refused.failed.expect("a non-zero priority under fcfs fails");
    assert!(message.contains("Priority scheduling is not enabled"), "{message}");
    let alone = run(&mut fcfs, vec![req("alone", 0)]).remove(0).tokens[&0].clone();

    let mut core =
        engine(&EngineOptions { scheduling_policy: SchedulingPolicy::Priority, max_num_seqs: 1, ..options() });
    let (tx_low, mut rx_low) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(req("low", 5), tx_low);
    for _ in 0..3 {
        core.step().expect("engine step");
    }
    let (tx_high, mut rx_high) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(req("high", -1), tx_high);
    let mut finished = Vec::new();
    let (mut low, mut high) = (Vec::new(), Vec::new());
    while core.has_work() {
        core.step().expect("engine step");
        for (name, rx, tokens) in [("low", &mut rx_low, &mut low), ("high", &mut rx_high, &mut high)] {
            while let Ok(event) = rx.try_recv() {
                match event {
                    EngineEvent::Delta(d) => tokens.extend(d.token_ids),
                    EngineEvent::Finished { .. } => finished.push(name),
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
        }
    }
    assert_eq!(finished, vec!["high", "low"], "the better class runs to its end first");
    assert_eq!(core.stats().preemptions_total, 1);
    assert_eq!(high, alone);
    assert_eq!(low, alone, "the preempted request is recomputed, its output unchanged");
}

/// Tenants share the engine's sequence slots: with two slots taken by one tenant's burst (two
/// more of its requests queued), another tenant's request arriving later preempts the burst's
/// newest running request and finishes before the two queued ones even start; every request's
/// output is the one it has alone (the preempted one is recomputed).
#[test]
fn a_later_tenant_takes_a_slot_from_a_burst_without_changing_any_output() {
    use lumen_worker::engine::EngineOptions;
    let mut core = engine(&EngineOptions { max_num_seqs: 2, ..options() });
    let prompt = chat(&core, "Write a haiku about the sea.");
    let req = |id: &str, tenant: &str| {
        let mut r = EngineRequest::new(
            id,
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 12, ignore_eos: true, ..Default::default() },
        );
        r.tenant = Some(std::sync::Arc::from(tenant));
        r
    };
    let alone = run(&mut core, vec![req("alone", "solo")]).remove(0).tokens[&0].clone();
    let mut streams = Vec::new();
    for id in ["heavy-0", "heavy-1", "heavy-2", "heavy-3"] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        core.add_request(req(id, "heavy"), tx);
        streams.push((id, rx, Vec::new()));
    }
    for _ in 0..3 {
        core.step().expect("engine step");
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(req("light", "light"), tx);
    streams.push(("light", rx, Vec::new()));
    let (mut started, mut finished) = (Vec::new(), Vec::new());
    while core.has_work() {
        core.step().expect("engine step");
        for (name, rx, tokens) in streams.iter_mut() {
            while let Ok(event) = rx.try_recv() {
                match event {
                    EngineEvent::Delta(d) => {
                        if tokens.is_empty() {
                            started.push(*name);
                        }
                        tokens.extend(d.token_ids);
                    }
                    EngineEvent::Finished { .. } => finished.push(*name),
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
        }
    }
    let position = |list: &[&str], name| list.iter().position(|n| *n == name).expect(name);
    assert!(position(&finished, "light") < position(&started, "heavy-2"), "started {started:?}, finished {finished:?}");
    assert_eq!(core.stats().preemptions_total, 1);
    for (name, _, tokens) in &streams {
        assert_eq!(tokens, &alone, "{name}");
    }
}

/// vLLM's `cache_salt`: a repeated prompt reuses the cached blocks of an earlier request only
/// under the same salt (the usage's cached tokens say so); unsalted requests do not see salted
/// blocks.
#[test]
fn the_prefix_cache_is_shared_only_under_the_same_cache_salt() {
    let mut core = engine(&options());
    let prompt = chat(&core, "Summarise the plot of Romeo and Juliet in two sentences, including how it ends.");
    assert!(prompt.len() > 32, "at least two full blocks");
    let req = |id: &str, salt: Option<&str>| {
        let mut r = EngineRequest::new(
            id,
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 2, ..Default::default() },
        );
        r.cache_salt = salt.map(str::to_string);
        r
    };
    let cached = |core: &mut lumen_worker::engine::EngineCore, id, salt| {
        run(core, vec![req(id, salt)]).remove(0).usage.expect("usage").cached_tokens
    };
    assert_eq!(cached(&mut core, "a1", Some("team-a")), 0);
    assert_eq!(cached(&mut core, "b1", Some("team-b")), 0, "another salt finds nothing");
    assert_eq!(cached(&mut core, "n1", None), 0, "no salt finds nothing salted");
    let full_blocks = (prompt.len() - 1) / 16 * 16;
    assert_eq!(cached(&mut core, "a2", Some("team-a")), full_blocks, "the same salt finds its blocks");
    assert_eq!(cached(&mut core, "n2", None), full_blocks, "unsalted requests share as before");
}
