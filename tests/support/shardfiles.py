"""Writing img2dataset / WebDataset shards for tests: ``NNNN.tar`` with ``KEY.png`` + ``KEY.txt`` + ``KEY.json``
members, and the sibling ``NNNN.parquet`` the downloader writes (which must not be taken for an input)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.fixtures.shapes import CLASSES, caption, draw_shape, image_rng


def shape_png(index: int, seed: int = 0, size: int = 64) -> bytes:
    color, shape = CLASSES[index % len(CLASSES)]
    out = io.BytesIO()
    draw_shape(color, shape, image_rng(seed, index), size).save(out, format="PNG")
    return out.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def write_shard(
    path: Path,
    count: int,
    *,
    first: int = 0,
    seed: int = 0,
    bad: dict[int, bytes] | None = None,
    sibling_parquet: bool = True,
) -> list[str]:
    """Write a shard of ``count`` shape images (keys ``first`` ...); ``bad`` replaces some images' bytes.
    Returns the keys in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    rows: list[dict[str, object]] = []
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + count):
            key = f"{i:09d}"
            color, shape = CLASSES[i % len(CLASSES)]
            data = (bad or {}).get(i, shape_png(i, seed))
            _add(tf, f"{key}.png", data)
            _add(tf, f"{key}.txt", caption(color, shape).encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "url": f"https://example.com/{key}.png"}).encode())
            keys.append(key)
            rows.append({"key": key, "caption": caption(color, shape), "status": "success"})
    if sibling_parquet:
        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))
    return keys


def write_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """``shards`` shards ``00000.tar`` ... of ``per_shard`` images each, with distinct keys."""
    paths = []
    for n in range(shards):
        path = folder / f"{n:05d}.tar"
        write_shard(path, per_shard, first=n * per_shard, seed=seed)
        paths.append(path)
    return paths


def truncate(path: Path, keep_fraction: float) -> None:
    """Cut a file short, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def write_members(path: Path, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> None:
    """A shard of exactly these members, in order: (name, bytes) for a regular member, or (name, TarInfo) for any
    other kind (``special``). GNU format, so a name may carry bytes that are not UTF-8 (surrogate escapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, what in members:
            if isinstance(what, tarfile.TarInfo):
                what.name = name
                tf.addfile(what)
            else:
                _add(tf, name, what)


def special(kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A member header of ``kind`` (tarfile.SYMTYPE, LNKTYPE, CHRTYPE, BLKTYPE, FIFOTYPE) with no data."""
    info = tarfile.TarInfo("placeholder")
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    return info


def flat_png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A one-colour RGB PNG of any size, written row by row (a 13,000 px square takes kilobytes of memory and
    ≈ 500 KB on disk): what decodes to a huge image from a small member."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(color) * width
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
