"""The figures bench/gpu_check.sh prints: ViT-L/14 (random weights, same FLOPs) model-only, eager and compiled;
nvJPEG decode; `indexer embed` and `indexer index` end to end (the functions the CLI calls, model built before the
clock) on VGA and 12 MP JPEGs, with nvJPEG mixed into the decode stage (``decode.gpu = "on"``) and without
(``"off"``), and how many files each side took; GPU utilisation sampled with nvidia-smi during each run.

In the CPU mode there is no nvJPEG: the "mixed on" runs use `NvJpegDecoder(device="cpu")` (torchvision's libjpeg
on a thread of the main process) as the GPU side, so the mixed path is exercised end to end; its figures say
nothing about a GPU.

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


def settings_for(device: str, batch: int, compile_: bool, store: Path, gpu_decode: str = "auto") -> Any:
    from indexer.settings import load_settings

    model = {"name": "ViT-L-14", "pretrained": "none", "device": device, "batch_size": batch, "compile": compile_}
    return load_settings(None, {"model": model, "store": {"dir": store}, "decode": {"gpu": gpu_decode}})


def model_only(device: str, batch: int, iters: int, compile_: bool) -> tuple[float, float]:
    """(images/s of encode_pixels on random uint8 batches, seconds of the first two calls: build + compile)."""
    from indexer.model.lazy import LazyModel

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


class DecoderSpy:
    """Remembers the decoders the pipeline's factory makes (to print the nvJPEG/CPU split); in the CPU mode it
    also stands `NvJpegDecoder(device="cpu")` in for nvJPEG (bench only, never the product)."""

    def __init__(self, cpu_stand_in: bool) -> None:
        import indexer.decode.mixed as mixed_decode
        import indexer.ingest.decoders as pipeline

        self.made: list[Any] = []
        self._saved = (pipeline.decoder_for, mixed_decode.gpu_decode_device)
        real = pipeline.decoder_for

        def spy(*args: Any) -> Any:
            decoder = real(*args)
            self.made.append(decoder)
            return decoder

        pipeline.decoder_for = spy
        if cpu_stand_in:
            mixed_decode.gpu_decode_device = lambda settings: None if settings.decode.gpu == "off" else "cpu"

    def close(self) -> None:
        import indexer.decode.mixed as mixed_decode
        import indexer.ingest.decoders as pipeline

        pipeline.decoder_for, mixed_decode.gpu_decode_device = self._saved

    def split(self) -> str:
        from indexer.decode.mixed import MixedDecoder

        mixed = [d for d in self.made if isinstance(d, MixedDecoder)]
        self.made.clear()
        if not mixed:
            return "CPU decode only"
        gpu, cpu = sum(d.gpu_files for d in mixed), sum(d.cpu_files for d in mixed)
        return f"nvJPEG {gpu} / CPU {cpu} files"


def warm_model(device: str, batch: int, compile_: bool) -> Any:
    """The LazyModel every end-to-end run shares, built and warmed (and compiled) before any clock."""
    from indexer.model.lazy import LazyModel

    with tempfile.TemporaryDirectory() as tmp:
        model = LazyModel(settings_for(device, batch, compile_, Path(tmp)).model)
    model.get().encode_pixels(np.zeros((batch, 3, 224, 224), np.uint8))
    return model


def end_to_end(folder: Path, device: str, batch: int, compile_: bool, model: Any, gpu_decode: str) -> list[str]:
    """`indexer embed` then `indexer index` (run_embed / run_index, the model warm) on ``folder``."""
    from indexer.errors import ConfigError
    from indexer.ingest.pipeline import run_embed, run_index, store_from_settings

    lines = []
    count = len(list(folder.glob("*.jpg")))
    spy = DecoderSpy(cpu_stand_in=device == "cpu")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = settings_for(device, batch, compile_, Path(tmp) / "store", gpu_decode)
            with GpuSampler() as smi:
                start = time.perf_counter()
                summary = run_embed([folder], Path(tmp) / "out.parquet", settings, model)
                seconds = time.perf_counter() - start
            lines.append(_line(f"embed  nvJPEG {gpu_decode:3}", summary.indexed, count, seconds, smi, spy.split()))
            store = store_from_settings(settings)
            try:
                with GpuSampler() as smi:
                    start = time.perf_counter()
                    summary = run_index([folder], settings, store, model)
                    seconds = time.perf_counter() - start
            finally:
                store.close()
            lines.append(_line(f"index  nvJPEG {gpu_decode:3}", summary.indexed, count, seconds, smi, spy.split()))
    except ConfigError as exc:  # decode.gpu = "on" where nvJPEG cannot run
        lines.append(f"  nvJPEG {gpu_decode}: not run: {exc}")
    finally:
        spy.close()
    return lines


def _line(what: str, done: int, count: int, seconds: float, smi: GpuSampler, split: str) -> str:
    return f"  {what} {done:6d}/{count} images {done / seconds:8.1f} images/s  {smi.text()}  ({split})"


def nvjpeg(folder: Path, device: str, chunk: int) -> str:
    """Images/s of the batched nvJPEG decoder (decode + resize/crop on the device), CPU libjpeg on ``cpu``."""
    import torch

    from indexer.decode.nvjpeg import NvJpegDecoder
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
    model = warm_model(args.device, args.batch, args.compile)
    print(f"[{time.perf_counter() - t0:5.0f} s] end-to-end model built and warm", flush=True)
    for name, folder in sets.items():
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}:", flush=True)
        print(nvjpeg(folder, args.device, 64 if name == "12MP" else 256), flush=True)
        for gpu_decode in ("on", "off"):
            for line in end_to_end(folder, args.device, args.batch, args.compile, model, gpu_decode):
                print(line, flush=True)
    model.close()
    print(f"[{time.perf_counter() - t0:5.0f} s] done", flush=True)


if __name__ == "__main__":
    main()
