#!/usr/bin/env bash
# Lumen vs llama.cpp on this machine, same GGUF, same thread count, same load generator, one run.
#
#   scripts/bench-vs-llamacpp.sh [--input-len N] [--output-len N] [--num-prompts-c1 N]
#       [--num-prompts-high N] [--concurrency-high N] [--threads N] [--model PATH]
#       [--out FILE] [--skip-llamacpp] [--skip-lumen] [--skip-lumen-http] [--skip-lumen-offline]
#
# Env equivalents: INPUT_LEN (128) OUTPUT_LEN (128) NUM_PROMPTS_C1 (4) NUM_PROMPTS_HIGH (32)
# CONCURRENCY_HIGH (16) THREADS (2) MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf)
# OUT (.cache/bench/vs-llamacpp.json) LUMEN_BIN (target/release/lumen) SKIP_LLAMACPP SKIP_LUMEN
# SKIP_LUMEN_HTTP SKIP_LUMEN_OFFLINE PROMPT_TOKEN_RANGE (100..32000)
# LLAMACPP_EXTRA_ARGS (extra llama-server flags, e.g. "-fa off"); LUMEN_SERVE_EXTRA_ARGS (extra
# `lumen serve` flags). BENCH_NICE (e.g. -10, needs root): run the servers and the load generator
# under `nice -n BENCH_NICE` so that background work (cargo builds) disturbs the figures less.
#
# One load generator for both servers: `lumen bench serve` streams /v1/completions requests
# (prompts of exactly INPUT_LEN random token ids, different per request; max_tokens OUTPUT_LEN,
# ignore_eos, temperature 0) at c=1 then c=CONCURRENCY_HIGH, the same prompts (seeds 1 and 2) for
# every engine, one untimed warm-up request first.
# (a) llama.cpp HTTP: .cache/llamacpp/bin/llama-server (scripts/llamacpp/setup.sh) on 127.0.0.1,
#     -t/-tb THREADS, -np CONCURRENCY_HIGH slots, -c slots*(in+out), no prompt cache.
# (b) Lumen HTTP: LUMEN_BIN serve --model MODEL --threads THREADS on 127.0.0.1 (skipped with a
#     message when the binary has no `serve`).
# (c) Lumen offline: LUMEN_BIN bench offline (the engine in-process, no HTTP).
# Every run writes the JSON of `lumen bench serve`/`offline`; all go into OUT, and a side-by-side
# table per concurrency is printed.
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
PROMPT_TOKEN_RANGE="${PROMPT_TOKEN_RANGE:-100..32000}"
SKIP_LLAMACPP="${SKIP_LLAMACPP:-0}"
SKIP_LUMEN="${SKIP_LUMEN:-0}"
SKIP_LUMEN_HTTP="${SKIP_LUMEN_HTTP:-0}"
SKIP_LUMEN_OFFLINE="${SKIP_LUMEN_OFFLINE:-0}"

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
    --skip-lumen-http) SKIP_LUMEN_HTTP=1; shift ;;
    --skip-lumen-offline) SKIP_LUMEN_OFFLINE=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ "$SKIP_LUMEN" = "1" ]; then SKIP_LUMEN_HTTP=1; SKIP_LUMEN_OFFLINE=1; fi

