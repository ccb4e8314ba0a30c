"""The decode workers' memory budget: a pool's worker processes together decode big images worth at most
``capacity`` bytes at once.

Why: JPEGs decode at a reduced DCT scale (a draft), but PNG, TIFF, WebP, ... (and JPEGs with
``decode.full_resolution``) decode at full size: a 150-megapixel PNG takes ~600 MB in Pillow (which stores RGB in 4
bytes a pixel), more while it is converted. N workers that meet such images at once hold N times that, and on a
laptop the OOM killer takes a worker or the whole run. So before such a decode a worker takes its cost from the
pool's budget, and gives it back once the pixels are model-sized and the memory freed has gone back to the system
(`release_freed_memory`: glibc would keep it, and the next worker's image would come on top of it).

What a decode costs (`decode_cost`) is known from the header before any pixel is decoded: the size (after a JPEG's
draft, which is where drafts save), the mode, the format, plus the file's bytes (for a file over 256 KiB the share
is taken before it is read, from the header in its first bytes: a worker waiting for its share holds no 300 MB scan
meanwhile; `indexer.decode.image.decode_file`). The factors are the peaks of `decode_file` measured on 16 MP images
(Pillow 13, bytes a pixel): RGB 4.2; L and 1 5.0; CMYK 8.1; P 13 and RGBA 16 (composited on white: four full-size
copies); 16-bit greyscale 36 (scaled in float64); WebP RGB 17, RGBA 25 (libwebp decodes into a buffer of its own
first). An EXIF rotation adds a copy (4 a pixel) not counted.

What it covers: the worker processes of one `DecodePool` (files). Shard samples decode on threads under their own
pixel budget (`indexer.sources.shards.PixelBudget`); Ray decode tasks and the API's query images are not covered.

Small images pay nothing: a decode that costs less than the threshold (`BIG_DECODE`, 32 MiB, or less where the
budget is small: every worker decoding just under it at once holds at most half the budget) touches no shared
state; only the rest is bounded. An image bigger than the whole budget still decodes, alone: it waits until the
budget is whole and takes all of it. Requests are served in arrival order (tickets), so one that wants the whole
budget is not starved by smaller ones that keep overlapping. There is no deadlock: a worker holds one share at a
time and waits for nothing while it holds it.

Mechanism: one `multiprocessing.Condition` over a small shared array (free bytes, tickets, counters), made with
the pool's start context (forkserver or spawn) and handed to each worker by the pool's initializer, the one way a
lock reaches such workers. A worker that dies holding a share (a decoder crash, the OOM killer; even inside the
lock) never gives it back to *this* budget; but any worker death the pool did not ask for breaks the
`ProcessPoolExecutor`, and `DecodePool` then ends the other workers and starts a new executor with a new budget
(one per executor): the lost share goes away with the budget nobody uses any more. Weighed and left: fcntl
byte-range locks are released by the kernel with their process, but a share of N units is N locks (or a search for
a free run of them) under a second, global lock, and closing any descriptor of the file drops every lock of the
process; System V semaphores with SEM_UNDO are undone by the kernel too, but the semaphore set itself outlives an
owner killed with -9 (until reboot), and Python reaches them only through ctypes.

Test-only hook: when ``INDEXER_TEST_DECODE_JOURNAL`` names a file when a pool starts, every decode of its workers
appends a line to it: ``pid cost held start_ns end_ns`` (``held`` 0 for a decode under the threshold; the times
are CLOCK_MONOTONIC, taken after the share is taken and before it is given back), so tests can check from outside
that the big decodes held at once never exceed the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "BIG_DECODE",
    "JOURNAL_ENV",
    "BudgetStats",
    "DecodeBudget",
    "auto_memory_budget",
    "decode_cost",
    "release_freed_memory",
]

log = logging.getLogger(__name__)

BIG_DECODE = 32 << 20  # bytes: a decode that costs less never touches the budget (see the module docstring)
JOURNAL_ENV = "INDEXER_TEST_DECODE_JOURNAL"  # test-only, see the module docstring
AUTO_SHARE = 4  # decode.memory_mb = 0: a quarter of the memory this process may use
REPORT_EVERY = 30.0  # seconds between INFO lines saying that big decodes wait for the budget

_FREE, _NEXT, _SERVING, _TAKES, _WAITS, _WAITED_NS = range(6)  # the shared array's fields
_WEBP_EXTRA = 12  # bytes a pixel: libwebp's own buffer, copied into Pillow's


def decode_cost(width: int, height: int, mode: str, fmt: str, alpha: bool, file_bytes: int) -> int:
    """The bytes decoding an image of this header takes at its peak (``width`` x ``height``: the size it decodes
    at, after any draft; ``alpha``: it is composited on white), the file's bytes included."""
    if mode.startswith("I") or mode == "F":
        per_pixel = 36  # scaled to 8 bits in float64
    elif alpha:
        per_pixel = 16
    elif mode == "RGB":
        per_pixel = 4
    elif mode in ("1", "L"):
        per_pixel = 5  # itself, then its RGB copy
    else:
        per_pixel = 8
    if fmt == "WEBP":
        per_pixel += _WEBP_EXTRA
    return width * height * per_pixel + file_bytes


