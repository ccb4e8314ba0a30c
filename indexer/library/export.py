"""Vectors to and from files: ``indexer embed`` output, store export/import, and temporary vector dumps.

``indexer embed`` writes Parquet (columns path, sha256, width, height, embedding list<float32>; where the inputs
hold tar shards also caption, json, key and shard, empty for files in folders) or ``.npy`` (the (N, dim) float32
matrix; the paths of its rows, in order, in ``FILE.paths.txt`` beside it). ``indexer embed --ray`` writes the same
columns, one ``part-ID.parquet`` file per part (`write_embedding_part`).

``indexer export`` writes a store to Parquet: columns id, path, sha256, metadata (the rest of the payload, as a
JSON object), vector (list<float32>); the schema metadata records ``dim`` and ``model`` as the embed files do.
``indexer import`` reads either kind, or a directory of them (``indexer embed --ray`` parts, old and new), into any
backend: the way to move an embedded store to a Qdrant server, or to load vectors made elsewhere.

Files are written under a temporary name and renamed when complete, so a crash never leaves a half-written file
under the final name. (``dump_vectors``, for dedup and cluster, lives in `indexer.library.vectorfile`.)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from indexer.atomicio import AtomicFile, atomic_write_text
from indexer.errors import ConfigError, StoreError
from indexer.library.vectorfile import VectorDump as VectorDump
from indexer.library.vectorfile import VectorFile as VectorFile
from indexer.library.vectorfile import chunks
from indexer.library.vectorfile import dump_vectors as dump_vectors
from indexer.records import ImageMeta, SearchFilter, StoredPoint, point_id
from indexer.store.payload import embedded_payload, exported_payload

if TYPE_CHECKING:
    import pyarrow as pa

    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".npy")
EMBED_COLUMNS = ("path", "sha256", "width", "height", "embedding")
SHARD_COLUMNS = ("caption", "json", "key", "shard")  # images read from tar shards (ShardMeta's fields)


class EmbeddingWriter(Protocol):
    def write(self, metas: list[ImageMeta], vectors: npt.NDArray[np.float32]) -> None: ...

    def __enter__(self) -> EmbeddingWriter: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def open_embedding_writer(output: Path, dim: int, model_id: str, *, shard_columns: bool = False) -> EmbeddingWriter:
    """A writer for ``output``, chosen by its suffix (.parquet or .npy); Parquet records dim and model id, and
    with ``shard_columns`` the caption and JSON metadata of images read from WebDataset shards."""
    suffix = output.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError("--output", f"{output}: use a .parquet or .npy file name")
    if not output.parent.exists():
        raise ConfigError("--output", f"directory {output.parent} does not exist")
    return ParquetWriter(output, dim, model_id, shard_columns) if suffix == ".parquet" else NpyWriter(output, dim)


class ParquetWriter(AtomicFile):
    """Streams row groups, one per batch: memory stays bounded whatever the number of images."""

    def __init__(self, output: Path, dim: int, model_id: str, shard_columns: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(output)
        self.shard_columns = shard_columns
        extra = [(name, pa.string()) for name in SHARD_COLUMNS] if shard_columns else []
        self.schema = pa.schema(
            [
                ("path", pa.string()),
                ("sha256", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("embedding", pa.list_(pa.float32())),
                *extra,
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
        if self.shard_columns:  # ShardMeta (indexer.sources.shards) carries them; files in folders have none
            columns.extend(pa.array([getattr(m, name, None) for m in metas], pa.string()) for name in SHARD_COLUMNS)
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def __enter__(self) -> ParquetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._writer.close()
        if kind is None or issubclass(kind, KeyboardInterrupt):
            self.commit()
        else:
            self.discard()


def write_embedding_part(
    metas: list[ImageMeta], vectors: npt.NDArray[np.float32], output: Path, dim: int, model_id: str,
    shard_columns: bool,
) -> None:  # fmt: skip
    """One part of ``indexer embed --ray``: the rows an ``indexer embed`` file would hold for these images, under
    a temporary name renamed when complete (the file exists only whole: it is the part's resume marker)."""
    with ParquetWriter(output, dim, model_id, shard_columns) as writer:
        if metas:
            writer.write(metas, vectors)


def embedding_columns(shard_columns: bool) -> tuple[str, ...]:
    """The columns of an ``indexer embed`` Parquet file."""
    return EMBED_COLUMNS + (SHARD_COLUMNS if shard_columns else ())


class NpyWriter(AtomicFile):
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
        atomic_write_text(
            self.output.with_name(self.output.name.removesuffix(".npy") + ".paths.txt"),
            "".join(paths_line(p) for p in self._paths),
        )


def paths_line(path: str) -> str:
    """One line of ``FILE.paths.txt``: a backslash is written ``\\\\``, a newline ``\\n``, a CR ``\\r``: line N is row N
    whatever the names hold (every other character is written as it is)."""
    return path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") + "\n"


# --- store export and import ----------------------------------------------------------------------------------

EXPORT_FORMAT = b"indexer-export"
EXPORT_VERSION = b"1"
# Payload fields that get their own column, or are derived from the path on import.
_OWN_COLUMNS = ("path", "sha256", "dirs")


def _export_schema(dim: int, model_id: str) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("metadata", pa.string()),
            ("vector", pa.list_(pa.float32())),
        ],
        metadata={b"dim": str(dim).encode(), b"model": model_id.encode(), b"format": EXPORT_FORMAT,
                  b"version": EXPORT_VERSION},
    )  # fmt: skip


