//! Tool calling through chat templates: `tools` reach the template as its `tools` variable (in
//! the order the request wrote them), an assistant turn's `tool_calls` render with their
//! arguments as an object (parsed from the API's JSON string; empty becomes `{}`), `tool`
//! messages render with their content. The expected prompts are what Python's jinja2 renders
//! with transformers' settings (`trim_blocks`, `lstrip_blocks`, `tojson` as `json.dumps(...,
//! ensure_ascii=False)`) for [`TEMPLATE`], a Llama-3.1-style tool template written for this
//! test: the header with `Environment: ipython`, each tool as `tojson(indent=4)`, calls as
//! `{"name": ..., "parameters": ...}` joined by `; `, results under the `ipython` role.

use serde_json::json;

use super::*;

const TEMPLATE: &str = r#"{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools is not none %}
    {{- 'Environment: ipython\n' }}
{%- endif %}
{{- 'Today Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\n\n' }}
{%- if tools is not none %}
    {{- 'To call a function, answer with JSON {"name": function name, "parameters": arguments}.\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- '\n\n' }}
    {%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for m in rest %}
    {%- if m.role == 'assistant' and m.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- for c in m.tool_calls %}
            {{- '{"name": "' + c.function.name + '", "parameters": ' + c.function.arguments | tojson + '}' }}
            {%- if not loop.last %}{{- '; ' }}{%- endif %}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif m.role == 'tool' or m.role == 'ipython' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if m.content is mapping or m.content is iterable and m.content is not string %}
            {{- m.content | tojson }}
        {%- else %}
            {{- m.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

fn tokenizer() -> Tokenizer {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/llama3.1-tokenizer");
    Tokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model.sh)"))
        .with_chat_template(TEMPLATE.to_string())
        .expect("the template compiles")
}

/// A tool as OpenAI clients write it (`type` before `function`, `name` before `parameters`).
fn weather() -> serde_json::Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}})
}

fn options(tools: bool) -> ChatTemplateOptions {
    let mut opts = ChatTemplateOptions { add_generation_prompt: tools, ..Default::default() };
    if tools {
        opts.extra.insert("tools".into(), json!([weather()]));
    }
    opts
}

fn messages(value: serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(value).expect("messages")
}

#[test]
fn tools_render_in_the_order_the_request_wrote_them() {
    let m = messages(
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Zürich?"}]),
    );
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nToday Date: 26 Jul 2024\n\nTo call a function, answer with JSON {\"name\": function name, \"parameters\": arguments}.\n{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \"description\": \"The weather in a city\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \"type\": \"string\",\n                    \"description\": \"e.g. Zürich\"\n                },\n                \"unit\": {\n                    \"type\": \"string\",\n                    \"enum\": [\n                        \"celsius\",\n                        \"fahrenheit\"\n                    ]\n                }\n            },\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWeather in Zürich?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(tokenizer().apply_chat_template(&m, &options(true)).unwrap(), want);
}

#[test]
fn tool_calls_and_tool_results_render_as_transformers_renders_them() {
    let m = messages(json!([
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"unit\": \"celsius\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "{\"error\": \"no city\"}"}
    ]));
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nToday Date: 26 Jul 2024\n\nTo call a function, answer with JSON {\"name\": function name, \"parameters\": arguments}.\n{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \"description\": \"The weather in a city\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \"type\": \"string\",\n                    \"description\": \"e.g. Zürich\"\n                },\n                \"unit\": {\n                    \"type\": \"string\",\n                    \"enum\": [\n                        \"celsius\",\n                        \"fahrenheit\"\n                    ]\n                }\n            },\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWeather in Zürich?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}; {\"name\": \"get_weather\", \"parameters\": {}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n22 degrees<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{\"error\": \"no city\"}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(tokenizer().apply_chat_template(&m, &options(true)).unwrap(), want);
}

#[test]
fn without_tools_the_template_sees_none() {
    let m = messages(json!([{"role": "user", "content": "Hi"}]));
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>";
    assert_eq!(tokenizer().apply_chat_template(&m, &options(false)).unwrap(), want);
}
