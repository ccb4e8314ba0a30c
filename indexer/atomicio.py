"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer here does the same four steps: write a temporary file in the target's directory (a hidden
``.NAME.PID-N.tmp``, which the watcher and the store's directory check both ignore), fsync it, rename it over
the target, fsync the directory so that the rename survives a crash.

    AtomicFile         the steps as an object: write to ``.partial``, then ``commit()`` or ``discard()``
    atomic_path        a context manager giving the temporary path (for writers that take a path: Parquet)
    atomic_open        a context manager giving an open file (streamed text or bytes: CSV)
    atomic_write_bytes / atomic_write_text / atomic_write_json   one-shot variants
    publish_new        give a finished temporary file its name unless that name exists (never replaces)
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

_counter = itertools.count()

# Errors of os.link that mean "no hard link here" (another filesystem, or links unsupported or not allowed).
NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS})


def temp_name(target: Path) -> Path:
    """A fresh hidden temporary name beside target (unique per process and call)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{next(_counter)}.tmp")


def is_temp_name(name: str) -> bool:
    """True for a name `temp_name` makes (or any hidden ``.tmp`` file)."""
    return name.startswith(".") and name.endswith(".tmp")


def fsync_path(path: Path) -> None:
    """fsync a file by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that renames in it are durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """Write to ``self.partial`` (a temporary name beside ``output``); ``commit()`` publishes it durably,
    ``discard()`` deletes it. ``durable=False`` (caches that can be rebuilt) skips the two fsyncs: still atomic,
    but a crash may lose the newest file."""

    def __init__(self, output: Path, *, durable: bool = True) -> None:
        self.output = output
        self.partial = temp_name(output)
        self.durable = durable

    def commit(self) -> None:
        """fsync the temporary file, rename it over the output, fsync the directory."""
        try:
            if self.durable:
                fsync_path(self.partial)
            os.replace(self.partial, self.output)
        except BaseException:
            self.discard()
            raise
        if self.durable:
            fsync_dir(self.output.parent)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: Path, *, durable: bool = True) -> Iterator[Path]:
    """The temporary path to write; published over target when the block ends normally, deleted otherwise."""
    file = AtomicFile(target, durable=durable)
    try:
        yield file.partial
    except BaseException:
        file.discard()
        raise
    file.commit()


@contextmanager
def atomic_open(
    target: Path, mode: str = "w", *, encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """An open file ("w" or "wb") whose contents replace target atomically when the block ends normally."""
    with atomic_path(target) as partial:
        if "b" in mode:
            with open(partial, mode) as fh:
                yield fh
        else:
            with open(partial, mode, encoding=encoding, newline=newline) as fh:
                yield fh


def atomic_write_bytes(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace target with data atomically (and durably, unless durable=False)."""
    with atomic_path(target, durable=durable) as partial:
        partial.write_bytes(data)


def atomic_write_text(target: Path, text: str, encoding: str = "utf-8") -> None:
    """Replace target with text atomically and durably."""
    atomic_write_bytes(target, text.encode(encoding))


def atomic_write_json(path: Path, data: object, *, indent: int | None = None) -> None:
    """Replace path with JSON data atomically and durably (compact unless indent is given)."""
    separators = (",", ":") if indent is None else None
    atomic_write_text(path, json.dumps(data, indent=indent, separators=separators))


def publish_new(partial: Path, target: Path) -> None:
    """Give a finished (fsynced) temporary file the name target, never replacing one: FileExistsError if
    target exists. A hard link where the filesystem has them, else a check and a rename; the directory is
    fsynced. The caller removes partial afterwards."""
    try:
        os.link(partial, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "destination exists", str(target)) from None
        os.rename(partial, target)
    fsync_dir(target.parent)


def create_json_exclusive(path: Path, data: object) -> bool:
    """Publish JSON at path atomically unless path exists already; False if it did."""
    partial = temp_name(path)
    try:
        partial.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        fsync_path(partial)
        publish_new(partial, path)
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def read_json_cache(path: Path) -> dict[str, Any]:
    """A small JSON cache file's contents; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_cache(path: Path, data: dict[str, Any]) -> None:
    """Best effort (a read-only home just means computing again next time), atomic."""
    with suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=2)
