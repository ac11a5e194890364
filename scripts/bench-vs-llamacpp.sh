#!/usr/bin/env bash
# Lumen vs llama.cpp on this machine, same GGUF, same thread count, one run.
#
#   scripts/bench-vs-llamacpp.sh [--input-len N] [--output-len N] [--num-prompts-c1 N]
#       [--num-prompts-high N] [--concurrency-high N] [--threads N] [--model PATH]
#       [--out FILE] [--skip-llamacpp] [--skip-lumen]
#
# Env equivalents: INPUT_LEN (128) OUTPUT_LEN (128) NUM_PROMPTS_C1 (4) NUM_PROMPTS_HIGH (32)
# CONCURRENCY_HIGH (16) THREADS (2) MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf)
# OUT (.cache/bench/vs-llamacpp.json) LUMEN_BIN (target/release/lumen) SKIP_LLAMACPP SKIP_LUMEN
# LLAMACPP_EXTRA_ARGS (extra llama-server flags, e.g. "-fa off").
# BENCH_NICE (e.g. -10, needs root): run both engines and the client under `nice -n BENCH_NICE`
# so that background work (cargo builds) on a shared machine disturbs the figures less.
#
# (a) llama.cpp: .cache/llamacpp/bin/llama-server (built by scripts/llamacpp/setup.sh) on
#     127.0.0.1:<free port>, -t/-tb THREADS, -np CONCURRENCY_HIGH slots, -c slots*(in+out),
#     no prompt cache; scripts/reference/llamacpp_client.py streams /completion requests
#     (random token-id prompts, ignore_eos, temperature 0, cache_prompt false) at c=1 then c=HIGH.
# (b) Lumen: target/release/lumen bench offline ... --json (skipped if the binary lacks it).
# Both write the same JSON schema; all runs go into OUT, and a side-by-side table is printed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
NUM_PROMPTS_C1="${NUM_PROMPTS_C1:-4}"
NUM_PROMPTS_HIGH="${NUM_PROMPTS_HIGH:-32}"
CONCURRENCY_HIGH="${CONCURRENCY_HIGH:-16}"
THREADS="${THREADS:-2}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-.cache/bench/vs-llamacpp.json}"
LUMEN_BIN="${LUMEN_BIN:-target/release/lumen}"
LLAMA_SERVER="${LLAMA_SERVER:-.cache/llamacpp/bin/llama-server}"
SKIP_LLAMACPP="${SKIP_LLAMACPP:-0}"
SKIP_LUMEN="${SKIP_LUMEN:-0}"

while [ $# -gt 0 ]; do
  case "$1" in
    --input-len) INPUT_LEN="$2"; shift 2 ;;
    --output-len) OUTPUT_LEN="$2"; shift 2 ;;
    --num-prompts-c1) NUM_PROMPTS_C1="$2"; shift 2 ;;
    --num-prompts-high) NUM_PROMPTS_HIGH="$2"; shift 2 ;;
    --concurrency-high) CONCURRENCY_HIGH="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --skip-llamacpp) SKIP_LLAMACPP=1; shift ;;
    --skip-lumen) SKIP_LUMEN=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"   # the client and table are stdlib-only
NICE=()
[ -n "${BENCH_NICE:-}" ] && NICE=(nice -n "$BENCH_NICE")
TMP="$(mktemp -d "${TMPDIR:-/tmp}/lumen-bench.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

[ -f "$MODEL" ] || { echo "model not found: $MODEL (run scripts/fetch-model.sh)" >&2; exit 1; }
echo "== bench: model=$MODEL input=$INPUT_LEN output=$OUTPUT_LEN threads=$THREADS" \
     "c=1 x$NUM_PROMPTS_C1, c=$CONCURRENCY_HIGH x$NUM_PROMPTS_HIGH" >&2

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
if awk -v l="${LOAD_START%% *}" 'BEGIN{exit !(l > 0.5)}'; then
  echo "!! load average is $LOAD_START before starting: other work is using the CPUs, figures will be noisy" >&2
fi
RUN_FILES=()
LLAMACPP_VERSION=""

