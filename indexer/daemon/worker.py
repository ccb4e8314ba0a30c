"""The daemon's worker thread: start-up reconciliation, then event batches and the scans that are due.

    refresh the coalescer; run a batch when it is full or when the oldest complete file has waited ``max_wait``;
    run the scans the Scheduler says are due; check the roots once a second (`indexer.daemon.roots`)

Every write goes through one `indexer.ingest.pipeline.Indexer`; the deletions it returns pass the DeletionGuard
first (`finish`). Each batch and scan takes the daemon's ingest turn (`Worker.turn`), which an `indexer index` job
asked of the daemon holds while it runs: the two never plan the same new files at once and embed them twice, and
never run two decode pools side by side.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.daemon.guard import DeletionGuard, Held, root_state
from indexer.daemon.metrics import Metrics
from indexer.daemon.roots import Roots
from indexer.daemon.schedule import Scan, ScanKind, Scheduler
from indexer.daemon.sharedmodel import SharedModel
from indexer.errors import StoreFullError
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.pipeline import Indexer, SyncResult
from indexer.records import RunSummary
from indexer.settings import Settings
from indexer.sources.events import Coalescer
from indexer.sources.watch import Watcher
from indexer.store.locked import LockedStore

log = logging.getLogger(__name__)

CHUNK_BATCHES = 4  # a burst is fed to the decoder this many batches at a time (decode overlaps inference)
DISK_FULL_PAUSE = 5.0  # seconds the worker waits after a write refused for want of space (store.min_free_mb)
COUNTS = "%d indexed, %d unchanged, %d moved, %d removed"


@dataclass
class Resources:
    """What the daemon opens once its store is open, made together: the store (shared with the HTTP app), the
    deletion guard over it, the Indexer writing to it, and the watcher."""

    store: LockedStore
    guard: DeletionGuard
    indexer: Indexer
    watcher: Watcher

    def close(self, model: SharedModel) -> None:
        """Decoders, then the store (flushed), then the model."""
        self.indexer.close(wait=False)
        self.store.flush()
        self.store.close()
        model.close()


class Worker:
    """The worker thread's loop (`run`); `stop` and `wake` are set by the lifecycle and the observers."""

    def __init__(self, settings: Settings, roots: Roots, model: SharedModel, metrics: Metrics, confirm: bool) -> None:
        self.settings, self.cfg = settings, settings.watch
        self.roots, self.model, self.metrics = roots, model, metrics
        self.coalescer: Coalescer = roots.coalescer
        self.schedule: Scheduler = roots.schedule
        self.confirm_deletes = confirm
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.overflow = threading.Event()
        self.phase = "starting"
        self.failed: BaseException | None = None
        self.resources: Resources | None = None
        self._ready_at: dict[str, float] = {}
        self._since_optimize = 0
        self.turn = threading.Lock()  # held by a batch or scan here, or by an index job of the daemon

    @contextmanager
    def _my_turn(self) -> Iterator[bool]:
        """Hold the ingest turn (waiting while an index job runs); False, without it, once the daemon stops."""
        while not self.turn.acquire(timeout=0.2):
            if self.stop.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self.turn.release()

    def res(self) -> Resources:
        if self.resources is None:
            raise RuntimeError("the daemon's resources are not made yet")
        return self.resources

    def run(self) -> None:
        try:
            self._startup()
            while not self.stop.is_set():
                try:
                    self._step()
                except StoreFullError as exc:  # keep running: wait for space, then a rescan finds what was missed
                    log.error("%s; waiting %g s, then rescanning", exc, DISK_FULL_PAUSE)
                    self.stop.wait(DISK_FULL_PAUSE)
                    self.overflow.set()
        except Exception as exc:
            self.failed = exc
            log.exception("the worker failed: stopping")
        finally:
            self.stop.set()

    def _startup(self) -> None:
        started = time.monotonic()
        clip = self.model.get()
        self.res().indexer.decoders()
        log.info(
            "model %s ready in %.1f s (batch %d)", self.model.model_id, time.monotonic() - started, clip.batch_size
        )
        self.phase = "reconciling"
        confirmed = frozenset(self.roots.roots) if self.confirm_deletes else frozenset()
        self._sync(self.roots.watched(), "start-up", confirmed, allow_empty=self.confirm_deletes)
        self.phase = "watching"
        self.schedule.rescan(time.monotonic())

    def _step(self) -> None:
        now = time.monotonic()
        self._maintain(now)
        self.coalescer.refresh(now)
        if self._batch_due(now):
            self._run_batch()
            return
        self.wake.wait(self._sleep_time(now))
        self.wake.clear()

    def _batch_due(self, now: float) -> bool:
        oldest = self.coalescer.oldest_ready()
        if oldest is None:
            return False
        return self.coalescer.ready_count() >= self._batch_size() or now - oldest >= self.cfg.max_wait

    def _sleep_time(self, now: float) -> float:
        timeout = 0.1 if self.coalescer.pending() else 0.5
        oldest = self.coalescer.oldest_ready()
        if oldest is not None:
            timeout = min(timeout, oldest + self.cfg.max_wait - now)
        return max(timeout, 0.002)

    def _batch_size(self) -> int:
        return self.model.get().batch_size

    def _run_batch(self) -> None:
        with self._my_turn() as mine:
            if not mine:
                return
            changes = self.coalescer.take(self._batch_size() * CHUNK_BATCHES)
            self._ready_at = {str(c.path): c.ready_at for c in changes}
            started = time.monotonic()
            result = self.res().indexer.apply_changes(changes, stop=self.stop.is_set, on_batch=self._on_batch)
            self._finish(result, frozenset(), started, what="events")
        s = result.summary
        if s.moved or s.removed or s.failed:
            log.info(
                "%d changes in %.2f s: " + COUNTS + ", %d failed",
                *(len(changes), time.monotonic() - started, s.indexed, s.unchanged, s.moved, s.removed, s.failed),
            )

    def _on_batch(self, batch: EmbeddedBatch) -> None:
        now = time.monotonic()
        waits = [now - self._ready_at[str(m.path)] for m in batch.metas if str(m.path) in self._ready_at]
        for wait in waits:
            self.metrics.latency.observe(wait)
        self.metrics.batch.observe(len(batch.metas))
        self.metrics.embed.observe(batch.seconds)
        self.metrics.indexed.inc(len(batch.metas))
        searchable = f", searchable {max(waits):.2f} s after complete" if waits else ""
        log.info(
            "batch: %d images embedded in %.2f s%s; %d waiting",
            *(len(batch.metas), batch.seconds, searchable, self.coalescer.pending()),
        )

    # -- scans ------------------------------------------------------------------------------------------------------

    def _sync(
        self, roots: Sequence[Path], reason: str, confirmed: frozenset[Path] = frozenset(), allow_empty: bool = False
    ) -> None:
        roots = [r for r in roots if root_state(r) != "missing"]
        if not roots:
            return
        with self._my_turn() as mine:
            if not mine:
                return
            self.metrics.rescans.labels(reason.split(":")[0]).inc()
            started = time.monotonic()
            self._ready_at = {}
            result = self.res().indexer.sync(
                roots, fresh_seconds=self.cfg.stable_seconds, stop=self.stop.is_set, on_batch=self._on_batch
            )
            self.metrics.seen.labels("scan").inc(result.summary.indexed + result.summary.unchanged)
            self.coalescer.add_unsettled(e.path for e in result.deferred)
            for root in roots:  # this scan's findings replace what was held for these roots
                self.res().guard.held.points.pop(root, None)
            what = f"{reason} scan of {len(roots)} root(s)"
            self._finish(result, confirmed, started, what=what, allow_empty=allow_empty)

    def _finish(
        self, result: SyncResult, confirmed: frozenset[Path], started: float, what: str, allow_empty: bool = False
    ) -> None:
        summary, res = result.summary, self.res()
        apply, held = res.guard.split(result.gone, time.monotonic(), confirmed, allow_empty)
        res.indexer.remove(apply, summary)
        self._hold(held)
        self.metrics.failed.inc(summary.failed)
        self.metrics.moved.inc(summary.moved)
        self.metrics.removed.inc(summary.removed)
        self._maybe_optimize(summary)
        if what != "events":
            s = summary
            log.info(
                "%s in %.1f s: " + COUNTS + ", %d held, %d failed",
                *(what, time.monotonic() - started, s.indexed, s.unchanged, s.moved, s.removed, held.total(), s.failed),
            )

    def _hold(self, held: Held) -> None:
        guard = self.res().guard
        for root, points in held.points.items():
            known = {p.path for p in guard.held.points.get(root, [])}
            guard.held.points.setdefault(root, []).extend(p for p in points if p.path not in known)
            guard.held.reasons[root] = held.reasons[root]
            log.warning(
                "holding %d deletions under %s: %s. They apply when a scan in %.0f s still finds the files gone "
                "(with the root present and not empty), or at a start with --confirm-deletes",
                *(len(points), root, held.reasons[root], self.cfg.confirm_delay),
            )
            if root_state(root) == "present":
                self.schedule.confirm(root, time.monotonic() + self.cfg.confirm_delay)
        self.metrics.held.set(guard.held.total())

    def _maybe_optimize(self, summary: RunSummary) -> None:
        self._since_optimize += summary.indexed + summary.moved
        threshold = max(1, self.settings.store.optimize_after)
        if self._since_optimize >= threshold and self.coalescer.ready_count() == 0:
            log.info("building the search index after %d new images", self._since_optimize)
            self.res().store.optimize()
            self._since_optimize = 0

    def _maintain(self, now: float) -> None:
        if self.schedule.roots_check_due(now):
            self.roots.check(self.res())
        if self.overflow.is_set() or self.coalescer.take_overflow():
            self.overflow.clear()
            self.schedule.overflowed(now)
        for scan in self.schedule.due(now):
            if self.stop.is_set():
                return
            self.schedule.take(scan, now)
            self._run_scan(scan)

    def _run_scan(self, scan: Scan) -> None:
        if scan.kind is ScanKind.PERIODIC:
            self._sync(self.roots.watched(), scan.kind.value)
            self.schedule.rescan(time.monotonic())
        elif scan.kind is ScanKind.OVERFLOW:
            self._sync(self.roots.watched(), scan.kind.value)
        elif scan.root is not None:
            confirmed = frozenset({scan.root}) if scan.kind is ScanKind.CONFIRM else frozenset()
            self._sync([scan.root], scan.kind.value, confirmed=confirmed)
