"""Thumbnails on disk: one JPEG per (content sha256, size), made on first request and kept.

The cache key is the file's content hash, so a renamed or moved file keeps its thumbnail and two copies of one
photo share one. The hash recorded in the store is trusted for lookups; when a thumbnail is made, the bytes actually
read are hashed and the thumbnail is filed under that hash, so a file that changed since it was indexed never
poisons the entry of its old content. Files are written to a temp name and renamed: readers never see half a file.

Decoding goes through `decode.load_image` (same limits against bombs and absurd sizes as indexing; JPEGs decoded at
reduced DCT scale), which uses process-global Pillow state: call `ThumbnailCache.get` from one thread at a time.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from indexer.atomicio import atomic_write_bytes
from indexer.decode.image import load_image
from indexer.errors import DecodeError
from indexer.records import DecodeLimits

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
JPEG_QUALITY = 85


class ThumbnailCache:
    """Thumbnails of at most `size` pixels on the longest side, as JPEG files under `directory`."""

    def __init__(self, directory: Path, size: int, limits: DecodeLimits) -> None:
        self.directory = Path(directory).expanduser()
        self.size = size
        self.limits = limits

    def path_for(self, sha256: str) -> Path:
        """Where the thumbnail of content `sha256` lives (two-level fan-out keeps directories small)."""
        return self.directory / sha256[:2] / f"{sha256}-{self.size}.jpg"

    def get(self, source: Path, sha256: str, read: Callable[[], bytes] | None = None) -> tuple[Path, bool]:
        """The thumbnail file of `source` and whether it came from the cache; ``read`` gives the image's bytes
        where they are not the file's own (a member of a tar shard).

        Raises DecodeError (with the reason) when the file cannot be read or is no usable image.
        """
        if _SHA256.fullmatch(sha256):
            cached = self.path_for(sha256)
            if cached.is_file():
                return cached, True
        data = read() if read is not None else read_limited(source, self.limits.max_file_bytes)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            log.info("%s changed since it was indexed: thumbnail filed under its current content", source)
        target = self.path_for(actual)
        if not target.is_file():
            _write_atomic(target, make_thumbnail(data, self.size, self.limits, source))
        return target, False


def read_limited(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refusing files larger than max_bytes; DecodeError with the reason on any failure."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise DecodeError(path, "the file is no longer on disk") from None
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except OSError as exc:
        raise DecodeError(path, f"read error: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise DecodeError(path, f"file too large: more than {max_bytes} bytes")
    return data


def make_thumbnail(data: bytes, size: int, limits: DecodeLimits, source: Path = Path("<bytes>")) -> bytes:
    """Image bytes → JPEG bytes of at most size x size pixels, aspect ratio kept, EXIF orientation applied."""
    # draft_to keeps the decoded shortest side >= 2 * draft_to >= size: enough for a sharp thumbnail.
    loaded = load_image(data, limits, draft_to=max(1, size // 2), source=source)
    image = loaded.image
    try:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    except (OSError, ValueError, MemoryError) as exc:
        raise DecodeError(source, f"cannot make a thumbnail: {exc}") from exc
    return out.getvalue()


def _write_atomic(target: Path, data: bytes) -> None:
    """Write data to target atomically (`indexer.atomicio`), making its directory first; a cache, so no fsync."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data, durable=False)
