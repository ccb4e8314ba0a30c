"""How long the store writer keeps the model's thread waiting: the real `EdgeStore.upsert` of CLIP-like points with
`indexer index`'s payload, in batches of 256 (the GPU batch), while another thread of the same process wakes every
millisecond and records how late it woke. Qdrant Edge's update holds the GIL from start to end, so a thread that
must run Python meanwhile (the model's, launching the next batch) waits for the whole call.

Side by side in one run, interleaved, a fresh store each time: Edge update calls of 256 points (one per batch, as
before) against `UPDATE_POINTS` (the store's setting). Prints the writer's cost per point and the sleeper's lateness.

    python -m bench.writer_stall [--points 12800] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.vectors import clip_like
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.sinks import StoreSink
from indexer.records import ImageMeta
from indexer.store import edge_store
from indexer.store.edge_store import EdgeStore

BATCH = 256
TICK = 0.001  # the sleeper's sleep, seconds


class Sleeper(threading.Thread):
    """Sleeps TICK at a time and records how much later than asked it ran again (the GIL's wait included)."""

    def __init__(self) -> None:
        super().__init__(name="sleeper", daemon=True)
        self.late: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            time.sleep(TICK)
            self.late.append(time.perf_counter() - start - TICK)


def batches_of(points: int) -> list[EmbeddedBatch]:
    """``points`` CLIP-like vectors with the metadata of photos in a few folders, in batches of BATCH."""
    vectors, _ = clip_like(points, seed=3)
    folders = [f"/photos/{2015 + i % 10}/trip-{i % 37}" for i in range(370)]
    metas = [
        ImageMeta(Path(f"{folders[i % 370]}/img-{i:07d}.jpg"), 350_000 + i, 10**18 + i, f"{i:064x}", 4000, 3000, "JPEG")
        for i in range(points)
    ]
    return [EmbeddedBatch(metas[i : i + BATCH], vectors[i : i + BATCH], 0.0) for i in range(0, points, BATCH)]


def one(per_call: int, work: list[EmbeddedBatch]) -> dict[str, float]:
    """Upsert every batch into a fresh store with Edge calls of ``per_call`` points, a Sleeper running."""
    real = edge_store.UPDATE_POINTS
    edge_store.UPDATE_POINTS = per_call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = EdgeStore(Path(tmp) / "store")
            try:
                store.ensure_collection("bench", work[0].vectors.shape[1])
                store.ensure_payload_indexes()
                sink = StoreSink(store, "bench")
                points = [sink.points(b) for b in work]
                sleeper = Sleeper()
                sleeper.start()
                time.sleep(0.2)  # its first ticks: a baseline of how late it wakes with nothing else running
                calm = len(sleeper.late)
                start = time.perf_counter()
                for batch in points:
                    store.upsert(batch)
                seconds = time.perf_counter() - start
                sleeper.stop.set()
                sleeper.join()
            finally:
                store.close()
    finally:
        edge_store.UPDATE_POINTS = real
    late = np.array(sleeper.late[calm:]) * 1000
    n = sum(len(b) for b in points)
    p50, p99 = np.percentile(late, [50, 99])
    return {"ms_per_point": 1000 * seconds / n, "p50": float(p50), "p99": float(p99), "max": float(late.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=12_800)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = batches_of(args.points)
    variants = sorted({BATCH, edge_store.UPDATE_POINTS}, reverse=True)
    results: dict[int, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for per_call in variants:
            results[per_call].append(one(per_call, work))
    print(
        f"{args.points} CLIP-like 768-d points, `indexer index`'s payload, upserts of {BATCH}, a fresh store each; "
        f"a thread sleeping {TICK * 1000:g} ms at a time: how late it woke, ms (each of {args.repeat} runs)"
    )
    print(f"{'points a call':>13} {'ms a point':>22} {'late p50':>18} {'late p99':>20} {'late max':>22}")
    for per_call, runs in results.items():
        cells = [" / ".join(f"{r[k]:.{3 if k == 'ms_per_point' else 2}f}" for r in runs)
                 for k in ("ms_per_point", "p50", "p99", "max")]  # fmt: skip
        print(f"{per_call:>13} {cells[0]:>22} {cells[1]:>18} {cells[2]:>20} {cells[3]:>22}")


if __name__ == "__main__":
    main()
