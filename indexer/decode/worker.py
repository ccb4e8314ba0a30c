"""What runs inside a decode worker process of `indexer.decode.pool.DecodePool`: its start-up (leave Ctrl-C to the
parent, die with it, lower priority) and its two tasks, one file (`decode_one`, the "pickle" transport) or a chunk of
files into a shared-memory slot (`decode_chunk`, "shm"), each file's decode holding its share of the pool's memory
budget (`indexer.decode.budget`) when it has one. This module must not import torch: it is imported in every worker.

Test-only hook: when the environment variable ``INDEXER_TEST_CRASH_ON`` names a file (its base name) at the time a
pool starts, the worker process decoding that file exits abruptly (``os._exit``) where its pixels would be decoded,
holding its share of the memory budget (or after the decode failed, for a file that gets no further), so the tests
can check that a crashing decoder costs only its own file. Decoding in-process never reads it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import NoReturn

from indexer.decode import shm as shm
from indexer.decode.budget import DecodeBudget
from indexer.decode.image import decode_file
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

__all__ = ["CRASH_ENV", "Row", "decode_chunk", "decode_one", "init_worker"]

CRASH_ENV = "INDEXER_TEST_CRASH_ON"  # test-only, see the module docstring
WORKER_NICENESS = 10
Row = tuple[int, int, str, int, int, str] | str  # per file of a chunk: ImageMeta fields, or a failure reason

_crash_on: list[str] = []  # test hook, filled by init_worker in worker processes only
_budget: list[DecodeBudget] = []  # the pool's memory budget, filled by init_worker where it has one


def init_worker(crash_on: str | None, parent: int, budget: DecodeBudget | None = None) -> None:
    """Worker start-up: leave Ctrl-C to the parent, but die with it; join the pool's memory budget; arm the
    test-only crash hook."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watchdog", daemon=True).start()
    _lower_priority()
    if budget is not None:
        _budget.append(budget)
    if crash_on:
        _crash_on.append(crash_on)


def _exit_with(parent: int) -> None:
    """Exit as soon as process ``parent`` (the one that made the pool) is gone, however it went (kill -9 too).

    A worker's own parent is the forkserver, and nothing in the pool notices the pool's owner dying: without this
    the workers wait forever on their queue, and since they hold the forkserver's and the resource tracker's pipes,
    those two stay too (and with them the owner's stdout/stderr). Once the workers exit, both see EOF and exit."""
    try:
        pidfd = os.pidfd_open(parent)  # Linux >= 5.3: readable once the process has exited
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll
        while _alive(parent):
            time.sleep(0.5)
        os._exit(1)
    select.select([pidfd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lower_priority() -> None:
    """Decode workers yield the CPU to the model's threads: a multi-threaded matrix product that loses one
    thread to a decoder waits for it at every barrier, so sharing the cores evenly is slower than letting
    the decoders fill the gaps (measured on 2 cores: see bench/README.md)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def decode_one(path: Path, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded | Failure:
    """A worker's task on the pickle transport, and each file of a chunk (module level: it pickles by reference)."""
    if _crash_on and path.name == _crash_on[0]:
        decode_file(path, spec, limits, _die_holding)  # test-only: a decoder that takes its process down
        os._exit(70)
    if _budget:
        return decode_file(path, spec, limits, _budget[0].hold)
    return decode_file(path, spec, limits)


def _die_holding(cost: int) -> NoReturn:
    """The crash hook's reserve: exit as a decoder that crashes does, holding its share of the memory budget."""
    held = _budget[0].hold(cost) if _budget else contextlib.nullcontext()
    held.__enter__()  # ``held`` stays referenced: a context manager collected now would give the share back
    os._exit(70)


def decode_chunk(slot: str, rows: int, paths: list[Path], spec: PreprocessSpec, limits: DecodeLimits) -> list[Row]:
    """A worker's task on the shm transport: decode ``paths`` into rows 0.. of segment ``slot``; only each file's
    metadata fields (or its failure reason) go back through the pipe, without the path the main process knows."""
    array = shm.attach(slot, rows, (3, spec.image_size, spec.image_size))
    out: list[Row] = []
    for i, path in enumerate(paths):
        result = decode_one(path, spec, limits)
        if isinstance(result, Decoded):
            array[i] = result.pixels
            m = result.meta
            out.append((m.size, m.mtime_ns, m.sha256, m.width, m.height, m.format))
        else:
            out.append(result.reason)
    return out
