"""`index` against `embed` on the same files, with the model replaced by a no-op (here only): what the store side
of `index` costs beyond `embed`'s file output.

Runs the real `run_index` (a fresh embedded store each time) and the real `run_embed` (an .npy file) in this process
on the same VGA JPEGs (generated and cached under bench/data/), interleaved, and prints for each: images/s, the main
process's CPU time per image (time.process_time: every thread of the main process — writer, model thread, pool
threads — but not the decode worker processes) and, for `index`, the seconds spent in the store's optimize. Then the
ratio index/embed of the rates. A second `index` of the same files (nothing changed) is timed as well.

    python -m bench.bench_index [--count 800] [--workers 2] [--repeat 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# No torch here: decode workers import this __main__ module (forkserver preload).

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "fixtures" / "shapes-clip"


class NoOpModel:
    """Stands in for `LazyModel` (bench only): 224 px preprocessing, constant 768-d vectors, no network."""

    def __init__(self, batch_size: int) -> None:
        from indexer.records import PreprocessSpec

        self.model_id, self.dim, self.batch_size = "no-op", 768, batch_size  # ViT-L/14's width
        self.preprocess = PreprocessSpec()

    def start(self, *towers: str) -> None:
        pass

    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        vectors = np.zeros((len(pixels), self.dim), np.float32)
        vectors[:, 0] = 1.0
        return vectors


class OptimizeClock:
    """Times the store's optimize() calls (wraps the method on the class, restored on exit)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> OptimizeClock:
        from indexer.store.edge_store import EdgeStore

        self._cls, self._real = EdgeStore, EdgeStore.optimize
        real, clock = self._real, self

        def timed(store: Any) -> None:
            start = time.perf_counter()
            real(store)
            clock.seconds += time.perf_counter() - start

        EdgeStore.optimize = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.optimize = self._real  # type: ignore[method-assign]


def settings_for(store_dir: Path, workers: int, batch: int) -> Any:
    from indexer.settings import load_settings

    overrides = {"store": {"dir": store_dir}, "decode": {"workers": workers, "gpu": "off"}}
    overrides["model"] = {"name": str(TINY_MODEL / "config.json"), "device": "cpu", "batch_size": batch}
    return load_settings(None, overrides)


def timed_index(folder: Path, workers: int, batch: int, again: bool) -> tuple[float, float, float, int]:
    """(images/s, main CPU ms/image, optimize s, images) of `run_index` into a fresh store (``again``: the second
    run over an unchanged tree is the one timed)."""
    from indexer.ingest.pipeline import run_index
    from indexer.store.factory import open_store_from_settings

    model: Any = NoOpModel(batch)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp) / "store", workers, batch)
        store = open_store_from_settings(settings)
        try:
            if again:
                run_index([folder], settings, store, model)
            with OptimizeClock() as clock:
                wall, cpu = time.perf_counter(), time.process_time()
                summary = run_index([folder], settings, store, model)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            store.close()
    n = summary.indexed + summary.unchanged
    assert n and not summary.failed, f"{summary}"
    return n / wall, 1000 * cpu / n, clock.seconds, n


def timed_embed(folder: Path, workers: int, batch: int) -> tuple[float, float, int]:
    """(images/s, main CPU ms/image, images) of `run_embed` to an .npy file."""
    from indexer.ingest.pipeline import run_embed

    model: Any = NoOpModel(batch)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp) / "store", workers, batch)
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_embed([folder], Path(tmp) / "out.npy", settings, model)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert summary.indexed and not summary.failed, f"{summary}"
    return summary.indexed / wall, 1000 * cpu / summary.indexed, summary.indexed


def folder_of(count: int) -> Path:
    """A folder of exactly ``count`` VGA JPEGs (links into the generated cache)."""
    from bench.bench_embed import make_photos

    paths = make_photos(DATA / "jpeg-vga", count, (640, 480))
    folder = DATA / f"jpeg-vga-{count}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for path in paths:
            (folder / path.name).symlink_to(path)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=800, help="VGA JPEGs (a quarter of them are run too)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the best of each is shown")
    args = parser.parse_args()
    small, large = args.count // 4, args.count
    folders = {n: folder_of(n) for n in (small, large)}
    best: dict[tuple[str, int], list[float]] = {}

    def keep(name: str, n: int, rate: float, cpu: float, extra: float = 0.0) -> None:
        old = best.get((name, n), [0.0, float("inf"), float("inf")])
        best[name, n] = [max(rate, old[0]), min(cpu, old[1]), min(extra, old[2])]

    for _ in range(args.repeat):
        for n, folder in folders.items():
            rate, cpu, _ = timed_embed(folder, args.workers, args.batch)
            keep("embed", n, rate, cpu)
            rate, cpu, opt, _ = timed_index(folder, args.workers, args.batch, again=False)
            keep("index", n, rate, cpu, opt)
            rate, cpu, opt, _ = timed_index(folder, args.workers, args.batch, again=True)
            keep("index, unchanged", n, rate, cpu, opt)
    print(f"VGA JPEGs, no-op model, {args.workers} decode workers ({os.cpu_count()} CPUs), batch {args.batch}, "
          f"best of {args.repeat}; main CPU per image: of the whole run, and the marginal cost (the slope between "
          f"{small} and {large} images: the run's fixed costs left out)")  # fmt: skip
    print(f"{'run':18} {'images':>6} {'images/s':>9} {'main CPU ms/img':>16} {'marginal':>9} {'optimize s':>11}")
    for (name, n), (rate, cpu, opt) in best.items():
        slope = (best[name, large][1] * large - best[name, small][1] * small) / (large - small)
        marginal = f"{slope:9.3f}" if n == large else " " * 9
        print(f"{name:18} {n:>6} {rate:>9.1f} {cpu:>16.3f} {marginal} {opt if name != 'embed' else 0:>11.3f}")
    for n in (small, large):
        print(f"index / embed, {n} images: {best['index', n][0] / best['embed', n][0]:.2f}x")


if __name__ == "__main__":
    main()
