#!/usr/bin/env bash
# The whole test suite, as CI runs it on a clean clone: fetch what the tests need, then run every
# test of the workspace in release mode (one optimised build serves the model tests and the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
./scripts/python-env.sh
./scripts/lmeval-env.sh
./scripts/browser-env.sh
./scripts/k8s-tools.sh
cargo test --release --workspace --all-targets "$@"
