"""Geometry: an RGB image → the model's uint8 pixels, as open_clip's eval transform lays them out (resize the shortest
side with PIL, torchvision's size arithmetic and centre crop, or "squash"), without the normalisation (x/255 -
mean)/std, which the model stage does batched. Torch-free: decode workers import it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

from indexer.records import PreprocessSpec

__all__ = ["Pixels", "check_spec", "preprocess"]

Pixels = npt.NDArray[np.uint8]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")
_EXACT_RESIZE_MAX_ASPECT = 16  # beyond this aspect ratio resize only the crop box (bounded memory)


def check_spec(spec: PreprocessSpec) -> None:
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
    check_spec(spec)
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
