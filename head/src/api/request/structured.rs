//! Structured outputs on the OpenAI API: OpenAI's `response_format`, vLLM's `structured_outputs`
//! and its older `guided_*` names become the one [`pb::StructuredOutput`] a replica compiles
//! (the replica has the tokenizer; a constraint that does not compile comes back as a 400 naming
//! the field it came from).
//!
//! Contract of [`from_body`] (chat and completions alike, as in vLLM):
//! - `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`;
//!   `strict` is type-checked only: the whole schema is always enforced.
//! - `structured_outputs`: exactly one of `json` (a schema, as an object or as JSON text),
//!   `regex`, `choice`, `grammar` (llguidance's Lark syntax), `json_object: true`; beside it the
//!   options `disable_any_whitespace`, `disable_additional_properties`, `whitespace_pattern`
//!   (and `disable_fallback`, accepted and moot: there is no other backend to fall back to).
//! - `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: the same kinds by their
//!   older names; `guided_whitespace_pattern` is the option; `guided_decoding_backend` is
//!   type-checked and ignored (llguidance is the only backend).
//! - At most one constraint in all: a second one, from any of these fields, is a 400 naming it.
//!   `structural_tag` in any form is refused as unsupported.
//!
//! The deployment's defaults (vLLM's `structured_outputs_config`) then apply to whatever
//! constraint the request ends up with ([`with_defaults`]): its `disable_any_whitespace` and
//! `disable_additional_properties` turn the options on for every request, which can turn them on
//! too but not off.
//!
//! For callers that build a constraint themselves (`tool_choice` "required" or a named function:
//! a schema built from the tools), [`tool_call`] makes one from a schema value and refuses it
//! beside the request's own constraint; [`json_schema`] makes one under any field name.

use lumen_proto::v1 as pb;
use pb::structured_output::Kind;
use serde_json::{Map, Value};

use crate::api::edge::errors::ApiError;
use crate::config::structured_outputs::StructuredOutputsConfig;

/// The keys `structured_outputs` may hold.
const STRUCTURED_OUTPUTS_KEYS: [&str; 10] = [
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "structural_tag",
    "disable_any_whitespace",
    "disable_additional_properties",
    "whitespace_pattern",
    "disable_fallback",
];

/// The request's constraint, if it asks for one (see the module docs).
pub fn from_body(body: &Map<String, Value>) -> Result<Option<pb::StructuredOutput>, ApiError> {
    let mut found: Vec<(String, Kind)> = Vec::new();
    if let Some(kind) = response_format(body.get("response_format"))? {
        found.push(("response_format".into(), kind));
    }
    let mut options = pb::StructuredOutput::default();
    if let Some(so) = body.get("structured_outputs").filter(|v| !v.is_null()) {
        let (param, kind) = structured_outputs(so, &mut options)?;
        found.push((param, kind));
    }
    found.extend(guided_fields(body)?);
    if let Some(pattern) = string_field(body, "guided_whitespace_pattern")? {
        options.whitespace_pattern = pattern;
    }
    string_field(body, "guided_decoding_backend")?;
    let mut found = found.into_iter();
    let Some((param, kind)) = found.next() else { return Ok(None) };
    if let Some((second, _)) = found.next() {
        return Err(ApiError::param(
            second.clone(),
            format!("only one structured-output constraint may be given: `{param}` and `{second}` both are"),
        ));
    }
    Ok(Some(pb::StructuredOutput { kind: Some(kind), param, ..options }))
}

/// `constraint` with the deployment's defaults: an option the server turns on is on, whatever
/// the request said (as in vLLM, where the server's setting holds for every constraint).
pub fn with_defaults(
    constraint: Option<pb::StructuredOutput>,
    defaults: &StructuredOutputsConfig,
) -> Option<pb::StructuredOutput> {
    constraint.map(|c| pb::StructuredOutput {
        disable_any_whitespace: c.disable_any_whitespace || defaults.disable_any_whitespace,
        disable_additional_properties: c.disable_additional_properties || defaults.disable_additional_properties,
        ..c
    })
}

