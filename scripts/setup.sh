#!/usr/bin/env bash
# Create .venv and install the project with its dev/test dependencies. Idempotent: a second run with an
# unchanged pyproject.toml does nothing. torch/torchvision are pinned (2.14.1 / 0.29.1) in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.indexer-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,test,heif,ray]'
  touch "$stamp"
fi
