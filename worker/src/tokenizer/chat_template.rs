//! Hugging Face chat templates rendered with minijinja.
//!
//! Contract:
//! - The template sees what `transformers`' `apply_chat_template` passes: `messages`,
//!   `add_generation_prompt`, `tools` and `documents` (both `none` unless given), `bos_token`,
//!   `eos_token`, plus every key of [`ChatTemplateOptions::extra`] (e.g. `date_string`). Our own
//!   variables win over `extra` for `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
//! - Jinja is configured like `transformers` does (`trim_blocks`, `lstrip_blocks`, loop controls),
//!   with Python string/dict/list methods (`.strip()`, `.items()`, ...) from minijinja-contrib's
//!   pycompat, `raise_exception(msg)`, `strftime_now(fmt)` (UTC) and a `tojson` filter that writes
//!   what Python's `json.dumps(..., ensure_ascii=False)` writes (minijinja's own escapes `<>&'`).
//! - Message content that is a list of `{"type": "text", "text": ...}` parts is joined with `\n`
//!   into one string before rendering (as vLLM does); other part types are rejected. A tool call's
//!   `function.arguments` given as a JSON string is parsed into an object, because templates
//!   (Llama 3.1, Qwen 2.5) call `tojson` on it; empty or null arguments become `{}` (vLLM's
//!   rule). A string that is not a JSON object is left as it is.
//! - Sandbox: the environment has no loader, so `include`/`import`/`extends` cannot read files;
//!   templates cannot call host code beyond the functions above; every render is bounded by
//!   [`TEMPLATE_FUEL`] instructions and minijinja's recursion limit, so a hostile template ends
//!   with a [`WorkerError::ChatTemplate`] instead of hanging. Memory built by string
//!   concatenation inside the fuel budget is not separately bounded.
//! - There is no fallback template: a model without one gets a clear error.

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::error::{Result, WorkerError};

/// Instructions one render may execute before it is aborted. The full Llama 3.1 tool-calling
/// template spends a few hundred per message; this allows conversations of thousands of turns
/// while stopping runaway loops in a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// The name the compiled template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One chat message as the OpenAI API sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, a list of content parts, or null (an assistant turn with only tool calls).
    #[serde(default)]
    pub content: Json,
    /// Any other field (`name`, `tool_calls`, `tool_call_id`, ...), passed to the template as is.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl ChatMessage {
    /// A message with plain string content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: Json::String(content.into()), extra: Map::new() }
    }
}

/// Options of one rendering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatTemplateOptions {
    /// Append the header that opens the assistant's turn.
    #[serde(default)]
    pub add_generation_prompt: bool,
    /// Extra template variables (`tools`, `documents`, `date_string`, `enable_thinking`, ...).
    #[serde(default)]
    pub extra: Map<String, Json>,
}

/// A compiled chat template and the special-token strings it may refer to.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with its line.
    pub(crate) fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = sandboxed_environment();
        env.add_template_owned(TEMPLATE_NAME, source).map_err(template_error)?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// Renders `messages` to the prompt text.
    pub(crate) fn render(&self, messages: &[ChatMessage], opts: &ChatTemplateOptions) -> Result<String> {
        let mut ctx = opts.extra.clone();
        ctx.entry("tools").or_insert(Json::Null);
        ctx.entry("documents").or_insert(Json::Null);
        let messages = messages.iter().map(normalize_message).collect::<Result<Vec<_>>>()?;
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        for (key, token) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(token) = token {
                ctx.insert(key.into(), Json::String(token.clone()));
            }
        }
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(Value::from(Serde(&ctx))).map_err(template_error)
    }
}

fn template_error(err: JinjaError) -> WorkerError {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    WorkerError::ChatTemplate(msg)
}

/// An environment configured like `transformers`' sandboxed one, with no loader.
fn sandboxed_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    super::strftime::format_utc(secs, &format)
}

/// `tojson` as Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=...)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; output is always UTF-8 (ensure_ascii=False).
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| JinjaError::new(ErrorKind::BadSerialization, format!("tojson: {e}")))?;
    let mut out = String::new();
    super::pyjson::write(&mut out, &json, indent, sort_keys.unwrap_or(false), 0);
    Ok(Value::from_safe_string(out))
}

/// The message as the template sees it: text parts joined, tool-call arguments parsed.
fn normalize_message(msg: &ChatMessage) -> Result<Json> {
    let mut obj = msg.extra.clone();
    obj.insert("role".into(), Json::String(msg.role.clone()));
    obj.insert("content".into(), flatten_content(&msg.content)?);
    if let Some(Json::Array(calls)) = obj.get_mut("tool_calls") {
        for call in calls.iter_mut() {
            let Some(Json::Object(function)) = call.get_mut("function") else {
                continue;
            };
            match function.get("arguments") {
                None | Some(Json::Null) => {
                    function.insert("arguments".into(), Json::Object(Map::new()));
                }
                Some(Json::String(args)) if args.trim().is_empty() => {
                    function.insert("arguments".into(), Json::Object(Map::new()));
                }
                Some(Json::String(args)) => {
                    if let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(args) {
                        function.insert("arguments".into(), parsed);
                    }
                }
                Some(_) => {}
            }
        }
    }
    Ok(Json::Object(obj))
}

