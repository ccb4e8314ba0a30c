"""The decode stage: a file on disk (or bytes from a shard) → model-ready pixels, robustly.

`decode_file` reads a file once, hashes those bytes, decodes them with Pillow and returns either a
`Decoded` (metadata + uint8 CHW pixels of the model's input size) or a `Failure` with a short reason;
it never raises for a problem with one file.

Pixels follow open_clip's eval transform exactly (`indexer.decode.geometry`), except that normalisation is left
to the model stage, which does it batched.

`indexer.decode.pool.DecodePool` runs `decode_file` in worker processes. This module must not import torch: it
is imported in every worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from indexer import formats
from indexer.decode.budget import decode_cost
from indexer.decode.geometry import Pixels, check_spec, preprocess
from indexer.errors import DecodeError
from indexer.records import Decoded, DecodeLimits, Failure, ImageMeta, PreprocessSpec, display_path, name_problem

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "LoadedImage",
    "Reserve",
    "decode_bytes",
    "decode_file",
    "draft_scale",
    "hash_file",
    "load_image",
]

SUPPORTED_EXTENSIONS = formats.SUPPORTED_EXTENSIONS


# The only Pillow formats we open, whatever the file is called: no EPS (Ghostscript), PSD, ICO, ...
_FORMATS = formats.FORMATS
for _plugin in ("Bmp", "Gif", "Png", "Tiff", "WebP", "Avif"):
    with contextlib.suppress(ImportError):
        importlib.import_module(f"PIL.{_plugin}ImagePlugin")

_DRAFT_MIN_SHORT = 1  # after a JPEG draft the shortest side stays >= image_size (DCT scaling is a box filter)
_TRANSPOSE = {  # EXIF orientation → transpose, as ImageOps.exif_transpose does it
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "P", "La", "RGBa"})
_WHITE = (255, 255, 255, 255)
_PEEK = 256 << 10  # bytes of a file read for its header before a memory budget's share is taken (decode_file)

Reserve = Callable[[int], contextlib.AbstractContextManager[object]]  # held around a decode, given its cost in bytes


class _Unusable(Exception):
    """Internal: this file cannot be used; `reason` says why (becomes a Failure or a DecodeError)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LoadedImage(NamedTuple):
    """A decoded RGB image, before geometry: what `load_image` returns."""

    image: Image.Image  # mode "RGB", EXIF orientation applied, transparency on white; maybe drafted
    format: str  # Pillow's format name: "JPEG", "PNG", ...
    width: int  # original width as displayed (after EXIF orientation, before any draft)
    height: int


# ---------------------------------------------------------------------------------------------------
# Reading files


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks (used for move detection)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _os_errors(other: str) -> Iterator[None]:
    """Turn the OS errors of touching one file into a short reason (``other``: the prefix for the rest)."""
    try:
        yield
    except FileNotFoundError:
        raise _Unusable("file vanished before it could be read") from None
    except PermissionError:
        raise _Unusable("permission denied") from None
    except IsADirectoryError:
        raise _Unusable("is a directory") from None
    except OSError as exc:
        raise _Unusable(f"{other}: {exc.strerror or exc}") from None


