"""Shared-memory batch slots: decode workers write pixels straight into memory the main process reads.

A `Slot` is one POSIX shared-memory segment (a file under /dev/shm) holding ``rows`` images of one shape,
uint8. The main process owns every segment: it creates them, hands their names to the workers with each
chunk of files, and unlinks them when the pool closes (a worker only maps them). If the main process
dies without closing, multiprocessing's resource tracker unlinks what it registered, so nothing is left
in /dev/shm.

A slot is reusable once no pixel array handed out from it is alive: the pool yields row *views* (no copy),
and the slot counts the references to its mapping to know when the consumer let go of them. A consumer
that keeps every image (``list(pool.imap(...))``) just makes the ring grow, like pickled arrays would.

This module must not import torch: decode workers import it.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import secrets
import sys
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["SHM_DIR", "Slot", "SlotRing", "attach", "available", "free_bytes", "segment_prefix"]

SHM_DIR = Path("/dev/shm")
_TRACKER_KIND = "shared_memory"  # the resource tracker unlinks these with shm_unlink("/" + name)

Pixels = npt.NDArray[np.uint8]


def available() -> bool:
    """Whether POSIX shared memory is usable here (Linux: a writable /dev/shm)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def free_bytes() -> int:
    """Space left in /dev/shm. Segments are sparse: a worker writing pixels into a full tmpfs dies of SIGBUS, so
    the pool checks this first (Docker gives a container 64 MB unless told ``--shm-size``)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def segment_prefix(pid: int | None = None) -> str:
    """The name prefix of the segments a process creates (tests look for leftovers with it)."""
    return f"indexer-{os.getpid() if pid is None else pid}-"


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class Slot:
    """One segment of ``rows`` images of ``shape``; `array` is (rows, *shape) over the shared bytes."""

    def __init__(self, name: str, rows: int, shape: tuple[int, ...]) -> None:
        self.name, self.rows, self.shape = name, rows, shape
        size = rows * int(np.prod(shape))
        self._mm = _map(SHM_DIR / name, size, create=True)
        resource_tracker.register("/" + name, _TRACKER_KIND)
        # numpy collapses view chains onto `_flat`: every pixel view handed out holds one reference to it.
        self._flat: Pixels = np.frombuffer(self._mm, dtype=np.uint8)
        self.array: Pixels = self._flat.reshape(rows, *shape)
        self.array.flags.writeable = False  # the main process only reads; workers write
        self.leased = False  # between acquire() and the pool handing its rows out
        self._baseline = sys.getrefcount(self._flat)

    def idle(self) -> bool:
        """True when not leased and no view of its pixels is alive outside this object."""
        return not self.leased and sys.getrefcount(self._flat) <= self._baseline

    def unlink(self) -> None:
        """Remove the segment's name (the mapping lives on while views of it do)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)
        resource_tracker.unregister("/" + self.name, _TRACKER_KIND)


class SlotRing:
    """The main process's slots for one pool; grows when every slot is still in use."""

    def __init__(self, rows: int, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, shape
        self._slots: list[Slot] = []
        self._tag = f"{segment_prefix()}{secrets.token_hex(4)}-"
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._slots)

    def acquire(self) -> Slot:
        """An idle slot (or a new one), leased to the caller until `Slot.leased` is cleared."""
        slot = next((s for s in self._slots if s.idle()), None)
        if slot is None:
            slot = Slot(f"{self._tag}{next(self._ids)}", self.rows, self.shape)
            self._slots.append(slot)
        slot.leased = True
        return slot

    def discard(self, slot: Slot) -> None:
        """Never reuse this slot (a worker of a pool being torn down may still write into it)."""
        if slot in self._slots:
            self._slots.remove(slot)
            slot.unlink()

    def close(self) -> None:
        """Unlink every segment; pixel views still alive keep their memory until they die."""
        for slot in self._slots:
            slot.unlink()
        self._slots.clear()


# --- the worker side ---------------------------------------------------------------------------------------------

_attached: dict[str, Pixels] = {}  # per worker process: segment name → its (rows, *shape) array


def attach(name: str, rows: int, shape: tuple[int, ...]) -> Pixels:
    """A worker's view of the main process's segment ``name`` (mapped once per process, never unlinked here)."""
    array = _attached.get(name)
    if array is None:
        mm = _map(SHM_DIR / name, rows * int(np.prod(shape)), create=False)
        array = np.frombuffer(mm, dtype=np.uint8).reshape(rows, *shape)
        _attached[name] = array
    return array