fn flatten_content(content: &Json) -> Result<Json> {
    let Json::Array(parts) = content else {
        return Ok(content.clone());
    };
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Json::String(s) => texts.push(s.as_str()),
            Json::Object(p) => match (p.get("type").and_then(Json::as_str), p.get("text")) {
                (Some("text") | None, Some(Json::String(text))) => texts.push(text.as_str()),
                (kind, _) => {
                    return Err(WorkerError::ChatTemplate(format!(
                        "content part of type `{}` is not supported (only text parts are)",
                        kind.unwrap_or("<missing>")
                    )));
                }
            },
            other => {
                return Err(WorkerError::ChatTemplate(format!("content part must be an object, got {other}")));
            }
        }
    }
    Ok(Json::String(texts.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage], opts: &ChatTemplateOptions) -> Result<String> {
        ChatTemplate::new(src.to_string(), Some("<s>".into()), Some("</s>".into()))?.render(messages, opts)
    }

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    #[test]
    fn raise_exception_becomes_a_chat_template_error_with_its_message() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system turn') }}{% endif %}";
        let err = render(src, &user("hi"), &Default::default()).unwrap_err();
        match err {
            WorkerError::ChatTemplate(msg) => assert!(msg.contains("need a system turn"), "{msg}"),
            other => panic!("expected ChatTemplate error, got {other:?}"),
        }
    }

    #[test]
    fn runaway_loop_is_stopped_by_fuel() {
        let src = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        let err = render(src, &user("hi"), &Default::default()).unwrap_err();
        assert!(matches!(err, WorkerError::ChatTemplate(ref m) if m.contains("fuel")), "{err:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn unbounded_recursion_is_stopped() {
        let src = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        assert!(matches!(render(src, &user("hi"), &Default::default()), Err(WorkerError::ChatTemplate(_))));
    }

    #[test]
    fn templates_cannot_include_other_files() {
        for src in ["{% include '/etc/passwd' %}", "{% import 'x.j2' as x %}", "{% extends 'base' %}"] {
            assert!(
                matches!(render(src, &user("hi"), &Default::default()), Err(WorkerError::ChatTemplate(_))),
                "{src} rendered"
            );
        }
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.strip().upper() }}|{{ 'a,b'.split(',')|length }}|{{ messages[0].content.startswith('  he') }}";
        let out = render(src, &user("  hello  "), &Default::default()).unwrap();
        assert_eq!(out, "HELLO|2|True");
    }

    #[test]
    fn text_content_parts_are_joined_into_a_string() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        }))
        .unwrap();
        let out = render("{{ messages[0].content }}", &[msg], &Default::default()).unwrap();
        assert_eq!(out, "one\ntwo");
    }

    #[test]
    fn image_content_parts_are_rejected() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}],
        }))
        .unwrap();
        let err = render("{{ messages[0].content }}", &[msg], &Default::default()).unwrap_err();
        assert!(matches!(err, WorkerError::ChatTemplate(ref m) if m.contains("image_url")));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let mut opts = ChatTemplateOptions::default();
        opts.extra.insert(
            "tools".into(),
            serde_json::json!([{"description": "<a & 'b'>", "n": [1, 2.5, null, true], "name": "f"}]),
        );
        let out = render("{{ tools[0]|tojson }}", &user("x"), &opts).unwrap();
        assert_eq!(out, r#"{"description": "<a & 'b'>", "n": [1, 2.5, null, true], "name": "f"}"#);
        let out = render("{{ {'a': [1]}|tojson(indent=2) }}", &user("x"), &opts).unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn tool_call_arguments_string_is_parsed_for_the_template() {
        let msg: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "1", "type": "function",
                            "function": {"name": "f", "arguments": "{\"x\": 1}"}}],
        }))
        .unwrap();
        let src = "{{ messages[0].tool_calls[0].function.arguments.x }}|{{ messages[0].content is none }}";
        assert_eq!(render(src, &[msg], &Default::default()).unwrap(), "1|True");
    }

    #[test]
    fn tools_default_to_none_and_extra_variables_are_visible() {
        let mut opts = ChatTemplateOptions::default();
        opts.extra.insert("date_string".into(), "26 Jul 2024".into());
        let src = "{{ tools is none }}|{{ date_string }}|{{ bos_token }}{{ eos_token }}";
        assert_eq!(render(src, &user("x"), &opts).unwrap(), "True|26 Jul 2024|<s></s>");
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let out = render("{{ strftime_now('%Y') }}", &user("x"), &Default::default()).unwrap();
        let year: i32 = out.parse().unwrap();
        assert!((2024..3000).contains(&year), "{out}");
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on() {
        let src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        assert_eq!(render(src, &user("x"), &Default::default()).unwrap(), "x\n");
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        let err = ChatTemplate::new("{% if %}".into(), None, None).unwrap_err();
        assert!(matches!(err, WorkerError::ChatTemplate(_)));
    }
}
