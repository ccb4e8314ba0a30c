"""The decode stage's worker pool: `DecodePool` runs `indexer.decode.image.decode_file` in worker processes
(forkserver/spawn, never fork: the parent holds torch threads) and yields results in input order with a bounded
look-ahead. On the default "shm" transport workers decode chunks of files into shared-memory slots
(`indexer.decode.shm`) and only metadata crosses the pipe; "pickle" sends each decoded array back. What runs in the
workers is `indexer.decode.worker` (with the test-only crash hook, ``CRASH_ENV``); they exit when the process that
made the pool dies. This module must not import torch: the forkserver preloads it for every worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver  # imported here, not by the pool's first start: that may run while another
import multiprocessing.popen_forkserver  # thread imports torch (LazyModel.start), and imports of the same
import multiprocessing.resource_tracker  # modules from two threads at once can deadlock
import multiprocessing.shared_memory
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

from indexer.decode import shm as shm
from indexer.decode.budget import BudgetStats, DecodeBudget
from indexer.decode.geometry import Pixels, check_spec
from indexer.decode.image import decode_file
from indexer.decode.worker import CRASH_ENV as CRASH_ENV
from indexer.decode.worker import Row, decode_chunk, decode_one, init_worker
from indexer.errors import IndexerError
from indexer.records import Decoded, DecodeLimits, Failure, ImageMeta, PreprocessSpec

__all__ = ["TRANSPORTS", "DecodePool", "default_workers"]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds an interrupted pool waits for its workers and its manager thread to end


def default_workers() -> int:
    """How many CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (workers fork from a clean server with this module already imported,
    so a worker starts in milliseconds), else spawn. Never fork: the parent holds torch threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # takes effect when the server starts
    return context


Result = Decoded | Failure
TRANSPORTS = ("shm", "pickle")
_Pending = tuple[Path, "Future[Result]"]
_CRASHED = "decoder crashed: the worker process died while decoding this file"
_MAX_CRASHES_IN_A_ROW = 8  # isolated crashes of consecutive files: the pool is unusable, not the files
_PAUSED = 0.001  # seconds before asking again a source that paused while nothing was in flight
_CHUNK_MAX = 32  # files per task on the shm transport: a task costs the main process ~0.7 ms (bench/README.md)


def _take(source: Iterator[Path | None], room: int) -> tuple[list[Path], bool]:
    """Up to ``room`` paths from ``source``, fewer where it pauses (yields None); and whether it has ended."""
    paths: list[Path] = []
    if room <= 0:
        return paths, False
    for path in source:
        if path is None:
            return paths, False
        paths.append(path)
        if len(paths) >= room:
            return paths, False
    return paths, True


def _row_result(path: Path, row: Row, pixels: Pixels) -> Result:
    if isinstance(row, str):
        return Failure(path, row)
    size, mtime_ns, sha256, width, height, fmt = row
    return Decoded(ImageMeta(path, size, mtime_ns, sha256, width, height, fmt), pixels)


def _shm_or_pickle(spec: PreprocessSpec, lookahead: int) -> str:
    """ "shm" when /dev/shm has room for twice the look-ahead's pixels (slots in use plus slots being refilled),
    else "pickle", said once: a full tmpfs would kill the workers (SIGBUS) instead of slowing them down."""
    need = 2 * lookahead * 3 * spec.image_size**2
    free = shm.free_bytes()
    if free >= need:
        return "shm"
    log.warning(
        "%s has %d MB free and the decoders' shared memory needs up to %d MB: their pixels are pickled instead "
        "(slower; in a container give it more, e.g. docker run --shm-size=1g, compose shm_size)",
        shm.SHM_DIR,
        free >> 20,
        round(need / 2**20),
    )
    return "pickle"


def _start_workers(workers: int, limits: DecodeLimits) -> tuple[ProcessPoolExecutor, DecodeBudget | None]:
    """A new set of worker processes, and the memory budget they share: a new one with each set, so that a share
    a dead worker held goes away with the workers it was shared by (`indexer.decode.budget`)."""
    context = _mp_context()
    budget = DecodeBudget.for_pool(context, limits.memory_budget, workers)
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=init_worker,
        initargs=(os.environ.get(CRASH_ENV), os.getpid(), budget),
    )
    return executor, budget


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """An interrupted run's shutdown: cancel the waiting files, end the workers now (they ignore Ctrl-C and would
    finish their chunks first) and join the executor's manager thread, each bounded by STOP_TIMEOUT.

    Without this the manager thread (not a daemon) outlives the command, so the CLI's exit cannot skip the
    interpreter's teardown: it waits for the workers' chunks, then frees torch's objects one by one (gc), which
    took 7-15 s after a Ctrl-C on the 2-core test machine, over 60 s under load."""
    workers = list((executor._processes or {}).values())
    manager: threading.Thread | None = getattr(executor, "_executor_manager_thread", None)  # typeshed mistypes it
    executor.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        with contextlib.suppress(OSError, ValueError):  # gone already, or closed
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in workers:
        with contextlib.suppress(ValueError):
            process.join(max(0.0, deadline - time.monotonic()))
    if manager is not None:
        manager.join(max(0.0, deadline - time.monotonic()))


