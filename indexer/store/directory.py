"""The Edge store's directory: ``store.json`` (model and format version), the directory lock, the failure file,
and the check that refuses a directory that is not a store."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.atomicio import atomic_write_json, is_temp_name
from indexer.errors import StoreBusyError, StoreError
from indexer.records import Failure
from indexer.store import protocol
from indexer.store.base import _reason, _stamp
from indexer.store.protocol import FailureRecord

STORE_FORMAT = "indexer-store"
STORE_VERSION = 1
STORE_FILE = "store.json"
SHARD_DIR = "shard"
FAILURES_FILE = "failures.json"
LOCK_FILE = "lock"
POINTS_FILE = "points.json"


@dataclass(frozen=True, slots=True)
class _StoreMeta:
    """The contents of store.json."""

    model_id: str
    dim: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "model_id": self.model_id,
            "dim": self.dim,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: object, source: Path) -> _StoreMeta:
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            raise StoreError(f"{source} is not an indexer store file")
        version = data.get("version")
        if not isinstance(version, int) or version > STORE_VERSION:
            raise StoreError(f"{source} has store format version {version!r}; this indexer reads up to 1")
        model_id, dim, created = data.get("model_id"), data.get("dim"), data.get("created_at", 0.0)
        if not isinstance(model_id, str) or not isinstance(dim, int) or not isinstance(created, int | float):
            raise StoreError(f"{source} is damaged: model_id, dim or created_at missing or of the wrong type")
        return cls(model_id, dim, float(created))


def _check_store_directory(directory: Path) -> None:
    """Refuse a path that is not a directory, or a directory that is not (the start of) a store."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise StoreError(f"the store path {directory} is not a directory")
    if (directory / STORE_FILE).exists():
        return
    names = {p.name for p in directory.iterdir() if not is_temp_name(p.name)}
    shard = directory / SHARD_DIR
    if shard.is_dir() and not any(shard.iterdir()):
        names.discard(SHARD_DIR)
    foreign = sorted(names - {FAILURES_FILE, LOCK_FILE, POINTS_FILE})
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(
            f"{directory} is not an indexer store: it has no {STORE_FILE} but holds {shown}; "
            "choose an empty or new directory for the store (--store DIR)"
        )


def _read_meta(directory: Path) -> _StoreMeta | None:
    path = directory / STORE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {_reason(exc)}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path} is damaged (not JSON): {_reason(exc)}") from exc
    return _StoreMeta.from_json(data, path)


def recorded_model(directory: Path) -> str | None:
    """The model id an embedded store at ``directory`` records (None where there is no store yet); read without
    opening the store or taking its lock."""
    meta = _read_meta(directory) if directory.is_dir() else None
    return None if meta is None else meta.model_id


