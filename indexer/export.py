"""Vectors to files: the output of ``indexer embed`` (Parquet or .npy), written batch by batch.

Parquet columns: path, sha256, width, height, embedding (list<float32>). A ``.npy`` output holds the (N, dim)
float32 matrix; the paths of its rows, in order, go to ``FILE.paths.txt`` beside it. Files are written under a
temporary name and renamed when complete, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from indexer.errors import ConfigError
from indexer.records import ImageMeta

SUFFIXES = (".parquet", ".npy")


class EmbeddingWriter(Protocol):
    def write(self, metas: list[ImageMeta], vectors: npt.NDArray[np.float32]) -> None: ...

    def __enter__(self) -> EmbeddingWriter: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def open_embedding_writer(output: Path, dim: int, model_id: str) -> EmbeddingWriter:
    """A writer for ``output``, chosen by its suffix (.parquet or .npy); Parquet records dim and model id."""
    suffix = output.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError("--output", f"{output}: use a .parquet or .npy file name")
    if not output.parent.exists():
        raise ConfigError("--output", f"directory {output.parent} does not exist")
    return ParquetWriter(output, dim, model_id) if suffix == ".parquet" else NpyWriter(output, dim)


class _AtomicFile:
    """Write to ``FILE.partial``, rename to ``FILE`` on success, delete on error."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.partial = output.with_name(output.name + ".partial")

    def commit(self) -> None:
        os.replace(self.partial, self.output)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)


class ParquetWriter(_AtomicFile):
    """Streams row groups, one per batch: memory stays bounded whatever the number of images."""

    def __init__(self, output: Path, dim: int, model_id: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(output)
        self.schema = pa.schema(
            [
                ("path", pa.string()),
                ("sha256", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("embedding", pa.list_(pa.float32())),
            ],
            metadata={b"dim": str(dim).encode(), b"model": model_id.encode()},
        )
        self._writer = pq.ParquetWriter(str(self.partial), self.schema)

    def write(self, metas: list[ImageMeta], vectors: npt.NDArray[np.float32]) -> None:
        import pyarrow as pa

        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
        offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
        columns = [
            pa.array([str(m.path) for m in metas], pa.string()),
            pa.array([m.sha256 for m in metas], pa.string()),
            pa.array([m.width for m in metas], pa.int32()),
            pa.array([m.height for m in metas], pa.int32()),
            pa.ListArray.from_arrays(offsets, flat),
        ]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def __enter__(self) -> ParquetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._writer.close()
        if kind is None or issubclass(kind, KeyboardInterrupt):
            self.commit()
        else:
            self.discard()


class NpyWriter(_AtomicFile):
    """Collects rows and writes the matrix at the end (N x dim float32) plus ``FILE.paths.txt``."""

    def __init__(self, output: Path, dim: int) -> None:
        super().__init__(output)
        self.dim = dim
        self._rows: list[npt.NDArray[np.float32]] = []
        self._paths: list[str] = []

    def write(self, metas: list[ImageMeta], vectors: npt.NDArray[np.float32]) -> None:
        self._rows.append(np.asarray(vectors, dtype=np.float32))
        self._paths.extend(str(m.path) for m in metas)

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            return
        matrix = np.concatenate(self._rows) if self._rows else np.zeros((0, self.dim), np.float32)
        with self.partial.open("wb") as fh:
            np.save(fh, matrix)
        self.commit()
        self.output.with_name(self.output.name.removesuffix(".npy") + ".paths.txt").write_text(
            "".join(p + "\n" for p in self._paths)
        )
