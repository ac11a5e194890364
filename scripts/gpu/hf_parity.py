#!/usr/bin/env python3
"""hf-parity: a checkpoint saved by transformers, served by Lumen, must give transformers' answers.

  make   builds a Llama-3.1-8B-shaped LlamaForCausalLM with random weights in BF16 directly on the
         GPU, saves it with save_pretrained (safetensors; transformers 5 writes `rope_parameters`),
         copies the Llama-3.1 tokenizer files in, and records transformers' greedy tokens with the
         top-5 log-probabilities and the top-1/top-2 margin of every step (KV-cached greedy loop on
         raw logits: no logits processor, EOS not special), for prompts of random token ids.
         It also records the greedy tokens under plain base-10,000 rotary frequencies (what a reader
         that misses `rope_parameters` computes), to show the comparison can tell the two apart.
  check  starts `lumen serve --model DIR --device cuda` (time from process start to ready: the
         load from disk; drop the page cache before), asks /v1/completions for the same greedy
         tokens (token-id prompts, temperature 0, ignore_eos, logprobs 5, token ids as
         `token_id:N`) and compares step by step; writes the summary rows (name TAB value).

Weights: transformers' own init (normal, std = initializer_range 0.02; norms 1) for every layer,
lm_head included (`--lm-head-std` draws it wider). The reference is the saved BF16 weights
computed in f32 by transformers (`model.float()`): the checkpoint's function without BF16
activations. transformers' own BF16 run is recorded too and reported as the noise floor (how far
BF16 arithmetic alone moves the same numbers). A first run on an H100 with lm_head std 0.08
(logits of std 5.1, so that greedy margins stand out) against transformers' BF16 run found the
greedy tokens equal wherever the margin exceeded 0.5 nats but log-probabilities up to 1.0 nat
apart: a wider lm_head multiplies the hidden state's BF16 noise by the same factor.

Greedy tokens must match wherever transformers' top-1/top-2 margin exceeds 2 x 0.25 nats: both
implementations may move each log-probability by up to the 0.25-nat tolerance (BF16 weights and
activations, different kernels and summation orders), so a smaller margin may flip legitimately.
At such a near-tie the comparison continues from transformers' token (a new request with it
appended to the prompt). At every compared step the shared top-5 ids' log-probabilities must
agree within 0.25 nats, and every id of transformers' top 5 that beats its fifth by more than the
margin must be in Lumen's top 5 (the same reasoning at the set's edge: with near-flat random
logits, transformers' own BF16 run shares only 2-4 of its f32 top 5, so a fixed count would test
the noise, not the implementation).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

MARGIN = 0.5
LOGPROB_TOLERANCE = 0.25


def llama31_8b_config(transformers):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    common = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                  tie_word_embeddings=False, initializer_range=0.02)
    return transformers.LlamaConfig(rope_parameters=rope, **common)


def make(args):
    import torch
    import transformers

    torch.manual_seed(args.seed)
    config = tiny_config(transformers) if args.tiny else llama31_8b_config(transformers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, args.lm_head_std)
    model.eval()
    print(f"built on {device} in {time.time() - started:.1f} s", file=sys.stderr)

    started = time.time()
    if os.path.isdir(args.dir):
        shutil.rmtree(args.dir)
    model.save_pretrained(args.dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, name), args.dir)
    written = json.load(open(os.path.join(args.dir, "config.json")))
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors"))
    print(f"saved {size / 1e9:.2f} GB in {time.time() - started:.1f} s; config keys: {sorted(written)}", file=sys.stderr)

    generator = torch.Generator().manual_seed(args.seed + 1)
    cases = []
    for length in args.prompt_lens:
        prompt = torch.randint(0, config.vocab_size, (length,), generator=generator).tolist()
        cases.append({"prompt": prompt, "bf16_steps": greedy(model, torch, prompt, args.steps, device)})
    # The reference: the same (BF16-rounded) weights computed in f32, the checkpoint's exact
    # function up to f32 rounding; transformers' own BF16 run above is the noise floor.
    model = model.float()
    for case in cases:
        case["steps"] = greedy(model, torch, case["prompt"], args.steps, device)
    # Sensitivity: the same model with plain base-10,000 rotary frequencies (what a reader that
    # misses `rope_parameters` runs) must pick other tokens, or the comparison could not tell.
    rotary = model.model.rotary_emb
    kept = rotary.inv_freq.clone()
    dim = config.head_dim
    rotary.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    for case in cases:
        plain = greedy(model, torch, case["prompt"], args.steps, device)
        case["plain_rope_tokens"] = [s["token"] for s in plain]
    rotary.inv_freq = kept
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
               "rope_parameters_written": "rope_parameters" in written, "config": written,
               "checkpoint_bytes": size, "cases": cases}, open(args.out, "w"))
    print(f"recorded {len(cases)} prompts x {args.steps} steps to {args.out}", file=sys.stderr)


def greedy(model, torch, prompt, steps, device):
    """transformers' greedy continuation: per step the token, its top-5 (id, logprob) and margin.
    The decoder runs in BF16; the last projection in f32 from its final hidden state."""
    out = []
    head = model.lm_head.weight.float()
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        result = model.model(input_ids=ids, use_cache=True)
        for _ in range(steps):
            logits = head @ result.last_hidden_state[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logprobs, 5)
            pairs = [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())]
            out.append({"token": pairs[0][0], "top5": pairs, "margin": pairs[0][1] - pairs[1][1]})
            result = model.model(input_ids=torch.tensor([[pairs[0][0]]], device=device),
                                 past_key_values=result.past_key_values, use_cache=True)
    return out


def tiny_config(transformers):
    """For trying `make` on a CPU: the same keys at toy size."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                                    tie_word_embeddings=False, rope_parameters=rope)


