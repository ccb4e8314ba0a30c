"""`indexer cluster`'s k-means at a million CLIP-like vectors, from the raw vector file dedup and cluster read
(what `dump_vectors` leaves): the sample's KMeans, one MiniBatchKMeans pass over every block, the assignment pass.
Time of each step and the peak RSS of the process (the file is read a block at a time).

    python -m bench.cluster_scale --vectors /tmp/dedup-1m/vectors.f32 [--k 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.vectors import DIM
from indexer.library.cluster import DEFAULT_BLOCK, _sample, assign, fit_centres, refine_centres
from indexer.library.export import VectorFile
from indexer.settings import ClusterSettings


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    matrix = VectorFile(args.vectors, DIM)
    settings = ClusterSettings()
    times = {}
    start = time.perf_counter()
    sample = _sample(matrix, settings)
    centres = fit_centres(sample, args.k, settings.seed)
    times["sample_fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    centres = refine_centres(matrix, centres, settings.seed, DEFAULT_BLOCK)
    times["refine_s"] = time.perf_counter() - start
    start = time.perf_counter()
    labels, _ = assign(matrix, centres, DEFAULT_BLOCK)
    times["assign_s"] = time.perf_counter() - start
    sizes = np.bincount(labels, minlength=args.k)
    out = {"n": len(matrix), "k": args.k, **{k: round(v, 1) for k, v in times.items()}}
    out |= {"peak_rss_mb": round(_hwm_mb(), 1), "largest": int(sizes.max()), "smallest": int(sizes.min())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
