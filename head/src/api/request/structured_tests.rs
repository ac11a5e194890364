use serde_json::json;

use super::*;

fn parse(body: Value) -> Result<Option<pb::StructuredOutput>, ApiError> {
    from_body(body.as_object().unwrap())
}

fn kind(body: Value) -> (String, Kind) {
    let so = parse(body.clone()).unwrap().unwrap_or_else(|| panic!("{body}: no constraint"));
    (so.param, so.kind.unwrap())
}

fn refused(body: Value) -> (String, String) {
    match parse(body.clone()) {
        Err(ApiError::InvalidParam { param, message }) => (param, message),
        other => panic!("{body}: expected a parameter error, got {other:?}"),
    }
}

#[test]
fn every_spelling_becomes_one_constraint_naming_its_field() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let text = schema.to_string();
    let cases = [
        (json!({"response_format": {"type": "json_object"}}), "response_format", Kind::JsonObject(true)),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x_1", "schema": schema, "strict": true}}}),
            "response_format",
            Kind::JsonSchema(text.clone()),
        ),
        (json!({"structured_outputs": {"json": schema}}), "structured_outputs.json", Kind::JsonSchema(text.clone())),
        (json!({"structured_outputs": {"json": text}}), "structured_outputs.json", Kind::JsonSchema(text.clone())),
        (json!({"structured_outputs": {"regex": "a+"}}), "structured_outputs.regex", Kind::Regex("a+".into())),
        (
            json!({"structured_outputs": {"choice": ["a", "b"]}}),
            "structured_outputs.choice",
            Kind::Choice(pb::ChoiceList { choices: vec!["a".into(), "b".into()] }),
        ),
        (
            json!({"structured_outputs": {"grammar": "start: \"x\""}}),
            "structured_outputs.grammar",
            Kind::Grammar("start: \"x\"".into()),
        ),
        (
            json!({"structured_outputs": {"json_object": true}}),
            "structured_outputs.json_object",
            Kind::JsonObject(true),
        ),
        (json!({"guided_json": schema}), "guided_json", Kind::JsonSchema(text.clone())),
        (json!({"guided_regex": "[0-9]+"}), "guided_regex", Kind::Regex("[0-9]+".into())),
        (json!({"guided_choice": ["x"]}), "guided_choice", Kind::Choice(pb::ChoiceList { choices: vec!["x".into()] })),
        (json!({"guided_grammar": "start: \"y\""}), "guided_grammar", Kind::Grammar("start: \"y\"".into())),
    ];
    for (body, param, want) in cases {
        assert_eq!(kind(body.clone()), (param.to_string(), want), "{body}");
    }
}

#[test]
fn no_constraint_and_text_format_send_nothing() {
    assert_eq!(parse(json!({})).unwrap(), None);
    assert_eq!(parse(json!({"response_format": {"type": "text"}, "structured_outputs": null})).unwrap(), None);
    assert_eq!(parse(json!({"guided_decoding_backend": "guidance"})).unwrap(), None);
}

#[test]
fn options_travel_with_the_constraint() {
    let so = parse(json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": true,
        "disable_additional_properties": true, "whitespace_pattern": "[ ]?", "disable_fallback": true}}))
    .unwrap()
    .unwrap();
    assert!(so.disable_any_whitespace && so.disable_additional_properties);
    assert_eq!(so.whitespace_pattern, "[ ]?");
    let so = parse(json!({"guided_regex": "a", "guided_whitespace_pattern": "\\s*"})).unwrap().unwrap();
    assert_eq!(so.whitespace_pattern, "\\s*");
}

#[test]
fn a_second_constraint_is_refused_naming_it() {
    let cases = [
        (json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}), "guided_regex"),
        (json!({"structured_outputs": {"regex": "a"}, "guided_json": {}}), "guided_json"),
        (json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs.choice"),
        (
            json!({"response_format": {"type": "json_object"}, "structured_outputs": {"json_object": true}}),
            "structured_outputs.json_object",
        ),
    ];
    for (body, param) in cases {
        let (got, message) = refused(body.clone());
        assert_eq!(got, param, "{body}");
        assert!(message.contains("only one"), "{message}");
    }
}