# ---------------------------------------------------------------- (a) llama.cpp
if [ "$SKIP_LLAMACPP" != "1" ]; then
  if [ ! -x "$LLAMA_SERVER" ]; then
    echo "!! $LLAMA_SERVER missing: run scripts/llamacpp/setup.sh; skipping llama.cpp" >&2
  else
    LLAMACPP_VERSION="$(cat .cache/llamacpp/VERSION 2>/dev/null || true)"
    PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
    # Each slot gets c/np tokens of KV (non-unified cache): one full request + a small margin.
    # (rounded up to a multiple of 256 per slot, as llama.cpp pads it anyway).
    CTX=$(( CONCURRENCY_HIGH * ((INPUT_LEN + OUTPUT_LEN + 16 + 255) / 256 * 256) ))
    SERVER_LOG="$TMP/llama-server.log"
    SERVER_ARGS=(-m "$MODEL" --host 127.0.0.1 --port "$PORT"
      -t "$THREADS" -tb "$THREADS" -np "$CONCURRENCY_HIGH" -c "$CTX"
      --cache-reuse 0 --cache-ram 0 --no-webui)
    # Extra flags, e.g. LLAMACPP_EXTRA_ARGS="-fa off" (default -fa auto = flash attention on CPU).
    # shellcheck disable=SC2206
    [ -n "${LLAMACPP_EXTRA_ARGS:-}" ] && SERVER_ARGS+=($LLAMACPP_EXTRA_ARGS)
    echo "== llama.cpp: $LLAMA_SERVER ${SERVER_ARGS[*]}" >&2
    "${NICE[@]}" "$LLAMA_SERVER" "${SERVER_ARGS[@]}" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    ok=0
    for _ in $(seq 1 600); do
      if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
      if "$PY" - "$PORT" <<'EOF' 2>/dev/null; then ok=1; break; fi
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
c.request("GET", "/health"); r = c.getresponse(); r.read()
sys.exit(0 if r.status == 200 else 1)
EOF
      sleep 0.2
    done
    if [ "$ok" != 1 ]; then
      echo "!! llama-server did not become healthy; log tail:" >&2; tail -30 "$SERVER_LOG" >&2; exit 1
    fi
    grep -m1 -E "build: |system_info" "$SERVER_LOG" >&2 || true
    "${NICE[@]}" "$PY" scripts/reference/llamacpp_client.py --port "$PORT" --engine llama.cpp \
      --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS_C1" \
      --concurrency 1 --seed 1 --json "$TMP/llamacpp-c1.json"
    RUN_FILES+=("$TMP/llamacpp-c1.json")
    "${NICE[@]}" "$PY" scripts/reference/llamacpp_client.py --port "$PORT" --engine llama.cpp \
      --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS_HIGH" \
      --concurrency "$CONCURRENCY_HIGH" --seed 2 --json "$TMP/llamacpp-high.json"
    RUN_FILES+=("$TMP/llamacpp-high.json")
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
fi

# ---------------------------------------------------------------- (b) Lumen
if [ "$SKIP_LUMEN" != "1" ]; then
  if [ ! -x "$LUMEN_BIN" ]; then
    echo "!! $LUMEN_BIN not built (cargo build --release); skipping Lumen" >&2
  elif ! "$LUMEN_BIN" bench offline --help 2>&1 | grep -q -- "--input-len"; then
    echo "!! $LUMEN_BIN has no 'bench offline' subcommand yet (its --help lacks --input-len); skipping Lumen" >&2
  else
    for spec in "1 $NUM_PROMPTS_C1 c1" "$CONCURRENCY_HIGH $NUM_PROMPTS_HIGH high"; do
      read -r C N TAG <<<"$spec"
      echo "== lumen: bench offline c=$C n=$N" >&2
      if "${NICE[@]}" "$LUMEN_BIN" bench offline --model "$MODEL" --input-len "$INPUT_LEN" \
          --output-len "$OUTPUT_LEN" --num-prompts "$N" --concurrency "$C" \
          --threads "$THREADS" --json "$TMP/lumen-$TAG.json" >&2 && [ -s "$TMP/lumen-$TAG.json" ]; then
        # Make sure the engine/concurrency labels the table relies on are present.
        "$PY" - "$TMP/lumen-$TAG.json" "$C" <<'EOF'
import json, sys
p, c = sys.argv[1], int(sys.argv[2])
d = json.load(open(p))
d.setdefault("engine", "lumen"); d.setdefault("concurrency", c)
json.dump(d, open(p, "w"), indent=2)
EOF
        RUN_FILES+=("$TMP/lumen-$TAG.json")
      else
        echo "!! lumen bench offline failed or wrote no JSON (c=$C)" >&2
      fi
    done
  fi
fi

SETTINGS="$("$PY" -c 'import json,sys; print(json.dumps({k: int(v) if v.lstrip("-").isdigit() else v for k, v in zip(["model","input_len","output_len","threads","num_prompts_c1","num_prompts_high","concurrency_high","llamacpp_version","llamacpp_extra_args","bench_nice","host","loadavg_start","loadavg_end"], sys.argv[1:])}))' \
  "$MODEL" "$INPUT_LEN" "$OUTPUT_LEN" "$THREADS" "$NUM_PROMPTS_C1" "$NUM_PROMPTS_HIGH" "$CONCURRENCY_HIGH" "$LLAMACPP_VERSION" "${LLAMACPP_EXTRA_ARGS:-}" "${BENCH_NICE:-0}" "$(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)")"
echo
"$PY" scripts/reference/bench_table.py --out "$OUT" --settings "$SETTINGS" "${RUN_FILES[@]}"
