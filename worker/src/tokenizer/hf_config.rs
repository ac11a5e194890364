//! The parts of a Hugging Face `tokenizer_config.json` the worker uses.
//!
//! Contract: `chat_template` is a string or a list of `{name, template}` (the one named
//! `"default"` is used, else the first); `bos_token` / `eos_token` are a string or an object with
//! `content`; `add_bos_token` is optional (absent = ask the tokenizer's post-processor). A
//! `chat_template.jinja` file beside the config, as newer `transformers` versions save it,
//! overrides the config's template.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{Result, WorkerError};

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    chat_template: Option<Json>,
    #[serde(default)]
    bos_token: Option<Json>,
    #[serde(default)]
    eos_token: Option<Json>,
    #[serde(default)]
    add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads and interprets `path`; errors name the file.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| WorkerError::Io { path: path.to_path_buf(), source: e })?;
        let mut config = Self::parse(&text).map_err(|reason| WorkerError::model_file(path, reason))?;
        if let Some(jinja) = path.parent().map(|dir| dir.join("chat_template.jinja"))
            && jinja.is_file()
        {
            let template =
                std::fs::read_to_string(&jinja).map_err(|e| WorkerError::Io { path: jinja.clone(), source: e })?;
            config.chat_template = Some(template);
        }
        Ok(config)
    }

    pub(crate) fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| format!("invalid tokenizer config: {e}"))?;
        Ok(TokenizerConfig {
            chat_template: raw.chat_template.as_ref().map(template_of).transpose()?.flatten(),
            bos_token: raw.bos_token.as_ref().and_then(token_text),
            eos_token: raw.eos_token.as_ref().and_then(token_text),
            add_bos_token: raw.add_bos_token,
        })
    }
}

/// A special token written as `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn template_of(v: &Json) -> std::result::Result<Option<String>, String> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(list) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|entry| {
                    let name = entry.get("name").and_then(Json::as_str);
                    let template = entry.get("template").and_then(Json::as_str)?;
                    (want.is_none() || name == want).then(|| template.to_string())
                })
            };
            Ok(named(Some("default")).or_else(|| named(None)))
        }
        other => Err(format!("chat_template must be a string or a list, found {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_string_template_and_plain_tokens() {
        let c = TokenizerConfig::parse(
            r#"{"chat_template": "T", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("T"));
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.add_bos_token, Some(true));
    }

    #[test]
    fn picks_the_default_template_from_a_named_list_and_token_content_objects() {
        let c = TokenizerConfig::parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "A"}, {"name": "default", "template": "B"}],
                "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": null}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("B"));
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token, None);
        assert_eq!(c.add_bos_token, None);
    }

    #[test]
    fn corrupt_config_error_names_the_file() {
        let dir = std::env::temp_dir().join(format!("lumen-tokcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = TokenizerConfig::load(&path).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
