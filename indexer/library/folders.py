"""Folders held open for the duplicate actions, so that no action follows a symbolic link out of the library.

A file is never moved or deleted by its path. Its folder is opened first (`recorded_folder`) and the real path of
that open folder must be the one recorded when the file was indexed (payload ``real_dir``; without one, the
folder's own path: no symbolic link on the way). A folder on the way swapped for a link since then is refused
with the reason, and a swap after the check changes nothing: every later call (lstat, hash, link, unlink) is made
relative to the open folder.

A move target is reached the same way (`target_folder`): the target folder is opened, its real path must lie
under one of the allowed folders when there are any, and every folder below it is created or opened one name at
a time with ``O_NOFOLLOW``, so a symbolic link below the target folder is never followed.

Linux and the BSDs: the ``*at`` calls (``dir_fd``) and ``O_NOFOLLOW``; the real path of an open folder is read
from ``/proc/self/fd`` where it exists, else from the path (checked to be the same folder).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from indexer.atomicio import NO_LINK_ERRNOS, temp_name

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
CHUNK = 1 << 20


class Refused(Exception):
    """An action refused before anything was touched; the message is the reason shown to the user."""


@dataclass(frozen=True, slots=True)
class Folder:
    """An open folder: ``path`` as named, ``real`` its real path, ``fd`` the descriptor every call goes through."""

    path: Path
    real: Path
    fd: int


def real_path_of(fd: int, named: Path) -> Path:
    """The real path of an open folder (``named``: the path it was opened by)."""
    with suppress(OSError):
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    real = Path(os.path.realpath(named))
    if not os.path.samestat(os.fstat(fd), os.stat(real)):
        raise Refused(f"the folder {named} changed while it was being opened")
    return real


@contextmanager
def opened(path: Path) -> Iterator[Folder]:
    """A folder held open (links in ``path`` itself followed); Refused when it cannot be opened."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as exc:
        raise Refused(f"the folder {path} cannot be opened ({exc.strerror or exc})") from None
    try:
        yield Folder(path, real_path_of(fd, path), fd)
    finally:
        os.close(fd)


@contextmanager
def recorded_folder(file: str, recorded: str | None, who: str = "") -> Iterator[Folder]:
    """The folder of ``file`` held open, when its real path is the one recorded at index time (``recorded``;
    None: the folder's own path, for points indexed before it was recorded). Refused otherwise (the reason
    starts with ``who``)."""
    parent = Path(file).parent
    expected = Path(recorded) if recorded else parent
    with opened(parent) as folder:
        if folder.real != expected:
            raise Refused(
                f"{who}its folder {parent} now leads to {folder.real}, not to {expected} where it was indexed "
                "(a folder on the way was replaced by a symbolic link or moved): left alone"
            )
        yield folder


def lstat_in(folder: Folder, name: str) -> os.stat_result:
    """The file's own status (a link is not followed)."""
    return os.stat(name, dir_fd=folder.fd, follow_symlinks=False)


def sha256_in(folder: Folder, name: str) -> str:
    """The sha256 of a regular file of the folder, read through a descriptor (never through a link)."""
    fd = os.open(name, FILE_FLAGS, dir_fd=folder.fd)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def unlink_in(folder: Folder, name: str) -> None:
    os.unlink(name, dir_fd=folder.fd)


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def real_target(root: Path) -> Path:
    """The real path ``root`` has, or would have once created: the real path of its nearest existing ancestor
    followed by the rest."""
    existing = next(p for p in (root, *root.parents) if os.path.exists(p))
    return Path(os.path.realpath(existing)) / root.relative_to(existing)


@contextmanager
def target_folder(root: Path, below: Path, allowed: Sequence[Path] | None) -> Iterator[Folder]:
    """The folder ``root/below`` held open, created as needed: ``root``'s real path must lie under ``allowed``
    (real paths; None: anywhere), and no folder from ``root`` down is a symbolic link (none is followed)."""
    existing = next(p for p in (root, *root.parents) if os.path.exists(p))
    rest = [*root.relative_to(existing).parts, *below.parts]
    with opened(existing) as top:
        if allowed is not None and not is_under(top.real / root.relative_to(existing), allowed):
            raise Refused(f"{root} lies outside the folders moves may go to")
        fd, path = os.dup(top.fd), existing
        try:
            for name in rest:
                path = path / name
                fd = _step(fd, name, path, root)
            yield Folder(root / below, top.real / root.relative_to(existing) / below, fd)
        finally:
            os.close(fd)


def _step(fd: int, name: str, path: Path, root: Path) -> int:
    """Create (if missing) and open the folder ``name`` inside ``fd`` without following a link; closes ``fd``."""
    try:
        with suppress(FileExistsError):
            os.mkdir(name, dir_fd=fd)
        return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise Refused(f"{path} is a symbolic link or not a folder: moves never follow links below {root}") from None
        raise Refused(f"cannot create the folder {path} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def move_in(source: Folder, name: str, target: Folder, new_name: str) -> None:
    """Move a file between two open folders without ever replacing one (FileExistsError if the name is taken).

    On one filesystem: a hard link at the target, then the source name removed. Across filesystems: a copy
    (data, mode, times) under a temporary name beside the target, fsynced, given its name without replacing,
    and only then the source removed. A crash at any point leaves the file under one name or both, never none.
    """
    try:
        os.link(name, new_name, src_dir_fd=source.fd, dst_dir_fd=target.fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        _copy_in(source, name, target, new_name)
    os.unlink(name, dir_fd=source.fd)


def _copy_in(source: Folder, name: str, target: Folder, new_name: str) -> None:
    partial = temp_name(Path(new_name)).name
    src = os.open(name, FILE_FLAGS, dir_fd=source.fd)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        dst = os.open(partial, flags, stat.S_IMODE(st.st_mode), dir_fd=target.fd)
        try:
            _copy_fd(src, dst, st)
        finally:
            os.close(dst)
        _publish_in(target, partial, new_name)
    finally:
        os.close(src)
        with suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=target.fd)


def _copy_fd(src: int, dst: int, st: os.stat_result) -> None:
    copied = 0
    while chunk := os.read(src, CHUNK):
        view = memoryview(chunk)
        while view:
            written = os.write(dst, view)
            view, copied = view[written:], copied + written
    if copied != st.st_size:
        raise OSError(errno.EIO, f"the copy is incomplete ({copied} of {st.st_size} bytes)")
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.fsync(dst)


def _publish_in(folder: Folder, partial: str, name: str) -> None:
    """Give ``partial`` the name ``name`` unless it exists (FileExistsError)."""
    try:
        os.link(partial, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        if os.path.lexists(folder.real / name):
            raise FileExistsError(errno.EEXIST, "File exists", name) from None
        os.rename(partial, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
