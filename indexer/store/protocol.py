"""What a vector store is: the `VectorStore` protocol, its failure-log record and the constants both backends share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt

from indexer.records import SEARCH_LIMIT, Failure, Hit, SearchFilter, StoredPoint

MAX_FAILURES = 10_000  # the failure log keeps the latest this many files
WRITE_BATCH = 256  # points per upsert / delete / set_payload call
READ_BATCH = 1000  # ids per retrieve call, hashes per find_by_sha256 scroll

# Payload fields the filters use, and the index type each gets.
KEYWORD_FIELDS = ("path", "dirs", "sha256", "format")
INTEGER_FIELDS = ("width", "height", "cluster")
FLOAT_FIELDS = ("mtime",)

Vector = npt.NDArray[np.float32]


T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class ClosedOnExit:
    """``with store:`` closes the store at the end of the block (the class defines ``close``)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class FailureRecord:
    """One entry of the failure log: a file, why it failed, and when (unix time); the size and mtime the file had
    when known (`unchanged_since` tells whether it still has them)."""

    path: str
    reason: str
    at: float
    size: int | None = None
    mtime_ns: int | None = None

    def unchanged_since(self, size: int, mtime_ns: int) -> bool:
        """The file has the size and mtime it had when it failed (so reading it again would fail again)."""
        return self.size is not None and (self.size, self.mtime_ns) == (size, mtime_ns)


class VectorStore(Protocol):
    """What the pipeline and the search side need from a vector store."""

    location: str  # human readable: "/path/to/store" or "http://host:6333 collection images"

    def model_info(self) -> tuple[str, int] | None:
        """(model_id, dim) recorded by `ensure_collection`, or None if there is none yet."""
        ...

    def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create the collection if missing; raise ModelMismatchError if it holds another model or dim."""
        ...

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        """Insert or replace points (vectors required); idempotent by id."""
        ...

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points; missing ids are ignored."""
        ...

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge keys into the payload of existing points; missing ids are ignored."""
        ...

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """The points with these ids, in the order asked; missing ids are skipped."""
        ...

    def scroll(
        self, *, filter: SearchFilter | None = None, with_vectors: bool = False, batch_size: int = 1000
    ) -> Iterator[StoredPoint]:
        """Every point (matching the filter), fetched lazily in pages of batch_size."""
        ...

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
        ...

    def count(self, filter: SearchFilter | None = None) -> int:
        """How many points (match the filter)."""
        ...

    def find_by_sha256(self, sha256s: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """Every point whose payload sha256 is one of these."""
        ...

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Add or update failure-log entries (keyed by path, stamped now); keeps the latest MAX_FAILURES."""
        ...

    def clear_failures(self, paths: Sequence[str]) -> None:
        """Drop failure-log entries of files that later succeeded or vanished."""
        ...

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        """The newest failure-log entries, newest first."""
        ...

    def failure_count(self) -> int:
        """How many entries the failure log holds."""
        ...

    def optimize(self) -> None:
        """Build search indexes (Edge: payload indexes and HNSW); a no-op where the server does it itself."""
        ...

    def flush(self) -> None:
        """Make every write so far durable."""
        ...

    def close(self) -> None:
        """Release the store; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
