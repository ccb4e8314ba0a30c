"""The payload stored with each vector, in one place (no torch): how `indexer index`, `indexer import` and a
move build it, and how the store normalises it.

    path, dirs          the file and every ancestor directory (the folder filter matches "dirs")
    real_dir            the real path of its folder when indexed (symlinks resolved): `indexer serve` sends the
                        file only from there, so a folder swapped for a symlink later serves nothing from elsewhere
    size, mtime(_ns)    what tells a later index run that the file is unchanged
    sha256              the content hash (moves and exact duplicates are found by it)
    width, height       pixels, after EXIF orientation
    format              the Pillow format name, upper-case ("JPEG"; see `indexer.formats`)
    model, indexed_at   the model that made the vector, and when
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.formats import format_of_path
from indexer.records import FileEntry, ImageMeta, StoredPoint, dirs_of, point_id

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)


class FolderFields:
    """``dirs`` and ``real_dir`` worked out once per folder, for one run: resolving the folder of every file costs
    an lstat per path component, and a library is many files in few folders. Make one per run (a folder swapped
    for a symlink since is resolved anew by the next run, as before)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[list[str], str]] = {}

    def of(self, path: str) -> tuple[list[str], str]:
        """(dirs, real_dir) of the absolute ``path``; ``dirs`` is the caller's own list."""
        folder = os.path.dirname(path)
        known = self._known.get(folder)
        if known is None:
            known = self._known[folder] = (dirs_of(path), os.path.realpath(folder))
        return list(known[0]), known[1]


def file_fields(path: Path | str, size: int, mtime_ns: int, folders: FolderFields | None = None) -> dict[str, Any]:
    """The fields that follow the file: its path, directories, size and modification time."""
    path = str(path)
    dirs, real_dir = (folders or FolderFields()).of(path)
    return {
        "path": path,
        "dirs": dirs,
        "real_dir": real_dir,
        "size": size,
        "mtime": mtime_ns / 1e9,
        "mtime_ns": mtime_ns,
    }


def payload_for(
    meta: ImageMeta, model_id: str, indexed_at: float, folders: FolderFields | None = None
) -> dict[str, Any]:
    """The payload `indexer index` stores with each vector (``folders``: the run's cache of folder fields)."""
    return {
        **file_fields(meta.path, meta.size, meta.mtime_ns, folders),
        "sha256": meta.sha256,
        "width": meta.width,
        "height": meta.height,
        "format": meta.format.upper(),
        "model": model_id,
        "indexed_at": indexed_at,
        **meta.extra_payload(),
    }


def embedded_payload(
    path: str, sha256: str, width: int, height: int, model_id: str, now: float, st: os.stat_result | None
) -> dict[str, Any]:
    """The payload `indexer index` would store for a row of an `indexer embed` file. The format comes from the
    extension (".jpe" → "JPEG"). Size and mtime only when ``st`` is given: the caller passes it when the file
    still has the embedded content, since they are what tells a later index run that the file is unchanged."""
    payload: dict[str, Any] = {
        "path": path,
        "dirs": dirs_of(path),
        "sha256": sha256,
        "width": width,
        "height": height,
        "format": format_of_path(path),
        "model": model_id,
        "indexed_at": now,
    }
    if st is not None:
        payload.update(size=st.st_size, mtime=st.st_mtime_ns / 1e9, mtime_ns=st.st_mtime_ns)
        payload["real_dir"] = os.path.realpath(Path(path).parent)
    return payload


def exported_payload(path: str, sha256: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The payload of a row of an `indexer export` file: its metadata, with path, dirs and sha256 from their
    own columns."""
    return {**metadata, "path": path, "dirs": dirs_of(path), "sha256": sha256}


def normalise_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as stored: "format" upper-cased so format filters are case-insensitive."""
    fmt = payload.get("format")
    if isinstance(fmt, str) and fmt != fmt.upper():
        return {**payload, "format": fmt.upper()}
    return payload


def move_point(store: VectorStore, old: StoredPoint, entry: FileEntry) -> None:
    """Re-key a point to the file's new path, keeping its vector (a move is never re-embedded)."""
    found = store.retrieve([old.id], with_vectors=True)
    if not found or found[0].vector is None:
        raise RuntimeError(f"point {old.id} ({old.path}) vanished during the move")
    payload = {**found[0].payload, **file_fields(entry.path, entry.size, entry.mtime_ns)}
    store.upsert([StoredPoint(point_id(entry.path), payload, found[0].vector)])
    store.delete([old.id])
    log.info("moved %s -> %s (vector kept)", old.path, entry.path)
