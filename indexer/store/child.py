"""`ChildStore`: the embedded store opened in a process of its own, for `indexer index` and `indexer watch`.

Qdrant Edge converts each point's payload and writes it while holding the GIL: about 0.1 ms of the main process's
CPU per image (bench/README.md), taken from the threads that feed the model and the decoders. In a child process
that work runs beside them; the main process only pickles the points (≈ 6 µs each). The child answers the
VectorStore calls one at a time over a socket pair, in the order they are made; an error there is raised here with
its type and message (`indexer.errors.body_for`), so the CLI's exit codes still apply. The commands that embed use
it (``store.separate_process``; the daemon's searches go through it too); `indexer serve` opens the store itself.

The child is in a process group of its own: Ctrl-C in the terminal reaches the command's group, not the child, and
the command still writes what its run has queued, then `close` flushes. (Not a session of its own: with the
scheduler's autogroups, a new session competes with this whole session as an equal, so the niced decode workers no
longer yield to it; the payload indexes made at the first write took 0.9-1.1 s instead of 0.1-0.2 s.) It closes the
store and exits as soon as this process goes away, kill -9 included (the socket's end): an orphan never keeps the
store locked. It ignores SIGINT and SIGTERM (systemd stops a service by signalling every process of it): the
command, still writing its last batch, decides when it ends. What it logs comes back with each answer and is
logged here, through this process's handlers (text, or the daemon's JSON lines), under the same logger names.

    python -m indexer.store.child FD    the child's side (started by `ChildStore`, never by hand)
"""

from __future__ import annotations

import itertools
import logging
import pickle
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from indexer.errors import IndexerError, StoreError, body_for, error_from_body
from indexer.records import SEARCH_LIMIT, Failure, Hit, SearchFilter, StoredPoint
from indexer.store.protocol import ClosedOnExit, FailureRecord, Vector, VectorStore

__all__ = ["ChildStore"]

log = logging.getLogger(__name__)

# The calls the child answers: the VectorStore protocol and the embedded store's index upkeep.
CALLS = frozenset({
    "model_info", "ensure_collection", "upsert", "delete", "set_payload", "retrieve", "query", "count",
    "find_by_sha256", "record_failures", "clear_failures", "failures", "failure_count", "optimize", "flush",
    "ensure_payload_indexes", "indexed_vectors_count",
})  # fmt: skip


