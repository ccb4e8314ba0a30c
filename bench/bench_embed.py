"""`indexer embed` against a straightforward sequential implementation, on the same 12 MP JPEGs and model.

Baseline: for each batch, PIL full decode + open_clip's preprocess + fp32 forward, one batch at a time, nothing
overlapped. Indexer: the real `run_embed` pipeline (draft decode in worker processes, bounded look-ahead overlapped
with inference, bf16 on CPUs that have it). Both use the same architecture (ViT-B-32, random weights by default:
fine for timing) and the model is built before the clock starts for both. Prints both throughputs and the ratio.

    python -m bench.bench_embed [--count 48] [--batch 16] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# torch and the pipeline are imported inside the functions: decode workers start by importing this __main__
# module (forkserver preload), and the real CLI's __main__ does not import torch either.

CACHE = Path(__file__).parent / "data" / "jpeg-12mp"


def make_photos(folder: Path, count: int, size: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """Photo-like 12 MP JPEGs (smooth gradients + texture; quality 90), cached between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        base = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        noise = Image.effect_noise(size, 18).convert("RGB")
        Image.blend(base, noise, 0.15).save(path, "JPEG", quality=90)
    return paths


def baseline(paths: list[Path], model_name: str, batch: int) -> tuple[float, np.ndarray]:
    """The sequential reference: full decode, open_clip preprocess, fp32 forward; returns (seconds, vectors)."""
    import open_clip
    import torch

    net, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    net.eval()
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            images = [preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch]]
            out.append(torch.nn.functional.normalize(net.encode_image(torch.stack(images)), dim=-1).numpy())
    return time.perf_counter() - start, np.concatenate(out)


def indexer_embed(folder: Path, model_name: str, batch: int, dtype: str, workers: int) -> tuple[float, int]:
    """The real pipeline, model built beforehand; returns (seconds, images embedded)."""
    from indexer.model import LazyModel
    from indexer.pipeline import run_embed
    from indexer.settings import load_settings

    model_settings = {"name": model_name, "pretrained": "none", "device": "cpu", "batch_size": batch, "dtype": dtype}
    settings = load_settings(None, {"model": model_settings, "decode": {"workers": workers}})
    model = LazyModel(settings.model)
    model.get()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_embed([folder], Path(tmp) / "out.parquet", settings, model)
        return time.perf_counter() - start, summary.indexed


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--dtype", default="auto", help="the indexer's model dtype (auto: its own choice)")
    parser.add_argument("--workers", type=int, default=0, help="decode workers (0: the indexer's default)")
    args = parser.parse_args()
    folder = CACHE
    paths = make_photos(folder, args.count)
    print(
        f"{len(paths)} JPEGs of 4000x3000 in {folder}; model {args.model} (random weights); "
        f"torch threads {torch.get_num_threads()}"
    )
    ours_s, n = indexer_embed(folder, args.model, args.batch, args.dtype, args.workers)
    base_s, _ = baseline(paths, args.model, args.batch)
    print(f"baseline (sequential, full decode, fp32): {len(paths) / base_s:7.2f} images/s  ({base_s:.1f} s)")
    print(f"indexer embed:                            {n / ours_s:7.2f} images/s  ({ours_s:.1f} s)")
    print(f"ratio: {(n / ours_s) / (len(paths) / base_s):.2f}x")


if __name__ == "__main__":
    main()
