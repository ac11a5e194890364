"""The official `openai` Python client's embeddings against a Lumen serving a model with
`--runner pooling`: float and base64 (the SDK's default, which it decodes; and explicit, decoded
here as little-endian float32) give the same vectors; a list's data follow its order with their
index; the same text gives the same vector alone and in a batch; usage counts the tokens /tokenize
reports; token-id input equals its text; paraphrases are closer than unrelated texts (a sanity
check of the pooled hidden states, not a quality claim); refusals raise BadRequestError. Exits
non-zero with a message on any mismatch.

usage: openai_embeddings.py BASE_URL API_KEY MODEL
"""
import base64
import json
import math
import struct
import sys
import urllib.request

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
root = base_url.rsplit("/v1", 1)[0]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def tokens(text):
    request = urllib.request.Request(
        f"{root}/tokenize",
        data=json.dumps({"model": model, "prompt": text}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(request) as reply:
        return json.load(reply)["tokens"]


def embed(inputs, **kwargs):
    return client.embeddings.create(model=model, input=inputs, **kwargs)


text = "The cat sat on the mat."
floats = embed(text, encoding_format="float")
assert floats.object == "list" and floats.model == model, floats
vector = floats.data[0].embedding
assert floats.data[0].object == "embedding" and floats.data[0].index == 0, floats.data[0]
assert len(vector) == 576, len(vector)  # SmolLM2-135M's hidden size
assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-4, "normalized by default"

# The SDK asks for base64 by default and decodes it; explicitly, the string is ours to decode.
default = embed(text)
assert default.data[0].embedding == vector, "the SDK's base64 path decodes to the float vector"
raw = embed(text, encoding_format="base64").data[0].embedding
assert isinstance(raw, str), type(raw)
decoded = list(struct.unpack(f"<{len(vector)}f", base64.b64decode(raw)))
assert decoded == vector, "base64 is the float vector's little-endian f32 bytes"

# A batch: data in input order with their index, each equal to the text embedded alone.
texts = [
    "The cat sat on the mat.",
    "A cat was sitting on the mat.",
    "Quarterly revenue grew by eight percent.",
    "How do I bake bread at home?",
    "What is a simple recipe for homemade bread?",
    "The stock market closed lower today.",
]
batch = embed(texts, encoding_format="float")
assert [d.index for d in batch.data] == list(range(len(texts))), batch.data
for i, t in enumerate(texts):
    alone = embed(t, encoding_format="float").data[0].embedding
    c = cosine(alone, batch.data[i].embedding)
    assert c > 0.9999, f"{t!r}: alone vs in a batch, cosine {c}"
assert cosine(batch.data[0].embedding, vector) > 0.9999

# Usage: every input's prompt tokens, as /tokenize counts them; total = prompt.
counts = [len(tokens(t)) for t in texts]
assert batch.usage.prompt_tokens == sum(counts), (batch.usage, counts)
assert batch.usage.total_tokens == batch.usage.prompt_tokens, batch.usage

# Token ids: one list, and a list of lists, give the vectors of their texts.
ids = tokens(texts[3])
by_ids = embed(ids, encoding_format="float").data[0].embedding
assert cosine(by_ids, batch.data[3].embedding) > 0.9999
lists = embed([tokens(t) for t in texts[:2]], encoding_format="float")
assert [round(cosine(d.embedding, batch.data[d.index].embedding), 4) for d in lists.data] == [1.0, 1.0]

# Paraphrases are closer than unrelated texts.
v = [d.embedding for d in batch.data]
for para, unrelated in [((0, 1), (0, 2)), ((3, 4), (3, 5)), ((1, 0), (1, 5)), ((4, 3), (4, 2))]:
    p, u = cosine(v[para[0]], v[para[1]]), cosine(v[unrelated[0]], v[unrelated[1]])
    assert p > u, f"paraphrase {para} {p:.4f} <= unrelated {unrelated} {u:.4f}"

# Refusals are OpenAI errors the SDK raises as BadRequestError.
for bad in [dict(input=[]), dict(input=text, dimensions=64), dict(input=[[1, 2], [-5]])]:
    try:
        client.embeddings.create(model=model, **bad)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body and e.body.get("message"), e
    else:
        raise AssertionError(f"{bad} was accepted")
try:
    client.completions.create(model=model, prompt="Hello", max_tokens=4)
except openai.BadRequestError as e:
    assert "does not support Completions API" in str(e), e
else:
    raise AssertionError("a pooling model generated text")
print("ok")
