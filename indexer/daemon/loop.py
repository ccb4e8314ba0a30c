"""The watch daemon: keeps the store equal to the watched folders, forever, without losing a file.

    main thread      signals; starts everything; on SIGTERM/SIGINT stops within 10 s (exit 0)
    observer threads watchdog → Coalescer (indexer.watch): per-path, debounced, bounded
    worker thread    start-up reconciliation, then: refresh the coalescer, run a batch when it is full or when the
                     oldest complete file has waited ``max_wait``; rescans (periodic, on overflow, when a root comes
                     back, to confirm held deletions); root checks every second
    control server   /healthz, /metrics (Prometheus), /status and /search for the CLI while the daemon holds the
                     embedded store; its address is advertised in ``STORE/daemon.json`` ({"url", "pid"})

Never wipe on an outage: deletions apply only while their root is present and not empty, and more than
``mass_delete_fraction`` of a root's entries (and more than ``mass_delete_min``) within a minute are held and logged
until a scan ``confirm_delay`` later still finds the files gone (or ``--confirm-deletes`` at start-up).

The store and the model are shared between the worker and the control server's threads through small locking
wrappers (the model is not thread-safe; the store's failure log is plain Python).

This module also holds the client side (``search_via_daemon``, ``status_via_daemon``), used by ``indexer search``
and ``indexer status`` when the embedded store is held by a running daemon.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import numpy.typing as npt

from indexer import pipeline
from indexer.decode import SUPPORTED_EXTENSIONS
from indexer.embed import EmbeddedBatch
from indexer.errors import ConfigError, IndexerError, ModelMismatchError, StoreBusyError, StoreError
from indexer.model import ClipModel, LazyModel
from indexer.records import Failure, Hit, RunSummary, SearchFilter, StoredPoint
from indexer.settings import ModelSettings, Settings
from indexer.store import STORE_FILE, FailureRecord, VectorStore, atomic_write_json
from indexer.watch import Coalescer, FileChange, FsEvent, Watcher, check_watch_roots, default_filter

log = logging.getLogger(__name__)
T = TypeVar("T")

ADVERT_FILE = "daemon.json"
STORE_WAIT = 60.0  # seconds a control request waits for the store during start-up
STOP_GRACE = 8.0  # seconds the in-flight batch gets on SIGTERM before the daemon exits anyway (kill -9 safe)
ROOT_CHECK_EVERY = 1.0
MASS_WINDOW = 60.0  # deletions of one root within this many seconds count together
OVERFLOW_RESCAN_GAP = 5.0
CHUNK_BATCHES = 4  # a burst is fed to the decoder this many batches at a time (decode overlaps inference)
EXIT_OK, EXIT_ERROR = 0, 2


# --- shared resources, made thread-safe ------------------------------------------------------------------------------


class LockedStore:
    """A VectorStore shared by the worker and the control server: every call holds one lock.

    An unexpected store failure closes the store, opens it again and retries the call once: Qdrant Edge (beta) can
    leave its holder's payload storage unflushable when another process tries to open the same directory, and
    reopening (WAL replay) recovers it. The daemon runs forever; it must survive a stray ``indexer index``.
    """

    def __init__(self, open_store: Callable[[], VectorStore]) -> None:
        self._open_store = open_store
        self.inner = open_store()
        self.location = self.inner.location
        self.lock = threading.RLock()
        self.reopened = 0

    def _call(self, call: Callable[[VectorStore], T]) -> T:
        with self.lock:
            try:
                return call(self.inner)
            except (StoreBusyError, ModelMismatchError):
                raise
            except StoreError as exc:
                log.warning("the store failed (%s): opening it again and retrying once", exc)
                self._reopen()
                return call(self.inner)

    def _reopen(self) -> None:
        try:
            self.inner.close()
        except Exception:  # it is broken already: what matters is the fresh one
            log.debug("closing the failed store raised", exc_info=True)
        self.inner = self._open_store()
        self.reopened += 1

    def model_info(self) -> tuple[str, int] | None:
        return self._call(lambda s: s.model_info())

    def ensure_collection(self, model_id: str, dim: int) -> None:
        self._call(lambda s: s.ensure_collection(model_id, dim))

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        self._call(lambda s: s.upsert(points))

    def delete(self, ids: Sequence[str]) -> None:
        self._call(lambda s: s.delete(ids))

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        self._call(lambda s: s.set_payload(ids, payload))

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        return self._call(lambda s: s.retrieve(ids, with_vectors))

    def scroll(
        self, *, filter: SearchFilter | None = None, with_vectors: bool = False, batch_size: int = 1000
    ) -> Iterator[StoredPoint]:
        with self.lock:
            points = self.inner.scroll(filter=filter, with_vectors=with_vectors, batch_size=batch_size)
        while True:  # the lock is held per point, never across the caller's work
            with self.lock:
                point = next(points, None)
            if point is None:
                return
            yield point

    def query(
        self,
        vector: npt.NDArray[np.float32],
        *,
        limit: int = 10,
        offset: int = 0,
        threshold: float | None = None,
        filter: SearchFilter | None = None,
    ) -> list[Hit]:
        return self._call(lambda s: s.query(vector, limit=limit, offset=offset, threshold=threshold, filter=filter))

    def count(self, filter: SearchFilter | None = None) -> int:
        return self._call(lambda s: s.count(filter))

    def find_by_sha256(self, sha256s: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        return self._call(lambda s: s.find_by_sha256(sha256s, with_vectors))

    def record_failures(self, failures: Sequence[Failure]) -> None:
        self._call(lambda s: s.record_failures(failures))

    def clear_failures(self, paths: Sequence[str]) -> None:
        self._call(lambda s: s.clear_failures(paths))

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        return self._call(lambda s: s.failures(limit))

    def failure_count(self) -> int:
        return self._call(lambda s: s.failure_count())

    def optimize(self) -> None:
        self._call(lambda s: s.optimize())

    def flush(self) -> None:
        self._call(lambda s: s.flush())

    def close(self) -> None:
        with self.lock:
            self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _LockedClip(ClipModel):
    """The same loaded model, its encode calls serialised by a lock (ClipModel is one-caller-at-a-time)."""

    def __init__(self, inner: ClipModel, lock: threading.RLock) -> None:
        self.__dict__.update(inner.__dict__)
        self._lock = lock

    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        with self._lock:
            return super().encode_pixels(pixels)

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        with self._lock:
            return super().encode_texts(texts)


class SharedModel(LazyModel):
    """A LazyModel safe to share between the worker and the control server: loads once, encodes one at a time."""

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.lock = threading.RLock()
        self._shared: ClipModel | None = None

    def get(self) -> ClipModel:
        with self.lock:
            if self._shared is None:
                self._shared = _LockedClip(super().get(), self.lock)
            return self._shared

    def close(self) -> None:
        with self.lock:
            self._shared = None
            super().close()


# --- metrics ---------------------------------------------------------------------------------------------------------


class Metrics:
    """The daemon's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.seen = Counter("indexer_watch_files_seen", "Files seen, by events or scans", ["source"], registry=r)
        self.indexed = Counter("indexer_watch_files_indexed", "Files embedded and stored", registry=r)
        self.failed = Counter("indexer_watch_files_failed", "Files skipped because they cannot be read", registry=r)
        self.moved = Counter("indexer_watch_files_moved", "Files moved, vectors kept", registry=r)
        self.removed = Counter("indexer_watch_files_removed", "Points removed, their files gone", registry=r)
        self.rescans = Counter("indexer_watch_rescans", "Scans of the roots", ["reason"], registry=r)
        self.queue = Gauge("indexer_watch_queue_depth", "Files waiting (not complete yet, or for a batch)", registry=r)
        self.held = Gauge("indexer_watch_deletions_held", "Deletions held (mass deletion, root missing)", registry=r)
        self.batch = Histogram(
            "indexer_watch_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )  # fmt: skip
        self.embed = Histogram("indexer_watch_embed_seconds", "Model time per batch", registry=r)
        self.latency = Histogram(
            "indexer_watch_complete_to_searchable_seconds",
            "From a file being complete (closed, renamed in, stable) to it being searchable",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300),
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- roots and the deletion policy ------------------------------------------------------------------------------------


def root_state(root: Path) -> str:
    """ "present", "empty" (an unmounted share looks like this) or "missing"."""
    try:
        with os.scandir(root) as entries:
            return "present" if next(entries, None) is not None else "empty"
    except OSError:
        return "missing"


def root_identity(root: Path) -> tuple[int, int] | None:
    """(device, inode) of a root: a mount or unmount changes it."""
    try:
        st = root.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def root_of(path: str, roots: Sequence[Path]) -> Path | None:
    """The root a stored path belongs to (the deepest one)."""
    candidates = [r for r in roots if path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep)]
    return max(candidates, key=lambda r: len(str(r)), default=None)


