//! The request fields vLLM accepts that Lumen does not act on: each is checked for the type (and
//! range) vLLM gives it, so a wrong type is a 400 naming the field rather than silently ignored;
//! and a field whose value would change the answer (beam search, a per-request chat template,
//! ...) is accepted only with its inert value — anything else is a
//! 400 saying Lumen does not support it, never an answer that quietly ignores the request.
//!
//! Informational fields (`user`, `request_id`, hints such as `stream_interval`) are checked and
//! otherwise ignored. `tools` is not listed (handled, or not, elsewhere), and neither are
//! `response_format`, `structured_outputs` and the `guided_*` fields: [`crate::api::request::structured`]
//! checks and carries them.

use serde_json::{Map, Value};

use crate::api::edge::errors::ApiError;
use crate::api::request::params;

/// What a field holds, as vLLM types it.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    Bool,
    Int,
    /// An integer, at least this.
    IntAtLeast(i64),
    Float,
    Str,
    /// A string of this many characters (inclusive).
    StrLen(usize, usize),
    Object,
    IntList,
    StrList,
    ObjectList,
    OneOf(&'static [&'static str]),
    /// Anything (a type vLLM leaves open).
    Any,
}

/// Which values leave the answer unchanged.
#[derive(Clone, Copy, Debug)]
pub enum Inert {
    /// Every value (the field is informational, or a hint Lumen may ignore).
    Any,
    /// Only null (or the field left out).
    Null,
    /// `false` (or null).
    False,
    /// `true` (or null).
    True,
    /// 0 (or null).
    Zero,
    /// An empty list (or null).
    Empty,
    /// Null, or 1 (`best_of`).
    One,
    /// Null, or -1 (`thinking_token_budget`'s "unlimited").
    MinusOne,
}

/// One checked field.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub expect: Expect,
    /// Whether null is accepted.
    pub nullable: bool,
    pub inert: Inert,
}

pub const fn field(name: &'static str, expect: Expect, nullable: bool, inert: Inert) -> Field {
    Field { name, expect, nullable, inert }
}

/// Fields of both chat and completions.
const GENERATION: &[Field] = &[
    field("user", Expect::Str, true, Inert::Any),
    field("request_id", Expect::Str, false, Inert::Any),
    field("session_id", Expect::Str, true, Inert::Any),
    field("use_beam_search", Expect::Bool, false, Inert::False),
    field("length_penalty", Expect::Float, false, Inert::Any),
    field("watermarking", Expect::Bool, true, Inert::False),
    field("spaces_between_special_tokens", Expect::Bool, false, Inert::Any),
    field("truncate_prompt_tokens", Expect::IntAtLeast(-1), true, Inert::Null),
    field("truncation_side", Expect::OneOf(&["left", "right"]), true, Inert::Any),
    field("allowed_token_ids", Expect::IntList, true, Inert::Null),
    field("logprob_token_ids", Expect::IntList, true, Inert::Null),
    field("bad_words", Expect::StrList, false, Inert::Empty),
    // Acted on: carried to the replica, whose scheduling policy decides (params.rs).
    field("priority", Expect::Int, false, Inert::Any),
    field("return_token_ids", Expect::Bool, true, Inert::False),
    // Acted on: the replica's prefix cache is salted with it (params.rs).
    field("cache_salt", Expect::StrLen(1, 1024), true, Inert::Any),
    field("kv_transfer_params", Expect::Object, true, Inert::Any),
    field("vllm_xargs", Expect::Object, true, Inert::Any),
    field("repetition_detection", Expect::Object, true, Inert::Null),
    field("thinking_token_budget", Expect::IntAtLeast(-1), true, Inert::MinusOne),
    field("stream_interval", Expect::IntAtLeast(1), true, Inert::Any),
];

/// Chat's own.
const CHAT: &[Field] = &[
    field("echo", Expect::Bool, false, Inert::False),
    field("continue_final_message", Expect::Bool, false, Inert::False),
    field("add_special_tokens", Expect::Bool, false, Inert::False),
    field("documents", Expect::ObjectList, true, Inert::Null),
    field("chat_template", Expect::Str, true, Inert::Null),
    field("media_io_kwargs", Expect::Object, true, Inert::Any),
    field("mm_processor_kwargs", Expect::Object, true, Inert::Any),
    field("return_prompt_text", Expect::Bool, true, Inert::False),
    field(
        "reasoning_effort",
        Expect::OneOf(&["none", "minimal", "low", "medium", "high", "xhigh", "max"]),
        true,
        Inert::Any,
    ),
    field("include_reasoning", Expect::Bool, false, Inert::True),
    // Completions name logprob tokens `token_id:N` when it is true (completions.rs); chat not yet.
    field("return_tokens_as_token_ids", Expect::Bool, true, Inert::False),
];

