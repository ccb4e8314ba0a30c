#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on the GPU machine (which cannot reach a package index) into
# .whl/ (git-ignored through .git/info/exclude): the project's dependencies that machine's image lacks, for its
# Python 3.12 on x86-64. Run here, where pip reaches PyPI, then carry .whl with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp -d .whl \
    open-clip-torch==3.3.0 qdrant-client==1.20.0 qdrant-edge-py==0.9.0 pydantic-settings watchdog fastapi uvicorn \
    python-multipart ftfy setuptools wheel
ls .whl | wc -l
