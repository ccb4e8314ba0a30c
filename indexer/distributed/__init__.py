"""Scale out on Ray (``pip install 'indexer[ray]'``): the only package that imports ray, and only when used.

- ``indexer embed PATH --output DIR --ray`` / ``indexer index PATH --ray``: the engine (``engine.py``);
- ``ImageEmbedder``: NeMo Curator's stage's counterpart for your own ``Dataset.map_batches`` pipelines
  (``stage.py``);
- work units and what a CPU worker does with one: ``parts.py`` (no torch: decode workers start light).

Names are loaded on first use, so that importing ``indexer.distributed.parts`` in a decode worker does not import
the engine (and torch). See docs/ray.md for running on a cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.distributed.engine import RayOptions, run_ray_embed, run_ray_index
    from indexer.distributed.stage import ImageEmbedder

__all__ = ["ImageEmbedder", "RayOptions", "run_ray_embed", "run_ray_index"]

_HOMES = {
    "ImageEmbedder": "indexer.distributed.stage",
    "RayOptions": "indexer.distributed.engine",
    "run_ray_embed": "indexer.distributed.engine",
    "run_ray_index": "indexer.distributed.engine",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
