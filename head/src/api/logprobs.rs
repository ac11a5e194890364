//! Log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and the legacy completions shape `{tokens, token_logprobs, top_logprobs,
//! text_offset}`. As vLLM does, `-inf` becomes -9999 (JSON has no infinities).

use lumen_proto::v1 as pb;
use serde_json::{Map, Value, json};

/// A log-probability JSON can carry.
fn finite(logprob: f32) -> f32 {
    if logprob.is_nan() { -9999.0 } else { logprob.max(-9999.0) }
}

fn chat_entry(piece: &str, logprob: f32) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("token".into(), json!(piece));
    entry.insert("logprob".into(), json!(finite(logprob)));
    entry.insert("bytes".into(), json!(piece.as_bytes()));
    entry
}

/// Chat's shape for the tokens of one delta (or a whole choice).
pub fn chat(tokens: &[pb::TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = chat_entry(&t.piece, t.logprob);
            let top: Vec<Value> = t.top.iter().map(|alt| Value::Object(chat_entry(&alt.piece, alt.logprob))).collect();
            entry.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(entry)
        })
        .collect();
    json!({"content": content})
}

/// What the legacy shape holds: `k` alternatives per token, tokens named by their text or, with
/// vLLM's `return_tokens_as_token_ids`, as `token_id:N` (distinct even where texts are not, e.g.
/// partial UTF-8 pieces).
#[derive(Clone, Copy, Debug)]
pub struct Legacy {
    pub k: u32,
    pub token_ids: bool,
}

impl Legacy {
    fn name(&self, token_id: u32, piece: &str) -> String {
        if self.token_ids { format!("token_id:{token_id}") } else { piece.to_string() }
    }
}

/// The legacy completions shape. `text_offset` counts characters of the choice's text from
/// `offset` (where this delta starts); returns the shape and the offset after these tokens.
/// Each `top_logprobs` entry maps the sampled token and up to `k` alternatives to their
/// log-probabilities (vLLM's convention).
pub fn completion(tokens: &[pb::TokenLogprob], legacy: Legacy, mut offset: usize) -> (Value, usize) {
    let mut pieces = Vec::with_capacity(tokens.len());
    let mut token_logprobs = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        let name = legacy.name(t.token_id, &t.piece);
        pieces.push(json!(name));
        token_logprobs.push(json!(finite(t.logprob)));
        let mut top = Map::new();
        top.insert(name, json!(finite(t.logprob)));
        for alt in t.top.iter().take(legacy.k as usize) {
            top.entry(legacy.name(alt.token_id, &alt.piece)).or_insert_with(|| json!(finite(alt.logprob)));
        }
        top_logprobs.push(Value::Object(top));
        text_offset.push(json!(offset));
        offset += t.piece.chars().count();
    }
    let shape = json!({
        "tokens": pieces,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    });
    (shape, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(piece: &str, logprob: f32, top: &[(&str, f32)]) -> pb::TokenLogprob {
        pb::TokenLogprob {
            token_id: 1,
            piece: piece.into(),
            logprob,
            top: top.iter().map(|&(p, l)| pb::TopLogprob { token_id: 2, piece: p.into(), logprob: l }).collect(),
        }
    }

    #[test]
    fn chat_shape_has_token_logprob_bytes_and_alternatives() {
        let v = chat(&[token("é", -0.5, &[("é", -0.5), ("e", -1.0)])]);
        let entry = &v["content"][0];
        assert_eq!(entry["token"], "é");
        assert_eq!(entry["logprob"], -0.5);
        assert_eq!(entry["bytes"], json!([195, 169]));
        assert_eq!(entry["top_logprobs"][1]["token"], "e");
        assert_eq!(entry["top_logprobs"][1]["bytes"], json!([101]));
    }

    #[test]
    fn negative_infinity_becomes_minus_9999() {
        let v = chat(&[token("x", f32::NEG_INFINITY, &[])]);
        assert_eq!(v["content"][0]["logprob"], -9999.0);
    }

    #[test]
    fn completion_shape_offsets_count_characters_from_the_start() {
        let (v, end) =
            completion(&[token("Hé", -0.1, &[("Hé", -0.1), ("Ha", -2.0)]), token("!", -0.2, &[])], text(2), 3);
        assert_eq!(v["tokens"], json!(["Hé", "!"]));
        assert_eq!(v["text_offset"], json!([3, 5]));
        assert_eq!(end, 6);
        let token_logprobs: Vec<f64> =
            v["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!((token_logprobs[0] + 0.1).abs() < 1e-6 && (token_logprobs[1] + 0.2).abs() < 1e-6);
        let top = v["top_logprobs"][0].as_object().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top.contains_key("Ha"));
        // k = 1: the best alternative is the sampled token itself, so one entry.
        let (v, _) = completion(&[token("Hé", -0.1, &[("Hé", -0.1), ("Ha", -2.0)])], text(1), 0);
        assert_eq!(v["top_logprobs"][0].as_object().unwrap().len(), 1);
        // The sampled token is listed even when it is not among the k best.
        let (v, _) = completion(&[token("Ha", -2.0, &[("Hé", -0.1), ("Ha", -2.0)])], text(1), 0);
        assert_eq!(v["top_logprobs"][0].as_object().unwrap().len(), 2);
    }

    fn text(k: u32) -> Legacy {
        Legacy { k, token_ids: false }
    }

    #[test]
    fn token_ids_name_tokens_whose_texts_collide() {
        // Two partial UTF-8 pieces print as the same replacement character.
        let t = pb::TokenLogprob {
            token_id: 7,
            piece: "\u{FFFD}".into(),
            logprob: -0.5,
            top: vec![
                pb::TopLogprob { token_id: 7, piece: "\u{FFFD}".into(), logprob: -0.5 },
                pb::TopLogprob { token_id: 9, piece: "\u{FFFD}".into(), logprob: -1.5 },
            ],
        };
        let (v, _) = completion(std::slice::from_ref(&t), text(2), 0);
        assert_eq!(v["top_logprobs"][0].as_object().unwrap().len(), 1, "texts collide");
        let (v, end) = completion(&[t], Legacy { k: 2, token_ids: true }, 0);
        assert_eq!(v["tokens"], json!(["token_id:7"]));
        assert_eq!(v["top_logprobs"][0], json!({"token_id:7": -0.5, "token_id:9": -1.5}));
        assert_eq!(end, 1, "offsets still count the text");
    }
}
