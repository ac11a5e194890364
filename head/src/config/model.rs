//! A deployment's `model:` section: the engine options a worker starts the replica with (the same
//! names as the `lumen serve` / `lumen worker` flags) plus the head's own [`HEAD_OPTIONS`]
//! (`reasoning_parser`, and vLLM's `enable_auto_tool_choice` / `tool_call_parser`, which needs
//! the parser named in the same section, as vLLM's flags do, `structured_outputs_config`,
//! checked field by field in [`super::structured_outputs`], whose `reasoning_parser` must agree
//! with the section's, and `migration_limit`, the head's `--migration-limit` for this
//! deployment).
//!
//! Contract: the head checks the section before it is applied, so a worker is never sent options
//! it would refuse at load time: every key is one of [`OPTIONS`] (an unknown key, often a typo,
//! is refused listing the known ones), each value has its option's type and range, and exactly
//! one of `source` / `model` names the model. What only the model files can tell (the model's
//! context length, whether the KV cache holds `max_model_len`) is still the worker's to refuse.
//! `lumen`'s tests check that [`OPTIONS`] lists exactly the worker's engine options.

use lumen_proto::speculative::SpeculativeConfig;
use serde_json::{Map, Value};

use super::ConfigError;
use super::rules::kind;
use super::structured_outputs::StructuredOutputsConfig;
use crate::api::chat::reasoning::ReasoningParserKind;
use crate::api::tools::ToolParserKind;

/// What a model option holds.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// A non-empty string.
    Text,
    /// A non-empty string, or null (the worker's default).
    TextOrNull,
    /// A whole number, at least 1.
    Count,
    /// A whole number, at least 1, or null (the worker's default).
    CountOrNull,
    /// A whole number, at least 0.
    Seed,
    Bool,
    /// One of the listed names.
    OneOf(&'static [&'static str]),
    /// One of the listed names, or null (the worker's default).
    OneOfOrNull(&'static [&'static str]),
    /// A size in bytes, more than 0: a number, or a string such as `2GiB` / `512MiB`.
    Bytes,
    /// As `Bytes`, or null (the worker's default).
    BytesOrNull,
    /// A share in (0, 1].
    Fraction,
    /// Milliseconds, at least 0, or null (the worker's default).
    MillisOrNull,
    /// A whole number, at least 0 (0 turns the thing off), or null (the head's default).
    LimitOrNull,
    /// `cpu`, `cuda` or `cuda:N`.
    Device,
    /// A reasoning parser the head knows.
    ReasoningParser,
    /// A tool-call parser the head knows.
    ToolCallParser,
    /// vLLM's `structured_outputs_config` object ([`StructuredOutputsConfig`]).
    StructuredOutputsConfig,
    /// vLLM's `pooler_config` object: `pooling_type` (LAST, MEAN or CLS) and `normalize`, or null.
    PoolerConfig,
    /// vLLM's `speculative_config` object (`lumen_proto::speculative`), or null.
    SpeculativeConfig,
}

/// Every key a `model:` section may hold, and what it holds. `source` and `model` are two
/// spellings of the same option.
pub const OPTIONS: &[(&str, Kind)] = &[
    ("source", Kind::Text),
    ("model", Kind::Text),
    ("served_model_name", Kind::TextOrNull),
    ("load_format", Kind::OneOf(&["auto", "safetensors", "gguf", "dummy"])),
    ("max_model_len", Kind::CountOrNull),
    ("max_num_seqs", Kind::Count),
    ("max_num_batched_tokens", Kind::Count),
    ("itl_goal_ms", Kind::MillisOrNull),
    ("scheduling_policy", Kind::OneOf(&["fcfs", "priority"])),
    ("block_size", Kind::Count),
    ("enable_prefix_caching", Kind::Bool),
    ("kv_cache_memory", Kind::Bytes),
    ("threads", Kind::CountOrNull),
    ("cpu_weight_format", Kind::OneOf(&["auto", "f32", "q8_0"])),
    ("dummy_seed", Kind::Seed),
    ("chat_template", Kind::TextOrNull),
    ("device", Kind::Device),
    ("gpu_memory_utilization", Kind::Fraction),
    ("gpu_memory_limit", Kind::BytesOrNull),
    ("dtype", Kind::OneOf(&["auto", "bfloat16", "float32"])),
    ("enforce_eager", Kind::Bool),
    ("tensor_parallel_size", Kind::Count),
    ("quantization", Kind::OneOfOrNull(&["fp8", "compressed-tensors", "awq", "awq_marlin", "gptq", "gptq_marlin"])),
    ("runner", Kind::OneOf(&["auto", "generate", "pooling"])),
    ("convert", Kind::OneOf(&["auto", "none", "embed"])),
    ("pooler_config", Kind::PoolerConfig),
    ("speculative_config", Kind::SpeculativeConfig),
    ("reasoning_parser", Kind::ReasoningParser),
    ("enable_auto_tool_choice", Kind::Bool),
    ("tool_call_parser", Kind::ToolCallParser),
    ("structured_outputs_config", Kind::StructuredOutputsConfig),
    ("migration_limit", Kind::LimitOrNull),
];

