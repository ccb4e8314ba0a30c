"""The figures bench/gpu_check.sh prints, in one run of a few minutes:

1. the model alone (``encode_pixels`` on random batches, eager);
2. for VGA and 12 MP JPEGs: the nvJPEG decoder alone; `indexer embed` and `indexer index` in-process (the functions
   the CLI calls, the model warm) with ``decode.gpu`` auto and off, each with a per-stage breakdown (the consumer
   waiting on decoding, the model busy, the writer busy, the main thread blocked on the writer) and what ``auto``
   decided; the straightforward DataLoader script (bench/gpu_peer.py) on the same files, and our rate / its rate;
3. whole processes: ``python -m indexer embed`` and ``index`` of the VGA files, a first run (empty cache: nothing
   remembered) and a second run, against the in-process time.

The model is the default route's: ViT-L/14 (QuickGELU) from a weights file, random weights saved once into
bench/data/ (the same FLOPs as OpenAI's; loaded as real weights are: meta device, memory-mapped). In the CPU mode
(``--device cpu``: a rehearsal anywhere) it is the learned test model and the counts are small, and nvJPEG's place
is taken by nothing: ``auto`` finds no CUDA and says so.

    python -m bench.gpu_check --device cuda [--vga 4096] [--mp12 512] [--batch 256]
    python -m bench.gpu_check --device cpu --vga 48 --mp12 4 --batch 16 --iters 2   # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# torch and the pipeline are imported inside the functions (decode workers import this __main__ module).

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
TEST_MODEL = REPO / "tests" / "fixtures" / "shapes-clip"
T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f} s] {text}", flush=True)


def _make_one(job: tuple[Path, tuple[int, int], int]) -> None:
    from PIL import Image

    path, size, seed = job
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 18).convert("RGB")
    Image.blend(small, noise, 0.15).save(path, "JPEG", quality=90)


DISTINCT = 64  # photos generated; the rest of a set are copies of them, each made distinct by a JPEG comment


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs of ``size`` in ``folder``, cached between runs. The first DISTINCT are generated
    (in parallel: a 12 MP one takes 1.5 s on one core), the others are copies of them with a comment segment of
    their own (other bytes, other sha256, the same decoding work): 2,048 12 MP files in seconds, not minutes."""
    folder.mkdir(parents=True, exist_ok=True)
    name = [folder / f"{i:05d}.jpg" for i in range(count)]
    jobs = [(name[i], size, i) for i in range(min(count, DISTINCT)) if not name[i].exists()]
    if jobs:
        with multiprocessing.get_context("spawn").Pool() as pool:
            pool.map(_make_one, jobs, chunksize=1)
    for i in range(DISTINCT, count):
        if not name[i].exists():
            data = name[i % DISTINCT].read_bytes()  # SOI, then a COM segment naming the copy
            comment = f"copy {i}".encode()
            name[i].write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])
    for extra in sorted(folder.glob("*.jpg"))[count:]:
        extra.unlink()
    return folder


def model_files(device: str) -> tuple[dict[str, Any], Path, Path]:
    """(model settings, open_clip config JSON, weights file): ViT-L/14 random weights saved once on a GPU run,
    the learned test model on a CPU rehearsal."""
    if device == "cpu":
        config = TEST_MODEL / "config.json"
        return {"name": str(config)}, config, TEST_MODEL / "weights.safetensors"
    weights, config = DATA / "gpu-vit-l-14.safetensors", DATA / "gpu-vit-l-14.json"
    if not weights.exists() or not config.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        net = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
        cfg = {**open_clip.get_model_config("ViT-L-14"), "quick_gelu": True}
        config.write_text(json.dumps(cfg))
    return {"name": "ViT-L-14", "weights": str(weights)}, config, weights


def settings_for(model: dict[str, Any], device: str, batch: int, store: Path, gpu_decode: str = "auto") -> Any:
    from indexer.settings import load_settings

    full = {**model, "device": device, "batch_size": batch}
    return load_settings(None, {"model": full, "store": {"dir": store}, "decode": {"gpu": gpu_decode}})


def model_only(model: Any, batch: int, size: int, iters: int) -> float:
    """images/s of encode_pixels on random uint8 batches (warm)."""
    clip = model.get()
    pixels = np.random.default_rng(0).integers(0, 255, (batch, 3, size, size), dtype=np.uint8)
    clip.encode_pixels(pixels)
    start = time.perf_counter()
    for _ in range(iters):
        clip.encode_pixels(pixels)
    return iters * batch / (time.perf_counter() - start)


