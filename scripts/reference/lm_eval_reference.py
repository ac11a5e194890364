#!/usr/bin/env python3
"""lm-evaluation-harness against `lumen serve`, checked against an independent float64 model.

usage: lm_eval_reference.py WORKDIR BASE_URL

BASE_URL serves SmolLM2 (models/SmolLM2-135M-Instruct.Q4_1.gguf) as `smol`, best with f32 weights
(`--cpu-weight-format f32`, the path float_reference.py checks). Offline: no hub access.
1. Turns the GGUF's vocabulary into a Hugging Face tokenizer (`save_tokenizer`) and writes
   a small multiple-choice task (a JSONL dataset of 12 questions, 4 choices each, and its YAML).
2. Runs lm-eval's `local-completions` model against BASE_URL (`/v1/completions`: the prompt as
   token ids, `echo`, `logprobs`, `max_tokens: 1`, i.e. prompt log-probabilities) with
   `--log_samples`, so every (question, choice) log-likelihood it computed is written down.
3. Recomputes every one of those log-likelihoods with the float64 numpy Llama of
   float_reference.py on the same token ids (lm-eval's own `_encode_pair` splits context and
   continuation), and compares: per request within 0.01 nats per continuation token (Lumen's f32
   path keeps an f16 KV cache; see worker/tests/engine_float_reference.rs), and the task's
   accuracy exactly.

Prints a table and writes WORKDIR/lm_eval_check.json. Exit status 1 on a mismatch.
tests/e2e_lm_eval.rs runs it against a `lumen serve` it starts; scripts/lmeval-env.sh makes its
Python environment.
"""
import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from float_reference import MODEL, load_model, log_softmax  # noqa: E402

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("The capital of Japan is", ["Seoul", "Tokyo", "Beijing", "Bangkok"], 1),
    ("Water freezes at a temperature of zero degrees", ["Fahrenheit", "Kelvin", "Celsius", "Rankine"], 2),
    ("The largest planet in our solar system is", ["Mars", "Venus", "Mercury", "Jupiter"], 3),
    ("A week has seven", ["days", "hours", "months", "years"], 0),
    ("The opposite of hot is", ["warm", "cold", "loud", "bright"], 1),
    ("Two plus two equals", ["three", "five", "four", "six"], 2),
    ("The color of the clear daytime sky is", ["green", "red", "yellow", "blue"], 3),
    ("The sun rises in the", ["west", "east", "north", "south"], 1),
    ("A baby cat is called a", ["puppy", "calf", "kitten", "foal"], 2),
    ("The chemical symbol for water is", ["CO2", "NaCl", "O2", "H2O"], 3),
    ("A triangle has three", ["wheels", "legs", "eyes", "sides"], 3),
]

TASK_YAML = """task: lumen_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(workdir):
    task = os.path.join(workdir, "task")
    os.makedirs(task, exist_ok=True)
    data = os.path.join(task, "questions.jsonl")
    with open(data, "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(os.path.join(task, "lumen_check.yaml"), "w") as f:
        f.write(TASK_YAML.format(data=data))
    return task


def save_tokenizer(path):
    """SmolLM2's byte-level BPE from the GGUF's vocabulary and merges, saved as a Hugging Face
    tokenizer for lm-eval (transformers' own GGUF reader needs torch). Only its token ids travel:
    Lumen and the reference score the same ids whatever the split."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = GGUFReader(MODEL)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eos = r.fields["tokenizer.ggml.eos_token_id"]
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tokens[int(eos.parts[eos.data[0]][0])]).save_pretrained(path)


def main():
    workdir, base_url = sys.argv[1:3]
    tokenizer = os.path.join(workdir, "smollm2-tokenizer")
    save_tokenizer(tokenizer)
    task = write_task(workdir)
    out = os.path.join(workdir, "lm_eval_out")
    model_args = (f"model=smol,base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tokenizer},num_concurrent=4,max_retries=1,tokenized_requests=True")
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                    "--tasks", "lumen_check", "--include_path", task, "--output_path", out, "--log_samples",
                    "--batch_size", "1"], check=True)
    samples = sorted(glob.glob(os.path.join(out, "**", "samples_lumen_check_*.jsonl"), recursive=True))[-1]
    results = sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True))[-1]
    acc = json.load(open(results))["results"]["lumen_check"]["acc,none"]

    # lm-eval's own split of each (context, continuation) into token ids.
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    lm = LocalCompletionsAPI(model="smol", base_url=base_url + "/v1/completions", tokenizer_backend="huggingface",
                             tokenizer=tokenizer)
    logits = load_model()
    rows, worst, correct = [], 0.0, 0
    for line in open(samples):
        s = json.loads(line)
        ref_scores = []
        # The samples file writes each request's arguments as {"gen_args_i": {"arg_0": context,
        # "arg_1": continuation}} and each answer as the text of a (loglikelihood, is_greedy) tuple.
        requests = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        answers = [ast.literal_eval(r[0])[0] if isinstance(r[0], str) else r[0][0] for r in s["resps"]]
        for (context, continuation), theirs in zip(requests, answers):
            ctx, cont = lm._encode_pair(context, continuation)
            tokens = list(ctx) + list(cont)
            lg = logits(tokens, all_rows=True)
            lp = log_softmax(lg)
            ref = float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
            theirs = float(theirs)
            diff = abs(ref - theirs)
            worst = max(worst, diff / len(cont))
            ok = diff <= 0.01 * len(cont) + 1e-3
            rows.append({"doc": s["doc_id"], "continuation": continuation, "tokens": len(cont), "lm_eval": theirs,
                         "float64": ref, "diff": diff, "ok": ok})
            ref_scores.append(ref)
        correct += int(np.argmax(ref_scores) == int(s["target"]))
    ref_acc = correct / len(QUESTIONS)
    report = {"lm_eval_acc": acc, "float64_acc": ref_acc, "requests": len(rows),
              "worst_diff_per_token": worst, "rows": rows}
    json.dump(report, open(os.path.join(workdir, "lm_eval_check.json"), "w"), indent=1)
    print(f"{'doc':>3} {'continuation':<12} {'tok':>3} {'lm-eval':>10} {'float64':>10} {'diff':>8}")
    for r in rows:
        print(f"{r['doc']:>3} {r['continuation'][:12]:<12} {r['tokens']:>3} {r['lm_eval']:>10.4f} "
              f"{r['float64']:>10.4f} {r['diff']:>8.5f}{'' if r['ok'] else '  MISMATCH'}")
    print(f"\nrequests {len(rows)}, worst |diff| per continuation token {worst:.5f} nats")
    print(f"accuracy: lm-eval {acc:.4f}, float64 reference {ref_acc:.4f}")
    if not all(r["ok"] for r in rows) or abs(acc - ref_acc) > 1e-9:
        print("MISMATCH", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