/// The options of [`OPTIONS`] the head reads itself (the worker ignores them).
pub const HEAD_OPTIONS: &[&str] = &[
    "reasoning_parser",
    "enable_auto_tool_choice",
    "tool_call_parser",
    "structured_outputs_config",
    "migration_limit",
];

/// Checks the `model:` section at `at` (`applications[0].deployments[0].model`).
pub fn check(at: &str, section: &Map<String, Value>) -> Result<(), ConfigError> {
    for (key, value) in section {
        let field = format!("{at}.{key}");
        let Some((_, kind)) = OPTIONS.iter().find(|(name, _)| name == key) else {
            let known: Vec<&str> = OPTIONS.iter().map(|(name, _)| *name).collect();
            return Err(ConfigError::at(
                field,
                format!("unknown model option; the known ones are {}", known.join(", ")),
            ));
        };
        if let Kind::StructuredOutputsConfig = kind {
            // Its own fields are named in the path (`...structured_outputs_config.backend`).
            structured_outputs(&field, value, section)?;
            continue;
        }
        check_value(*kind, value).map_err(|problem| ConfigError::at(field, problem))?;
    }
    if section.get("enable_auto_tool_choice") == Some(&Value::Bool(true)) && section.get("tool_call_parser").is_none() {
        return Err(ConfigError::at(
            format!("{at}.tool_call_parser"),
            "is required with enable_auto_tool_choice: true (the parser that reads the model's tool calls)",
        ));
    }
    runner(at, section)?;
    match (section.get("source"), section.get("model")) {
        (None, None) => Err(ConfigError::at(
            format!("{at}.source"),
            "is required: the model to serve (a .gguf file, a model directory or a hub id)",
        )),
        (Some(_), Some(_)) => {
            Err(ConfigError::at(format!("{at}.model"), "give the model once, as `source` or as `model`, not both"))
        }
        _ => Ok(()),
    }
}

/// Refuses the `runner` / `convert` / `pooler_config` combinations the worker refuses at load (a
/// Llama causal LM pools only converted, and converts only under the pooling runner).
fn runner(at: &str, section: &Map<String, Value>) -> Result<(), ConfigError> {
    let get = |key: &str| section.get(key).and_then(Value::as_str).unwrap_or("auto");
    let pooling = match (get("runner"), get("convert")) {
        ("pooling", "none") => {
            return Err(ConfigError::at(
                format!("{at}.convert"),
                "none under runner: pooling: a Llama causal LM has no pooler of its own; use embed (or auto)",
            ));
        }
        ("generate", "embed") => {
            return Err(ConfigError::at(format!("{at}.convert"), "embed needs runner: pooling (or auto)"));
        }
        (runner, convert) => runner == "pooling" || convert == "embed",
    };
    if !pooling && section.get("pooler_config").is_some_and(|v| !v.is_null()) {
        return Err(ConfigError::at(format!("{at}.pooler_config"), "needs runner: pooling"));
    }
    if pooling && section.get("speculative_config").is_some_and(|v| !v.is_null()) {
        return Err(ConfigError::at(
            format!("{at}.speculative_config"),
            "a pooling model (runner: pooling) generates nothing to speculate on",
        ));
    }
    Ok(())
}

/// Checks vLLM's `pooler_config` object (null: the default).
fn pooler_config(value: &Value) -> Result<(), String> {
    let fields = match value {
        Value::Null => return Ok(()),
        Value::Object(fields) => fields,
        other => return Err(format!("must be an object such as {{\"pooling_type\": \"MEAN\"}}, got {}", kind(other))),
    };
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("pooling_type", Value::String(s)) if ["LAST", "MEAN", "CLS"].contains(&s.as_str()) => {}
            ("pooling_type", Value::Null) | ("normalize", Value::Bool(_) | Value::Null) => {}
            ("pooling_type", other) => return Err(format!("pooling_type must be one of LAST, MEAN, CLS, got {other}")),
            ("normalize", other) => return Err(format!("normalize must be true or false, got {}", kind(other))),
            (other, _) => return Err(format!("unknown field `{other}`; the known ones are pooling_type, normalize")),
        }
    }
    Ok(())
}