class _Chunk(NamedTuple):
    paths: list[Path]
    slot: shm.Slot
    future: Future[list[Row]]


class DecodePool:
    """Decode files in worker processes; results come back in input order.

    At most `lookahead` files are taken from the input and not yet yielded, so memory stays bounded on
    any tree. `workers=0` decodes in-process. A worker that dies costs only the file it was decoding
    (reported as "decoder crashed: ..."); the pool is rebuilt for the rest.

    Transport (how pixels come back from the workers): "shm" (the default where /dev/shm exists) sends
    chunks of up to 32 files per task and workers write pixels into shared-memory slots, so a Decoded's
    `pixels` is a read-only view of shared memory and only metadata is pickled; "pickle" sends one
    future and one pickled array per file (the transport before shared memory, kept for comparison).
    """

    def __init__(
        self, spec: PreprocessSpec, limits: DecodeLimits, workers: int, lookahead: int, transport: str = "shm"
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, not {lookahead}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        check_spec(spec)
        self.spec = spec
        self.limits = limits
        self.workers = workers
        self.lookahead = lookahead
        self.transport = transport if transport == "pickle" or shm.available() else "pickle"
        if self.transport == "shm" and workers > 0:
            self.transport = _shm_or_pickle(spec, lookahead)
        self.chunk = max(1, min(_CHUNK_MAX, lookahead // (2 * max(workers, 1))))
        self._executor: ProcessPoolExecutor | None = None
        self._budget: DecodeBudget | None = None  # the memory budget of the executor's workers
        self._ring: shm.SlotRing | None = None
        self._closed = False
        self._crashes_in_a_row = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Shut the workers down, cancelling files not yet started (wait=False: don't wait for the rest);
        unlink the shared-memory slots (pixel views still held stay readable)."""
        self._closed = True
        if wait:
            self._shutdown(wait=True)
        else:
            self._stop_now()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def imap(self, paths: Iterable[Path | None]) -> Generator[Result, None, None]:
        """Decode `paths` lazily; yields one Decoded or Failure per path, in input order.

        Closing the generator early (or dropping it) cancels the files it had submitted. A None from `paths` means
        "nothing more for now": the pool goes on collecting what it submitted and asks again later (a source fed as
        work arrives, `indexer.decode.mixed`; it should block instead while the pool has nothing in flight)."""
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self.workers == 0:
            return (decode_file(path, self.spec, self.limits) for path in paths if path is not None)
        if self.transport == "shm":
            return self._imap_shm(iter(paths))
        return self._imap_pool(iter(paths))

    # -- internals ---------------------------------------------------------------------------------

    def _shutdown(self, wait: bool) -> None:
        if not wait:  # a broken pool (a worker died): end its other workers too, or Python 3.11's exit waits on them
            self._stop_now()
            return
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _stop_now(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            _stop_workers(executor)

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self._executor is None:
            self._executor, self._budget = _start_workers(self.workers, self.limits)
        return self._executor

    def _report_budget(self) -> None:
        if self._budget is not None:
            self._budget.report()

    def budget_stats(self) -> BudgetStats | None:
        """The counters of the current workers' memory budget (a rebuilt pool starts a new one); None without."""
        return None if self._budget is None else self._budget.stats()

    def _submit(self, path: Path) -> Future[Result]:
        try:
            return self._pool().submit(decode_one, path, self.spec, self.limits)
        except BrokenProcessPool as exc:  # broke since the last result: report it like a crash
            future: Future[Result] = Future()
            future.set_exception(exc)
            return future

    def _fill(self, pending: deque[_Pending], source: Iterator[Path | None]) -> bool:
        paths, ended = _take(source, self.lookahead - len(pending))
        for path in paths:
            pending.append((path, self._submit(path)))
        return ended

    def _imap_pool(self, source: Iterator[Path | None]) -> Generator[Result, None, None]:
        pending: deque[_Pending] = deque()
        try:
            while True:
                ended = self._fill(pending, source)
                if not pending:
                    if ended:
                        return
                    time.sleep(_PAUSED)  # paused with nothing in flight: ask again
                    continue
                path, future = pending.popleft()
                result = _collect(path, future)
                if result is None:
                    suspects = [(path, future), *pending]
                    pending.clear()
                    yield from self._recover(suspects)
                else:
                    self._crashes_in_a_row = 0
                    self._report_budget()
                    yield result
        finally:
            for _, future in pending:
                future.cancel()

    def _recover(self, suspects: list[_Pending]) -> Iterator[Result]:
        """After a crash: rebuild the pool and decode the files that were in flight one at a time,
        so the one that kills its worker is identified and costs only itself."""
        self._shutdown(wait=False)
        for path, future in suspects:
            done = future.done() and not future.cancelled() and future.exception() is None
            yield future.result() if done else self._decode_alone(path)

    def _decode_alone(self, path: Path) -> Result:
        if self.transport == "shm":
            chunk = self._submit_chunk([path])
            rows = _collect_chunk(chunk)
            result = None if rows is None else _results(chunk, rows)[0]
            if rows is None:
                self._ring_discard(chunk.slot)
        else:
            result = _collect(path, self._submit(path))
        if result is not None:
            self._crashes_in_a_row = 0
            return result
        self._shutdown(wait=False)
        self._crashes_in_a_row += 1
        if self._crashes_in_a_row >= _MAX_CRASHES_IN_A_ROW:  # the workers cannot run at all
            raise IndexerError(
                f"decoder worker processes keep dying ({self._crashes_in_a_row} files in a row, "
                f"last {path}); decode in-process (workers=0) to see why"
            )
        return Failure(path, _CRASHED)

    # -- the shm transport -------------------------------------------------------------------------

    def _slots(self) -> shm.SlotRing:
        if self._ring is None:
            self._ring = shm.SlotRing(self.chunk, (3, self.spec.image_size, self.spec.image_size))
        return self._ring

    def _ring_discard(self, slot: shm.Slot) -> None:
        if self._ring is not None:
            self._ring.discard(slot)

    def _submit_chunk(self, paths: list[Path]) -> _Chunk:
        slot = self._slots().acquire()
        try:
            future = self._pool().submit(decode_chunk, slot.name, slot.rows, paths, self.spec, self.limits)
        except BrokenProcessPool as exc:  # broke since the last result: report it like a crash
            future = Future()
            future.set_exception(exc)
        return _Chunk(paths, slot, future)

    def _fill_chunks(self, pending: deque[_Chunk], source: Iterator[Path | None]) -> bool:
        room = self.lookahead - sum(len(c.paths) for c in pending)
        paths, ended = _take(source, room)
        size = self.chunk
        if ended:  # the input's tail (or a short job): spread it over every worker
            size = max(1, min(size, -(-len(paths) // (2 * self.workers))))
        for i in range(0, len(paths), size):
            pending.append(self._submit_chunk(paths[i : i + size]))
        return ended

    def _imap_shm(self, source: Iterator[Path | None]) -> Generator[Result, None, None]:
        pending: deque[_Chunk] = deque()
        try:
            while True:
                ended = self._fill_chunks(pending, source)
                if not pending:
                    if ended:
                        return
                    time.sleep(_PAUSED)  # paused with nothing in flight: ask again
                    continue
                chunk = pending.popleft()
                rows = _collect_chunk(chunk)
                if rows is None:
                    suspects = [chunk, *pending]
                    pending.clear()
                    yield from self._recover_chunks(suspects)
                else:
                    self._crashes_in_a_row = 0
                    self._report_budget()
                    yield from _results(chunk, rows)
        finally:
            for chunk in pending:
                if chunk.future.cancel():
                    chunk.slot.leased = False
                else:  # a worker may still be writing into it
                    self._ring_discard(chunk.slot)

    def _recover_chunks(self, suspects: list[_Chunk]) -> Iterator[Result]:
        """After a crash: rebuild the pool; chunks that finished are handed out, the files of the others are
        decoded one at a time, so the one that kills its worker is identified and costs only itself."""
        self._shutdown(wait=False)
        for chunk in suspects:
            future = chunk.future
            if future.done() and not future.cancelled() and future.exception() is None:
                yield from _results(chunk, future.result())
                continue
            self._ring_discard(chunk.slot)
            for path in chunk.paths:
                yield self._decode_alone(path)


def _collect(path: Path, future: Future[Result]) -> Result | None:
    """The future's result; None when its worker process died (or a pool rebuild cancelled it)."""
    try:
        return future.result()
    except (BrokenProcessPool, CancelledError):
        return None
    except Exception as exc:  # e.g. a result that could not be pickled
        return Failure(path, f"decoder failed: {type(exc).__name__}: {exc}")


def _collect_chunk(chunk: _Chunk) -> list[Row] | None:
    """The chunk's rows; None when its worker process died (or a pool rebuild cancelled it)."""
    try:
        return chunk.future.result()
    except (BrokenProcessPool, CancelledError):
        return None
    except Exception as exc:  # e.g. a task that could not be pickled
        return [f"decoder failed: {type(exc).__name__}: {exc}" for _ in chunk.paths]


def _results(chunk: _Chunk, rows: list[Row]) -> list[Result]:
    """Decoded records viewing the slot's rows (no copy); the slot is reusable once they are all dropped."""
    pixels = chunk.slot.array
    out = [_row_result(path, row, pixels[i]) for i, (path, row) in enumerate(zip(chunk.paths, rows, strict=True))]
    chunk.slot.leased = False
    return out
