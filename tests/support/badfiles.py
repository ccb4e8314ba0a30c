"""A generated corpus of bad inputs, each with the words its failure reason must contain."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def _png_bytes(size: tuple[int, int] = (32, 32), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Write the bad files into ``folder``; returns file name → a word its failure reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (_jpeg_bytes()[:300], "truncated"),
        "truncated.png": (_png_bytes((200, 200))[:80], "truncated"),
        "notes-not-an-image.png": (b"just some text, not pixels\n" * 20, "not an image"),
        "bomb.png": (bomb_png(), "bomb"),
    }
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: word for name, (_, word) in cases.items()}


def write_misnamed_png(path: Path) -> Path:
    """A valid PNG behind a .jpg name: it must decode fine (format PNG)."""
    path.write_bytes(_png_bytes(color="blue"))
    return path