/// Completions' own.
const COMPLETIONS: &[Field] = &[
    field("best_of", Expect::IntAtLeast(1), true, Inert::One),
    field("prompt_embeds", Expect::Any, true, Inert::Null),
];

/// `/v1/embeddings`' (the fields it acts on are read by `embeddings::request`).
pub const EMBEDDINGS: &[Field] = &[
    field("user", Expect::Str, true, Inert::Any),
    field("request_id", Expect::Str, false, Inert::Any),
    field("priority", Expect::Int, false, Inert::Zero),
    field("mm_processor_kwargs", Expect::Object, true, Inert::Any),
    field("cache_salt", Expect::StrLen(1, 1024), true, Inert::Null),
];

/// `/tokenize`'s (with `messages`, as vLLM's chat variant).
pub const TOKENIZE: &[Field] = &[
    field("continue_final_message", Expect::Bool, false, Inert::False),
    field("chat_template", Expect::Str, true, Inert::Null),
    field("mm_processor_kwargs", Expect::Object, true, Inert::Any),
];

/// Checks `body` against the fields of a chat request.
pub fn check_chat(body: &Map<String, Value>) -> Result<(), ApiError> {
    check(body, GENERATION)?;
    check(body, CHAT)?;
    prompt_logprobs(body).map(drop)
}

/// Checks `body` against the fields of a completion request.
pub fn check_completions(body: &Map<String, Value>) -> Result<(), ApiError> {
    check(body, GENERATION)?;
    check(body, COMPLETIONS)?;
    prompt_logprobs(body).map(drop)
}

/// Checks each of `fields` that `body` holds.
pub fn check(body: &Map<String, Value>, fields: &[Field]) -> Result<(), ApiError> {
    for f in fields {
        let Some(value) = body.get(f.name) else { continue };
        if value.is_null() {
            if f.nullable {
                continue;
            }
            return Err(ApiError::param(f.name, format!("{} must not be null", f.name)));
        }
        typed(f.name, f.expect, value)?;
        if !inert(f.inert, value) {
            return Err(ApiError::param(
                f.name,
                format!("{} {value} is not supported by Lumen ({})", f.name, inert_values(f.inert)),
            ));
        }
    }
    Ok(())
}

/// vLLM's `prompt_logprobs`: an integer, -1 or at least 0, not above 0 with `stream` (nor -1),
/// and at most 20 (vLLM's default `max_logprobs`; -1, the whole vocabulary, is more). Returns
/// the number of alternatives per prompt token.
pub fn prompt_logprobs(body: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    let Some(value) = body.get("prompt_logprobs").filter(|v| !v.is_null()) else { return Ok(None) };
    let Some(n) = value.as_i64() else {
        return Err(ApiError::param("prompt_logprobs", format!("prompt_logprobs must be an integer, got {value}")));
    };
    if n < -1 {
        return Err(ApiError::param("prompt_logprobs", format!("prompt_logprobs must be -1 or at least 0, got {n}")));
    }
    if body.get("stream") == Some(&Value::Bool(true)) && n != 0 {
        return Err(ApiError::param("prompt_logprobs", "prompt_logprobs are not available when stream is true"));
    }
    let max = params::MAX_LOGPROBS;
    if n == -1 || n > max {
        let asked = if n == -1 { "the whole vocabulary (-1)".to_string() } else { n.to_string() };
        return Err(ApiError::param(
            "prompt_logprobs",
            format!("requested prompt logprobs of {asked}, which is more than the {max} allowed"),
        ));
    }
    Ok(Some(n as u32))
}

/// Why `value` does not hold what `expect` says, naming `name`.
fn typed(name: &str, expect: Expect, value: &Value) -> Result<(), ApiError> {
    let fail = |what: &str| Err(ApiError::param(name, format!("{name} must be {what}, got {value}")));
    let int = |v: &Value| v.as_i64().is_some() || v.as_u64().is_some();
    match expect {
        Expect::Any => Ok(()),
        Expect::Bool if value.is_boolean() => Ok(()),
        Expect::Bool => fail("a boolean"),
        Expect::Int if int(value) => Ok(()),
        Expect::Int => fail("an integer"),
        Expect::IntAtLeast(min) => match value.as_i64() {
            Some(v) if v >= min => Ok(()),
            Some(_) => fail(&format!("at least {min}")),
            None if value.as_u64().is_some() => Ok(()),
            None => fail(&format!("an integer, at least {min}")),
        },
        Expect::Float if value.is_number() => Ok(()),
        Expect::Float => fail("a number"),
        Expect::Str if value.is_string() => Ok(()),
        Expect::Str => fail("a string"),
        Expect::StrLen(min, max) => match value.as_str().map(|s| s.chars().count()) {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => Err(ApiError::param(name, format!("{name} must hold {min} to {max} characters, got {n}"))),
            None => fail("a string"),
        },
        Expect::Object if value.is_object() => Ok(()),
        Expect::Object => fail("an object"),
        Expect::IntList if value.as_array().is_some_and(|a| a.iter().all(int)) => Ok(()),
        Expect::IntList => fail("a list of integers"),
        Expect::StrList if value.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => Ok(()),
        Expect::StrList => fail("a list of strings"),
        Expect::ObjectList if value.as_array().is_some_and(|a| a.iter().all(Value::is_object)) => Ok(()),
        Expect::ObjectList => fail("a list of objects"),
        Expect::OneOf(names) if value.as_str().is_some_and(|s| names.contains(&s)) => Ok(()),
        Expect::OneOf(names) => fail(&format!("one of {}", names.join(", "))),
    }
}

