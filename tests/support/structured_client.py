"""Structured outputs through the official `openai` client against a running Lumen serving a
135M model: only the constraint can make such a model's output valid, so every check asserts the
guarantee (validated by `jsonschema`, `re` and Pydantic). Bad constraints must be 400s naming
their field, with the server serving on. Exits non-zero with a message on any mismatch.

usage: structured_client.py BASE_URL MODEL
"""
import json
import re
import sys
import threading

import jsonschema
import openai
from pydantic import BaseModel, Field

base_url, model = sys.argv[1:3]
client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=300)
ask = [{"role": "user", "content": "Describe a person and their pets."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "alive"],
    "additionalProperties": False,
}
schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def chat(**kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=model, messages=kw.pop("messages", ask), **kw)


def streamed(**kw):
    text, finish = "", None
    for chunk in chat(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def valid_person(text, finish, what):
    assert finish == "stop", (what, finish, text)
    jsonschema.validate(json.loads(text), PERSON)


# A JSON schema at temperature 1 under several seeds, plain and streamed, and n > 1.
for seed in range(4):
    r = chat(response_format=schema_format, temperature=1.0, seed=seed)
    valid_person(r.choices[0].message.content, r.choices[0].finish_reason, f"seed {seed}")
for seed in (10, 11):
    valid_person(*streamed(response_format=schema_format, temperature=1.0, seed=seed), what=f"stream {seed}")
r = chat(extra_body={"structured_outputs": {"json": PERSON}}, temperature=1.0, seed=5, n=3)
assert len(r.choices) == 3
for c in r.choices:
    valid_person(c.message.content, c.finish_reason, "n=3")

# Any JSON object.
r = chat(response_format={"type": "json_object"}, temperature=1.0, seed=1)
assert isinstance(json.loads(r.choices[0].message.content), dict), r

# A regex, a choice and a Lark grammar, by the current and the older field names.
phone = r"\(\d{3}\) \d{3}-\d{4}"
for body in ({"structured_outputs": {"regex": phone}}, {"guided_regex": phone}):
    r = chat(extra_body=body, temperature=1.0, seed=2)
    assert re.fullmatch(phone, r.choices[0].message.content), r
moods = ["positive", "negative", "neutral"]
r = chat(extra_body={"guided_choice": moods}, temperature=1.0, seed=3)
assert r.choices[0].message.content in moods and r.choices[0].finish_reason == "stop", r
text, finish = streamed(extra_body={"structured_outputs": {"choice": moods}}, temperature=1.0, seed=4)
assert text in moods and finish == "stop", (text, finish)
lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/'
for body in ({"structured_outputs": {"grammar": lark}}, {"guided_grammar": lark}):
    text, finish = streamed(extra_body=body, temperature=1.0, seed=6)
    assert re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", text) and finish == "stop", (text, finish)

# Completions take the same constraints. (An open-ended `json_object` at temperature 1 can run a
# 135M model into max_tokens inside a long string; these seeds finish, and the output is then
# whole and valid.)
c = client.completions.create(model=model, prompt="Phone:", max_tokens=40, extra_body={"guided_regex": phone}, seed=1)
assert re.fullmatch(phone, c.choices[0].text), c
c = client.completions.create(
    model=model, prompt="JSON:", max_tokens=200, seed=5, extra_body={"response_format": {"type": "json_object"}}
)
assert isinstance(json.loads(c.choices[0].text), dict), c


# The SDK's parse() with a Pydantic model (it sends a strict json_schema response format).
class Pet(BaseModel):
    kind: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


class Owner(BaseModel):
    name: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=2)


parsed = client.chat.completions.parse(model=model, messages=ask, response_format=Owner, max_tokens=200, seed=7)
owner = parsed.choices[0].message.parsed
assert isinstance(owner, Owner), parsed

# A batch mixing constrained and free requests, all in flight together.
results = {}


def run(i):
    if i % 2:
        results[i] = streamed(response_format=schema_format, temperature=1.0, seed=100 + i)
    else:
        results[i] = streamed(max_tokens=48, temperature=1.0, seed=100 + i)


threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(results) == 6, results
for i, (text, finish) in results.items():
    if i % 2:
        valid_person(text, finish, f"batch {i}")
    else:
        assert text and finish in ("stop", "length"), (i, text, finish)


# Bad constraints: a 400 naming the field, and the server serves on.
def refused(param, **kw):
    try:
        chat(max_tokens=8, **kw)
    except openai.BadRequestError as e:
        body = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
        assert e.status_code == 400 and body.get("param") == param, (param, e.status_code, e.body)
        return
    raise AssertionError(f"accepted a bad constraint for {param}")


refused("response_format", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}})
refused("response_format", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}})
refused("structured_outputs.regex", extra_body={"structured_outputs": {"regex": "(unclosed"}})
refused("guided_grammar", extra_body={"guided_grammar": "start: missing_rule"})
refused("guided_grammar", extra_body={"guided_grammar": 'root ::= "a"'})
refused("structured_outputs.json", extra_body={"structured_outputs": {"json": "{not json"}})
refused("guided_regex", response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})
refused("response_format", response_format={"type": "structural_tag"})
refused("structured_outputs", extra_body={"structured_outputs": {}})
r = chat(max_tokens=4, temperature=0)
assert r.choices[0].message.content is not None, r

print("structured outputs: ok")
