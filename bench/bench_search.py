"""Text-search latency: the ViT-L/14 text tower on the CPU plus a Qdrant Edge query, at 10k and 100k points.

The store side holds random unit vectors inserted directly (with a photo-like payload) and optimised (HNSW), as
the pipeline leaves a big store; stores are kept in bench/data/ and reused by later runs (the 100k HNSW build takes
minutes on 2 cores). The model is ViT-L/14 with random weights: timing only, same shapes and FLOPs as the real one.

Each round runs, one after the other (so that all see the same load): the real read path `search.timed_search`
(model check, text tower up to the end-of-text token, store query); the text tower alone, EOT-truncated and over
all 77 positions (what the truncation saves); and the store query alone. Wall and CPU time per call, p50/p95, for
each torch thread count; printed as a Markdown table.

    python -m bench.bench_search [--sizes 10000 100000] [--rounds 60] [--threads 1 2] [--dtype auto]

At a million CLIP-like points, the store side alone (build time, query p50/p95, recall@10, resident memory):
``--scale`` hands the rest of the command line to `bench.search_scale`:

    python -m bench.bench_search --scale build --n 1000000 --dir bench/data/scale-1m
    python -m bench.bench_search --scale query --dir bench/data/scale-1m
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from indexer.model.clip import encode_text_until_eot
from indexer.model.lazy import LazyModel
from indexer.records import StoredPoint, point_id
from indexer.search import Query, timed_search
from indexer.settings import ModelSettings
from indexer.store.edge_store import EdgeStore

DATA = Path(__file__).parent / "data"
QUERIES = [
    "a dog on the beach",
    "sunset over the mountains",
    "birthday cake with candles",
    "a red car parked in the street",
    "people hiking in the snow",
    "a cat sleeping on a sofa",
    "city skyline at night",
    "children playing football in a park",
    "a bowl of ramen",
    "old black and white family photo",
]
BATCH = 1000
Part = Callable[[str], object]
Samples = tuple[list[float], list[float]]  # (wall seconds, CPU seconds of this process) per call


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


def time_rounds(parts: dict[str, Part], rounds: int) -> dict[str, Samples]:
    """Each round calls every part once, on the round's query: wall and CPU seconds per call.

    CPU time is what a call cost this process; on a machine shared with other work it estimates the latency on an
    idle one (with one thread, where no thread waits for another).
    """
    out: dict[str, Samples] = {name: ([], []) for name in parts}
    for i in range(rounds):
        for name, fn in parts.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(QUERIES[i % len(QUERIES)])
            out[name][0].append(time.perf_counter() - start)
            out[name][1].append(time.process_time() - start_cpu)
    return out


def open_filled_store(count: int, dim: int, model_id: str) -> EdgeStore:
    """The kept store of `count` random points (made, filled and optimised on first use)."""
    store = EdgeStore(DATA / f"search-store-{count}")
    store.ensure_collection(model_id, dim)
    if store.count() != count:
        start = time.perf_counter()
        fill(store, count, dim)
        print(f"  {count} points inserted and optimised in {time.perf_counter() - start:.1f} s", flush=True)
    return store


def fill(store: EdgeStore, count: int, dim: int) -> None:
    """Insert `count` random unit vectors with a photo-like payload, then optimise (payload indexes, HNSW)."""
    rng = np.random.default_rng(0)
    for first in range(0, count, BATCH):
        vectors = rng.standard_normal((min(BATCH, count - first), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert([_point(first + i, v) for i, v in enumerate(vectors)])
    store.optimize()


def _point(i: int, vector: np.ndarray) -> StoredPoint:
    path = f"/photos/{2015 + i % 10}/{i % 97:02d}/IMG_{i:07d}.jpg"
    payload = {
        "path": path,
        "dirs": [str(p) for p in Path(path).parents if str(p) != "/"],
        "width": 4000,
        "height": 3000,
        "format": "JPEG",
        "mtime": 1.5e9 + i,
    }
    return StoredPoint(point_id(path), payload, vector)


def tower(model: LazyModel, truncate: bool) -> Part:
    """The text tower alone (tokenizer included): EOT-truncated, or over all 77 positions."""
    clip = model.get()

    @torch.inference_mode()
    def run(text: str) -> object:
        tokens = clip._tokenizer([text])
        return encode_text_until_eot(clip.net, tokens) if truncate else clip.net.encode_text(tokens)

    return run


def bench_size(model: LazyModel, count: int, thread_counts: list[int], rounds: int) -> dict[int, dict[str, Samples]]:
    """Samples of each part at `count` points, per torch thread count."""
    with open_filled_store(count, model.dim, model.model_id) as store:
        vectors = model.get().encode_texts(QUERIES)
        parts: dict[str, Part] = {
            "end to end (timed_search)": lambda q: timed_search(store, model, Query(texts=(q,), limit=24)),
            "text tower, EOT-truncated": tower(model, truncate=True),
            "text tower, full 77 tokens": tower(model, truncate=False),
            "store query (HNSW, limit 24)": lambda q: store.query(vectors[QUERIES.index(q)], limit=24),
        }
        out = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            time_rounds(parts, 3)  # warm-up
            out[threads] = time_rounds(parts, rounds)
        return out


def main() -> None:
    if sys.argv[1:2] == ["--scale"]:
        from bench.search_scale import main as scale_main

        sys.argv = [sys.argv[0], *sys.argv[2:]]
        scale_main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    args = parser.parse_args()
    model = LazyModel(ModelSettings(name="ViT-L-14", pretrained="none", device="cpu", dtype=args.dtype))
    clip = model.get()
    print(f"ViT-L-14 (random weights) on cpu, {clip.dtype}, {os.cpu_count()} CPUs", flush=True)
    rows, loads = [], [os.getloadavg()[0]]
    for count in args.sizes:
        for threads, parts in bench_size(model, count, args.threads, args.rounds).items():
            for part, (wall, cpu) in parts.items():
                (p50, p95), (c50, c95) = percentiles(wall), percentiles(cpu)
                rows.append(f"| {count:,} | {threads} | {part} | {p50:.1f} | {p95:.1f} | {c50:.1f} | {c95:.1f} |")
            loads.append(os.getloadavg()[0])
    print(f"\nload average (1 min) during the runs: {', '.join(f'{x:.1f}' for x in loads)}")
    print("| points | threads | what | wall p50 ms | wall p95 ms | CPU p50 ms | CPU p95 ms |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