def _stat(path: Path, limits: DecodeLimits) -> os.stat_result:
    """Stat a file and reject what cannot be an acceptable image before reading any byte."""
    with _os_errors("cannot stat file"):
        st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise _Unusable("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise _Unusable("not a regular file")
    if st.st_size == 0:
        raise _Unusable("empty file (0 bytes)")
    _check_file_size(st.st_size, limits)
    return st


def _check_file_size(size: int, limits: DecodeLimits) -> None:
    if size > limits.max_file_bytes:
        raise _Unusable(f"file too large: {size} bytes exceeds max_file_bytes {limits.max_file_bytes}")


def _read(path: Path, limits: DecodeLimits) -> tuple[bytes, os.stat_result]:
    """Read a file's bytes once; returns them with the stat taken before reading."""
    st = _stat(path, limits)
    with _os_errors("read error"), open(path, "rb") as f:
        data = f.read(limits.max_file_bytes + 1)
        after = os.fstat(f.fileno())
    _check_file_size(len(data), limits)
    same = (after.st_ino, after.st_dev, after.st_size, after.st_mtime_ns) == (
        st.st_ino,
        st.st_dev,
        st.st_size,
        st.st_mtime_ns,
    )
    if len(data) != st.st_size or not same:
        raise _Unusable("file changed while being read")
    return data, st


# ---------------------------------------------------------------------------------------------------
# Decoding bytes into an RGB image

_heif_state: list[bool] = []  # [] until tried, then [available]; per process


def _heif_available() -> bool:
    """Register pillow-heif's openers the first time a HEIF/AVIF-looking file shows up (once per process)."""
    if not _heif_state:
        try:
            heif = importlib.import_module("pillow_heif")
        except ImportError:
            _heif_state.append(False)
        else:
            heif.register_heif_opener()
            if "AVIF" not in Image.OPEN and hasattr(heif, "register_avif_opener"):
                heif.register_avif_opener()
            _heif_state.append(True)
    return _heif_state[0]


def _is_isobmff(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's bomb threshold for the duration, with its warning made an error; then restore it.

    Pillow's other warnings ("Corrupt EXIF data", ...) are silenced: a file either decodes or gets a
    reason, and 100k files must not flood the log. (Process-global state: decode in one thread at a time.)
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes) -> Image.Image:
    """Identify the image and read its header only (no pixels)."""
    heif = _is_isobmff(data) and _heif_available()
    formats = [f for f in _FORMATS if f in Image.OPEN]
    # Our own size check follows at once with a precise message; Pillow's checks during loading
    # (GIF frames, TIFF tiles, ...) run under limits.max_pixels.
    with _pixel_limit(None):
        try:
            return Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError:
            if _is_isobmff(data) and not heif:
                raise _Unusable(
                    "HEIF/AVIF image, but no decoder for it is installed (pip install pillow-heif)"
                ) from None
            raise _Unusable("not an image (cannot identify image file)") from None


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    pixels = width * height
    if pixels > limits.max_pixels:
        raise _Unusable(
            f"image too large: {width}x{height} = {pixels} pixels exceeds max_pixels "
            f"{limits.max_pixels} (decompression bomb?)"
        )


def draft_scale(width: int, height: int, image_size: int) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) to decode at: the largest that keeps the shortest side
    at least image_size. Orientation does not matter: a rotation does not change the shortest side."""
    short = min(width, height)
    for scale in (8, 4, 2):
        if short // scale >= _DRAFT_MIN_SHORT * image_size:
            return scale
    return 1


def _draft(im: Image.Image, draft_to: int) -> None:
    """Ask a JPEG to decode at a reduced scale (in stored orientation, before any EXIF transpose)."""
    if not isinstance(im, JpegImagePlugin.JpegImageFile):
        return
    width, height = im.size
    scale = draft_scale(width, height, draft_to)
    if scale > 1:
        im.draft("RGB", (width // scale, height // scale))


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block must not lose the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit ("I;16*"), 32-bit integer ("I") and float ("F") greyscale to 8-bit "L"."""
    arr = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            out = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = values
        else:
            out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    else:
        values = arr.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 65535.0:
            out = values / 257.0
        else:
            out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any supported mode → "RGB"; transparency is composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError:
        raise _Unusable(f"unsupported image mode {im.mode}") from None


class _Header(NamedTuple):
    """An image opened and checked, no pixel decoded yet."""

    image: Image.Image  # drafted when asked: its size and mode are those it will decode at
    format: str
    width: int  # as stored, before any draft
    height: int

    def cost(self, file_bytes: int) -> int:
        """The memory decoding it takes at its peak (`indexer.decode.budget.decode_cost`)."""
        im = self.image
        alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        return decode_cost(im.width, im.height, im.mode, self.format, alpha, file_bytes)


def _header(data: bytes, limits: DecodeLimits, draft_to: int | None) -> _Header:
    """Bytes → an image with only its header read, checked against the limits, drafted (``draft_to``)."""
    im = _open(data)  # not closed here: the result may be `im` itself; it holds only `data`
    width, height = im.size
    _check_pixels(width, height, limits)
    fmt = im.format or "unknown"
    if draft_to is not None:
        _draft(im, draft_to)
    return _Header(im, fmt, width, height)


def _load(head: _Header, limits: DecodeLimits) -> LoadedImage:
    """Decode the pixels; raises _Unusable or Pillow's own exceptions."""
    im, width, height = head.image, head.width, head.height
    with _pixel_limit(limits.max_pixels):
        im.load()
        orientation = _orientation(im)
        method = _TRANSPOSE.get(orientation)
        rgb = _to_rgb(im.transpose(method) if method is not None else im)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return LoadedImage(rgb, head.format, width, height)


def _decode(data: bytes, limits: DecodeLimits, draft_to: int | None) -> LoadedImage:
    """Bytes → LoadedImage; raises _Unusable or Pillow's own exceptions."""
    return _load(_header(data, limits, draft_to), limits)


def _reason(exc: Exception) -> str:
    """A short reason for an exception Pillow (or numpy) raised while decoding."""
    if isinstance(exc, _Unusable):
        return exc.reason
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow: "Image size (N pixels) exceeds ..."
        return f"image too large: {found[1] if found else 'too many'} pixels (decompression bomb?)"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    text = str(exc).strip()
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return "truncated image data"
    detail = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"corrupt image data ({detail})"


