"""Dedup's pair passes at 100k and 1M on CLIP-like vectors (``bench_dedup --clip-like``): time, peak memory, pairs
against the exact pass (recall, false pairs) and the planted groups found.

Each pass runs in a fresh process over the same raw vector file (what `dump_vectors` leaves for dedup), so its peak
RSS (VmHWM) is its own; the memory-mapped file's pages count in it as they are touched. The pairs each pass found are
kept in DIR (``pairs-PASS.npy``) and compared afterwards; a later run reuses the vectors and any pairs already there.

    python -m bench.dedup_scale --n 100000 --dir /tmp/dedup-100k --passes exact cells
    python -m bench.dedup_scale --n 1000000 --dir /tmp/dedup-1m --passes cells          # exact: hours on 2 cores
    python -m bench.dedup_scale --n 1000000 --dir /tmp/dedup-1m --passes exact cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.procstat import hwm_mb
from bench.vectors import DIM, ClipLike
from indexer.library.dedup import PairPlan, UnionFind, pair_lists
from indexer.library.export import VectorFile
from indexer.library.pairs import unique_pairs

THRESHOLD = 0.95


def generate(n: int, directory: Path) -> list[list[int]]:
    """The vectors (kept) and the planted groups (kept as JSON)."""
    directory.mkdir(parents=True, exist_ok=True)
    vectors, groups = directory / "vectors.f32", directory / "planted.json"
    if not (groups.exists() and vectors.exists() and vectors.stat().st_size == n * DIM * 4):
        groups.write_text(json.dumps(ClipLike(n).write(vectors).groups))
    planted: list[list[int]] = json.loads(groups.read_text())
    return planted


def run_pass(directory: Path, name: str) -> dict[str, Any]:
    """One pass (in this process): exact (numpy), cells, or a torch device (cuda, cpu-torch)."""
    matrix = VectorFile(directory / "vectors.f32", DIM)
    if name in ("exact", "cells"):
        plan = PairPlan(method=name, device="cpu")
        run = lambda: unique_pairs(list(pair_lists(matrix, THRESHOLD, plan)), len(matrix))  # noqa: E731
    else:
        from indexer.library.pairs_torch import torch_pairs

        device = "cpu" if name == "cpu-torch" else name
        run = lambda: torch_pairs(matrix, THRESHOLD, device)  # noqa: E731
    start = time.perf_counter()
    left, right = run()
    seconds = time.perf_counter() - start
    np.save(directory / f"pairs-{name}.npy", np.stack([left, right]))
    return {"pass": name, "seconds": round(seconds, 1), "peak_rss_mb": round(hwm_mb(), 1), "pairs": len(left)}


def sampled_cells(directory: Path, share: float, seed: int = 0) -> dict[str, Any]:
    """The cell pass with every row placed but only a random ``share`` of the cells compared, the comparing time
    extrapolated by the cells' work (rows x visitors): for a size whose whole pass outlasts the session."""
    from indexer.library import pairs as cp

    matrix = VectorFile(directory / "vectors.f32", DIM)
    rows, n = cp.open_rows(matrix), len(matrix)
    start = time.perf_counter()
    count = cp.default_cells(n)
    centres = cp.spherical_kmeans(cp._sample(rows, count * cp.SAMPLE_PER_CELL, seed), count, seed)
    kmeans_s = time.perf_counter() - start
    placed = cp.place(rows, centres, cp.DEFAULT_PROBES, cp.DEFAULT_REACH)
    place_s = time.perf_counter() - start - kmeans_s
    lists = list(cp._cell_lists(placed))
    work = np.array([len(m) * (len(m) / 2 + len(v)) for m, v in lists])
    pick = np.random.default_rng(seed).random(len(lists)) < share
    verifier = cp.Verifier(matrix, THRESHOLD)
    floor = THRESHOLD - cp.product_margin(DIM, cp.FP32_UNIT)
    start = time.perf_counter()
    for (members, visitors), chosen in zip(lists, pick, strict=True):
        if chosen:
            cp._pairs_of_cell(rows, members, visitors, floor, verifier)
    compared_s = time.perf_counter() - start
    total_compare_s = compared_s * work.sum() / max(1.0, work[pick].sum())
    return {"n": n, "cells": count, "cells_per_row": round(float((placed.near >= 0).sum()) / n, 2),
            "kmeans_s": round(kmeans_s, 1), "place_s": round(place_s, 1), "compared_share": round(float(
            work[pick].sum() / work.sum()), 4), "compared_s": round(compared_s, 1),
            "extrapolated_total_s": round(kmeans_s + place_s + total_compare_s, 1),
            "peak_rss_mb": round(hwm_mb(), 1), "dot_products": float(work.sum())}  # fmt: skip


def _fresh(directory: Path, name: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.dedup_scale", "--phase", "pass", "--dir", str(directory), "--passes", name]
    out: dict[str, Any] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out


def compare(directory: Path, n: int, planted: list[list[int]], name: str) -> dict[str, Any]:
    """Recall and false pairs against the exact pass (when its pairs are there); planted groups found."""
    found = np.load(directory / f"pairs-{name}.npy")
    out: dict[str, Any] = {"planted_groups_found": f"{_groups_found(found, n, planted)}/{len(planted)}"}
    exact_file = directory / "pairs-exact.npy"
    if exact_file.exists() and name != "exact":
        exact = np.load(exact_file)
        keys, exact_keys = found[0] * n + found[1], exact[0] * n + exact[1]
        hit = np.isin(keys, exact_keys)
        out |= {"recall_vs_exact": round(float(hit.sum()) / max(1, len(exact_keys)), 6),
                "false_pairs": int((~hit).sum()), "exact_pairs": len(exact_keys)}  # fmt: skip
    return out


def _groups_found(pairs: np.ndarray, n: int, planted: list[list[int]]) -> int:
    """Planted groups whose members all landed in one group (which may hold other, natural duplicates)."""
    uf = UnionFind(n)
    uf.union_pairs(pairs[0], pairs[1])
    return sum(len({uf.find(m) for m in g}) == 1 for g in planted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--passes", nargs="+", default=["exact", "cells"], help="exact, cells, cuda[:N], cpu-torch")
    parser.add_argument("--phase", choices=["all", "pass"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--sample-cells", type=float, metavar="SHARE", help="cells: compare only this share of cells")
    args = parser.parse_args(argv)
    if args.sample_cells:
        generate(args.n, args.dir)
        print(json.dumps(sampled_cells(args.dir, args.sample_cells)))
        return
    if args.phase == "pass":
        print(json.dumps(run_pass(args.dir, args.passes[0])))
        return
    start = time.perf_counter()
    planted = generate(args.n, args.dir)
    print(
        json.dumps({"n": args.n, "planted_groups": len(planted), "generate_s": round(time.perf_counter() - start, 1)})
    )
    for name in args.passes:
        result = (
            _fresh(args.dir, name) if not (args.dir / f"pairs-{name}.npy").exists() else {"pass": name, "kept": True}
        )
        print(json.dumps(result | compare(args.dir, args.n, planted, name)), flush=True)


if __name__ == "__main__":
    main()
