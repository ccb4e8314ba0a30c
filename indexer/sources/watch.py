"""Watch stage: filesystem events (watchdog) → filtered, debounced value objects, emitted once a file is complete.

    observer thread(s)        one watchdog observer per root: inotify, or polling (``--poll``, or when the inotify
          │                   watch limit is reached for that root)
          ▼
    _Handler                  watchdog event → FsEvent, filtered by small callable filters (temporary and partial
          │                   names, dot files, non-images)
          ▼
    Coalescer (events.py)     one entry per path, bounded: decides when a file is complete and hands out
                              FileChange value objects (upsert, delete, move, delete a whole folder)

A file is complete on close-after-write where the platform reports it (inotify), immediately when it was renamed or
moved into place (a rename is atomic), and otherwise once its size and mtime have been stable for ``stable_seconds``
(polling, files that appeared without events, files written but never closed after ``unclosed_timeout``).

Facts this module is built on (watchdog 7, Linux): close-after-write exists for inotify only; one inotify watch per
directory, and past the limit watchdog raises ``OSError(ENOSPC)`` for the root but silently skips sub-directories
(so the watches are counted after scheduling); a kernel queue overflow is only logged by watchdog, never reported to
handlers (so a log handler spots it, and the daemon rescans periodically anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.errors import ConfigError, InotifyLimitError
from indexer.sources.events import (
    EventKind,
    FsEvent,
    PathFilter,
    Sink,
)
from indexer.sources.scan import normalise_root

log = logging.getLogger(__name__)

INOTIFY_LIMIT_HINT = (
    "raise it with `sudo sysctl fs.inotify.max_user_watches=524288` (persist it in /etc/sysctl.d/90-inotify.conf)"
)
_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


def _handler_class() -> type[Any]:
    """The watchdog handler class (watchdog imported on first use, not at import time)."""
    from watchdog.events import FileSystemEventHandler

    class _Handler(FileSystemEventHandler):
        """Translate one root's watchdog events into FsEvents, filtered."""

        def __init__(self, root: Path, keep: PathFilter, closes: bool, sink: Sink) -> None:
            self.root, self.keep, self.closes, self.sink = root, keep, closes, sink

        def dispatch(self, event: Any) -> None:
            try:
                for fs_event in translate(event, self.root, self.keep, self.closes):
                    self.sink(fs_event)
            except Exception:  # never kill the observer thread
                log.exception("cannot handle %r", event)

    return _Handler


def translate(event: Any, root: Path, keep: PathFilter, closes: bool) -> list[FsEvent]:
    """One watchdog event → zero or more FsEvents (unpaired moves arrive with an empty src or dest)."""
    src = Path(os.fsdecode(event.src_path)) if event.src_path else None
    dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
    if event.is_directory:
        return _translate_dir(event.event_type, src, dest, root, keep)
    if event.event_type == "moved":
        return _translate_move(src, dest, keep, closes)
    kind = _FILE_KINDS.get(event.event_type)
    if kind is None or src is None or not keep(src):
        return []
    if kind is EventKind.CREATED and event.is_synthetic:
        kind = EventKind.MOVED_IN  # files of a folder moved in: their content was there before
    return [FsEvent(kind, src, closes=closes)]


_FILE_KINDS = {
    "created": EventKind.CREATED,
    "modified": EventKind.MODIFIED,
    "attrib": EventKind.ATTRIB,
    "closed": EventKind.CLOSED,
    "deleted": EventKind.DELETED,
}


def _translate_move(src: Path | None, dest: Path | None, keep: PathFilter, closes: bool) -> list[FsEvent]:
    """Within the kept files: a move; out of them (or of the root): a deletion; into them: a complete new file."""
    kept_src = src if src is not None and keep(src) else None
    kept_dest = dest if dest is not None and keep(dest) else None
    if kept_src is not None and kept_dest is not None:
        return [FsEvent(EventKind.MOVED, kept_src, kept_dest, closes=closes)]
    if kept_src is not None:
        return [FsEvent(EventKind.DELETED, kept_src, closes=closes)]
    if kept_dest is not None:
        return [FsEvent(EventKind.MOVED_IN, kept_dest, closes=closes)]
    return []


def _translate_dir(kind: str, src: Path | None, dest: Path | None, root: Path, keep: PathFilter) -> list[FsEvent]:
    """A folder deleted or moved out removes everything under it; moves within arrive as file moves too."""
    gone = kind == "deleted" or (kind == "moved" and not dest)
    if gone and src is not None and src != root and root in src.parents:
        return [FsEvent(EventKind.DIR_GONE, src)]
    if kind == "moved" and src is not None and dest is not None and src != root:
        return [FsEvent(EventKind.DIR_GONE, src)] if not _visible(dest, root) else []
    return []


def _visible(path: Path, root: Path) -> bool:
    try:
        return not any(part.startswith(".") for part in path.relative_to(root).parts)
    except ValueError:
        return False


# --- observers ----------------------------------------------------------------------------------------------------


def count_directories(root: Path) -> int:
    """The folders of a tree as watchdog walks it (symlinks not followed): the inotify watches it needs."""
    return 1 + sum(sum(1 for d in dirs if not os.path.islink(os.path.join(top, d))) for top, dirs, _ in os.walk(root))


