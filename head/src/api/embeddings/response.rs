//! The embeddings response body, in OpenAI's shape (with vLLM's `id` and `created`):
//! `{"id", "object": "list", "created", "model", "data": [{"object": "embedding", "index": i,
//! "embedding": ...}], "usage": {"prompt_tokens", "total_tokens"}}`. `data[i]` is input `i`; an
//! embedding is a list of numbers, or with `base64` the vector's little-endian f32 bytes in
//! standard base64 (what the `openai` SDK decodes with `np.frombuffer(..., dtype="float32")`).

use base64::Engine;
use serde_json::{Value, json};

use super::request::Encoding;

/// The body for `vectors` (input order), `prompt_tokens` over all inputs.
pub fn body(
    id: &str,
    created: u64,
    model: &str,
    vectors: &[Vec<f32>],
    prompt_tokens: u32,
    encoding: Encoding,
) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| json!({"object": "embedding", "index": index, "embedding": encode(v, encoding)}))
        .collect();
    json!({
        "id": id,
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

/// One vector as `encoding` writes it.
pub fn encode(vector: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(vector),
        Encoding::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        // 1.0 = 00 00 80 3f, -2.0 = 00 00 00 c0.
        assert_eq!(encode(&[1.0, -2.0], Encoding::Base64), json!("AACAPwAAAMA="));
        assert_eq!(encode(&[0.5], Encoding::Float), json!([0.5]));
    }

    #[test]
    fn data_follows_input_order_and_usage_totals_the_prompts() {
        let body = body("embd-1", 7, "e", &[vec![1.0], vec![2.0]], 9, Encoding::Float);
        assert_eq!(body["object"], "list");
        assert_eq!(body["data"][1], json!({"object": "embedding", "index": 1, "embedding": [2.0]}));
        assert_eq!(body["usage"], json!({"prompt_tokens": 9, "total_tokens": 9}));
        assert_eq!((body["model"].as_str(), body["created"].as_u64()), (Some("e"), Some(7)));
    }
}
