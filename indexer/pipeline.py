"""The only module that wires the stages: scan → diff against the store → decode pool → embed → store.

``run_index`` makes the store equal to the files under the given roots (incrementally: unchanged files are not
read, moved files keep their vectors, vanished files leave the store). ``run_embed`` is the seed's job: vectors to
a file, no store.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from indexer.decode import SUPPORTED_EXTENSIONS, DecodePool, default_workers, hash_file
from indexer.embed import EmbeddedBatch, embed_batches
from indexer.errors import ConfigError
from indexer.model import LazyModel
from indexer.records import (
    DecodeLimits,
    Failure,
    FileEntry,
    ImageMeta,
    PreprocessSpec,
    RunSummary,
    SearchFilter,
    StoredPoint,
    dirs_of,
    point_id,
)
from indexer.scan import normalise_root, scan
from indexer.settings import Settings
from indexer.shards import (
    SHARD_PENDING,
    count_samples,
    decode_shard,
    decode_shards,
    find_shards,
    is_shard_point,
    shard_fields,
    shard_unchanged,
)
from indexer.store import VectorStore, open_store
from indexer.watch import ChangeKind, FileChange

log = logging.getLogger(__name__)

# Below this many files, decoding in-process beats starting worker processes.
IN_PROCESS_BELOW = 8


class Progress(Protocol):
    """What the pipeline reports while it works (the CLI draws a bar from it)."""

    def start(self, total: int, what: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """A Progress that shows nothing."""

    def start(self, total: int, what: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def store_from_settings(settings: Settings) -> VectorStore:
    """The store the settings point at: a Qdrant server when ``store.qdrant_url`` is set, else Qdrant Edge."""
    s = settings.store
    return open_store(
        store_dir=s.dir, qdrant_url=s.qdrant_url or None, api_key=s.api_key or None, collection=s.collection
    )


def check_roots(paths: Sequence[str | Path]) -> list[Path]:
    """Normalised roots; a root that does not exist is a usage error (never a mass deletion)."""
    roots = [normalise_root(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise ConfigError("PATH", f"{root} does not exist")
    return roots


# --- index -----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What an index run has to do, from comparing the disk with the store."""

    to_embed: list[FileEntry] = field(default_factory=list)
    gone: dict[str, StoredPoint] = field(default_factory=dict)
    stored_paths: set[str] = field(default_factory=set)


def run_index(
    paths: Sequence[str | Path],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    progress: Progress | None = None,
) -> RunSummary:
    """Bring the store up to date with the files under ``paths``. Ctrl-C keeps every batch already stored."""
    progress = progress or NoProgress()
    roots = check_roots(paths)
    store.ensure_collection(model.model_id, model.dim)
    summary = RunSummary()
    plan = make_plan(roots, settings, store, summary)
    try:
        apply_moves(plan, store, summary)
        embed_into_store(plan, settings, store, model, summary, progress)
        remove_gone(plan, store, summary)
        index_shards(roots, settings, store, model, summary, progress)
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: finished batches are stored; the next run resumes from there")
    finally:
        progress.close()
        _finish(store, summary, settings)
    return summary


def _finish(store: VectorStore, summary: RunSummary, settings: Settings) -> None:
    if summary.failures:
        store.record_failures(summary.failures)
    if summary.indexed + summary.moved >= max(1, settings.store.optimize_after):
        store.optimize()
    store.flush()


def make_plan(roots: list[Path], settings: Settings, store: VectorStore, summary: RunSummary) -> Plan:
    """Diff the disk against the store: which files to embed, which stored points are gone."""
    stored: dict[str, StoredPoint] = {}
    for root in roots:
        for point in store.scroll(filter=SearchFilter(path_prefix=str(root))):
            if not is_shard_point(point):  # shards have their own diff (index_shards)
                stored[point.path] = point
    plan = Plan(stored_paths=set(stored))
    for entry in _scan(roots, settings, summary):
        old = stored.pop(str(entry.path), None)
        if old is not None and _unchanged(entry, old):
            summary.unchanged += 1
        else:
            plan.to_embed.append(entry)
    plan.gone = stored
    log.info("%d to embed, %d unchanged, %d gone from disk", len(plan.to_embed), summary.unchanged, len(plan.gone))
    return plan


def _scan(roots: list[Path], settings: Settings, summary: RunSummary) -> Iterator[FileEntry]:
    return scan(
        roots,
        SUPPORTED_EXTENSIONS,
        follow_symlinks=settings.index.follow_symlinks,
        include_hidden=settings.index.include_hidden,
        on_error=summary.add_failure,
    )