def inotify_watch_count() -> int | None:
    """Inotify watches this process holds (from /proc/self/fdinfo); None where that cannot be read."""
    fdinfo = Path("/proc/self/fdinfo")
    try:
        names = os.listdir(fdinfo)
    except OSError:
        return None
    total = 0
    for name in names:
        try:
            text = (fdinfo / name).read_text()
        except OSError:
            continue
        total += text.count("\ninotify wd:") + text.startswith("inotify wd:")
    return total


@dataclass
class _RootWatch:
    root: Path
    observer: Any
    mode: str  # "inotify" | "polling"


class Watcher:
    """One watchdog observer per root, feeding a sink. Inotify by default; polling with ``poll`` or when the
    inotify watch limit is reached for a root (a warning says how to raise the limit)."""

    def __init__(
        self,
        sink: Sink,
        make_filter: Callable[[Path], PathFilter],
        *,
        poll: bool = False,
        poll_interval: float = 1.0,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.make_filter = make_filter
        self.poll = poll
        self.poll_interval = poll_interval
        self._roots: dict[Path, _RootWatch] = {}
        self._lock = threading.Lock()
        self._spy = _OverflowSpy(on_overflow) if on_overflow is not None else None
        if self._spy is not None:
            logging.getLogger(_OVERFLOW_LOGGER).addHandler(self._spy)

    def modes(self) -> dict[str, str]:
        """root → "inotify" or "polling", for the roots being watched."""
        with self._lock:
            return {str(root): w.mode for root, w in self._roots.items()}

    def start(self, root: Path) -> str:
        """Watch ``root`` (again); returns the mode used."""
        self.stop(root)
        watch = self._start_polling(root) if self.poll else self._start_inotify_or_poll(root)
        with self._lock:
            self._roots[root] = watch
        log.info("watching %s (%s)", root, watch.mode)
        return watch.mode

    def stop(self, root: Path) -> None:
        """Stop watching ``root`` (no-op when not watched)."""
        with self._lock:
            watch = self._roots.pop(root, None)
        if watch is not None:
            _stop_observer(watch.observer)

    def close(self) -> None:
        """Stop every observer."""
        for root in list(self._roots):
            self.stop(root)
        if self._spy is not None:
            logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self._spy)

    def _start_inotify_or_poll(self, root: Path) -> _RootWatch:
        try:
            return self._start_inotify(root)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.warning(
                "inotify limit reached for %s (%s): polling it every %.1f s instead; %s",
                root,
                exc.strerror or exc,
                self.poll_interval,
                INOTIFY_LIMIT_HINT,
            )
            return self._start_polling(root)

    def _start_inotify(self, root: Path) -> _RootWatch:
        from watchdog.observers.inotify import InotifyObserver

        needed = count_directories(root)
        before = inotify_watch_count()
        observer = InotifyObserver(generate_full_events=True)
        self._schedule(observer, root, closes=True)
        try:
            observer.start()
        except OSError:
            _stop_observer(observer)
            raise
        after = inotify_watch_count()
        if before is not None and after is not None and after - before < needed:
            _stop_observer(observer)  # watchdog skips sub-folders it cannot watch, silently
            raise InotifyLimitError(
                errno.ENOSPC, f"inotify watch limit reached: {after - before} of {needed} folders watched"
            )
        return _RootWatch(root, observer, "inotify")

    def _start_polling(self, root: Path) -> _RootWatch:
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=self.poll_interval)
        self._schedule(observer, root, closes=False)
        observer.start()
        return _RootWatch(root, observer, "polling")

    def _schedule(self, observer: Any, root: Path, closes: bool) -> None:
        handler = _handler_class()(root, self.make_filter(root), closes, self.sink)
        observer.schedule(handler, str(root), recursive=True, event_filter=_event_types())


def _event_types() -> list[type[Any]]:
    """The watchdog events we act on (no opens, no close-without-write: less noise, smaller inotify mask)."""
    from watchdog import events as ev

    return [
        ev.FileCreatedEvent,
        ev.FileModifiedEvent,
        ev.FileAttribEvent,
        ev.FileClosedEvent,
        ev.FileDeletedEvent,
        ev.FileMovedEvent,
        ev.DirCreatedEvent,
        ev.DirDeletedEvent,
        ev.DirMovedEvent,
    ]


def _stop_observer(observer: Any, timeout: float = 5.0) -> None:
    try:
        if observer.is_alive():
            observer.stop()
            observer.join(timeout)
        else:  # never started (start failed): release its emitters and inotify instance
            observer.on_thread_stop()
    except Exception:  # stopping must never fail the caller
        log.debug("error while stopping an observer", exc_info=True)


class _OverflowSpy(logging.Handler):
    """Watchdog logs a kernel queue overflow but tells no handler: listen to its log to trigger a rescan."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Inotify queue overflowed"):
            self.callback()


def nested_roots(roots: Sequence[Path]) -> list[Path]:
    """Roots that lie inside another root (watched through it already)."""
    return [r for r in roots if any(o != r and o in r.parents for o in roots)]


def check_watch_roots(paths: Sequence[str | Path]) -> list[Path]:
    """The roots to watch, normalised; none, or one inside another, is a usage error. A root that does not exist
    is not an error: it may be a share not mounted yet (it is watched once it appears)."""
    roots = sorted({normalise_root(p) for p in paths})
    if not roots:
        raise ConfigError("watch.paths", "give PATH... to watch, or set [watch] paths in the config file")
    for inner in nested_roots(roots):
        raise ConfigError("PATH", f"{inner} lies inside another watched folder: give the outer one only")
    return roots
