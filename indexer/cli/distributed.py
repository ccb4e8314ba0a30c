"""``--ray`` for ``indexer embed`` and ``indexer index``: the flags and the two handlers (Ray only when asked)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from indexer.cli.common import progress_bar, report_summary
from indexer.settings import Settings

DIE_ENV = "INDEXER_TEST_RAY_DIE_MARKER"  # test-only: an embedding actor dies mid-batch once (see engine.py)


def ray_options(parser: argparse.ArgumentParser, *, index: bool = False) -> None:
    g = parser.add_argument_group("ray options (pip install 'indexer[ray]')")
    g.add_argument("--ray", action="store_true", help="run on Ray: a local cluster, or the one at --ray-address")
    g.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    g.add_argument("--num-gpus-per-worker", type=float, default=0.25, metavar="F",
                   help="GPU share of each embedding actor (default 0.25: four actors per GPU)")  # fmt: skip
    g.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="embedding actors (default: as many as the GPUs hold; 1 without GPUs)")  # fmt: skip
    g.add_argument("--part-size", type=int, default=256, metavar="N", help="images per work unit (default 256)")
    if index:
        g.add_argument("--parts-dir", type=Path, metavar="DIR", help="where parts are kept (default STORE/ray-parts)")
        g.add_argument("--shard-number", type=int, metavar="N", help="shards of a new Qdrant server collection")
        g.add_argument("--replication-factor", type=int, metavar="N", help="replicas of a new server collection")


def _options(args: argparse.Namespace) -> Any:
    from indexer.distributed.engine import RayOptions

    return RayOptions(
        address=args.ray_address,
        num_gpus_per_worker=args.num_gpus_per_worker,
        workers=args.ray_workers,
        part_size=args.part_size,
        shard_number=getattr(args, "shard_number", None),
        replication_factor=getattr(args, "replication_factor", None),
        die_marker=os.environ.get(DIE_ENV, ""),
    )


def cmd_embed_ray(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.distributed.engine import run_ray_embed

    with progress_bar(args) as progress:
        summary = run_ray_embed(args.paths, args.output, settings, _options(args), progress)
    return report_summary(summary, args, output=args.output)


def cmd_index_ray(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.distributed.engine import run_ray_index
    from indexer.store.factory import open_store_from_settings

    parts_dir = args.parts_dir or settings.store.dir / "ray-parts"
    with open_store_from_settings(settings) as store, progress_bar(args) as progress:
        summary = run_ray_index(args.paths, settings, store, _options(args), parts_dir, progress)
    return report_summary(summary, args)
