#!/usr/bin/env python3
"""An independent float64 Llama over a Hugging Face checkpoint directory, for checking how Lumen
reads config.json (both transformers 5's `rope_parameters` and the older `rope_theta` +
`rope_scaling`) and each rope type's formula.

Reads config.json and model.safetensors (F32 or BF16; the header is parsed here, no safetensors
package), implements the rotary frequencies of transformers' `modeling_rope_utils` (default,
linear, dynamic, llama3, yarn, longrope, including the attention factor yarn and longrope put on
cos/sin) with transformers' own rules for the current sequence length (dynamic grows its base
past max_position_embeddings; longrope switches to long_factor past
original_max_position_embeddings), and runs the whole prompt through the model in numpy float64.

Usage: python3 hf_checkpoint_reference.py CASES.json
  CASES.json: [{"dir": "/path/to/checkpoint", "prompt": [token ids]}, ...]
Prints JSON to stdout: [{"logits": [...], "plain_logits": [...]}, ...], the last prompt
position's logits, and the same model run with plain rotary embeddings of base 10,000 (what a
reader that misses the rope settings would compute), so a test can show it tells them apart.
"""
import json
import math
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + n + start:8 + n + end]
        if info["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            raise SystemExit(f"{name}: dtype {info['dtype']} not handled")
        out[name] = a.reshape(info["shape"])
    return out


def rope_settings(cfg):
    """(theta, rope dict) from either spelling; the per-layer-type form gives its first entry."""
    params = cfg.get("rope_parameters")
    if params and all(isinstance(v, dict) for v in params.values()):
        params = next(iter(params.values()))
    rope = dict(params or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return float(theta), rope


def inv_freq_and_attention(cfg, theta, rope, dim, seq_len):
    """transformers' ROPE_INIT_FUNCTIONS, evaluated for a sequence of seq_len tokens."""
    kind = rope["rope_type"]
    max_pos = cfg.get("max_position_embeddings", 2048)
    orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv = theta ** -exponents
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rope["factor"], 1.0
    if kind == "dynamic":
        factor, seq = rope["factor"], max(seq_len, max_pos)
        grown = theta * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return grown ** -exponents, 1.0
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > orig / low, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        return np.where(medium, (1 - smooth) * out / factor + smooth * out, out), 1.0
    if kind == "yarn":
        factor = rope["factor"] if rope.get("factor") is not None else max_pos / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rope.get("attention_factor")
        if attention is None:
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def correction_dim(turns):
            return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        return (inv / factor) * (1 - extrapolation) + inv * extrapolation, attention
    if kind == "longrope":
        factor = rope.get("factor") or max_pos / orig
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = np.array(rope["long_factor"] if seq_len > orig else rope["short_factor"], dtype=np.float64)
        return inv / ext, attention
    raise SystemExit(f"rope type {kind} not implemented here")


def last_logits(cfg, w, tokens, inv, attention):
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or hidden // heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    t = len(tokens)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :] * attention
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :] * attention

    def rotate(x):  # Hugging Face's rotate_half layout: element i pairs with i + hd/2
        half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
        return x * cos + half * sin

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        xn = rms(x, w[p + "input_layernorm.weight"])
        q = rotate((xn @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, hd))
        k = rotate((xn @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv_heads, hd))
        v = (xn @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv_heads, hd)
        out = np.empty((t, heads, hd))
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = q[:, h, :] @ k[:, g, :].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            out[:, h, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, g, :]
        x = x + out.reshape(t, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
        xn = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = xn @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (xn @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x[-1], w["model.norm.weight"]) @ head.T


def main():
    results = []
    for case in json.load(open(sys.argv[1])):
        cfg = json.load(open(os.path.join(case["dir"], "config.json")))
        w = read_safetensors(os.path.join(case["dir"], "model.safetensors"))
        theta, rope = rope_settings(cfg)
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        tokens = case["prompt"]
        inv, attention = inv_freq_and_attention(cfg, theta, rope, hd, len(tokens))
        plain = 10000.0 ** -(np.arange(0, hd, 2, dtype=np.float64) / hd)
        results.append({"logits": last_logits(cfg, w, tokens, inv, attention).tolist(),
                        "plain_logits": last_logits(cfg, w, tokens, plain, 1.0).tolist()})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
