"""Tool calling through the official `openai` client against a running `lumen serve` (driven by
tests/e2e_openai.rs): a call non-streaming and streamed (the SDK assembling the deltas), a
conversation going on with the tool's result, forced calls (tool_choice "required" and a named
function, decoding constrained to the tools' schemas: arguments validated with jsonschema, and
the SDK's parse() with a Pydantic tool), and refusals as BadRequestError while the server keeps
serving.

usage: openai_tools.py BASE_URL MODEL EXPECTED_NAME EXPECTED_ARGUMENTS_JSON
"""

import json
import sys

import jsonschema
import openai
import pydantic

base_url, model, want_name, want_args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call):
    assert call.type == "function", call
    assert call.id.startswith("call_"), call
    assert call.function.name == want_name, call
    assert json.loads(call.function.arguments) == want_args, call


# Non-streaming.
reply = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=48)
choice = reply.choices[0]
assert choice.finish_reason == "tool_calls", reply
assert len(choice.message.tool_calls) == 1, reply
check_call(choice.message.tool_calls[0])

# Streamed: the SDK's stream helper assembles the tool-call deltas.
with client.chat.completions.stream(
    model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=48
) as stream:
    first_tool_deltas = []
    for event in stream:
        if event.type == "chunk" and event.chunk.choices and event.chunk.choices[0].delta.tool_calls:
            first_tool_deltas.append(event.chunk.choices[0].delta.tool_calls[0])
    final = stream.get_final_completion()
assert final.choices[0].finish_reason == "tool_calls", final
streamed = final.choices[0].message.tool_calls
assert len(streamed) == 1, final
check_call(streamed[0])
assert first_tool_deltas[0].function.name == want_name and first_tool_deltas[0].id, first_tool_deltas
assert len(first_tool_deltas) >= 2, "the arguments arrive in pieces after the name"
assert all(d.id is None for d in first_tool_deltas[1:]), first_tool_deltas

# The conversation goes on with the tool's result (rendered by the template).
call = choice.message.tool_calls[0]
history = QUESTION + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"},
]
reply = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=16)
assert reply.choices[0].message.role == "assistant", reply

# Forced calls: whatever the model would say, the output is a call of a listed tool whose
# arguments validate against its parameters.
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_forced(choice, names, count=None):
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and (count is None or len(calls) == count), choice
    for call in calls:
        assert call.id.startswith("call_") and call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


for question in (QUESTION, [{"role": "user", "content": "Tell me a joke."}]):
    reply = client.chat.completions.create(
        model=model, messages=question, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=128)
    check_forced(reply.choices[0], SCHEMAS)
    reply = client.chat.completions.create(
        model=model, messages=question, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=128)
    check_forced(reply.choices[0], SCHEMAS, count=1)
named = {"type": "function", "function": {"name": "get_time"}}
reply = client.chat.completions.create(
    model=model, messages=QUESTION, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=128)
check_forced(reply.choices[0], {"get_time"}, count=1)
with client.chat.completions.stream(
    model=model, messages=QUESTION, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=128
) as stream:
    final = stream.get_final_completion()
check_forced(final.choices[0], {"get_time"}, count=1)


class GetWeather(pydantic.BaseModel):
    city: str
    unit: str


parsed = client.beta.chat.completions.parse(
    model=model, messages=QUESTION, tools=[openai.pydantic_function_tool(GetWeather)],
    tool_choice={"type": "function", "function": {"name": "GetWeather"}}, temperature=0, max_tokens=128)
arguments = parsed.choices[0].message.tool_calls[0].function.parsed_arguments
assert isinstance(arguments, GetWeather), parsed

# Refusals: 400 with OpenAI's body, naming the field.
bad = [
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tool_choice": "auto"}, "tool_choice"),
]
for extra, param in bad:
    try:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, **extra)
    except openai.BadRequestError as e:
        body = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
        assert e.status_code == 400 and body.get("param") == param, (extra, e.body)
    else:
        raise AssertionError(f"accepted: {extra}")

# Still serving.
reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, tool_choice="none", tools=TOOLS)
assert reply.choices[0].finish_reason in ("stop", "length"), reply
print("ok")
