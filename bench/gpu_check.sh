#!/usr/bin/env bash
# The GPU device check (issues 11 and 20), in at most 6 minutes on one H200: the model alone; `indexer embed` and
# `indexer index` on VGA and 12 MP JPEGs with decode.gpu auto and off, each with a per-stage breakdown and what auto
# decided, and `index` once more with the store in the other place (store.separate_process: in a process of its own
# on CUDA, "index inproc" beside it); a straightforward DataLoader script on the same files side by side (our rate /
# its rate); whole processes, first run ever and second run. Run from the repository root:
#
#   bench/gpu_check.sh                                  # on the GPU machine
#   GPU_CHECK_DEVICE=cpu bench/gpu_check.sh             # the CPU rehearsal (test model, small counts), anywhere
#
# The project runs from this checkout (PYTHONPATH, nothing built). What the machine's Python lacks of the project's
# dependencies is installed from the --no-deps wheels in $GPU_CHECK_WHEELS (default .whl/, made by
# bench/gpu_wheels.sh where pip reaches PyPI): only the wheels whose distribution is not installed, never torch,
# torchvision, numpy, pillow or pyarrow. Knobs: GPU_CHECK_PYTHON, GPU_CHECK_VGA, GPU_CHECK_MP12, GPU_CHECK_BATCH,
# GPU_CHECK_ITERS, GPU_CHECK_WORKERS.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STARTED=$(date +%s)

DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [[ $DEVICE == cpu ]]; then
    VGA=${GPU_CHECK_VGA:-48} MP12=${GPU_CHECK_MP12:-4} BATCH=${GPU_CHECK_BATCH:-16} ITERS=${GPU_CHECK_ITERS:-2}
else
    VGA=${GPU_CHECK_VGA:-4096} MP12=${GPU_CHECK_MP12:-2048} BATCH=${GPU_CHECK_BATCH:-256} ITERS=${GPU_CHECK_ITERS:-20}
fi
WORKERS=${GPU_CHECK_WORKERS:-$(nproc)}

echo "== setup ($(date -u +%H:%M:%S))"
if [[ -d $WHEELS ]]; then
    MISSING=$("$PY" - "$WHEELS" <<'PY'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
PY
)
    if [[ -n $MISSING ]]; then
        echo "installing $(echo "$MISSING" | wc -l) wheels from $WHEELS (--no-deps)"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps $MISSING
    fi
fi
"$PY" - <<'PY'
import torch, torchvision
import indexer, open_clip, qdrant_edge, pydantic_settings  # noqa: F401  (fails here, not later, if one is missing)
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
command -v lscpu >/dev/null && lscpu | grep -E '^(Model name|CPU\(s\))' | tr -s ' '

echo "== figures ($(date -u +%H:%M:%S)): device $DEVICE, batch $BATCH"
"$PY" -m bench.gpu_check --device "$DEVICE" --vga "$VGA" --mp12 "$MP12" --batch "$BATCH" --iters "$ITERS" \
    --workers "$WORKERS"
echo "== done ($(date -u +%H:%M:%S)), $(( $(date +%s) - STARTED )) s in all"
