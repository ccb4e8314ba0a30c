"""Writing img2dataset / WebDataset shards for tests: ``NNNN.tar`` with ``KEY.png`` + ``KEY.txt`` + ``KEY.json``
members, and the sibling ``NNNN.parquet`` the downloader writes (which must not be taken for an input)."""

from __future__ import annotations

import io
import json
import tarfile
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
