#!/usr/bin/env bash
# Two tenants on one saturated `lumen serve`, one at ten times the other's rate: the light
# tenant's TTFT and each tenant's throughput share with the head's fair queue and without it.
#
#   scripts/bench-tenants.sh
#
# Env: MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf) THREADS (2) MAX_NUM_SEQS (8: the engine's
# sequence slots; the rest wait in its scheduler) MAX_ONGOING (empty: the head forwards every
# request; a number caps the model's requests in flight at the head, where the rest then wait
# in its queue) HEAVY_RATE (8) LIGHT_RATE (0.8) HEAVY_WEIGHT (1) LIGHT_WEIGHT (1) NUM_PROMPTS (330)
# INPUT_LEN (32) OUTPUT_LEN (64) OUT (.cache/bench/tenants) LUMEN_BIN (target/release/lumen)
# POLICIES ("fair fcfs": the loaded runs to make).
# Three runs, each against a fresh server with the keys `heavy` and `light` (their weights):
# (1) idle: the light tenant alone (its share of NUM_PROMPTS, at LIGHT_RATE);
# (2) fair: both tenants, `--queue-policy fair` (the default: the head's queue, and the worker's
#     scheduler through the tenant each request carries, share across tenants);
# (3) fcfs: both tenants, `--queue-policy fcfs` (arrival order everywhere, tenants ignored).
# Each run writes the JSON of `lumen bench serve` (with every request: --save-detailed) to
# OUT/{idle,fair,fcfs}.json and prints its table.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-8}"
MAX_ONGOING="${MAX_ONGOING:-}"
HEAVY_RATE="${HEAVY_RATE:-8}"
LIGHT_RATE="${LIGHT_RATE:-0.8}"
HEAVY_WEIGHT="${HEAVY_WEIGHT:-1}"
LIGHT_WEIGHT="${LIGHT_WEIGHT:-1}"
NUM_PROMPTS="${NUM_PROMPTS:-330}"
INPUT_LEN="${INPUT_LEN:-32}"
OUTPUT_LEN="${OUTPUT_LEN:-64}"
OUT="${OUT:-.cache/bench/tenants}"
LUMEN_BIN="${LUMEN_BIN:-target/release/lumen}"
POLICIES="${POLICIES:-fair fcfs}"
mkdir -p "$OUT"

KEYS="$OUT/keys.yaml"
cat > "$KEYS" <<YAML
api_keys:
  - {tenant: heavy, key: sk-bench-heavy, weight: $HEAVY_WEIGHT}
  - {tenant: light, key: sk-bench-light, weight: $LIGHT_WEIGHT}
YAML

PORT="${PORT:-18000}"
SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

start_server() { # POLICY
  "$LUMEN_BIN" serve --model "$MODEL" --threads "$THREADS" --host 127.0.0.1 --port "$PORT" \
    --dashboard-port 0 --grpc-port 0 --api-keys-file "$KEYS" --max-num-seqs "$MAX_NUM_SEQS" \
    ${MAX_ONGOING:+--max-ongoing-requests "$MAX_ONGOING"} --queue-policy "$1" > "$OUT/serve-$1.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if curl -sf -H 'Authorization: Bearer sk-bench-heavy' "http://127.0.0.1:$PORT/v1/models" | grep -q '"id"'; then
      return 0
    fi
    sleep 0.2
  done
  echo "lumen serve did not come up; see $OUT/serve-$1.log" >&2
  exit 1
}

bench() { # NAME NUM_PROMPTS TENANT...
  local name="$1" n="$2"
  shift 2
  echo "=== $name ==="
  "$LUMEN_BIN" bench serve --base-url "http://127.0.0.1:$PORT" --input-len "$INPUT_LEN" \
    --output-len "$OUTPUT_LEN" --num-prompts "$n" --seed 1 --warmup 1 "$@" --engine-label "$name" \
    --save-detailed --json "$OUT/$name.json"
}

LIGHT_ALONE=$(python3 -c "print(max(1, round($NUM_PROMPTS * $LIGHT_RATE / ($HEAVY_RATE + $LIGHT_RATE))))")
start_server fair
bench idle "$LIGHT_ALONE" --tenant "light:sk-bench-light:$LIGHT_RATE"
stop_server
for policy in $POLICIES; do
  start_server "$policy"
  bench "$policy" "$NUM_PROMPTS" --tenant "heavy:sk-bench-heavy:$HEAVY_RATE" --tenant "light:sk-bench-light:$LIGHT_RATE"
  stop_server
done
