"""The only module that wires the stages: scan → plan (diff against the store) → decode pool → embed → store.

One `Indexer` holds the settings, the store, the model and the decoders, and runs one loop, plan → apply (moves) →
embed → remove, for `indexer index` (``index``, through ``run_index``), the watch daemon's reconciliation
(``sync``) and its event batches (``apply_changes``). Unchanged files are not read, moved files keep their vectors,
vanished files leave the store (the daemon's are returned instead, for its deletion guard to decide).
``run_embed`` does what NeMo Curator's stage does: vectors to a file, no store.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from indexer.decode.mixed import Decoder, decoder_for
from indexer.decode.pool import default_workers
from indexer.errors import ConfigError
from indexer.ingest.embed import EmbeddedBatch, embed_batches
from indexer.ingest.plan import (
    Plan,
    Wanted,
    defer_fresh,
    find_moves,
    plan_changes,
    plan_roots,
    scan_entries,
    sort_changes,
    unchanged,
)
from indexer.ingest.writer import BackgroundWriter
from indexer.model.lazy import LazyModel
from indexer.records import (
    DecodeLimits,
    Failure,
    FileEntry,
    PreprocessSpec,
    RunSummary,
    SearchFilter,
    StoredPoint,
    name_problem,
    point_id,
)
from indexer.settings import Settings
from indexer.sources.events import FileChange
from indexer.sources.scan import normalise_root
from indexer.sources.shards import (
    SHARD_PENDING,
    count_samples,
    decode_shard,
    decode_shards,
    find_shards,
    shard_unchanged,
)
from indexer.store.factory import open_store_from_settings
from indexer.store.payload import move_point as move_point  # re-exported: callers import it from here
from indexer.store.payload import payload_for as payload_for
from indexer.store.protocol import VectorStore

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


def store_from_settings(settings: Settings, *, read_only: bool = False) -> VectorStore:
    """The store the settings point at: a Qdrant server when ``store.qdrant_url`` is set, else Qdrant Edge."""
    return open_store_from_settings(settings, read_only=read_only)


def check_roots(paths: Sequence[str | Path]) -> list[Path]:
    """Normalised roots; a root that does not exist is a usage error (never a mass deletion)."""
    roots = [normalise_root(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise ConfigError("PATH", f"{root} does not exist")
    return roots


# --- the write path ------------------------------------------------------------------------------------------

Stop = Callable[[], bool]
OnBatch = Callable[[EmbeddedBatch], None]


def _never() -> bool:
    return False


@dataclass
class SyncResult:
    """What a daemon step did. ``gone``: stored points whose files are gone, not yet removed (the caller's deletion
    policy decides). ``deferred``: files too fresh to take (maybe still being written): the caller watches them."""

    summary: RunSummary
    gone: dict[str, StoredPoint] = field(default_factory=dict)
    deferred: list[FileEntry] = field(default_factory=list)


class Indexer:
    """Settings, store, model and decoders on one object, and the one write loop: plan → apply → embed → remove.

    The caller owns the store and the model; the Indexer owns its decoders (made on first need, closed by
    ``close()`` or at the end of a ``with`` block).
    """

    def __init__(
        self, settings: Settings, store: VectorStore, model: LazyModel, progress: Progress | None = None
    ) -> None:
        self.settings, self.store, self.model = settings, store, model
        self.progress: Progress = progress or NoProgress()
        self._decoders: Decoders | None = None

    def index(self, paths: Sequence[str | Path]) -> RunSummary:
        """`indexer index`: bring the store up to date with the files under ``paths``, deletions included.
        Ctrl-C keeps every batch already stored."""
        roots = check_roots(paths)
        summary = self._start()
        plan = plan_roots(roots, self.settings, self.store, summary)
        try:
            self._run(plan, summary, remove=True, optimize=True, shard_roots=roots)
        except KeyboardInterrupt:
            summary.interrupted = True
            self.close(wait=False)
            log.warning("interrupted: finished batches are stored; the next run resumes from there")
        finally:
            self.progress.close()
        return summary

    def sync(
        self, roots: Sequence[Path], *, fresh_seconds: float = 0.0, stop: Stop = _never, on_batch: OnBatch | None = None
    ) -> SyncResult:
        """The daemon's reconciliation: `index`'s diff of existing ``roots``, moves and embeddings applied,
        deletions returned. Files modified less than ``fresh_seconds`` ago are deferred, not read."""
        summary = self._start()
        plan = plan_roots(roots, self.settings, self.store, summary)
        deferred = defer_fresh(plan, fresh_seconds)
        self._run(plan, summary, stop=stop, on_batch=on_batch)
        return SyncResult(summary, plan.gone, deferred)

    def apply_changes(
        self, changes: Sequence[FileChange], *, stop: Stop = _never, on_batch: OnBatch | None = None
    ) -> SyncResult:
        """A batch of complete changes from the watcher: renames keep their vectors, new and changed files are
        embedded (unchanged ones skipped), and the points of files gone are returned, not removed."""
        summary = self._start()
        wanted = sort_changes(changes)
        wanted.upserts = self._apply_renames(wanted, summary) + wanted.upserts
        plan = plan_changes(wanted, self.store, summary)
        self._run(plan, summary, stop=stop, on_batch=on_batch)
        return SyncResult(summary, plan.gone)

    def remove(self, points: Sequence[StoredPoint], summary: RunSummary) -> None:
        """Points whose files left the disk leave the store."""
        if not points:
            return
        self.store.delete([p.id for p in points])
        self.store.clear_failures([p.path for p in points])
        summary.removed += len(points)
        self.store.flush()
        log.info("removed %d points whose files are gone", len(points))

    def close(self, wait: bool = True) -> None:
        """Shut the decoders down (the store and the model are the caller's)."""
        if self._decoders is not None:
            self._decoders.close(wait)
            self._decoders = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(wait=exc_type is None)

    # -- the loop ------------------------------------------------------------------------------------------------

    def _start(self) -> RunSummary:
        self.store.ensure_collection(self.model.model_id, self.model.dim)
        return RunSummary()

    def _run(
        self,
        plan: Plan,
        summary: RunSummary,
        *,
        remove: bool = False,
        optimize: bool = False,
        stop: Stop = _never,
        on_batch: OnBatch | None = None,
        shard_roots: Sequence[Path] = (),
    ) -> None:
        try:
            for old, entry in find_moves(plan):
                move_point(self.store, old, entry)
                summary.moved += 1
            self._embed(plan, summary, stop, on_batch)
            if remove:
                self.remove(list(plan.gone.values()), summary)
                plan.gone = {}
            if shard_roots:
                self._index_shards(shard_roots, summary)
        finally:
            self._record(summary, optimize)

    def _apply_renames(self, wanted: Wanted, summary: RunSummary) -> list[FileEntry]:
        """A rename whose file is unchanged keeps its vector; otherwise the old point goes and the file is embedded."""
        to_embed: list[FileEntry] = []
        for src, entry in wanted.moves:
            found = self.store.retrieve([point_id(src)])
            if found and unchanged(entry, found[0]) and not name_problem(entry.path):
                move_point(self.store, found[0], entry)
                summary.moved += 1
            else:
                if found:
                    wanted.gone.add(str(src))
                to_embed.append(entry)
        return to_embed

    def _embed(self, plan: Plan, summary: RunSummary, stop: Stop, on_batch: OnBatch | None) -> None:
        """Decode, embed and upsert the plan's files batch by batch; ``stop()`` is asked after every batch (what is
        left is not lost: it is still on disk for the next scan)."""
        if not plan.to_embed:
            return
        self.progress.start(len(plan.to_embed), "embedding")
        decoded = self.decoders().for_files(len(plan.to_embed)).imap(e.path for e in plan.to_embed)
        self.model.start("visual")  # the network loads while the first files decode
        try:  # store writes overlap the next batch; during the loop the store is the writer thread's
            with BackgroundWriter() as writer:
                for item in embed_batches(decoded, self.model.encode_pixels, self.model.batch_size):
                    writer.submit(functools.partial(self._take, item, plan, summary, on_batch))
                    if stop():
                        summary.interrupted = True
                        return
        finally:
            decoded.close()  # cancels the files submitted to decode workers and not consumed

    def _take(self, item: EmbeddedBatch | Failure, plan: Plan, summary: RunSummary, on_batch: OnBatch | None) -> None:
        if isinstance(item, Failure):
            log.warning("skipping %s: %s", item.path, item.reason)
            summary.add_failure(item)
            if str(item.path) in plan.stored_paths:  # it changed into something unreadable: drop the stale vector
                self.store.delete([point_id(item.path)])
            self.progress.advance(1)
            return
        now = time.time()
        points = [
            StoredPoint(point_id(meta.path), payload_for(meta, self.model.model_id, now), vector)
            for meta, vector in zip(item.metas, item.vectors, strict=True)
        ]
        self.store.upsert(points)
        self.store.clear_failures([str(m.path) for m in item.metas])
        summary.indexed += len(points)
        self.progress.advance(len(points))
        if on_batch is not None:
            on_batch(item)

    def _index_shards(self, roots: Sequence[Path], summary: RunSummary) -> None:
        """The tar shards under ``roots``: a shard whose size and mtime are unchanged is not read; a changed one is
        read again (its samples gone from it leave the store); a vanished one leaves."""
        stored = _stored_shard_points(roots, self.store)
        todo: list[tuple[FileEntry, list[StoredPoint]]] = []
        for shard in find_shards(roots, self.settings.index.include_hidden):
            points = stored.pop(str(shard.path), [])
            if shard_unchanged(shard, points):
                summary.unchanged += len(points)
            else:
                todo.append((shard, points))
        if todo:
            self.progress.close()
            self.progress.start(sum(count_samples(s.path) for s, _ in todo), "embedding shards")
        for shard, old in todo:
            self._embed_shard(shard, old, summary)
        for name, points in stored.items():
            if not os.path.lexists(name):
                self.remove(points, summary)

    def _embed_shard(self, shard: FileEntry, old: list[StoredPoint], summary: RunSummary) -> None:
        """Embed one shard; its points are marked complete (its size and mtime) only once all of it is stored, so
        an interrupted shard is read again by the next run."""
        self.model.start("visual")
        ids: list[str] = []
        threads = self.settings.decode.workers or default_workers()
        decoded = decode_shard(shard, self.model.preprocess, decode_limits(self.settings), threads=threads)
        with BackgroundWriter() as writer:  # store writes overlap the next batch, as for files
            for item in embed_batches(decoded, self.model.encode_pixels, self.model.batch_size):
                writer.submit(functools.partial(self._take_shard_batch, item, ids, summary))
        kept = set(ids)
        stale = [p.id for p in old if p.id not in kept]
        if stale:
            self.store.delete(stale)
            summary.removed += len(stale)
        if ids:
            self.store.set_payload(ids, {"shard_mtime_ns": shard.mtime_ns})

    def _take_shard_batch(self, item: EmbeddedBatch | Failure, ids: list[str], summary: RunSummary) -> None:
        if isinstance(item, Failure):
            self._take(item, Plan(), summary, None)
            return
        points = _shard_points(item, self.model.model_id)
        self.store.upsert(points)
        self.store.clear_failures([str(m.path) for m in item.metas])
        ids.extend(p.id for p in points)
        summary.indexed += len(points)
        self.progress.advance(len(points))

    def decoders(self) -> Decoders:
        """The decoders, made on first need (the model's preprocessing decides their output)."""
        if self._decoders is None:
            self._decoders = Decoders(self.settings, self.model.preprocess, self.model.batch_size)
        return self._decoders

    def _record(self, summary: RunSummary, optimize: bool) -> None:
        if summary.failures:
            self.store.record_failures(summary.failures)
        if optimize and summary.indexed + summary.moved >= max(1, self.settings.store.optimize_after):
            self.store.optimize()
        self.store.flush()


def run_index(
    paths: Sequence[str | Path],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    progress: Progress | None = None,
) -> RunSummary:
    """Bring the store up to date with the files under ``paths`` (`Indexer.index`)."""
    with Indexer(settings, store, model, progress) as indexer:
        return indexer.index(paths)


def decode_pool(settings: Settings, spec: PreprocessSpec, files: int, batch_size: int) -> Decoder:
    """A decode pool sized from the settings; small jobs decode in-process (no worker start-up).

    The look-ahead (files submitted but not yet consumed) defaults to four batches: the decoders fill them while
    the network is still being imported and loaded (seconds; `LazyModel.start`), and then keep the model fed while
    the next batch decodes. It bounds memory whatever the size of the tree (224 px images: 150 KB each).
    """
    workers = settings.decode.workers or default_workers()
    if files < IN_PROCESS_BELOW:
        workers = 0
    lookahead = settings.decode.lookahead or max(4 * batch_size, 4 * max(workers, 1))
    return decoder_for(settings, spec, decode_limits(settings), workers, lookahead)  # nvJPEG mixed in on CUDA


def decode_limits(settings: Settings) -> DecodeLimits:
    """The decode stage's limits and choices, from the settings."""
    return DecodeLimits(
        max_pixels=settings.decode.max_pixels,
        max_file_bytes=int(settings.decode.max_file_mb * 1024 * 1024),
        full_resolution=settings.decode.full_resolution,
    )


class Decoders:
    """The daemon's decoders: in-process for a few files (no worker start-up, the fastest path for one new photo),
    a worker pool for many, made on first need and kept for the daemon's life."""

    def __init__(self, settings: Settings, spec: PreprocessSpec, batch_size: int) -> None:
        self.settings, self.spec, self.batch_size = settings, spec, batch_size
        self._inline = decode_pool(settings, spec, 1, batch_size)
        self._pool: Decoder | None = None

    def for_files(self, count: int) -> Decoder:
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


# --- embed to a file -------------------------------------------------------------------------------------------


def run_embed(
    paths: Sequence[str | Path],
    output: Path,
    settings: Settings,
    model: LazyModel,
    progress: Progress | None = None,
) -> RunSummary:
    """Embed every image under ``paths`` into ``output`` (.parquet or .npy); no store involved."""
    from indexer.library.export import open_embedding_writer

    progress = progress or NoProgress()
    roots = check_roots(paths)
    summary = RunSummary()
    entries = list(scan_entries(roots, settings, summary.add_failure))
    shards = find_shards(roots, settings.index.include_hidden)
    progress.start(len(entries) + sum(count_samples(s.path) for s in shards), "embedding")
    pool = decode_pool(settings, model.preprocess, len(entries), model.batch_size)
    threads = settings.decode.workers or default_workers()  # the shards' decoding threads
    output_file = open_embedding_writer(output, model.dim, model.model_id, shard_columns=bool(shards))
    model.start("visual")  # imports, network and weights on a thread of their own, while the first files decode
    with output_file as writer, pool:
        try:
            with BackgroundWriter() as background:  # file output overlaps the next batch
                decoded = itertools.chain(
                    pool.imap(e.path for e in entries),
                    decode_shards(shards, model.preprocess, decode_limits(settings), threads=threads),
                )
                for item in embed_batches(decoded, model.encode_pixels, model.batch_size):
                    background.submit(functools.partial(_write_item, item, writer, summary, progress))
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


# --- WebDataset shards: one diff per shard file ---------------------------------------------------------------------


def _stored_shard_points(roots: Sequence[Path], store: VectorStore) -> dict[str, list[StoredPoint]]:
    by_shard: dict[str, list[StoredPoint]] = {}
    for root in roots:
        only = str(root) if root.is_file() else None
        for point in store.scroll(filter=SearchFilter(path_prefix=str(root.parent if only else root))):
            shard = str(point.payload.get("shard", ""))
            if shard and (only is None or shard == only):
                by_shard.setdefault(shard, []).append(point)
    return by_shard


def _shard_points(batch: EmbeddedBatch, model_id: str) -> list[StoredPoint]:
    now = time.time()
    return [
        StoredPoint(point_id(meta.path), {**payload_for(meta, model_id, now), "shard_mtime_ns": SHARD_PENDING}, vector)
        for meta, vector in zip(batch.metas, batch.vectors, strict=True)
    ]
