"""JPEG decoding on the GPU (nvJPEG through torchvision), with the CPU path's geometry.

`resize_crop` is open_clip's eval geometry (resize the shortest side with torchvision's size arithmetic, centre
crop; or "squash") on a uint8 CHW tensor, on whatever device the tensor is on: the same sizes and crop offsets as
`indexer.decode.preprocess`, antialiased bicubic/bilinear resampling (torch's antialias filter follows PIL's). It is
tested on the CPU against the PIL path.

`NvJpegDecoder` reads files (the same limits, stat checks and sha256 as the CPU path), decodes the JPEGs among them
in one batched ``torchvision.io.decode_jpeg(..., device="cuda")`` call and resizes on the GPU; a file nvJPEG cannot
decode (CMYK, progressive oddities, corrupt data) is handed to the CPU path, which decodes it or says why not.
Without CUDA, `available()` is False and the pipeline never builds one. (It also runs with ``device="cpu"``,
where torchvision decodes with libjpeg: that is how the tests check it without a GPU.)

Not wired into the pipeline yet: see CHANGELOG.md ("not yet").
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from indexer.decode import _check_pixels, _open, _read, _reason, check_spec, decode_file
from indexer.records import Decoded, DecodeLimits, Failure, ImageMeta, PreprocessSpec

__all__ = ["NvJpegDecoder", "available", "resize_crop", "target_geometry"]

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


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
    """uint8 (3, H, W) → uint8 (3, S, S) on the same device, with `indexer.decode.preprocess`'s geometry."""
    check_spec(spec)
    size = spec.image_size
    _, height, width = image.shape
    new_w, new_h, left, top = target_geometry(width, height, spec)
    x = image.unsqueeze(0)
    if (new_w, new_h) != (width, height):
        mode = _MODES[spec.interpolation]
        resized = F.interpolate(x.float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        x = resized.round_().clamp_(0, 255).to(torch.uint8)
    return x[0, :, top : top + size, left : left + size].contiguous()


class NvJpegDecoder:
    """Batched JPEG decode + resize on a CUDA device; other files and nvJPEG's refusals go to the CPU path."""

    def __init__(self, spec: PreprocessSpec, limits: DecodeLimits, device: str | torch.device = "cuda") -> None:
        check_spec(spec)
        self.spec, self.limits, self.device = spec, limits, torch.device(device)

    def decode(self, paths: list[Path]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        """Results in input order, and the pixels of the Decoded ones stacked on the device (row i ↔ the i-th
        Decoded). The Decoded records' own ``pixels`` are the host copies only for files the CPU decoded."""
        from torchvision.io import ImageReadMode, decode_jpeg

        read = [self._read(path) for path in paths]
        jpegs = [i for i, r in enumerate(read) if isinstance(r, tuple) and r[0][:3] == _JPEG_MAGIC]
        on_gpu = self._batch(decode_jpeg, ImageReadMode.RGB, [read[i] for i in jpegs])
        gpu_pixels = dict(zip(jpegs, on_gpu, strict=True))
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
                rows.append(resize_crop(pixels, self.spec))
        size = self.spec.image_size
        stacked = torch.stack(rows) if rows else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return out, stacked

    def _read(self, path: Path) -> tuple[bytes, tuple[int, int, str]] | Failure:
        try:
            data, st = _read(path, self.limits)
            with _open(data) as header:  # the header only: refuse a decompression bomb before nvJPEG sees it
                _check_pixels(*header.size, self.limits)
        except Exception as exc:
            return Failure(path, _reason(exc))
        return data, (st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())

    def _batch(self, decode_jpeg: Any, mode: Any, items: list[Any]) -> list[torch.Tensor | None]:
        """One batched nvJPEG call; when it fails, each file alone, so one bad file costs only itself."""
        if not items:
            return []
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in items]
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


_EMPTY: Any = torch.empty(0, dtype=torch.uint8).numpy()  # pixels of a GPU-decoded file live on the device
