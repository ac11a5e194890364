#!/usr/bin/env python3
"""Load generator for llama.cpp's `llama-server` native /completion endpoint (stdlib only).

Sends NUM_PROMPTS requests, at most CONCURRENCY in flight, each with a prompt of exactly
INPUT_LEN random token ids (fixed seed, different per request, so no prefix sharing),
n_predict OUTPUT_LEN, ignore_eos, temperature 0, cache_prompt false, stream true. Times
every streamed token on the client and writes one JSON object in the schema shared with
`lumen bench offline --json`:

  {"engine", "concurrency", "num_prompts", "input_len", "output_len", "duration_s",
   "request_throughput", "prompt_tokens_per_s", "output_tokens_per_s",
   "decode_tokens_per_s_per_stream", "ttft_ms": {mean,p50,p90,p99}, "tpot_ms": {...},
   "itl_ms": {...}}

Definitions (as in `vllm bench serve`): duration = wall time from the first request sent to
the last response finished (warm-up excluded); throughputs are totals / duration;
TTFT = send -> first token; ITL = gap between consecutive token arrivals;
TPOT = (e2e - ttft) / (output_tokens - 1) per request; decode tok/s per stream = 1000 / mean TPOT.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs):
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


def make_prompts(n, input_len, seed, lo, hi):
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        prompts.append([rng.randrange(lo, hi) for _ in range(input_len)])
    return prompts


def one_request(host, port, prompt, output_len, timeout):
    """Returns dict(ttft, itls, e2e, n_out, n_prompt, server_timings) with times in seconds."""
    body = json.dumps({
        "prompt": prompt,
        "n_predict": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "top_k": 1,
        "repeat_penalty": 1.0,
        "cache_prompt": False,
        "stream": True,
        "return_tokens": True,
    })
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    arrivals = []  # one timestamp per generated token
    n_prompt = None
    timings = None
    final = {}
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        now = time.perf_counter()
        msg = json.loads(payload)
        if "error" in msg:
            raise RuntimeError(f"server error: {msg['error']}")
        # Count tokens by the running `tokens_predicted`: a chunk can carry 2+ tokens when the
        # server held back a token whose text was an incomplete UTF-8 sequence (its `tokens`
        # field then lists only the last one).
        if msg.get("tokens_predicted") is not None:
            k = int(msg["tokens_predicted"]) - len(arrivals)
        elif msg.get("tokens") is not None:
            k = len(msg["tokens"])
        else:
            k = 0 if msg.get("stop") else 1
        arrivals.extend([now] * max(k, 0))
        if msg.get("stop"):
            timings = msg.get("timings")
            n_prompt = msg.get("tokens_evaluated")
            final = {k: msg.get(k) for k in ("stop_type", "tokens_predicted", "truncated")}
            break
    t_end = time.perf_counter()
    conn.close()
    if not arrivals:
        raise RuntimeError("no tokens received")
    itls = []
    prev = arrivals[0]
    for t in arrivals[1:]:
        if t != prev:  # several tokens in one chunk: count the gap once
            itls.append(t - prev)
        prev = t
    return {
        "ttft": arrivals[0] - t0,
        "itls": itls,
        "e2e": t_end - t0,
        "n_out": len(arrivals),
        "n_prompt": n_prompt,
        "server_timings": timings,
        "final": final,
    }


def run(args):
    # Distinct seeds per (run, request) so no two prompts share a prefix; warm-up uses another.
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed, args.token_lo, args.token_hi)
    for i in range(args.warmup):
        wp = make_prompts(1, args.input_len, args.seed + 7919 + i, args.token_lo, args.token_hi)[0]
        one_request(args.host, args.port, wp, min(args.output_len, 16), args.timeout)

    results = [None] * len(prompts)
    errors = []
    next_idx = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_idx[0]
                if i >= len(prompts):
                    return
                next_idx[0] += 1
            try:
                results[i] = one_request(args.host, args.port, prompts[i], args.output_len, args.timeout)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(args.concurrency, len(prompts)))]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - t_start
    if errors:
        for e in errors[:5]:
            print(e, file=sys.stderr)
        raise SystemExit(f"{len(errors)} request(s) failed")

    ttfts = [r["ttft"] * 1e3 for r in results]
    tpots = [(r["e2e"] - r["ttft"]) * 1e3 / (r["n_out"] - 1) for r in results if r["n_out"] > 1]
    itls = [x * 1e3 for r in results for x in r["itls"]]
    total_out = sum(r["n_out"] for r in results)
    total_in = sum(len(p) for p in prompts)
    mean_tpot = sum(tpots) / len(tpots) if tpots else None
    short = [(r["n_out"], r["final"]) for r in results if r["n_out"] != args.output_len]
    evaluated = sorted({r["n_prompt"] for r in results if r["n_prompt"] is not None})
    out = {
        "engine": args.engine,
        "concurrency": args.concurrency,
        "num_prompts": len(prompts),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "duration_s": duration,
        "request_throughput": len(prompts) / duration,
        "prompt_tokens_per_s": total_in / duration,
        "output_tokens_per_s": total_out / duration,
        "decode_tokens_per_s_per_stream": (1000.0 / mean_tpot) if mean_tpot else None,
        "ttft_ms": stats(ttfts),
        "tpot_ms": stats(tpots),
        "itl_ms": stats(itls),
        "total_output_tokens": total_out,
        "total_prompt_tokens": total_in,
        "server_prompt_tokens_evaluated": evaluated,
    }
    if short:
        print(f"warning: {len(short)} request(s) returned != {args.output_len} tokens: {short[:8]}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up requests first")
    ap.add_argument("--token-lo", type=int, default=100, help="random prompt ids are in [lo, hi) (skips special tokens)")
    ap.add_argument("--token-hi", type=int, default=49152)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--engine", default="llama.cpp")
    ap.add_argument("--json", dest="json_out", default=None, help="write the result here (default: stdout)")
    args = ap.parse_args()
    out = run(args)
    text = json.dumps(out, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(f"[{args.engine} c={args.concurrency}] {out['num_prompts']} req in {out['duration_s']:.2f}s: "
          f"out {out['output_tokens_per_s']:.1f} tok/s, per-stream decode "
          f"{out['decode_tokens_per_s_per_stream']:.1f} tok/s, TTFT mean {out['ttft_ms']['mean']:.0f} ms",
          file=sys.stderr)


if __name__ == "__main__":
    main()
