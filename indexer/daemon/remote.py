"""`RemoteStore`: the embedded store as the CLI sees it while another process owns it.

``indexer dedup``, ``cluster``, ``export`` and ``import`` run here, in the command's process, exactly as without
an owner (the same code, the same output, file actions as this user), over the owner's store primitives
(`indexer.api.control`, POST /control/store/...). Points travel as pages (`indexer.daemon.pointpage`: a page's
vectors in one float32 block); a scroll is paged through a cursor the owner keeps. Searching, the failure log and
building indexes stay with the owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.daemon.client import OwnerClient
from indexer.errors import ModelMismatchError, StoreError
from indexer.records import SEARCH_LIMIT, Failure, Hit, SearchFilter, StoredPoint
from indexer.store.protocol import READ_BATCH, WRITE_BATCH, ClosedOnExit, FailureRecord, batches


def _filter(flt: SearchFilter | None) -> dict[str, Any] | None:
    if flt is None:
        return None
    return {f.name: (list(v) if isinstance(v := getattr(flt, f.name), tuple) else v) for f in dataclasses.fields(flt)}


class RemoteStore(ClosedOnExit):
    """A VectorStore answered by the store's owner (the reads and writes the library commands make)."""

    def __init__(self, owner: OwnerClient) -> None:
        self.owner = owner
        info = owner.ask("GET", "/store")
        self.location: str = info["location"]
        self._model: tuple[str, int] | None = (info["model"], int(info["dim"])) if info["model"] else None

    def model_info(self) -> tuple[str, int] | None:
        return self._model

    def ensure_collection(self, model_id: str, dim: int) -> None:
        """The owner made the collection (with its model): a match passes, another model is refused."""
        if self._model is None:
            raise StoreError(
                f"the store at {self.location} has no collection yet: `indexer index PATH` through its owner"
            )
        if self._model != (model_id, dim):
            raise ModelMismatchError(self._model[0], model_id, f"at {self.location}")

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        for batch in batches(points, WRITE_BATCH):
            self.owner.send_points("/store/upsert", batch)

    def delete(self, ids: Sequence[str]) -> None:
        for batch in batches(ids, WRITE_BATCH):
            self.owner.ask("POST", "/store/delete", {"ids": batch})

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        for batch in batches(ids, WRITE_BATCH):
            self.owner.ask("POST", "/store/set_payload", {"ids": batch, "payload": payload})

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        found: list[StoredPoint] = []
        for batch in batches(ids, READ_BATCH):
            found.extend(self.owner.points("/store/retrieve", {"ids": batch, "with_vectors": with_vectors}).points)
        return found

    def scroll(
        self, *, filter: SearchFilter | None = None, with_vectors: bool = False, batch_size: int = 1000
    ) -> Iterator[StoredPoint]:
        body: dict[str, Any] = {"filter": _filter(filter), "with_vectors": with_vectors, "batch_size": batch_size}
        while True:
            page = self.owner.points("/store/scroll", body)
            yield from page.points
            if page.cursor is None:
                return
            body = {"cursor": page.cursor, "batch_size": batch_size}

    def query(
        self,
        vector: npt.NDArray[np.float32],
        *,
        limit: int = SEARCH_LIMIT,
        offset: int = 0,
        threshold: float | None = None,
        filter: SearchFilter | None = None,
    ) -> list[Hit]:
        raise StoreError("a search through the store's owner goes through `indexer search`")

    def count(self, filter: SearchFilter | None = None) -> int:
        return int(self.owner.ask("POST", "/store/count", {"filter": _filter(filter)}))

    def find_by_sha256(self, sha256s: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        found: list[StoredPoint] = []
        for batch in batches(sha256s, READ_BATCH):
            body = {"sha256s": batch, "with_vectors": with_vectors}
            found.extend(self.owner.points("/store/find_by_sha256", body).points)
        return found

    def record_failures(self, failures: Sequence[Failure]) -> None:
        raise StoreError("the failure log is kept by the store's owner")

    def clear_failures(self, paths: Sequence[str]) -> None:
        raise StoreError("the failure log is kept by the store's owner")

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        return [FailureRecord(f["path"], f["reason"], f["at"]) for f in self.owner.status(limit)["failures"]]

    def failure_count(self) -> int:
        return int(self.owner.status(0)["failed"])

    def optimize(self) -> None:
        """The owner builds its indexes itself."""

    def flush(self) -> None:
        self.owner.ask("POST", "/store/flush")

    def close(self) -> None:
        """Nothing to release: the owner keeps the store."""