def load_image(
    data: bytes, limits: DecodeLimits, *, draft_to: int | None = None, source: Path = Path("<bytes>")
) -> LoadedImage:
    """Decode image bytes into an RGB Pillow image (EXIF orientation applied, transparency on white).

    With `draft_to` (the model's image size), large JPEGs decode at a reduced DCT scale that keeps the
    shortest side >= 2 × draft_to; `width`/`height` are still the full-resolution displayed ones.
    Raises `DecodeError(source, reason)` when the bytes are no usable image.
    """
    try:
        return _decode(data, limits, draft_to)
    except Exception as exc:  # every per-file problem becomes a reason
        raise DecodeError(source, _reason(exc)) from exc


# ---------------------------------------------------------------------------------------------------
# One file


def _model_pixels(head: _Header, limits: DecodeLimits, spec: PreprocessSpec) -> tuple[Pixels, int, int]:
    """Decode and resize: the pixels and the displayed size; every full-size image is closed (its memory freed)
    before this returns, so that a memory budget held around it is given back with the memory."""
    try:
        loaded = _load(head, limits)
        try:
            return preprocess(loaded.image, spec), loaded.width, loaded.height
        finally:
            loaded.image.close()
    finally:
        head.image.close()


def _peeked_cost(path: Path, limits: DecodeLimits, draft_to: int | None) -> int | None:
    """What decoding a file over _PEEK costs, by the header in its first _PEEK bytes (its share is then taken before
    the read: a waiting worker holds no 300 MB scan); None for a smaller file or a header not there (a TIFF's IFD)."""
    try:
        if os.stat(path).st_size <= _PEEK:  # the common case: one stat, no open
            return None
        with open(path, "rb") as f:
            return _header(f.read(_PEEK), limits, draft_to).cost(os.fstat(f.fileno()).st_size)
    except Exception:  # the whole file is read and checked next, and says why
        return None


def _decode_reserved(
    path: Path, limits: DecodeLimits, spec: PreprocessSpec, reserve: Reserve
) -> tuple[os.stat_result, str, Pixels, int, int, str]:
    """`decode_file`'s work inside ``reserve``: stat, sha256, pixels, displayed size, format."""
    draft_to = None if limits.full_resolution else spec.image_size
    early = None if reserve is contextlib.nullcontext else _peeked_cost(path, limits, draft_to)
    with reserve(early) if early is not None else contextlib.nullcontext():
        data, st = _read(path, limits)
        head = _header(data, limits, draft_to)
        with reserve(head.cost(len(data))) if early is None else contextlib.nullcontext():
            pixels, width, height = _model_pixels(head, limits, spec)
            sha256, fmt = hashlib.sha256(data).hexdigest(), head.format
            del data, head  # the file's bytes were counted in the share: gone before it is given back
    return st, sha256, pixels, width, height, fmt


def decode_file(
    path: Path, spec: PreprocessSpec, limits: DecodeLimits, reserve: Reserve = contextlib.nullcontext
) -> Decoded | Failure:
    """Read, hash and decode one file into model-ready pixels; a Failure (never an exception) when
    the file cannot be used. Raises ValueError only for an invalid `spec`.

    ``reserve(cost)`` (default: nothing) is held while the file's bytes and full-size (or drafted) pixels are in
    memory, given their bytes by the header (`indexer.decode.budget`); from before the read where the header is in
    the first 256 KiB."""
    check_spec(spec)
    if (problem := name_problem(path)) is not None:  # whoever sent it (a watcher event), it could not be stored
        return Failure(Path(display_path(path)), problem)
    try:
        st, sha256, pixels, width, height, fmt = _decode_reserved(path, limits, spec, reserve)
    except Exception as exc:  # a per-file problem must never stop the run
        return Failure(path, _reason(exc))
    meta = ImageMeta(path, st.st_size, st.st_mtime_ns, sha256, width, height, fmt)
    return Decoded(meta=meta, pixels=pixels)


def decode_bytes(
    data: bytes, source: Path, mtime_ns: int, spec: PreprocessSpec, limits: DecodeLimits
) -> Decoded | Failure:
    """Decode image bytes already read from elsewhere (a member of a tar shard, a Ray object) into model-ready
    pixels; ``source`` names them in the metadata and in a Failure. Never raises for bad bytes."""
    check_spec(spec)
    try:
        if not data:
            raise _Unusable("empty file (0 bytes)")
        _check_file_size(len(data), limits)
        loaded = _decode(data, limits, spec.image_size)
        pixels = preprocess(loaded.image, spec)
    except Exception as exc:  # a per-image problem must never stop the run
        return Failure(source, _reason(exc))
    sha = hashlib.sha256(data).hexdigest()
    meta = ImageMeta(source, len(data), mtime_ns, sha, loaded.width, loaded.height, loaded.format)
    return Decoded(meta=meta, pixels=pixels)
