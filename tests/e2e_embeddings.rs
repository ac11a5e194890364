//! `/v1/embeddings` against one real `lumen serve --runner pooling` of SmolLM2-135M: the official
//! Python client (`tests/support/openai_embeddings.py`: float and base64, order and index, alone
//! equals batched, usage, token-id input, paraphrases closer than unrelated texts, refusals),
//! then over plain HTTP: concurrent requests give the same vectors as sequential ones, what vLLM
//! refuses is a 400 in OpenAI's shape (empty input, an empty string, a token id outside the
//! vocabulary, an input longer than max_model_len, dimensions, a bad encoding_format), every
//! generation endpoint answers vLLM's 400, and the metrics count the requests.

mod support;

use serde_json::{Value, json};
use support::{Lumen, run_python, serve_flags};

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let resp = http.post(url).bearer_auth("sekret").json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn vectors(body: &Value) -> Vec<Vec<f64>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_through_the_openai_client_and_http_on_a_pooling_model() {
    let lumen =
        Lumen::start(&serve_flags(&["--api-key", "sekret", "--runner", "pooling", "--max-num-batched-tokens", "64"]));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let api = lumen.url("api");

    run_python("openai_embeddings.py", &[&format!("{api}/v1"), "sekret", "smol"]);

    // Concurrent requests (batched together, prompts chunked by 64-token steps) give the vectors
    // that one request at a time gives.
    let url = format!("{api}/v1/embeddings");
    let texts: Vec<String> = (0..6)
        .map(|i| format!("Request {i}: {}", "a sentence long enough to span several prefill chunks, ".repeat(i + 1)))
        .collect();
    let mut sequential = Vec::new();
    for t in &texts {
        let (status, body) = post(&http, &url, &json!({"model": "smol", "input": t})).await;
        assert_eq!(status, 200, "{body}");
        sequential.push(vectors(&body).remove(0));
    }
    let concurrent = futures::future::join_all(texts.iter().map(|t| {
        let (http, url) = (http.clone(), url.clone());
        let body = json!({"model": "smol", "input": t});
        async move { post(&http, &url, &body).await }
    }))
    .await;
    for (i, (status, body)) in concurrent.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        let c = cosine(&vectors(body)[0], &sequential[i]);
        assert!(c > 0.9999, "text {i}: concurrent vs alone cosine {c}");
    }

    // vLLM's refusals, in OpenAI's shape.
    let long = "word ".repeat(1100);
    let refused = [
        (json!({"model": "smol", "input": []}), "input", ""),
        (json!({"model": "smol", "input": ""}), "input", ""),
        (json!({"model": "smol", "input": [1, 2, 999999]}), "input", "outside the vocabulary"),
        (json!({"model": "smol", "input": long}), "input", "maximum context length is 1024 tokens"),
        (json!({"model": "smol", "input": "a", "dimensions": 32}), "dimensions", "matryoshka"),
        (json!({"model": "smol", "input": "a", "encoding_format": "int8"}), "encoding_format", ""),
    ];
    for (body, param, says) in refused {
        let (status, reply) = post(&http, &url, &body).await;
        assert_eq!(status, 400, "{body} -> {reply}");
        let error = &reply["error"];
        assert_eq!((error["type"].as_str(), error["param"].as_str()), (Some("invalid_request_error"), Some(param)));
        assert!(error["message"].as_str().unwrap().contains(says), "{reply}");
    }
    // Truncation keeps the long input's last tokens and fits it.
    let (status, body) =
        post(&http, &url, &json!({"model": "smol", "input": long, "truncate_prompt_tokens": 16})).await;
    assert_eq!((status, body["usage"]["prompt_tokens"].as_u64()), (200, Some(16)), "{body}");

    // Generation endpoints refuse a pooling model as vLLM does.
    let generation = [
        ("/v1/completions", json!({"model": "smol", "prompt": "Hi"}), "Completions API"),
        (
            "/v1/chat/completions",
            json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}]}),
            "Chat Completions API",
        ),
        ("/v1/responses", json!({"model": "smol", "input": "Hi"}), "Responses API"),
    ];
    for (path, body, api_name) in generation {
        let (status, reply) = post(&http, &format!("{api}{path}"), &body).await;
        assert_eq!(status, 400, "{path}: {reply}");
        assert_eq!(reply["error"]["message"], format!("The model does not support {api_name}"));
    }

    let metrics = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    let served = metrics
        .lines()
        .find(|l| {
            l.starts_with("lumen_serve_num_router_requests_total")
                && l.contains("/v1/embeddings")
                && l.contains("code=\"200\"")
        })
        .unwrap_or_else(|| panic!("no embeddings request counted:\n{metrics}"));
    let count: f64 = served.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 12.0, "{served}");
}
