"""QdrantServerStore: a collection on a Qdrant server (or qdrant-client's ":memory:" mode, the server's test double)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from indexer.errors import IndexerError, ModelMismatchError, StoreError
from indexer.records import Failure, Hit, StoredPoint, point_id
from indexer.store import protocol
from indexer.store.base import _as_vector, _check_model, _reason, _stamp, _StoreBase, _vector_list
from indexer.store.directory import STORE_VERSION
from indexer.store.filters import _AnyOf, _Cond, _Match, _Range
from indexer.store.payload import normalise_payload
from indexer.store.protocol import (
    FLOAT_FIELDS,
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    READ_BATCH,
    WRITE_BATCH,
    FailureRecord,
    Vector,
    batches,
)


def _server_filter(conds: list[_Cond]) -> qm.Filter | None:
    if not conds:
        return None
    return qm.Filter(must=[_server_condition(c) for c in conds])


def _server_condition(cond: _Cond) -> qm.FieldCondition | qm.Filter:
    if isinstance(cond, _Match):
        return qm.FieldCondition(key=cond.key, match=qm.MatchValue(value=cond.value))
    if isinstance(cond, _AnyOf):
        return qm.FieldCondition(key=cond.key, match=qm.MatchAny(any=list(cond.values)))
    if isinstance(cond, _Range):
        return qm.FieldCondition(key=cond.key, range=qm.Range(gte=cond.gte, lte=cond.lte))
    return qm.Filter(should=[_server_condition(c) for c in cond.options])


def _server_ids(ids: Sequence[str]) -> list[qm.ExtendedPointId]:
    return list(ids)


def _server_point(record: qm.Record | qm.ScoredPoint, with_vectors: bool) -> StoredPoint:
    vector = _as_vector(record.vector) if with_vectors else None
    return StoredPoint(id=str(record.id), payload=dict(record.payload or {}), vector=vector)


def _failure_record(record: qm.Record) -> FailureRecord:
    payload = record.payload or {}
    size, mtime_ns = payload.get("size"), payload.get("mtime_ns")
    if not (isinstance(size, int) and isinstance(mtime_ns, int)):
        size = mtime_ns = None
    path, reason = str(payload.get("path", "")), str(payload.get("reason", ""))
    return FailureRecord(path, reason, float(payload["at"]), size, mtime_ns)


def _failure_payload(failure: Failure, at: float) -> dict[str, Any]:
    payload: dict[str, Any] = {"path": str(failure.path), "reason": failure.reason, "at": at}
    if failure.size is not None:
        payload.update(size=failure.size, mtime_ns=failure.mtime_ns)
    return payload


def _metadata_model(info: qm.CollectionInfo) -> tuple[str, int] | None:
    meta = info.config.metadata or {}
    model_id, dim = meta.get("model_id"), meta.get("dim")
    if isinstance(model_id, str) and isinstance(dim, int):
        return model_id, dim
    return None


def _vector_size(info: qm.CollectionInfo) -> int | None:
    vectors = info.config.params.vectors
    return vectors.size if isinstance(vectors, qm.VectorParams) else None


class ServerFailureLog:
    """The failure log of a `QdrantServerStore`: a second collection ``{collection}__failures`` (1-d vectors;
    payload path, reason, at), made on first use."""

    client: QdrantClient
    failures_collection: str
    _known: set[str]

    def _exists(self, name: str) -> bool:
        raise NotImplementedError

    def _errors(self, what: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _create_index(self, collection: str, field: str, kind: qm.PayloadSchemaType) -> None:
        raise NotImplementedError

    def _ensure_failures_collection(self) -> None:
        if self._exists(self.failures_collection):
            return
        with self._errors("create the failure log"):
            self.client.create_collection(
                self.failures_collection, vectors_config=qm.VectorParams(size=1, distance=qm.Distance.DOT)
            )
        self._known.add(self.failures_collection)
        self._create_index(self.failures_collection, "at", qm.PayloadSchemaType.FLOAT)

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Upsert entries (id = point_id(path), stamped now); keeps the latest MAX_FAILURES."""
        if not failures:
            return
        self._ensure_failures_collection()
        at = _stamp()
        latest = {str(f.path): f for f in failures[-protocol.MAX_FAILURES :]}
        structs = [
            qm.PointStruct(id=point_id(path), vector=[1.0], payload=_failure_payload(f, at))
            for path, f in latest.items()
        ]
        for batch in batches(structs, WRITE_BATCH):
            with self._errors("record failures"):
                self.client.upsert(self.failures_collection, points=batch, wait=True)
        self._prune_failures()

    def _prune_failures(self) -> None:
        excess = self.failure_count() - protocol.MAX_FAILURES
        while excess > 0:
            with self._errors("prune the failure log"):
                oldest, _ = self.client.scroll(
                    self.failures_collection,
                    limit=min(excess, READ_BATCH),
                    order_by=qm.OrderBy(key="at", direction=qm.Direction.ASC),
                    with_payload=False,
                )
                self.client.delete(self.failures_collection, qm.PointIdsList(points=[r.id for r in oldest]), wait=True)
            excess -= len(oldest)
            if not oldest:
                return

    def clear_failures(self, paths: Sequence[str]) -> None:
        """Drop the entries of these paths."""
        if not paths or not self._exists(self.failures_collection):
            return
        for batch in batches([point_id(str(p)) for p in paths], WRITE_BATCH):
            with self._errors("clear failures"):
                self.client.delete(self.failures_collection, qm.PointIdsList(points=_server_ids(batch)), wait=True)

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        """The newest entries, newest first."""
        if limit < 1 or not self._exists(self.failures_collection):
            return []
        with self._errors("read the failure log"):
            records, _ = self.client.scroll(
                self.failures_collection,
                limit=limit,
                order_by=qm.OrderBy(key="at", direction=qm.Direction.DESC),
                with_payload=True,
            )
        return [_failure_record(r) for r in records]

    def failure_count(self) -> int:
        """How many entries the failure log holds."""
        if not self._exists(self.failures_collection):
            return 0
        with self._errors("count failures"):
            return self.client.count(self.failures_collection, exact=True).count


