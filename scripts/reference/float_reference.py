#!/usr/bin/env python3
"""An independent float64 Llama in numpy, for checking Lumen's float path.

Reads SmolLM2-135M-Instruct.Q4_1.gguf with the `gguf` package, dequantizes every tensor, and runs
the model exactly as written in the Llama papers, but in llama.cpp's own GGUF layout (rotary
embeddings over adjacent pairs on the permuted query/key rows), so Lumen's un-permutation is
checked too. Greedy-decodes a few prompts (prompt ids taken from the llama.cpp reference file) and
writes worker/tests/data/smollm2_float_reference.json with each step's token and top-5 logprobs.

Usage: python3 -m pip install gguf numpy && python3 scripts/reference/float_reference.py
(`load_model` is also what scripts/reference/lm_eval_reference.py scores lm-eval's requests with.)
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = os.path.join(ROOT, "worker", "tests", "data", "smollm2_greedy_reference.json")
OUT = os.path.join(ROOT, "worker", "tests", "data", "smollm2_float_reference.json")
CASES = 4
STEPS = 16


def field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]][0]


def log_softmax(logits):
    """Log-probabilities of logits along the last axis (any leading shape)."""
    top = logits.max(axis=-1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))


def load_model():
    """The dequantized model as `logits(tokens, all_rows=False)`: the next-token logits after the
    last token (every position's with `all_rows`), in float64."""
    r = GGUFReader(MODEL)
    tensors = {t.name: t for t in r.tensors}

    def w(name):
        t = tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)

    layers = int(field(r, "llama.block_count"))
    heads = int(field(r, "llama.attention.head_count"))
    kv_heads = int(field(r, "llama.attention.head_count_kv"))
    eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
    base = float(field(r, "llama.rope.freq_base"))
    embed = w("token_embd.weight")
    hidden = embed.shape[1]
    hd = hidden // heads
    blocks = []
    for i in range(layers):
        p = f"blk.{i}."
        blocks.append({k: w(p + k + ".weight") for k in
                       ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]})
    out_norm = w("output_norm.weight")
    inv_freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    def rope(x):  # x: (T, n, hd) in GGUF layout: pairs (2i, 2i+1)
        pos = np.arange(x.shape[0], dtype=np.float64)[:, None, None]
        ang = pos * inv_freq[None, None, :]
        c, s = np.cos(ang), np.sin(ang)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def logits(tokens, all_rows=False):
        x = embed[tokens]
        t = len(tokens)
        mask = np.triu(np.full((t, t), -np.inf), 1)
        for b in blocks:
            xn = rms(x, b["attn_norm"])
            q = rope((xn @ b["attn_q"].T).reshape(t, heads, hd))
            k = rope((xn @ b["attn_k"].T).reshape(t, kv_heads, hd))
            v = (xn @ b["attn_v"].T).reshape(t, kv_heads, hd)
            out = np.empty((t, heads, hd))
            for h in range(heads):
                g = h // (heads // kv_heads)
                sc = q[:, h, :] @ k[:, g, :].T / np.sqrt(hd) + mask
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                out[:, h, :] = (sc / sc.sum(axis=-1, keepdims=True)) @ v[:, g, :]
            x = x + out.reshape(t, hidden) @ b["attn_output"].T
            xn = rms(x, b["ffn_norm"])
            gate = xn @ b["ffn_gate"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (xn @ b["ffn_up"].T)) @ b["ffn_down"].T
        if all_rows:
            return rms(x, out_norm) @ embed.T
        return rms(x[-1], out_norm) @ embed.T

    return logits


def main():
    logits = load_model()

    reference = json.load(open(PROMPTS))
    cases = []
    for case in reference["cases"][:CASES]:
        tokens = list(case["prompt_token_ids"])
        steps = []
        for _ in range(STEPS):
            lg = logits(tokens)
            lp = log_softmax(lg)
            top = np.argsort(-lp)[:5]
            steps.append({"token": int(top[0]), "logprob": round(float(lp[top[0]]), 6),
                          "top": [[int(i), round(float(lp[i]), 6)] for i in top]})
            tokens.append(int(top[0]))
            print(case["name"], len(steps), int(top[0]), file=sys.stderr)
        cases.append({"name": case["name"], "prompt_token_ids": case["prompt_token_ids"],
                      "output_token_ids": [s["token"] for s in steps], "steps": steps})
    with open(OUT, "w") as f:
        json.dump({"generator": "scripts/reference/float_reference.py (numpy float64, dequantized GGUF)",
                   "model": os.path.basename(MODEL), "cases": cases}, f, indent=1)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
