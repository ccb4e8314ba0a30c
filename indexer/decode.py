"""The decode stage: a file on disk → model-ready pixels, robustly, in a pool of worker processes.

`decode_file` reads a file once, hashes those bytes, decodes them with Pillow and returns either a
`Decoded` (metadata + uint8 CHW pixels of the model's input size) or a `Failure` with a short reason;
it never raises for a problem with one file.

Pixels follow open_clip's eval transform exactly (resize the shortest side with PIL, torchvision's
size arithmetic and centre crop, or "squash"), except that normalisation (x/255 - mean)/std is left
to the model stage, which does it batched.

`DecodePool` runs `decode_file` in worker processes (forkserver/spawn, never fork: the parent holds
torch threads) and yields results in input order with a bounded look-ahead. This module must not
import torch: it is imported in every worker.

Test-only hook: when the environment variable ``INDEXER_TEST_CRASH_ON`` names a file (its base name)
at the time a pool starts, the worker process decoding that file exits abruptly (``os._exit``), so the
tests can check that a crashing decoder costs only its own file. Decoding in-process never reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import itertools
import multiprocessing
import os
import re
import select
import signal
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import numpy as np
import numpy.typing as npt
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from indexer import formats, shm
from indexer.errors import DecodeError, IndexerError
from indexer.records import Decoded, DecodeLimits, Failure, ImageMeta, PreprocessSpec, display_path, name_problem

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "TRANSPORTS",
    "DecodePool",
    "LoadedImage",
    "decode_bytes",
    "decode_file",
    "default_workers",
    "draft_scale",
    "hash_file",
    "load_image",
    "preprocess",
]

SUPPORTED_EXTENSIONS = formats.SUPPORTED_EXTENSIONS

CRASH_ENV = "INDEXER_TEST_CRASH_ON"  # test-only, see the module docstring

# The only Pillow formats we open, whatever the file is called: no EPS (Ghostscript), PSD, ICO, ...
_FORMATS = formats.FORMATS
for _plugin in ("Bmp", "Gif", "Png", "Tiff", "WebP", "Avif"):
    with contextlib.suppress(ImportError):
        importlib.import_module(f"PIL.{_plugin}ImagePlugin")

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")
_DRAFT_MIN_SHORT = 1  # after a JPEG draft the shortest side stays >= image_size (DCT scaling is a box filter)
_EXACT_RESIZE_MAX_ASPECT = 16  # beyond this aspect ratio resize only the crop box (bounded memory)
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

Pixels = npt.NDArray[np.uint8]


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


def _decode(data: bytes, limits: DecodeLimits, draft_to: int | None) -> LoadedImage:
    """Bytes → LoadedImage; raises _Unusable or Pillow's own exceptions."""
    im = _open(data)  # not closed here: the result may be `im` itself; it holds only `data`
    width, height = im.size
    _check_pixels(width, height, limits)
    fmt = im.format or "unknown"
    if draft_to is not None:
        _draft(im, draft_to)
    with _pixel_limit(limits.max_pixels):
        im.load()
        orientation = _orientation(im)
        method = _TRANSPOSE.get(orientation)
        rgb = _to_rgb(im.transpose(method) if method is not None else im)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return LoadedImage(rgb, fmt, width, height)


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
# Geometry (open_clip's eval transform, without normalisation)


def _check_spec(spec: PreprocessSpec) -> None:
    if spec.interpolation not in _RESAMPLE:
        raise ValueError(f"unsupported interpolation {spec.interpolation!r} (expected bicubic or bilinear)")
    if spec.resize_mode not in _RESIZE_MODES:
        raise ValueError(f"unsupported resize_mode {spec.resize_mode!r} (expected shortest or squash)")
    if spec.image_size < 1:
        raise ValueError(f"image_size must be positive, not {spec.image_size}")


