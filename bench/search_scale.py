"""The store side of search at a million points: build, resident memory, latency and recall (``bench_search --scale``).

Phases, each its own process so that each resident-memory figure is that phase's alone:

    build   CLIP-like vectors (bench/vectors.py) written to DIR/vectors.f32, then loaded into a new embedded store
            (int8 copies in memory, originals on disk) in batches with no graph work, then one optimize() builds
            the HNSW graph and the int8 copies. Times: generate, load, optimize.
    query   opens the store as a search process does and runs held-out CLIP-like queries (limit 10): p50/p95 of
            ``store.query``, recall@10 against the exact top 10 (numpy over the memory-mapped vectors, computed
            after the timed queries), VmRSS/VmHWM of the process before and after.

    python -m bench.search_scale build --n 1000000 --dir bench/data/scale-1m
    python -m bench.search_scale query --dir bench/data/scale-1m [--queries 200] [--kind text|image|offlib]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.procstat import status_mb
from bench.vectors import DIM, ClipLike
from indexer.records import SearchFilter, StoredPoint, point_id
from indexer.store.edge_store import EdgeStore

BATCH = 2_000
MODEL = "bench-clip-like"


def payload(i: int) -> dict[str, Any]:
    """A photo's payload: ten year folders (10% of the points each) of 97 folders (≈ 0.1% each)."""
    year = f"/photos/{2015 + i % 10}"
    path = f"{year}/{i % 97:02d}/IMG_{i:07d}.jpg"
    return {"path": path, "dirs": ["/photos", year, f"{year}/{i % 97:02d}"], "sha256": f"{i:064x}", "width": 4000,
            "height": 3000, "format": "JPEG", "mtime": 1.5e9 + i}  # fmt: skip


def build(n: int, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    vectors = directory / "vectors.f32"
    start = time.perf_counter()
    if not vectors.exists() or vectors.stat().st_size != n * DIM * 4:
        ClipLike(n).write(vectors)
    out: dict[str, Any] = {"n": n, "generate_s": round(time.perf_counter() - start, 1)}
    rows = np.memmap(vectors, np.float32, "r", shape=(n, DIM))
    start = time.perf_counter()
    with EdgeStore(directory / "store") as store:
        store.ensure_collection(MODEL, DIM)
        for first in range(0, n, BATCH):
            block = np.asarray(rows[first : first + BATCH])
            store.upsert([StoredPoint(point_id(payload(first + k)["path"]), payload(first + k), v)
                          for k, v in enumerate(block)])  # fmt: skip
            if first % 100_000 == 0:
                print(f"  loaded {first + len(block)} in {time.perf_counter() - start:.0f} s", flush=True)
        store.flush()
        out["load_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        store.optimize()
        out["optimize_s"] = round(time.perf_counter() - start, 1)
        out["indexed"] = store.indexed_vectors_count()
    out["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    out["rss_anon_mb"] = round(status_mb("RssAnon"), 1)  # the rest is mapped files (page cache, reclaimable)
    return out


def query(directory: Path, count: int, kind: str, hnsw_ef: int = 0, folder: str | None = None) -> dict[str, Any]:
    """``kind`` image: held-out rows of the same library; text: CLIP-like text queries naming the library's topics
    (`ClipLike.text_queries`: a modality gap, best hits ≈ 0.4-0.5); offlib: rows of another library (another shared
    direction, best hits ≈ 0.3-0.35: a query for something the library does not hold, the hardest case for the
    graph). ``hnsw_ef``: search.hnsw_ef (0: the store's default). ``folder``: a folder filter (e.g. /photos/2015,
    10% of the points; recall is then against the exact top 10 of that folder)."""
    rss_start = status_mb("VmRSS")
    start = time.perf_counter()
    store = EdgeStore(directory / "store")
    store.hnsw_ef = hnsw_ef
    open_s = time.perf_counter() - start
    n = store.count()
    queries = {
        "image": lambda: ClipLike(n).chunk(n, n + count)[0],
        "text": lambda: ClipLike(n).text_queries(count),
        "offlib": lambda: ClipLike(n, seed=7).chunk(0, count)[0],
    }[kind]()
    flt = None if folder is None else SearchFilter(path_prefix=folder)
    for q in queries[:10]:
        store.query(q, limit=10, filter=flt)  # warm-up
    times, got = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.query(q, limit=10, filter=flt)
        times.append(time.perf_counter() - t)
        got.append([int(h.payload["path"][-11:-4]) for h in hits])
    rss_after = status_mb("VmRSS")
    hwm = status_mb("VmHWM")
    anon, file = status_mb("RssAnon"), status_mb("RssFile")  # file: mapped store files (page cache, reclaimable)
    store.close()
    keep = None if folder is None else np.array([payload(i)["path"].startswith(folder + "/") for i in range(n)])
    recall = _recall(directory / "vectors.f32", n, queries, got, keep)
    ms = sorted(t * 1000 for t in times)
    return {
        "n": n,
        "queries": f"{count} {kind}-like" + ("" if folder is None else f", in {folder}"),
        "hnsw_ef": hnsw_ef or "default",
        "open_s": round(open_s, 2),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[round(0.95 * (len(ms) - 1))], 2),
        "recall_at_10": round(recall, 4),
        "rss_start_mb": round(rss_start, 1),
        "rss_after_queries_mb": round(rss_after, 1),
        "peak_rss_mb": round(hwm, 1),
        "rss_anon_mb": round(anon, 1),
        "rss_file_mb": round(file, 1),
    }


def _recall(path: Path, n: int, queries: np.ndarray, got: list[list[int]], keep: np.ndarray | None = None) -> float:
    """recall@10 against the exact top 10 (of the rows ``keep`` marks, where given)."""
    rows = np.memmap(path, np.float32, "r", shape=(n, DIM))
    best = np.full((len(queries), 10), -np.inf, np.float32)
    ids = np.zeros((len(queries), 10), np.int64)
    for first in range(0, n, 65_536):
        s = queries @ np.asarray(rows[first : first + 65_536]).T
        if keep is not None:
            s[:, ~keep[first : first + s.shape[1]]] = -np.inf
        cand_s = np.concatenate([best, s], axis=1)
        cand_i = np.concatenate([ids, np.arange(first, first + s.shape[1])[None, :].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-cand_s, 9, axis=1)[:, :10]
        best, ids = np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1)
    # Ties (exact copies) make the 10th place ambiguous: a hit scoring the exact 10th score counts.
    found = 0
    for q, hits in enumerate(got):
        tenth = best[q].min()
        scores = rows[hits] @ queries[q] if hits else np.zeros(0)
        found += int(np.sum(np.isin(hits, ids[q]) | (scores >= tenth - 1e-6)))
    return found / (10 * len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["build", "query"])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kind", choices=["image", "text", "offlib"], default="text")
    parser.add_argument("--hnsw-ef", type=int, default=0, help="search.hnsw_ef (0: the store's default)")
    parser.add_argument("--folder", help="a folder filter, e.g. /photos/2015 (10%% of the points)")
    args = parser.parse_args()
    if args.phase == "build":
        out = build(args.n, args.dir)
        (args.dir / "build.json").write_text(json.dumps(out))
    else:
        out = query(args.dir, args.queries, args.kind, args.hnsw_ef, args.folder)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
