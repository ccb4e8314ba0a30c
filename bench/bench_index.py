"""`index` against `embed` on the same files, with the model replaced by a no-op (here only): what the store side
of `index` costs beyond `embed`'s file output.

Runs the real `run_index` (a fresh embedded store each time) and the real `run_embed` (an .npy file) in this process
on the same VGA JPEGs (generated and cached under bench/data/), interleaved, and prints for each: images/s, the main
process's CPU time per image (time.process_time: every thread of the main process — writer, model thread, pool
threads — but not the decode worker processes) and, for `index`, the seconds spent in the store's optimize. Then the
ratio index/embed of the rates. A second `index` of the same files (nothing changed) is timed as well.

    python -m bench.bench_index [--count 800] [--workers 2] [--repeat 2] [--batch 64] [--old TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    """Times the store's index upkeep at the end of a run: optimize() and, where the store has it,
    ensure_payload_indexes() (methods wrapped on the class, restored on exit)."""

    NAMES = ("optimize", "ensure_payload_indexes")

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> OptimizeClock:
        from indexer.store.edge_store import EdgeStore

        classes: list[Any] = [EdgeStore]
        if STORE_PROCESS:
            from indexer.store.child import ChildStore

            classes.append(ChildStore)
        self._real = {(cls, name): getattr(cls, name) for cls in classes for name in self.NAMES if hasattr(cls, name)}
        for (cls, name), real in self._real.items():
            setattr(cls, name, self._timed(real))
        return self

    def _timed(self, real: Any) -> Any:
        def timed(store: Any) -> None:
            start = time.perf_counter()
            real(store)
            self.seconds += time.perf_counter() - start

        return timed

    def __exit__(self, *exc: object) -> None:
        for (cls, name), real in self._real.items():
            setattr(cls, name, real)


# Whether this tree has `store.separate_process` (`indexer index` writes through a child process; the trees before
# it do not: their runs of that kind are left out).
def has_store_process(tree: Path) -> bool:
    return (tree / "indexer" / "store" / "child.py").exists()


STORE_PROCESS = has_store_process(ROOT)
OPTIMIZE_AFTER = 100  # so that a run of the small set already brings the store's indexes up to date


def settings_for(store_dir: Path, workers: int, batch: int) -> Any:
    from indexer.settings import load_settings

    overrides: dict[str, Any] = {
        "store": {"dir": store_dir, "optimize_after": OPTIMIZE_AFTER},
        "decode": {"workers": workers, "gpu": "off"},
    }
    overrides["model"] = {"name": str(TINY_MODEL / "config.json"), "device": "cpu", "batch_size": batch}
    return load_settings(None, overrides)


def timed_index(
    folder: Path, workers: int, batch: int, again: bool, separate: bool = False
) -> tuple[float, float, float, int, float]:
    """(images/s, main CPU ms/image, index upkeep s, images, the store process's CPU ms/image) of `run_index` into
    a fresh store (``again``: the second run over an unchanged tree is the one timed; ``separate``: the store in a
    process of its own, as `indexer index` opens it with ``store.separate_process``)."""
    from bench.owner_transport import cpu_s  # the one /proc/PID/stat reader of the benches
    from indexer.ingest.pipeline import run_index
    from indexer.store.factory import open_store_from_settings

    model: Any = NoOpModel(batch)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp) / "store", workers, batch)
        store = open_store_from_settings(settings, **({"separate_process": True} if separate else {}))
        child = store._process.pid if separate else None  # type: ignore[attr-defined]
        try:
            if again:
                run_index([folder], settings, store, model)
            with OptimizeClock() as clock:
                child_cpu = cpu_s(child) if child else 0.0
                wall, cpu = time.perf_counter(), time.process_time()
                summary = run_index([folder], settings, store, model)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                child_cpu = cpu_s(child) - child_cpu if child else 0.0
        finally:
            store.close()
    n = summary.indexed + summary.unchanged
    assert n and not summary.failed, f"{summary}"
    return n / wall, 1000 * cpu / n, clock.seconds, n, 1000 * child_cpu / n


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


def one(kind: str, count: int, workers: int, batch: int) -> dict[str, float]:
    """One measurement in this process, after a warm-up run of the same kind on 16 images (imports done)."""
    run = {"embed": lambda f: (*timed_embed(f, workers, batch)[:2], 0.0, 0, 0.0),
           "index": lambda f: timed_index(f, workers, batch, again=False),
           "index, own process": lambda f: timed_index(f, workers, batch, again=False, separate=True),
           "index, unchanged": lambda f: timed_index(f, workers, batch, again=True)}[kind]  # fmt: skip
    run(folder_of(16))
    rate, cpu, opt, _, child = run(folder_of(count))
    return {"rate": rate, "cpu": cpu, "optimize": opt, "child": child}


def measure(tree: Path, kind: str, count: int, args: argparse.Namespace) -> dict[str, float]:
    """`one` in a fresh process with the code of ``tree``."""
    cmd = [sys.executable, "-m", "bench.bench_index", "--one", kind, "--count", str(count),
           "--workers", str(args.workers), "--batch", str(args.batch)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=800, help="VGA JPEGs (a quarter of them are run too)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the best of each is shown")
    parser.add_argument("--old", type=Path, help="another tree to run side by side (PYTHONPATH selects the code)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.count, args.workers, args.batch)))
        return
    small, large = args.count // 4, args.count
    trees = {"new": ROOT, **({"old": args.old} if args.old else {})}
    kinds = ("embed", "index", "index, own process", "index, unchanged")
    best: dict[tuple[str, str, int], dict[str, float]] = {}
    for _ in range(args.repeat):  # interleaved: a burst of load elsewhere hits every variant alike
        for n in (small, large):
            for kind in kinds:
                for tree_name, tree in trees.items():
                    if kind == "index, own process" and not has_store_process(tree):
                        continue
                    got, old = measure(tree, kind, n, args), best.get((tree_name, kind, n))
                    if old is not None:
                        got = {"rate": max(got["rate"], old["rate"]), "cpu": min(got["cpu"], old["cpu"]),
                               "optimize": min(got["optimize"], old["optimize"]),
                               "child": min(got.get("child", 0.0), old.get("child", 0.0))}  # fmt: skip
                    best[tree_name, kind, n] = got
    print(f"VGA JPEGs, no-op model (768-d), {args.workers} decode workers ({os.cpu_count()} CPUs), batch "
          f"{args.batch}, store.optimize_after {OPTIMIZE_AFTER}, best of {args.repeat}, each run in a fresh process "
          f"after a warm-up; main CPU per image: of the whole run, and the marginal cost (the slope between "
          f"{small} and {large} images: the run's fixed costs left out)")  # fmt: skip
    head = f"{'tree':5} {'run':18} {'images':>6} {'images/s':>9} {'main CPU ms/img':>16}"
    print(f"{head} {'marginal':>9} {'upkeep s':>9} {'store process CPU ms/img':>25}")
    for tree_name in trees:
        for kind in kinds:
            if (tree_name, kind, large) not in best:
                continue
            for n in (small, large):
                got = best[tree_name, kind, n]
                slope = best[tree_name, kind, large]["cpu"] * large - best[tree_name, kind, small]["cpu"] * small
                marginal = f"{slope / (large - small):9.3f}" if n == large else " " * 9
                child = f"{got['child']:25.3f}" if got.get("child") else ""
                print(f"{tree_name:5} {kind:18} {n:>6} {got['rate']:>9.1f} {got['cpu']:>16.3f} {marginal} "
                      f"{got['optimize']:>9.3f} {child}")  # fmt: skip
        for kind in ("index", "index, own process"):
            for n in (small, large):
                if (tree_name, kind, n) in best:
                    ratio = best[tree_name, kind, n]["rate"] / best[tree_name, "embed", n]["rate"]
                    print(f"{tree_name:5} {kind} / embed, {n} images: {ratio:.2f}x")


if __name__ == "__main__":
    main()
