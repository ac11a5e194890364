use serde_json::json;

use super::*;

const AT: &str = "applications[0].deployments[0].model.structured_outputs_config";

fn read(value: Value) -> Result<StructuredOutputsConfig, ConfigError> {
    StructuredOutputsConfig::from_value(AT, &value)
}

#[test]
fn every_field_is_read_with_a_value_of_its_type() {
    let config = read(json!({
        "backend": "guidance", "disable_fallback": true, "disable_any_whitespace": true,
        "disable_additional_properties": true, "reasoning_parser": "deepseek_r1", "enable_in_reasoning": true,
    }))
    .unwrap();
    assert_eq!(
        config,
        StructuredOutputsConfig {
            backend: Backend::Guidance,
            disable_fallback: true,
            disable_any_whitespace: true,
            disable_additional_properties: true,
            reasoning_parser: Some(ReasoningParserKind::DeepseekR1),
            enable_in_reasoning: true,
        }
    );
}

#[test]
fn absent_fields_keep_vllms_defaults() {
    assert_eq!(read(json!({})).unwrap(), StructuredOutputsConfig::default());
    let defaults = StructuredOutputsConfig::default();
    assert_eq!(defaults.backend, Backend::Auto);
    assert!(!defaults.enable_in_reasoning && !defaults.disable_any_whitespace && !defaults.disable_fallback);
    // vLLM's own default for the parser is the empty string: none.
    assert_eq!(read(json!({"reasoning_parser": ""})).unwrap().reasoning_parser, None);
}

#[test]
fn every_vllm_backend_name_is_accepted_and_only_auto_and_guidance_are_llguidance() {
    for (name, backend) in BACKENDS {
        let config = read(json!({ "backend": name })).unwrap();
        assert_eq!((config.backend, config.backend.name()), (backend, name));
        assert_eq!(backend.is_llguidance(), matches!(name, "auto" | "guidance"), "{name}");
    }
}

#[test]
fn wrong_values_name_the_field_path_and_what_was_given() {
    let cases = [
        (json!("guidance"), AT.to_string(), "must be an object of backend, disable_fallback"),
        (json!(null), AT.to_string(), "got null"),
        (json!([{"backend": "guidance"}]), AT.to_string(), "got a list"),
        (
            json!({"backend": "llama.cpp"}),
            format!("{AT}.backend"),
            "unknown structured outputs backend `llama.cpp` (known: auto, xgrammar, guidance, outlines, lm-format-enforcer)",
        ),
        (json!({"backend": 1}), format!("{AT}.backend"), "must be a backend's name, got the number 1"),
        (json!({"backend": "Guidance"}), format!("{AT}.backend"), "`Guidance`"),
        (json!({"disable_any_whitespace": "yes"}), format!("{AT}.disable_any_whitespace"), "got the string \"yes\""),
        (json!({"disable_additional_properties": 1}), format!("{AT}.disable_additional_properties"), "true or false"),
        (json!({"disable_fallback": null}), format!("{AT}.disable_fallback"), "true or false, got null"),
        (json!({"enable_in_reasoning": "false"}), format!("{AT}.enable_in_reasoning"), "true or false"),
        (
            json!({"reasoning_parser": "qwen3"}),
            format!("{AT}.reasoning_parser"),
            "unknown reasoning parser `qwen3` (known: deepseek_r1)",
        ),
        (
            json!({"reasoning_parser": false}),
            format!("{AT}.reasoning_parser"),
            "reasoning parser, got the boolean false",
        ),
        (
            json!({"backend": "guidance", "any_whitespace": false}),
            format!("{AT}.any_whitespace"),
            "unknown structured outputs option; the known ones are backend, disable_fallback, disable_any_whitespace",
        ),
    ];
    for (value, field, message) in cases {
        let err = read(value.clone()).expect_err(&value.to_string());
        assert_eq!(err.field, field, "{value}");
        assert!(err.message.contains(message), "{value}: `{}` should say `{message}`", err.message);
    }
}

#[test]
fn the_flag_takes_json_text_and_names_the_field_in_its_message() {
    let config: StructuredOutputsConfig = r#"{"backend": "guidance", "disable_any_whitespace": true}"#.parse().unwrap();
    assert_eq!((config.backend, config.disable_any_whitespace), (Backend::Guidance, true));
    let cases = [
        ("{backend: guidance}", "not valid JSON"),
        (r#"{"backend": "xgrammer"}"#, "backend: unknown structured outputs backend `xgrammer`"),
        (r#"{"whitespace": true}"#, "whitespace: unknown structured outputs option"),
        ("true", "must be an object"),
    ];
    for (text, message) in cases {
        let err = text.parse::<StructuredOutputsConfig>().unwrap_err();
        assert!(err.contains(message), "{text}: `{err}` should say `{message}`");
    }
}

#[test]
fn the_reasoning_parser_agrees_with_the_models_or_stands_alone() {
    let own = StructuredOutputsConfig { reasoning_parser: Some(ReasoningParserKind::DeepseekR1), ..Default::default() };
    assert_eq!(own.check_reasoning_parser(Some(ReasoningParserKind::DeepseekR1)), Ok(()));
    assert_eq!(own.check_reasoning_parser(None), Ok(()));
    assert_eq!(
        StructuredOutputsConfig::default().check_reasoning_parser(Some(ReasoningParserKind::DeepseekR1)),
        Ok(())
    );
}

#[test]
fn another_backend_is_warned_of_once_and_llguidance_never() {
    let warned = AtomicBool::new(false);
    assert!(!warn_once(&warned, Backend::Guidance));
    assert!(!warn_once(&warned, Backend::Auto));
    assert!(warn_once(&warned, Backend::Xgrammar));
    assert!(!warn_once(&warned, Backend::Outlines), "once per process");
    assert!(!warn_once(&warned, Backend::Xgrammar));
}