class ChildStore(ClosedOnExit):
    """A VectorStore whose embedded store (`EdgeStore`) lives in a child process, opened when this is made (its
    errors, e.g. StoreBusyError, are raised here, as `EdgeStore`'s). Calls from several threads are answered one at
    a time."""

    def __init__(self, directory: Path, *, min_free_mb: float, hnsw_ef: int = 0) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "indexer.store.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                process_group=0,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise StoreError(f"cannot start the store's process for {directory}: {exc}") from exc
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self._dropped: list[str] = []  # scroll cursors given up here, dropped there with the next call
        self._closed = False
        self.location = str(Path(directory).expanduser().absolute())
        log.info("the store at %s opens in a process of its own (pid %d)", self.location, self._process.pid)
        level = logging.getLogger("indexer").getEffectiveLevel()
        try:
            opened = self._ask("open", (self.location, min_free_mb, hnsw_ef, level), {})
        except BaseException:
            self._stop()
            raise
        self.damage: str | None = opened["damage"]

    # -- the calls -------------------------------------------------------------------------------------
    def model_info(self) -> tuple[str, int] | None:
        return self._call("model_info")  # type: ignore[no-any-return]

    def ensure_collection(self, model_id: str, dim: int) -> None:
        self._call("ensure_collection", model_id, dim)

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        self._call("upsert", list(points))

    def delete(self, ids: Sequence[str]) -> None:
        self._call("delete", list(ids))

    def set_payload(self, ids: Sequence[str], payload: dict[str, Any]) -> None:
        self._call("set_payload", list(ids), payload)

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        return self._call("retrieve", list(ids), with_vectors)  # type: ignore[no-any-return]

    def scroll(
        self, *, filter: SearchFilter | None = None, with_vectors: bool = False, batch_size: int = 1000
    ) -> Iterator[StoredPoint]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        page, cursor = self._ask("scroll", (filter, with_vectors, batch_size), {})
        try:
            while True:
                yield from page
                if cursor is None:
                    return
                page, cursor = self._ask("page", (cursor,), {})
        finally:
            if cursor is not None:  # given up early: no call from here (a generator may be closed anywhere)
                self._dropped.append(cursor)

    def query(
        self,
        vector: Vector,
        *,
        limit: int = SEARCH_LIMIT,
        offset: int = 0,
        threshold: float | None = None,
        filter: SearchFilter | None = None,
    ) -> list[Hit]:
        return self._call(  # type: ignore[no-any-return]
            "query", vector, limit=limit, offset=offset, threshold=threshold, filter=filter
        )

    def count(self, filter: SearchFilter | None = None) -> int:
        return self._call("count", filter)  # type: ignore[no-any-return]

    def find_by_sha256(self, sha256s: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        return self._call("find_by_sha256", list(sha256s), with_vectors)  # type: ignore[no-any-return]

    def record_failures(self, failures: Sequence[Failure]) -> None:
        self._call("record_failures", list(failures))

    def clear_failures(self, paths: Sequence[str]) -> None:
        self._call("clear_failures", list(paths))

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        return self._call("failures", limit)  # type: ignore[no-any-return]

    def failure_count(self) -> int:
        return self._call("failure_count")  # type: ignore[no-any-return]

    def optimize(self) -> None:
        self._call("optimize")

    def ensure_payload_indexes(self) -> None:
        self._call("ensure_payload_indexes")

    def indexed_vectors_count(self) -> int:
        return self._call("indexed_vectors_count")  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        """Close the store (a flush) and end the child; idempotent."""
        if self._closed:
            return
        if self._process.poll() is not None:  # it has ended (and a call said so): nothing to ask
            self._stop()
            return
        try:
            self._ask("close", (), {})
        finally:
            self._stop()

    # -- the wire --------------------------------------------------------------------------------------
    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreError(f"the store at {self.location} is closed")
        return self._ask(name, args, kwargs)

    def _ask(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self._send(name, args, kwargs)
            return self._receive(name)

    def _send(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        dropped, self._dropped = self._dropped, []
        try:
            self._conn.send_bytes(pickle.dumps((name, args, kwargs, dropped), protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise self._gone() from exc

    def _receive(self, name: str) -> Any:
        try:
            kind, value, records = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise self._gone() from exc
        for fields in records:  # what the child logged meanwhile, through this process's handlers
            logger = logging.getLogger(fields["name"])
            if logger.isEnabledFor(fields["levelno"]):
                logger.handle(logging.makeLogRecord(fields))
        if kind == "ok":
            return value
        if kind == "error":
            raise error_from_body(value, f"the store's process failed in {name}")
        raise value

    def _gone(self) -> StoreError:
        try:
            code = self._process.wait(timeout=5)
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            how = "no answer"
        return StoreError(f"the store's process (pid {self._process.pid}) ended unexpectedly ({how}); "
                          "what it had stored is kept")  # fmt: skip

    def _stop(self) -> None:
        self._closed = True
        self._conn.close()  # the child sees the end, closes the store if still open, and exits
        try:
            self._process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log.error("the store's process (pid %d) did not end: killing it", self._process.pid)
            self._process.kill()
            self._process.wait()


# -- the child's side ----------------------------------------------------------------------------------
class _Forward(logging.Handler):
    """Keeps the child's log records (as plain fields) until the next answer carries them to the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc_text = logging.Formatter().formatException(record.exc_info) if record.exc_info else None
        self.records.append(
            {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
             "msg": record.getMessage(), "created": record.created, "exc_text": exc_text}
        )  # fmt: skip

    def take(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records

    def flush_to_stderr(self) -> None:
        """Records no answer will carry (the parent has gone): straight to stderr."""
        for fields in self.take():
            print(f"{fields['levelname']} {fields['name']}: {fields['msg']}", file=sys.stderr)


FORWARD = _Forward()


def _error(exc: Exception) -> tuple[str, Any]:
    if isinstance(exc, IndexerError):
        return ("error", body_for(exc))
    try:
        pickle.dumps(exc)
    except Exception:
        exc = StoreError(f"{type(exc).__name__}: {exc}")
    return ("raise", exc)


class _Server:
    """The child: one store, its open scroll cursors, one call at a time."""

    def __init__(self) -> None:
        self.store: VectorStore | None = None
        self.cursors: dict[str, tuple[Iterator[StoredPoint], int]] = {}  # a scroll and its page size

    def answer(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "open":
            return self._open(*args)
        store = self.store
        if store is None:
            raise StoreError("the store's process has no open store")
        if name == "scroll":
            flt, with_vectors, batch_size = args
            cursor = uuid.uuid4().hex
            self.cursors[cursor] = (
                store.scroll(filter=flt, with_vectors=with_vectors, batch_size=batch_size),
                batch_size,
            )
            return self._page(cursor)
        if name == "page":
            if args[0] not in self.cursors:
                raise StoreError("the scroll's cursor is unknown (the store's process lost it)")
            return self._page(args[0])
        if name == "close":
            self.close()
            return None
        if name not in CALLS:
            raise StoreError(f"the store's process has no call {name!r}")
        return getattr(store, name)(*args, **kwargs)

    def drop(self, cursors: list[str]) -> None:
        for cursor in cursors:
            self.cursors.pop(cursor, None)

    def close(self) -> None:
        self.cursors.clear()
        if self.store is not None:
            store, self.store = self.store, None
            store.close()

    def _open(self, directory: str, min_free_mb: float, hnsw_ef: int, level: int) -> dict[str, Any]:
        logging.getLogger("indexer").setLevel(level)  # the parent's; its own loggers' levels apply there again
        from indexer.store.edge_store import EdgeStore

        store = EdgeStore(Path(directory), min_free_mb=min_free_mb)
        store.hnsw_ef = hnsw_ef
        self.store = store
        return {"location": store.location, "damage": store.damage}

    def _page(self, cursor: str) -> tuple[list[StoredPoint], str | None]:
        points, size = self.cursors[cursor]
        page = list(itertools.islice(points, size))
        if len(page) < size:
            self.drop([cursor])
            return page, None
        return page, cursor


def serve(conn: Connection) -> None:
    """Answer calls until the other end closes (or asks `close`); the store is closed either way."""
    server = _Server()
    try:
        while True:
            try:
                name, args, kwargs, dropped = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            server.drop(dropped)
            try:
                kind, value = "ok", server.answer(name, args, kwargs)
            except Exception as exc:
                kind, value = _error(exc)
            try:
                conn.send_bytes(pickle.dumps((kind, value, FORWARD.take()), protocol=pickle.HIGHEST_PROTOCOL))
            except (EOFError, OSError):
                return
            if name == "close":
                return
    finally:
        try:
            server.close()
        finally:
            FORWARD.flush_to_stderr()


def main() -> None:
    for stop in (signal.SIGINT, signal.SIGTERM):  # the parent decides: the end of the socket ends this process
        signal.signal(stop, signal.SIG_IGN)
    logging.getLogger().addHandler(FORWARD)
    logging.getLogger().setLevel(logging.WARNING)  # the CLI's; "indexer" gets the parent's level at the open
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
