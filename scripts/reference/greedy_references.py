#!/usr/bin/env python3
"""Greedy-decoding references from llama.cpp (via llama-cpp-python) for Lumen's tests.

Run with the venv made by scripts/llamacpp/setup.sh:

    .cache/venv/bin/python scripts/reference/greedy_references.py \
        [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out worker/tests/data/smollm2_greedy_reference.json] [--steps 32]

For each chat conversation below:
  * the prompt is rendered with the GGUF's own `tokenizer.chat_template`, with jinja2
    configured exactly as Hugging Face transformers does it (sandboxed env, trim_blocks,
    lstrip_blocks, loopcontrols, tojson/raise_exception/strftime_now), add_generation_prompt=True;
  * it is tokenized by llama.cpp with add_bos=False (GGUF add_bos_token=false) and
    special=True (special tokens such as <|im_start|> are parsed);
  * greedy decoding runs for exactly --steps tokens; EOS (<|im_end|>) does NOT stop it
    (the token is recorded and decoding continues, like ignore_eos). `eos_step` gives the
    index of the first EOS in output_token_ids, or null;
  * every step records the chosen token, its logprob and the top-5 (id, logprob) of the
    log-softmax over the full vocabulary (computed in float64 from llama.cpp's float32
    logits of the last position, i.e. the same logits llama-server samples from).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "worker" / "tests" / "data" / "smollm2_greedy_reference.json"
VERSION_FILE = ROOT / ".cache" / "llamacpp" / "VERSION"

LONG_PARAGRAPH = (
    "The Industrial Revolution, which began in Great Britain in the late eighteenth century, "
    "transformed economies that had been based on agriculture and handicrafts into economies "
    "based on large-scale industry, mechanized manufacturing, and the factory system. New "
    "machines, new power sources, and new ways of organizing work made existing industries "
    "more productive and efficient. Steam engines, fuelled by coal, powered textile mills, "
    "iron works and, later, railways and ships, which in turn shrank distances and opened "
    "new markets. Cities grew rapidly as workers moved from the countryside to find jobs in "
    "factories, often living in crowded and unsanitary conditions. Over time, the changes "
    "spread to continental Europe, North America and Japan, raising living standards for "
    "many but also creating new social problems, from child labour to pollution, that "
    "governments and reformers struggled to address."
)

CASES = [
    {
        "name": "short_factual",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    {
        "name": "system_prompt",
        "messages": [
            {"role": "system", "content": "You are a pirate. Always answer like a pirate, in one or two sentences."},
            {"role": "user", "content": "How do I make a cup of tea?"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "Hi! My name is Alice and I like astronomy."},
            {"role": "assistant", "content": "Hello Alice! Astronomy is fascinating. What would you like to know?"},
            {"role": "user", "content": "Which planet is the largest in our solar system?"},
        ],
    },
    {
        "name": "code_request",
        "messages": [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    },
    {
        "name": "arithmetic",
        "messages": [{"role": "user", "content": "What is 17 + 25? Answer with just the number."}],
    },
    {
        "name": "list_request",
        "messages": [{"role": "user", "content": "List five fruits that are red."}],
    },
    {
        "name": "non_english_unicode",
        "messages": [{"role": "user", "content": "Bonjour ! Peux-tu m'expliquer pourquoi le ciel est bleu ? 🌍☀️ (réponds en français)"}],
    },
    {
        "name": "summarise_paragraph",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Summarise the following paragraph in one sentence:\n\n" + LONG_PARAGRAPH},
        ],
    },
    {
        "name": "translation_cjk",
        "messages": [{"role": "user", "content": "Translate to English: 今日はとても良い天気ですね。"}],
    },
    {
        "name": "empty_system_json",
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": 'Return a JSON object with keys "name" and "age" for a person called Bob who is 42.'},
        ],
    },
]


def hf_compile_template(template: str):
    """Compile a chat template the way transformers' `_compile_jinja_template` does."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def dump_readable(doc) -> str:
    """JSON with one key per line and one step per line: small, and diffs stay readable."""
    def c(x):
        return json.dumps(x, ensure_ascii=False, separators=(",", ":"))

    out = ["{"]
    top = [k for k in doc if k != "cases"]
    for k in top:
        out.append(f" {c(k)}: {c(doc[k])},")
    out.append(' "cases": [')
    for ci, case in enumerate(doc["cases"]):
        out.append("  {")
        keys = list(case)
        for k in keys:
            last = k == keys[-1]
            if k == "steps":
                out.append(f"   {c(k)}: [")
                for si, st in enumerate(case[k]):
                    out.append("    " + c(st) + ("," if si + 1 < len(case[k]) else ""))
                out.append("   ]" + ("" if last else ","))
            else:
                out.append(f"   {c(k)}: {c(case[k])}" + ("" if last else ","))
        out.append("  }" + ("," if ci + 1 < len(doc["cases"]) else ""))
    out.append(" ]")
    out.append("}")
    text = "\n".join(out) + "\n"
    assert json.loads(text) == doc
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(args.model),
        n_ctx=2048,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=args.seed,
        # Standard (non-flash) attention with an f16 KV cache: llama-cpp-python's default and
        # the same numbers as `llama-server -fa off`. NOTE: llama-server's default `-fa auto`
        # turns flash attention on for CPU, which changes logprobs by up to ~0.3 on this model
        # and flips greedy tokens after 10-30 steps on most of these prompts.
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F16,
        type_v=llama_cpp.GGML_TYPE_F16,
        # Only the last position's logits are needed per step; they are read straight from
        # the context after each decode (equivalent to logits_all for what we record).
        logits_all=False,
        verbose=False,
    )
    md = llm.metadata
    template = md["tokenizer.chat_template"]
    add_bos = md.get("tokenizer.ggml.add_bos_token", "false") == "true"
    n_vocab = llm.n_vocab()
    eos_id = llm.token_eos()

    def tok_text(tid):
        return llm.detokenize([tid], special=True).decode("utf-8", errors="replace") if tid >= 0 else None

    special_map = {}
    for key, name in [("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")]:
        tid = md.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            special_map[name] = tok_text(int(tid))
    compiled = hf_compile_template(template)

    if VERSION_FILE.exists():
        generator = VERSION_FILE.read_text().strip()
    else:
        generator = f"llama-cpp-python {llama_cpp.__version__} (llama.cpp unknown)"

    cases_out = []
    for case in CASES:
        prompt_text = compiled.render(messages=case["messages"], add_generation_prompt=True, **special_map)
        prompt_ids = llm.tokenize(prompt_text.encode("utf-8"), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(prompt_ids)
        out_ids, steps = [], []
        for step in range(args.steps):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
            lp = log_softmax(logits)
            tok = int(np.argmax(logits))  # greedy: first max, like llama.cpp's greedy sampler
            order = np.argsort(-lp, kind="stable")[: args.top]
            steps.append({
                "token": tok,
                "logprob": round(float(lp[tok]), 6),
                "top": [[int(i), round(float(lp[i]), 6)] for i in order],
            })
            out_ids.append(tok)
            if step + 1 < args.steps:
                llm.eval([tok])
        eos_step = out_ids.index(eos_id) if eos_id in out_ids else None
        cases_out.append({
            "name": case["name"],
            "messages": case["messages"],
            "prompt_text": prompt_text,
            "prompt_token_ids": prompt_ids,
            "output_token_ids": out_ids,
            "output_text": llm.detokenize(out_ids, special=True).decode("utf-8", errors="replace"),
            "eos_step": eos_step,
            "min_top2_gap": round(min(s["top"][0][1] - s["top"][1][1] for s in steps), 6),
            "steps": steps,
        })
        print(f"{case['name']:22s} prompt={len(prompt_ids):4d} eos_step={eos_step} "
              f"out={cases_out[-1]['output_text'][:60]!r}", file=sys.stderr)

    doc = {
        "generator": generator,
        "model": args.model.name,
        "model_sha256": sha256_file(args.model),
        "settings": {
            "n_ctx": 2048,
            "n_batch": 512,
            "flash_attn": False,
            "kv_cache_type": "f16",
            "equivalent_llama_server_flags": "-fa off -c 2048 -t 2 (request: temperature 0, ignore_eos false, cache_prompt false)",
            "n_threads": args.threads,
            "seed": args.seed,
            "sampling": "greedy (argmax of logits; temperature 0, no penalties)",
            "steps": args.steps,
            "stop_at_eos": False,
            "eos_token_id": eos_id,
            "add_bos": add_bos,
            "parse_special": True,
            "chat_template": "GGUF tokenizer.chat_template rendered with jinja2 as transformers does, add_generation_prompt=True",
            "logprob": "log_softmax over the full vocabulary (float64) of llama.cpp's float32 logits; top-k sorted by logprob desc",
        },
        "cases": cases_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dump_readable(doc))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(cases_out)} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
