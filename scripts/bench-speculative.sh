#!/usr/bin/env bash
# Speculative decoding (ngram, prompt lookup, by default; or a draft model: SPEC='{"model":
# "draft.gguf", "num_speculative_tokens": 4}') against plain decoding on the same engine, in one
# run: `lumen bench offline` on the `edit` dataset (the answer repeats the prompt) and the `chat`
# dataset (it does not), at rising concurrency; prints a table of output tok/s and the
# acceptance.
#
#   scripts/bench-speculative.sh
#
# Env: MODEL (the default SmolLM2 GGUF) THREADS (2) CONCURRENCY ("1 2 4 8") DATASETS ("edit chat")
# OUTPUT_LEN (256) SPEC (the speculative_config JSON) EXTRA (more `lumen bench offline` flags, e.g.
# "--device cuda --load-format dummy") LUMEN_BIN (target/release/lumen) OUT (.cache/bench/spec)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
CONCURRENCY="${CONCURRENCY:-1 2 4 8}"
DATASETS="${DATASETS:-edit chat}"
OUTPUT_LEN="${OUTPUT_LEN:-256}"
SPEC="${SPEC:-{\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4\}}"
LUMEN_BIN="${LUMEN_BIN:-target/release/lumen}"
OUT="${OUT:-.cache/bench/spec}"
EXTRA="${EXTRA:-}"
mkdir -p "$OUT"
rows=()
for ds in $DATASETS; do
  for c in $CONCURRENCY; do
    for mode in plain spec; do
      flags=()
      [ "$mode" = spec ] && flags=(--speculative-config "$SPEC")
      # shellcheck disable=SC2086
      "$LUMEN_BIN" bench offline --model "$MODEL" --threads "$THREADS" --dataset-name "$ds" --output-len "$OUTPUT_LEN" \
        --num-prompts $((c < 2 ? 4 : 2 * c)) --concurrency "$c" "${flags[@]}" $EXTRA --json "$OUT/$ds-c$c-$mode.json" \
        > "$OUT/$ds-c$c-$mode.txt" 2> "$OUT/$ds-c$c-$mode.log"
    done
    rows+=("$(python3 - "$OUT/$ds-c$c-plain.json" "$OUT/$ds-c$c-spec.json" "$ds" "$c" <<'PY'
import json, sys
plain, spec = (json.load(open(p)) for p in sys.argv[1:3])
drafts, proposed, accepted = spec.get("spec_decode") or (0, 0, 0)
rate = f"{100 * accepted / proposed:.0f}%" if proposed else "-"
per = f"{accepted / drafts:.2f}" if drafts else "-"
ratio = spec["output_tokens_per_s"] / plain["output_tokens_per_s"]
print(f"| {sys.argv[3]} | {sys.argv[4]} | {plain['output_tokens_per_s']:.1f} | {spec['output_tokens_per_s']:.1f} | {ratio:.2f}x | {rate} | {per} |")
PY
)")
  done
done
echo "speculative_config: $SPEC"
echo "| dataset | streams | plain tok/s | speculative tok/s | speculative / plain | accepted | tokens per draft |"
echo "|---|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
