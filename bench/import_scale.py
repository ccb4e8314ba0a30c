"""`indexer import` of an export file at scale: rows per second of the loading loop and the peak memory of the
process (the graph is built once afterwards by optimize(); ``--optimize`` times it too).

    python -m bench.import_scale --n 100000 --dir /tmp/import-100k [--optimize]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.procstat import hwm_mb
from bench.vectors import DIM, ClipLike
from indexer.library.export import _export_schema, _vector_column, import_file
from indexer.store.edge_store import EdgeStore

ROW_GROUP = 10_000


def write_export(n: int, path: Path) -> None:
    """An `indexer export` file of n CLIP-like rows, written a row group at a time."""
    schema = _export_schema(DIM, "bench-clip-like")
    gen = ClipLike(n)
    with pq.ParquetWriter(str(path), schema) as writer:
        for first in range(0, n, ROW_GROUP):
            rows = gen.chunk(first, min(first + ROW_GROUP, n))[0]
            paths = [f"/photos/{i % 97:02d}/IMG_{i:07d}.jpg" for i in range(first, first + len(rows))]
            meta = [json.dumps({"width": 4000, "height": 3000, "mtime": 1.5e9 + i}) for i in range(len(rows))]
            columns = [pa.array([f"{i:032x}" for i in range(first, first + len(rows))]), pa.array(paths),
                       pa.array([f"{i:064x}" for i in range(first, first + len(rows))]), pa.array(meta),
                       _vector_column(rows)]  # fmt: skip
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--optimize", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / "export.parquet"
    if not source.exists():
        write_export(args.n, source)
    marks: list[tuple[int, float]] = []
    start = time.perf_counter()
    with EdgeStore(args.dir / "store") as store:
        summary = import_file(
            store,
            source,
            optimize_after=1 if args.optimize else 10**12,
            on_rows=lambda done, total: marks.append((done, time.perf_counter() - start)),
        )
        total_s = time.perf_counter() - start
    loaded_s = marks[-1][1] if marks else 0.0
    rate = np.diff([0.0, *(t for _, t in marks)])
    print(json.dumps({"n": summary.imported, "load_s": round(loaded_s, 1), "rows_per_s": round(summary.imported /
          max(loaded_s, 1e-9)), "slowest_batch_s": round(float(rate.max()), 2), "total_s": round(total_s, 1),
          "optimized": args.optimize, "peak_rss_mb": round(hwm_mb(), 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
