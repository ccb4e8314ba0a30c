"""The store and the model shared between the daemon's worker and its control server's threads.

The model is not thread-safe and the store's failure log is plain Python: each is wrapped so that one caller at a
time uses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from indexer.errors import ModelMismatchError, StoreBusyError, StoreError, StoreFullError
from indexer.model.clip import ClipModel
from indexer.model.lazy import LazyModel
from indexer.records import Failure, Hit, SearchFilter, StoredPoint
from indexer.settings import SEARCH_LIMIT, ModelSettings
from indexer.store.protocol import FailureRecord, VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")


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
