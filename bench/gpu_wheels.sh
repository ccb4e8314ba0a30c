#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a GPU machine that may have no package index: exactly what a
# PyTorch GPU image lacks of the project's runtime dependencies, for its Python 3.12 on x86-64, each without its
# dependencies (--no-deps; the list below is the closure, pinned to the versions the project is tested with). Never
# torch, torchvision, numpy, pillow, pyarrow or anything they bring (the image has them: gigabytes). Run here, where
# pip reaches PyPI, then carry .whl/ with the device run; gpu_check.sh installs only those the machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_CHECK_WHEELS:-.whl}
PY=${GPU_WHEELS_PYTHON:-python3}
grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
PACKAGES=(
    # the model: open_clip and what it imports (timm only for timm towers; kept so open_clip installs whole)
    open-clip-torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19 safetensors==0.8.0
    huggingface-hub==2.4.0 hf-xet==1.8.0 httpx==0.29.0 httpcore==1.0.9 httpx2==2.16.2 httpcore2==2.16.2
    h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 h11==0.16.0 anyio==4.16.0 idna==3.20 certifi==2026.10.19.post1
    truststore==0.10.5 click==8.5.1 packaging==26.4 pyyaml==6.0.4 tqdm==4.70.1
    # the stores
    qdrant-edge-py==0.9.0 qdrant-client==1.20.0 grpcio==1.85.3 protobuf==7.36.2 portalocker==4.4.2 urllib3==2.8.0
    # settings and the watch daemon
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5
    annotated-types==0.8.0 watchdog==7.1.1
)
mkdir -p "$WHEELS"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_34_x86_64 --platform any -d "$WHEELS" "${PACKAGES[@]}"
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
