"""Peak memory of the decode workers on a folder of big PNGs, with and without the decode memory budget.

One real `DecodePool` per case, each with fresh worker processes, over the same PNGs (photo-like, RGB, generated
once into bench/data/), cases interleaved in one run: "off" (no budget: the code before it), "unbounded" (a budget
no image waits for: only the heap trim after each big decode), then each `--budget-mb`. For each it prints the peak of
the workers' resident memory summed (sampled every 2 ms from /proc/PID/status; a lower bound of the true peak), the
sum of each worker's own peak (VmHWM; an upper bound, since they need not peak together), the idle workers' sum
before the run, the wall time and how many decodes waited for the budget.

    python -m bench.bench_decode_memory [--count 16] [--mp 24] [--workers 4] [--budget-mb 250 120] [--repeat 2]
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from indexer.decode.pool import DecodePool

# No torch here: decode workers import this __main__ module (forkserver preload).

DATA = Path(__file__).parent / "data"
UNBOUNDED = 1 << 50  # bytes: a budget that no image waits for


class Run(NamedTuple):
    peak_sum_mb: float  # sampled peak of the summed VmRSS
    hwm_sum_mb: float  # sum of the per-worker VmHWM
    idle_sum_mb: float
    idle_workers: int  # workers started before the clock (the rest start as work arrives)
    seconds: float
    waits: int
    takes: int


def make_pngs(count: int, megapixels: float) -> list[Path]:
    """Photo-like RGB PNGs of ``megapixels`` (3:2), cached between runs."""
    width = int((megapixels * 1e6 * 1.5) ** 0.5)
    height = int(megapixels * 1e6 / width)
    folder = DATA / f"png-{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"scan-{i:04d}.png"
        paths.append(path)
        small = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)  # drawn for every i: the same files either way
        if not path.exists():
            Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path, compress_level=1)
    return paths


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # gone
        pass
    return 0


def _worker_pids(pool: DecodePool) -> list[int]:
    """The pool's worker processes now (a bench may look inside; Python 3.11 starts them as work arrives)."""
    executor = pool._executor
    processes = list((executor._processes or {}).values()) if executor is not None else []
    return [p.pid for p in processes if p.pid is not None]


class Sampler(threading.Thread):
    """The largest sum of the pool's workers' VmRSS seen, sampled every 2 ms until stopped."""

    def __init__(self, pool: DecodePool) -> None:
        super().__init__(daemon=True)
        self.pool, self.peak_kb, self.done = pool, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak_kb = max(self.peak_kb, sum(_status_kb(pid, "VmRSS") for pid in _worker_pids(self.pool)))


def one_run(paths: list[Path], workers: int, budget: int) -> Run:
    from indexer.decode.pool import DecodePool
    from indexer.records import DecodeLimits, PreprocessSpec

    limits = replace(DecodeLimits(), memory_budget=budget)
    with DecodePool(PreprocessSpec(), limits, workers=workers, lookahead=2 * workers, transport="shm") as pool:
        small = DATA / "bench-decode-memory-small.png"
        Image.new("RGB", (64, 64)).save(small)
        for _ in range(20):  # workers started (and their imports done) before the clock; the sampler sees late ones
            list(pool.imap([small] * (2 * workers)))
            if len(started := _worker_pids(pool)) >= workers:
                break
        idle = sum(_status_kb(pid, "VmRSS") for pid in started)
        sampler = Sampler(pool)
        sampler.start()
        start = time.perf_counter()
        decoded = sum(1 for r in pool.imap(paths) if hasattr(r, "pixels"))
        seconds = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
        hwm = sum(_status_kb(pid, "VmHWM") for pid in _worker_pids(pool))
        stats = pool.budget_stats()
    assert decoded == len(paths), f"{decoded} of {len(paths)} decoded"
    waits, takes = (stats.waits, stats.takes) if stats is not None else (0, 0)
    return Run(sampler.peak_kb / 1024, hwm / 1024, idle / 1024, len(started), seconds, waits, takes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16, help="PNGs")
    parser.add_argument("--mp", type=float, default=24.0, help="megapixels each")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget-mb", type=int, nargs="+", default=[250, 120], help="budgets to compare (MiB)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repetitions; the lowest peak is shown")
    args = parser.parse_args()
    paths = make_pngs(args.count, args.mp)
    cases = {"off": 0, "unbounded": UNBOUNDED} | {f"{mb} MiB": mb << 20 for mb in args.budget_mb}
    best: dict[str, Run] = {}
    for _ in range(args.repeat):
        for name, budget in cases.items():
            run = one_run(paths, args.workers, budget)
            if name not in best or run.peak_sum_mb < best[name].peak_sum_mb:
                best[name] = run
    with Image.open(paths[0]) as im:
        size = f"{im.width}x{im.height}"
    print(f"{args.count} PNGs of {size} (RGB), {args.workers} workers, best of {args.repeat}")
    print("| budget | peak RSS, workers summed (sampled) | sum of workers' peaks | idle (workers) | wall | waited |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in best.items():
        print(
            f"| {name} | {r.peak_sum_mb:,.0f} MB | {r.hwm_sum_mb:,.0f} MB | {r.idle_sum_mb:,.0f} MB ({r.idle_workers}) "
            f"| {r.seconds:.1f} s | {r.waits}/{r.takes} |"
        )


if __name__ == "__main__":
    main()
