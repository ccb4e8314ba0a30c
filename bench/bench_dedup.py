"""Near-duplicate search at scale: `find_duplicates` over an embedded store of random 768-d unit vectors with planted
duplicate groups. Checks that the groups found are exactly the planted ones, and records wall time and peak RSS.

Each size runs in these steps: build the store (not timed); run the dedup pass in a *fresh* process, so its peak
RSS (VmHWM) is the pass's own (the opened store included); run it again under tracemalloc for the peak of
what the pass itself allocates (Python objects and numpy arrays, not the store engine's memory); optionally
(``--queries N``) time the alternative design, one thresholded Qdrant nearest-neighbour query per point, on N
sampled points: exact one by one, exact in batches of 256 (Edge ``query_batch``), and with ``--hnsw`` after
``optimize()`` builds the HNSW index; each extrapolated to n queries.

    python -m bench.bench_dedup [--sizes 10000 100000] [--queries 500 [--hnsw]] [--block 4096]

At scale, on CLIP-like vectors (bench/vectors.py), the pair passes alone (exact, cells, a GPU): ``--clip-like``
hands the rest of the command line to `bench.dedup_scale`:

    python -m bench.bench_dedup --clip-like --n 1000000 --dir /tmp/dedup-1m --passes cells
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.library.dedup import find_duplicates
from indexer.records import StoredPoint, point_id
from indexer.store.edge_store import EdgeStore

DIM = 768
THRESHOLD = 0.95
Matrix = npt.NDArray[np.float32]


def planted_vectors(n: int, seed: int = 0) -> tuple[Matrix, list[list[int]]]:
    """n random unit vectors; 1% of them start a group of 2-5 whose other members are at cosine 0.965-0.995 to it.

    Random 768-d unit vectors are nearly orthogonal (|cos| < 0.25 over 10^10 pairs), so only planted pairs can
    reach 0.95; members of a group may be < 0.95 to each other, and join through the group's first vector.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(n)
    groups: list[list[int]] = []
    at = 0
    for _ in range(n // 100):
        size = int(rng.integers(2, 6))
        members = order[at : at + size].tolist()
        at += size
        base = vectors[members[0]]
        for m in members[1:]:
            cos = rng.uniform(0.965, 0.995)
            other = vectors[m] - (vectors[m] @ base) * base  # a random direction orthogonal to the base
            vectors[m] = cos * base + np.sqrt(1 - cos**2) * other / np.linalg.norm(other)
        groups.append(sorted(members))
    return vectors, groups


def build_store(directory: Path, vectors: Matrix) -> None:
    with EdgeStore(directory) as store:
        store.ensure_collection("bench-random", DIM)
        for start in range(0, len(vectors), 10_000):
            store.upsert(
                [
                    StoredPoint(point_id(f"/bench/{i}.jpg"), _payload(i), vectors[i])
                    for i in range(start, min(start + 10_000, len(vectors)))
                ]
            )
        store.flush()


def _payload(i: int) -> dict[str, Any]:
    return {"path": f"/bench/{i}.jpg", "sha256": f"{i:064x}", "width": 100, "height": 100, "mtime": float(i)}


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM where there is one: ru_maxrss survives execve on Linux, so in a process
    started by a big parent it reports the parent's RSS at fork time, not this program's."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dedup_phase(store_dir: Path, block: int, trace: bool) -> dict[str, Any]:
    """The measured pass (run in a fresh process): open the store, find near-duplicates, report."""
    with EdgeStore(store_dir) as store:
        rss_open = _status_mb("VmRSS") or 0.0
        if trace:
            tracemalloc.start()
        start = time.perf_counter()
        report = find_duplicates(store, "near", threshold=THRESHOLD, block=block)
        seconds = time.perf_counter() - start
        traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    groups = (sorted(int(Path(it.path).stem) for it in (g.keeper, *(m.item for m in g.members))) for g in report.groups)
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_open_mb": round(rss_open, 1),
        "traced_peak_mb": None if traced is None else round(traced, 1),
        "groups": sorted(groups),
    }