/// A constraint to the JSON schema `schema`, reported as `param` when it does not compile.
pub fn json_schema(schema: &Value, param: &str) -> pb::StructuredOutput {
    pb::StructuredOutput {
        kind: Some(Kind::JsonSchema(schema.to_string())),
        param: param.to_string(),
        ..pb::StructuredOutput::default()
    }
}

/// The constraint of a forced tool call (`tool_choice` "required" or a named function, `schema`
/// built from the tools), refused beside a constraint the request already has ([`from_body`]'s):
/// as in vLLM, a request constrains its output either way, not both.
pub fn tool_call(existing: Option<&pb::StructuredOutput>, schema: &Value) -> Result<pb::StructuredOutput, ApiError> {
    if let Some(other) = existing {
        return Err(ApiError::param(
            "tool_choice",
            format!("a forced tool call cannot be combined with the structured-output constraint `{}`", other.param),
        ));
    }
    Ok(json_schema(schema, "tool_choice"))
}

fn response_format(value: Option<&Value>) -> Result<Option<Kind>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    let param = "response_format";
    let Some(format) = value.as_object() else {
        return Err(ApiError::param(param, format!("response_format must be an object, got {value}")));
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonObject(true))),
        Some("json_schema") => {
            let param = "response_format.json_schema";
            let Some(spec) = format.get("json_schema").and_then(Value::as_object) else {
                return Err(ApiError::param(param, "a json_schema response format needs a `json_schema` object"));
            };
            match spec.get("name") {
                Some(Value::String(name))
                    if (1..=64).contains(&name.len())
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                Some(other) => {
                    return Err(ApiError::param(
                        "response_format.json_schema.name",
                        format!("name must be 1 to 64 letters, digits, `_` or `-`, got {other}"),
                    ));
                }
                None => return Err(ApiError::param("response_format.json_schema.name", "name is required")),
            }
            for (key, ok) in [("strict", Value::is_boolean as fn(&Value) -> bool), ("description", Value::is_string)] {
                if let Some(v) = spec.get(key).filter(|v| !v.is_null() && !ok(v)) {
                    return Err(ApiError::param(format!("{param}.{key}"), format!("{key} has the wrong type: {v}")));
                }
            }
            // OpenAI's field is `schema`; vLLM also reads its own alias `json_schema`.
            let schema = spec.get("schema").or_else(|| spec.get("json_schema")).filter(|v| !v.is_null());
            let Some(schema) = schema else {
                return Err(ApiError::param(format!("{param}.schema"), "schema is required"));
            };
            Ok(Some(Kind::JsonSchema(schema_text(schema, &format!("{param}.schema"))?)))
        }
        Some("structural_tag") => {
            Err(ApiError::param(param, "response_format structural_tag is not supported by Lumen"))
        }
        _ => Err(ApiError::param(
            "response_format.type",
            "response_format.type must be one of text, json_object, json_schema",
        )),
    }
}

