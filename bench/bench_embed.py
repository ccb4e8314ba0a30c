"""`indexer embed` against a straightforward sequential implementation, on the same 12 MP JPEGs and model.

Baseline: for each batch, PIL full decode + open_clip's preprocess + fp32 forward, one batch at a time, nothing
overlapped. Indexer: the real `run_embed` pipeline (draft decode in worker processes, bounded look-ahead overlapped
with inference, bf16 on CPUs that have it). Both use the same architecture (ViT-B-32, random weights by default:
fine for timing) and the model is built before the clock starts for both. Prints both throughputs and the ratio.

With ``--whole-process`` it times instead what a user experiences: ``indexer embed DIR -o FILE`` run from the shell
against the baseline run as its own script (``python -m bench.bench_embed --baseline-run``: imports, model built and
loaded from the same weights file, PIL full decode, open_clip preprocess, fp32, batches of 32), start-up included.
`indexer embed` runs twice: as every run but the first finds it (the weights' hash, open_clip's config and the CPU
dtype remembered in $XDG_CACHE_HOME/indexer) and as the first run ever (an empty cache).

    python -m bench.bench_embed [--count 48] [--batch 16] [--model ViT-B-32]
    python -m bench.bench_embed --whole-process [--count 96] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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
    from indexer.ingest.pipeline import run_embed
    from indexer.model.lazy import LazyModel
    from indexer.settings import load_settings

    model_settings = {"name": model_name, "pretrained": "none", "device": "cpu", "batch_size": batch, "dtype": dtype}
    settings = load_settings(None, {"model": model_settings, "decode": {"workers": workers}})
    model = LazyModel(settings.model)
    model.get()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_embed([folder], Path(tmp) / "out.parquet", settings, model)
        return time.perf_counter() - start, summary.indexed


def weights_file(model_name: str) -> Path:
    """Random weights for ``model_name`` saved once (open_clip's layout, safetensors): both sides load them."""
    path = CACHE.parent / f"{model_name}-random.safetensors"
    if not path.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        net = open_clip.create_model(model_name, pretrained=None)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return path


def baseline_run(folder: Path, model_name: str, weights: Path, batch: int) -> None:
    """The straightforward script, as its own process: the whole of it is what gets timed."""
    import open_clip
    import torch

    net, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    net.eval()
    paths = sorted(folder.glob("*.jpg"))
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            images = [preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch]]
            out.append(torch.nn.functional.normalize(net.encode_image(torch.stack(images)), dim=-1).numpy())
    np.save(folder.parent / "baseline-vectors.npy", np.concatenate(out))


def whole_process(folder: Path, count: int, model_name: str, batch: int) -> None:
    weights = weights_file(model_name)
    indexer = str(Path(sys.executable).parent / "indexer")
    with tempfile.TemporaryDirectory() as tmp:
        ours = [
            indexer,
            "embed",
            str(folder),
            "-o",
            f"{tmp}/out.parquet",
            "--model",
            model_name,
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--batch-size",
            str(batch),
        ]
        base = [
            sys.executable,
            "-m",
            "bench.bench_embed",
            "--baseline-run",
            str(folder),
            "--model",
            model_name,
            "--weights",
            str(weights),
            "--batch",
            str(batch),
        ]
        times: dict[str, float] = {}
        cold = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/empty-cache"}  # no remembered hash, config or dtype
        runs = (("first run", ours, cold), ("indexer embed", ours, None), ("baseline script", base, None))
        for name, cmd, env in runs:
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).parent.parent, env=env)
            times[name] = time.perf_counter() - start
    print(f"whole processes, {count} JPEGs of 4000x3000, {model_name} (random weights from a file), batch {batch}:")
    print(f"baseline script (sequential, full decode, fp32):  {times['baseline script']:6.1f} s")
    print(f"indexer embed (from the shell):                   {times['indexer embed']:6.1f} s")
    print(f"indexer embed, first run ever (no caches):        {times['first run']:6.1f} s")
    print(
        f"ratio: {times['baseline script'] / times['indexer embed']:.2f}x "
        f"(first run ever: {times['baseline script'] / times['first run']:.2f}x)"
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whole-process", action="store_true", help="time whole processes, start-up included")
    parser.add_argument("--baseline-run", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--dtype", default="auto", help="the indexer's model dtype (auto: its own choice)")
    parser.add_argument("--workers", type=int, default=0, help="decode workers (0: the indexer's default)")
    args = parser.parse_args()
    if args.baseline_run is not None:
        baseline_run(args.baseline_run, args.model, args.weights, args.batch)
        return
    folder = CACHE if not args.whole_process else CACHE.parent / f"jpeg-12mp-{args.count}"
    paths = make_photos(folder, args.count)
    if args.whole_process:
        whole_process(folder, len(paths), args.model, args.batch)
        return
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
