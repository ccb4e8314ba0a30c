"""A store's vectors copied out into a raw float32 file that dedup and cluster read a block at a time (the process
holds only the blocks it reads, never the whole matrix)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from indexer.errors import StoreError
from indexer.records import SearchFilter, StoredPoint

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)


def chunks(points: Iterator[StoredPoint], size: int) -> Iterator[list[StoredPoint]]:
    batch: list[StoredPoint] = []
    for point in points:
        batch.append(point)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- vector dumps for dedup and cluster ---------------------------------------------------------------------------


class VectorFile:
    """An (n, dim) float32 matrix in a raw file, read a row range or a few rows at a time.

    Reads go through the page cache into fresh arrays, so the process holds only what it asked for: the matrix
    itself may be larger than memory.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self._row_bytes = dim * 4
        self.count = path.stat().st_size // self._row_bytes if dim else 0

    def __len__(self) -> int:
        return self.count

    def rows(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """Rows [start, stop) as a new array."""
        stop = min(stop, self.count)
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        flat = np.fromfile(self.path, np.float32, count=(stop - start) * self.dim, offset=start * self._row_bytes)
        return flat.reshape(stop - start, self.dim)

    def take(self, indices: Sequence[int]) -> npt.NDArray[np.float32]:
        """The rows at these indices, in that order."""
        out = np.empty((len(indices), self.dim), np.float32)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for k, index in enumerate(indices):
                if not 0 <= index < self.count:
                    raise IndexError(f"row {index} of {self.count}")
                out[k] = np.frombuffer(os.pread(fd, self._row_bytes, index * self._row_bytes), np.float32)
        finally:
            os.close(fd)
        return out

    def blocks(self, size: int) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """(start, rows) for consecutive blocks of ``size`` rows."""
        for start in range(0, self.count, size):
            yield start, self.rows(start, start + size)


@dataclass(frozen=True, slots=True)
class VectorDump:
    """A store's vectors copied out: row i of ``matrix`` is the point ``ids[i]``, whose sha256 is ``sha256s[i]``."""

    ids: list[str]
    sha256s: list[str]
    matrix: VectorFile


def dump_vectors(
    store: VectorStore, directory: Path, *, filter: SearchFilter | None = None, batch_size: int = 1000
) -> VectorDump:
    """Copy the vectors (L2-normalised) of every point matching the filter into ``directory/vectors.f32``."""
    info = store.model_info()
    if info is None:
        raise StoreError(f"the store {store.location} is empty: run `indexer index PATH` first")
    dim = info[1]
    path = directory / "vectors.f32"
    ids: list[str] = []
    shas: list[str] = []
    with path.open("wb") as fh:
        for batch in chunks(store.scroll(filter=filter, with_vectors=True, batch_size=batch_size), batch_size):
            fh.write(_unit_rows([p.vector for p in batch], dim).tobytes())
            ids.extend(p.id for p in batch)
            shas.extend(str(p.payload.get("sha256") or "") for p in batch)
    log.info("copied %d vectors (%d-d) out of %s", len(ids), dim, store.location)
    return VectorDump(ids, shas, VectorFile(path, dim))


def _unit_rows(vectors: list[npt.NDArray[np.float32] | None], dim: int) -> npt.NDArray[np.float32]:
    matrix = np.stack([np.zeros(dim, np.float32) if v is None else v for v in vectors]).astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    out = np.zeros_like(matrix)
    np.divide(matrix, norms, out=out, where=norms > 0)
    return out