@dataclass
class Held:
    """Deletions not applied, per root, and why."""

    points: dict[Path, list[StoredPoint]] = field(default_factory=dict)
    reasons: dict[Path, str] = field(default_factory=dict)

    def total(self) -> int:
        return sum(len(p) for p in self.points.values())


class DeletionGuard:
    """Decides which deletions apply: never under a missing or empty root; a mass deletion is held."""

    def __init__(self, roots: Sequence[Path], fraction: float, minimum: int, store: VectorStore) -> None:
        self.roots, self.fraction, self.minimum, self.store = list(roots), fraction, minimum, store
        self.held = Held()
        self._recent: dict[Path, deque[tuple[float, int]]] = {}

    def split(
        self,
        gone: dict[str, StoredPoint],
        now: float,
        confirmed: frozenset[Path] = frozenset(),
        allow_empty: bool = False,
    ) -> tuple[list[StoredPoint], Held]:
        """(points to remove now, points held per root). ``confirmed`` roots may lose any share of their entries
        (a confirming scan, ``--confirm-deletes``); none is ever removed while its root is missing, nor while it is
        empty unless ``allow_empty`` (``--confirm-deletes`` only)."""
        apply: list[StoredPoint] = []
        held = Held()
        for root, points in self._by_root(gone).items():
            reason = self._hold_reason(root, len(points), now, root in confirmed, allow_empty)
            if reason is None:
                apply.extend(points)
                self._recent.setdefault(root, deque()).append((now, len(points)))
            else:
                held.points[root], held.reasons[root] = points, reason
        return apply, held

    def _by_root(self, gone: dict[str, StoredPoint]) -> dict[Path, list[StoredPoint]]:
        grouped: dict[Path, list[StoredPoint]] = {}
        for path, point in gone.items():
            root = root_of(path, self.roots)
            if root is not None:  # a point outside every root is none of the daemon's business
                grouped.setdefault(root, []).append(point)
        return grouped

    def _hold_reason(self, root: Path, count: int, now: float, confirmed: bool, allow_empty: bool) -> str | None:
        state = root_state(root)
        if state == "missing" or (state == "empty" and not allow_empty):
            return f"the root is {state} (unmounted?)"
        if confirmed:
            return None
        recent = self._recent_count(root, now)
        before = self.store.count(SearchFilter(path_prefix=str(root))) + recent
        total = count + recent
        if total > self.minimum and total > self.fraction * before:
            return f"mass deletion: {total} of {before} entries ({total / max(before, 1):.0%})"
        return None

    def _recent_count(self, root: Path, now: float) -> int:
        recent = self._recent.get(root)
        while recent and now - recent[0][0] > MASS_WINDOW:
            recent.popleft()
        return sum(n for _, n in recent or ())