def _unchanged(entry: FileEntry, point: StoredPoint) -> bool:
    return bool(point.payload.get("size") == entry.size and point.payload.get("mtime_ns") == entry.mtime_ns)


def apply_moves(plan: Plan, store: VectorStore, summary: RunSummary) -> None:
    """New files with the content (sha256) of a vanished point take over its vector: a move, not a re-embed."""
    by_sha = _gone_by_sha(plan.gone)
    if not by_sha:
        return
    sizes = {int(p.payload.get("size", -1)) for p in plan.gone.values()}
    remaining: list[FileEntry] = []
    for entry in plan.to_embed:
        old = _moved_from(entry, plan, sizes, by_sha)
        if old is None:
            remaining.append(entry)
        else:
            move_point(store, old, entry)
            del plan.gone[old.path]
            summary.moved += 1
    plan.to_embed = remaining


def _gone_by_sha(gone: dict[str, StoredPoint]) -> dict[str, list[StoredPoint]]:
    by_sha: dict[str, list[StoredPoint]] = {}
    for point in gone.values():
        sha = point.payload.get("sha256")
        if sha:
            by_sha.setdefault(str(sha), []).append(point)
    return by_sha


def _moved_from(
    entry: FileEntry, plan: Plan, sizes: set[int], by_sha: dict[str, list[StoredPoint]]
) -> StoredPoint | None:
    if str(entry.path) in plan.stored_paths or entry.size not in sizes:
        return None
    try:
        sha = hash_file(entry.path)
    except OSError:
        return None  # the decode stage will report it
    candidates = by_sha.get(sha)
    return candidates.pop() if candidates else None


def move_point(store: VectorStore, old: StoredPoint, entry: FileEntry) -> None:
    """Re-key a point to the file's new path, keeping its vector (a move is never re-embedded)."""
    found = store.retrieve([old.id], with_vectors=True)
    if not found or found[0].vector is None:
        raise RuntimeError(f"point {old.id} ({old.path}) vanished during the move")
    payload = {**found[0].payload, **_file_fields(entry.path, entry.size, entry.mtime_ns)}
    store.upsert([StoredPoint(point_id(entry.path), payload, found[0].vector)])
    store.delete([old.id])
    log.info("moved %s -> %s (vector kept)", old.path, entry.path)


def embed_into_store(
    plan: Plan,
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    summary: RunSummary,
    progress: Progress,
) -> None:
    """Decode, embed and upsert every file of the plan, one batch at a time."""
    if not plan.to_embed:
        return
    clip = model.get()
    progress.start(len(plan.to_embed), "embedding")
    paths = (e.path for e in plan.to_embed)
    with decode_pool(settings, clip.preprocess, len(plan.to_embed), clip.batch_size) as pool:
        for item in embed_batches(pool.imap(paths), clip.encode_pixels, clip.batch_size):
            if isinstance(item, Failure):
                _failed(item, plan, store, summary)
                progress.advance(1)
            else:
                _store_batch(item, model.model_id, store, summary)
                progress.advance(len(item.metas))


def _failed(failure: Failure, plan: Plan, store: VectorStore, summary: RunSummary) -> None:
    log.warning("skipping %s: %s", failure.path, failure.reason)
    summary.add_failure(failure)
    if str(failure.path) in plan.stored_paths:  # it changed into something unreadable: drop the stale vector
        store.delete([point_id(failure.path)])


def _store_batch(batch: EmbeddedBatch, model_id: str, store: VectorStore, summary: RunSummary) -> None:
    now = time.time()
    points = [
        StoredPoint(point_id(meta.path), payload_for(meta, model_id, now), vector)
        for meta, vector in zip(batch.metas, batch.vectors, strict=True)
    ]
    store.upsert(points)
    store.clear_failures([str(m.path) for m in batch.metas])
    summary.indexed += len(points)


def remove_gone(plan: Plan, store: VectorStore, summary: RunSummary) -> None:
    """Points whose files left the disk leave the store."""
    if not plan.gone:
        return
    store.delete([p.id for p in plan.gone.values()])
    store.clear_failures(list(plan.gone))
    summary.removed += len(plan.gone)
    log.info("removed %d points whose files are gone", len(plan.gone))


def payload_for(meta: ImageMeta, model_id: str, indexed_at: float) -> dict[str, Any]:
    """The payload stored with each vector."""
    return {
        **_file_fields(meta.path, meta.size, meta.mtime_ns),
        "sha256": meta.sha256,
        "width": meta.width,
        "height": meta.height,
        "format": meta.format.upper(),
        "model": model_id,
        "indexed_at": indexed_at,
        **shard_fields(meta),
    }