#[test]
fn malformed_fields_are_refused_naming_them() {
    let cases = [
        (json!({"response_format": "json"}), "response_format"),
        (json!({"response_format": {"type": "xml"}}), "response_format.type"),
        (json!({"response_format": {"type": "json_schema"}}), "response_format.json_schema"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": "yes"}}}),
            "response_format.json_schema.strict",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": 5}}}),
            "response_format.json_schema.schema",
        ),
        (json!({"response_format": {"type": "structural_tag"}}), "response_format"),
        (json!({"structured_outputs": 3}), "structured_outputs"),
        (json!({"structured_outputs": {}}), "structured_outputs"),
        (json!({"structured_outputs": {"regexp": "a"}}), "structured_outputs.regexp"),
        (json!({"structured_outputs": {"json": "{not json"}}), "structured_outputs.json"),
        (json!({"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
        (json!({"structured_outputs": {"choice": ["a", 1]}}), "structured_outputs.choice"),
        (json!({"structured_outputs": {"regex": 5}}), "structured_outputs.regex"),
        (json!({"structured_outputs": {"json_object": "yes"}}), "structured_outputs.json_object"),
        (
            json!({"structured_outputs": {"regex": "a", "whitespace_pattern": 1}}),
            "structured_outputs.whitespace_pattern",
        ),
        (json!({"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs.structural_tag"),
        (json!({"guided_grammar": ["a"]}), "guided_grammar"),
        (json!({"guided_decoding_backend": 1}), "guided_decoding_backend"),
    ];
    for (body, param) in cases {
        assert_eq!(refused(body.clone()).0, param, "{body}");
    }
}

#[test]
fn a_forced_tool_call_constrains_alone_and_names_tool_choice() {
    let schema = json!({"type": "object"});
    let so = tool_call(None, &schema).unwrap();
    assert_eq!(so.param, "tool_choice");
    assert_eq!(so.kind, Some(Kind::JsonSchema(r#"{"type":"object"}"#.into())));
    let user = parse(json!({"response_format": {"type": "json_object"}})).unwrap();
    match tool_call(user.as_ref(), &schema) {
        Err(ApiError::InvalidParam { param, message }) => {
            assert_eq!(param, "tool_choice");
            assert!(message.contains("response_format"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_servers_defaults_turn_options_on_beside_the_requests_own() {
    let on = StructuredOutputsConfig {
        disable_any_whitespace: true,
        disable_additional_properties: true,
        ..StructuredOutputsConfig::default()
    };
    let off = StructuredOutputsConfig::default();
    let whitespace_only = json!({"structured_outputs": {"regex": "a+", "disable_any_whitespace": true}});
    // (request, server defaults) -> (disable_any_whitespace, disable_additional_properties)
    let cases = [
        (json!({"guided_regex": "a+"}), off, (false, false)),
        (json!({"guided_regex": "a+"}), on, (true, true)),
        (whitespace_only.clone(), off, (true, false)),
        (whitespace_only, on, (true, true)),
    ];
    for (body, defaults, expected) in cases {
        let so = with_defaults(parse(body.clone()).unwrap(), &defaults).unwrap();
        assert_eq!((so.disable_any_whitespace, so.disable_additional_properties), expected, "{body} {defaults:?}");
    }
    // No constraint stays none; the rest of a constraint is kept as it was.
    assert_eq!(with_defaults(None, &on), None);
    let so = parse(json!({"guided_whitespace_pattern": "[ ]?", "guided_json": {"type": "object"}})).unwrap();
    let kept = with_defaults(so.clone(), &on).unwrap();
    assert_eq!(
        (kept.whitespace_pattern.as_str(), kept.param.as_str(), &kept.kind),
        ("[ ]?", "guided_json", &so.unwrap().kind)
    );
}
