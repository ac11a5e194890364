//! A chat request's tool fields, checked as vLLM checks them (OpenAI's rules where vLLM has
//! none), and what they ask of the template, the decoder and the output.
//!
//! - `tools`: at most [`MAX_TOOLS`] of `{"type": "function", "function": {name, description?,
//!   parameters?, strict?}}` (`type` may be left out, as vLLM allows); the name as OpenAI
//!   allows (`a-z A-Z 0-9 _ -`, 1 to 64), `parameters` a JSON Schema of an object
//!   ([`super::schema`]). They go to the chat template as its `tools` variable, as given.
//! - `tool_choice`: without it, `"auto"` when `tools` is a non-empty list, else `"none"`
//!   (vLLM's default). `"auto"` needs the model's `enable_auto_tool_choice` and
//!   `tool_call_parser` (`--enable-auto-tool-choice`, `--tool-call-parser`), else 400 with
//!   vLLM's message. Anything but `"none"` needs `tools`; `"required"` with an empty list is
//!   `"none"`; a named function must be one of the tools.
//! - `parallel_tool_calls` (default true): false keeps only the first call ([`super::output`]).
//!
//! `"required"` and named functions are answered under constrained decoding: chat attaches
//! [`ToolRequest::constrained_schema`] as the request's structured-output constraint
//! (`crate::api::request::structured::tool_call`), so the output always parses.

use serde_json::{Map, Value};

use super::{ToolCallParser, ToolParserKind, ToolSettings, forced, schema};
use crate::api::edge::errors::ApiError;

/// The most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// The longest function name (OpenAI's limit).
pub const MAX_NAME: usize = 64;
/// vLLM's answer to `tool_choice: "auto"` on a server without automatic tool choice.
pub const AUTO_NEEDS_FLAGS: &str =
    "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set";

/// What the request lets the model do with its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// This function must be called.
    Named(String),
}

/// How the output is read for tool calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// With the model's parser, calls optional.
    Auto(ToolParserKind),
    /// A JSON array of calls (constrained).
    Required,
    /// The whole output is this function's arguments (constrained).
    Named(String),
}

impl Reading {
    /// A fresh parser for one choice.
    pub fn parser(&self) -> Box<dyn ToolCallParser> {
        match self {
            Reading::Auto(kind) => kind.parser(),
            Reading::Required => Box::new(forced::required()),
            Reading::Named(name) => Box::new(forced::Named::new(name.clone())),
        }
    }
}

