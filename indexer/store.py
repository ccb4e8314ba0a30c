"""The vector store: one interface (`VectorStore`), two backends.

    EdgeStore          the embedded default: Qdrant Edge (the Qdrant engine in-process) in a directory
    QdrantServerStore  a Qdrant server (or qdrant-client's ":memory:" mode, the server's test double)

`open_store` picks one. Both backends hold the same points (id = `records.point_id(path)`, a cosine vector,
the pipeline's payload), record the model that made the vectors, keep a capped log of files that failed,
and evaluate `SearchFilter` the same way:

    path_prefix        "dirs" (every ancestor directory of the file) contains the prefix, or "path" is it
    formats            "format" is one of them (upper-cased; JPG/TIF/HEIC also match JPEG/TIFF/HEIF)
    min_width/height   "width"/"height" >= the value
    mtime_from/to      "mtime" within [from, to]
    cluster            "cluster" equals it
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, cast

import numpy as np
import numpy.typing as npt
import qdrant_edge as edge
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from indexer.errors import ConfigError, IndexerError, ModelMismatchError, StoreBusyError, StoreError
from indexer.records import Failure, Hit, SearchFilter, StoredPoint, point_id

MAX_FAILURES = 10_000  # the failure log keeps the latest this many files
WRITE_BATCH = 256  # points per upsert / delete / set_payload call
READ_BATCH = 1000  # ids per retrieve call, hashes per find_by_sha256 scroll

STORE_FORMAT = "indexer-store"
STORE_VERSION = 1
STORE_FILE = "store.json"
SHARD_DIR = "shard"
FAILURES_FILE = "failures.json"
LOCK_FILE = "lock"

# Payload fields the filters use, and the index type each gets.
KEYWORD_FIELDS = ("path", "dirs", "sha256", "format")
INTEGER_FIELDS = ("width", "height", "cluster")
FLOAT_FIELDS = ("mtime",)

_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF"}

T = TypeVar("T")
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FailureRecord:
    """One entry of the failure log: a file, why it failed, and when (unix time)."""

    path: str
    reason: str
    at: float


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
        limit: int = 10,
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


def open_store(*, store_dir: Path | None, qdrant_url: str | None, api_key: str | None, collection: str) -> VectorStore:
    """The one factory: a Qdrant server when qdrant_url is given, else the embedded store in store_dir."""
    if qdrant_url:
        return QdrantServerStore.connect(qdrant_url, api_key, collection)
    if store_dir is None:
        raise ConfigError("store.dir", "give a store directory or a Qdrant URL")
    return EdgeStore(store_dir)


# ---------------------------------------------------------------------------------------------------------
# Backend-neutral helpers: filter conditions, batching, vectors, model checks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Match:
    key: str
    value: str | int


@dataclass(frozen=True, slots=True)
class _AnyOf:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Range:
    key: str
    gte: float | None = None
    lte: float | None = None


@dataclass(frozen=True, slots=True)
class _Either:
    options: tuple[_Match, ...]


_Cond = _Match | _AnyOf | _Range | _Either


def filter_conditions(flt: SearchFilter | None) -> list[_Cond]:
    """Translate a SearchFilter into backend-neutral conditions, all of which must hold."""
    if flt is None:
        return []
    conds: list[_Cond | None] = [
        _prefix_condition(flt.path_prefix),
        _AnyOf("format", normalise_formats(flt.formats)) if flt.formats else None,
        _Range("width", gte=flt.min_width) if flt.min_width is not None else None,
        _Range("height", gte=flt.min_height) if flt.min_height is not None else None,
        _mtime_condition(flt.mtime_from, flt.mtime_to),
        _Match("cluster", flt.cluster) if flt.cluster is not None else None,
    ]
    return [c for c in conds if c is not None]


def _prefix_condition(prefix: str | None) -> _Cond | None:
    """A directory prefix matches via the "dirs" list; a file path via "path"; "/" matches everything."""
    if prefix is None:
        return None
    norm = prefix.rstrip("/" + os.sep)
    if not norm:
        return None
    return _Either((_Match("dirs", norm), _Match("path", norm)))


def _mtime_condition(start: float | None, end: float | None) -> _Cond | None:
    if start is None and end is None:
        return None
    return _Range("mtime", gte=start, lte=end)


def normalise_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Upper-case format names (leading dots dropped), with the common aliases' canonical names added."""
    names: list[str] = []
    for fmt in formats:
        name = fmt.strip().lstrip(".").upper()
        names.extend(n for n in (name, _FORMAT_ALIASES.get(name)) if n and n not in names)
    return tuple(names)


