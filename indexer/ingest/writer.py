"""A background writer: store upserts and file output run on their own thread, behind a bounded queue, so the
model's thread goes on to the next batch while the last one is written.

Writes run one at a time in the order they were submitted. The queue holds at most ``depth`` writes: a slow store
slows the run down instead of filling memory. The first write that raises stops the writer: nothing after it is
run, and the same exception is raised on the submitting thread at its next `submit` or at `close` (so an error
keeps its type, and the CLI's mapping of errors to exit codes still applies). Everything submitted before it has
been written. Leaving the ``with`` block, even by an exception (Ctrl-C), first writes what is queued: a finished
batch is never dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["BackgroundWriter"]

log = logging.getLogger(__name__)

Write = Callable[[], None]
_STOP = None
POLL_SECONDS = 0.2  # how soon a queued call whose wake-up was lost is seen


class BackgroundWriter:
    """Run write calls in order on one thread; `depth` bounds how many wait."""

    def __init__(self, depth: int = 2, name: str = "writer") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, not {depth}")
        self._queue: queue.Queue[Write | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # leaving by an exception: still write what is queued, then let that exception through
            self.close()
        except Exception as error:
            if error is not exc:
                log.error("a write failed while the run was stopping: %s", error)

    def submit(self, write: Write) -> None:
        """Queue ``write``; blocks while the queue is full. Raises the error of an earlier write that failed."""
        if self._closed:
            raise RuntimeError("BackgroundWriter is closed")
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(write, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every queued write is done, stop the thread; raises the error of a write that failed."""
        if not self._closed:
            self._closed = True
            while self._thread.is_alive():
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._raise_if_failed()

    def _next(self) -> Write | None:
        """The next queued call. Polled, not waited for: a Ctrl-C that lands inside the submitting thread's
        ``Queue.put`` (between storing the item and notifying) loses the wake-up, and an untimed ``get`` then waits
        for ever while ``close`` waits for this thread (``indexer index`` alive 60 s after SIGINT, 1 run in 35)."""
        while True:
            try:
                return self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def _raise_if_failed(self) -> None:
        if self._failed.is_set() and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (write := self._next()) is not _STOP:
            try:
                write()
            except BaseException as exc:  # handed to the submitting thread; nothing after it runs
                self._error = exc
                self._failed.set()
                return
