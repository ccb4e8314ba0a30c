"""The watch loop: `Daemon` keeps the store equal to the watched folders, forever, without losing a file.

    main thread      signals; starts everything; on SIGTERM/SIGINT stops within 10 s (exit 0)
    observer threads watchdog → Coalescer (indexer.sources.watch): per-path, debounced, bounded
    worker thread    start-up reconciliation, then: refresh the coalescer, run a batch when it is full or when the
                     oldest complete file has waited ``max_wait``; the scans the Scheduler says are due; root checks
                     every second
    control server   `indexer.daemon.control`, in its own threads

Every write goes through one `indexer.ingest.pipeline.Indexer`; the deletions it returns pass the DeletionGuard first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from indexer.daemon.client import ADVERT_FILE, advertise, find_daemon, query_from_json, remove_advert
from indexer.daemon.control import ControlServer
from indexer.daemon.guard import DeletionGuard, Held, root_identity, root_state
from indexer.daemon.metrics import Metrics
from indexer.daemon.schedule import Scan, ScanKind, Scheduler
from indexer.daemon.shared import LockedStore, SharedModel
from indexer.errors import StoreBusyError, StoreError, StoreFullError
from indexer.formats import SUPPORTED_EXTENSIONS
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.pipeline import Indexer, SyncResult, store_from_settings
from indexer.records import Hit, RunSummary, SearchFilter
from indexer.settings import Settings
from indexer.sources.events import Coalescer, FileChange, FsEvent, default_filter
from indexer.sources.watch import Watcher, check_watch_roots
from indexer.store.directory import STORE_FILE
from indexer.store.status import store_status

log = logging.getLogger(__name__)

STORE_WAIT = 60.0  # seconds a control request waits for the store during start-up
STOP_GRACE = 8.0  # seconds the in-flight batch gets on SIGTERM before the daemon exits anyway (kill -9 safe)
CHUNK_BATCHES = 4  # a burst is fed to the decoder this many batches at a time (decode overlaps inference)
DISK_FULL_PAUSE = 5.0  # seconds the worker waits after a write refused for want of space (store.min_free_mb)
EXIT_OK, EXIT_ERROR = 0, 2


@dataclass
class Resources:
    """What the daemon opens once its control server is up, made together: the store (shared with the control
    server), the deletion guard over it, the Indexer writing to it, and the watcher."""

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


@dataclass
class _RootInfo:
    state: str = "missing"
    identity: tuple[int, int] | None = None
    watched: bool = False
    mode: str = ""


class Daemon:
    """``indexer watch``: construct, then ``run()`` in the main thread; ``request_stop()`` from a signal handler."""

    def __init__(self, settings: Settings, roots: Sequence[str | Path], *, confirm_deletes: bool = False) -> None:
        self.settings = settings
        self.cfg = settings.watch
        self.roots = check_watch_roots(roots)
        self.confirm_deletes = confirm_deletes
        self.model = SharedModel(settings.model)
        self.metrics = Metrics()
        self.coalescer = Coalescer(
            stable_seconds=self.cfg.stable_seconds,
            unclosed_timeout=self.cfg.unclosed_timeout,
            capacity=self.cfg.queue_size,
        )
        self.metrics.queue.set_function(self.coalescer.pending)
        self._stop = threading.Event()
        self._store_ready = threading.Event()
        self._wake = threading.Event()
        self._signals = 0
        self._overflow = threading.Event()
        self._info = {root: _RootInfo() for root in self.roots}
        self.schedule = Scheduler(self.cfg.rescan_interval)
        self._ready_at: dict[str, float] = {}
        self._phase = "starting"
        self._failed: BaseException | None = None
        self._since_optimize = 0
        self.resources: Resources | None = None
        self.server: ControlServer | None = None

    # -- lifecycle (main thread) ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; 0 on a clean stop, 2 when the worker failed."""
        try:
            try:
                self._open()
            except BaseException:
                if self.server is not None:
                    self.server.stop()
                raise
            worker = threading.Thread(target=self._work, name="indexer-worker", daemon=True)
            worker.start()
            while not self._stop.wait(0.5) and worker.is_alive():
                pass
            return self._shutdown(worker)
        finally:
            self._remove_advert()

    def request_stop(self) -> None:
        """Ask the daemon to stop (safe from a signal handler); a second request exits at once."""
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop request: exiting now (the next start reconciles)")
            os._exit(EXIT_OK)
        log.info("stopping: finishing the batch in flight")
        self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon cleanly (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _open(self) -> None:
        """Control server and advert first, then the store: a CLI finding the advert asks this daemon instead of
        opening the store (a second opener disturbs the holder), so the advert goes out as early as the store
        directory allows (it must be a store already: a foreign file would make a new one look like no store)."""
        advert = self._advert_path()
        if advert is not None and (other := find_daemon(advert.parent)) is not None:
            raise StoreBusyError(advert.parent, f"`indexer watch` is running on it already, at {other}")
        self.server = ControlServer(self, self.cfg.control_host, self.cfg.control_port)
        self.server.start()
        early = advert is not None and (advert.parent / STORE_FILE).is_file()
        if early:
            self._advertise(self.server.url)
        self.resources = self._make_resources()
        self._store_ready.set()
        if not early:
            self._advertise(self.server.url)
        log.info("control endpoint %s (/healthz, /metrics)", self.server.url)
        self._check_roots(initial=True)  # watching starts before the reconciliation: nothing falls in between

    def _make_resources(self) -> Resources:
        store = LockedStore(lambda: store_from_settings(self.settings))
        store.ensure_collection(self.model.model_id, self.model.dim)
        watcher = Watcher(
            self._on_event,
            lambda root: default_filter(root, SUPPORTED_EXTENSIONS, self.settings.index.include_hidden),
            poll=self.cfg.poll,
            poll_interval=self.cfg.poll_interval,
            on_overflow=self._overflow.set,
        )
        return Resources(
            store=store,
            guard=DeletionGuard(self.roots, self.cfg.mass_delete_fraction, self.cfg.mass_delete_min, store),
            indexer=Indexer(self.settings, store, self.model),
            watcher=watcher,
        )

    def _shutdown(self, worker: threading.Thread) -> int:
        deadline = time.monotonic() + STOP_GRACE
        self._stop.set()
        self._wake.set()
        if self.resources is not None:
            self.resources.watcher.close()
        worker.join(max(0.0, deadline - time.monotonic()))
        if self.server is not None:
            self.server.stop()
        if worker.is_alive():
            return self._abandon()
        self._close_resources()
        if self._failed is not None:
            return EXIT_ERROR
        log.info("stopped cleanly")
        return EXIT_OK

    def _abandon(self) -> int:
        """The in-flight work did not finish in time: make what is stored durable and leave (kill -9 safe)."""
        log.warning("the batch in flight did not finish within %.0f s: exiting; the next start reconciles", STOP_GRACE)
        self._remove_advert()
        try:
            self._res().store.flush()
        finally:
            os._exit(EXIT_OK)

    def _close_resources(self) -> None:
        self._remove_advert()
        if self.resources is not None:
            self.resources.close(self.model)
        else:
            self.model.close()

    def _res(self) -> Resources:
        if self.resources is None:
            raise StoreError("the daemon's store is not open")
        return self.resources

    # -- advertising the control address -------------------------------------------------------------------------------

    def _advert_path(self) -> Path | None:
        return None if self.settings.store.qdrant_url else self.settings.store.dir / ADVERT_FILE

    def _advertise(self, url: str) -> None:
        path = self._advert_path()
        if path is not None:
            advertise(path, url, self.roots)

    def _remove_advert(self) -> None:
        path = self._advert_path()
        if path is not None:
            remove_advert(path)

    # -- events (observer threads) ------------------------------------------------------------------------------------

    def _on_event(self, event: FsEvent) -> None:
        seen = self.coalescer.seen
        self.coalescer.feed(event)
        if self.coalescer.seen > seen:
            self.metrics.seen.labels("event").inc()
        self._wake.set()

    # -- the worker thread ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._startup()
            while not self._stop.is_set():
                try:
                    self._step()
                except StoreFullError as exc:  # keep running: wait for space, then a rescan finds what was missed
                    log.error("%s; waiting %g s, then rescanning", exc, DISK_FULL_PAUSE)
                    self._stop.wait(DISK_FULL_PAUSE)
                    self._overflow.set()
        except Exception as exc:
            self._failed = exc
            log.exception("the worker failed: stopping")
        finally:
            self._stop.set()

    def _startup(self) -> None:
        started = time.monotonic()
        clip = self.model.get()
        self._res().indexer.decoders()
        log.info(
            "model %s ready in %.1f s (batch %d)", self.model.model_id, time.monotonic() - started, clip.batch_size
        )
        self._phase = "reconciling"
        present = [r for r in self.roots if self._info[r].watched]
        confirmed = frozenset(self.roots) if self.confirm_deletes else frozenset()
        self._sync(present, "start-up", confirmed, allow_empty=self.confirm_deletes)
        self._phase = "watching"
        self.schedule.rescan(time.monotonic())

    def _step(self) -> None:
        now = time.monotonic()
        self._maintain(now)
        self.coalescer.refresh(now)
        if self._batch_due(now):
            self._run_batch()
            return
        self._wake.wait(self._sleep_time(now))
        self._wake.clear()

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
        changes = self.coalescer.take(self._batch_size() * CHUNK_BATCHES)
        self._ready_at = {str(c.path): c.ready_at for c in changes}
        started = time.monotonic()
        result = self._res().indexer.apply_changes(changes, stop=self._stop.is_set, on_batch=self._on_batch)
        self._finish(result, frozenset(), started, what="events")
        self._log_changes(changes, result.summary, started)

    def _on_batch(self, batch: EmbeddedBatch) -> None:
        now = time.monotonic()
        waits = [now - self._ready_at[str(m.path)] for m in batch.metas if str(m.path) in self._ready_at]
        for wait in waits:
            self.metrics.latency.observe(wait)
        self.metrics.batch.observe(len(batch.metas))
        self.metrics.embed.observe(batch.seconds)
        self.metrics.indexed.inc(len(batch.metas))
        log.info(
            "batch: %d images embedded in %.2f s%s; %d waiting",
            len(batch.metas),
            batch.seconds,
            f", searchable {max(waits):.2f} s after complete" if waits else "",
            self.coalescer.pending(),
        )

    def _log_changes(self, changes: Sequence[FileChange], summary: RunSummary, started: float) -> None:
        if summary.moved or summary.removed or summary.failed:
            log.info(
                "%d changes in %.2f s: %d indexed, %d moved, %d removed, %d unchanged, %d failed",
                len(changes),
                time.monotonic() - started,
                summary.indexed,
                summary.moved,
                summary.removed,
                summary.unchanged,
                summary.failed,
            )

    # -- scans ------------------------------------------------------------------------------------------------------

    def _sync(
        self, roots: Sequence[Path], reason: str, confirmed: frozenset[Path] = frozenset(), allow_empty: bool = False
    ) -> None:
        roots = [r for r in roots if root_state(r) != "missing"]
        if not roots:
            return
        self.metrics.rescans.labels(reason.split(":")[0]).inc()
        started = time.monotonic()
        self._ready_at = {}
        result = self._res().indexer.sync(
            roots, fresh_seconds=self.cfg.stable_seconds, stop=self._stop.is_set, on_batch=self._on_batch
        )
        self.metrics.seen.labels("scan").inc(result.summary.indexed + result.summary.unchanged)
        self.coalescer.add_unsettled(e.path for e in result.deferred)
        for root in roots:  # this scan's findings replace what was held for these roots
            self._res().guard.held.points.pop(root, None)
        what = f"{reason} scan of {len(roots)} root(s)"
        self._finish(result, confirmed, started, what=what, allow_empty=allow_empty)

    def _finish(
        self,
        result: SyncResult,
        confirmed: frozenset[Path],
        started: float,
        what: str,
        allow_empty: bool = False,
    ) -> None:
        summary = result.summary
        res = self._res()
        apply, held = res.guard.split(result.gone, time.monotonic(), confirmed, allow_empty)
        res.indexer.remove(apply, summary)
        self._hold(held)
        self.metrics.failed.inc(summary.failed)
        self.metrics.moved.inc(summary.moved)
        self.metrics.removed.inc(summary.removed)
        self._maybe_optimize(summary)
        if what != "events":
            log.info(
                "%s in %.1f s: %d indexed, %d unchanged, %d moved, %d removed, %d held, %d failed",
                what,
                time.monotonic() - started,
                summary.indexed,
                summary.unchanged,
                summary.moved,
                summary.removed,
                held.total(),
                summary.failed,
            )

    def _hold(self, held: Held) -> None:
        guard = self._res().guard
        for root, points in held.points.items():
            known = {p.path for p in guard.held.points.get(root, [])}
            guard.held.points.setdefault(root, []).extend(p for p in points if p.path not in known)
            guard.held.reasons[root] = held.reasons[root]
            log.warning(
                "holding %d deletions under %s: %s. They apply when a scan in %.0f s still finds the files gone "
                "(with the root present and not empty), or at a start with --confirm-deletes",
                len(points),
                root,
                held.reasons[root],
                self.cfg.confirm_delay,
            )
            if root_state(root) == "present":
                self.schedule.confirm(root, time.monotonic() + self.cfg.confirm_delay)
        self.metrics.held.set(guard.held.total())

    def _maybe_optimize(self, summary: RunSummary) -> None:
        self._since_optimize += summary.indexed + summary.moved
        threshold = max(1, self.settings.store.optimize_after)
        if self._since_optimize >= threshold and self.coalescer.ready_count() == 0:
            log.info("building the search index after %d new images", self._since_optimize)
            self._res().store.optimize()
            self._since_optimize = 0

    def _maintain(self, now: float) -> None:
        if self.schedule.roots_check_due(now):
            self._check_roots()
        if self._overflow.is_set() or self.coalescer.take_overflow():
            self._overflow.clear()
            self.schedule.overflowed(now)
        for scan in self.schedule.due(now):
            if self._stop.is_set():
                return
            self.schedule.take(scan, now)
            self._run_scan(scan)

    def _run_scan(self, scan: Scan) -> None:
        if scan.kind is ScanKind.PERIODIC:
            self._sync(self._watched(), scan.kind.value)
            self.schedule.rescan(time.monotonic())
        elif scan.kind is ScanKind.OVERFLOW:
            self._sync(self._watched(), scan.kind.value)
        elif scan.root is not None:
            confirmed = frozenset({scan.root}) if scan.kind is ScanKind.CONFIRM else frozenset()
            self._sync([scan.root], scan.kind.value, confirmed=confirmed)

    def _watched(self) -> list[Path]:
        return [r for r in self.roots if self._info[r].watched]

    # -- roots coming and going ----------------------------------------------------------------------------------------

    def _check_roots(self, initial: bool = False) -> None:
        for root in self.roots:
            info = self._info[root]
            state, identity = root_state(root), root_identity(root)
            if state == "missing":
                if info.watched or initial:
                    self._root_lost(root, info, initial)
            elif not info.watched or identity != info.identity:
                self._root_back(root, info, identity, initial)
            elif state == "empty" and info.state == "present":
                log.warning("%s is empty now (an unmounted share?): no entry under it is deleted", root)
            elif state == "present" and info.state == "empty" and root in self._res().guard.held.points:
                self.schedule.root_back(root, time.monotonic())  # filled again: settle what was held
            info.state = state

    def _root_lost(self, root: Path, info: _RootInfo, initial: bool) -> None:
        res = self._res()
        res.watcher.stop(root)
        info.watched, info.identity, info.mode = False, None, ""
        dropped = self.coalescer.forget_under(root)
        count = res.store.count(SearchFilter(path_prefix=str(root)))
        log.warning(
            "%s is missing (unmounted or moved?): its %d entries are kept%s; watching resumes when it is back",
            root,
            count,
            f", {dropped} pending events dropped" if dropped else "",
        )

    def _root_back(self, root: Path, info: _RootInfo, identity: tuple[int, int] | None, initial: bool) -> None:
        was_known = info.identity is not None
        info.mode = self._res().watcher.start(root)
        info.watched, info.identity = True, identity
        if not initial:
            log.info("%s is %s: rescanning it", root, "back" if not was_known else "remounted or replaced")
            self.schedule.root_back(root, time.monotonic())

    # -- what the control server asks ----------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz."""
        alive = self._failed is None and not (self._phase != "starting" and self._stop.is_set())
        roots = {str(r): (self._info[r].mode or self._info[r].state) for r in self.roots}
        body = {
            "status": "ok" if alive else "failing",
            "phase": self._phase,
            "pid": os.getpid(),
            "roots": roots,
            "queue": self.coalescer.pending(),
            "held_deletions": self.resources.guard.held.total() if self.resources else 0,
        }
        return (200 if alive else 503), body

    def _ready_store(self) -> LockedStore:
        """The store, once open (a request during start-up waits for it)."""
        if not self._store_ready.wait(STORE_WAIT):
            raise StoreError("the watch daemon is still opening its store: try again")
        return self._res().store

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition text and its content type."""
        return self.metrics.render()

    def body_limit(self) -> int:
        """The largest request body the control server reads (serve.max_upload_mb, as the service)."""
        return int(self.settings.serve.max_upload_mb * 1024 * 1024)

    def status(self, failures: int) -> dict[str, Any]:
        """What ``indexer status`` prints, plus the daemon's own state."""
        store = self._ready_store()
        _, health = self.health()
        return {**store_status(store, failures), "daemon": {**health, "url": self.server.url if self.server else None}}

    def search(self, request: dict[str, Any]) -> list[Hit]:
        """A search asked by ``indexer search`` (same model required)."""
        from indexer.search import search

        model_id = request.get("model")
        if model_id != self.model.model_id:
            raise StoreError(
                f"the daemon holding this store runs model {self.model.model_id!r}, not {model_id!r}: "
                "search with the daemon's model"
            )
        return search(self._ready_store(), self.model, query_from_json(request))