def normalise_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as stored: "format" upper-cased so format filters are case-insensitive."""
    fmt = payload.get("format")
    if isinstance(fmt, str) and fmt != fmt.upper():
        return {**payload, "format": fmt.upper()}
    return payload


def _batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


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


# ---------------------------------------------------------------------------------------------------------
# Shared implementation; the backends provide the primitives
# ---------------------------------------------------------------------------------------------------------


class _StoreBase(ABC):
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
        for batch in _batches(points, WRITE_BATCH):
            self._upsert_batch(batch)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points; missing ids are ignored."""
        for batch in _batches(ids, WRITE_BATCH):
            self._delete_batch(batch)

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge keys into the payload of existing points; missing ids are ignored."""
        payload = normalise_payload(payload)
        for batch in _batches(ids, WRITE_BATCH):
            self._set_payload_batch(batch, payload)

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """The points with these ids, in the order asked; missing ids are skipped."""
        found: list[StoredPoint] = []
        for batch in _batches(ids, READ_BATCH):
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
        limit: int = 10,
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
        for batch in _batches(list(dict.fromkeys(sha256s)), READ_BATCH):
            found.extend(self._scroll([_AnyOf("sha256", tuple(batch))], with_vectors, READ_BATCH))
        return found

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# EdgeStore: the embedded store
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StoreMeta:
    """The contents of store.json."""

    model_id: str
    dim: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "model_id": self.model_id,
            "dim": self.dim,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: object, source: Path) -> _StoreMeta:
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            raise StoreError(f"{source} is not an indexer store file")
        version = data.get("version")
        if not isinstance(version, int) or version > STORE_VERSION:
            raise StoreError(f"{source} has store format version {version!r}; this indexer reads up to 1")
        model_id, dim, created = data.get("model_id"), data.get("dim"), data.get("created_at", 0.0)
        if not isinstance(model_id, str) or not isinstance(dim, int) or not isinstance(created, int | float):
            raise StoreError(f"{source} is damaged: model_id, dim or created_at missing or of the wrong type")
        return cls(model_id, dim, float(created))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, data: object) -> Path:
    """Write JSON to a temp file beside path, fsynced; the caller publishes it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def atomic_write_json(path: Path, data: object) -> None:
    """Replace path with JSON data atomically (temp file + fsync + os.replace)."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _create_json_exclusive(path: Path, data: object) -> bool:
    """Publish JSON at path atomically unless path exists already; False if it did."""
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: fall back to a plain atomic replace
        if path.exists():
            return False
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _check_store_directory(directory: Path) -> None:
    """Refuse a path that is not a directory, or a directory that is not (the start of) a store."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise StoreError(f"the store path {directory} is not a directory")
    if (directory / STORE_FILE).exists():
        return
    names = {p.name for p in directory.iterdir() if not _is_temp_name(p.name)}
    shard = directory / SHARD_DIR
    if shard.is_dir() and not any(shard.iterdir()):
        names.discard(SHARD_DIR)
    foreign = sorted(names - {FAILURES_FILE, LOCK_FILE})
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(
            f"{directory} is not an indexer store: it has no {STORE_FILE} but holds {shown}; "
            "choose an empty or new directory for the store (--store DIR)"
        )


def _read_meta(directory: Path) -> _StoreMeta | None:
    path = directory / STORE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {_reason(exc)}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path} is damaged (not JSON): {_reason(exc)}") from exc
    return _StoreMeta.from_json(data, path)


def _edge_error(exc: Exception, directory: Path, what: str) -> StoreError:
    """Translate an Edge exception; the WAL lock held by another process becomes StoreBusyError."""
    text = _reason(exc)
    if "WouldBlock" in text or "Resource temporarily unavailable" in text:
        return StoreBusyError(directory, "its write-ahead log is locked")
    return StoreError(f"the store at {directory} failed to {what}: {text}")


