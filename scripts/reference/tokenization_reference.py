#!/usr/bin/env python3
"""Ground-truth tokenization of SmolLM2's GGUF tokenizer by llama.cpp (via llama-cpp-python).

Loads only the vocabulary (vocab_only=True) of models/SmolLM2-135M-Instruct.Q4_1.gguf, tokenizes
each test string with parse_special=True (special tokens written in the text are matched whole,
as Lumen does) and add_special=False, and writes worker/tests/data/smollm2_tokenization.json:

  {"model": "...", "llama_cpp_python": "x.y.z", "cases": [{"text": "...", "ids": [...]}, ...]}

The Rust test `tokenizer::tests::smollm2_matches_llama_cpp_tokenization` compares our ids with it.

Usage (from the repository root):
  .cache/venv/bin/python scripts/reference/tokenization_reference.py
"""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "worker" / "tests" / "data" / "smollm2_tokenization.json"

CASES = [
    "Hello, world!",
    "The year 2024 had 366 days; 12345 is not 1234.5",
    "def f(x):\n    if x:\n        return [x * 2 for _ in range(3)]\n\treturn None\n",
    "  leading and trailing spaces   ",
    "日本語のテキストと中文混合",
    "emoji: 🦀🚀 family 👨‍👩‍👧 flag 🇫🇷 é vs e\u0301",
    "don't won't I'M WE'LL you're",
    "\n\n\r\n tabs\t\tand\u00a0nbsp",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "3.14159 x=1e-5 0x1F 1,000,000 +44 (0)20 7946 0958",
    "https://example.com/path?q=a&b=c#frag",
    "مرحبا بالعالم — नमस्ते दुनिया — 안녕하세요 세계",
    "!!!??? ... ---- ==== **bold** __init__ a->b <=> |x|",
    "    \n\n\n    x\n \n",
    "Ünïcödé ÇÀSÊ MIXED café naïve",
    "a<|endoftext|>b",
]


def main() -> int:
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed in this interpreter", file=sys.stderr)
        return 1
    llm = llama_cpp.Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    cases = [
        {"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)}
        for text in CASES
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the file small and its diffs readable.
    head = {"model": MODEL.name, "llama_cpp_python": llama_cpp.__version__}
    lines = [json.dumps(case, ensure_ascii=False) for case in cases]
    text = json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n  ' + ",\n  ".join(lines) + "\n]}\n"
    json.loads(text)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