def post(port, body, timeout=600):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=timeout))


def lumen_steps(port, prompt, max_tokens):
    """Lumen's greedy continuation in the shape `greedy` records (top-5 without the margin)."""
    body = {"model": "hf-parity", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    lp = post(port, body)["choices"][0]["logprobs"]
    steps = []
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        pairs = sorted(((int(k.split(":", 1)[1]), v) for k, v in top.items()), key=lambda p: -p[1])[:5]
        steps.append({"token": int(token.split(":", 1)[1]), "top5": [list(p) for p in pairs]})
    return steps


def compare(port, case):
    """Compares one prompt; returns (strict steps matched, near-ties, failures, worst logprob diff,
    fewest shared top-5)."""
    prompt, ref = case["prompt"], case["steps"]
    matched, ties, failures, worst, fewest = 0, 0, [], 0.0, 5
    pos = 0
    while pos < len(ref):
        ours = lumen_steps(port, prompt + [s["token"] for s in ref[:pos]], len(ref) - pos)
        restart = None
        for j, (mine, theirs) in enumerate(zip(ours, ref[pos:]), start=pos):
            mine_top = dict(map(tuple, mine["top5"]))
            shared = [(t, lp) for t, lp in theirs["top5"] if t in mine_top]
            fewest = min(fewest, len(shared))
            fifth = min(lp for _, lp in theirs["top5"])
            missing = [t for t, lp in theirs["top5"] if lp - fifth > MARGIN and t not in mine_top]
            if missing:
                failures.append(f"step {j}: clear top-5 ids {missing} missing from Lumen's top 5")
            for t, lp in shared:
                diff = abs(mine_top[t] - lp)
                worst = max(worst, diff)
                if diff > LOGPROB_TOLERANCE:
                    failures.append(f"step {j}: token {t} logprob {mine_top[t]:.3f} vs {lp:.3f}")
            if mine["token"] == theirs["token"]:
                matched += theirs["margin"] > MARGIN
                continue
            if theirs["margin"] > MARGIN:
                failures.append(f"step {j}: greedy {mine['token']} vs {theirs['token']} (margin {theirs['margin']:.2f})")
            else:
                ties += 1
            restart = j + 1
            break
        pos = restart if restart is not None else len(ref)
    return matched, ties, failures, worst, fewest


def noise(case):
    """transformers' BF16 run against its f32 run, up to their first different greedy token: how
    far BF16 arithmetic alone moves the log-probabilities (the floor for any BF16 engine)."""
    if "bf16_steps" not in case:
        return "no BF16 run recorded"
    worst, fewest, steps = 0.0, 5, 0
    for bf, ref in zip(case["bf16_steps"], case["steps"]):
        mine = dict(map(tuple, bf["top5"]))
        shared = [(t, lp) for t, lp in ref["top5"] if t in mine]
        fewest = min(fewest, len(shared))
        worst = max([worst] + [abs(mine[t] - lp) for t, lp in shared])
        steps += 1
        if bf["token"] != ref["token"]:
            break
    return f"transformers BF16 vs f32 over {steps} steps: top-5 shared >= {fewest}, max |dlogprob| {worst:.3f}"


def check(args):
    reference = json.load(open(args.reference))
    rows = []
    started = time.time()
    log = open(args.log, "w")
    cmd = [args.lumen, "serve", "--model", args.dir, "--served-model-name", "hf-parity", "--device", args.device,
           "--max-model-len", str(args.max_model_len), "--port", str(args.port), "--dashboard-port", "0",
           "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    ready = None
    for line in proc.stdout:
        if '"event":"ready"' in line.replace(" ", ""):
            ready = time.time() - started
            break
    gb = reference["checkpoint_bytes"] / 1e9
    if ready is None:
        rows.append(("hf-parity: lumen serve", f"failed to start (exit {proc.wait()}; see hf-parity-serve.log)"))
        write_rows(args.rows, rows)
        return 1
    rows.append(("hf-parity load, disk -> ready (s)", f"{ready:.1f} s for {gb:.1f} GB ({gb / ready:.2f} GB/s)"))
    rows.append(("hf-parity checkpoint", f"transformers {reference['transformers']}, rope_parameters written: "
                                         f"{reference['rope_parameters_written']}"))
    failed = False
    for case in reference["cases"]:
        rows.append((f"hf-parity {len(case['prompt'])}-token prompt: noise", noise(case)))
    try:
        for case in reference["cases"]:
            matched, ties, failures, worst, fewest = compare(args.port, case)
            n = len(case["steps"])
            strict = sum(s["margin"] > MARGIN for s in case["steps"])
            verdict = "ok" if not failures else "FAIL: " + "; ".join(failures[:3])
            failed |= bool(failures)
            plain = sum(a != s["token"] for a, s in zip(case.get("plain_rope_tokens", []), case["steps"]))
            rows.append((f"hf-parity {len(case['prompt'])}-token prompt, {n} steps",
                         f"{verdict}; greedy equal at {matched}/{strict} steps with margin > {MARGIN}, "
                         f"{ties} near-tie switches; top-5 shared >= {fewest}; max |dlogprob| {worst:.3f}; "
                         f"plain base-10,000 rope would change {plain}/{n} tokens"))
    except Exception as e:  # a failed request is a failed check, with the server's log kept
        rows.append(("hf-parity requests", f"failed: {e}"))
        failed = True
    finally:
        proc.kill()
        proc.wait()
    write_rows(args.rows, rows)
    return 1 if failed else 0


def write_rows(path, rows):
    with open(path, "w") as f:
        for name, value in rows:
            print(f"{name}\t{value}", file=f)
            print(f"{name:44s} {value}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    m.add_argument("--out", required=True, help="JSON file for transformers' greedy steps")
    m.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 300, 2000])
    m.add_argument("--steps", type=int, default=16)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--lm-head-std", type=float, default=0.02)
    m.add_argument("--tiny", action="store_true", help="toy sizes, to try the script on a CPU")
    c = sub.add_parser("check")
    c.add_argument("--lumen", required=True)
    c.add_argument("--dir", required=True)
    c.add_argument("--reference", required=True)
    c.add_argument("--port", type=int, default=8200)
    c.add_argument("--max-model-len", type=int, default=4096)
    c.add_argument("--device", default="cuda", help="cpu, to try the script with a --tiny checkpoint")
    c.add_argument("--log", required=True)
    c.add_argument("--rows", required=True)
    args = p.parse_args()
    sys.exit(make(args) if args.cmd == "make" else check(args))


if __name__ == "__main__":
    main()
