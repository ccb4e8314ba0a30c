"""A user's straightforward GPU embedding script, the yardstick bench/gpu_check.py compares against: a torch
DataLoader with worker processes, each image opened with PIL at full size and put through open_clip's own eval
transform, pinned memory, bf16 autocast on CUDA, batches of 256. Nothing from this project is used.

    python -m bench.gpu_peer FOLDER --config CONFIG.json --weights FILE [--device cuda] [--batch 256] [--workers 16]
        [--limit N]

Prints one JSON line: images, seconds (model built before the clock; DataLoader start included), images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


class Files:
    """The dataset: path → open_clip-preprocessed tensor (PIL decode at full size)."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def build(config_file: Path, weights: Path, device: str) -> tuple[Any, Any]:
    """open_clip's CLIP from a model config (``model_cfg`` / ``preprocess_cfg`` or a plain config) and weights."""
    import open_clip
    import torch
    from safetensors.torch import load_file

    raw = json.loads(config_file.read_text())
    config = {k: v for k, v in raw.get("model_cfg", raw).items() if k != "preprocess_cfg"}
    pp = raw.get("preprocess_cfg", {})
    net = open_clip.CLIP(**config)
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    net.load_state_dict(state)
    net = net.eval().to(device)
    size = config["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(
        size,
        is_train=False,
        mean=pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=pp.get("std", open_clip.OPENAI_DATASET_STD),
    )
    return net, transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    import torch

    paths = sorted(args.folder.glob("*.jpg"))[: args.limit or None]
    net, transform = build(args.config, args.weights, args.device)
    cuda = args.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(
        Files(paths, transform), batch_size=args.batch, num_workers=args.workers, pin_memory=cuda
    )
    start = time.perf_counter()
    done = 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for batch in loader:
            vectors = torch.nn.functional.normalize(net.encode_image(batch.to(args.device, non_blocking=True)), dim=-1)
            done += int(vectors.float().cpu().shape[0])
    seconds = time.perf_counter() - start
    print(json.dumps({"images": done, "seconds": seconds, "rate": done / seconds}))


if __name__ == "__main__":
    main()
