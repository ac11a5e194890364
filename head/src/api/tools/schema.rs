//! A structural check of the JSON Schemas a request carries (a function's `parameters`): every
//! subschema is an object or a boolean and the keywords that hold schemas, lists or numbers hold
//! them, so a malformed schema is a 400 naming the keyword's path
//! (`tools[0].function.parameters.properties.city.type`) instead of a template or decoder failing
//! later. Keywords it does not know are left alone (JSON Schema allows them). Whether a schema
//! compiles for constrained decoding (regex patterns, formats) is the grammar engine's check.

use serde_json::Value;

use crate::api::edge::errors::ApiError;

/// JSON Schema's type names.
const TYPES: [&str; 7] = ["object", "array", "string", "number", "integer", "boolean", "null"];
/// How deep subschemas may nest.
pub const MAX_DEPTH: usize = 64;

/// Checks a function's `parameters` at `param`: a JSON Schema of an object (OpenAI's rule:
/// `type`, if given, is `"object"`).
pub fn check_parameters(param: &str, schema: &Value) -> Result<(), ApiError> {
    let Some(object) = schema.as_object() else {
        return Err(ApiError::param(param, format!("parameters must be a JSON Schema object, got {schema}")));
    };
    if let Some(kind) = object.get("type")
        && kind != "object"
    {
        return Err(ApiError::param(
            format!("{param}.type"),
            format!("the parameters' schema must have type \"object\", got {kind}"),
        ));
    }
    check_schema(param, schema, 0)
}

/// Checks one (sub)schema at `path`.
pub fn check_schema(path: &str, schema: &Value, depth: usize) -> Result<(), ApiError> {
    let object = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(object) => object,
        other => return Err(ApiError::param(path, format!("a schema must be an object or a boolean, got {other}"))),
    };
    if depth >= MAX_DEPTH {
        return Err(ApiError::param(path, format!("schemas nest more than {MAX_DEPTH} levels deep")));
    }
    for (key, value) in object {
        let at = format!("{path}.{key}");
        let fail = |what: &str| Err(ApiError::param(at.as_str(), format!("`{key}` must be {what}, got {value}")));
        match key.as_str() {
            "type" => {
                let known = |v: &Value| v.as_str().is_some_and(|t| TYPES.contains(&t));
                let ok = match value {
                    Value::Array(list) => !list.is_empty() && list.iter().all(known),
                    single => known(single),
                };
                if !ok {
                    return fail(&format!("one of {} or a list of them", TYPES.join(", ")));
                }
            }
            "properties" | "$defs" | "definitions" | "patternProperties" | "dependentSchemas" => {
                let Some(map) = value.as_object() else { return fail("an object of schemas") };
                for (name, sub) in map {
                    check_schema(&format!("{at}.{name}"), sub, depth + 1)?;
                }
            }
            "items" if value.is_array() => each(&at, value, depth)?,
            "items"
            | "additionalProperties"
            | "additionalItems"
            | "not"
            | "contains"
            | "propertyNames"
            | "if"
            | "then"
            | "else"
            | "unevaluatedProperties"
            | "unevaluatedItems" => check_schema(&at, value, depth + 1)?,
            "allOf" | "anyOf" | "oneOf" | "prefixItems" => {
                if value.as_array().is_none_or(|l| l.is_empty()) {
                    return fail("a non-empty list of schemas");
                }
                each(&at, value, depth)?;
            }
            "required" if !value.as_array().is_some_and(|l| l.iter().all(Value::is_string)) => {
                return fail("a list of strings");
            }
            "enum" if !value.is_array() => return fail("a list"),
            "minimum" | "maximum" | "multipleOf" if !value.is_number() => return fail("a number"),
            "exclusiveMinimum" | "exclusiveMaximum" if !(value.is_number() || value.is_boolean()) => {
                return fail("a number");
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" | "minProperties" | "maxProperties"
                if value.as_u64().is_none() =>
            {
                return fail("a whole number, at least 0");
            }
            "pattern" | "$ref" | "format" | "title" | "description" if !value.is_string() => return fail("a string"),
            _ => {}
        }
    }
    Ok(())
}

fn each(at: &str, list: &Value, depth: usize) -> Result<(), ApiError> {
    for (i, sub) in list.as_array().into_iter().flatten().enumerate() {
        check_schema(&format!("{at}[{i}]"), sub, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(schema: Value) -> (String, String) {
        match check_parameters("p", &schema) {
            Err(ApiError::InvalidParam { param, message }) => (param, message),
            other => panic!("{schema}: {other:?}"),
        }
    }

    #[test]
    fn usual_function_schemas_pass() {
        for schema in [
            json!({"type": "object", "properties": {"city": {"type": "string", "description": "a city"},
                   "unit": {"enum": ["c", "f"]}, "days": {"type": ["integer", "null"], "minimum": 1}},
                   "required": ["city"], "additionalProperties": false}),
            json!({"properties": {"xs": {"type": "array", "items": {"$ref": "#/$defs/X"}, "minItems": 0}},
                   "$defs": {"X": {"anyOf": [{"type": "string"}, true]}}}),
            json!({}),
        ] {
            check_parameters("p", &schema).unwrap_or_else(|e| panic!("{schema}: {e}"));
        }
    }

    #[test]
    fn malformed_schemas_name_the_keyword() {
        for (schema, param, says) in [
            (json!("object"), "p", "JSON Schema object"),
            (json!({"type": "string"}), "p.type", "type \"object\""),
            (json!({"properties": {"a": {"type": "strin"}}}), "p.properties.a.type", "one of object"),
            (json!({"properties": []}), "p.properties", "an object of schemas"),
            (json!({"properties": {"a": 5}}), "p.properties.a", "an object or a boolean"),
            (json!({"required": "a"}), "p.required", "a list of strings"),
            (json!({"properties": {"a": {"anyOf": []}}}), "p.properties.a.anyOf", "non-empty list"),
            (json!({"properties": {"a": {"items": [{"type": 1}]}}}), "p.properties.a.items[0].type", "one of"),
            (json!({"properties": {"a": {"maxLength": -1}}}), "p.properties.a.maxLength", "whole number"),
        ] {
            let (got, message) = refused(schema.clone());
            assert_eq!(got, param, "{schema}");
            assert!(message.contains(says), "{schema}: {message}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut schema = json!({"type": "string"});
        for _ in 0..MAX_DEPTH + 1 {
            schema = json!({"type": "object", "properties": {"a": schema}});
        }
        assert!(refused(schema).1.contains("nest"));
    }
}