/// Checks the `structured_outputs_config` at `at`, and that its `reasoning_parser` is the
/// section's (vLLM's one setting) when both are given.
fn structured_outputs(at: &str, value: &Value, section: &Map<String, Value>) -> Result<(), ConfigError> {
    let config = StructuredOutputsConfig::from_value(at, value)?;
    let model = section.get("reasoning_parser").and_then(Value::as_str).and_then(|p| p.parse().ok());
    config.check_reasoning_parser(model).map_err(|problem| ConfigError::at(format!("{at}.reasoning_parser"), problem))
}

/// Why `value` is not a valid value of `kind`.
pub fn check_value(kind: Kind, value: &Value) -> Result<(), String> {
    let got = || self::kind(value);
    match (kind, value) {
        (Kind::Text | Kind::TextOrNull, Value::String(s)) if s.trim().is_empty() => Err("must not be empty".into()),
        (Kind::Text | Kind::TextOrNull, Value::String(_)) | (Kind::TextOrNull, Value::Null) => Ok(()),
        (Kind::Text, _) => Err(format!("must be a string, got {}", got())),
        (Kind::TextOrNull, _) => Err(format!("must be a string or null, got {}", got())),
        (Kind::CountOrNull, Value::Null) => Ok(()),
        (Kind::Count | Kind::CountOrNull, Value::Number(n)) => match n.as_u64() {
            Some(0) => Err("must be at least 1, got 0".into()),
            Some(_) => Ok(()),
            None if n.as_i64().is_some() => Err(format!("must be at least 1, got {n}")),
            None => Err(format!("must be a whole number, got {n}")),
        },
        (Kind::Count, _) => Err(format!("must be a whole number (at least 1), got {}", got())),
        (Kind::CountOrNull, _) => Err(format!("must be a whole number (at least 1) or null, got {}", got())),
        (Kind::Seed, Value::Number(n)) if n.as_u64().is_some() => Ok(()),
        (Kind::Seed, _) => Err(format!("must be a whole number, at least 0, got {}", got())),
        (Kind::Bool, Value::Bool(_)) => Ok(()),
        (Kind::Bool, _) => Err(format!("must be true or false, got {}", got())),
        (Kind::OneOf(names), Value::String(s)) if names.contains(&s.as_str()) => Ok(()),
        (Kind::OneOf(names), _) => Err(format!("must be one of {}, got {}", names.join(", "), got())),
        (Kind::OneOfOrNull(_), Value::Null) => Ok(()),
        (Kind::OneOfOrNull(names), Value::String(s)) if names.contains(&s.as_str()) => Ok(()),
        (Kind::OneOfOrNull(names), _) => Err(format!("must be one of {} or null, got {}", names.join(", "), got())),
        (Kind::BytesOrNull, Value::Null) => Ok(()),
        (Kind::Bytes | Kind::BytesOrNull, _) => bytes(value),
        (Kind::Fraction, Value::Number(n)) => match n.as_f64() {
            Some(f) if f > 0.0 && f <= 1.0 => Ok(()),
            _ => Err(format!("must be greater than 0 and at most 1, got {n}")),
        },
        (Kind::Fraction, _) => Err(format!("must be a number in (0, 1], got {}", got())),
        (Kind::MillisOrNull, Value::Null) => Ok(()),
        (Kind::MillisOrNull, Value::Number(n)) => match n.as_f64() {
            Some(ms) if ms >= 0.0 => Ok(()),
            _ => Err(format!("must be a number of milliseconds, at least 0, got {n}")),
        },
        (Kind::MillisOrNull, _) => Err(format!("must be a number of milliseconds or null, got {}", got())),
        (Kind::LimitOrNull, Value::Null) => Ok(()),
        (Kind::LimitOrNull, Value::Number(n)) if n.as_u64().is_some_and(|v| v <= u64::from(u32::MAX)) => Ok(()),
        (Kind::LimitOrNull, _) => Err(format!("must be a whole number, at least 0, or null, got {}", got())),
        (Kind::Device, Value::String(s)) if is_device(s) => Ok(()),
        (Kind::Device, _) => Err(format!("must be cpu, cuda or cuda:N, got {}", got())),
        (Kind::ReasoningParser, Value::String(s)) => s.parse::<ReasoningParserKind>().map(|_| ()),
        (Kind::ReasoningParser, _) => Err(format!("must be the name of a reasoning parser, got {}", got())),
        (Kind::ToolCallParser, Value::String(s)) => s.parse::<ToolParserKind>().map(|_| ()),
        (Kind::ToolCallParser, _) => Err(format!("must be the name of a tool call parser, got {}", got())),
        (Kind::StructuredOutputsConfig, _) => StructuredOutputsConfig::check(value),
        (Kind::PoolerConfig, _) => pooler_config(value),
        (Kind::SpeculativeConfig, Value::Null) => Ok(()),
        (Kind::SpeculativeConfig, Value::Object(_)) => serde_json::from_value::<SpeculativeConfig>(value.clone())
            .map_err(|e| e.to_string())
            .and_then(|config| config.settings().map(|_| ())),
        (Kind::SpeculativeConfig, _) => Err(format!(
            "must be an object such as {{\"method\": \"ngram\", \"num_speculative_tokens\": 4}} or {{\"model\": \"<draft>\", \"num_speculative_tokens\": 4}}, got {}",
            got()
        )),
    }
}