def _file_fields(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    return {
        "path": str(path),
        "dirs": dirs_of(path),
        "size": size,
        "mtime": mtime_ns / 1e9,
        "mtime_ns": mtime_ns,
    }


def decode_pool(settings: Settings, spec: PreprocessSpec, files: int, batch_size: int) -> DecodePool:
    """A decode pool sized from the settings; small jobs decode in-process (no worker start-up).

    The look-ahead (files submitted but not yet consumed) defaults to two batches: enough to keep the model fed
    while the next batch decodes, and it bounds memory whatever the size of the tree.
    """
    workers = settings.decode.workers or default_workers()
    if files < IN_PROCESS_BELOW:
        workers = 0
    lookahead = settings.decode.lookahead or max(2 * batch_size, 4 * max(workers, 1))
    return DecodePool(spec, decode_limits(settings), workers=workers, lookahead=lookahead)


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_pixels=settings.decode.max_pixels, max_file_bytes=int(settings.decode.max_file_mb * 1024 * 1024)
    )


# --- embed to a file -------------------------------------------------------------------------------------------


def run_embed(
    paths: Sequence[str | Path],
    output: Path,
    settings: Settings,
    model: LazyModel,
    progress: Progress | None = None,
) -> RunSummary:
    """Embed every image under ``paths`` into ``output`` (.parquet or .npy); no store involved."""
    from indexer.export import open_embedding_writer

    progress = progress or NoProgress()
    roots = check_roots(paths)
    summary = RunSummary()
    entries = list(_scan(roots, settings, summary))
    shards = find_shards(roots, settings.index.include_hidden)
    clip = model.get()
    progress.start(len(entries) + sum(count_samples(s.path) for s in shards), "embedding")
    pool = decode_pool(settings, clip.preprocess, len(entries), clip.batch_size)
    writer_cm = open_embedding_writer(output, clip.dim, model.model_id, shard_columns=bool(shards))
    with writer_cm as writer, pool:
        try:
            decoded = itertools.chain(
                pool.imap(e.path for e in entries), decode_shards(shards, clip.preprocess, decode_limits(settings))
            )
            for item in embed_batches(decoded, clip.encode_pixels, clip.batch_size):
                _write_item(item, writer, summary, progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            progress.close()
    return summary


def _write_item(item: EmbeddedBatch | Failure, writer: Any, summary: RunSummary, progress: Progress) -> None:
    if isinstance(item, Failure):
        log.warning("skipping %s: %s", item.path, item.reason)
        summary.add_failure(item)
        progress.advance(1)
        return
    writer.write(item.metas, item.vectors)
    summary.indexed += len(item.metas)
    progress.advance(len(item.metas))


# --- watch: event batches and reconciliation for the daemon --------------------------------------------------------
#
# The daemon keeps the store equal to its roots with the same diff as `indexer index`, but it never deletes by
# itself: the functions below apply moves and embeddings and *return* the points whose files are gone, so that the
# daemon's deletion policy (never on a missing or emptied root, hold mass deletions) decides which to remove.

Stop = Callable[[], bool]
OnBatch = Callable[[EmbeddedBatch], None]


def _never() -> bool:
    return False


class Decoders:
    """The daemon's decoders: in-process for a few files (no worker start-up, the fastest path for one new photo),
    a worker pool for many, made on first need and kept for the daemon's life."""

    def __init__(self, settings: Settings, spec: PreprocessSpec, batch_size: int) -> None:
        self.settings, self.spec, self.batch_size = settings, spec, batch_size
        self._inline = decode_pool(settings, spec, 1, batch_size)
        self._pool: DecodePool | None = None

    def for_files(self, count: int) -> DecodePool:
        """The pool to decode ``count`` files with."""
        if count < IN_PROCESS_BELOW:
            return self._inline
        if self._pool is None:
            self._pool = decode_pool(self.settings, self.spec, IN_PROCESS_BELOW, self.batch_size)
        return self._pool

    def close(self, wait: bool = True) -> None:
        """Shut the worker pool down."""
        self._inline.close(wait)
        if self._pool is not None:
            self._pool.close(wait)


@dataclass
class SyncResult:
    """What a daemon step did. ``gone``: stored points whose files are gone, not yet removed (the caller's deletion
    policy decides). ``deferred``: files too fresh to take (maybe still being written): the caller watches them."""

    summary: RunSummary
    gone: dict[str, StoredPoint] = field(default_factory=dict)
    deferred: list[FileEntry] = field(default_factory=list)


def sync_roots(
    roots: Sequence[Path],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    decoders: Decoders,
    *,
    fresh_seconds: float = 0.0,
    stop: Stop = _never,
    on_batch: OnBatch | None = None,
) -> SyncResult:
    """``indexer index``'s diff of existing ``roots`` against the store: moves and embeddings applied, deletions
    returned. Files modified less than ``fresh_seconds`` ago are deferred, not read."""
    store.ensure_collection(model.model_id, model.dim)
    summary = RunSummary()
    plan = make_plan(list(roots), settings, store, summary)
    deferred = _defer_fresh(plan, fresh_seconds)
    try:
        apply_moves(plan, store, summary)
        embed_plan(plan, settings, store, model, summary, decoders, stop, on_batch)
    finally:
        _record(store, summary)
    return SyncResult(summary, plan.gone, deferred)


def _defer_fresh(plan: Plan, seconds: float) -> list[FileEntry]:
    if seconds <= 0:
        return []
    newest_ns = time.time_ns() - int(seconds * 1e9)
    deferred = [e for e in plan.to_embed if e.mtime_ns > newest_ns]
    if deferred:
        plan.to_embed = [e for e in plan.to_embed if e.mtime_ns <= newest_ns]
    return deferred


def embed_plan(
    plan: Plan,
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    summary: RunSummary,
    decoders: Decoders,
    stop: Stop = _never,
    on_batch: OnBatch | None = None,
) -> None:
    """Decode, embed and upsert the plan's files batch by batch; ``stop()`` is asked after every batch (what is
    left is not lost: it is still on disk for the next scan)."""
    if not plan.to_embed:
        return
    clip = model.get()
    pool = decoders.for_files(len(plan.to_embed))
    decoded = pool.imap(e.path for e in plan.to_embed)
    try:
        for item in embed_batches(decoded, clip.encode_pixels, clip.batch_size):
            if isinstance(item, Failure):
                _failed(item, plan, store, summary)
            else:
                _store_batch(item, model.model_id, store, summary)
                if on_batch is not None:
                    on_batch(item)
            if stop():
                summary.interrupted = True
                return
    finally:
        decoded.close()  # cancels the files submitted to decode workers and not consumed


def _record(store: VectorStore, summary: RunSummary) -> None:
    if summary.failures:
        store.record_failures(summary.failures)
    store.flush()


def apply_changes(
    changes: Sequence[FileChange],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    decoders: Decoders,
    *,
    stop: Stop = _never,
    on_batch: OnBatch | None = None,
) -> SyncResult:
    """Apply a batch of complete changes from the watcher: renames keep their vectors, new and changed files are
    embedded (unchanged ones skipped), and the points of files gone are returned, not removed."""
    store.ensure_collection(model.model_id, model.dim)
    summary = RunSummary()
    wanted = _sort_changes(changes)
    gone_paths = wanted.gone
    upserts = _apply_renames(wanted.moves, store, summary, gone_paths) + wanted.upserts
    plan = _change_plan(upserts, gone_paths, wanted.trees, store, summary)
    try:
        apply_moves(plan, store, summary)
        embed_plan(plan, settings, store, model, summary, decoders, stop, on_batch)
    finally:
        _record(store, summary)
    return SyncResult(summary, plan.gone)


@dataclass
class _Wanted:
    upserts: list[FileEntry] = field(default_factory=list)
    moves: list[tuple[Path, FileEntry]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    trees: list[Path] = field(default_factory=list)


def _sort_changes(changes: Sequence[FileChange]) -> _Wanted:
    wanted = _Wanted()
    for change in changes:
        if change.kind is ChangeKind.DELETE_TREE:
            wanted.trees.append(change.path)
            continue
        entry = _stat_entry(change.path) if change.kind is not ChangeKind.DELETE else None
        if entry is None:
            wanted.gone.add(str(change.path))
            if change.src is not None:  # moved here, then deleted: the old point goes too
                wanted.gone.add(str(change.src))
        elif change.kind is ChangeKind.MOVE and change.src is not None:
            wanted.moves.append((change.src, entry))
        else:
            wanted.upserts.append(entry)
    return wanted


def _stat_entry(path: Path) -> FileEntry | None:
    """The file as it is now; None when it is gone (or not a regular file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileEntry(path, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _apply_renames(
    moves: list[tuple[Path, FileEntry]], store: VectorStore, summary: RunSummary, gone: set[str]
) -> list[FileEntry]:
    """A rename whose file is unchanged keeps its vector; otherwise the old point goes and the file is embedded."""
    to_embed: list[FileEntry] = []
    for src, entry in moves:
        found = store.retrieve([point_id(src)])
        if found and _unchanged(entry, found[0]):
            move_point(store, found[0], entry)
            summary.moved += 1
        else:
            if found:
                gone.add(str(src))
            to_embed.append(entry)
    return to_embed


def _change_plan(
    upserts: list[FileEntry], gone_paths: set[str], trees: list[Path], store: VectorStore, summary: RunSummary
) -> Plan:
    """A Plan for a batch of changes: files to embed (unchanged ones dropped) and points whose files are gone."""
    stored = {p.path: p for p in store.retrieve([point_id(e.path) for e in upserts])}
    plan = Plan(stored_paths=set(stored))
    for entry in upserts:
        old = stored.get(str(entry.path))
        if old is not None and _unchanged(entry, old):
            summary.unchanged += 1
        else:
            plan.to_embed.append(entry)
    points = store.retrieve([point_id(p) for p in sorted(gone_paths)])
    for tree in trees:
        points.extend(store.scroll(filter=SearchFilter(path_prefix=str(tree))))
    # Only what is really gone from disk: an event can be stale (a folder renamed away and back, a re-created file).
    plan.gone = {p.path: p for p in points if not os.path.lexists(p.path)}
    plan.stored_paths |= set(plan.gone)
    return plan


def remove_points(store: VectorStore, points: Sequence[StoredPoint], summary: RunSummary) -> None:
    """Remove points whose files are gone (after the caller's deletion policy let them go)."""
    if not points:
        return
    store.delete([p.id for p in points])
    store.clear_failures([p.path for p in points])
    summary.removed += len(points)
    store.flush()


# --- WebDataset shards: one diff per shard file ---------------------------------------------------------------------


def index_shards(
    roots: list[Path], settings: Settings, store: VectorStore, model: LazyModel, summary: RunSummary, progress: Progress
) -> None:
    """Bring the store up to date with the tar shards under ``roots``: a shard whose size and mtime are unchanged
    is not read; a changed one is re-read (its samples gone from it leave the store); a vanished one leaves."""
    shards = find_shards(roots, settings.index.include_hidden)
    stored = _stored_shard_points(roots, store)
    todo: list[tuple[FileEntry, list[StoredPoint]]] = []
    for shard in shards:
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


def _stored_shard_points(roots: list[Path], store: VectorStore) -> dict[str, list[StoredPoint]]:
    by_shard: dict[str, list[StoredPoint]] = {}
    for root in roots:
        only = str(root) if root.is_file() else None
        for point in store.scroll(filter=SearchFilter(path_prefix=str(root.parent if only else root))):
            shard = str(point.payload.get("shard", ""))
            if shard and (only is None or shard == only):
                by_shard.setdefault(shard, []).append(point)
    return by_shard


def _embed_shard(
    shard: FileEntry,
    old: list[StoredPoint],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    summary: RunSummary,
    progress: Progress,
) -> None:
    """Embed one shard; its points are marked complete (its size and mtime) only once all of it is stored, so an
    interrupted shard is read again by the next run."""
    clip = model.get()
    ids: list[str] = []
    decoded = decode_shard(shard, clip.preprocess, decode_limits(settings))
    for item in embed_batches(decoded, clip.encode_pixels, clip.batch_size):
        if isinstance(item, Failure):
            log.warning("skipping %s: %s", item.path, item.reason)
            summary.add_failure(item)
            progress.advance(1)
            continue
        points = _shard_points(item, model.model_id)
        store.upsert(points)
        store.clear_failures([str(m.path) for m in item.metas])
        ids.extend(p.id for p in points)
        summary.indexed += len(points)
        progress.advance(len(points))
    kept = set(ids)
    stale = [p.id for p in old if p.id not in kept]
    if stale:
        store.delete(stale)
        summary.removed += len(stale)
    if ids:
        store.set_payload(ids, {"shard_mtime_ns": shard.mtime_ns})


def _shard_points(batch: EmbeddedBatch, model_id: str) -> list[StoredPoint]:
    now = time.time()
    return [
        StoredPoint(point_id(meta.path), {**payload_for(meta, model_id, now), "shard_mtime_ns": SHARD_PENDING}, vector)
        for meta, vector in zip(batch.metas, batch.vectors, strict=True)
    ]
