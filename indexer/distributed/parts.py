"""Work units of a distributed run, and what happens to one on a CPU worker (no Ray here: plain, testable code).

A part is up to ``part_size`` images from one source: a slice of the files found under a folder, or a range of the
samples of one tar shard. Its id is a hash of what it holds (paths with size and mtime, or the shard's size and
mtime and the sample range), so a part whose inputs changed is a new part, and its output file
``part-ID.parquet`` is its resume marker: a re-run skips the parts whose file exists.

``decode_part`` turns a part into one row: the uint8 pixels of its images as bytes (N, 3, S, S), their metadata as
JSON, and the failures as (path, reason) pairs, never an exception.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.decode.image import SUPPORTED_EXTENSIONS, decode_file
from indexer.records import Decoded, DecodeLimits, Failure, FileEntry, ImageMeta, PreprocessSpec
from indexer.sources.scan import scan
from indexer.sources.shards import ShardMeta, count_samples, decode_shard, find_shards

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
DEFAULT_PART_SIZE = 256


@dataclass(frozen=True)
class Part:
    """A work unit: ``files`` (path, size, mtime_ns) of a folder slice, or samples ``start``..``stop`` of a shard."""

    kind: str  # "files" | "shard"
    source: str
    files: tuple[tuple[str, int, int], ...] = ()
    start: int = 0
    stop: int = 0
    shard_size: int = 0
    shard_mtime_ns: int = 0
    samples: int = 0  # the shard's sample count
    part_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.part_id:
            identity = json.dumps([self.kind, self.source, self.files, self.start, self.stop,
                                   self.shard_size, self.shard_mtime_ns, self.samples])  # fmt: skip
            object.__setattr__(self, "part_id", hashlib.sha256(identity.encode()).hexdigest()[:20])

    @property
    def images(self) -> int:
        return len(self.files) if self.kind == "files" else self.stop - self.start

    @property
    def whole_shard(self) -> bool:
        """A shard read in one part: its points can carry the shard's mtime (unchanged shards are skipped)."""
        return self.kind == "shard" and (self.start, self.stop) == (0, self.samples)

    def file_name(self) -> str:
        return f"{PART_PREFIX}{self.part_id}{PART_SUFFIX}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Part:
        data = json.loads(text)
        data["files"] = tuple(tuple(f) for f in data["files"])
        return cls(**data)


def plan_parts(
    roots: list[Path], part_size: int, *, follow_symlinks: bool = True, include_hidden: bool = False
) -> tuple[list[Part], list[Failure]]:
    """The parts of the images under ``roots`` (folders sliced in path order, shards by sample range), and the
    failures met while scanning."""
    failures: list[Failure] = []
    files = scan(roots, SUPPORTED_EXTENSIONS, follow_symlinks=follow_symlinks, include_hidden=include_hidden,
                 on_error=failures.append)  # fmt: skip
    parts = list(_file_parts(files, part_size))
    for shard in find_shards(roots, include_hidden):
        parts.extend(shard_parts(shard, part_size))
    return parts, failures


def _file_parts(files: Iterator[FileEntry], part_size: int) -> Iterator[Part]:
    chunk: list[FileEntry] = []
    for entry in files:
        if chunk and (len(chunk) >= part_size or entry.path.parent != chunk[0].path.parent):
            yield _files_part(chunk)
            chunk = []
        chunk.append(entry)
    if chunk:
        yield _files_part(chunk)


def _files_part(chunk: list[FileEntry]) -> Part:
    files = tuple((str(e.path), e.size, e.mtime_ns) for e in chunk)
    return Part("files", str(chunk[0].path.parent), files)


def shard_parts(shard: FileEntry, part_size: int) -> list[Part]:
    """A shard's samples in ranges of ``part_size`` (an unreadable shard: one part, which reports why)."""
    count = max(count_samples(shard.path), 1)
    return [_shard_part(shard, start, min(start + part_size, count), count) for start in range(0, count, part_size)]


def _shard_part(shard: FileEntry, start: int, stop: int, samples: int) -> Part:
    return Part("shard", str(shard.path), start=start, stop=stop, shard_size=shard.size,
                shard_mtime_ns=shard.mtime_ns, samples=samples)  # fmt: skip


# --- on a CPU worker -----------------------------------------------------------------------------------------------


def decode_part(part: Part, spec: PreprocessSpec, limits: DecodeLimits) -> dict[str, Any]:
    """Decode every image of ``part``: one row with the pixels as bytes, metadata and failures as JSON text."""
    decoded: list[Decoded] = []
    failures: list[list[str]] = []
    for item in _decoded(part, spec, limits):
        if isinstance(item, Failure):
            failures.append([str(item.path), item.reason])
        else:
            decoded.append(item)
    pixels = np.stack([d.pixels for d in decoded]) if decoded else np.zeros((0, 3, spec.image_size, spec.image_size))
    return {
        "part": part.to_json(),
        "n": len(decoded),
        "image_size": spec.image_size,
        "pixels": np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(),
        "metas": json.dumps([meta_to_dict(d.meta) for d in decoded]),
        "failures": json.dumps(failures),
    }


def decode_row(row: dict[str, Any], spec: PreprocessSpec, limits: DecodeLimits) -> dict[str, Any]:
    """The CPU decode task: a planned part's row in, its decoded row out (this module never imports torch, so a
    decode worker starts without it)."""
    return decode_part(Part.from_json(row["part"]), spec, limits)


def _decoded(part: Part, spec: PreprocessSpec, limits: DecodeLimits) -> Iterator[Decoded | Failure]:
    if part.kind == "files":
        for path, _size, _mtime in part.files:
            yield decode_file(Path(path), spec, limits)
        return
    shard = FileEntry(Path(part.source), part.shard_size, part.shard_mtime_ns)
    yield from decode_shard(shard, spec, limits, part.start, part.stop)


def meta_to_dict(meta: ImageMeta) -> dict[str, Any]:
    out = {name: getattr(meta, name) for name in _fields(meta)}
    out["path"] = str(meta.path)
    return out


def meta_from_dict(data: dict[str, Any]) -> ImageMeta:
    data = {**data, "path": Path(data["path"])}
    return ShardMeta(**data) if "shard" in data else ImageMeta(**data)


def _fields(meta: ImageMeta) -> tuple[str, ...]:
    return tuple(meta.__dataclass_fields__)


def pixels_of(row: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The (N, 3, S, S) uint8 pixels a decode row carries."""
    size = int(row["image_size"])
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(int(row["n"]), 3, size, size)
