"""`indexer cluster`'s k-means at a million CLIP-like vectors, from the raw vector file dedup and cluster read
(what `dump_vectors` leaves): the sample's KMeans, then the refinement over every row as `indexer cluster --device`
picks it (cpu: one MiniBatchKMeans pass over every block; cuda[:N]: Lloyd's iterations, `kmeans_torch`; ``--lloyd``:
Lloyd's iterations on the named device, the CPU included), then the assignment pass. Time of each step, the peak
RSS of the process (the file is read a block at a time) and the mean squared distance of a row to its centre (the
objective both refinements lower).

    python -m bench.cluster_scale --vectors /tmp/dedup-1m/vectors.f32 [--k 50] [--device cpu|cuda[:N]] [--lloyd]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.procstat import hwm_mb
from bench.vectors import DIM
from indexer.library.cluster import DEFAULT_BLOCK, _sample, assign, fit_centres, refine_centres
from indexer.library.export import VectorFile
from indexer.settings import ClusterSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--device", default="cpu", help="cpu (MiniBatchKMeans) or cuda[:N] (Lloyd's iterations)")
    parser.add_argument("--lloyd", action="store_true", help="Lloyd's iterations on --device, even the CPU")
    args = parser.parse_args()
    matrix = VectorFile(args.vectors, DIM)
    settings = ClusterSettings()
    times = {}
    start = time.perf_counter()
    sample = _sample(matrix, settings)
    centres = fit_centres(sample, args.k, settings.seed)
    times["sample_fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    extra: dict[str, int] = {}
    lloyd_pass = args.lloyd or args.device != "cpu"
    if not lloyd_pass:
        centres = refine_centres(matrix, centres, settings.seed, DEFAULT_BLOCK)
    else:
        from indexer.library.kmeans_torch import lloyd

        result = lloyd(matrix, centres, args.device)
        centres = result.centres
        extra = {"iterations": result.iterations, "changed": result.changed, "reseeded": result.reseeded}
    times["refine_s"] = time.perf_counter() - start
    start = time.perf_counter()
    labels, distances = assign(matrix, centres, DEFAULT_BLOCK)
    times["assign_s"] = time.perf_counter() - start
    sizes = np.bincount(labels, minlength=args.k)
    out = {
        "n": len(matrix),
        "k": args.k,
        "device": args.device,
        "lloyd": lloyd_pass,
        **{k: round(v, 1) for k, v in times.items()},
    }
    out |= extra | {"peak_rss_mb": round(hwm_mb(), 1), "largest": int(sizes.max()), "smallest": int(sizes.min())}
    out |= {"mean_sq_distance": round(float(distances.astype(np.float64).mean()), 5)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
