#!/usr/bin/env python3
"""Merge per-run bench JSONs into one results file and print a side-by-side table.

usage: bench_table.py --out RESULTS.json --settings JSON RUN.json [RUN.json ...]
Columns: llama.cpp c=1, lumen c=1, llama.cpp c=HIGH, lumen c=HIGH (missing runs show "-").
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROWS = [
    ("duration_s", "duration (s)", "{:.2f}"),
    ("request_throughput", "requests/s", "{:.3f}"),
    ("prompt_tokens_per_s", "prompt tok/s", "{:.1f}"),
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("decode_tokens_per_s_per_stream", "decode tok/s/stream", "{:.1f}"),
    ("ttft_ms.mean", "TTFT mean (ms)", "{:.1f}"),
    ("ttft_ms.p50", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_ms.p99", "TTFT p99 (ms)", "{:.1f}"),
    ("tpot_ms.mean", "TPOT mean (ms)", "{:.2f}"),
    ("tpot_ms.p99", "TPOT p99 (ms)", "{:.2f}"),
    ("itl_ms.mean", "ITL mean (ms)", "{:.2f}"),
    ("itl_ms.p50", "ITL p50 (ms)", "{:.2f}"),
    ("itl_ms.p90", "ITL p90 (ms)", "{:.2f}"),
    ("itl_ms.p99", "ITL p99 (ms)", "{:.2f}"),
]


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="{}")
    ap.add_argument("runs", nargs="*")
    args = ap.parse_args()

    runs = []
    for p in args.runs:
        if os.path.exists(p) and os.path.getsize(p) > 0:
            with open(p) as f:
                runs.append(json.load(f))
    doc = {"settings": json.loads(args.settings), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    concs = sorted({r["concurrency"] for r in runs}) or [1]
    cols = []
    for c in concs:
        for eng in ("llama.cpp", "lumen"):
            run = next((r for r in runs if r.get("engine", "").startswith(eng) and r["concurrency"] == c), None)
            cols.append((f"{eng} c={c}", run))
    w0 = max(len(r[1]) for r in ROWS) + 2
    widths = [max(len(name), 9) + 2 for name, _ in cols]
    print("".ljust(w0) + "".join(name.rjust(w) for (name, _), w in zip(cols, widths)))
    for key, label, fmt in ROWS:
        cells = []
        for (_, run), w in zip(cols, widths):
            v = get(run, key) if run else None
            cells.append((fmt.format(v) if isinstance(v, (int, float)) else "-").rjust(w))
        print(label.ljust(w0) + "".join(cells))
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
