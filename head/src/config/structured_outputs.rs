//! vLLM's `structured_outputs_config` (its `--structured-outputs-config` engine argument): a
//! deployment's defaults for every structured-output constraint its requests carry, given as an
//! object in a `model:` section or as JSON text to the head's flag.
//!
//! Contract of [`StructuredOutputsConfig::from_value`], the one way in (the serve config's check,
//! the plan and the flag all use it): the value is an object whose keys are vLLM's field names
//! ([`FIELDS`]; any other is refused by name), each of its type; `backend` one of vLLM's names
//! ([`BACKENDS`]: Lumen always compiles with llguidance, vLLM's `guidance`, and says so once in the
//! log when another is named, see [`StructuredOutputsConfig::note_backend`]); `reasoning_parser` a
//! reasoning parser the head knows (`""`, vLLM's default, is none). A refusal names the field by
//! its path under the option (`...model.structured_outputs_config.backend`) and the value given.
//!
//! What the settings do: `disable_any_whitespace` and `disable_additional_properties` hold for
//! every constraint of the deployment's requests, beside the request's own options
//! (`crate::api::request::structured::with_defaults`); `reasoning_parser` is the deployment's reasoning
//! parser, one setting with the `model:` section's `reasoning_parser` as in vLLM (given both, they
//! must agree); `backend` and `disable_fallback` change nothing (there is one backend);
//! `enable_in_reasoning` decides whether chat gates constraints behind the reasoning (`api/chat/mod.rs`).

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::ConfigError;
use super::rules::kind;
use crate::api::chat::reasoning::ReasoningParserKind;

/// vLLM's structured-output backends, by the names users type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// vLLM picks one; Lumen has llguidance.
    #[default]
    Auto,
    Xgrammar,
    /// llguidance: what Lumen always uses.
    Guidance,
    Outlines,
    LmFormatEnforcer,
}

/// Every backend with its name.
pub const BACKENDS: [(&str, Backend); 5] = [
    ("auto", Backend::Auto),
    ("xgrammar", Backend::Xgrammar),
    ("guidance", Backend::Guidance),
    ("outlines", Backend::Outlines),
    ("lm-format-enforcer", Backend::LmFormatEnforcer),
];

impl Backend {
    /// The name users type.
    pub fn name(self) -> &'static str {
        BACKENDS.iter().find(|(_, b)| *b == self).map_or("auto", |(name, _)| *name)
    }

    /// Whether the name means what Lumen does anyway (`auto` or `guidance`).
    pub fn is_llguidance(self) -> bool {
        matches!(self, Backend::Auto | Backend::Guidance)
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        BACKENDS.iter().find(|(name, _)| *name == s).map(|(_, b)| *b).ok_or_else(|| {
            let known: Vec<&str> = BACKENDS.iter().map(|(name, _)| *name).collect();
            format!("unknown structured outputs backend `{s}` (known: {})", known.join(", "))
        })
    }
}

/// The keys the option may hold (vLLM's `StructuredOutputsConfig` fields).
pub const FIELDS: [&str; 6] = [
    "backend",
    "disable_fallback",
    "disable_any_whitespace",
    "disable_additional_properties",
    "reasoning_parser",
    "enable_in_reasoning",
];

/// A deployment's structured-output defaults; `Default` is vLLM's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StructuredOutputsConfig {
    /// Accepted for vLLM's configs; llguidance compiles every constraint.
    pub backend: Backend,
    /// Accepted and moot: there is no other backend to fall back to.
    pub disable_fallback: bool,
    /// JSON constraints allow no whitespace beyond the separators.
    pub disable_any_whitespace: bool,
    /// JSON objects that list `properties` and say nothing of others get
    /// `additionalProperties: false`.
    pub disable_additional_properties: bool,
    /// The deployment's reasoning parser (vLLM's `--reasoning-parser` lands here too).
    pub reasoning_parser: Option<ReasoningParserKind>,
    /// Whether a constraint also applies to the reasoning part of the output (vLLM's default:
    /// no, the reasoning is free and the constraint starts after it).
    pub enable_in_reasoning: bool,
}

/// Set once the head has warned of a backend other than llguidance.
static WARNED_OF_BACKEND: AtomicBool = AtomicBool::new(false);

