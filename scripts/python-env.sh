#!/usr/bin/env bash
# Creates .cache/pyenv (ignored by git): a Python virtual environment with the official `openai`
# client (and the pydantic it brings), which the end-to-end tests drive Lumen with, jsonschema,
# which validates structured outputs, and numpy, which the float64 references in
# scripts/reference/ that tests run need. Idempotent. Needs python3 with venv + pip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/pyenv"
openai_version="1.99.9"
numpy_version="2.2.6"
jsonschema_version="4.26.0"

if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import openai, numpy, jsonschema, importlib.metadata as m, sys; sys.exit(openai.__version__ != '$openai_version' or numpy.__version__ != '$numpy_version' or m.version('jsonschema') != '$jsonschema_version')" 2>/dev/null; then
  exit 0
fi
echo "creating $env with openai==$openai_version numpy==$numpy_version jsonschema==$jsonschema_version ..."
python3 -m venv "$env"
"$env/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version" "numpy==$numpy_version" \
  "jsonschema==$jsonschema_version"