class _FailureFile:
    """The Edge store's failure log: a dict by path, saved to failures.json atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, FailureRecord] = self._load()

    def _load(self) -> dict[str, FailureRecord]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["failures"]
            records = [_failure_from_json(r) for r in rows]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path} is damaged ({_reason(exc)}); delete it to start a new log") from exc
        return {r.path: r for r in records}

    def _save(self) -> None:
        rows = [_failure_to_json(r) for r in self._entries.values()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": 1, "failures": rows})

    def record(self, failures: Sequence[Failure], at: float) -> None:
        for f in failures:
            self._entries.pop(str(f.path), None)  # re-insert: dict order is age order
            self._entries[str(f.path)] = FailureRecord(str(f.path), f.reason, at, f.size, f.mtime_ns)
        excess = len(self._entries) - protocol.MAX_FAILURES
        for path in [r.path for r in self.newest(len(self._entries))[::-1][: max(excess, 0)]]:
            del self._entries[path]
        self._save()

    def clear(self, paths: Sequence[str]) -> None:
        removed = [self._entries.pop(str(p), None) for p in paths]
        if any(r is not None for r in removed):
            self._save()

    def newest(self, limit: int) -> list[FailureRecord]:
        # Stable sort of the insertion order reversed: ties keep the newest-inserted first.
        rows = list(self._entries.values())[::-1]
        return sorted(rows, key=lambda r: r.at, reverse=True)[: max(limit, 0)]

    def __len__(self) -> int:
        return len(self._entries)


def _failure_to_json(record: FailureRecord) -> dict[str, object]:
    row: dict[str, object] = {"path": record.path, "reason": record.reason, "at": record.at}
    if record.size is not None:
        row.update(size=record.size, mtime_ns=record.mtime_ns)
    return row


def _failure_from_json(row: dict[str, Any]) -> FailureRecord:
    size, mtime_ns = row.get("size"), row.get("mtime_ns")
    if not (isinstance(size, int) and isinstance(mtime_ns, int)):
        size = mtime_ns = None
    return FailureRecord(str(row["path"]), str(row["reason"]), float(row["at"]), size, mtime_ns)


def open_need_bytes(shard: Path) -> int:
    """The space Edge takes from the filesystem when it opens ``shard``: the holes of its mapped segment files,
    on a filesystem that allocates a page when a hole of a shared mapping is read (tmpfs); elsewhere none.

    Edge creates its mapped files sparse (a vector chunk of 32 MB, 2-4 MB pages per payload index) and populates
    the mappings on open. On tmpfs every touched page is allocated, for as long as the store is open: a 16-image
    store takes 32 MB more, an optimized one 41 MB more. On a disk filesystem (ext4, xfs, btrfs...) reading a hole
    allocates nothing (measured on ext4: a store opens, counts, searches and closes with 0 bytes free); the holes
    fill only as points are written, which the write margin (store.min_free_mb) covers. The payload pages
    (``payload_storage``) are mapped lazily, so they are left out."""
    if not _holes_fill_on_read(shard):
        return 0
    total = 0
    for folder, _, names in os.walk(shard / "segments"):
        if "payload_storage" in Path(folder).parts:
            continue
        for name in names:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue  # removed meanwhile (an optimizer of another opener cannot run: the store is locked)
            total += max(0, st.st_size - st.st_blocks * 512)
    return total


# Filesystems whose pages live in memory: a read fault on a hole of a shared mapping allocates a page.
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "shm"})


def _holes_fill_on_read(path: Path) -> bool:
    """Whether ``path`` is on a memory filesystem; True when that cannot be told (the cautious answer)."""
    fs_type = filesystem_type(path)
    return fs_type is None or fs_type in _MEMORY_FILESYSTEMS


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` (or its nearest existing parent) is on, from /proc/self/mountinfo
    (the mount with the longest mount point above its real path; the last one of equal length, as mounted over);
    None where that file cannot be read (not Linux)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
            mounts = lines.read().splitlines()
    except OSError:
        return None
    best, best_type = -1, None
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        parts, kind = fields.split(), rest.split(" ", 1)[0]
        if len(parts) < 5 or not kind:
            continue
        point = _unescape(parts[4])
        under = real == point or real.startswith(point.rstrip("/") + "/")
        if under and len(point) >= best:
            best, best_type = len(point), kind
    return best_type


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes (\\040)."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def optimize_need_bytes(shard: Path) -> int:
    """What an optimize may write: the current size of the segments without an HNSW index (those Edge merges and
    indexes into new copies; indexed segments stay as they are)."""
    total = 0
    segments = shard / "segments"
    for segment in segments.iterdir() if segments.is_dir() else ():
        if segment.is_dir() and not _indexed_segment(segment):
            total += _allocated(segment)
    return total


def _indexed_segment(segment: Path) -> bool:
    try:
        vectors = json.loads((segment / "segment.json").read_text(encoding="utf-8"))["config"]["vector_data"]
        return all(v["index"]["type"] == "hnsw" for v in vectors.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unknown: counted


def _allocated(folder: Path) -> int:
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def read_only_error(directory: Path, exc: OSError) -> StoreError:
    """The one line for a store that cannot be written (a read-only mount, no write permission)."""
    return StoreError(
        f"the store at {directory} is not writable ({exc.strerror or _reason(exc)}): commands that only read it "
        "work from a temporary copy, this one writes; make it writable, or copy it "
        f"(cp -a --sparse=always {directory} COPY) and pass --store COPY"
    )


class _PointRecord:
    """``points.json``: how many points the shard held at its last flush (never lowered but by deletes), so that
    opening a shard that lost points (a damaged or truncated segment) is noticed instead of silently served."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.points: int | None = self._load()

    def _load(self) -> int | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            points = data["points"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged record is rewritten at the next flush; it must not block opening
        return points if isinstance(points, int) and points >= 0 else None

    def save(self, points: int) -> None:
        if points != self.points:
            atomic_write_json(self.path, {"version": 1, "points": points})
            self.points = points


class _DirLock:
    """An exclusive flock on ``directory/lock``, taken before the shard is touched.

    Edge's own WAL lock refuses a second opener, but the attempt itself damages the holder's id-tracker journal
    (its next flush fails); a lock of our own makes the second opener fail before it reaches the shard.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise read_only_error(self.directory, exc) from None
            raise StoreError(f"cannot open the lock of the store at {self.directory}: {_reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise StoreBusyError(self.directory, f"held by pid {holder}" if holder else "") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class FailureLog:
    """The failure-log methods of a store kept in a directory (`_failure_log`, a `_FailureFile`)."""

    _failure_log: _FailureFile

    def _check_open(self) -> None:
        raise NotImplementedError

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Add or update entries (by path, stamped now); keeps the latest MAX_FAILURES."""
        self._check_open()
        if failures:
            self._failure_log.record(failures, _stamp())

    def clear_failures(self, paths: Sequence[str]) -> None:
        """Drop the entries of these paths."""
        self._check_open()
        self._failure_log.clear(paths)

    def failures(self, limit: int = 20) -> list[FailureRecord]:
        """The newest entries, newest first."""
        self._check_open()
        return self._failure_log.newest(limit)

    def failure_count(self) -> int:
        """How many entries the failure log holds."""
        self._check_open()
        return len(self._failure_log)
