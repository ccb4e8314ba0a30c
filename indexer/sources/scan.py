"""Scan stage: walk the roots and yield the image files on disk, lazily, safe against symlink loops."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from indexer.records import Failure, FileEntry, display_path, name_problem

log = logging.getLogger(__name__)

OnError = Callable[[Failure], None]


def normalise_root(root: str | Path) -> Path:
    """Absolute, ``~`` expanded, ``..`` collapsed — but symlinks kept, so paths stay the ones the user knows."""
    return Path(os.path.abspath(Path(root).expanduser()))


def scan(
    roots: Iterable[Path],
    extensions: frozenset[str],
    *,
    follow_symlinks: bool = True,
    include_hidden: bool = False,
    on_error: OnError | None = None,
) -> Iterator[FileEntry]:
    """Yield every file under ``roots`` whose extension is in ``extensions`` (lower-case, with the dot).

    A root may be a single file. Directories reached twice (symlink loops, or two roots that overlap) are walked once.
    Unreadable directories, names that are not valid UTF-8 and special files with a wanted extension (FIFOs, sockets,
    devices: never opened, so never a hang) are reported through ``on_error`` and skipped; the rest goes on.
    """
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = normalise_root(root)
        if (problem := name_problem(root)) is not None:
            _report(on_error, root, problem)
            continue
        if root.is_file():
            entry = _entry(root, on_error)
            if entry is not None and root.suffix.lower() in extensions:
                yield entry
            continue
        yield from _walk(root, extensions, follow_symlinks, include_hidden, seen_dirs, on_error)


def _walk(
    top: Path,
    extensions: frozenset[str],
    follow: bool,
    hidden: bool,
    seen: set[tuple[int, int]],
    on_error: OnError | None,
) -> Iterator[FileEntry]:
    stack = [top]
    while stack:
        directory = stack.pop()
        if not _first_visit(directory, seen, on_error):
            continue
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            _report(on_error, directory, f"cannot list directory: {exc.strerror or exc}")
            continue
        subdirs: list[Path] = []
        for entry in entries:
            if not hidden and entry.name.startswith("."):
                continue
            found = _classify(entry, extensions, follow, on_error)
            if isinstance(found, FileEntry):
                yield found
            elif found is not None:
                subdirs.append(found)
        stack.extend(reversed(subdirs))


def _first_visit(directory: Path, seen: set[tuple[int, int]], on_error: OnError | None) -> bool:
    try:
        st = directory.stat()
    except OSError as exc:
        _report(on_error, directory, f"cannot read directory: {exc.strerror or exc}")
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        log.debug("skipping %s: directory already visited (symlink loop or overlapping roots)", directory)
        return False
    seen.add(key)
    return True


def _classify(
    entry: os.DirEntry[str], extensions: frozenset[str], follow: bool, on_error: OnError | None
) -> FileEntry | Path | None:
    """A FileEntry for a wanted file, a Path for a directory to descend into, None for anything else."""
    try:
        if entry.is_symlink() and not follow:
            return None
        is_dir = entry.is_dir(follow_symlinks=follow)
        if not is_dir and os.path.splitext(entry.name)[1].lower() not in extensions:
            return None
        if (problem := name_problem(entry.name)) is not None:  # a folder too: nothing under it could be stored
            _report(on_error, Path(entry.path), problem)
            return None
        if is_dir:
            return Path(entry.path)
        st = entry.stat(follow_symlinks=follow)
    except OSError as exc:  # dangling symlink, vanished, permission
        _report(on_error, Path(entry.path), f"cannot stat: {exc.strerror or exc}")
        return None
    if not stat.S_ISREG(st.st_mode):
        _report(on_error, Path(entry.path), f"not a regular file ({special_kind(st.st_mode)})")
        return None
    return FileEntry(Path(entry.path), st.st_size, st.st_mtime_ns)


def special_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    kinds = [
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _entry(path: Path, on_error: OnError | None) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError as exc:
        _report(on_error, path, f"cannot stat: {exc.strerror or exc}")
        return None
    return FileEntry(path, st.st_size, st.st_mtime_ns)


def _report(on_error: OnError | None, path: Path, reason: str) -> None:
    shown = display_path(path)  # a failure entry is stored and printed: always UTF-8 text
    log.warning("skipping %s: %s", shown, reason)
    if on_error is not None:
        on_error(Failure(Path(shown), reason))
