"""JPEG decoding on the GPU (nvJPEG through torchvision), with the CPU path's geometry.

`resize_crop` is open_clip's eval geometry (resize the shortest side with torchvision's size arithmetic, centre
crop; or "squash") on a uint8 CHW tensor, on whatever device the tensor is on: the same sizes and crop offsets as
`indexer.decode.geometry.preprocess`, antialiased bicubic/bilinear resampling (torch's antialias
filter follows PIL's). It is
tested on the CPU against the PIL path.

`NvJpegDecoder` reads files (the same limits, stat checks and sha256 as the CPU path), decodes the JPEGs among them
in one batched ``torchvision.io.decode_jpeg(..., device="cuda")`` call and resizes on the GPU; a file nvJPEG cannot
decode (CMYK, progressive oddities, corrupt data) is handed to the CPU path, which decodes it or says why not.
The two steps are apart: `read` (or `read_ahead`, which submits a chunk's reads to the reader threads and returns
at once, a `Reads` to wait on) and `decode_reads`; `decode` is the one after the other. A caller that decodes chunk
after chunk (`indexer.decode.mixed`) submits the next chunk's reads before decoding the current one, so the file
reads, sha256 and header checks of chunk N+1 (reader threads, the GIL released) overlap chunk N's GPU decode and
resize; it holds one chunk's bytes more in host memory for it.
Without CUDA, `available()` is False and the pipeline never builds one. (It also runs with ``device="cpu"``,
where torchvision decodes with libjpeg: that is how the tests check it without a GPU.)

`indexer.decode.mixed` wires it into the pipeline (JPEGs shared with the CPU decode pool).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from indexer.decode.geometry import check_spec
from indexer.decode.image import _check_pixels, _open, _read, _reason, decode_file
from indexer.records import Decoded, DecodeLimits, Failure, ImageMeta, PreprocessSpec

__all__ = ["FileRead", "NvJpegDecoder", "Reads", "available", "resize_crop", "resize_crop_many", "target_geometry"]

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_GROUP_PIXELS = 1 << 25  # pixels per batched resize (as float: 400 MB of device memory for 3 channels)
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}
_Read = tuple[torch.Tensor | None, tuple[int, int, str]]  # a file read: its bytes (JPEGs only), size, mtime, sha256
FileRead = _Read | Failure  # what reading one file gives: its read, or why it cannot be decoded


def available() -> bool:
    """Whether nvJPEG decoding can run here (a CUDA device and torchvision's image ops)."""
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def target_geometry(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the resized size and the crop's offsets, as the CPU path computes them."""
    size = spec.image_size
    if spec.resize_mode == "squash":
        return size, size, 0, 0
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return new_w, new_h, round((new_w - size) / 2.0), round((new_h - size) / 2.0)


def resize_crop(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 (3, H, W) → uint8 (3, S, S) on the same device, with `indexer.decode.geometry.preprocess`'s geometry."""
    check_spec(spec)
    return _resize_crop_batch(image.unsqueeze(0), spec)[0]


def resize_crop_many(images: list[torch.Tensor], spec: PreprocessSpec) -> list[torch.Tensor]:
    """`resize_crop` of each image; images of one size share one resize call (a few kernel launches per group of
    photos from one camera instead of per photo), in groups of at most `_GROUP_PIXELS` pixels."""
    check_spec(spec)
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    for (height, width), members in groups.items():
        per = max(1, _GROUP_PIXELS // (height * width))
        for start in range(0, len(members), per):
            part = members[start : start + per]
            batch = images[part[0]].unsqueeze(0) if len(part) == 1 else torch.stack([images[i] for i in part])
            for i, result in zip(part, _resize_crop_batch(batch, spec), strict=True):
                out[i] = result
    return [r for r in out if r is not None]


def _resize_crop_batch(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) → uint8 (N, 3, S, S)."""
    size = spec.image_size
    height, width = int(x.shape[2]), int(x.shape[3])
    new_w, new_h, left, top = target_geometry(width, height, spec)
    if (new_w, new_h) != (width, height):
        mode = _MODES[spec.interpolation]
        resized = F.interpolate(x.float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        x = resized.round_().clamp_(0, 255).to(torch.uint8)
    return x[:, :, top : top + size, left : left + size].contiguous()


class NvJpegDecoder:
    """Batched JPEG decode + resize on a CUDA device; other files and nvJPEG's refusals go to the CPU path."""

    def __init__(
        self, spec: PreprocessSpec, limits: DecodeLimits, device: str | torch.device = "cuda", readers: int = 0
    ) -> None:
        check_spec(spec)
        self.spec, self.limits, self.device = spec, limits, torch.device(device)
        self.readers = readers or min(8, os.cpu_count() or 1)  # threads reading, hashing and checking the files
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the reader threads (a later `decode` starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="nvjpeg-read")
        return self._pool

    def read(self, paths: list[Path]) -> list[FileRead]:
        """Each file read, hashed and its header checked, on the reader threads (file reads and sha256 release the
        GIL: a chunk of 64 12 MP files is read on several cores instead of one after another); in input order."""
        if len(paths) < 2 or self.readers < 2:
            return [self._read(path) for path in paths]
        return list(self._readers().map(self._read, paths))

    def read_ahead(self, paths: list[Path]) -> Reads:
        """`read`, submitted to the reader threads (one at least) and returned at once: the reads run while the
        caller decodes something else; `Reads.result()` waits for them."""
        pool = self._readers()
        return Reads(paths, [pool.submit(self._read, path) for path in paths])

    def decode(self, paths: list[Path]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        """Read and decode `paths` (`read`, then `decode_reads`)."""
        return self.decode_reads(paths, self.read(paths))

    def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        """The decode step of `paths`, whose reads (`read`, or a `read_ahead`'s result) are ``read``: results in input
        order, and the pixels of the Decoded ones stacked on the device (row i ↔ the i-th Decoded). The Decoded
        records' own ``pixels`` are the host copies only for files the CPU decoded."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if len(read) != len(paths):
            raise ValueError(f"{len(read)} reads for {len(paths)} paths")
        jpegs = [i for i, r in enumerate(read) if isinstance(r, tuple) and r[0] is not None]
        on_gpu = self._batch(decode_jpeg, ImageReadMode.RGB, [read[i] for i in jpegs])
        decoded = [(i, t) for i, t in zip(jpegs, on_gpu, strict=True) if t is not None]
        resized = dict(zip((i for i, _ in decoded), resize_crop_many([t for _, t in decoded], self.spec), strict=True))
        gpu_pixels = dict(decoded)
        out: list[Decoded | Failure] = []
        rows: list[torch.Tensor] = []
        for i, (path, r) in enumerate(zip(paths, read, strict=True)):
            pixels = gpu_pixels.get(i)
            if isinstance(r, Failure):
                out.append(r)
            elif pixels is None:  # not a JPEG, or nvJPEG refused it: the CPU path decides
                result = decode_file(path, self.spec, self.limits)
                out.append(result)
                if isinstance(result, Decoded):
                    rows.append(torch.from_numpy(result.pixels).to(self.device))
            else:
                _, meta_args = r
                height, width = int(pixels.shape[1]), int(pixels.shape[2])
                out.append(Decoded(ImageMeta(path, *meta_args, width, height, "JPEG"), _EMPTY))
                rows.append(resized[i])
        size = self.spec.image_size
        stacked = torch.stack(rows) if rows else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return out, stacked

    def _read(self, path: Path) -> _Read | Failure:
        """(the bytes as a uint8 tensor for nvJPEG, None for a file that is not a JPEG; size, mtime, sha256)."""
        try:
            data, st = _read(path, self.limits)
            with _open(data) as header:  # the header only: refuse a decompression bomb before nvJPEG sees it
                _check_pixels(*header.size, self.limits)
        except Exception as exc:
            return Failure(path, _reason(exc))
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data[:3] == _JPEG_MAGIC else None
        return tensor, (st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())

    def _batch(self, decode_jpeg: Any, mode: Any, items: list[Any]) -> list[torch.Tensor | None]:
        """One batched nvJPEG call; when it fails, each file alone, so one bad file costs only itself."""
        if not items:
            return []
        tensors = [tensor for tensor, _ in items]
        try:
            decoded: list[torch.Tensor] = decode_jpeg(
                tensors, mode=mode, device=self.device, apply_exif_orientation=True
            )
            return list(decoded)
        except RuntimeError:
            return [self._one(decode_jpeg, mode, t) for t in tensors]

    def _one(self, decode_jpeg: Any, mode: Any, data: torch.Tensor) -> torch.Tensor | None:
        try:
            result: torch.Tensor = decode_jpeg(data, mode=mode, device=self.device, apply_exif_orientation=True)
        except RuntimeError as exc:
            log.debug("nvJPEG refused a file, the CPU decodes it: %s", exc)
            return None
        return result


class Reads:
    """One chunk's reads submitted to the reader threads (`NvJpegDecoder.read_ahead`)."""

    def __init__(self, paths: list[Path], futures: list[Future[FileRead]]) -> None:
        self.paths = paths
        self._futures = futures

    def done(self) -> bool:
        """Whether every file of the chunk has been read."""
        return all(future.done() for future in self._futures)

    def result(self) -> list[FileRead]:
        """The reads in input order, once all are done (waits for them)."""
        return [future.result() for future in self._futures]


_EMPTY: Any = torch.empty(0, dtype=torch.uint8).numpy()  # pixels of a GPU-decoded file live on the device
