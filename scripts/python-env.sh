#!/usr/bin/env bash
# Creates .cache/pyenv (ignored by git): a Python virtual environment with the official `openai`
# client, which the end-to-end tests drive Lumen with. Idempotent. Needs python3 with venv + pip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/pyenv"
openai_version="1.99.9"

if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
  exit 0
fi
echo "creating $env with openai==$openai_version ..."
python3 -m venv "$env"
"$env/bin/pip" install --quiet --disable-pip-version-check "openai==$openai_version"
