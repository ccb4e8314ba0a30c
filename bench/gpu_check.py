"""The figures bench/gpu_check.sh prints: ViT-L/14 (random weights, same FLOPs) model-only, eager and compiled;
nvJPEG decode; `indexer embed` and `indexer index` end to end (the functions the CLI calls, model built before the
clock) on VGA and 12 MP JPEGs; GPU utilisation sampled with nvidia-smi during each end-to-end run.

    python -m bench.gpu_check --device cuda [--vga 4096] [--mp12 512] [--batch 256] [--compile]
    python -m bench.gpu_check --device cpu --vga 8 --mp12 2 --batch 4 --iters 1   # the reduced CPU mode
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# torch and the pipeline are imported inside the functions (decode workers import this __main__ module).

DATA = Path(__file__).parent / "data"


def _make_one(job: tuple[Path, tuple[int, int], int]) -> None:
    from PIL import Image

    path, size, seed = job
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 18).convert("RGB")
    Image.blend(small, noise, 0.15).save(path, "JPEG", quality=90)


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs of ``size`` in ``folder`` (made in parallel, cached between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:05d}.jpg", size, i) for i in range(count) if not (folder / f"{i:05d}.jpg").exists()]
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_make_one, jobs, chunksize=8)
    for extra in sorted(folder.glob("*.jpg"))[count:]:
        extra.unlink()
    return folder


def settings_for(device: str, batch: int, compile_: bool, store: Path) -> Any:
    from indexer.settings import load_settings

    model = {"name": "ViT-L-14", "pretrained": "none", "device": device, "batch_size": batch, "compile": compile_}
    return load_settings(None, {"model": model, "store": {"dir": store}})


def model_only(device: str, batch: int, iters: int, compile_: bool) -> tuple[float, float]:
    """(images/s of encode_pixels on random uint8 batches, seconds of the first two calls: build + compile)."""
    from indexer.model import LazyModel

    with tempfile.TemporaryDirectory() as tmp:
        model = LazyModel(settings_for(device, batch, compile_, Path(tmp)).model)
        start = time.perf_counter()
        clip = model.get()
        pixels = np.random.default_rng(0).integers(0, 255, (batch, 3, 224, 224), dtype=np.uint8)
        for _ in range(2):
            clip.encode_pixels(pixels)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(iters):
            clip.encode_pixels(pixels)
        rate = iters * batch / (time.perf_counter() - start)
        clip.close()
    return rate, warm


class GpuSampler:
    """nvidia-smi utilisation samples every 100 ms while in the ``with`` block (nothing where there is none)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    def text(self) -> str:
        if not self.samples:
            return "GPU util: n/a (no nvidia-smi)"
        return f"GPU util mean {np.mean(self.samples):.0f}% max {max(self.samples):.0f}% ({len(self.samples)} samples)"


def end_to_end(folder: Path, device: str, batch: int, compile_: bool) -> list[str]:
    """`indexer embed` then `indexer index` (run_embed / run_index, the model warm) on ``folder``."""
    from indexer.model import LazyModel
    from indexer.pipeline import run_embed, run_index, store_from_settings

    lines = []
    count = len(list(folder.glob("*.jpg")))
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(device, batch, compile_, Path(tmp) / "store")
        model = LazyModel(settings.model)
        clip = model.get()
        clip.encode_pixels(np.zeros((batch, 3, 224, 224), np.uint8))  # warm (and compile) before the clock
        with GpuSampler() as smi:
            start = time.perf_counter()
            summary = run_embed([folder], Path(tmp) / "out.parquet", settings, model)
            seconds = time.perf_counter() - start
        lines.append(_line("embed", summary.indexed, count, seconds, smi))
        store = store_from_settings(settings)
        try:
            with GpuSampler() as smi:
                start = time.perf_counter()
                summary = run_index([folder], settings, store, model)
                seconds = time.perf_counter() - start
        finally:
            store.close()
        lines.append(_line("index", summary.indexed, count, seconds, smi))
    return lines


def _line(what: str, done: int, count: int, seconds: float, smi: GpuSampler) -> str:
    return f"  {what:6} {done:6d}/{count} images {done / seconds:8.1f} images/s  {smi.text()}"


def nvjpeg(folder: Path, device: str, chunk: int) -> str:
    """Images/s of the batched nvJPEG decoder (decode + resize/crop on the device), CPU libjpeg on ``cpu``."""
    import torch

    from indexer.gpu_decode import NvJpegDecoder
    from indexer.records import DecodeLimits, PreprocessSpec

    paths = sorted(folder.glob("*.jpg"))
    decoder = NvJpegDecoder(PreprocessSpec(), DecodeLimits(), device=device)
    decoder.decode(paths[:2])
    start = time.perf_counter()
    for i in range(0, len(paths), chunk):
        decoder.decode(paths[i : i + chunk])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return f"  nvJPEG decode ({device}): {len(paths) / (time.perf_counter() - start):8.1f} images/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vga", type=int, default=4096)
    parser.add_argument("--mp12", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also measure (and run end to end) compiled")
    args = parser.parse_args()
    t0 = time.perf_counter()
    sets = {
        "VGA": make_jpegs(DATA / "gpu-vga", args.vga, (640, 480)),
        "12MP": make_jpegs(DATA / "gpu-12mp", args.mp12, (4000, 3000)),
    }
    print(f"[{time.perf_counter() - t0:5.0f} s] JPEGs ready: {args.vga} VGA, {args.mp12} 12 MP", flush=True)
    rate, warm = model_only(args.device, args.batch, args.iters, False)
    print(f"model only, ViT-L/14 eager    batch {args.batch}: {rate:8.1f} images/s (build {warm:.0f} s)", flush=True)
    if args.compile:
        rate_c, warm_c = model_only(args.device, args.batch, args.iters, True)
        print(
            f"model only, ViT-L/14 compiled batch {args.batch}: {rate_c:8.1f} images/s (build+compile {warm_c:.0f} s,"
            f" {rate_c / rate:.2f}x eager)",
            flush=True,
        )
    for name, folder in sets.items():
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}:", flush=True)
        print(nvjpeg(folder, args.device, 64 if name == "12MP" else 256), flush=True)
        for line in end_to_end(folder, args.device, args.batch, args.compile):
            print(line, flush=True)
    print(f"[{time.perf_counter() - t0:5.0f} s] done", flush=True)


if __name__ == "__main__":
    main()
