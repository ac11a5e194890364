//! Prompt log-probabilities over HTTP against a scripted backend: `echo` with `logprobs` (the
//! legacy shape over the prompt's tokens, the first null), `echo` with `max_tokens: 0` (the
//! prompt only), streaming with `echo` (the prompt in each choice's first chunk), vLLM's
//! `prompt_logprobs` on completions (per choice) and chat (top level), and what is refused.

mod api_support;

use api_support::*;
use lumen_proto::v1 as pb;
use pb::generate_event::Event;
use serde_json::{Value, json};

fn top(token_id: u32, piece: &str, logprob: f32) -> pb::TopLogprob {
    pb::TopLogprob { token_id, piece: piece.into(), logprob }
}

/// Prompt "Say hi!" = tokens 4 "Say", 5 " hi", 6 "!"; output "o" then "k" (finish `length`).
fn scored(request: &pb::GenerateRequest) -> Result<Vec<Item>, lumen_head::backend::BackendError> {
    let mut items = vec![Item::Event(Event::Started(pb::Started {
        prompt_tokens: 3,
        prompt_token_ids: if request.return_prompt { vec![4, 5, 6] } else { vec![] },
        prompt_text: if request.return_prompt { "Say hi!".into() } else { String::new() },
        resumed_tokens: 0,
    }))];
    if request.prompt_logprobs.is_some() {
        let hi = pb::TokenLogprob {
            token_id: 5,
            piece: " hi".into(),
            logprob: -1.0,
            top: vec![top(7, " there", -0.5), top(5, " hi", -1.0)],
            rank: 2,
        };
        let bang =
            pb::TokenLogprob { token_id: 6, piece: "!".into(), logprob: -0.25, top: vec![top(6, "!", -0.25)], rank: 1 };
        let p = pb::PromptLogprobs { tokens: vec![hi, bang], first_token_id: 4, first_piece: "Say".into() };
        items.push(Item::Event(Event::PromptLogprobs(p)));
    }
    let logprobs = request.sampling.as_ref().unwrap().logprobs.is_some();
    for (text, id, finish) in [("o", 8u32, pb::FinishReason::Unspecified), ("k", 9, pb::FinishReason::Length)] {
        let lp = pb::TokenLogprob { token_id: id, piece: text.into(), logprob: -0.125, top: vec![], rank: 0 };
        items.push(Item::Event(Event::Delta(pb::Delta {
            text: text.into(),
            token_ids: vec![id],
            logprobs: if logprobs { vec![lp] } else { vec![] },
            finish_reason: finish as i32,
            ..Default::default()
        })));
    }
    items.push(finished(3, 2));
    Ok(items)
}

async fn scored_server() -> (std::sync::Arc<FakeBackend>, Server) {
    let (backend, server) = serve_default().await;
    backend.script(scored);
    (backend, server)
}

#[tokio::test]
async fn echo_with_logprobs_covers_the_prompt_first_token_null() {
    let (backend, server) = scored_server().await;
    let (status, body) = server
        .post_json("/v1/completions", json!({"model": "m", "prompt": "Say hi!", "echo": true, "logprobs": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    let request = &backend.requests()[0].1;
    assert_eq!(request.prompt_logprobs, Some(1), "echo with logprobs asks for the prompt's");
    assert!(request.return_prompt);
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "Say hi!ok");
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"], json!(["Say", " hi", "!", "o", "k"]));
    assert_eq!(lp["token_logprobs"], json!([null, -1.0, -0.25, -0.125, -0.125]));
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][1], json!({" hi": -1.0, " there": -0.5}));
    assert_eq!(lp["text_offset"], json!([0, 3, 6, 7, 8]));
    // As vLLM: the implied prompt_logprobs show in the choice too.
    assert_eq!(choice["prompt_logprobs"][0], Value::Null);
    assert_eq!(choice["prompt_logprobs"][1]["7"], json!({"logprob": -0.5, "rank": 1, "decoded_token": " there"}));
}

#[tokio::test]
async fn echo_with_max_tokens_zero_returns_the_prompt_only() {
    let (backend, server) = scored_server().await;
    let body = json!({"model": "m", "prompt": "Say hi!", "echo": true, "logprobs": 0, "max_tokens": 0});
    let (status, body) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend.requests()[0].1.stop.as_ref().unwrap().max_tokens, 1, "vLLM generates one token and drops it");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "Say hi!");
    assert_eq!(choice["logprobs"]["tokens"], json!(["Say", " hi", "!"]));
    assert_eq!(choice["logprobs"]["token_logprobs"], json!([null, -1.0, -0.25]));
    assert_eq!(choice["logprobs"]["top_logprobs"][2], json!({"!": -0.25}));
    assert_eq!(choice["finish_reason"], "length");

    // Without echo, max_tokens 0 is refused naming it (vLLM: at least 1).
    let (status, body) =
        server.post_json("/v1/completions", json!({"model": "m", "prompt": "x", "max_tokens": 0})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("max_tokens")), "{body}");
    // Streaming: one chunk with the prompt and its logprobs, then the finish.
    let body = json!({"model": "m", "prompt": "Say hi!", "echo": true, "logprobs": 0, "max_tokens": 0, "stream": true});
    let (_, sse) = stream(&server, "/v1/completions", body).await;
    assert_eq!(joined(&sse.chunks, 0, "/text"), "Say hi!");
    assert_eq!(joined(&sse.chunks, 0, "/finish_reason"), "length");
}