class _FailureFile:
    """The Edge store's failure log: a dict by path, saved to failures.json atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, FailureRecord] = self._load()

    def _load(self) -> dict[str, FailureRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["failures"]
            records = [FailureRecord(str(r["path"]), str(r["reason"]), float(r["at"])) for r in rows]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path} is damaged ({_reason(exc)}); delete it to start a new log") from exc
        return {r.path: r for r in records}

    def _save(self) -> None:
        rows = [{"path": r.path, "reason": r.reason, "at": r.at} for r in self._entries.values()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": 1, "failures": rows})

    def record(self, failures: Sequence[Failure], at: float) -> None:
        for f in failures:
            self._entries.pop(str(f.path), None)  # re-insert: dict order is age order
            self._entries[str(f.path)] = FailureRecord(str(f.path), f.reason, at)
        excess = len(self._entries) - MAX_FAILURES
        for path in [r.path for r in self.newest(len(self._entries))[::-1][: max(excess, 0)]]:
            del self._entries[path]
        self._save()

    def clear(self, paths: Sequence[str]) -> None:
        removed = [self._entries.pop(str(p), None) for p in paths]
        if any(r is not None for r in removed):
            self._save()

    def newest(self, limit: int) -> list[FailureRecord]:
        # Stable sort of the insertion order reversed: ties keep the newest-inserted first.
        rows = list(self._entries.values())[::-1]
        return sorted(rows, key=lambda r: r.at, reverse=True)[: max(limit, 0)]

    def __len__(self) -> int:
        return len(self._entries)


class _DirLock:
    """An exclusive flock on ``directory/lock``, taken before the shard is touched.

    Edge's own WAL lock refuses a second opener, but the attempt itself damages the holder's id-tracker journal
    (its next flush fails); a lock of our own makes the second opener fail before it reaches the shard.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise StoreBusyError(self.directory, f"held by pid {holder}" if holder else "") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _edge_filter(conds: list[_Cond]) -> edge.Filter | None:
    if not conds:
        return None
    return edge.Filter(must=[_edge_condition(c) for c in conds])


def _edge_condition(cond: _Cond) -> edge.FieldCondition | edge.Filter:
    if isinstance(cond, _Match):
        return edge.FieldCondition(cond.key, match=edge.MatchValue(cond.value))
    if isinstance(cond, _AnyOf):
        return edge.FieldCondition(cond.key, match=edge.MatchAny(list(cond.values)))
    if isinstance(cond, _Range):
        return edge.FieldCondition(cond.key, range=edge.RangeFloat(gte=cond.gte, lte=cond.lte))
    return edge.Filter(should=[_edge_condition(c) for c in cond.options])


def _edge_point(record: edge.Record, with_vectors: bool) -> StoredPoint:
    vector = _as_vector(record.vector) if with_vectors else None
    return StoredPoint(id=str(record.id), payload=dict(record.payload or {}), vector=vector)


def _edge_ids(ids: Sequence[str]) -> list[edge.PointId]:
    return list(ids)