impl StructuredOutputsConfig {
    /// Reads the option at `at` (`applications[0].deployments[0].model.structured_outputs_config`,
    /// or "" for the flag); see the module docs for what is refused.
    pub fn from_value(at: &str, value: &Value) -> Result<Self, ConfigError> {
        let Some(fields) = value.as_object() else {
            return Err(ConfigError::at(
                at,
                format!(
                    "must be an object of {} (vLLM's StructuredOutputsConfig), got {}",
                    FIELDS.join(", "),
                    kind(value)
                ),
            ));
        };
        let mut config = StructuredOutputsConfig::default();
        for (key, value) in fields {
            let field = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
            config.set(key, value).map_err(|problem| ConfigError::at(field, problem))?;
        }
        Ok(config)
    }

    /// Sets the field `key` from `value`, or says why it cannot.
    fn set(&mut self, key: &str, value: &Value) -> Result<(), String> {
        let flag = || value.as_bool().ok_or_else(|| format!("must be true or false, got {}", kind(value)));
        match key {
            "backend" => {
                let name = value.as_str().ok_or_else(|| format!("must be a backend's name, got {}", kind(value)))?;
                self.backend = name.parse()?;
            }
            "disable_fallback" => self.disable_fallback = flag()?,
            "disable_any_whitespace" => self.disable_any_whitespace = flag()?,
            "disable_additional_properties" => self.disable_additional_properties = flag()?,
            "enable_in_reasoning" => self.enable_in_reasoning = flag()?,
            "reasoning_parser" => {
                let name = value
                    .as_str()
                    .ok_or_else(|| format!("must be the name of a reasoning parser, got {}", kind(value)))?;
                self.reasoning_parser = if name.is_empty() { None } else { Some(name.parse()?) };
            }
            _ => {
                return Err(format!("unknown structured outputs option; the known ones are {}", FIELDS.join(", ")));
            }
        }
        Ok(())
    }

    /// Why `value` is not a valid option (the field path inside it first), for checks that
    /// report one message.
    pub fn check(value: &Value) -> Result<(), String> {
        Self::from_value("", value).map(|_| ()).map_err(one_message)
    }

    /// vLLM's `--reasoning-parser` and `structured_outputs_config.reasoning_parser` are one
    /// setting: given both (`model` being the former), they must name the same parser.
    pub fn check_reasoning_parser(&self, model: Option<ReasoningParserKind>) -> Result<(), String> {
        match (model, self.reasoning_parser) {
            (Some(model), Some(own)) if model != own => Err(format!(
                "must be the model's reasoning_parser `{}` (the same setting, as in vLLM), got `{}`",
                model.name(),
                own.name()
            )),
            _ => Ok(()),
        }
    }

    /// Logs, once per process, that a backend other than llguidance was named: Lumen compiles
    /// every constraint with llguidance whatever the config says. Called where the head puts
    /// settings in force, not where it only checks them.
    pub fn note_backend(&self) {
        warn_once(&WARNED_OF_BACKEND, self.backend);
    }
}

/// The flag's JSON text (`--structured-outputs-config '{"backend": "guidance"}'`).
impl std::str::FromStr for StructuredOutputsConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        Self::from_value("", &value).map_err(one_message)
    }
}

/// Warns that `backend` is not what Lumen uses, unless it is llguidance or `warned` says a
/// warning went out already; returns whether it warned.
fn warn_once(warned: &AtomicBool, backend: Backend) -> bool {
    if backend.is_llguidance() || warned.swap(true, Ordering::Relaxed) {
        return false;
    }
    tracing::warn!(
        backend = backend.name(),
        "structured_outputs_config.backend is `{}`, but Lumen always compiles structured outputs with llguidance \
         (vLLM's `guidance` backend)",
        backend.name()
    );
    true
}

/// An error of [`StructuredOutputsConfig::from_value`] at "" as one line: `field: message`.
fn one_message(e: ConfigError) -> String {
    match e.field.as_str() {
        "" => e.message,
        field => format!("{field}: {}", e.message),
    }
}

#[cfg(test)]
#[path = "structured_outputs_tests.rs"]
mod tests;