class BudgetStats(NamedTuple):
    """A budget's counters: the decodes that took a share, those that had to wait, how long they waited in all."""

    capacity: int
    free: int
    takes: int
    waits: int
    waited_s: float


class DecodeBudget:
    """``capacity`` bytes of big decodes at once, shared by the worker processes a pool starts (see the module
    docstring). Made in the pool's process, passed to each worker by the pool's initializer."""

    def __init__(self, context: BaseContext, capacity: int, workers: int, journal: str | None = None) -> None:
        self.capacity = max(1, capacity)
        self.threshold = min(BIG_DECODE, self.capacity // (2 * max(1, workers)))
        self.journal = journal
        self._cond = context.Condition(context.Lock())
        self._state = context.RawArray(ctypes.c_int64, 6)
        self._state[_FREE] = self.capacity
        self._reported = (0, -REPORT_EVERY)  # the pool's side: waits last reported, and when (monotonic)

    @classmethod
    def for_pool(cls, context: BaseContext, capacity: int, workers: int) -> DecodeBudget | None:
        """The budget of a pool's new set of workers; None where there is none (``capacity`` 0)."""
        if capacity <= 0:
            return None
        return cls(context, capacity, workers, os.environ.get(JOURNAL_ENV) or None)

    @contextlib.contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes of the budget for the duration (all of it when ``cost`` exceeds it, nothing when it
        is under the threshold); the memory freed goes back to the system before the share is given back."""
        if cost < self.threshold:
            start = time.monotonic_ns()
            yield
            self._journal(cost, 0, start)
            return
        want = min(cost, self.capacity)
        self._take(want)
        start = time.monotonic_ns()
        try:
            yield
        finally:
            release_freed_memory()
            self._journal(cost, want, start)
            self._give(want)

    def stats(self) -> BudgetStats:
        """The counters, read without the lock (each is one aligned word)."""
        s = self._state
        return BudgetStats(self.capacity, s[_FREE], s[_TAKES], s[_WAITS], s[_WAITED_NS] / 1e9)

    def report(self) -> None:
        """In the pool's process, after each result: say when big decodes have waited since the last call, at INFO
        at most every REPORT_EVERY seconds (and at DEBUG between), so that a slow run explains itself."""
        waits = self._state[_WAITS]
        seen, said = self._reported
        if waits == seen:
            return
        now = time.monotonic()
        level = logging.INFO if now - said >= REPORT_EVERY else logging.DEBUG
        self._reported = (waits, now if level == logging.INFO else said)
        stats = self.stats()
        log.log(
            level,
            "big images take turns for the decode memory budget (decode.memory_mb = %d): %d of %d waited, "
            "%.1f s in all",
            self.capacity >> 20,
            stats.waits,
            stats.takes,
            stats.waited_s,
        )

    def _take(self, want: int) -> None:
        s = self._state
        with self._cond:
            ticket = s[_NEXT]
            s[_NEXT] += 1
            s[_TAKES] += 1

            def turn() -> bool:
                return s[_SERVING] == ticket and s[_FREE] >= want

            if not turn():
                started = time.monotonic_ns()
                log.debug("waiting for %d MB of the decode memory budget (%d MB free)", want >> 20, s[_FREE] >> 20)
                self._cond.wait_for(turn)
                s[_WAITS] += 1
                s[_WAITED_NS] += time.monotonic_ns() - started
            s[_FREE] -= want
            s[_SERVING] += 1
            self._cond.notify_all()  # the next in line may fit beside this one

    def _give(self, want: int) -> None:
        with self._cond:
            self._state[_FREE] += want
            self._cond.notify_all()

    def _journal(self, cost: int, held: int, start: int) -> None:
        if self.journal is None:
            return
        line = f"{os.getpid()} {cost} {held} {start} {time.monotonic_ns()}\n".encode()
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one short write in append mode: lines from several workers never interleave
        finally:
            os.close(fd)


@functools.cache
def auto_memory_budget() -> int:
    """``decode.memory_mb = 0``: a quarter of the memory this process may use, its cgroup's limit where that is
    lower than the machine's RAM (a container). The rest is the model's, the store's, the look-ahead's, the system's.
    Worked out once per process: `decode_limits` runs for every run, shard and app, and these files do not change."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total, limit)
    return total // AUTO_SHARE


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1) in bytes; None where none is set or readable."""
    try:
        where = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in where:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max"))
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes"))
    candidates += [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for candidate in candidates:
        with contextlib.suppress(OSError, ValueError):
            text = candidate.read_text().strip()
            return None if text == "max" else int(text)
    return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps what a large image freed: a decoding thread's malloc arena does (without this, 2 threads decoding
    limit-sized images one at a time still held two images' worth, measured: 280 MB against 140 MB for one thread,
    6,000 px PNGs), and so does a worker process's heap (a 16 MP RGBA PNG left 65 MB of its 245 MB peak behind)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