class EdgeStore(_StoreBase):
    """The embedded store: a Qdrant Edge shard in `directory/shard`, model info in `directory/store.json`,
    the failure log in `directory/failures.json`. One process at a time may open a directory."""

    def __init__(self, directory: Path, *, indexing_threshold_kb: int | None = None) -> None:
        """Open (or prepare to create) the store in directory; the shard is created by ensure_collection.

        indexing_threshold_kb: segments bigger than this get an HNSW index on optimize() (Edge's default
        when None); only used when the shard is created.
        """
        self.directory = Path(directory).expanduser().absolute()
        self.location = str(self.directory)
        self._indexing_threshold_kb = indexing_threshold_kb
        self._closed = False
        self._shard: edge.EdgeShard | None = None
        _check_store_directory(self.directory)
        self._lock = _DirLock(self.directory)
        if self.directory.is_dir():
            self._lock.acquire()
        try:
            self._meta = _read_meta(self.directory)
            self._failure_log = _FailureFile(self.directory / FAILURES_FILE)
            if self._meta is not None:
                self._shard = self._open_shard(self._meta.dim)
        except BaseException:
            self._lock.release()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def _shard_path(self) -> Path:
        return self.directory / SHARD_DIR

    def _edge_config(self, dim: int) -> edge.EdgeConfig:
        optimizers = None
        if self._indexing_threshold_kb is not None:
            optimizers = edge.EdgeOptimizersConfig(indexing_threshold=self._indexing_threshold_kb)
        vectors = edge.EdgeVectorParams(size=dim, distance=edge.Distance.Cosine)
        return edge.EdgeConfig(vectors=vectors, optimizers=optimizers)

    def _open_shard(self, dim: int) -> edge.EdgeShard:
        """Load the shard, or create it if missing (a new store, or a crash right after store.json)."""
        path = str(self._shard_path)
        if (self._shard_path / "edge_config.json").exists():
            try:
                return edge.EdgeShard.load(path)
            except Exception as exc:
                raise _edge_error(exc, self.directory, "open") from exc
        try:
            return edge.EdgeShard.create(path, self._edge_config(dim))
        except Exception as exc:
            raise _edge_error(exc, self.directory, "create its shard") from exc

    def model_info(self) -> tuple[str, int] | None:
        """(model_id, dim) from store.json, or None before ensure_collection."""
        self._check_open()
        return None if self._meta is None else (self._meta.model_id, self._meta.dim)

    def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create store.json and the shard if missing; else check that they are for this model and dim."""
        self._check_open()
        if self._meta is None:
            self._create(model_id, dim)
        meta = cast(_StoreMeta, self._meta)
        _check_model(meta.model_id, meta.dim, model_id, dim, self.location)

    def _create(self, model_id: str, dim: int) -> None:
        """store.json first (exclusively: a racing process's file wins), then the shard; undo on failure."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        meta = _StoreMeta(model_id, dim, time.time())
        if not _create_json_exclusive(self.directory / STORE_FILE, meta.to_json()):
            theirs = _read_meta(self.directory)
            if theirs is None:  # the racer's creation failed and was undone
                raise StoreError(f"the store at {self.directory} changed while opening it; try again")
            _check_model(theirs.model_id, theirs.dim, model_id, dim, self.location)
            self._shard, self._meta = self._open_shard(theirs.dim), theirs
            return
        had_shard = self._shard_path.exists()
        try:
            self._shard = self._open_shard(dim)
        except StoreBusyError:
            raise
        except StoreError:
            (self.directory / STORE_FILE).unlink(missing_ok=True)
            if not had_shard:
                shutil.rmtree(self._shard_path, ignore_errors=True)
            raise
        self._meta = meta

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store at {self.directory} is closed")

    def _live_shard(self) -> edge.EdgeShard | None:
        self._check_open()
        return self._shard

    def _writable_shard(self) -> edge.EdgeShard:
        shard = self._live_shard()
        if shard is None:
            raise StoreError(f"the store at {self.directory} has no collection yet: ensure_collection first")
        return shard

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except IndexerError:
            raise
        except Exception as exc:
            raise _edge_error(exc, self.directory, what) from exc

    def optimize(self) -> None:
        """Create the payload indexes if missing, then run Edge's optimizers (merge segments, build the
        HNSW index); blocks until done. Filters work without the indexes; they make big stores fast.
        (Each index costs an fsync'd WAL entry, so they are made here, not per ensure_collection.)"""
        shard = self._live_shard()
        if shard is not None:
            with self._errors("optimize"):
                _create_edge_indexes(shard)
                shard.optimize()

    def indexed_vectors_count(self) -> int:
        """How many vectors are in HNSW-indexed segments (0 until optimize() builds an index)."""
        shard = self._live_shard()
        if shard is None:
            return 0
        with self._errors("read its info"):
            return shard.info().indexed_vectors_count

    def flush(self) -> None:
        """Flush the shard to disk (the failure log is written on every change)."""
        shard = self._live_shard()
        if shard is not None:
            with self._errors("flush"):
                shard.flush()

    def close(self) -> None:
        """Flush and close the shard, releasing the directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        shard, self._shard = self._shard, None
        try:
            if shard is not None:
                with self._errors("close"):
                    shard.close()
        finally:
            self._lock.release()

    # -- primitives ------------------------------------------------------------------------------------
    def _upsert_batch(self, points: list[StoredPoint]) -> None:
        shard = self._writable_shard()
        with self._errors("upsert"):
            edge_points = [
                edge.Point(p.id, _vector_list(cast(Vector, p.vector)), normalise_payload(p.payload)) for p in points
            ]
            shard.update(edge.UpdateOperation.upsert_points(edge_points))

    def _delete_batch(self, ids: list[str]) -> None:
        shard = self._live_shard()
        if shard is not None:
            with self._errors("delete"):
                shard.update(edge.UpdateOperation.delete_points(_edge_ids(ids)))

    def _set_payload_batch(self, ids: list[str], payload: dict[str, Any]) -> None:
        shard = self._live_shard()
        if shard is None:
            return
        by_id = edge.Filter(must=[edge.HasIdCondition(set(_edge_ids(ids)))])
        with self._errors("set payload"):
            shard.update(edge.UpdateOperation.set_payload_by_filter(by_id, payload))

    def _retrieve_batch(self, ids: list[str], with_vectors: bool) -> list[StoredPoint]:
        shard = self._live_shard()
        if shard is None:
            return []
        with self._errors("retrieve"):
            records = shard.retrieve(_edge_ids(ids), with_payload=True, with_vector=with_vectors)
        return [_edge_point(r, with_vectors) for r in records]

    def _scroll(self, conds: list[_Cond], with_vectors: bool, batch_size: int) -> Iterator[StoredPoint]:
        flt = _edge_filter(conds)
        offset: edge.PointId | None = None
        while (shard := self._live_shard()) is not None:
            request = edge.ScrollRequest(
                offset=offset, limit=batch_size, filter=flt, with_payload=True, with_vector=with_vectors
            )
            with self._errors("scroll"):
                records, offset = shard.scroll(request)
            yield from (_edge_point(r, with_vectors) for r in records)
            if offset is None:
                return

    def _query(
        self, vector: list[float], limit: int, offset: int, threshold: float | None, conds: list[_Cond]
    ) -> list[Hit]:
        shard = self._live_shard()
        if shard is None:
            return []
        with self._errors("search"):
            # Exact while nothing is HNSW-indexed; after optimize() the index serves the indexed segments
            # and Edge still scans the small unindexed remainder exactly.
            exact = shard.info().indexed_vectors_count == 0
            request = edge.QueryRequest(
                limit=limit,
                offset=offset,
                query=edge.Query.Nearest(vector),
                with_payload=True,
                filter=_edge_filter(conds),
                score_threshold=threshold,
                params=edge.SearchParams(exact=True) if exact else None,
            )
            found = shard.query(request)
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def _count(self, conds: list[_Cond]) -> int:
        shard = self._live_shard()
        if shard is None:
            return 0
        with self._errors("count"):
            return shard.count(edge.CountRequest(exact=True, filter=_edge_filter(conds)))

    # -- failure log -----------------------------------------------------------------------------------
    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Add or update entries (by path, stamped now); keeps the latest MAX_FAILURES."""
        self._check_open()
        if failures:
            self._failure_log.record(failures, _stamp())

    def clear_failures(self, paths: Sequence[str]) -> None:
        """Drop the entries of these paths."""
        self._check_open()
        self._failure_log.clear(paths)

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        """The newest entries, newest first."""
        self._check_open()
        return self._failure_log.newest(limit)

    def failure_count(self) -> int:
        """How many entries the failure log holds."""
        self._check_open()
        return len(self._failure_log)


def _create_edge_indexes(shard: edge.EdgeShard) -> None:
    """Payload indexes for the filtered fields that lack one."""
    kinds = [
        *((f, edge.PayloadSchemaType.Keyword) for f in KEYWORD_FIELDS),
        *((f, edge.PayloadSchemaType.Integer) for f in INTEGER_FIELDS),
        *((f, edge.PayloadSchemaType.Float) for f in FLOAT_FIELDS),
    ]
    have = shard.info().payload_schema
    for field, kind in kinds:
        if field not in have:
            shard.update(edge.UpdateOperation.create_field_index(field, kind))


# ---------------------------------------------------------------------------------------------------------
# QdrantServerStore: a Qdrant server (or qdrant-client's in-memory double)
# ---------------------------------------------------------------------------------------------------------


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
    return FailureRecord(str(payload.get("path", "")), str(payload.get("reason", "")), float(payload["at"]))


def _metadata_model(info: qm.CollectionInfo) -> tuple[str, int] | None:
    meta = info.config.metadata or {}
    model_id, dim = meta.get("model_id"), meta.get("dim")
    if isinstance(model_id, str) and isinstance(dim, int):
        return model_id, dim
    return None


def _vector_size(info: qm.CollectionInfo) -> int | None:
    vectors = info.config.params.vectors
    return vectors.size if isinstance(vectors, qm.VectorParams) else None


class QdrantServerStore(_StoreBase):
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
            ).points
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def _count(self, conds: list[_Cond]) -> int:
        if not self._exists(self.collection):
            return 0
        with self._errors("count points"):
            return self.client.count(self.collection, _server_filter(conds), exact=True).count

    # -- failure log -----------------------------------------------------------------------------------
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
        latest = {str(f.path): f.reason for f in failures[-MAX_FAILURES:]}
        structs = [
            qm.PointStruct(id=point_id(path), vector=[1.0], payload={"path": path, "reason": reason, "at": at})
            for path, reason in latest.items()
        ]
        for batch in _batches(structs, WRITE_BATCH):
            with self._errors("record failures"):
                self.client.upsert(self.failures_collection, points=batch, wait=True)
        self._prune_failures()

    def _prune_failures(self) -> None:
        excess = self.failure_count() - MAX_FAILURES
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
        for batch in _batches([point_id(str(p)) for p in paths], WRITE_BATCH):
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