#[tokio::test]
async fn streamed_echo_rides_in_each_choices_first_chunk() {
    let (_, server) = scored_server().await;
    let body = json!({"model": "m", "prompt": "Say hi!", "echo": true, "logprobs": 1, "stream": true});
    let (status, sse) = stream(&server, "/v1/completions", body).await;
    assert_eq!(status, 200);
    let choices: Vec<&Value> = sse.chunks.iter().filter_map(|c| c["choices"].get(0)).collect();
    assert_eq!(choices[0]["text"], "Say hi!o", "the prompt comes with the first output, as vLLM streams it");
    assert_eq!(choices[0]["logprobs"]["tokens"], json!(["Say", " hi", "!", "o"]));
    assert_eq!(choices[0]["logprobs"]["token_logprobs"][0], Value::Null);
    assert_eq!(choices[1]["text"], "k");
    assert_eq!(choices[1]["logprobs"]["text_offset"], json!([8]), "offsets continue after the prompt");
}

#[tokio::test]
async fn prompt_logprobs_show_per_choice_on_completions_and_at_top_level_on_chat() {
    let (backend, server) = scored_server().await;
    let (status, body) =
        server.post_json("/v1/completions", json!({"model": "m", "prompt": "Say hi!", "prompt_logprobs": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend.requests()[0].1.prompt_logprobs, Some(1));
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "ok", "no echo");
    assert_eq!(choice["logprobs"], Value::Null);
    let p = &choice["prompt_logprobs"];
    assert_eq!(p.as_array().unwrap().len(), 3);
    assert_eq!(
        p[1],
        json!({"5": {"logprob": -1.0, "rank": 2, "decoded_token": " hi"},
                            "7": {"logprob": -0.5, "rank": 1, "decoded_token": " there"}})
    );
    assert_eq!(p[2], json!({"6": {"logprob": -0.25, "rank": 1, "decoded_token": "!"}}));

    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 0});
    let (status, body) = server.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend.requests()[1].1.prompt_logprobs, Some(0));
    assert_eq!(body["prompt_logprobs"][1], json!({"5": {"logprob": -1.0, "rank": 2, "decoded_token": " hi"}}));

    // A stream may ask for 0 (vLLM accepts it and shows none): nothing is computed.
    let body = json!({"model": "m", "prompt": "x", "prompt_logprobs": 0, "stream": true});
    let (status, _) = stream(&server, "/v1/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(backend.requests()[2].1.prompt_logprobs, None);
}

#[tokio::test]
async fn bad_prompt_logprobs_are_400_naming_the_field() {
    let (backend, server) = scored_server().await;
    for (body, says) in [
        (json!({"prompt_logprobs": 21}), "more than the 20 allowed"),
        (json!({"prompt_logprobs": -1}), "the whole vocabulary"),
        (json!({"prompt_logprobs": -2}), "-1 or at least 0"),
        (json!({"prompt_logprobs": "1"}), "must be an integer"),
        (json!({"prompt_logprobs": 1, "stream": true}), "not available when stream"),
    ] {
        for (path, mut request) in [
            ("/v1/completions", json!({"model": "m", "prompt": "x"})),
            ("/v1/chat/completions", json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})),
        ] {
            request.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
            let (status, answer) = server.post_json(path, request).await;
            assert_eq!(status, 400, "{path} {body}: {answer}");
            assert_eq!(answer["error"]["param"], "prompt_logprobs", "{answer}");
            assert_eq!(answer["error"]["type"], "invalid_request_error");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{message} should say {says}");
        }
    }
    assert!(backend.requests().is_empty(), "nothing refused reaches the backend");
}

#[tokio::test]
async fn a_replica_that_sends_no_prompt_logprobs_is_an_error_not_a_silent_answer() {
    // The default script ignores `prompt_logprobs`, as a worker older than the field would.
    let (_, server) = serve_default().await;
    let body = json!({"model": "m", "prompt": "x", "echo": true, "logprobs": 1});
    let (status, answer) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 500, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("prompt log-probabilities"), "{answer}");
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1});
    assert_eq!(server.post_json("/v1/chat/completions", chat).await.0, 500);
    // Without them asked for, the same replica serves.
    assert_eq!(server.post_json("/v1/completions", json!({"model": "m", "prompt": "x", "echo": true})).await.0, 200);
}
