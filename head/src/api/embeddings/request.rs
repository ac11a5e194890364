//! An embeddings request body, read and checked as vLLM reads it (`EmbeddingCompletionRequest`):
//! `input` in the four prompt shapes ([`crate::api::request::prompts`]), at most [`MAX_INPUTS`] of them,
//! no empty string; `encoding_format` `float` (default) or `base64`; `dimensions` only for a
//! matryoshka model (Lumen serves none: any value is vLLM's 400); `truncate_prompt_tokens`
//! (-1 = `max_model_len`, else at least 1 and at most `max_model_len`: keep the last N tokens);
//! `add_special_tokens` (default true); vLLM's `normalize` override; `embed_dtype` `float32` and
//! `endianness` `native`/`little` only (what Lumen sends). `user` and vLLM's informational
//! fields are checked for type and ignored (`fields::EMBEDDINGS`).

use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::edge::errors::ApiError;
use crate::api::request::body::typed;
use crate::api::request::fields;
use crate::api::request::prompts;
use crate::backend::ModelCard;

/// The most inputs one request may embed (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// How vectors are written in the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// A JSON array of numbers.
    Float,
    /// The little-endian f32 bytes, base64 (standard alphabet, padded), as OpenAI sends them.
    Base64,
}

#[derive(Debug, Default, Deserialize)]
struct Fields {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    truncate_prompt_tokens: Option<i64>,
    add_special_tokens: Option<bool>,
    normalize: Option<bool>,
    embed_dtype: Option<String>,
    endianness: Option<String>,
}

/// A checked embeddings request.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub inputs: Vec<pb::generate_request::Prompt>,
    pub encoding: Encoding,
    dimensions: Option<i64>,
    truncate_prompt_tokens: Option<i64>,
    normalize: Option<bool>,
}

