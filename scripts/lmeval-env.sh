#!/usr/bin/env bash
# Creates .cache/lmeval (ignored by git): a Python virtual environment with lm-evaluation-harness
# (`lm-eval[api]`: its local-completions model, no torch), transformers (lm-eval's tokenizer
# wrapper, for SmolLM2's vocabulary) and gguf (the vocabulary and the float64 reference's
# weights come from the GGUF file). tests/e2e_lm_eval.rs runs scripts/reference/lm_eval_reference.py with it.
# Idempotent; ~1 GB. Needs python3 with venv + pip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/lmeval"
lm_eval_version="0.4.13"
transformers_version="5.25.0"
gguf_version="0.19.0"

if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('lm_eval') != '$lm_eval_version' or m.version('transformers') != '$transformers_version' or m.version('gguf') != '$gguf_version')" 2>/dev/null; then
  exit 0
fi
echo "creating $env with lm-eval[api]==$lm_eval_version transformers==$transformers_version gguf==$gguf_version ..."
python3 -m venv "$env"
"$env/bin/python" -m pip install --quiet --disable-pip-version-check "lm-eval[api]==$lm_eval_version" \
  "transformers==$transformers_version" "gguf==$gguf_version"
