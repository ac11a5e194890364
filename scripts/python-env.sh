#!/usr/bin/env bash
# Creates .cache/pyenv (ignored by git): a Python virtual environment with the official `openai`
# client, which the end-to-end tests drive Lumen with, and numpy, which the float64 references in
# scripts/reference/ that tests run need. Idempotent. Needs python3 with venv + pip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/pyenv"
openai_version="1.99.9"
numpy_version="2.2.6"

if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import openai, numpy, sys; sys.exit(openai.__version__ != '$openai_version' or numpy.__version__ != '$numpy_version')" 2>/dev/null; then
  exit 0
fi
echo "creating $env with openai==$openai_version numpy==$numpy_version ..."
python3 -m venv "$env"
"$env/bin/pip" install --quiet --disable-pip-version-check "openai==$openai_version" "numpy==$numpy_version"
