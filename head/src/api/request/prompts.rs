//! The prompt shapes of `/v1/completions` (`prompt`) and `/v1/embeddings` (`input`): a string, a
//! list of strings, a list of token ids, or a list of token-id lists, each becoming one
//! protocol prompt. Errors name the field; an empty list and an empty token list are refused,
//! and token ids must be whole numbers that fit a `u32` (the worker checks the vocabulary).

use lumen_proto::v1 as pb;
use serde_json::Value;

use crate::api::edge::errors::ApiError;
use crate::api::request::params::token_ids;

/// The prompts `value` (the field `param`) holds, in order.
pub fn parse(
    param: &str,
    value: &Value,
    add_special_tokens: bool,
) -> Result<Vec<pb::generate_request::Prompt>, ApiError> {
    let text =
        |text: &str| pb::generate_request::Prompt::Text(pb::TextPrompt { text: text.to_string(), add_special_tokens });
    let tokens = |ids: &[Value]| -> Result<pb::generate_request::Prompt, ApiError> {
        let ids: Vec<i64> = ids
            .iter()
            .map(|v| v.as_i64().ok_or_else(|| ApiError::param(param, format!("token ids must be integers, found {v}"))))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Err(ApiError::param(param, "a token prompt must not be empty"));
        }
        Ok(pb::generate_request::Prompt::Tokens(pb::TokenPrompt { token_ids: token_ids(param, &ids)? }))
    };
    let shape_error = || {
        ApiError::param(
            param,
            format!("{param} must be a string, a list of strings, a list of token ids or a list of token-id lists"),
        )
    };
    match value {
        Value::String(s) => Ok(vec![text(s)]),
        Value::Array(items) if items.is_empty() => Err(ApiError::param(param, format!("{param} must not be empty"))),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items.iter().map(|v| v.as_str().map(text).ok_or_else(shape_error)).collect(),
            Value::Number(_) => Ok(vec![tokens(items)?]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) => tokens(ids),
                    _ => Err(shape_error()),
                })
                .collect(),
            _ => Err(shape_error()),
        },
        _ => Err(shape_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::generate_request::Prompt;

    fn parse_as(param: &str, json: &str) -> Result<Vec<Prompt>, ApiError> {
        parse(param, &serde_json::from_str(json).unwrap(), true)
    }

    #[test]
    fn every_prompt_shape_is_accepted() {
        let parse = |json| parse_as("prompt", json);
        assert!(matches!(&parse(r#""hi""#).unwrap()[..], [Prompt::Text(t)] if t.text == "hi" && t.add_special_tokens));
        assert_eq!(parse(r#"["a", "b"]"#).unwrap().len(), 2);
        assert!(matches!(&parse("[1, 2, 3]").unwrap()[..], [Prompt::Tokens(t)] if t.token_ids == [1, 2, 3]));
        assert!(
            matches!(&parse("[[1], [2, 3]]").unwrap()[..], [Prompt::Tokens(_), Prompt::Tokens(b)] if b.token_ids == [2, 3])
        );
    }

    #[test]
    fn malformed_prompts_name_the_field() {
        for field in ["prompt", "input"] {
            for bad in ["[]", "5", "null", r#"["a", 1]"#, "[1, -2]", "[1, 2.5]", "[[1], []]", r#"[[1], "a"]"#, "[true]"]
            {
                let err = parse_as(field, bad);
                assert!(matches!(err, Err(ApiError::InvalidParam { ref param, .. }) if param == field), "{bad}");
            }
        }
    }
}
