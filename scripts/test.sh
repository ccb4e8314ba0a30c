#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only), then the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check indexer tests bench
.venv/bin/mypy