PY="${PYTHON:-python3}"   # the table and the HTTP probes are stdlib-only
NICE=()
[ -n "${BENCH_NICE:-}" ] && NICE=(nice -n "$BENCH_NICE")
TMP="$(mktemp -d "${TMPDIR:-/tmp}/lumen-bench.XXXXXX")"
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() { stop_server; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# http_ready PORT PATH: GET http://127.0.0.1:PORT/PATH answers 200 (and, for /v1/models, lists a model).
http_ready() {
  "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
c.request("GET", sys.argv[2]); r = c.getresponse(); body = r.read()
ok = r.status == 200 and (sys.argv[2] != "/v1/models" or bool(json.loads(body).get("data")))
sys.exit(0 if ok else 1)
EOF
}

# wait_ready NAME PORT LOG PATH...: waits (up to 5 minutes) until every PATH is ready, or fails
# with the server log's tail when the server exits or never gets there.
wait_ready() {
  local name="$1" port="$2" log="$3"; shift 3
  local path
  for path in "$@"; do
    local ok=0
    for _ in $(seq 1 1500); do
      if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
      if http_ready "$port" "$path"; then ok=1; break; fi
      sleep 0.2
    done
    if [ "$ok" != 1 ]; then
      echo "!! $name did not answer GET $path; log tail:" >&2; tail -30 "$log" >&2; exit 1
    fi
  done
}

HAVE_BENCH_SERVE=0
if [ -x "$LUMEN_BIN" ] && "$LUMEN_BIN" bench serve --help 2>&1 | grep -q -- "--base-url"; then
  HAVE_BENCH_SERVE=1
fi

# bench_http TAG LABEL PORT: `lumen bench serve` at c=1 and c=HIGH against 127.0.0.1:PORT.
bench_http() {
  local tag="$1" label="$2" port="$3"
  local spec C N SEED SUFFIX
  for spec in "1 $NUM_PROMPTS_C1 1 c1" "$CONCURRENCY_HIGH $NUM_PROMPTS_HIGH 2 high"; do
    read -r C N SEED SUFFIX <<<"$spec"
    echo "== $label: lumen bench serve c=$C n=$N" >&2
    if "${NICE[@]}" "$LUMEN_BIN" bench serve --base-url "http://127.0.0.1:$port" \
        --endpoint /v1/completions --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --num-prompts "$N" --concurrency "$C" --seed "$SEED" --prompt-token-range "$PROMPT_TOKEN_RANGE" \
        --engine-label "$label" --json "$TMP/$tag-$SUFFIX.json" "${@:4}" >&2; then
      RUN_ARGS+=(--run "$label" "$TMP/$tag-$SUFFIX.json")
    else
      echo "!! lumen bench serve against $label failed (c=$C)" >&2
    fi
  done
}

[ -f "$MODEL" ] || { echo "model not found: $MODEL (run scripts/fetch-model.sh)" >&2; exit 1; }
echo "== bench: model=$MODEL input=$INPUT_LEN output=$OUTPUT_LEN threads=$THREADS" \
     "c=1 x$NUM_PROMPTS_C1, c=$CONCURRENCY_HIGH x$NUM_PROMPTS_HIGH" >&2

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
if awk -v l="${LOAD_START%% *}" 'BEGIN{exit !(l > 0.5)}'; then
  echo "!! load average is $LOAD_START before starting: other work is using the CPUs, figures will be noisy" >&2
fi
RUN_ARGS=()
LLAMACPP_VERSION=""
if [ "$HAVE_BENCH_SERVE" != 1 ] && { [ "$SKIP_LLAMACPP" != 1 ] || [ "$SKIP_LUMEN_HTTP" != 1 ]; }; then
  echo "!! $LUMEN_BIN has no 'bench serve' (cargo build --release); skipping the HTTP runs" >&2
fi

# ---------------------------------------------------------------- (a) llama.cpp over HTTP
if [ "$SKIP_LLAMACPP" != "1" ] && [ "$HAVE_BENCH_SERVE" = 1 ]; then
  if [ ! -x "$LLAMA_SERVER" ]; then
    echo "!! $LLAMA_SERVER missing: run scripts/llamacpp/setup.sh; skipping llama.cpp" >&2
  else
    LLAMACPP_VERSION="$(cat .cache/llamacpp/VERSION 2>/dev/null || true)"
    PORT="$(free_port)"
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
    wait_ready llama-server "$PORT" "$SERVER_LOG" /health
    grep -m1 -E "build: |system_info" "$SERVER_LOG" >&2 || true
    bench_http llamacpp "llama.cpp HTTP" "$PORT" --extra-body '{"cache_prompt": false}'
    stop_server
  fi
fi

# ---------------------------------------------------------------- (b) Lumen over HTTP
if [ "$SKIP_LUMEN_HTTP" != "1" ] && [ "$HAVE_BENCH_SERVE" = 1 ]; then
  SERVE_HELP="$("$LUMEN_BIN" serve --help 2>&1 || true)"
  if ! grep -q -- "--port" <<<"$SERVE_HELP"; then
    echo "!! $LUMEN_BIN has no 'serve' subcommand yet (its --help lacks --port); skipping Lumen HTTP" >&2
  else
    PORT="$(free_port)"
    SERVER_LOG="$TMP/lumen-serve.log"
    SERVER_ARGS=(serve --model "$MODEL" --port "$PORT" --threads "$THREADS")
    # Keep every listener on loopback and off the default ports another server may hold.
    grep -q -- "--host" <<<"$SERVE_HELP" && SERVER_ARGS+=(--host 127.0.0.1)
    grep -q -- "--dashboard-port" <<<"$SERVE_HELP" && SERVER_ARGS+=(--dashboard-port "$(free_port)")
    grep -q -- "--grpc-port" <<<"$SERVE_HELP" && SERVER_ARGS+=(--grpc-port "$(free_port)")
    # shellcheck disable=SC2206
    [ -n "${LUMEN_SERVE_EXTRA_ARGS:-}" ] && SERVER_ARGS+=($LUMEN_SERVE_EXTRA_ARGS)
    echo "== lumen: $LUMEN_BIN ${SERVER_ARGS[*]}" >&2
    "${NICE[@]}" "$LUMEN_BIN" "${SERVER_ARGS[@]}" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    # /health answers before the replica has loaded the model; /v1/models lists it once it has.
    wait_ready "lumen serve" "$PORT" "$SERVER_LOG" /health /v1/models
    bench_http lumen-http "Lumen HTTP" "$PORT"
    stop_server
  fi
fi

# ---------------------------------------------------------------- (c) Lumen offline
if [ "$SKIP_LUMEN_OFFLINE" != "1" ]; then
  if [ ! -x "$LUMEN_BIN" ]; then
    echo "!! $LUMEN_BIN not built (cargo build --release); skipping Lumen offline" >&2
  elif ! "$LUMEN_BIN" bench offline --help 2>&1 | grep -q -- "--input-len"; then
    echo "!! $LUMEN_BIN has no 'bench offline' subcommand yet (its --help lacks --input-len); skipping Lumen offline" >&2
  else
    for spec in "1 $NUM_PROMPTS_C1 c1" "$CONCURRENCY_HIGH $NUM_PROMPTS_HIGH high"; do
      read -r C N TAG <<<"$spec"
      echo "== lumen: bench offline c=$C n=$N" >&2
      if "${NICE[@]}" "$LUMEN_BIN" bench offline --model "$MODEL" --input-len "$INPUT_LEN" \
          --output-len "$OUTPUT_LEN" --num-prompts "$N" --concurrency "$C" \
          --threads "$THREADS" --json "$TMP/lumen-offline-$TAG.json" >&2 && [ -s "$TMP/lumen-offline-$TAG.json" ]; then
        RUN_ARGS+=(--run "Lumen offline" "$TMP/lumen-offline-$TAG.json")
      else
        echo "!! lumen bench offline failed or wrote no JSON (c=$C)" >&2
      fi
    done
  fi
fi

SETTINGS="$("$PY" -c 'import json,sys; print(json.dumps({k: int(v) if v.lstrip("-").isdigit() else v for k, v in zip(["model","input_len","output_len","threads","num_prompts_c1","num_prompts_high","concurrency_high","prompt_token_range","llamacpp_version","llamacpp_extra_args","lumen_serve_extra_args","bench_nice","host","loadavg_start","loadavg_end"], sys.argv[1:])}))' \
  "$MODEL" "$INPUT_LEN" "$OUTPUT_LEN" "$THREADS" "$NUM_PROMPTS_C1" "$NUM_PROMPTS_HIGH" "$CONCURRENCY_HIGH" "$PROMPT_TOKEN_RANGE" "$LLAMACPP_VERSION" "${LLAMACPP_EXTRA_ARGS:-}" "${LUMEN_SERVE_EXTRA_ARGS:-}" "${BENCH_NICE:-0}" "$(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)")"
echo
"$PY" scripts/reference/bench_table.py --out "$OUT" --settings "$SETTINGS" "${RUN_ARGS[@]}"
