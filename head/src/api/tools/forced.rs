//! `tool_choice: "required"` and a named function: the JSON Schema decoding must follow, and
//! the parsers of the output it produces (vLLM's shapes).
//!
//! - Named (`{"type": "function", "function": {"name": F}}`): the output is F's arguments, an
//!   object valid against F's `parameters` ([`schema`] returns those parameters).
//! - `required`: the output is a JSON array of at least one (exactly one without
//!   `parallel_tool_calls`) `{"name": N, "parameters": {...}}`, N one of the tools and the
//!   parameters valid against N's schema; every tool's `$defs` are lifted to the array's schema
//!   (their `#/$defs/...` references then still resolve), a name defined twice differently is
//!   refused.
//!
//! These outputs are only guaranteed with constrained decoding; see [`super::request`] for where
//! the schema is attached.

use serde_json::{Map, Value, json};

use super::llama3_json::{Sequence, Shape};
use super::{ToolCallParser, ToolEvent};
use crate::api::edge::errors::ApiError;

const REQUIRED: Shape =
    Shape { opening: "[", opening_required: true, separator: b',', closing: Some("]"), strict: true };

/// The parser of a `required` output (a JSON array of calls).
pub fn required() -> Sequence {
    Sequence::new(REQUIRED)
}

/// The parameters' schema of a tool (`{"type": "object"}` when it has none).
fn parameters(tool: &Value) -> Value {
    tool.pointer("/function/parameters").filter(|p| p.is_object()).cloned().unwrap_or_else(|| json!({"type": "object"}))
}

/// The name of a tool.
fn name(tool: &Value) -> &str {
    tool.pointer("/function/name").and_then(Value::as_str).unwrap_or_default()
}

/// The schema the output of a named `tool_choice` must follow: the function's parameters.
pub fn named_schema(tool: &Value) -> Value {
    parameters(tool)
}

/// The schema the output of `tool_choice: "required"` must follow (see the module docs).
pub fn required_schema(tools: &[Value], parallel: bool) -> Result<Value, ApiError> {
    let mut defs = Map::new();
    let mut items = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let mut params = parameters(tool);
        if let Some(Value::Object(own)) = params.as_object_mut().and_then(|p| p.remove("$defs")) {
            for (key, def) in own {
                match defs.get(&key) {
                    Some(seen) if *seen != def => {
                        return Err(ApiError::param(
                            format!("tools[{i}].function.parameters.$defs.{key}"),
                            format!("`$defs.{key}` is defined differently by two tools"),
                        ));
                    }
                    _ => {
                        defs.insert(key, def);
                    }
                }
            }
        }
        items.push(json!({
            "properties": {"name": {"type": "string", "enum": [name(tool)]}, "parameters": params},
            "required": ["name", "parameters"],
        }));
    }
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    Ok(schema)
}

/// The output of a named `tool_choice`: all of it is the arguments of one call.
#[derive(Debug)]
pub struct Named {
    name: String,
    begun: bool,
    arguments: String,
}

impl Named {
    pub fn new(name: impl Into<String>) -> Self {
        Named { name: name.into(), begun: false, arguments: String::new() }
    }

    fn begin(&mut self, out: &mut Vec<ToolEvent>) {
        if !self.begun {
            self.begun = true;
            out.push(ToolEvent::Begin { name: self.name.clone() });
        }
    }
}

impl ToolCallParser for Named {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        if text.is_empty() {
            return;
        }
        self.begin(out);
        self.arguments.push_str(text);
        out.push(ToolEvent::Arguments(text.to_string()));
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        self.begin(out);
    }

    fn well_formed(&self) -> bool {
        serde_json::from_str::<Value>(&self.arguments).is_ok_and(|v| v.is_object())
    }
}

#[cfg(test)]
mod tests {
    use super::super::every_split;
    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object",
                "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}),
            json!({"type": "function", "function": {"name": "b"}}),
        ]
    }

    #[test]
    fn required_schema_lists_every_tool_and_lifts_defs() {
        let schema = required_schema(&tools(), true).unwrap();
        assert_eq!(schema["minItems"], 1);
        assert!(schema.get("maxItems").is_none());
        assert_eq!(schema["$defs"], json!({"P": {"type": "integer"}}));
        let items = schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(items[0]["properties"]["name"]["enum"], json!(["a"]));
        assert!(items[0]["properties"]["parameters"].get("$defs").is_none());
        assert_eq!(items[1]["properties"]["parameters"], json!({"type": "object"}));
        assert_eq!(required_schema(&tools(), false).unwrap()["maxItems"], 1);
    }

    #[test]
    fn conflicting_defs_are_refused_by_name() {
        let mut t = tools();
        t[1]["function"]["parameters"] = json!({"type": "object", "$defs": {"P": {"type": "string"}}});
        match required_schema(&t, true) {
            Err(ApiError::InvalidParam { param, .. }) => assert_eq!(param, "tools[1].function.parameters.$defs.P"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn named_schema_is_the_parameters() {
        assert_eq!(named_schema(&tools()[1]), json!({"type": "object"}));
        assert_eq!(named_schema(&tools()[0])["properties"]["p"], json!({"$ref": "#/$defs/P"}));
    }

    #[test]
    fn the_required_output_is_an_array_of_calls() {
        let out = r#"[{"name": "a", "parameters": {"p": 1}}, {"name": "b", "parameters": {}}]"#;
        let ((content, calls), ok) = every_split(required, out);
        assert!(ok);
        assert_eq!(content, "");
        assert_eq!(calls, vec![("a".into(), r#"{"p": 1}"#.into()), ("b".into(), "{}".into())]);
        let (_, ok) = every_split(required, "[]");
        assert!(!ok, "at least one call");
        let (_, ok) = every_split(required, r#"{"name": "a", "parameters": {}}"#);
        assert!(!ok, "an array is required");
    }

    #[test]
    fn the_named_output_is_the_arguments() {
        let ((content, calls), ok) = every_split(|| Named::new("f"), r#"{"x": [1, "é"]}"#);
        assert!(ok);
        assert_eq!((content.as_str(), calls), ("", vec![("f".into(), r#"{"x": [1, "é"]}"#.into())]));
        let (_, ok) = every_split(|| Named::new("f"), "not json");
        assert!(!ok);
    }
}