impl EmbeddingRequest {
    /// Reads and checks what does not depend on the model.
    pub fn parse(body: &Map<String, Value>) -> Result<Self, ApiError> {
        let fields: Fields = typed(body)?;
        fields::check(body, fields::EMBEDDINGS)?;
        let input = fields.input.as_ref().ok_or_else(|| ApiError::param("input", "input is required"))?;
        let inputs = prompts::parse("input", input, fields.add_special_tokens.unwrap_or(true))?;
        if inputs.len() > MAX_INPUTS {
            return Err(ApiError::param("input", format!("at most {MAX_INPUTS} inputs, got {}", inputs.len())));
        }
        if inputs.iter().any(|p| matches!(p, pb::generate_request::Prompt::Text(t) if t.text.is_empty())) {
            return Err(ApiError::param("input", "input must not contain an empty string"));
        }
        let encoding = match fields.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(ApiError::param(
                    "encoding_format",
                    format!("encoding_format must be 'float' or 'base64', got {other:?}"),
                ));
            }
        };
        if let Some(dtype) = fields.embed_dtype.as_deref().filter(|d| *d != "float32") {
            return Err(ApiError::param("embed_dtype", format!("embed_dtype {dtype:?} is not supported; use float32")));
        }
        if let Some(order) = fields.endianness.as_deref().filter(|e| !["native", "little"].contains(e)) {
            return Err(ApiError::param("endianness", format!("endianness {order:?} is not supported; use little")));
        }
        if let Some(t) = fields.truncate_prompt_tokens
            && (t == 0 || t < -1)
        {
            return Err(ApiError::param("truncate_prompt_tokens", format!("must be -1 or at least 1, got {t}")));
        }
        Ok(EmbeddingRequest {
            model: fields.model,
            inputs,
            encoding,
            dimensions: fields.dimensions,
            truncate_prompt_tokens: fields.truncate_prompt_tokens,
            normalize: fields.normalize,
        })
    }

    /// Checks what depends on the model (in vLLM's words) and returns the pooling every input
    /// asks of its replica.
    pub fn pooling(&self, card: &ModelCard) -> Result<pb::PoolingRequest, ApiError> {
        if let Some(d) = self.dimensions {
            if d < 1 {
                return Err(ApiError::param("dimensions", "Dimensions must be greater than 0"));
            }
            return Err(ApiError::param(
                "dimensions",
                format!(
                    "Model \"{}\" does not support matryoshka representation, changing output dimensions will lead to poor results.",
                    card.id
                ),
            ));
        }
        let max_model_len = i64::from(card.max_model_len);
        let truncate = match self.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(card.max_model_len),
            Some(t) if t > max_model_len && max_model_len > 0 => {
                return Err(ApiError::param(
                    "truncate_prompt_tokens",
                    format!(
                        "truncate_prompt_tokens value ({t}) is greater than max_model_len ({max_model_len}). Please, select a smaller truncation size."
                    ),
                ));
            }
            Some(t) => Some(u32::try_from(t).unwrap_or(u32::MAX)),
        };
        Ok(pb::PoolingRequest { normalize: self.normalize, truncate_prompt_tokens: truncate })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<EmbeddingRequest, ApiError> {
        EmbeddingRequest::parse(body.as_object().unwrap())
    }

    fn param(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidParam { param, .. }) => param,
            other => panic!("not a parameter error: {other:?}"),
        }
    }

    fn card() -> ModelCard {
        ModelCard {
            id: "e".into(),
            max_model_len: 64,
            created: 0,
            owned_by: "lumen".into(),
            runner: Default::default(),
        }
    }

    #[test]
    fn defaults_are_float_and_special_tokens() {
        let req = parse(json!({"input": ["a", "b"], "user": "u-1"})).unwrap();
        assert_eq!(req.encoding, Encoding::Float);
        assert_eq!(req.inputs.len(), 2);
        assert!(matches!(&req.inputs[0], pb::generate_request::Prompt::Text(t) if t.add_special_tokens));
        assert_eq!(req.pooling(&card()).unwrap(), pb::PoolingRequest::default());
        let req = parse(json!({"input": [1, 2], "encoding_format": "base64", "normalize": false})).unwrap();
        assert_eq!(req.encoding, Encoding::Base64);
        assert_eq!(req.pooling(&card()).unwrap().normalize, Some(false));
    }

    #[test]
    fn bad_fields_are_refused_naming_them() {
        assert_eq!(param(parse(json!({}))), "input");
        assert_eq!(param(parse(json!({"input": []}))), "input");
        assert_eq!(param(parse(json!({"input": ""}))), "input");
        assert_eq!(param(parse(json!({"input": ["a", ""]}))), "input");
        assert_eq!(param(parse(json!({"input": [[1], []]}))), "input");
        assert_eq!(param(parse(json!({"input": [-1]}))), "input");
        assert_eq!(param(parse(json!({"input": vec!["a"; MAX_INPUTS + 1]}))), "input");
        assert_eq!(param(parse(json!({"input": "a", "encoding_format": "bytes"}))), "encoding_format");
        assert_eq!(param(parse(json!({"input": "a", "user": 5}))), "user");
        assert_eq!(param(parse(json!({"input": "a", "dimensions": "x"}))), "dimensions");
        assert_eq!(param(parse(json!({"input": "a", "truncate_prompt_tokens": 0}))), "truncate_prompt_tokens");
        assert_eq!(param(parse(json!({"input": "a", "embed_dtype": "float16"}))), "embed_dtype");
        assert_eq!(param(parse(json!({"input": "a", "endianness": "big"}))), "endianness");
        assert_eq!(param(parse(json!({"input": "a", "priority": 3}))), "priority");
    }

    #[test]
    fn dimensions_and_truncation_follow_vllm() {
        let req = parse(json!({"input": "a", "dimensions": 8})).unwrap();
        let Err(ApiError::InvalidParam { message, .. }) = req.pooling(&card()) else { panic!("refused") };
        assert!(message.contains("does not support matryoshka representation"), "{message}");
        let req = parse(json!({"input": "a", "truncate_prompt_tokens": -1})).unwrap();
        assert_eq!(req.pooling(&card()).unwrap().truncate_prompt_tokens, Some(64));
        let req = parse(json!({"input": "a", "truncate_prompt_tokens": 5})).unwrap();
        assert_eq!(req.pooling(&card()).unwrap().truncate_prompt_tokens, Some(5));
        let req = parse(json!({"input": "a", "truncate_prompt_tokens": 65})).unwrap();
        assert_eq!(param(req.pooling(&card())), "truncate_prompt_tokens");
    }
}
