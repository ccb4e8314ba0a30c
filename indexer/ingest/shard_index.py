"""`indexer index` of WebDataset tar shards: one diff per shard file, each changed shard through the ingest loop.

A shard whose size and mtime are unchanged is not read; a changed one is read again (its samples gone from it leave
the store); a vanished one leaves. A shard's points are marked complete (its mtime) only once all of it is stored,
so an interrupted shard is read again by the next run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from indexer.decode.limits import decode_limits, decode_workers
from indexer.ingest.loop import Model, Progress, run_loop
from indexer.ingest.sinks import ShardSink, remove_points
from indexer.ingest.sources import ShardSource
from indexer.records import FileEntry, RunSummary, SearchFilter, StoredPoint
from indexer.settings import Settings
from indexer.sources.shards import count_samples, find_shards, shard_unchanged
from indexer.store.protocol import VectorStore

__all__ = ["index_shards"]

log = logging.getLogger(__name__)


def index_shards(
    roots: Sequence[Path], settings: Settings, store: VectorStore, model: Model, summary: RunSummary,
    progress: Progress, stored_under_dirs: Mapping[str, list[StoredPoint]] | None = None,
) -> None:  # fmt: skip
    """Bring the store up to date with the tar shards under ``roots``. ``stored_under_dirs``: the stored shard
    points under the roots that are directories, where the caller's plan has them already (`Plan.shard_points`)."""
    stored = _stored_shard_points(roots, store, stored_under_dirs)
    todo: list[tuple[FileEntry, list[StoredPoint]]] = []
    for shard in find_shards(roots, settings.index.include_hidden):
        points = stored.pop(str(shard.path), [])
        if shard_unchanged(shard, points):
            summary.unchanged += len(points)
        else:
            todo.append((shard, points))
    if todo:
        progress.close()
        progress.start(sum(count_samples(s.path) for s, _ in todo), "embedding shards")
    for shard, old in todo:
        _embed_shard(shard, old, settings, store, model, summary, progress)
    for name, points in stored.items():
        if not os.path.lexists(name):
            remove_points(store, points, summary)


def _embed_shard(
    shard: FileEntry, old: list[StoredPoint], settings: Settings, store: VectorStore, model: Model,
    summary: RunSummary, progress: Progress,
) -> None:  # fmt: skip
    sink = ShardSink(store, model.model_id)
    source = ShardSource([shard], model.preprocess, decode_limits(settings), decode_workers(settings))
    run_loop(source, model, sink, summary, progress)
    kept = set(sink.ids)
    stale = [p.id for p in old if p.id not in kept]
    if stale:
        store.delete(stale)
        summary.removed += len(stale)
    if sink.ids:
        store.set_payload(sink.ids, {"shard_mtime_ns": shard.mtime_ns})


def _stored_shard_points(
    roots: Sequence[Path], store: VectorStore, under_dirs: Mapping[str, list[StoredPoint]] | None
) -> dict[str, list[StoredPoint]]:
    """The stored points of the shards under ``roots`` (a root may be one shard file), by shard file."""
    by_shard: dict[str, list[StoredPoint]] = {}
    if under_dirs is not None:
        by_shard = {shard: list(points) for shard, points in under_dirs.items()}
    for root in roots:
        only = str(root) if root.is_file() else None
        if only is None and under_dirs is not None:
            continue
        for point in store.scroll(filter=SearchFilter(path_prefix=str(root.parent if only else root))):
            shard = str(point.payload.get("shard", ""))
            if shard and (only is None or shard == only):
                by_shard.setdefault(shard, []).append(point)
    return by_shard