class QdrantServerStore(ServerFailureLog, _StoreBase):
    """A collection on a Qdrant server: model id and dim in the collection's metadata, the failure log in
    a second collection `{collection}__failures` (1-d vectors; payload path, reason, at)."""

    def __init__(
        self,
        client: QdrantClient,
        collection: str = "images",
        *,
        url: str = "qdrant",
        owns_client: bool = False,
    ) -> None:
        """Use client's collection; close() closes the client only if owns_client (connect() sets it)."""
        self.client = client
        self.collection = collection
        self.failures_collection = f"{collection}__failures"
        self.url = url
        self.location = f"{url} collection {collection}"
        self._owns_client = owns_client
        self._closed = False
        self._known: set[str] = set()  # collections known to exist
        self.hnsw_ef = 0  # the graph walk's breadth (search.hnsw_ef); 0: the collection's own

    @classmethod
    def connect(cls, url: str, api_key: str | None, collection: str, timeout: float = 30) -> QdrantServerStore:
        """Connect to the server at url (":memory:" for an in-process double) and check that it answers."""
        try:
            if url == ":memory:":
                client = QdrantClient(location=":memory:")
            else:
                seconds = max(1, math.ceil(timeout))
                client = QdrantClient(url=url, api_key=api_key, timeout=seconds, check_compatibility=False)
            client.get_collections()
        except Exception as exc:
            raise StoreError(f"cannot reach the Qdrant server at {url}: {_reason(exc)}") from exc
        return cls(client, collection, url=url, owns_client=True)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"the store {self.location} is closed")
        try:
            yield
        except IndexerError:
            raise
        except Exception as exc:
            raise StoreError(f"Qdrant at {self.url} failed to {what} ({self.collection}): {_reason(exc)}") from exc

    def _exists(self, name: str) -> bool:
        if name not in self._known:
            with self._errors("look up the collection"):
                if not self.client.collection_exists(name):
                    return False
            self._known.add(name)
        return True

    # -- collection ------------------------------------------------------------------------------------
    def model_info(self) -> tuple[str, int] | None:
        """(model_id, dim) from the collection's metadata; None if there is no collection."""
        if not self._exists(self.collection):
            return None
        with self._errors("read the collection"):
            return _metadata_model(self.client.get_collection(self.collection))

    def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the collection (cosine, dim) with model metadata and payload indexes, or check it."""
        if not self._exists(self.collection):
            self._create(model_id, dim)
            return
        with self._errors("read the collection"):
            info = self.client.get_collection(self.collection)
        recorded = _metadata_model(info)
        if recorded is not None:
            _check_model(*recorded, model_id, dim, self.location)
            return
        size = _vector_size(info)  # a collection made elsewhere: adopt it if its vectors fit
        if size != dim:
            raise ModelMismatchError(f"an unrecorded model ({size}-d)", f"{model_id} ({dim}-d)", self.location)
        with self._errors("record the model"):
            self.client.update_collection(self.collection, metadata=self._metadata(model_id, dim))
        self._create_indexes()

    @staticmethod
    def _metadata(model_id: str, dim: int) -> dict[str, Any]:
        return {"model_id": model_id, "dim": dim, "created_at": time.time(), "format_version": STORE_VERSION}

    def _create(self, model_id: str, dim: int) -> None:
        with self._errors("create the collection"):
            self.client.create_collection(
                self.collection,
                vectors_config=qm.VectorParams(size=dim, distance=qm.Distance.COSINE),
                metadata=self._metadata(model_id, dim),
            )
        self._known.add(self.collection)
        self._create_indexes()

    def _create_indexes(self) -> None:
        kinds = [
            *((f, qm.PayloadSchemaType.KEYWORD) for f in KEYWORD_FIELDS),
            *((f, qm.PayloadSchemaType.INTEGER) for f in INTEGER_FIELDS),
            *((f, qm.PayloadSchemaType.FLOAT) for f in FLOAT_FIELDS),
        ]
        for field, kind in kinds:
            self._create_index(self.collection, field, kind)

    def _create_index(self, collection: str, field: str, kind: qm.PayloadSchemaType) -> None:
        with self._errors("create a payload index"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # local mode: "payload indexes have no effect"
            self.client.create_payload_index(collection, field, kind, wait=True)

    def optimize(self) -> None:
        """Nothing to do: the server builds its indexes by itself."""

    def flush(self) -> None:
        """Nothing to do: every write waits for the server to apply it."""

    def close(self) -> None:
        """Close the client if this store opened it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            try:
                self.client.close()
            except Exception as exc:
                raise StoreError(f"closing the connection to {self.url} failed: {_reason(exc)}") from exc

    # -- primitives ------------------------------------------------------------------------------------
    def _upsert_batch(self, points: list[StoredPoint]) -> None:
        structs = [
            qm.PointStruct(id=p.id, vector=_vector_list(cast(Vector, p.vector)), payload=normalise_payload(p.payload))
            for p in points
        ]
        with self._errors("upsert points"):
            self.client.upsert(self.collection, points=structs, wait=True)

    def _delete_batch(self, ids: list[str]) -> None:
        if self._exists(self.collection):
            with self._errors("delete points"):
                self.client.delete(self.collection, qm.PointIdsList(points=_server_ids(ids)), wait=True)

    def _set_payload_batch(self, ids: list[str], payload: dict[str, Any]) -> None:
        if self._exists(self.collection):
            by_id = qm.Filter(must=[qm.HasIdCondition(has_id=_server_ids(ids))])
            with self._errors("set payload"):
                self.client.set_payload(self.collection, payload, points=by_id, wait=True)

    def _retrieve_batch(self, ids: list[str], with_vectors: bool) -> list[StoredPoint]:
        if not self._exists(self.collection):
            return []
        with self._errors("retrieve points"):
            records = self.client.retrieve(
                self.collection, _server_ids(ids), with_payload=True, with_vectors=with_vectors
            )
        return [_server_point(r, with_vectors) for r in records]

    def _scroll(self, conds: list[_Cond], with_vectors: bool, batch_size: int) -> Iterator[StoredPoint]:
        if not self._exists(self.collection):
            return
        flt = _server_filter(conds)
        offset: qm.ExtendedPointId | None = None
        while True:
            with self._errors("scroll"):
                records, next_offset = self.client.scroll(
                    self.collection, flt, limit=batch_size, offset=offset, with_vectors=with_vectors
                )
            yield from (_server_point(r, with_vectors) for r in records)
            if next_offset is None:
                return
            offset = cast(qm.ExtendedPointId, next_offset)

    def _query(
        self, vector: list[float], limit: int, offset: int, threshold: float | None, conds: list[_Cond]
    ) -> list[Hit]:
        if not self._exists(self.collection):
            return []
        with self._errors("search"):
            found = self.client.query_points(
                self.collection,
                query=vector,
                query_filter=_server_filter(conds),
                limit=limit,
                offset=offset,
                score_threshold=threshold,
                with_payload=True,
                search_params=qm.SearchParams(hnsw_ef=self.hnsw_ef) if self.hnsw_ef else None,
            ).points
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def _count(self, conds: list[_Cond]) -> int:
        if not self._exists(self.collection):
            return 0
        with self._errors("count points"):
            return self.client.count(self.collection, _server_filter(conds), exact=True).count
