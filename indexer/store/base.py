"""The shared implementation of both backends: `_StoreBase` batches, translates and combines the primitives a
backend provides; small backend-neutral helpers (vectors, model checks, time stamps, error reasons)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.errors import ModelMismatchError
from indexer.records import SEARCH_LIMIT, Hit, SearchFilter, StoredPoint
from indexer.store.filters import _AnyOf, _Cond, filter_conditions
from indexer.store.payload import normalise_payload
from indexer.store.protocol import READ_BATCH, WRITE_BATCH, ClosedOnExit, Vector, batches


def _vector_list(vector: npt.ArrayLike) -> list[float]:
    return np.asarray(vector, dtype=np.float32).reshape(-1).tolist()


def _as_vector(raw: object) -> Vector | None:
    """A returned vector (a list, or {"": list} for the default vector) as a float32 1-D array."""
    if isinstance(raw, dict):
        raw = raw.get("")
    if raw is None:
        return None
    return np.asarray(raw, dtype=np.float32).reshape(-1)


def _require_vectors(points: Sequence[StoredPoint]) -> None:
    for p in points:
        if p.vector is None:
            raise ValueError(f"point {p.id} ({p.path}) has no vector: upsert needs vectors")


def _check_model(store_model: str, store_dim: int, model_id: str, dim: int, where: str) -> None:
    if store_model != model_id:
        raise ModelMismatchError(store_model, model_id, where=where)
    if store_dim != dim:
        raise ModelMismatchError(f"{store_model} ({store_dim}-d)", f"{model_id} ({dim}-d)", where=where)


def _in_order(points: list[StoredPoint], ids: Sequence[str]) -> list[StoredPoint]:
    by_id = {p.id: p for p in points}
    return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]


_last_stamp = 0.0


def _stamp() -> float:
    """Now (unix time), strictly increasing within this process so "newest first" is well defined."""
    global _last_stamp
    _last_stamp = max(time.time(), _last_stamp + 1e-6)
    return _last_stamp


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _StoreBase(ClosedOnExit, ABC):
    """The VectorStore methods that only batch, translate or combine backend primitives."""

    location: str

    # -- primitives -----------------------------------------------------------------------------------
    @abstractmethod
    def _upsert_batch(self, points: list[StoredPoint]) -> None: ...

    @abstractmethod
    def _delete_batch(self, ids: list[str]) -> None: ...

    @abstractmethod
    def _set_payload_batch(self, ids: list[str], payload: dict[str, Any]) -> None: ...

    @abstractmethod
    def _retrieve_batch(self, ids: list[str], with_vectors: bool) -> list[StoredPoint]: ...

    @abstractmethod
    def _scroll(self, conds: list[_Cond], with_vectors: bool, batch_size: int) -> Iterator[StoredPoint]: ...

    @abstractmethod
    def _query(
        self, vector: list[float], limit: int, offset: int, threshold: float | None, conds: list[_Cond]
    ) -> list[Hit]: ...

    @abstractmethod
    def _count(self, conds: list[_Cond]) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    # -- the interface --------------------------------------------------------------------------------
    def upsert(self, points: Sequence[StoredPoint]) -> None:
        """Insert or replace points (vectors required), WRITE_BATCH at a time; idempotent by id."""
        _require_vectors(points)
        for batch in batches(points, WRITE_BATCH):
            self._upsert_batch(batch)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points; missing ids are ignored."""
        for batch in batches(ids, WRITE_BATCH):
            self._delete_batch(batch)

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge keys into the payload of existing points; missing ids are ignored."""
        payload = normalise_payload(payload)
        for batch in batches(ids, WRITE_BATCH):
            self._set_payload_batch(batch, payload)

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """The points with these ids, in the order asked; missing ids are skipped."""
        found: list[StoredPoint] = []
        for batch in batches(ids, READ_BATCH):
            found.extend(self._retrieve_batch(batch, with_vectors))
        return _in_order(found, ids)

    def scroll(
        self, *, filter: SearchFilter | None = None, with_vectors: bool = False, batch_size: int = 1000
    ) -> Iterator[StoredPoint]:
        """Every point (matching the filter), fetched lazily in pages of batch_size."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        return self._scroll(filter_conditions(filter), with_vectors, batch_size)

    def query(
        self,
        vector: Vector,
        *,
        limit: int = SEARCH_LIMIT,
        offset: int = 0,
        threshold: float | None = None,
        filter: SearchFilter | None = None,
    ) -> list[Hit]:
        """The points nearest to vector by cosine similarity, best first."""
        if limit < 1:
            return []
        return self._query(_vector_list(vector), limit, max(offset, 0), threshold, filter_conditions(filter))

    def count(self, filter: SearchFilter | None = None) -> int:
        """How many points (match the filter)."""
        return self._count(filter_conditions(filter))

    def find_by_sha256(self, sha256s: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """Every point whose payload sha256 is one of these."""
        found: list[StoredPoint] = []
        for batch in batches(list(dict.fromkeys(sha256s)), READ_BATCH):
            found.extend(self._scroll([_AnyOf("sha256", tuple(batch))], with_vectors, READ_BATCH))
        return found
