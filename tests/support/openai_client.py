"""The official `openai` Python client against a running Lumen: model listing, chat (plain and
streamed, with usage), completions, and an error. Exits non-zero with a message on any mismatch.

usage: openai_client.py BASE_URL API_KEY MODEL
"""
import sys

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