def _dedup_in_fresh_process(store_dir: Path, block: int, trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_dedup", "--phase", "dedup", "--store", str(store_dir)]
    cmd += ["--block", str(block)] + (["--trace"] if trace else [])
    out: dict[str, Any] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out


def query_phase(store_dir: Path, vectors: Matrix, groups: list[list[int]], count: int, hnsw: bool) -> dict[str, Any]:
    """The per-point design: one thresholded nearest-neighbour query per point (exact; batched; HNSW)."""
    rng = np.random.default_rng(1)
    sample = rng.choice(len(vectors), min(count, len(vectors)), replace=False)
    partner = _direct_pairs(vectors, groups)
    out: dict[str, Any] = {"sampled": len(sample)}
    with EdgeStore(store_dir) as store:
        out["exact_ms"], out["exact_recall"] = _time_queries(store, vectors, sample, partner)
        out["batch_exact_ms"] = _time_batches(store, vectors, sample)
        if hnsw:
            start = time.perf_counter()
            store.optimize()
            out["optimize_s"] = round(time.perf_counter() - start, 1)
            out["hnsw_ms"], out["hnsw_recall"] = _time_queries(store, vectors, sample, partner)
    return out


def _time_batches(store: EdgeStore, vectors: Matrix, sample: npt.NDArray[np.int64], size: int = 256) -> float:
    """Exact queries in batches through Edge's query_batch (not in the VectorStore protocol: the shard directly)."""
    import qdrant_edge as edge

    shard = store._shard
    assert shard is not None
    requests = [
        edge.QueryRequest(
            limit=8,
            query=edge.Query.Nearest(vectors[i].tolist()),
            score_threshold=THRESHOLD,
            params=edge.SearchParams(exact=True),
        )
        for i in sample.tolist()
    ]
    start = time.perf_counter()
    for at in range(0, len(requests), size):
        shard.query_batch(edge.QueryBatchRequest(queries=requests[at : at + size]))
    return round((time.perf_counter() - start) * 1000 / len(requests), 2)


def _direct_pairs(vectors: Matrix, groups: list[list[int]]) -> dict[int, set[int]]:
    """For each grouped point, the members of its group at cosine >= THRESHOLD: what its query must return."""
    pairs: dict[int, set[int]] = {}
    for g in groups:
        scores = vectors[g] @ vectors[g].T
        for a, i in enumerate(g):
            pairs[i] = {j for b, j in enumerate(g) if b != a and scores[a, b] >= THRESHOLD}
    return pairs


def _time_queries(
    store: EdgeStore, vectors: Matrix, sample: npt.NDArray[np.int64], partner: dict[int, set[int]]
) -> tuple[float, float]:
    wanted = found = 0
    start = time.perf_counter()
    for i in sample.tolist():
        hits = store.query(vectors[i], limit=8, threshold=THRESHOLD)
        got = {int(Path(h.path).stem) for h in hits} - {i}
        wanted += len(partner.get(i, ()))
        found += len(got & partner.get(i, set()))
    ms = (time.perf_counter() - start) * 1000 / len(sample)
    return round(ms, 2), round(found / wanted, 4) if wanted else 1.0


def run_size(n: int, block: int, queries: int, hnsw: bool, workdir: Path) -> dict[str, Any]:
    vectors, groups = planted_vectors(n)
    store_dir = workdir / f"store-{n}"
    start = time.perf_counter()
    build_store(store_dir, vectors)
    build_s = time.perf_counter() - start
    measured = _dedup_in_fresh_process(store_dir, block, trace=False)
    traced = _dedup_in_fresh_process(store_dir, block, trace=True)
    result: dict[str, Any] = {
        "n": n,
        "planted_groups": len(groups),
        "planted_points": sum(len(g) for g in groups),
        "build_s": round(build_s, 1),
        "dedup_s": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
        "rss_after_open_mb": measured["rss_after_open_mb"],
        "traced_peak_mb": traced["traced_peak_mb"],
        "groups_equal_planted": measured["groups"] == sorted(groups) == traced["groups"],
    }
    if queries:
        q = query_phase(store_dir, vectors, groups, queries, hnsw)
        result |= {f"query_{k}": v for k, v in q.items()}
        for kind in ("exact", "batch_exact", "hnsw"):
            if f"{kind}_ms" in q:
                result[f"query_{kind}_extrapolated_s"] = round(q[f"{kind}_ms"] * n / 1000, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--clip-like"]:
        from bench.dedup_scale import main as scale_main

        scale_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=0, help="also time N per-point Qdrant queries per size")
    parser.add_argument("--hnsw", action="store_true", help="with --queries: also build HNSW and time it")
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["all", "dedup"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "dedup":
        print(json.dumps(dedup_phase(args.store, args.block, args.trace)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        for n in args.sizes:
            print(json.dumps(run_size(n, args.block, args.queries, args.hnsw, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
