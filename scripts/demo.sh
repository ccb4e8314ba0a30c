#!/usr/bin/env bash
# The main job, end to end: set up, index a folder into the embedded store, search it by text and by image.
#   scripts/demo.sh                      generated shapes + the small learned test model (works offline)
#   scripts/demo.sh ~/Pictures "a dog"   your photos with CLIP ViT-L/14 (weights from the HF cache or --model-dir)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
IX=.venv/bin/indexer
if [ $# -ge 1 ]; then
  folder=$1; query=${2:-a photo}
  store=${STORE:-data/store}
  $IX index "$folder" --store "$store"
  $IX search "$query" --store "$store"
  exit 0
fi
folder=data/demo-shapes; store=data/demo-store
model=(--model tests/fixtures/shapes-clip/config.json)
.venv/bin/python -m tests.fixtures.shapes "$folder" --count 48
echo "== indexer index $folder"
$IX index "$folder" --store "$store" "${model[@]}" || [ $? -eq 1 ]
echo "== indexer search 'a red circle'"
$IX search "a red circle" --limit 5 --store "$store" "${model[@]}"
first=$(ls "$folder" | grep '^blue-square' | head -n 1)
echo "== indexer search --image $folder/$first"
$IX search --image "$folder/$first" --limit 5 --store "$store" "${model[@]}"
echo "== indexer status"
$IX status --store "$store"
