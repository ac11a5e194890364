"""The official `openai` Python client against a running Lumen: model listing, chat (plain and
streamed, with usage), completions, scoring a prompt (echo + logprobs + max_tokens=0, checked
against teacher forcing one token at a time), prompt_logprobs, and errors. Exits non-zero with a
message on any mismatch.

usage: openai_client.py BASE_URL API_KEY MODEL
"""
import json
import sys
import urllib.request

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

models = [m.id for m in client.models.list()]
assert model in models, f"{model} not in {models}"

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.role == "assistant", chat
assert chat.choices[0].message.content, chat
assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length", chat

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
assert usage is not None and usage.completion_tokens == 8, usage

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
assert completion.object == "text_completion" and completion.choices[0].text, completion
assert completion.usage.completion_tokens == 5, completion

# Scoring: the prompt's log-probabilities from one prefill equal those teacher forcing gives, one
# token at a time (the prefix as the prompt, the next token forced by logit_bias; logprobs are of
# the raw logits, which the bias does not touch).
root = base_url.rsplit("/v1", 1)[0]
tokenize = urllib.request.Request(
    root + "/tokenize",
    data=json.dumps({"model": model, "prompt": "The quick brown fox jumps over the lazy dog"}).encode(),
    headers={"Content-Type": "application/json"},
)
ids = json.load(urllib.request.urlopen(tokenize))["tokens"]
assert len(ids) >= 8, ids
scored = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
choice = scored.choices[0]
lp = choice.logprobs
assert len(lp.tokens) == len(ids) == scored.usage.prompt_tokens, (lp.tokens, ids, scored.usage)
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp
assert "".join(lp.tokens) == choice.text, (lp.tokens, choice.text)
assert choice.finish_reason == "length", choice
forced = []
for i in range(1, len(ids)):
    step = client.completions.create(
        model=model, prompt=ids[:i], max_tokens=1, temperature=0, logprobs=0, logit_bias={str(ids[i]): 100}
    )
    assert step.choices[0].logprobs.tokens[0] == lp.tokens[i], (step.choices[0].logprobs, lp.tokens[i])
    forced.append(step.choices[0].logprobs.token_logprobs[0])
for i, (got, want) in enumerate(zip(lp.token_logprobs[1:], forced)):
    assert abs(got - want) < 1e-3, (i, got, want)
total, want = sum(lp.token_logprobs[1:]), sum(forced)
assert abs(total - want) < 1e-3 * len(forced), (total, want)

# vLLM's prompt_logprobs: per choice, null first, then {token id: {logprob, rank, decoded_token}}.
ranked = client.completions.create(
    model=model, prompt=ids, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
)
plp = ranked.choices[0].prompt_logprobs
assert plp[0] is None and len(plp) == len(ids), plp
for i, entry in enumerate(plp[1:]):
    actual = entry[str(ids[i + 1])]
    assert abs(actual["logprob"] - forced[i]) < 1e-3 and actual["rank"] >= 1, (i, entry)
    assert 2 <= len(entry) <= 3, entry

# Streamed echo: the prompt's text comes with the first output.
chunks = list(
    client.completions.create(model=model, prompt=ids, echo=True, max_tokens=3, temperature=0, stream=True)
)
assert chunks[0].choices[0].text.startswith(choice.text), (chunks[0], choice.text)

# A bad value is a 400 naming the field, and the server goes on serving.
for bad in ({"prompt_logprobs": 21}, {"prompt_logprobs": 1, "stream": True}):
    try:
        client.completions.create(model=model, prompt="x", max_tokens=1, extra_body=bad)
        raise AssertionError(f"{bad} was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == "prompt_logprobs", (e, e.body)
try:
    client.completions.create(model=model, prompt="x", max_tokens=0)
    raise AssertionError("max_tokens=0 without echo was accepted")
except openai.BadRequestError as e:
    assert e.param == "max_tokens", e.body
again = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
assert again.choices[0].logprobs.token_logprobs == lp.token_logprobs, "the same prompt scores the same"

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e

bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("a wrong API key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

print("openai client: ok")
