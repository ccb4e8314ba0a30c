"""`LockedStore`: one open store shared by the threads of the process that owns it (the watch daemon's worker, the
HTTP app's engine thread, an index job), every call under one lock; opened when the owner is ready for it.

The store's failure log is plain Python and Qdrant Edge is one-caller-at-a-time: one caller at a time uses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from indexer.errors import ModelMismatchError, StoreBusyError, StoreError, StoreFullError
from indexer.records import SEARCH_LIMIT, Failure, Hit, SearchFilter, StoredPoint
from indexer.store.protocol import ClosedOnExit, FailureRecord, VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_WAIT = 60.0  # seconds a call made before the store is open waits for it


class LockedStore(ClosedOnExit):
    """A VectorStore shared by the owner's threads: every call holds one lock.

    ``opened=False`` defers opening to `open()`: the owner's HTTP app can start (and its advert go out) first, and
    a call made meanwhile waits for the store (up to OPEN_WAIT seconds, then a StoreError saying so).

    An unexpected store failure closes the store, opens it again and retries the call once: Qdrant Edge (beta) can
    leave its holder's payload storage unflushable when another process tries to open the same directory, and
    reopening (WAL replay) recovers it. The daemon runs forever; it must survive a stray opener.
    """

    def __init__(self, open_store: Callable[[], VectorStore], *, location: str = "", opened: bool = True) -> None:
        self._open_store = open_store
        self.lock = threading.RLock()
        self.reopened = 0
        self._ready = threading.Event()
        self._inner: VectorStore | None = None
        self.location = location
        if opened:
            self.open()

    def open(self) -> None:
        """Open the store (raises what opening raises, e.g. StoreBusyError: the caller may retry)."""
        with self.lock:
            self._inner = self._open_store()
            self.location = self._inner.location
        self._ready.set()

    @property
    def inner(self) -> VectorStore:
        if not self._ready.wait(OPEN_WAIT) or self._inner is None:
            raise StoreError("the store is still being opened by its owner: try again in a moment")
        return self._inner

    @property
    def damage(self) -> str | None:
        """What the store found damaged when it opened (`indexer status` shows it), if the backend says."""
        found: str | None = getattr(self._inner, "damage", None)
        return found

    def _call(self, call: Callable[[VectorStore], T]) -> T:
        self.inner  # noqa: B018 (waits until the store is open)
        with self.lock:
            try:
                return call(self.inner)
            except (StoreBusyError, StoreFullError, ModelMismatchError):  # reopening cannot help
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
        self._inner = self._open_store()
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
        inner = self.inner
        with self.lock:
            points = inner.scroll(filter=filter, with_vectors=with_vectors, batch_size=batch_size)
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
        limit: int = SEARCH_LIMIT,
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
            if self._inner is not None:
                self._inner.close()
