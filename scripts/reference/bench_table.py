#!/usr/bin/env python3
"""Merge per-run bench JSONs into one results file and print side-by-side tables.

usage: bench_table.py --out RESULTS.json [--settings JSON] [--run LABEL RUN.json ...] [RUN.json ...]

Each run is a JSON report of `lumen bench serve` or `lumen bench offline`. `--run` names its
column (e.g. "llama.cpp HTTP", "Lumen HTTP", "Lumen offline"); a bare path is named by its
`engine` field. One table per concurrency, one column per label in the order first given;
a missing run shows "-". RESULTS.json holds the settings and every run, each with its label.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROWS = [
    ("num_prompts", "requests ok", "{:d}"),
    ("failed", "requests failed", "{:d}"),
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


def cell(value, fmt):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return fmt.format(int(value) if fmt == "{:d}" else value)


def load(label, path):
    if not (os.path.exists(path) and os.path.getsize(path) > 0):
        print(f"skipping {path}: missing or empty", file=sys.stderr)
        return None
    with open(path) as f:
        run = json.load(f)
    run["label"] = label or run.get("engine", os.path.basename(path))
    return run


def table(runs, labels, concurrency):
    cols = [(label, next((r for r in runs if r["label"] == label and r.get("concurrency") == concurrency), None))
            for label in labels]
    w0 = max(len(r[1]) for r in ROWS) + 2
    widths = [max(len(label), 9) + 2 for label, _ in cols]
    lines = [f"c={concurrency}".ljust(w0) + "".join(label.rjust(w) for (label, _), w in zip(cols, widths))]
    for key, name, fmt in ROWS:
        cells = [cell(get(run, key), fmt).rjust(w) if run else "-".rjust(w) for (_, run), w in zip(cols, widths)]
        lines.append(name.ljust(w0) + "".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--run", nargs=2, action="append", default=[], metavar=("LABEL", "FILE"))
    ap.add_argument("runs", nargs="*", help="run files named by their engine field")
    args = ap.parse_args()

    loaded = [load(label, path) for label, path in args.run] + [load(None, path) for path in args.runs]
    runs = [r for r in loaded if r is not None]
    doc = {"settings": json.loads(args.settings), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    labels = list(dict.fromkeys(r["label"] for r in runs))
    concurrencies = sorted({r.get("concurrency") for r in runs if r.get("concurrency") is not None})
    print("\n\n".join(table(runs, labels, c) for c in concurrencies) or "no runs")
    failed = [(r["label"], r.get("concurrency"), r["failures"][:3]) for r in runs if r.get("failed")]
    for label, c, failures in failed:
        print(f"!! {label} c={c}: failed requests, e.g. {failures}", file=sys.stderr)
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
