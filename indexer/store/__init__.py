"""The vector store: one interface (`VectorStore`), two backends.

    EdgeStore          the embedded default: Qdrant Edge (the Qdrant engine in-process) in a directory
    QdrantServerStore  a Qdrant server (or qdrant-client's ":memory:" mode, the server's test double)

`open_store` / `open_store_from_settings` pick one. Both backends hold the same points (id =
`records.point_id(path)`, a cosine vector, the payload of `indexer.payload`), record the model that made the
vectors, keep a capped log of files that failed, and evaluate `SearchFilter` the same way (`filters`).

    protocol     VectorStore, FailureRecord, the shared constants
    filters      SearchFilter → backend-neutral conditions
    base         the shared implementation over each backend's primitives
    directory    the Edge store's directory: store.json, lock, failure file
    edge_store   EdgeStore
    server       QdrantServerStore
    factory      open_store, open_store_from_settings (torch-free)

`QdrantServerStore` is imported on first use: the embedded store's commands never import qdrant-client (≈ 1 s of a
cold start).
"""

from typing import TYPE_CHECKING, Any

from indexer.atomicio import atomic_write_json
from indexer.payload import normalise_payload
from indexer.store.directory import FAILURES_FILE, LOCK_FILE, SHARD_DIR, STORE_FILE, STORE_FORMAT, STORE_VERSION
from indexer.store.edge_store import EdgeStore
from indexer.store.factory import open_store, open_store_from_settings
from indexer.store.filters import filter_conditions, normalise_formats
from indexer.store.protocol import (
    FLOAT_FIELDS,
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    MAX_FAILURES,
    READ_BATCH,
    WRITE_BATCH,
    FailureRecord,
    Vector,
    VectorStore,
)

if TYPE_CHECKING:
    from indexer.store.server import QdrantServerStore

__all__ = [
    "FAILURES_FILE",
    "FLOAT_FIELDS",
    "INTEGER_FIELDS",
    "KEYWORD_FIELDS",
    "LOCK_FILE",
    "MAX_FAILURES",
    "READ_BATCH",
    "SHARD_DIR",
    "STORE_FILE",
    "STORE_FORMAT",
    "STORE_VERSION",
    "WRITE_BATCH",
    "EdgeStore",
    "FailureRecord",
    "QdrantServerStore",
    "Vector",
    "VectorStore",
    "atomic_write_json",
    "filter_conditions",
    "normalise_formats",
    "normalise_payload",
    "open_store",
    "open_store_from_settings",
]


def __getattr__(name: str) -> Any:
    if name == "QdrantServerStore":
        from indexer.store.server import QdrantServerStore

        return QdrantServerStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
