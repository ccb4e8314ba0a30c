"""A page of stored points as it travels between the CLI and the store's owner, both ways: the answers of
``/control/store/scroll``, ``retrieve`` and ``find_by_sha256``, and the body of ``/control/store/upsert``.

One body of type `MEDIA_TYPE`, the vectors as one block of raw float32 instead of a base64 string per point
(a 768-d point was about 4 KB of JSON, decoded and validated point by point)::

    b"IXP1"                 4 bytes, what this is (and its version)
    header length H         4 bytes, unsigned, little-endian
    header                  H bytes of UTF-8 JSON, padded with spaces so that the block starts 4-byte aligned:
                            {"dim": D, "cursor": str | null,
                             "points": [{"id": UUID, "payload": {...}, "vector": true | false}, ...]}
    vectors                 N×D little-endian float32, row-major: the vectors of the points whose "vector" is true,
                            in their order (N of them; D is 0 when N is 0)

`decode_page` checks all of it and raises `PageError` naming the part that is wrong; the owner answers that as a
422, the client as a `StoreError`. No web framework here: the CLI side stays light.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.records import StoredPoint

MEDIA_TYPE = "application/vnd.indexer.points"
MAGIC = b"IXP1"
MAX_DIM = 65_536
_PREFIX = struct.Struct("<4sI")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_POINT_KEYS = frozenset({"id", "payload", "vector"})
_HEADER_KEYS = frozenset({"dim", "cursor", "points"})


class PageError(ValueError):
    """A body that is not a well-formed page of points; ``where`` names the part (header, points[3].id, vectors)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Page:
    """Points, and the cursor of the scroll they are a page of (None: the last page, or no scroll)."""

    points: list[StoredPoint]
    cursor: str | None = None


def encode_page(points: Sequence[StoredPoint], cursor: str | None = None) -> bytes:
    """The body carrying ``points`` (their vectors, all of one length, in one float32 block)."""
    vectors = [p.vector for p in points if p.vector is not None]
    dim = len(vectors[0]) if vectors else 0
    if any(len(v) != dim for v in vectors):
        raise ValueError("the vectors of one page must all have the same length")
    entries = [{"id": p.id, "payload": p.payload, "vector": p.vector is not None} for p in points]
    header = json.dumps({"dim": dim, "cursor": cursor, "points": entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 4)
    block = np.stack(vectors).astype("<f4", copy=False).tobytes() if vectors else b""
    return b"".join((_PREFIX.pack(MAGIC, len(header)), header, block))


def decode_page(data: bytes, max_points: int | None = None) -> Page:
    """The page a body carries; `PageError` when any part of it is wrong (at most ``max_points`` points)."""
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise PageError("body", f"not a page of points (it does not start with {MAGIC.decode()})")
    _, size = _PREFIX.unpack_from(data)
    start = _PREFIX.size + size
    if start > len(data):
        raise PageError("header", f"its length ({size} bytes) runs past the end of the body ({len(data)} bytes)")
    header = _header(data[_PREFIX.size : start], max_points)
    dim, entries = header["dim"], header["points"]
    rows = sum(1 for e in entries if e["vector"])
    if len(data) - start != rows * dim * 4:
        raise PageError("vectors", f"{len(data) - start} bytes, but {rows} × {dim} float32 take {rows * dim * 4}")
    if rows and not dim:
        raise PageError("dim", f"0, but {rows} points have a vector")
    matrix = np.frombuffer(data, dtype="<f4", count=rows * dim, offset=start).reshape(rows, dim).astype(np.float32)
    vectors = iter(matrix)
    points = [StoredPoint(e["id"], e["payload"], next(vectors) if e["vector"] else None) for e in entries]
    return Page(points, header["cursor"])


def _header(raw: bytes, max_points: int | None) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise PageError("header", f"not JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise PageError("header", f"not an object of exactly {', '.join(sorted(_HEADER_KEYS))}")
    dim, cursor, entries = header["dim"], header["cursor"], header["points"]
    if type(dim) is not int or not 0 <= dim <= MAX_DIM:
        raise PageError("dim", f"{dim!r} is not a number of floats from 0 to {MAX_DIM}")
    if cursor is not None and not isinstance(cursor, str):
        raise PageError("cursor", f"{cursor!r} is neither a string nor null")
    if not isinstance(entries, list):
        raise PageError("points", "not a list")
    if max_points is not None and len(entries) > max_points:
        raise PageError("points", f"{len(entries)} points, at most {max_points} a page")
    for i, entry in enumerate(entries):
        _check_point(i, entry)
    return header


def _check_point(i: int, entry: Any) -> None:
    if not isinstance(entry, dict) or set(entry) != _POINT_KEYS:
        raise PageError(f"points[{i}]", "not an object of exactly id, payload, vector")
    if not isinstance(entry["id"], str) or not _UUID.fullmatch(entry["id"]):
        raise PageError(f"points[{i}].id", f"{entry['id']!r} is not a UUID")
    if not isinstance(entry["payload"], dict):
        raise PageError(f"points[{i}].payload", "not an object")
    if not isinstance(entry["vector"], bool):
        raise PageError(f"points[{i}].vector", f"{entry['vector']!r} is not true or false")
