#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only), then the linters.
# The browser tests drive Debian's chromium through playwright (no browser download); it is installed here when
# missing and apt-get is usable (as root in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian chromium for the browser tests"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; })
fi
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check indexer tests bench
.venv/bin/mypy