/// Whether `device` names a device the worker knows: `cpu`, `cuda`, `cuda:N`.
pub fn is_device(device: &str) -> bool {
    match device {
        "cpu" | "cuda" => true,
        _ => device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()),
    }
}

fn bytes(value: &Value) -> Result<(), String> {
    let size = match value {
        Value::Number(n) => n.as_u64().ok_or_else(|| format!("must be a whole number of bytes, got {n}"))?,
        Value::String(s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|_| format!("must be a size such as 2GiB or 512MiB, got {s:?}"))?
            .as_u64(),
        other => return Err(format!("must be a size such as 2GiB or 512MiB, got {}", kind(other))),
    };
    if size == 0 { Err("must be more than 0 bytes".into()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(section: Value) -> ConfigError {
        check("m", section.as_object().unwrap()).unwrap_err()
    }

    #[test]
    fn every_option_is_accepted_with_a_value_of_its_kind() {
        let section = json!({
            "source": "org/name", "served_model_name": "smol", "load_format": "gguf", "max_model_len": 1024,
            "max_num_seqs": 8, "max_num_batched_tokens": 512, "block_size": 16, "enable_prefix_caching": false,
            "kv_cache_memory": "64MiB", "threads": null, "cpu_weight_format": "q8_0", "dummy_seed": 7,
            "chat_template": null, "device": "cuda:1", "gpu_memory_utilization": 0.5, "dtype": "bfloat16",
            "reasoning_parser": "deepseek_r1", "enable_auto_tool_choice": true, "tool_call_parser": "llama3_json",
            "structured_outputs_config": {"backend": "xgrammar", "reasoning_parser": "deepseek_r1"},
            "runner": "pooling", "convert": "embed", "pooler_config": {"pooling_type": "MEAN", "normalize": false},
            "migration_limit": 0, "tensor_parallel_size": 1,
        });
        check("m", section.as_object().unwrap()).unwrap();
        let speculative = json!({"model": "a.gguf", "speculative_config":
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}});
        check("m", speculative.as_object().unwrap()).unwrap();
        check("m", json!({"model": "a.gguf", "speculative_config": null}).as_object().unwrap()).unwrap();
        let draft = json!({"model": "org/llama-8b", "speculative_config":
            {"method": "draft_model", "model": "org/llama-1b", "num_speculative_tokens": 5, "draft_tensor_parallel_size": 1}});
        check("m", draft.as_object().unwrap()).unwrap();
        check("m", json!({"model": "a.gguf", "kv_cache_memory": 1048576}).as_object().unwrap()).unwrap();
        check("m", json!({"model": "a.gguf", "tensor_parallel_size": 3, "device": "cpu"}).as_object().unwrap())
            .unwrap();
    }

    #[test]
    fn wrong_values_name_the_option_and_what_was_given() {
        let cases = [
            (json!({"source": "m", "max_model_len": 0}), "m.max_model_len", "at least 1, got 0"),
            (json!({"source": "m", "max_num_seqs": -4}), "m.max_num_seqs", "at least 1, got -4"),
            (json!({"source": "m", "tensor_parallel_size": 0}), "m.tensor_parallel_size", "at least 1, got 0"),
            (json!({"source": "m", "block_size": 1.5}), "m.block_size", "whole number, got 1.5"),
            (json!({"source": "m", "max_num_seqs": null}), "m.max_num_seqs", "got null"),
            (
                json!({"source": "m", "enable_prefix_caching": "yes"}),
                "m.enable_prefix_caching",
                "got the string \"yes\"",
            ),
            (json!({"source": "m", "kv_cache_memory": "lots"}), "m.kv_cache_memory", "2GiB"),
            (json!({"source": "m", "kv_cache_memory": 0}), "m.kv_cache_memory", "more than 0"),
            (json!({"source": "m", "device": "gpu"}), "m.device", "cpu, cuda or cuda:N, got the string \"gpu\""),
            (json!({"source": "m", "device": "cuda:x"}), "m.device", "cuda:N"),
            (json!({"source": "m", "gpu_memory_utilization": 1.5}), "m.gpu_memory_utilization", "at most 1, got 1.5"),
            (json!({"source": "m", "gpu_memory_utilization": 0}), "m.gpu_memory_utilization", "greater than 0"),
            (json!({"source": "m", "dtype": "f16"}), "m.dtype", "auto, bfloat16, float32"),
            (json!({"source": "m", "load_format": 3}), "m.load_format", "got the number 3"),
            (json!({"source": "m", "reasoning_parser": "nope"}), "m.reasoning_parser", "nope"),
            (json!({"source": "m", "tool_call_parser": "mistral"}), "m.tool_call_parser", "known: llama3_json, hermes"),
            (json!({"source": "m", "tool_call_parser": 1}), "m.tool_call_parser", "tool call parser"),
            (json!({"source": "m", "enable_auto_tool_choice": "yes"}), "m.enable_auto_tool_choice", "true or false"),
            (
                json!({"source": "m", "migration_limit": -1}),
                "m.migration_limit",
                "at least 0, or null, got the number -1",
            ),
            (json!({"source": "m", "migration_limit": 1.5}), "m.migration_limit", "whole number"),
            (json!({"source": "m", "enable_auto_tool_choice": true}), "m.tool_call_parser", "is required"),
            (
                json!({"source": "m", "structured_outputs_config": {"backend": "nope"}}),
                "m.structured_outputs_config.backend",
                "unknown structured outputs backend `nope`",
            ),
            (
                json!({"source": "m", "structured_outputs_config": {"disable_any_whitespace": 1}}),
                "m.structured_outputs_config.disable_any_whitespace",
                "got the number 1",
            ),
            (json!({"source": "m", "structured_outputs_config": "guidance"}), "m.structured_outputs_config", "object"),
            (json!({"source": "m", "max_model_length": 5}), "m.max_model_length", "unknown model option"),
            (json!({"source": "m", "runner": "embed"}), "m.runner", "auto, generate, pooling"),
            (json!({"source": "m", "runner": "pooling", "convert": "none"}), "m.convert", "no pooler"),
            (json!({"source": "m", "runner": "generate", "convert": "embed"}), "m.convert", "runner: pooling"),
            (json!({"source": "m", "pooler_config": {"pooling_type": "MEAN"}}), "m.pooler_config", "runner: pooling"),
            (
                json!({"source": "m", "runner": "pooling", "pooler_config": {"pooling_type": "STEP"}}),
                "m.pooler_config",
                "LAST, MEAN, CLS",
            ),
            (
                json!({"source": "m", "runner": "pooling", "pooler_config": {"softmax": true}}),
                "m.pooler_config",
                "unknown field `softmax`",
            ),
            (
                json!({"source": "m", "speculative_config": {"method": "ngram", "num_speculative_tokens": 99}}),
                "m.speculative_config",
                "num_speculative_tokens must be 1 to 16",
            ),
            (
                json!({"source": "m", "speculative_config": {"method": "eagle", "num_speculative_tokens": 3}}),
                "m.speculative_config",
                "not built yet",
            ),
            (
                json!({"source": "m", "speculative_config": {"method": "draft_model", "num_speculative_tokens": 3}}),
                "m.speculative_config",
                "needs `model`",
            ),
            (
                json!({"source": "m", "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "k": 1}}),
                "m.speculative_config",
                "unknown field `k`",
            ),
            (json!({"source": "m", "speculative_config": "ngram"}), "m.speculative_config", "must be an object"),
            (
                json!({"source": "m", "runner": "pooling", "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}),
                "m.speculative_config",
                "pooling model",
            ),
            (json!({"source": ""}), "m.source", "must not be empty"),
            (json!({"max_model_len": 5}), "m.source", "is required"),
            (json!({"source": "a", "model": "b"}), "m.model", "not both"),
        ];
        for (section, field, message) in cases {
            let err = refused(section.clone());
            assert_eq!(err.field, field, "{section}");
            assert!(err.message.contains(message), "{section}: `{}` should say `{message}`", err.message);
        }
    }

    #[test]
    fn devices_are_cpu_cuda_or_a_cuda_ordinal() {
        for good in ["cpu", "cuda", "cuda:0", "cuda:12"] {
            assert!(is_device(good), "{good}");
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:-1", ""] {
            assert!(!is_device(bad), "{bad}");
        }
    }
}
