//! Log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and the legacy completions shape `{tokens, token_logprobs, top_logprobs,
//! text_offset}` (with `echo`, over the prompt's tokens too) — and vLLM's `prompt_logprobs` list.
//! As vLLM does, `-inf` becomes -9999 (JSON has no infinities).

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
pub fn completion(tokens: &[pb::TokenLogprob], legacy: Legacy, offset: usize) -> (Value, usize) {
    completion_echo(None, tokens, legacy, offset)
}

/// [`completion`] preceded, with `echo`, by the prompt's tokens: the first with a null
/// log-probability and null `top_logprobs` (nothing precedes it), as vLLM and OpenAI write it.
pub fn completion_echo(
    prompt: Option<&pb::PromptLogprobs>,
    tokens: &[pb::TokenLogprob],
    legacy: Legacy,
    offset: usize,
) -> (Value, usize) {
    let mut shape = LegacyShape { offset, ..LegacyShape::default() };
    if let Some(p) = prompt {
        shape.unscored(legacy.name(p.first_token_id, &p.first_piece), &p.first_piece);
        p.tokens.iter().for_each(|t| shape.push(t, legacy));
    }
    tokens.iter().for_each(|t| shape.push(t, legacy));
    let offset = shape.offset;
    let value = json!({
        "tokens": shape.tokens,
        "token_logprobs": shape.token_logprobs,
        "top_logprobs": shape.top_logprobs,
        "text_offset": shape.text_offset,
    });
    (value, offset)
}

#[derive(Default)]
struct LegacyShape {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl LegacyShape {
    fn unscored(&mut self, name: String, piece: &str) {
        self.tokens.push(json!(name));
        self.token_logprobs.push(Value::Null);
        self.top_logprobs.push(Value::Null);
        self.text_offset.push(json!(self.offset));
        self.offset += piece.chars().count();
    }

    fn push(&mut self, t: &pb::TokenLogprob, legacy: Legacy) {
        let name = legacy.name(t.token_id, &t.piece);
        self.tokens.push(json!(name));
        self.token_logprobs.push(json!(finite(t.logprob)));
        let mut top = Map::new();
        top.insert(name, json!(finite(t.logprob)));
        for alt in t.top.iter().take(legacy.k as usize) {
            top.entry(legacy.name(alt.token_id, &alt.piece)).or_insert_with(|| json!(finite(alt.logprob)));
        }
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(json!(self.offset));
        self.offset += t.piece.chars().count();
    }
}

/// vLLM's `prompt_logprobs`: null for the first prompt token, then per token an object from token
/// id (as a string) to `{logprob, rank, decoded_token}` holding the prompt's token and the `k`
/// most likely ones.
pub fn prompt_logprobs(p: &pb::PromptLogprobs, k: u32) -> Value {
    let entry = |logprob: f32, rank: u32, piece: &str| json!({"logprob": finite(logprob), "rank": rank, "decoded_token": piece});
    let mut out = vec![Value::Null];
    for t in &p.tokens {
        let mut map = Map::new();
        map.insert(t.token_id.to_string(), entry(t.logprob, t.rank, &t.piece));
        for (i, alt) in t.top.iter().take(k as usize).enumerate() {
            map.entry(alt.token_id.to_string()).or_insert_with(|| entry(alt.logprob, i as u32 + 1, &alt.piece));
        }
        out.push(Value::Object(map));
    }
    Value::Array(out)
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
            rank: 0,
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
            rank: 1,
        };
        let (v, _) = completion(std::slice::from_ref(&t), text(2), 0);
        assert_eq!(v["top_logprobs"][0].as_object().unwrap().len(), 1, "texts collide");
        let (v, end) = completion(&[t], Legacy { k: 2, token_ids: true }, 0);
        assert_eq!(v["tokens"], json!(["token_id:7"]));
        assert_eq!(v["top_logprobs"][0], json!({"token_id:7": -0.5, "token_id:9": -1.5}));
        assert_eq!(end, 1, "offsets still count the text");
    }

    #[test]
    fn echo_starts_with_an_unscored_first_token_and_prompt_logprobs_list_rank_and_text() {
        let mut scored = token(" world", -1.5, &[(" there", -0.5), (" world", -1.5)]);
        scored.token_id = 5;
        scored.rank = 2;
        scored.top[0].token_id = 6;
        scored.top[1].token_id = 5;
        let prompt = pb::PromptLogprobs { tokens: vec![scored], first_token_id: 4, first_piece: "Hello".into() };
        let (v, end) = completion_echo(Some(&prompt), &[token("!", -0.1, &[])], text(1), 0);
        assert_eq!(v["tokens"], json!(["Hello", " world", "!"]));
        assert_eq!(v["token_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][1], json!({" world": -1.5, " there": -0.5}));
        assert_eq!(v["text_offset"], json!([0, 5, 11]));
        assert_eq!(end, 12);
        let p = prompt_logprobs(&prompt, 1);
        assert_eq!(p[0], Value::Null);
        assert_eq!(p[1]["5"], json!({"logprob": -1.5, "rank": 2, "decoded_token": " world"}));
        assert_eq!(p[1]["6"], json!({"logprob": -0.5, "rank": 1, "decoded_token": " there"}));
        assert_eq!(prompt_logprobs(&prompt, 0)[1].as_object().unwrap().len(), 1, "k = 0: the prompt token only");
    }
}
