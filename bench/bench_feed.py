"""The host path that feeds the model: decode pool → batches, with the model replaced by a no-op (here only).

For each image size (VGA and 12 MP JPEGs, generated and cached under bench/data/) and each transport ("pickle":
one future and one pickled array per file, the transport before shared memory; "shm": chunks of files per task,
pixels in shared-memory slots), prints images/s and the main process's CPU time per image (time.process_time:
every thread of the main process, the executor's own threads included), with 1 worker and with N. Then
`indexer embed` end to end, as whole processes, with this tree's code and with another tree's (``--old``,
default /work/main: ``PYTHONPATH`` selects the code), same files, same tiny model, in the same run.

    python -m bench.bench_feed [--vga 400] [--mp12 24] [--workers 2] [--repeat 3] [--old /work/main] [--no-cli]
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

# No torch here: decode workers import this __main__ module (forkserver preload).

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "fixtures" / "shapes-clip" / "config.json"


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + texture; quality 90), cached between runs."""
    from bench.bench_embed import make_photos

    return make_photos(folder, count, size)


def host_path(paths: list[Path], transport: str, workers: int, batch: int = 64) -> tuple[float, float]:
    """Decode pool → embed_batches with a no-op encoder; returns (images/s, main-process CPU ms per image)."""
    from indexer.decode.pool import DecodePool
    from indexer.ingest.embed import embed_batches
    from indexer.records import DecodeLimits, PreprocessSpec

    def no_op(pixels: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixels), 8), np.float32)

    lookahead = max(2 * batch, 4 * workers)
    pool = DecodePool(PreprocessSpec(), DecodeLimits(), workers=workers, lookahead=lookahead, transport=transport)
    with pool:
        list(pool.imap(paths[: 2 * workers]))  # workers started before the clock
        wall, cpu = time.perf_counter(), time.process_time()
        n = sum(len(b.metas) for b in embed_batches(pool.imap(paths), no_op, batch) if hasattr(b, "metas"))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert n == len(paths), f"{n} of {len(paths)} decoded"
    return n / wall, 1000 * cpu / n


def cli_embed(folder: Path, code: Path, workers: int) -> float:
    """`indexer embed` on ``folder`` as a whole process with the code at ``code``; returns seconds."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "indexer", "embed", str(folder), "-o", f"{tmp}/out.parquet"]
        cmd += ["--model", str(TINY_MODEL), "--device", "cpu", "--workers", str(workers), "--batch-size", "64"]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vga", type=int, default=400, help="VGA JPEGs")
    parser.add_argument("--mp12", type=int, default=24, help="12 MP JPEGs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--old", type=Path, default=Path("/work/main"), help="the tree to compare `embed` with")
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end `indexer embed` comparison")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; the best of each is shown")
    args = parser.parse_args()
    sets = {
        "VGA": make_jpegs(DATA / "jpeg-vga", args.vga, (640, 480)),
        "12MP": make_jpegs(DATA / "jpeg-12mp", args.mp12, (4000, 3000)),
    }
    print(f"host path, no-op model, {args.workers} workers max ({os.cpu_count()} CPUs), best of {args.repeat}")
    print(f"{'set':6} {'transport':9} {'workers':>7} {'images/s':>9} {'main CPU ms/img':>16} {'scaling':>8}")
    for name, paths in sets.items():
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for _ in range(args.repeat):  # interleaved, so that a burst of load elsewhere hits every variant alike
            for transport in ("pickle", "shm"):
                for workers in (1, args.workers):
                    rate, cpu = host_path(paths, transport, workers)
                    old_rate, old_cpu = best.get((transport, workers), (0.0, float("inf")))
                    best[transport, workers] = (max(rate, old_rate), min(cpu, old_cpu))
        for transport in ("pickle", "shm"):
            one = best[transport, 1][0]
            for workers in (1, args.workers):
                rate, cpu = best[transport, workers]
                print(f"{name:6} {transport:9} {workers:>7} {rate:>9.1f} {cpu:>16.3f} {rate / (one * workers):>8.2f}")
    if args.no_cli:
        return
    print(f"\n`indexer embed` end to end (tiny model, {args.workers} workers): this tree vs {args.old}")
    for name, paths in sets.items():
        folder = paths[0].parent
        old, new = cli_embed(folder, args.old, args.workers), cli_embed(folder, ROOT, args.workers)
        old2, new2 = cli_embed(folder, args.old, args.workers), cli_embed(folder, ROOT, args.workers)
        old, new = min(old, old2), min(new, new2)
        print(f"{name:6} old {old:6.2f} s  new {new:6.2f} s  new/old {new / old:.2f}  ({len(paths)} files)")


if __name__ == "__main__":
    main()
