"""Watch events as values: what the observers report (`FsEvent`), what the daemon acts on (`FileChange`), the small
callable filters, and the `Coalescer` that decides when a file is complete.

A file is complete on close-after-write where the platform reports it (inotify), immediately when it was renamed or
moved into place (a rename is atomic), and otherwise once its size and mtime have been stable for ``stable_seconds``
(polling, files that appeared without events, files written but never closed after ``unclosed_timeout``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Names that are still being written or are not the user's files: browser downloads, editors, copy tools.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", ".!qb")
_STAT_EVERY = 0.1  # seconds between two stability checks of one file


# --- value objects ------------------------------------------------------------------------------------------------


class EventKind(Enum):
    """What the filesystem reported about one path (after filtering)."""

    CREATED = "created"
    MODIFIED = "modified"  # bytes written
    ATTRIB = "attrib"  # metadata only (touch, chmod)
    CLOSED = "closed"  # close after write
    DELETED = "deleted"
    MOVED = "moved"  # within the watched files: path → dest
    MOVED_IN = "moved_in"  # renamed or moved into place from a temporary name or from outside: complete
    DIR_GONE = "dir_gone"  # a folder deleted or moved out: everything under it


@dataclass(frozen=True, slots=True)
class FsEvent:
    """One filtered filesystem event. ``closes``: whether its source reports close-after-write."""

    kind: EventKind
    path: Path
    dest: Path | None = None
    closes: bool = True
    at: float = field(default_factory=time.monotonic)


class ChangeKind(Enum):
    """What the store has to do for one path."""

    UPSERT = "upsert"
    DELETE = "delete"
    MOVE = "move"
    DELETE_TREE = "delete_tree"


@dataclass(frozen=True, slots=True)
class FileChange:
    """A complete change, ready for the pipeline. ``src``: where a moved file came from.
    ``ready_at``: monotonic time the file became complete (the start of its latency)."""

    kind: ChangeKind
    path: Path
    src: Path | None = None
    ready_at: float = 0.0


# --- filters (True: keep) ------------------------------------------------------------------------------------------


class PathFilter(Protocol):
    """A small callable deciding whether a path is watched."""

    def __call__(self, path: Path) -> bool: ...


class NotPartial:
    """Reject temporary and partial names: ``.part``, ``.tmp``, ``.crdownload``, ``~`` files, ..."""

    def __call__(self, path: Path) -> bool:
        name = path.name.lower()
        return not (name.endswith(PARTIAL_SUFFIXES) or name.startswith("~") or name.endswith("~"))


class ImageFiles:
    """Keep files whose extension is one the decoder reads."""

    def __init__(self, extensions: frozenset[str]) -> None:
        self.extensions = extensions

    def __call__(self, path: Path) -> bool:
        return path.suffix.lower() in self.extensions


class VisibleUnder:
    """Reject dot files and anything inside a dot folder below ``root`` (unless hidden files are indexed)."""

    def __init__(self, root: Path, include_hidden: bool = False) -> None:
        self.root = root
        self.include_hidden = include_hidden

    def __call__(self, path: Path) -> bool:
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return False  # outside the root
        return self.include_hidden or not any(part.startswith(".") for part in parts)


class AllOf:
    """Keep a path only if every filter keeps it."""

    def __init__(self, *filters: PathFilter) -> None:
        self.filters = filters

    def __call__(self, path: Path) -> bool:
        return all(f(path) for f in self.filters)


def default_filter(root: Path, extensions: frozenset[str], include_hidden: bool = False) -> AllOf:
    """The files of ``root`` the daemon indexes: visible, complete names, images."""
    return AllOf(VisibleUnder(root, include_hidden), NotPartial(), ImageFiles(extensions))


# --- the coalescer -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """What is known about one path since it was last handed out."""

    closes: bool
    deleted: bool = False
    complete: bool = False  # closed after writing, or renamed into place
    writing: bool = False  # bytes written since the last close
    moved_from: Path | None = None
    signature: tuple[int, int] | None = None  # (size, mtime_ns) at the last stability check
    stable_since: float = 0.0
    next_check: float = 0.0
    ready_at: float | None = None


class Coalescer:
    """Per-path state between the observers and the embedding worker; thread-safe and bounded.

    ``feed`` takes events (observer threads); ``refresh`` decides which entries are complete (worker thread, it
    stats the files that need a stability check); ``take`` hands the complete ones out as FileChange objects,
    oldest first. An event for a path that is not yet handed out merges into its entry (debounce). Past
    ``capacity`` paths, events are dropped and ``overflowed`` is set: the caller rescans.
    """

    def __init__(self, *, stable_seconds: float, unclosed_timeout: float, capacity: int) -> None:
        self.stable_seconds = stable_seconds
        self.unclosed_timeout = unclosed_timeout
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: dict[Path, _Entry] = {}
        self._trees: dict[Path, float] = {}  # folders gone → time
        self._ready: dict[Path, float] = {}  # insertion order ≈ ready order
        self._overflowed = False
        self.seen = 0  # new paths accepted (a metric)

    # -- feeding (observer threads) -------------------------------------------------------------------------------

    def feed(self, event: FsEvent) -> None:
        """Merge one event into the state of its path(s)."""
        with self._lock:
            if event.kind is EventKind.DIR_GONE:
                self._dir_gone(event.path, event.at)
            elif event.kind is EventKind.MOVED and event.dest is not None:
                self._moved(event.path, event.dest, event)
            else:
                entry = self._entry(event.path, event.closes)
                if entry is not None:
                    _apply(entry, event.kind)
                    self._unready(event.path)

    def add_unsettled(self, paths: Iterable[Path], closes: bool = False) -> None:
        """Files found by a scan that may still be written: taken once stable (or closed)."""
        for path in paths:
            self.feed(FsEvent(EventKind.CREATED, path, closes=closes))

    def _entry(self, path: Path, closes: bool) -> _Entry | None:
        entry = self._entries.get(path)
        if entry is not None:
            entry.closes = entry.closes and closes
            return entry
        if len(self._entries) >= self.capacity:
            if not self._overflowed:
                log.warning("more than %d files waiting: dropping events, a rescan follows", self.capacity)
            self._overflowed = True
            return None
        self.seen += 1
        entry = self._entries[path] = _Entry(closes=closes)
        return entry

    def _moved(self, src: Path, dest: Path, event: FsEvent) -> None:
        old = self._entries.pop(src, None)
        self._unready(src)
        entry = self._entry(dest, event.closes)
        if entry is None:
            return
        self._unready(dest)
        entry.deleted = False
        entry.moved_from = (old.moved_from if old is not None else None) or src
        if old is not None and old.writing:
            entry.writing, entry.complete = True, False  # renamed while still being written
        else:
            entry.writing, entry.complete = False, True

    def _dir_gone(self, folder: Path, at: float) -> None:
        for path in [p for p in self._entries if folder in p.parents]:
            self._unready(path)
            entry = self._entries.pop(path)
            origin = entry.moved_from
            if origin is not None and folder not in origin.parents:  # moved in from elsewhere, then gone
                self._entries[origin] = _Entry(closes=entry.closes, deleted=True)
        self._trees[folder] = at

    def _unready(self, path: Path) -> None:
        self._ready.pop(path, None)
        entry = self._entries.get(path)
        if entry is not None:
            entry.ready_at = None

    # -- deciding (worker thread) ---------------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """Mark the entries that are complete now (stats the ones that need a stability check)."""
        with self._lock:
            for path, entry in self._entries.items():
                if entry.ready_at is None and self._is_complete(path, entry, now):
                    entry.ready_at = now
                    self._ready[path] = now
            for folder, at in self._trees.items():
                self._ready.setdefault(folder, at)

    def _is_complete(self, path: Path, entry: _Entry, now: float) -> bool:
        if entry.deleted or (entry.complete and not entry.writing):
            return True
        if now < entry.next_check:
            return False
        entry.next_check = now + _STAT_EVERY
        try:
            st = os.stat(path)
        except FileNotFoundError:
            entry.deleted = True  # gone before it was complete
            return True
        except OSError:
            return False
        signature = (st.st_size, st.st_mtime_ns)
        if signature != entry.signature:
            entry.signature, entry.stable_since = signature, now
            return False
        wait = self.unclosed_timeout if (entry.closes and entry.writing) else self.stable_seconds
        return now - entry.stable_since >= wait

    def ready_count(self) -> int:
        """How many complete changes wait (folders gone included)."""
        with self._lock:
            return len(self._ready)

    def oldest_ready(self) -> float | None:
        """When the oldest waiting complete change became complete (monotonic), or None."""
        with self._lock:
            return min(self._ready.values(), default=None)

    def take(self, limit: int) -> list[FileChange]:
        """Hand out up to ``limit`` complete changes, oldest first; they leave the coalescer."""
        with self._lock:
            picked = sorted(self._ready.items(), key=lambda item: item[1])[:limit]
            return [self._hand_out(path, at) for path, at in picked]

    def _hand_out(self, path: Path, at: float) -> FileChange:
        del self._ready[path]
        if path in self._trees:
            del self._trees[path]
            return FileChange(ChangeKind.DELETE_TREE, path, ready_at=at)
        entry = self._entries.pop(path)
        if entry.deleted:
            return FileChange(ChangeKind.DELETE, path, src=entry.moved_from, ready_at=at)
        if entry.moved_from is not None:
            return FileChange(ChangeKind.MOVE, path, src=entry.moved_from, ready_at=at)
        return FileChange(ChangeKind.UPSERT, path, ready_at=at)

    def pending(self) -> int:
        """Paths (and folders) known but not handed out yet: the queue depth."""
        with self._lock:
            return len(self._entries) + len(self._trees)

    def take_overflow(self) -> bool:
        """True once after events were dropped (the caller rescans)."""
        with self._lock:
            flag, self._overflowed = self._overflowed, False
            return flag

    def forget_under(self, root: Path) -> int:
        """Drop every entry under ``root`` (a root that went away); returns how many."""
        with self._lock:
            gone = [p for p in self._entries if root in p.parents]
            for path in gone:
                del self._entries[path]
                self._unready(path)
            for folder in [f for f in self._trees if f == root or root in f.parents]:
                del self._trees[folder]
                self._ready.pop(folder, None)
            return len(gone)


def _apply(entry: _Entry, kind: EventKind) -> None:
    """Merge one single-path event into an entry."""
    if kind is EventKind.DELETED:
        entry.deleted, entry.writing, entry.complete = True, False, False
        return
    entry.deleted = False
    if kind is EventKind.MODIFIED:
        entry.writing, entry.complete = True, False
    elif kind is EventKind.CLOSED or kind is EventKind.MOVED_IN:
        entry.writing, entry.complete = False, True
    # CREATED, ATTRIB: nothing known yet; the stability check decides unless a close comes first


# --- watchdog → FsEvent ----------------------------------------------------------------------------------------------


Sink = Callable[[FsEvent], None]
