"""Scale out on Ray (``pip install 'indexer[ray]'``): the only package that imports ray, and only when used.

- ``indexer embed PATH --output DIR --ray`` / ``indexer index PATH --ray``: the engine (``engine.py``);
- ``ImageEmbedder``: NeMo Curator's stage's counterpart for your own ``Dataset.map_batches`` pipelines
  (``stage.py``);
- work units and what a CPU worker does with one: ``parts.py`` (no torch: decode workers start light).

Names are loaded on first use, so that importing ``indexer.distributed.parts`` in a decode worker does not import
the engine (and torch). See docs/ray.md for running on a cluster.
"""