/// A request's checked tool fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The tools as the template sees them (`type` filled in); `None` when the request has none.
    pub tools: Option<Vec<Value>>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls`.
    pub parallel: bool,
    /// The parser `auto` uses (the model's).
    auto_parser: Option<ToolParserKind>,
}

impl ToolRequest {
    /// Reads and checks `tools`, `tool_choice` and `parallel_tool_calls` of `body` for a model
    /// with `settings`.
    pub fn from_body(body: &Map<String, Value>, settings: ToolSettings) -> Result<Self, ApiError> {
        let tools = check_tools(body.get("tools"))?;
        let parallel = match body.get("parallel_tool_calls") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::param(
                    "parallel_tool_calls",
                    format!("parallel_tool_calls must be a boolean, got {other}"),
                ));
            }
        };
        let choice = check_choice(body.get("tool_choice"), tools.as_deref())?;
        if choice == ToolChoice::Auto && settings.auto_parser().is_none() {
            return Err(ApiError::param("tool_choice", AUTO_NEEDS_FLAGS));
        }
        Ok(ToolRequest { tools, choice, parallel, auto_parser: settings.auto_parser() })
    }

    /// The chat template's extra variables: the request's `chat_template_kwargs` plus `tools`
    /// when the request has them (a `tools` key of the kwargs wins, as in vLLM).
    pub fn template_kwargs(&self, kwargs: Option<&Map<String, Value>>) -> Option<Map<String, Value>> {
        template_kwargs(self.tools.as_deref(), kwargs)
    }

    /// How the output is read, `None` when it is not read for calls.
    pub fn reading(&self) -> Option<Reading> {
        match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto => self.auto_parser.map(Reading::Auto),
            ToolChoice::Required => Some(Reading::Required),
            ToolChoice::Named(name) => Some(Reading::Named(name.clone())),
        }
    }

    /// Whether the output must keep special tokens (the parser's markers are some).
    pub fn keeps_special_tokens(&self) -> bool {
        matches!(self.reading(), Some(Reading::Auto(kind)) if kind.keeps_special_tokens())
    }

    /// The JSON Schema that decoding must follow for `required` or a named function (`None`
    /// for `none` and `auto`): see [`forced`].
    pub fn constrained_schema(&self) -> Result<Option<Value>, ApiError> {
        let tools = self.tools.as_deref().unwrap_or_default();
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            ToolChoice::Required => forced::required_schema(tools, self.parallel).map(Some),
            ToolChoice::Named(name) => {
                Ok(tools.iter().find(|t| tool_name(t) == Some(name.as_str())).map(forced::named_schema))
            }
        }
    }
}

/// `kwargs` (a request's `chat_template_kwargs`) with `tools` added when there are some (a
/// `tools` key of the kwargs wins, as in vLLM).
pub fn template_kwargs(tools: Option<&[Value]>, kwargs: Option<&Map<String, Value>>) -> Option<Map<String, Value>> {
    let Some(tools) = tools else { return kwargs.cloned() };
    let mut merged = Map::from_iter([("tools".to_string(), Value::Array(tools.to_vec()))]);
    merged.extend(kwargs.cloned().unwrap_or_default());
    Some(merged)
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.pointer("/function/name").and_then(Value::as_str)
}

/// Checks `tools`; `None` when absent or null.
pub fn check_tools(tools: Option<&Value>) -> Result<Option<Vec<Value>>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(ApiError::param("tools", format!("tools must be a list of tools, got {other}"))),
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::param(
            "tools",
            format!("tools holds {} tools, at most {MAX_TOOLS} are allowed", list.len()),
        ));
    }
    list.iter().enumerate().map(|(i, tool)| check_tool(i, tool)).collect::<Result<Vec<_>, _>>().map(Some)
}

fn check_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let at = format!("tools[{i}]");
    let Some(object) = tool.as_object() else {
        return Err(ApiError::param(at, format!("a tool must be an object, got {tool}")));
    };
    match object.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "function" => {}
        Some(other) => {
            return Err(ApiError::param(
                format!("{at}.type"),
                format!("only tools of type \"function\" are supported, got {other}"),
            ));
        }
    }
    let Some(function) = object.get("function").and_then(Value::as_object) else {
        return Err(ApiError::param(format!("{at}.function"), "a tool needs a `function` object"));
    };
    check_name(&format!("{at}.function.name"), function.get("name"))?;
    for (key, check) in [("description", Value::is_string as fn(&Value) -> bool), ("strict", Value::is_boolean)] {
        if let Some(value) = function.get(key).filter(|v| !v.is_null() && !check(v)) {
            let what = if key == "strict" { "a boolean" } else { "a string" };
            return Err(ApiError::param(format!("{at}.function.{key}"), format!("{key} must be {what}, got {value}")));
        }
    }
    if let Some(parameters) = function.get("parameters").filter(|p| !p.is_null()) {
        schema::check_parameters(&format!("{at}.function.parameters"), parameters)?;
    }
    let mut normalized = object.clone();
    normalized.insert("type".into(), Value::String("function".into()));
    Ok(Value::Object(normalized))
}

/// A function name as OpenAI allows them.
fn check_name(at: &str, name: Option<&Value>) -> Result<(), ApiError> {
    let Some(name) = name.and_then(Value::as_str) else {
        return Err(ApiError::param(at, "a function needs a string `name`"));
    };
    let chars_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > MAX_NAME || !chars_ok {
        return Err(ApiError::param(
            at,
            format!("function names are 1 to {MAX_NAME} characters of a-z, A-Z, 0-9, _ and -, got {name:?}"),
        ));
    }
    Ok(())
}

fn check_choice(choice: Option<&Value>, tools: Option<&[Value]>) -> Result<ToolChoice, ApiError> {
    let needs_tools = || ApiError::param("tool_choice", "When using `tool_choice`, `tools` must be set.");
    match choice {
        None | Some(Value::Null) => {
            Ok(if tools.is_some_and(|t| !t.is_empty()) { ToolChoice::Auto } else { ToolChoice::None })
        }
        Some(Value::String(s)) if s == "none" => Ok(ToolChoice::None),
        Some(Value::String(s)) if s == "auto" || s == "required" => match tools {
            None => Err(needs_tools()),
            Some([]) if s == "required" => Ok(ToolChoice::None),
            Some(_) if s == "auto" => Ok(ToolChoice::Auto),
            Some(_) => Ok(ToolChoice::Required),
        },
        Some(Value::Object(named)) => {
            let usage = r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;
            if named.get("type").is_some_and(|t| t != "function") {
                return Err(ApiError::param(
                    "tool_choice.type",
                    format!("tool_choice's type must be \"function\". {usage}"),
                ));
            }
            let Some(name) = named.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) else {
                return Err(ApiError::param(
                    "tool_choice.function",
                    format!("tool_choice needs a function name. {usage}"),
                ));
            };
            let tools = tools.ok_or_else(needs_tools)?;
            if !tools.iter().any(|t| tool_name(t) == Some(name)) {
                return Err(ApiError::param(
                    "tool_choice",
                    format!(
                        "The tool specified in `tool_choice` ({name:?}) does not match any of the specified `tools`"
                    ),
                ));
            }
            Ok(ToolChoice::Named(name.to_string()))
        }
        Some(other) => Err(ApiError::param(
            "tool_choice",
            format!(
                "Invalid value for `tool_choice`: {other}! Only named tools, \"none\", \"auto\" or \"required\" are supported."
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ON: ToolSettings =
        ToolSettings { enable_auto_tool_choice: true, tool_call_parser: Some(ToolParserKind::Hermes) };

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn read(body: Value, settings: ToolSettings) -> Result<ToolRequest, ApiError> {
        ToolRequest::from_body(body.as_object().unwrap(), settings)
    }

    fn refused(body: Value, settings: ToolSettings) -> (String, String) {
        match read(body.clone(), settings) {
            Err(ApiError::InvalidParam { param, message }) => (param, message),
            other => panic!("{body}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_vllm() {
        let r = read(json!({"tools": [weather()]}), ON).unwrap();
        assert_eq!((r.choice.clone(), r.parallel), (ToolChoice::Auto, true));
        assert_eq!(r.reading(), Some(Reading::Auto(ToolParserKind::Hermes)));
        assert!(r.keeps_special_tokens());
        assert_eq!(read(json!({}), ToolSettings::default()).unwrap().choice, ToolChoice::None);
        assert_eq!(read(json!({"tools": []}), ToolSettings::default()).unwrap().choice, ToolChoice::None);
        let r = read(json!({"tools": [weather()], "tool_choice": "none"}), ToolSettings::default()).unwrap();
        assert_eq!((r.choice.clone(), r.reading()), (ToolChoice::None, None));
        let r = read(json!({"tools": [], "tool_choice": "required"}), ON).unwrap();
        assert_eq!(r.choice, ToolChoice::None, "required with no tools is none, as in vLLM");
    }

    #[test]
    fn auto_without_the_server_flags_is_vllms_400() {
        let settings = [
            ToolSettings::default(),
            ToolSettings { enable_auto_tool_choice: true, tool_call_parser: None },
            ToolSettings { enable_auto_tool_choice: false, tool_call_parser: Some(ToolParserKind::Hermes) },
        ];
        for s in settings {
            for body in [json!({"tools": [weather()]}), json!({"tools": [weather()], "tool_choice": "auto"})] {
                assert_eq!(refused(body, s), ("tool_choice".into(), AUTO_NEEDS_FLAGS.into()), "{s:?}");
            }
        }
    }

    #[test]
    fn bad_tools_and_choices_name_the_field() {
        let named = |name: &str| json!({"type": "function", "function": {"name": name}});
        let bad_tool = |f: Value| json!({"tools": [weather(), {"type": "function", "function": f}]});
        let cases = [
            (json!({"tools": {"a": 1}}), "tools", "a list of tools"),
            (json!({"tools": [5]}), "tools[0]", "an object"),
            (json!({"tools": [{"type": "code_interpreter", "function": {"name": "f"}}]}), "tools[0].type", "function"),
            (json!({"tools": [{"type": "function"}]}), "tools[0].function", "`function` object"),
            (bad_tool(json!({"name": "has space"})), "tools[1].function.name", "a-z"),
            (bad_tool(json!({"name": "x".repeat(65)})), "tools[1].function.name", "1 to 64"),
            (bad_tool(json!({"name": 3})), "tools[1].function.name", "string `name`"),
            (bad_tool(json!({"name": "f", "description": 1})), "tools[1].function.description", "a string"),
            (bad_tool(json!({"name": "f", "strict": "yes"})), "tools[1].function.strict", "a boolean"),
            (bad_tool(json!({"name": "f", "parameters": "{}"})), "tools[1].function.parameters", "JSON Schema"),
            (
                bad_tool(json!({"name": "f", "parameters": {"properties": {"a": {"type": "text"}}}})),
                "tools[1].function.parameters.properties.a.type",
                "one of",
            ),
            (json!({"tools": [weather()], "tool_choice": "any"}), "tool_choice", "Invalid value"),
            (json!({"tools": [weather()], "tool_choice": 1}), "tool_choice", "Invalid value"),
            (json!({"tool_choice": "auto"}), "tool_choice", "`tools` must be set"),
            (json!({"tool_choice": named("get_weather")}), "tool_choice", "`tools` must be set"),
            (json!({"tools": [weather()], "tool_choice": named("nope")}), "tool_choice", "does not match"),
            (json!({"tools": [weather()], "tool_choice": {"type": "function"}}), "tool_choice.function", "name"),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "x", "function": {"name": "get_weather"}}}),
                "tool_choice.type",
                "function",
            ),
            (
                json!({"tools": [weather()], "parallel_tool_calls": "no", "tool_choice": "none"}),
                "parallel_tool_calls",
                "boolean",
            ),
        ];
        for (body, param, says) in cases {
            let (got, message) = refused(body.clone(), ON);
            assert_eq!(got, param, "{body}");
            assert!(message.contains(says), "{body}: `{message}` should say `{says}`");
        }
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| named(&format!("f{i}"))).collect();
        assert_eq!(refused(json!({"tools": many, "tool_choice": "none"}), ON).0, "tools");
    }

    #[test]
    fn required_and_named_have_the_schema_decoding_follows() {
        let r =
            read(json!({"tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false}), ON).unwrap();
        assert_eq!((r.choice.clone(), r.reading()), (ToolChoice::Required, Some(Reading::Required)));
        assert_eq!(r.constrained_schema().unwrap().unwrap()["maxItems"], 1);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let r = read(json!({"tools": [weather()], "tool_choice": named}), ToolSettings::default()).unwrap();
        assert_eq!(r.reading(), Some(Reading::Named("get_weather".into())));
        assert_eq!(r.constrained_schema().unwrap().unwrap()["required"], json!(["city"]));
        assert_eq!(
            read(json!({"tools": [weather()], "tool_choice": "auto"}), ON).unwrap().constrained_schema().unwrap(),
            None
        );
    }

    #[test]
    fn tools_reach_the_template_under_the_requests_kwargs() {
        let r = read(json!({"tools": [{"function": {"name": "f"}}], "tool_choice": "none"}), ON).unwrap();
        let kwargs = r.template_kwargs(None).unwrap();
        assert_eq!(kwargs["tools"], json!([{"type": "function", "function": {"name": "f"}}]));
        let own = json!({"tools": "mine", "x": 1});
        let kwargs = r.template_kwargs(own.as_object()).unwrap();
        assert_eq!((kwargs["tools"].clone(), kwargs["x"].clone()), (json!("mine"), json!(1)));
        let none = read(json!({}), ON).unwrap();
        assert_eq!(none.template_kwargs(own.as_object()), own.as_object().cloned());
        assert_eq!(none.template_kwargs(None), None);
    }
}
