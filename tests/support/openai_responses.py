"""The official `openai` Python client's Responses API against a running Lumen: create (plain and
streamed, both ways the SDK streams), a multi-turn conversation through previous_response_id,
retrieve, text.format json_schema, and refusals. Exits non-zero with a message on any mismatch.

usage: openai_responses.py BASE_URL API_KEY MODEL
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

first = client.responses.create(
    model=model, input="My name is Ann. Say hello.", instructions="Be brief.", max_output_tokens=8, temperature=0
)
assert first.object == "response" and first.id.startswith("resp_"), first
assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens", first
assert first.output[0].type == "message" and first.output[0].content[0].type == "output_text", first
assert first.output_text, first
assert first.usage.output_tokens == 8, first.usage
assert first.usage.total_tokens == first.usage.input_tokens + 8, first.usage
assert first.instructions == "Be brief." and first.max_output_tokens == 8, first

# Streamed with stream=True: typed events, numbered, adding up to the same text.
events = list(
    client.responses.create(
        model=model, input="My name is Ann. Say hello.", instructions="Be brief.", max_output_tokens=8,
        temperature=0, stream=True,
    )
)
types = [e.type for e in events]
assert types[:2] == ["response.created", "response.in_progress"], types
assert types[-1] == "response.completed", types
assert [e.sequence_number for e in events] == list(range(len(events))), events
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text == first.output_text, (text, first.output_text)
assert events[-1].response.output_text == text, events[-1]

# Streamed with the SDK's helper, which assembles the final response from the events.
with client.responses.stream(model=model, input="My name is Ann. Say hello.", instructions="Be brief.",
                             max_output_tokens=8, temperature=0) as stream:
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert deltas == first.output_text and final.output_text == first.output_text, (deltas, final)

# A second turn continues the first: its prompt holds the first turn.
second = client.responses.create(
    model=model, input="What is my name?", previous_response_id=first.id, max_output_tokens=4, temperature=0
)
assert second.previous_response_id == first.id, second
alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=4, temperature=0, store=False)
assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens, (second.usage, alone.usage)
assert client.responses.retrieve(first.id).output_text == first.output_text

# text.format json_schema: the answer parses and follows the schema.
schema = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"type": "string", "maxLength": 16}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
structured = client.responses.create(
    model=model,
    input="Name a city and its country as JSON.",
    max_output_tokens=60,
    temperature=0,
    text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
)
assert structured.status == "completed", structured
place = json.loads(structured.output_text)
assert set(place) == {"city", "country"} and all(isinstance(v, str) for v in place.values()), place
assert structured.text.format.type == "json_schema", structured.text

# Refusals.
try:
    client.responses.create(model=model, input="x", tools=[{"type": "web_search_preview"}])
    raise AssertionError("a built-in tool was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "tools[0].type", e.body
try:
    client.responses.create(model=model, input="x", previous_response_id="resp_unknown")
    raise AssertionError("an unknown previous_response_id was accepted")
except openai.NotFoundError as e:
    assert "resp_unknown" in str(e), e

print("openai responses: ok")