# --- the daemon ------------------------------------------------------------------------------------------------------


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
        self._due: dict[str, float] = {}  # scheduled scans: "rescan", "overflow", "confirm:ROOT" → monotonic time
        self._ready_at: dict[str, float] = {}
        self._phase = "starting"
        self._failed: BaseException | None = None
        self._since_optimize = 0
        self.store: LockedStore | None = None
        self.guard: DeletionGuard | None = None
        self.watcher: Watcher | None = None
        self.decoders: pipeline.Decoders | None = None
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
        self.store = store = LockedStore(lambda: pipeline.store_from_settings(self.settings))
        store.ensure_collection(self.model.model_id, self.model.dim)
        self.guard = DeletionGuard(self.roots, self.cfg.mass_delete_fraction, self.cfg.mass_delete_min, store)
        self._store_ready.set()
        if not early:
            self._advertise(self.server.url)
        log.info("control endpoint %s (/healthz, /metrics)", self.server.url)
        self.watcher = Watcher(
            self._on_event,
            lambda root: default_filter(root, SUPPORTED_EXTENSIONS, self.settings.index.include_hidden),
            poll=self.cfg.poll,
            poll_interval=self.cfg.poll_interval,
            on_overflow=self._overflow.set,
        )
        self._check_roots(initial=True)  # watching starts before the reconciliation: nothing falls in between

    def _shutdown(self, worker: threading.Thread) -> int:
        deadline = time.monotonic() + STOP_GRACE
        self._stop.set()
        self._wake.set()
        if self.watcher is not None:
            self.watcher.close()
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
            self._store().flush()
        finally:
            os._exit(EXIT_OK)

    def _close_resources(self) -> None:
        self._remove_advert()
        if self.decoders is not None:
            self.decoders.close(wait=False)
        if self.store is not None:
            self.store.flush()
            self.store.close()
        self.model.close()

    def _store(self) -> LockedStore:
        if self.store is None:
            raise StoreError("the daemon's store is not open")
        return self.store

    # -- advertising the control address -------------------------------------------------------------------------------

    def _advert_path(self) -> Path | None:
        return None if self.settings.store.qdrant_url else self.settings.store.dir / ADVERT_FILE

    def _advertise(self, url: str) -> None:
        path = self._advert_path()
        if path is not None:
            atomic_write_json(path, {"url": url, "pid": os.getpid(), "roots": [str(r) for r in self.roots]})

    def _remove_advert(self) -> None:
        path = self._advert_path()
        if path is None:
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("pid") == os.getpid():
            path.unlink(missing_ok=True)

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
                self._step()
        except Exception as exc:
            self._failed = exc
            log.exception("the worker failed: stopping")
        finally:
            self._stop.set()

    def _startup(self) -> None:
        started = time.monotonic()
        clip = self.model.get()
        self.decoders = pipeline.Decoders(self.settings, clip.preprocess, clip.batch_size)
        log.info(
            "model %s ready in %.1f s (batch %d)", self.model.model_id, time.monotonic() - started, clip.batch_size
        )
        self._phase = "reconciling"
        present = [r for r in self.roots if self._info[r].watched]
        confirmed = frozenset(self.roots) if self.confirm_deletes else frozenset()
        self._sync(present, "start-up", confirmed, allow_empty=self.confirm_deletes)
        self._phase = "watching"
        self._schedule_rescan()

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
        result = pipeline.apply_changes(
            changes,
            self.settings,
            self._store(),
            self.model,
            self._decoders(),
            stop=self._stop.is_set,
            on_batch=self._on_batch,
        )
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

    def _decoders(self) -> pipeline.Decoders:
        if self.decoders is None:
            raise StoreError("the daemon's decoders are not ready")
        return self.decoders

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
        result = pipeline.sync_roots(
            roots,
            self.settings,
            self._store(),
            self.model,
            self._decoders(),
            fresh_seconds=self.cfg.stable_seconds,
            stop=self._stop.is_set,
            on_batch=self._on_batch,
        )
        self.metrics.seen.labels("scan").inc(result.summary.indexed + result.summary.unchanged)
        self.coalescer.add_unsettled(e.path for e in result.deferred)
        for root in roots:  # this scan's findings replace what was held for these roots
            self._guard().held.points.pop(root, None)
        what = f"{reason} scan of {len(roots)} root(s)"
        self._finish(result, confirmed, started, what=what, allow_empty=allow_empty)

    def _finish(
        self,
        result: pipeline.SyncResult,
        confirmed: frozenset[Path],
        started: float,
        what: str,
        allow_empty: bool = False,
    ) -> None:
        summary = result.summary
        apply, held = self._guard().split(result.gone, time.monotonic(), confirmed, allow_empty)
        pipeline.remove_points(self._store(), apply, summary)
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
        guard = self._guard()
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
                self._due.setdefault(f"confirm:{root}", time.monotonic() + self.cfg.confirm_delay)
        self.metrics.held.set(guard.held.total())

    def _guard(self) -> DeletionGuard:
        if self.guard is None:
            raise StoreError("the daemon's deletion guard is not ready")
        return self.guard

    def _maybe_optimize(self, summary: RunSummary) -> None:
        self._since_optimize += summary.indexed + summary.moved
        threshold = max(1, self.settings.store.optimize_after)
        if self._since_optimize >= threshold and self.coalescer.ready_count() == 0:
            log.info("building the search index after %d new images", self._since_optimize)
            self._store().optimize()
            self._since_optimize = 0

    def _schedule_rescan(self) -> None:
        interval = self.cfg.rescan_interval
        if interval > 0:
            self._due["rescan"] = time.monotonic() + interval * random.uniform(0.9, 1.1)

    def _maintain(self, now: float) -> None:
        if now >= self._due.get("roots", 0.0):
            self._due["roots"] = now + ROOT_CHECK_EVERY
            self._check_roots()
        if self._overflow.is_set() or self.coalescer.take_overflow():
            self._overflow.clear()
            self._due.setdefault("overflow", max(now, self._due.get("last-overflow", 0.0) + OVERFLOW_RESCAN_GAP))
        for key, when in sorted(self._due.items(), key=lambda item: item[1]):
            if key in ("roots", "last-overflow") or when > now or self._stop.is_set():
                continue
            del self._due[key]
            self._run_scan(key, now)

    def _run_scan(self, key: str, now: float) -> None:
        if key == "rescan":
            self._sync(self._watched(), "periodic")
            self._schedule_rescan()
        elif key == "overflow":
            self._due["last-overflow"] = now
            self._sync(self._watched(), "overflow")
        elif key.startswith("confirm:"):
            root = Path(key.removeprefix("confirm:"))
            self._sync([root], "confirm", confirmed=frozenset({root}))
        elif key.startswith("back:"):
            self._sync([Path(key.removeprefix("back:"))], "root-back")

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
            elif state == "present" and info.state == "empty" and self.guard and root in self.guard.held.points:
                self._due[f"back:{root}"] = time.monotonic()  # filled again: settle what was held
            info.state = state

    def _root_lost(self, root: Path, info: _RootInfo, initial: bool) -> None:
        if self.watcher is not None:
            self.watcher.stop(root)
        info.watched, info.identity, info.mode = False, None, ""
        dropped = self.coalescer.forget_under(root)
        count = self._store().count(SearchFilter(path_prefix=str(root)))
        log.warning(
            "%s is missing (unmounted or moved?): its %d entries are kept%s; watching resumes when it is back",
            root,
            count,
            f", {dropped} pending events dropped" if dropped else "",
        )

    def _root_back(self, root: Path, info: _RootInfo, identity: tuple[int, int] | None, initial: bool) -> None:
        if self.watcher is None:
            return
        was_known = info.identity is not None
        info.mode = self.watcher.start(root)
        info.watched, info.identity = True, identity
        if not initial:
            log.info("%s is %s: rescanning it", root, "back" if not was_known else "remounted or replaced")
            self._due[f"back:{root}"] = time.monotonic()

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
            "held_deletions": self._guard().held.total() if self.guard else 0,
        }
        return (200 if alive else 503), body

    def _ready_store(self) -> LockedStore:
        """The store, once open (a request during start-up waits for it)."""
        if not self._store_ready.wait(STORE_WAIT):
            raise StoreError("the watch daemon is still opening its store: try again")
        return self._store()

    def status(self, failures: int) -> dict[str, Any]:
        """What ``indexer status`` prints, plus the daemon's own state."""
        store = self._ready_store()
        model = store.model_info()
        _, health = self.health()
        return {
            "store": store.location,
            "model": model[0] if model else None,
            "dim": model[1] if model else None,
            "images": store.count() if model else 0,
            "failed": store.failure_count(),
            "failures": [{"path": f.path, "reason": f.reason, "at": f.at} for f in store.failures(failures)],
            "daemon": {**health, "url": self.server.url if self.server else None},
        }

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


