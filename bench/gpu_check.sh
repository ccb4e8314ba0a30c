#!/usr/bin/env bash
# The GPU device check (issue 11): ViT-L/14 with random weights (same FLOPs as the real one), model-only eager and
# compiled, nvJPEG decode, `indexer embed` / `indexer index` end to end on VGA and 12 MP JPEGs with nvJPEG mixed into
# the decode stage and without (decode.gpu on/off), GPU utilisation.
# Meant to finish in under 5 minutes on one H200; run from the repository root:
#
#   bench/gpu_check.sh                                  # on the GPU machine
#   GPU_CHECK_DEVICE=cpu bench/gpu_check.sh             # reduced CPU mode (tiny counts), to try it anywhere
#
# Installs what it needs: the project (editable) and its missing dependencies, from wheels in $GPU_CHECK_WHEELS
# (default .whl/, made where pip can reach PyPI with bench/gpu_wheels.sh) when that folder exists, else from the
# package index. Knobs: GPU_CHECK_PYTHON, GPU_CHECK_VGA, GPU_CHECK_MP12, GPU_CHECK_BATCH, GPU_CHECK_ITERS,
# GPU_CHECK_COMPILE (1/0).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [[ $DEVICE == cpu ]]; then
    VGA=${GPU_CHECK_VGA:-8} MP12=${GPU_CHECK_MP12:-2} BATCH=${GPU_CHECK_BATCH:-4} ITERS=${GPU_CHECK_ITERS:-1}
    COMPILE=${GPU_CHECK_COMPILE:-0}
else
    VGA=${GPU_CHECK_VGA:-4096} MP12=${GPU_CHECK_MP12:-512} BATCH=${GPU_CHECK_BATCH:-256} ITERS=${GPU_CHECK_ITERS:-20}
    COMPILE=${GPU_CHECK_COMPILE:-1}
fi

echo "== setup ($(date -u +%H:%M:%S))"
if ! "$PY" -c "import indexer, open_clip, qdrant_edge, qdrant_client, pydantic_settings" 2>/dev/null; then
    if [[ -d $WHEELS ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation --no-deps -e .
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" open-clip-torch qdrant-client qdrant-edge-py \
            pydantic-settings watchdog fastapi uvicorn python-multipart ftfy
    else
        "$PY" -m pip install -q -e .
    fi
fi
"$PY" - <<'PY'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== figures ($(date -u +%H:%M:%S)): device $DEVICE, batch $BATCH"
FLAGS=(--device "$DEVICE" --vga "$VGA" --mp12 "$MP12" --batch "$BATCH" --iters "$ITERS")
[[ $COMPILE == 1 ]] && FLAGS+=(--compile)
"$PY" -m bench.gpu_check "${FLAGS[@]}"

OUTDIR=$(mktemp -d)
for GPU_DECODE in auto off; do  # auto: nvJPEG mixed in where CUDA is (decode.gpu); off: CPU decoding only
echo "== \`indexer embed\` as a whole process (startup and model build included), VGA, decode.gpu=$GPU_DECODE"
start=$(date +%s.%N)
INDEXER_DECODE__GPU=$GPU_DECODE "$PY" -m indexer embed bench/data/gpu-vga -o "$OUTDIR/out.parquet" \
    --model ViT-L-14 --pretrained none --device "$DEVICE" --batch-size "$BATCH" --json > "$OUTDIR/summary.json"
end=$(date +%s.%N)
"$PY" - "$OUTDIR/summary.json" "$start" "$end" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
seconds = float(sys.argv[3]) - float(sys.argv[2])
n = summary.get("indexed", 0)
print(f"  {n} images in {seconds:.1f} s whole process: {n / seconds:.1f} images/s")
PY
done
rm -rf "$OUTDIR"
echo "== done ($(date -u +%H:%M:%S))"
