"""`Daemon` (``indexer watch``): keeps the store equal to the watched folders, forever, without losing a file, and
owns the store: its one HTTP app answers the CLI, Prometheus and (with ``--serve``) the page and the API.

    main thread      signals; starts everything; on SIGTERM/SIGINT stops within 10 s (exit 0)
    HTTP thread      the app (`indexer.api.routes.create_app` with this daemon as its owner), up before the store
                     opens, advertised in STORE/daemon.json so the CLI asks it instead of opening the store
    observer threads watchdog → Coalescer (indexer.sources.watch): per-path, debounced, bounded
    worker thread    `indexer.daemon.worker.Worker`: reconciliation, event batches, scans; roots (`roots.Roots`)
    index jobs       ``indexer index PATH`` asked of this daemon (`indexer.daemon.indexjobs`)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from indexer.daemon.client import ADVERT_FILE, advertise, find_daemon, remove_advert
from indexer.daemon.guard import DeletionGuard
from indexer.daemon.indexjobs import IndexJob, IndexJobs
from indexer.daemon.metrics import Metrics
from indexer.daemon.roots import Roots
from indexer.daemon.schedule import Scheduler
from indexer.daemon.sharedmodel import SharedModel
from indexer.daemon.worker import Resources, Worker
from indexer.errors import EXIT_ERROR, EXIT_OK, StoreBusyError
from indexer.formats import SUPPORTED_EXTENSIONS
from indexer.ingest.pipeline import Indexer, run_index
from indexer.records import RunSummary
from indexer.settings import Settings
from indexer.sources.events import Coalescer, FsEvent, default_filter
from indexer.sources.watch import Watcher, check_watch_roots
from indexer.store.directory import STORE_FILE
from indexer.store.factory import open_store_from_settings, separate_process_wanted
from indexer.store.locked import LockedStore

log = logging.getLogger(__name__)

STOP_GRACE = 8.0  # seconds the in-flight batch gets on SIGTERM before the daemon exits anyway (kill -9 safe)
OPEN_RETRY = 1.0  # seconds between attempts to open a store another process holds briefly
OPEN_PATIENCE = 120.0  # seconds of such attempts before giving up (a holder that long is not brief)


class Daemon:
    """``indexer watch``: construct, then ``run()`` in the main thread; ``request_stop()`` from a signal handler.

    serve: True serves the page and the API on serve.host:serve.port (``--serve``); False only /healthz,
    /metrics and the control routes, on watch.control_host:watch.control_port."""

    def __init__(
        self, settings: Settings, roots: Sequence[str | Path], *, confirm_deletes: bool = False, serve: bool = False
    ) -> None:
        self.settings, self.cfg, self.serve_page = settings, settings.watch, serve
        self.model = SharedModel(settings.model)
        self.metrics = Metrics()
        coalescer = Coalescer(
            stable_seconds=self.cfg.stable_seconds,
            unclosed_timeout=self.cfg.unclosed_timeout,
            capacity=self.cfg.queue_size,
        )
        self.metrics.queue.set_function(coalescer.pending)
        self.roots = Roots(check_watch_roots(roots), Scheduler(self.cfg.rescan_interval), coalescer)
        self.worker = Worker(settings, self.roots, self.model, self.metrics, confirm_deletes)
        self.store = LockedStore(
            lambda: open_store_from_settings(settings, separate_process=separate_process_wanted(settings)),
            location=str(settings.store.dir),
            opened=False,
        )
        self.jobs = IndexJobs(self._index_job)
        self.listener: Any = None
        self._signals = 0

    # -- lifecycle (main thread) ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; 0 on a clean stop, 2 when the worker failed."""
        try:
            try:
                self._open()
            except BaseException:
                if self.listener is not None:
                    self.listener.stop()
                raise
            worker = threading.Thread(target=self.worker.run, name="indexer-worker", daemon=True)
            worker.start()
            while not self.worker.stop.wait(0.5) and worker.is_alive():
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
        self.worker.stop.set()
        self.worker.wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon cleanly (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _open(self) -> None:
        """The HTTP app and the advert first, then the store: a CLI finding the advert asks this daemon instead of
        opening the store (a second opener disturbs the holder), so the advert goes out as early as the store
        directory allows (it must be a store already: a foreign file would make a new one look like no store)."""
        advert = self._advert_path()
        if advert is not None and (other := find_daemon(advert.parent)) is not None:
            raise StoreBusyError(advert.parent, f"`indexer watch` or `indexer serve` owns it already, at {other}")
        from indexer.daemon.http import start_owner_app

        # torch's thread count is the process's: the app's engine thread must not set it (serve.threads) under
        # the worker, whose batches use every core.
        app_settings = self.settings.model_copy(update={"serve": self.settings.serve.model_copy(update={"threads": 0})})
        self.listener = start_owner_app(app_settings, self.store, self.model, self, page=self.serve_page)
        early = advert is not None and (advert.parent / STORE_FILE).is_file()
        if early:
            self._advertise()
        self._open_store()
        self.worker.resources = self._make_resources()
        if not early:
            self._advertise()
        what = "the page, the API and " if self.serve_page else ""
        log.info("serving %s/healthz, /metrics at %s", what, self.listener.url)
        self.roots.check(self.worker.res(), initial=True)  # watching starts before the reconciliation

    def _open_store(self) -> None:
        """Open the store; while another process holds it briefly (an `indexer status` of an older version, a
        stray opener), wait and retry, saying so, for up to OPEN_PATIENCE seconds."""
        deadline = time.monotonic() + OPEN_PATIENCE
        while True:
            try:
                self.store.open()
                break
            except StoreBusyError as exc:
                if time.monotonic() > deadline or self.worker.stop.is_set():
                    raise
                log.warning("%s: waiting for it, retrying in %g s", exc, OPEN_RETRY)
                self.worker.stop.wait(OPEN_RETRY)
        self.store.ensure_collection(self.model.model_id, self.model.dim)

    def _make_resources(self) -> Resources:
        watcher = Watcher(
            self._on_event,
            lambda root: default_filter(root, SUPPORTED_EXTENSIONS, self.settings.index.include_hidden),
            poll=self.cfg.poll,
            poll_interval=self.cfg.poll_interval,
            on_overflow=self.worker.overflow.set,
        )
        guard = DeletionGuard(self.roots.roots, self.cfg.mass_delete_fraction, self.cfg.mass_delete_min, self.store)
        indexer = Indexer(self.settings, self.store, self.model)
        return Resources(store=self.store, guard=guard, indexer=indexer, watcher=watcher)

    def _shutdown(self, worker: threading.Thread) -> int:
        deadline = time.monotonic() + STOP_GRACE
        self.worker.stop.set()
        self.worker.wake.set()
        if self.worker.resources is not None:
            self.worker.resources.watcher.close()
        worker.join(max(0.0, deadline - time.monotonic()))
        # an index job running stops after its batch in flight; holding the turn, no other starts. Only then may the
        # store and the model close: a job's calls would otherwise meet them closed (the store reopening itself),
        # and its decode workers would keep the process from exiting
        job_stopped = self.worker.turn.acquire(timeout=max(0.0, deadline - time.monotonic()))
        if self.listener is not None:
            self.listener.stop()
        if worker.is_alive() or not job_stopped:
            return self._abandon()
        self._remove_advert()
        if self.worker.resources is not None:
            self.worker.resources.close(self.model)
        else:
            self.model.close()
        if self.worker.failed is not None:
            return EXIT_ERROR
        log.info("stopped cleanly")
        return EXIT_OK

    def _abandon(self) -> int:
        """The in-flight work did not finish in time: make what is stored durable and leave (kill -9 safe)."""
        log.warning("the batch in flight did not finish within %.0f s: exiting; the next start reconciles", STOP_GRACE)
        self._remove_advert()
        try:
            self.store.flush()
        finally:
            os._exit(EXIT_OK)

    # -- the advert -------------------------------------------------------------------------------------------------

    def _advert_path(self) -> Path | None:
        return None if self.settings.store.qdrant_url else self.settings.store.dir / ADVERT_FILE

    def _advertise(self) -> None:
        path = self._advert_path()
        if path is not None:
            advertise(path, self.listener.url, self.roots.roots, kind="watch", page=self.serve_page)

    def _remove_advert(self) -> None:
        path = self._advert_path()
        if path is not None:
            remove_advert(path)

    # -- events (observer threads) and index jobs ---------------------------------------------------------------------

    def _on_event(self, event: FsEvent) -> None:
        coalescer = self.roots.coalescer
        seen = coalescer.seen
        coalescer.feed(event)
        if coalescer.seen > seen:
            self.metrics.seen.labels("event").inc()
        self.worker.wake.set()

    def _index_job(self, paths: Sequence[Path], job: IndexJob) -> RunSummary:
        """An `indexer index` asked of the daemon: it runs in the worker's ingest turn, between its batches and scans
        (run beside them, both would plan the same new files and embed them twice, with two decode pools)."""
        job.start(0, "waiting for the daemon's batch in flight")
        stopping = self.worker.stop.is_set
        with self.worker.turn:
            if stopping():  # the daemon is stopping: nothing was done (the command goes on by itself once it is gone)
                return RunSummary(interrupted=True)
            return run_index(paths, self.settings, self.store, self.model, job, stop=stopping)

    # -- what the HTTP app asks (the `indexer.api.control.Owner` protocol) -------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz."""
        w = self.worker
        alive = w.failed is None and not (w.phase != "starting" and w.stop.is_set())
        body = {
            "status": "ok" if alive else "failing",
            "phase": w.phase,
            "pid": os.getpid(),
            "roots": self.roots.states(),
            "queue": self.roots.coalescer.pending(),
            "held_deletions": w.resources.guard.held.total() if w.resources else 0,
        }
        return (200 if alive else 503), body

    def describe(self) -> dict[str, Any]:
        """What `indexer status` adds about this daemon."""
        _, health = self.health()
        return {"daemon": {**health, "url": self.listener.url if self.listener else None}}

    def metrics_text(self) -> bytes:
        return self.metrics.render()[0]