def _resize_shortest(image: Image.Image, size: int, resample: Image.Resampling, floor: bool = False) -> Image.Image:
    """torchvision Resize(size) (shortest side) then CenterCrop(size), with torchvision's rounding
    (``floor``: transformers' CLIPImageProcessor, which floors the crop offset)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    top = (new_h - size) // 2 if floor else round((new_h - size) / 2.0)  # torchvision: round half to even
    left = (new_w - size) // 2 if floor else round((new_w - size) / 2.0)
    if new_long <= _EXACT_RESIZE_MAX_ASPECT * size:
        resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), resample)
        return resized.crop((left, top, left + size, top + size))
    # Extreme aspect ratio: resample only the crop window (same scale and filter support, bounded memory).
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), resample, box=box)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> Pixels:
    """An RGB image → uint8 CHW pixels (3, S, S), C-contiguous, as open_clip's eval transform
    geometry for `spec` would produce them (before ToTensor/Normalize)."""
    _check_spec(spec)
    size = spec.image_size
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize_mode == "squash":
        out = image if image.size == (size, size) else image.resize((size, size), resample)
    else:
        out = _resize_shortest(image, size, resample, spec.crop_rounding == "floor")
    if out.mode != "RGB":
        out = out.convert("RGB")
    hwc = np.asarray(out, dtype=np.uint8)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------
# One file


def decode_file(path: Path, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded | Failure:
    """Read, hash and decode one file into model-ready pixels; a Failure (never an exception) when
    the file cannot be used. Raises ValueError only for an invalid `spec`."""
    _check_spec(spec)
    if (problem := name_problem(path)) is not None:  # whoever sent it (a watcher event), it could not be stored
        return Failure(Path(display_path(path)), problem)
    try:
        data, st = _read(path, limits)
        loaded = _decode(data, limits, None if limits.full_resolution else spec.image_size)
        pixels = preprocess(loaded.image, spec)
    except Exception as exc:  # a per-file problem must never stop the run
        return Failure(path, _reason(exc))
    meta = ImageMeta(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sha256=hashlib.sha256(data).hexdigest(),
        width=loaded.width,
        height=loaded.height,
        format=loaded.format,
    )
    return Decoded(meta=meta, pixels=pixels)


def decode_bytes(
    data: bytes, source: Path, mtime_ns: int, spec: PreprocessSpec, limits: DecodeLimits
) -> Decoded | Failure:
    """Decode image bytes already read from elsewhere (a member of a tar shard, a Ray object) into model-ready
    pixels; ``source`` names them in the metadata and in a Failure. Never raises for bad bytes."""
    _check_spec(spec)
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


# ---------------------------------------------------------------------------------------------------
# The worker pool

WORKER_NICENESS = 10
_crash_on: list[str] = []  # test hook, filled by _init_worker in worker processes only


def _init_worker(crash_on: str | None, parent: int) -> None:
    """Worker start-up: leave Ctrl-C to the parent, but die with it; arm the test-only crash hook."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watchdog", daemon=True).start()
    _lower_priority()
    if crash_on:
        _crash_on.append(crash_on)