/// vLLM's `structured_outputs` object: its one constraint (with the field that holds it) and its
/// options, written into `options`.
fn structured_outputs(value: &Value, options: &mut pb::StructuredOutput) -> Result<(String, Kind), ApiError> {
    let Some(so) = value.as_object() else {
        return Err(ApiError::param(
            "structured_outputs",
            format!("structured_outputs must be an object, got {value}"),
        ));
    };
    if let Some(key) = so.keys().find(|k| !STRUCTURED_OUTPUTS_KEYS.contains(&k.as_str())) {
        return Err(ApiError::param(
            format!("structured_outputs.{key}"),
            format!("unknown field; structured_outputs takes {}", STRUCTURED_OUTPUTS_KEYS.join(", ")),
        ));
    }
    let flag = |key: &str| -> Result<bool, ApiError> {
        match so.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => {
                Err(ApiError::param(format!("structured_outputs.{key}"), format!("must be a boolean, got {other}")))
            }
        }
    };
    options.disable_any_whitespace = flag("disable_any_whitespace")?;
    options.disable_additional_properties = flag("disable_additional_properties")?;
    flag("disable_fallback")?;
    if let Some(pattern) = string_field(so, "whitespace_pattern").map_err(|e| prefixed(e, "structured_outputs"))? {
        options.whitespace_pattern = pattern;
    }
    if so.get("structural_tag").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::param("structured_outputs.structural_tag", "structural_tag is not supported by Lumen"));
    }
    let mut kinds = constraint_kinds(so, "structured_outputs.", ["json", "regex", "choice", "grammar"])?;
    if flag("json_object")? {
        kinds.push(("structured_outputs.json_object".into(), Kind::JsonObject(true)));
    }
    match kinds.len() {
        1 => Ok(kinds.remove(0)),
        0 => Err(ApiError::param(
            "structured_outputs",
            "structured_outputs must set one of json, regex, choice, grammar, json_object",
        )),
        _ => Err(ApiError::param(
            kinds[1].0.clone(),
            format!(
                "only one structured-output constraint may be given: `{}` and `{}` both are",
                kinds[0].0, kinds[1].0
            ),
        )),
    }
}

/// The older top-level names.
fn guided_fields(body: &Map<String, Value>) -> Result<Vec<(String, Kind)>, ApiError> {
    constraint_kinds(body, "guided_", ["json", "regex", "choice", "grammar"])
}

/// The constraints under `prefix` + each of `names` (json, regex, choice, grammar) in `map`.
fn constraint_kinds(map: &Map<String, Value>, prefix: &str, names: [&str; 4]) -> Result<Vec<(String, Kind)>, ApiError> {
    let key = |name: &str| if prefix.ends_with('.') { name.to_string() } else { format!("{prefix}{name}") };
    let mut out = Vec::new();
    for name in names {
        let Some(value) = map.get(&key(name)).filter(|v| !v.is_null()) else { continue };
        let param = format!("{prefix}{name}");
        let kind = match name {
            "json" => Kind::JsonSchema(schema_text(value, &param)?),
            "choice" => Kind::Choice(pb::ChoiceList { choices: choices(value, &param)? }),
            _ => {
                let Some(text) = value.as_str() else {
                    return Err(ApiError::param(param.clone(), format!("{param} must be a string, got {value}")));
                };
                if name == "regex" { Kind::Regex(text.to_string()) } else { Kind::Grammar(text.to_string()) }
            }
        };
        out.push((param, kind));
    }
    Ok(out)
}

/// A JSON schema given as an object (or `true`/`false`), or as JSON text holding one.
fn schema_text(value: &Value, param: &str) -> Result<String, ApiError> {
    let parsed;
    let schema = match value {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| ApiError::param(param, format!("{param} is a string but not JSON: {e}")))?;
            &parsed
        }
        other => other,
    };
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(schema.to_string()),
        other => Err(ApiError::param(param, format!("{param} must be a JSON schema (an object), got {other}"))),
    }
}

fn choices(value: &Value, param: &str) -> Result<Vec<String>, ApiError> {
    let list = value
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::param(param, format!("{param} must be a non-empty list of strings, got {value}")))?;
    list.iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .ok_or_else(|| ApiError::param(param, format!("{param} must hold strings, found {c}")))
        })
        .collect()
}

/// An optional string field of `map`; the error names `name`.
fn string_field(map: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::param(name, format!("{name} must be a string, got {other}"))),
    }
}

/// `e` with its parameter placed under `parent`.
fn prefixed(e: ApiError, parent: &str) -> ApiError {
    match e {
        ApiError::InvalidParam { param, message } => {
            ApiError::InvalidParam { param: format!("{parent}.{param}"), message }
        }
        other => other,
    }
}

#[cfg(test)]
#[path = "structured_tests.rs"]
mod tests;