def in_process(folder: Path, args: argparse.Namespace, model_cfg: dict[str, Any], model: Any) -> dict[str, float]:
    """`embed` and `index` with decode.gpu auto and off, per-stage figures; returns the images/s of each run.
    `index` opens its store as the CLI does (``store.separate_process`` auto: in a process of its own on CUDA, in
    this one on a CPU); with decode.gpu auto it runs a second time with the other choice, side by side ("index
    inproc" or "index ownproc")."""
    from bench.gpu_stages import Stages
    from indexer.ingest.pipeline import run_embed, run_index
    from indexer.store.factory import open_store_from_settings, separate_process_wanted

    count = len(list(folder.glob("*.jpg")))
    rates: dict[str, float] = {}
    for gpu_decode in ("auto", "off"):
        for run in ("embed", "index", "other")[: 3 if gpu_decode == "auto" else 2]:
            with tempfile.TemporaryDirectory() as tmp:
                settings = settings_for(model_cfg, args.device, args.batch, Path(tmp) / "store", gpu_decode)
                separate = separate_process_wanted(settings) != (run == "other")
                what = run if run != "other" else ("index ownproc" if separate else "index inproc")
                with Stages() as figures:
                    start = time.perf_counter()
                    if run == "embed":
                        summary = run_embed([folder], Path(tmp) / "out.parquet", settings, model)
                    else:
                        with open_store_from_settings(settings, separate_process=separate) as store:
                            summary = run_index([folder], settings, store, model)
                    wall = time.perf_counter() - start
                n = summary.indexed
                rates[f"{what} {gpu_decode}"] = n / wall
                print(
                    f"  {what:13} decode.gpu={gpu_decode:4} {n:5d}/{count} images {n / wall:8.1f} images/s"
                    f" in {wall:5.1f} s | {figures.text(wall)}",
                    flush=True,
                )
    return rates


def nvjpeg_alone(folder: Path, device: str, chunk: int, spec: Any) -> str:
    """Images/s of the batched nvJPEG decoder (decode + resize/crop on the device)."""
    import torch

    from indexer.decode.nvjpeg import NvJpegDecoder
    from indexer.records import DecodeLimits

    paths = sorted(folder.glob("*.jpg"))
    decoder = NvJpegDecoder(spec, DecodeLimits(), device=device)
    decoder.decode(paths[:2])
    start = time.perf_counter()
    for i in range(0, len(paths), chunk):
        decoder.decode(paths[i : i + chunk])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return f"  nvJPEG decoder alone ({device}): {len(paths) / (time.perf_counter() - start):8.1f} images/s"


def peer(folder: Path, config: Path, weights: Path, args: argparse.Namespace, limit: int) -> float:
    """images/s of bench/gpu_peer.py (the straightforward DataLoader script) on ``folder``."""
    cmd = [sys.executable, "-m", "bench.gpu_peer", str(folder), "--config", str(config), "--weights", str(weights)]
    cmd += ["--device", args.device, "--batch", str(args.batch), "--workers", str(args.workers), "--limit", str(limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  peer DataLoader script ({args.workers} workers, PIL full decode): {got['rate']:8.1f} images/s"
          f" ({got['images']} images in {got['seconds']:.1f} s)", flush=True)  # fmt: skip
    return float(got["rate"])


def whole_process(folder: Path, model_cfg: dict[str, Any], args: argparse.Namespace, inside: dict[str, float]) -> None:
    """`python -m indexer embed|index` as fresh processes: a first run ever (empty cache) and a second run."""
    count = len(list(folder.glob("*.jpg")))
    flags = ["--model", model_cfg["name"], "--device", args.device, "--batch-size", str(args.batch), "--json"]
    flags += ["--weights", model_cfg["weights"]] if "weights" in model_cfg else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/cache", "PYTHONPATH": str(REPO)}
        for what in ("embed", "index"):
            for run in ("first", "second"):
                target = ["-o", f"{tmp}/out.parquet"] if what == "embed" else ["--store", f"{tmp}/store-{run}"]
                cmd = [sys.executable, "-m", "indexer", what, str(folder), *target, *flags]
                start = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
                wall = time.perf_counter() - start
                n = json.loads(out.stdout).get("indexed", 0) if out.returncode in (0, 1) else 0
                model_s = count / inside[f"{what} auto"] if inside.get(f"{what} auto") else float("nan")
                print(
                    f"  whole process {what:5} {run:6} run: {n}/{count} images in {wall:5.1f} s"
                    f" ({n / wall:7.1f} images/s); in-process {model_s:5.1f} s: +{wall - model_s:4.1f} s"
                    + ("" if out.returncode in (0, 1) else f"  FAILED: {out.stderr.strip()[-300:]}"),
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vga", type=int, default=4096)
    parser.add_argument("--mp12", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the peer script's DataLoader workers")
    parser.add_argument("--peer-12mp", type=int, default=128, help="12 MP files the peer script decodes (it is slow)")
    args = parser.parse_args()
    from indexer.model.lazy import LazyModel

    sets = {"VGA": make_jpegs(DATA / "gpu-vga", args.vga, (640, 480))}
    sets["12MP"] = make_jpegs(DATA / "gpu-12mp", args.mp12, (4000, 3000))
    say(f"JPEGs ready: {args.vga} VGA, {args.mp12} 12 MP")
    model_cfg, config, weights = model_files(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = LazyModel(settings_for(model_cfg, args.device, args.batch, Path(tmp)).model)
    size = model.preprocess.image_size
    rate = model_only(model, args.batch, size, args.iters)
    say(f"model {model.model_id} alone, batch {args.batch}: {rate:8.1f} images/s")
    for name, folder in sets.items():
        say(f"{name}:")
        print(nvjpeg_alone(folder, args.device, 64 if name == "12MP" else 256, model.preprocess), flush=True)
        rates = in_process(folder, args, model_cfg, model)
        theirs = peer(folder, config, weights, args, args.peer_12mp if name == "12MP" else 0)
        ours = ", ".join(f"{what} {r / theirs:.2f}x" for what, r in rates.items())
        print(f"  ours / peer script: {ours}", flush=True)
        if name == "VGA":
            vga_rates = rates
    model.close()
    say("whole processes, VGA:")
    whole_process(sets["VGA"], model_cfg, args, vga_rates)
    say("done")


if __name__ == "__main__":
    main()