# --- the control server ----------------------------------------------------------------------------------------------


class ControlServer:
    """A small HTTP server in a thread: /healthz, /metrics, and (for local clients only) /status and /search."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        handler = type("Handler", (_ControlHandler,), {"daemon": daemon})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError("watch.control_port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        self.url = f"http://{shown}:{bound_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="indexer-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _int_arg(query: str, name: str, default: int) -> int:
    try:
        return int(parse_qs(query).get(name, [str(default)])[0])
    except ValueError:
        raise ConfigError(name, "must be an integer") from None


class _ControlHandler(BaseHTTPRequestHandler):
    daemon: Daemon
    server_version = "indexer-watch"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control: " + format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._json(*self.daemon.health())
        elif url.path == "/metrics":
            body, content_type = self.daemon.metrics.render()
            self._send(200, body, content_type)
        elif url.path == "/status" and self._local():
            self._guarded(lambda: self.daemon.status(_int_arg(url.query, "failures", 10)))
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/search" or not self._local():
            self._json(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length", "0"))
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": "the body is not JSON", "type": "ConfigError", "setting": "query"})
            return
        self._guarded(lambda: {"hits": [asdict(h) for h in self.daemon.search(request)]})

    def _guarded(self, answer: Any) -> None:
        try:
            self._json(200, answer())
        except ConfigError as exc:
            self._json(400, {"error": exc.reason, "type": "ConfigError", "setting": exc.setting})
        except IndexerError as exc:
            self._json(409, {"error": str(exc), "type": type(exc).__name__})
        except Exception as exc:
            log.exception("control request %s failed", self.path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}", "type": "StoreError"})

    def _local(self) -> bool:
        """Search and status show file paths: only to clients on this machine."""
        return self.client_address[0] in ("127.0.0.1", "::1") or self.client_address[0].startswith("127.")

    def _json(self, status: int, body: Any) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# --- the client side: indexer search / status while a daemon holds the store ---------------------------------------


def query_to_json(query: Any, model_id: str, store: str) -> dict[str, Any]:
    """A search.Query as the JSON the daemon takes: every field, tagged where JSON has no type for it
    (paths, made absolute; bytes; the filter), so fields added to Query travel without changes here."""
    fields = {f.name: _encode(getattr(query, f.name)) for f in dataclasses.fields(query)}
    return {"store": store, "model": model_id, "query": fields}


def query_from_json(data: dict[str, Any]) -> Any:
    """The search.Query a JSON request describes (fields this version does not know are refused)."""
    from indexer.search import Query

    fields = data.get("query")
    if not isinstance(fields, dict):
        raise ConfigError("query", "the request has no query")
    known = {f.name for f in dataclasses.fields(Query)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError("query", f"this daemon does not know the query fields {', '.join(unknown)}: restart it")
    return Query(**{name: _decode(value) for name, value in fields.items()})


def _encode(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Path):
        return {"$path": str(value.expanduser().absolute())}
    if isinstance(value, bytes):
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, SearchFilter):
        return {"$filter": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == "$path":
            return Path(inner)
        if tag == "$b64":
            return base64.b64decode(inner)
        if tag == "$filter":
            return SearchFilter(**{k: _decode(v) for k, v in inner.items()})
    return value


def advertised(store_dir: Path) -> dict[str, Any] | None:
    """The {"url", "pid"} a daemon advertises in the store directory, or None (no file, or its process is gone:
    a stale file left by kill -9)."""
    try:
        data = json.loads((store_dir / ADVERT_FILE).read_text())
        pid, url = int(data["pid"]), str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return {"url": url, "pid": pid}


def find_daemon(store_dir: Path, timeout: float = 3.0) -> str | None:
    """The control URL of the live daemon holding ``store_dir``, or None (none advertised, its process is gone,
    or it does not answer: the pid was reused)."""
    found = advertised(store_dir)
    if found is None:
        return None
    try:
        with urllib.request.urlopen(found["url"] + "/healthz", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError:
        pass  # it answers, even if unhealthy: it holds the store
    except (urllib.error.URLError, OSError):
        return None
    url: str = found["url"]
    return url


def ask_daemon(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON request to a daemon's control endpoint; its errors come back as IndexerErrors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _daemon_error(exc) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StoreError(f"the watch daemon at {url} holds the store but did not answer: {exc}") from None


def _daemon_error(exc: urllib.error.HTTPError) -> IndexerError:
    try:
        data = json.loads(exc.read())
    except ValueError:
        return StoreError(f"the watch daemon answered HTTP {exc.code}")
    if data.get("type") == "ConfigError":
        return ConfigError(str(data.get("setting", "query")), str(data.get("error")))
    return StoreError(str(data.get("error")))


def search_via_daemon(url: str, settings: Settings, query: Any) -> list[Hit]:
    """``indexer search`` against a store held by a running daemon."""
    model_id = LazyModel(settings.model).model_id
    answer = ask_daemon(url, "POST", "/search", query_to_json(query, model_id, str(settings.store.dir)))
    return [Hit(id=h["id"], score=float(h["score"]), payload=h["payload"]) for h in answer["hits"]]


def status_via_daemon(url: str, failures: int) -> dict[str, Any]:
    """``indexer status`` against a store held by a running daemon."""
    answer: dict[str, Any] = ask_daemon(url, "GET", f"/status?failures={failures}")
    return answer