def _vector_column(vectors: npt.NDArray[np.float32]) -> pa.ListArray:
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    offsets = pa.array(np.arange(0, vectors.size + 1, max(vectors.shape[1], 1), dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _export_table(points: list[StoredPoint], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    meta = [{k: v for k, v in p.payload.items() if k not in _OWN_COLUMNS} for p in points]
    columns = [
        pa.array([p.id for p in points], pa.string()),
        pa.array([p.path for p in points], pa.string()),
        pa.array([str(p.payload.get("sha256", "")) for p in points], pa.string()),
        pa.array([json.dumps(m, sort_keys=True) for m in meta], pa.string()),
        _vector_column(np.stack([p.vector for p in points if p.vector is not None])),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def export_points(points: Sequence[StoredPoint], output: Path, dim: int, model_id: str) -> None:
    """Write ``points`` (with vectors) to ``output`` in the export format, under a temporary name renamed when
    complete: the file exists only whole (``indexer embed --ray`` uses it as a part's resume marker)."""
    import pyarrow.parquet as pq

    schema = _export_schema(dim, model_id)
    table = _export_table(list(points), schema) if points else schema.empty_table()
    target = AtomicFile(output)
    try:
        pq.write_table(table, str(target.partial))
    except BaseException:
        target.discard()
        raise
    target.commit()


def export_store(
    store: VectorStore, output: Path, *, filter: SearchFilter | None = None, batch_size: int = 1000
) -> int:
    """Write every point (matching the filter) with its vector to ``output`` (.parquet); returns how many."""
    import pyarrow.parquet as pq

    if output.suffix.lower() != ".parquet":
        raise ConfigError("--output", f"{output}: use a .parquet file name")
    if not output.parent.exists():
        raise ConfigError("--output", f"directory {output.parent} does not exist")
    info = store.model_info()
    if info is None:
        raise StoreError(f"the store {store.location} is empty: nothing to export")
    schema = _export_schema(info[1], info[0])
    target = AtomicFile(output)
    written = 0
    try:
        with pq.ParquetWriter(str(target.partial), schema) as writer:
            for batch in chunks(store.scroll(filter=filter, with_vectors=True, batch_size=batch_size), batch_size):
                writer.write_table(_export_table(batch, schema))
                written += len(batch)
    except BaseException:
        target.discard()
        raise
    target.commit()
    log.info("exported %d points to %s", written, output)
    return written


@dataclass(slots=True)
class ImportSummary:
    """What an import did. ``unverified``: rows of an embed file whose image is missing or changed since it was
    embedded; they are imported without size/mtime, so the next ``indexer index`` embeds those files again."""

    imported: int = 0
    unverified: list[str] = field(default_factory=list)
    model: str = ""
    dim: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"imported": self.imported, "unverified": self.unverified, "model": self.model, "dim": self.dim}


@dataclass(frozen=True, slots=True)
class _Source:
    """An opened Parquet file to import: which kind it is, its model and dim."""

    file: Any  # pyarrow.parquet.ParquetFile
    path: Path
    model_id: str
    dim: int
    vector_column: str  # "vector" (export) or "embedding" (embed output)


def _open_source(path: Path) -> _Source:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ConfigError("FILE", f"{path} does not exist")
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:
        raise ConfigError("FILE", f"{path} is not a Parquet file ({exc})") from None
    meta = pf.schema_arrow.metadata or {}
    names = set(pf.schema_arrow.names)
    column = "vector" if {"id", "vector", "metadata"} <= names else "embedding" if "embedding" in names else ""
    if not column or not {"path", "sha256"} <= names:
        raise ConfigError("FILE", f"{path}: neither an `indexer export` nor an `indexer embed` file")
    if b"model" not in meta or b"dim" not in meta:
        raise ConfigError("FILE", f"{path} does not record the model that made its vectors")
    return _Source(pf, path, meta[b"model"].decode(), int(meta[b"dim"]), column)


def import_file(
    store: VectorStore,
    source: Path,
    *,
    batch_size: int = 1000,
    optimize_after: int = 1000,
    on_rows: Callable[[int, int], None] | None = None,
) -> ImportSummary:
    """Upsert every row of an export or embed Parquet file, or of every ``*.parquet`` file in a directory (the
    parts of ``indexer embed --ray``, in either schema), into the store (same model required).

    Memory: one batch of rows at a time (and the Parquet row group it comes from). The graph is built once, by the
    one optimize() after the last batch, never per batch. ``on_rows(done, total)`` is called after each batch."""
    files = _import_files(source)
    summary = ImportSummary()
    sources = [_open_source(path) for path in files]
    total = sum(int(src.file.metadata.num_rows) for src in sources)
    now = time.time()
    for path, src in zip(files, sources, strict=True):
        if summary.model and (src.model_id, src.dim) != (summary.model, summary.dim):
            raise ConfigError("FILE", f"{path} was made by {src.model_id} ({src.dim}-d), not {summary.model}")
        store.ensure_collection(src.model_id, src.dim)
        summary.model, summary.dim = src.model_id, src.dim
        first = summary.imported
        for batch in src.file.iter_batches(batch_size=batch_size):
            points = _points_of(batch, src, now, summary, first_row=summary.imported - first)
            store.upsert(points)
            summary.imported += len(points)
            if on_rows is not None:
                on_rows(summary.imported, total)
    if summary.imported >= max(1, optimize_after):
        store.optimize()
    store.flush()
    log.info("imported %d points from %s", summary.imported, source)
    return summary


def _import_files(source: Path) -> list[Path]:
    if not source.is_dir():
        return [source]
    files = sorted(p for p in source.glob("*.parquet") if p.is_file())
    if not files:
        raise ConfigError("FILE", f"{source} holds no .parquet files")
    return files


def _points_of(batch: Any, src: _Source, now: float, summary: ImportSummary, first_row: int) -> list[StoredPoint]:
    vectors = _batch_vectors(batch.column(src.vector_column), src, first_row)
    paths: list[str] = batch.column("path").to_pylist()
    shas: list[str] = batch.column("sha256").to_pylist()
    if src.vector_column == "vector":
        ids, metas = batch.column("id").to_pylist(), batch.column("metadata").to_pylist()
        payloads = [_exported_payload(p, s, m) for p, s, m in zip(paths, shas, metas, strict=True)]
    else:
        ids = [point_id(p) for p in paths]
        sizes = zip(batch.column("width").to_pylist(), batch.column("height").to_pylist(), strict=True)
        payloads = [
            _embedded_payload(p, s, w, h, src.model_id, now, summary)
            for p, s, (w, h) in zip(paths, shas, sizes, strict=True)
        ]
        for payload, fields in zip(payloads, _shard_fields(batch), strict=True):
            payload.update(fields)
    return [StoredPoint(i, pl, v) for i, pl, v in zip(ids, payloads, vectors, strict=True)]


def _shard_fields(batch: Any) -> list[dict[str, Any]]:
    """The payload fields of the rows read from tar shards (shard, key, caption, metadata) as `indexer index`
    stores them; none for files in folders or a file without the shard columns. Without the shard's size and
    mtime, the next `indexer index` reads such a shard again."""
    from indexer.sources.shards import parse_json

    if not set(SHARD_COLUMNS) <= set(batch.schema.names):
        return [{} for _ in range(batch.num_rows)]
    columns = {name: batch.column(name).to_pylist() for name in SHARD_COLUMNS}
    out: list[dict[str, Any]] = []
    for caption, text, key, shard in zip(*(columns[name] for name in SHARD_COLUMNS), strict=True):
        fields: dict[str, Any] = {"shard": shard, "key": key} if shard else {}
        if shard and caption is not None:
            fields["caption"] = caption
        if shard and text is not None:
            fields["metadata"] = parse_json(text)
        out.append(fields)
    return out


def _batch_vectors(column: Any, src: _Source, first_row: int) -> npt.NDArray[np.float32]:
    """The list<float32> column as an (n, dim) matrix; a row of another length is an error naming the row."""
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((lengths != src.dim) | np.isnan(lengths.astype(np.float64)))
    if bad.size:
        row = first_row + int(bad[0])
        raise ConfigError("FILE", f"{src.path}: row {row} has {lengths[bad[0]]} values, not {src.dim}")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, src.dim)


def _exported_payload(path: str, sha256: str, metadata: str) -> dict[str, Any]:
    payload = json.loads(metadata) if metadata else {}
    if not isinstance(payload, dict):
        raise ConfigError("FILE", f"the metadata of {path} is not a JSON object")
    return exported_payload(path, sha256, payload)


def _embedded_payload(
    path: str, sha256: str, width: int, height: int, model_id: str, now: float, summary: ImportSummary
) -> dict[str, Any]:
    st = _unchanged_stat(Path(path), sha256)
    if st is None:
        summary.unverified.append(path)
    return embedded_payload(path, sha256, width, height, model_id, now, st)


def _unchanged_stat(path: Path, sha256: str) -> os.stat_result | None:
    from indexer.decode.image import hash_file

    try:
        before = os.stat(path)
        same = hash_file(path) == sha256
        after = os.stat(path)
    except OSError:
        return None
    unchanged = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    return after if same and unchanged else None
