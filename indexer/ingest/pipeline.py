"""`indexer index` and the watch daemon's writes: scan → plan (diff against the store) → the ingest loop → store.

One `Indexer` holds the settings, the store, the model and the decoders, and carries plans out, plan → apply (moves)
→ embed (`indexer.ingest.loop`, files into a `StoreSink`) → remove, for `indexer index` (``index``, through
``run_index``; tar shards after the files, `indexer.ingest.shard_index`), the watch daemon's reconciliation
(``sync``) and its event batches (``apply_changes``). Unchanged files are not read, moved files keep their vectors,
files that failed and are unchanged are not retried (unless asked), vanished files leave the store (the daemon's
are returned instead, for its deletion guard to decide). `indexer embed` is `indexer.ingest.embedfile.run_embed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from indexer.decode.limits import decode_limits as decode_limits  # re-exported: callers import these from here
from indexer.ingest.decoders import IN_PROCESS_BELOW as IN_PROCESS_BELOW
from indexer.ingest.decoders import Decoders
from indexer.ingest.decoders import decode_pool as decode_pool
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.embedfile import run_embed as run_embed
from indexer.ingest.loop import NoProgress, Progress, Stop, never, run_loop
from indexer.ingest.plan import (
    Plan,
    Wanted,
    check_roots,
    defer_fresh,
    find_moves,
    plan_changes,
    plan_roots,
    sort_changes,
    unchanged,
)
from indexer.ingest.shard_index import index_shards
from indexer.ingest.sinks import StoreSink, remove_points
from indexer.ingest.sources import FileSource
from indexer.model.lazy import LazyModel
from indexer.records import FileEntry, RunSummary, StoredPoint, name_problem, point_id
from indexer.settings import Settings
from indexer.sources.events import FileChange
from indexer.store.factory import open_store_from_settings
from indexer.store.payload import move_point as move_point
from indexer.store.payload import payload_for as payload_for
from indexer.store.protocol import MAX_FAILURES, VectorStore

__all__ = [
    "Decoders",
    "Indexer",
    "NoProgress",
    "Progress",
    "SyncResult",
    "check_roots",
    "decode_limits",
    "decode_pool",
    "hnsw_pays",
    "move_point",
    "open_store_from_settings",
    "payload_for",
    "run_embed",
    "run_index",
]

log = logging.getLogger(__name__)


# --- the write path ------------------------------------------------------------------------------------------

OnBatch = Callable[[EmbeddedBatch], None]


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

    def index(self, paths: Sequence[str | Path], *, retry_failed: bool = False, stop: Stop = never) -> RunSummary:
        """`indexer index`: bring the store up to date with the files under ``paths``, deletions included.
        Files that failed before and are unchanged are not read again unless ``retry_failed``. Ctrl-C keeps
        every batch already stored; so does ``stop()`` (asked after every batch: the daemon stopping under a job),
        which leaves the shards for the next run too. Either way the summary says interrupted."""
        roots = check_roots(paths)
        summary = self._start()
        known = {} if retry_failed else {f.path: f for f in self.store.failures(MAX_FAILURES)}
        plan = plan_roots(roots, self.settings, self.store, summary, known)
        try:
            self._run(plan, summary, remove=True, optimize=True, shard_roots=roots, stop=stop)
            summary.interrupted = stop()
        except KeyboardInterrupt:
            summary.interrupted = True
            self.close(wait=False)
            log.warning("interrupted: finished batches are stored; the next run resumes from there")
        finally:
            self.progress.close()
        return summary

    def sync(
        self, roots: Sequence[Path], *, fresh_seconds: float = 0.0, stop: Stop = never, on_batch: OnBatch | None = None
    ) -> SyncResult:
        """The daemon's reconciliation: `index`'s diff of existing ``roots``, moves and embeddings applied,
        deletions returned. Files modified less than ``fresh_seconds`` ago are deferred, not read; files that failed
        and are unchanged since are not read again (as `index` without ``--retry-failed``)."""
        summary = self._start()
        known = {f.path: f for f in self.store.failures(MAX_FAILURES)}
        plan = plan_roots(roots, self.settings, self.store, summary, known)
        deferred = defer_fresh(plan, fresh_seconds)
        self._run(plan, summary, stop=stop, on_batch=on_batch)
        return SyncResult(summary, plan.gone, deferred)

    def apply_changes(
        self, changes: Sequence[FileChange], *, stop: Stop = never, on_batch: OnBatch | None = None
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
        remove_points(self.store, points, summary)

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
        stop: Stop = never,
        on_batch: OnBatch | None = None,
        shard_roots: Sequence[Path] = (),
    ) -> None:
        try:
            for old, entry in find_moves(plan):
                move_point(self.store, old, entry)
                summary.moved += 1
            self._embed(plan, summary, stop, on_batch, index_payload=optimize)
            if remove:
                self.remove(list(plan.gone.values()), summary)
                plan.gone = {}
            if shard_roots and not stop():
                index_shards(shard_roots, self.settings, self.store, self.model, summary, self.progress,
                             plan.shard_points)  # fmt: skip
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

    def _embed(
        self, plan: Plan, summary: RunSummary, stop: Stop, on_batch: OnBatch | None, *, index_payload: bool = False
    ) -> None:
        """The plan's files through the ingest loop into the store; ``stop()`` is asked after every batch (what is
        left is not lost: it is still on disk for the next scan)."""
        if not plan.to_embed:
            return
        self.progress.start(len(plan.to_embed), "embedding")
        source = FileSource(plan.to_embed, self.decoders().for_files(len(plan.to_embed)))
        sink = StoreSink(self.store, self.model.model_id, plan, index_payload=index_payload)
        run_loop(source, self.model, sink, summary, self.progress, stop=stop, on_batch=on_batch)

    def decoders(self) -> Decoders:
        """The decoders, made on first need (the model's preprocessing decides their output)."""
        if self._decoders is None:
            self._decoders = Decoders(self.settings, self.model.preprocess, self.model.batch_size)
        return self._decoders

    def _record(self, summary: RunSummary, optimize: bool) -> None:
        if summary.failures:
            self.store.record_failures(summary.failures)
        changed = summary.indexed + summary.moved
        if optimize and changed >= max(1, self.settings.store.optimize_after):
            start = time.perf_counter()
            if hnsw_pays(self.store):
                self.store.optimize()
            elif (payload_indexes := getattr(self.store, "ensure_payload_indexes", None)) is not None:
                payload_indexes()  # filters stay fast; the HNSW build waits until it pays
            log.info("store indexes brought up to date in %.2f s", time.perf_counter() - start)
        self.store.flush()


# Below this many vectors outside an HNSW index, an exact search of them takes milliseconds (8,000 × 768-d: 2 ms,
# 20,000: 15 ms on 2 loaded cores; bench/README.md) while building it takes seconds to minutes (8,000: 38 s there):
# the build waits until it pays.
EXACT_SEARCH_POINTS = 20_000


def hnsw_pays(store: VectorStore) -> bool:
    """Whether building the HNSW index (``store.optimize()``) pays now: on the embedded store, only once the
    vectors outside it are too many for an exact search to stay fast; a Qdrant server builds its own."""
    indexed = getattr(store, "indexed_vectors_count", None)
    if indexed is None:
        return True
    outside = store.count() - int(indexed())
    if outside < EXACT_SEARCH_POINTS:
        log.info("HNSW index not built: %d vectors outside it (exact search is fast below %d)",
                 outside, EXACT_SEARCH_POINTS)  # fmt: skip
        return False
    return True


def run_index(
    paths: Sequence[str | Path],
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    progress: Progress | None = None,
    *,
    retry_failed: bool = False,
    stop: Stop = never,
) -> RunSummary:
    """Bring the store up to date with the files under ``paths`` (`Indexer.index`)."""
    with Indexer(settings, store, model, progress) as indexer:
        return indexer.index(paths, retry_failed=retry_failed, stop=stop)
