"""EdgeStore: the embedded store, a Qdrant Edge shard (the Qdrant engine in-process) in a directory."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import qdrant_edge as edge

from indexer.atomicio import create_json_exclusive
from indexer.errors import IndexerError, StoreBusyError, StoreError
from indexer.records import StoredPoint
from indexer.store.base import _check_model, _reason, _StoreBase, _vector_list
from indexer.store.directory import (
    FAILURES_FILE,
    POINTS_FILE,
    SHARD_DIR,
    STORE_FILE,
    FailureLog,
    _check_store_directory,
    _DirLock,
    _FailureFile,
    _PointRecord,
    _read_meta,
    _StoreMeta,
    open_need_bytes,
    optimize_need_bytes,
    read_only_error,
)
from indexer.store.edge_files import MB, check_space, copy_tree, edge_config, edge_error
from indexer.store.edge_query import EdgeReads, create_edge_indexes, edge_ids
from indexer.store.payload import normalise_payload
from indexer.store.protocol import Vector, batches

log = logging.getLogger(__name__)

# The free space (MB) the store keeps on its filesystem by default (settings: store.min_free_mb).
MIN_FREE_MB = 64.0
# New stores are quantized (int8 copies in memory, originals on disk; edge_files.edge_config, bench/README.md).
QUANTIZE = True
# Points per Edge update call. An update holds the GIL from start to end (0.026 ms a point): 256 at once kept every
# other thread of the process, the model's included, waiting up to 9 ms; 64 cost the same per point and hold it at
# most 3 ms (bench/writer_stall.py).
UPDATE_POINTS = 64


class EdgeStore(EdgeReads, FailureLog, _StoreBase):
    """The embedded store: a Qdrant Edge shard in `directory/shard`, model info in `directory/store.json`,
    the failure log in `directory/failures.json`. One process at a time may open a directory."""

    def __init__(
        self,
        directory: Path,
        *,
        indexing_threshold_kb: int | None = None,
        min_free_mb: float = MIN_FREE_MB,
        quantize: bool = QUANTIZE,
    ) -> None:
        """Open (or prepare to create) the store in directory; the shard is created by ensure_collection.

        indexing_threshold_kb: segments bigger than this get an HNSW index on optimize() (Edge's default
        when None); only used when the shard is created.
        min_free_mb: refuse to open or write with less free space than this on the store's filesystem (Edge
        memory-maps its files: a write into a full disk is a SIGBUS, not an error).
        quantize: a new shard keeps int8 copies of its vectors in memory (built by optimize()) and the originals
        on disk; searches rescore with the originals. Only used when the shard is created.
        """
        self.directory = Path(directory).expanduser().absolute()
        self.location = str(self.directory)
        self._indexing_threshold_kb = indexing_threshold_kb
        self._min_free_mb = min_free_mb
        self._quantize = quantize
        self._closed = False
        self._shard: edge.EdgeShard | None = None
        self.damage: str | None = None  # set when the shard holds fewer points than recorded at its last flush
        _check_store_directory(self.directory)
        self._lock = _DirLock(self.directory)
        if self.directory.is_dir():
            self._lock.acquire()
        try:
            self._meta = _read_meta(self.directory)
            self._failure_log = _FailureFile(self.directory / FAILURES_FILE)
            self._points = _PointRecord(self.directory / POINTS_FILE)
            if self._meta is not None:
                self._shard = self._open_shard(self._meta.dim)
                self._check_points()
        except BaseException:
            self._lock.release()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def _shard_path(self) -> Path:
        return self.directory / SHARD_DIR

    def _space(self, what: str, fills_mb: float = 0.0, *, plus_margin: bool = False) -> None:
        check_space(self.directory, what, self._min_free_mb, fills_mb, plus_margin=plus_margin)

    def _check_points(self) -> None:
        """Warn loudly when the shard holds fewer points than at its last flush (a damaged segment)."""
        recorded = self._points.points
        if recorded is None or self._shard is None:
            return
        with self._errors("count"):
            held = self._shard.count(edge.CountRequest(exact=True))
        if held < recorded:
            self.damage = (
                f"the store at {self.directory} holds {held} images but held {recorded} at its last flush: "
                f"part of its shard is damaged or missing ({recorded - held} lost). Repair: re-index the folders "
                "(indexer index PATH... adds them back), or restore from an export (indexer import FILE into a "
                "new store)"
            )
            log.warning("%s", self.damage)

    def _save_points(self, held: int) -> None:
        """Record the count after a flush; a damaged shard's record is kept (only deletes lower it)."""
        recorded = self._points.points
        try:
            self._points.save(held if recorded is None else max(recorded, held))
        except OSError as exc:
            raise StoreError(f"the store at {self.directory} cannot record its point count: {_reason(exc)}") from exc

    def _open_shard(self, dim: int) -> edge.EdgeShard:
        """Load the shard, or create it if missing (a new store, or a crash right after store.json)."""
        self._space("open", open_need_bytes(self._shard_path) / MB)
        path = str(self._shard_path)
        if (self._shard_path / "edge_config.json").exists():
            try:
                return edge.EdgeShard.load(path)
            except Exception as exc:
                raise edge_error(exc, self.directory, "open") from exc
        try:
            return edge.EdgeShard.create(path, edge_config(dim, self._quantize, self._indexing_threshold_kb))
        except Exception as exc:
            raise edge_error(exc, self.directory, "create its shard") from exc

    def model_info(self) -> tuple[str, int] | None:
        """(model_id, dim) from store.json, or None before ensure_collection."""
        self._check_open()
        return None if self._meta is None else (self._meta.model_id, self._meta.dim)

    def ensure_collection(self, model_id: str, dim: int) -> None:
        """Create store.json and the shard if missing; else check that they are for this model and dim."""
        self._check_open()
        if self._meta is None:
            try:
                self._create(model_id, dim)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise read_only_error(self.directory, exc) from exc
                raise StoreError(f"cannot create the store at {self.directory}: {_reason(exc)}") from exc
        meta = cast(_StoreMeta, self._meta)
        _check_model(meta.model_id, meta.dim, model_id, dim, self.location)

    def _create(self, model_id: str, dim: int) -> None:
        """store.json first (exclusively: a racing process's file wins), then the shard; undo on failure."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        meta = _StoreMeta(model_id, dim, time.time())
        if not create_json_exclusive(self.directory / STORE_FILE, meta.to_json()):
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
            raise edge_error(exc, self.directory, what) from exc

    def optimize(self) -> None:
        """Create the payload indexes if missing, then run Edge's optimizers (merge segments, build the
        HNSW index); blocks until done. Filters work without the indexes; they make big stores fast.
        (Each index costs an fsync'd WAL entry, so they are made here, not per ensure_collection.)"""
        shard = self._live_shard()
        if shard is not None:
            self._space("optimize", optimize_need_bytes(self._shard_path) / MB, plus_margin=True)
            with self._errors("optimize"):
                create_edge_indexes(shard)
                shard.optimize()

    def ensure_payload_indexes(self) -> None:
        """Create the payload indexes that are missing (filters on a store without them scan every payload:
        tens of ms per query at 10,000 images); nothing to do, and no write, once they exist."""
        shard = self._live_shard()
        if shard is not None:
            self._space("index its payload")
            with self._errors("index its payload"):
                create_edge_indexes(shard)

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
                held = shard.count(edge.CountRequest(exact=True))
            self._save_points(held)

    def close(self) -> None:
        """Flush and close the shard, releasing the directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        shard, self._shard = self._shard, None
        try:
            if shard is not None:
                with self._errors("close"):
                    held = shard.count(edge.CountRequest(exact=True))
                    shard.close()
                self._save_points(held)
        finally:
            self._lock.release()

    # -- primitives ------------------------------------------------------------------------------------
    def _upsert_batch(self, points: list[StoredPoint]) -> None:
        shard = self._writable_shard()
        self._space("write")
        with self._errors("upsert"):
            for part in batches(points, UPDATE_POINTS):
                edge_points = [
                    edge.Point(p.id, _vector_list(cast(Vector, p.vector)), normalise_payload(p.payload)) for p in part
                ]
                shard.update(edge.UpdateOperation.upsert_points(edge_points))

    def _delete_batch(self, ids: list[str]) -> None:
        shard = self._live_shard()
        if shard is not None:
            self._space("write")
            # Lower the recorded count first: a crash between the two leaves more points than recorded, never fewer.
            with self._errors("delete"):
                existing = len(shard.retrieve(edge_ids(ids), with_payload=False, with_vector=False))
            if existing and self._points.points is not None:
                self._points_after_delete(existing)
            with self._errors("delete"):
                shard.update(edge.UpdateOperation.delete_points(edge_ids(ids)))

    def _points_after_delete(self, existing: int) -> None:
        try:
            self._points.save(max(0, (self._points.points or 0) - existing))
        except OSError as exc:
            raise StoreError(f"the store at {self.directory} cannot record its point count: {_reason(exc)}") from exc

    def _set_payload_batch(self, ids: list[str], payload: dict[str, Any]) -> None:
        shard = self._live_shard()
        if shard is None:
            return
        self._space("write")
        by_id = edge.Filter(must=[edge.HasIdCondition(set(edge_ids(ids)))])
        with self._errors("set payload"):
            shard.update(edge.UpdateOperation.set_payload_by_filter(by_id, payload))


class EdgeStoreCopy(EdgeStore):
    """A read-only store read from a temporary copy of its directory (sparse, like `cp -a --sparse=always`),
    deleted at close; `location` names the original. For commands that only read."""

    def __init__(self, directory: Path) -> None:
        original = Path(directory).expanduser().absolute()
        self._copy_root = Path(tempfile.mkdtemp(prefix="indexer-readonly-"))
        copy = self._copy_root / "store"
        log.warning("the store at %s is read-only: reading a temporary copy (%s)", original, copy)
        try:
            copy_tree(original, copy)
            super().__init__(copy, min_free_mb=0.0)
        except BaseException:
            shutil.rmtree(self._copy_root, ignore_errors=True)
            raise
        self.location = str(original)

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._copy_root, ignore_errors=True)