fn inert(inert: Inert, value: &Value) -> bool {
    match inert {
        Inert::Any => true,
        Inert::Null => value.is_null(),
        Inert::False => value == &Value::Bool(false),
        Inert::True => value == &Value::Bool(true),
        Inert::Zero => value.as_i64() == Some(0),
        Inert::Empty => value.as_array().is_some_and(Vec::is_empty),
        Inert::One => value.as_i64() == Some(1),
        Inert::MinusOne => value.as_i64() == Some(-1),
    }
}

fn inert_values(inert: Inert) -> &'static str {
    match inert {
        Inert::Any => "any value",
        Inert::Null => "only null",
        Inert::False => "only false",
        Inert::True => "only true",
        Inert::Zero => "only 0",
        Inert::Empty => "only an empty list",
        Inert::One => "only 1",
        Inert::MinusOne => "only -1",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(body: Value) -> (String, String) {
        match check_chat(body.as_object().unwrap()).and_then(|()| check_completions(body.as_object().unwrap())) {
            Err(ApiError::InvalidParam { param, message }) => (param, message),
            other => panic!("{body}: expected a parameter error, got {other:?}"),
        }
    }

    #[test]
    fn inert_values_and_nulls_are_accepted() {
        let body = json!({
            "user": "u-1", "request_id": "r", "use_beam_search": false, "length_penalty": 1.0, "watermarking": null,
            "truncate_prompt_tokens": null, "bad_words": [], "priority": 0, "cache_salt": null, "echo": false,
            "include_reasoning": true, "reasoning_effort": "low", "stream_interval": 4, "best_of": 1,
            "thinking_token_budget": -1, "prompt_logprobs": null, "vllm_xargs": {"a": 1},
        });
        check_chat(body.as_object().unwrap()).unwrap();
        check_completions(body.as_object().unwrap()).unwrap();
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, param, says) in [
            (json!({"user": 5}), "user", "must be a string, got 5"),
            (json!({"use_beam_search": "no"}), "use_beam_search", "must be a boolean"),
            (json!({"priority": 1.5}), "priority", "must be an integer"),
            (json!({"truncate_prompt_tokens": -2}), "truncate_prompt_tokens", "at least -1"),
            (json!({"cache_salt": ""}), "cache_salt", "1 to 1024 characters, got 0"),
            (json!({"reasoning_effort": "huge"}), "reasoning_effort", "one of none"),
            (json!({"request_id": null}), "request_id", "must not be null"),
            (json!({"prompt_logprobs": "1"}), "prompt_logprobs", "must be an integer"),
            (json!({"prompt_logprobs": -2}), "prompt_logprobs", "-1 or at least 0, got -2"),
            (json!({"prompt_logprobs": 1, "stream": true}), "prompt_logprobs", "not available when stream"),
            (json!({"prompt_logprobs": 21}), "prompt_logprobs", "more than the 20 allowed"),
            (json!({"prompt_logprobs": -1}), "prompt_logprobs", "the whole vocabulary"),
        ] {
            let (got, message) = refused(body.clone());
            assert_eq!(got, param, "{body}");
            assert!(message.contains(says), "{body}: `{message}` should say `{says}`");
        }
    }

    #[test]
    fn values_that_would_change_the_answer_are_refused_as_unsupported() {
        for (body, param) in [
            (json!({"use_beam_search": true}), "use_beam_search"),
            (json!({"chat_template": "{{ messages }}"}), "chat_template"),
            (json!({"bad_words": ["x"]}), "bad_words"),
            (json!({"include_reasoning": false}), "include_reasoning"),
        ] {
            let (got, message) = refused(body.clone());
            assert_eq!(got, param, "{body}");
            assert!(message.contains("not supported"), "{body}: {message}");
        }
    }
}