def _exit_with(parent: int) -> None:
    """Exit as soon as process ``parent`` (the one that made the pool) is gone, however it went (kill -9 too).

    A worker's own parent is the forkserver, and nothing in the pool notices the pool's owner dying: without this
    the workers wait forever on their queue, and since they hold the forkserver's and the resource tracker's pipes,
    those two stay too (and with them the owner's stdout/stderr). Once the workers exit, both see EOF and exit."""
    try:
        pidfd = os.pidfd_open(parent)  # Linux >= 5.3: readable once the process has exited
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll
        while _alive(parent):
            time.sleep(0.5)
        os._exit(1)
    select.select([pidfd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lower_priority() -> None:
    """Decode workers yield the CPU to the model's threads: a multi-threaded matrix product that loses one
    thread to a decoder waits for it at every barrier, so sharing the cores evenly is slower than letting
    the decoders fill the gaps (measured on 2 cores: see bench/README.md)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def _decode_in_worker(path: Path, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded | Failure:
    """The function worker processes run (module level, so it pickles by reference)."""
    if _crash_on and path.name == _crash_on[0]:
        os._exit(70)  # test-only: simulate a decoder that takes its process down
    return decode_file(path, spec, limits)


def default_workers() -> int:
    """How many CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (workers fork from a clean server with this module already imported,
    so a worker starts in milliseconds), else spawn. Never fork: the parent holds torch threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # takes effect when the server starts
    return context


Result = Decoded | Failure
Row = tuple[int, int, str, int, int, str] | str  # per file of a chunk: ImageMeta fields, or a failure reason
TRANSPORTS = ("shm", "pickle")
_Pending = tuple[Path, "Future[Result]"]
_CRASHED = "decoder crashed: the worker process died while decoding this file"
_MAX_CRASHES_IN_A_ROW = 8  # isolated crashes of consecutive files: the pool is unusable, not the files
_CHUNK_MAX = 32  # files per task on the shm transport: a task costs the main process ~0.7 ms (bench/README.md)


def _decode_chunk(slot: str, rows: int, paths: list[Path], spec: PreprocessSpec, limits: DecodeLimits) -> list[Row]:
    """A worker's task on the shm transport: decode ``paths`` into rows 0.. of segment ``slot``; only each file's
    metadata fields (or its failure reason) go back through the pipe, without the path the main process knows."""
    array = shm.attach(slot, rows, (3, spec.image_size, spec.image_size))
    out: list[Row] = []
    for i, path in enumerate(paths):
        result = _decode_in_worker(path, spec, limits)
        if isinstance(result, Decoded):
            array[i] = result.pixels
            m = result.meta
            out.append((m.size, m.mtime_ns, m.sha256, m.width, m.height, m.format))
        else:
            out.append(result.reason)
    return out


def _row_result(path: Path, row: Row, pixels: Pixels) -> Result:
    if isinstance(row, str):
        return Failure(path, row)
    size, mtime_ns, sha256, width, height, fmt = row
    return Decoded(ImageMeta(path, size, mtime_ns, sha256, width, height, fmt), pixels)


class _Chunk(NamedTuple):
    paths: list[Path]
    slot: shm.Slot
    future: Future[list[Row]]


class DecodePool:
    """Decode files in worker processes; results come back in input order.

    At most `lookahead` files are taken from the input and not yet yielded, so memory stays bounded on
    any tree. `workers=0` decodes in-process. A worker that dies costs only the file it was decoding
    (reported as "decoder crashed: ..."); the pool is rebuilt for the rest.

    Transport (how pixels come back from the workers): "shm" (the default where /dev/shm exists) sends
    chunks of up to 32 files per task and workers write pixels into shared-memory slots, so a Decoded's
    `pixels` is a read-only view of shared memory and only metadata is pickled; "pickle" sends one
    future and one pickled array per file (the transport before shared memory, kept for comparison).
    """

    def __init__(
        self, spec: PreprocessSpec, limits: DecodeLimits, workers: int, lookahead: int, transport: str = "shm"
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, not {lookahead}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        _check_spec(spec)
        self.spec = spec
        self.limits = limits
        self.workers = workers
        self.lookahead = lookahead
        self.transport = transport if transport == "pickle" or shm.available() else "pickle"
        self.chunk = max(1, min(_CHUNK_MAX, lookahead // (2 * max(workers, 1))))
        self._executor: ProcessPoolExecutor | None = None
        self._ring: shm.SlotRing | None = None
        self._closed = False
        self._crashes_in_a_row = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Shut the workers down, cancelling files not yet started (wait=False: don't wait for the rest);
        unlink the shared-memory slots (pixel views still held stay readable)."""
        self._closed = True
        self._shutdown(wait)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def imap(self, paths: Iterable[Path]) -> Generator[Result, None, None]:
        """Decode `paths` lazily; yields one Decoded or Failure per path, in input order.

        Closing the generator early (or dropping it) cancels the files it had submitted."""
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self.workers == 0:
            return (decode_file(path, self.spec, self.limits) for path in paths)
        if self.transport == "shm":
            return self._imap_shm(iter(paths))
        return self._imap_pool(iter(paths))

    # -- internals ---------------------------------------------------------------------------------

    def _shutdown(self, wait: bool) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_mp_context(),
                initializer=_init_worker,
                initargs=(os.environ.get(CRASH_ENV), os.getpid()),
            )
        return self._executor

    def _submit(self, path: Path) -> Future[Result]:
        try:
            return self._pool().submit(_decode_in_worker, path, self.spec, self.limits)
        except BrokenProcessPool as exc:  # broke since the last result: report it like a crash
            future: Future[Result] = Future()
            future.set_exception(exc)
            return future

    @staticmethod
    def _collect(path: Path, future: Future[Result]) -> Result | None:
        """The future's result; None when its worker process died (or a pool rebuild cancelled it)."""
        try:
            return future.result()
        except (BrokenProcessPool, CancelledError):
            return None
        except Exception as exc:  # e.g. a result that could not be pickled
            return Failure(path, f"decoder failed: {type(exc).__name__}: {exc}")

    def _fill(self, pending: deque[_Pending], source: Iterator[Path]) -> None:
        for path in itertools.islice(source, max(0, self.lookahead - len(pending))):
            pending.append((path, self._submit(path)))

    def _imap_pool(self, source: Iterator[Path]) -> Generator[Result, None, None]:
        pending: deque[_Pending] = deque()
        try:
            while True:
                self._fill(pending, source)
                if not pending:
                    return
                path, future = pending.popleft()
                result = self._collect(path, future)
                if result is None:
                    suspects = [(path, future), *pending]
                    pending.clear()
                    yield from self._recover(suspects)
                else:
                    self._crashes_in_a_row = 0
                    yield result
        finally:
            for _, future in pending:
                future.cancel()

    def _recover(self, suspects: list[_Pending]) -> Iterator[Result]:
        """After a crash: rebuild the pool and decode the files that were in flight one at a time,
        so the one that kills its worker is identified and costs only itself."""
        self._shutdown(wait=False)
        for path, future in suspects:
            done = future.done() and not future.cancelled() and future.exception() is None
            yield future.result() if done else self._decode_alone(path)

    def _decode_alone(self, path: Path) -> Result:
        if self.transport == "shm":
            chunk = self._submit_chunk([path])
            rows = self._collect_chunk(chunk)
            result = None if rows is None else self._results(chunk, rows)[0]
            if rows is None:
                self._ring_discard(chunk.slot)
        else:
            result = self._collect(path, self._submit(path))
        if result is not None:
            self._crashes_in_a_row = 0
            return result
        self._shutdown(wait=False)
        self._crashes_in_a_row += 1
        if self._crashes_in_a_row >= _MAX_CRASHES_IN_A_ROW:  # the workers cannot run at all
            raise IndexerError(
                f"decoder worker processes keep dying ({self._crashes_in_a_row} files in a row, "
                f"last {path}); decode in-process (workers=0) to see why"
            )
        return Failure(path, _CRASHED)

    # -- the shm transport -------------------------------------------------------------------------

    def _slots(self) -> shm.SlotRing:
        if self._ring is None:
            self._ring = shm.SlotRing(self.chunk, (3, self.spec.image_size, self.spec.image_size))
        return self._ring

    def _ring_discard(self, slot: shm.Slot) -> None:
        if self._ring is not None:
            self._ring.discard(slot)

    def _submit_chunk(self, paths: list[Path]) -> _Chunk:
        slot = self._slots().acquire()
        try:
            future = self._pool().submit(_decode_chunk, slot.name, slot.rows, paths, self.spec, self.limits)
        except BrokenProcessPool as exc:  # broke since the last result: report it like a crash
            future = Future()
            future.set_exception(exc)
        return _Chunk(paths, slot, future)

    @staticmethod
    def _collect_chunk(chunk: _Chunk) -> list[Row] | None:
        """The chunk's rows; None when its worker process died (or a pool rebuild cancelled it)."""
        try:
            return chunk.future.result()
        except (BrokenProcessPool, CancelledError):
            return None
        except Exception as exc:  # e.g. a task that could not be pickled
            return [f"decoder failed: {type(exc).__name__}: {exc}" for _ in chunk.paths]

    @staticmethod
    def _results(chunk: _Chunk, rows: list[Row]) -> list[Result]:
        """Decoded records viewing the slot's rows (no copy); the slot is reusable once they are all dropped."""
        pixels = chunk.slot.array
        out = [_row_result(path, row, pixels[i]) for i, (path, row) in enumerate(zip(chunk.paths, rows, strict=True))]
        chunk.slot.leased = False
        return out

    def _fill_chunks(self, pending: deque[_Chunk], source: Iterator[Path]) -> None:
        room = self.lookahead - sum(len(c.paths) for c in pending)
        paths = list(itertools.islice(source, max(0, room)))
        size = self.chunk
        if len(paths) < room:  # the input's tail (or a short job): spread it over every worker
            size = max(1, min(size, -(-len(paths) // (2 * self.workers))))
        for i in range(0, len(paths), size):
            pending.append(self._submit_chunk(paths[i : i + size]))

    def _imap_shm(self, source: Iterator[Path]) -> Generator[Result, None, None]:
        pending: deque[_Chunk] = deque()
        try:
            while True:
                self._fill_chunks(pending, source)
                if not pending:
                    return
                chunk = pending.popleft()
                rows = self._collect_chunk(chunk)
                if rows is None:
                    suspects = [chunk, *pending]
                    pending.clear()
                    yield from self._recover_chunks(suspects)
                else:
                    self._crashes_in_a_row = 0
                    yield from self._results(chunk, rows)
        finally:
            for chunk in pending:
                if chunk.future.cancel():
                    chunk.slot.leased = False
                else:  # a worker may still be writing into it
                    self._ring_discard(chunk.slot)

    def _recover_chunks(self, suspects: list[_Chunk]) -> Iterator[Result]:
        """After a crash: rebuild the pool; chunks that finished are handed out, the files of the others are
        decoded one at a time, so the one that kills its worker is identified and costs only itself."""
        self._shutdown(wait=False)
        for chunk in suspects:
            future = chunk.future
            if future.done() and not future.cancelled() and future.exception() is None:
                yield from self._results(chunk, future.result())
                continue
            self._ring_discard(chunk.slot)
            for path in chunk.paths:
                yield self._decode_alone(path)
