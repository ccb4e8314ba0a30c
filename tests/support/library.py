"""A generated library for the dedup tests (CLI, page, review API): one base image per class of the learned test
model, edits of some (resized, cropped, re-encoded, tinted), exact copies and one merely similar image, with the
groups each tier must find (`EXACT`, `NEAR`, `SIMILAR`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.fixtures.shapes import CLASSES, draw_shape

# One base image per class, drawn with seeds [SEED, class index, VARIANT[class index]].
SEED = 1234
VARIANT = [4, 5, 4, 2, 3, 3, 1, 2, 1, 1, 4, 3]
SIMILAR_VARIANT = 3  # another yellow circle: cosine 0.930 to the yellow-circle base
T0 = 1_700_000_000
EDITS = 'edits <b>&"x"</b>'  # a folder name the HTML report must escape


# --- the generated library ---------------------------------------------------------------------------------------


def base_image(color: str, shape: str, variant: int | None = None) -> Image.Image:
    index = CLASSES.index((color, shape))
    rng = np.random.default_rng([SEED, index, VARIANT[index] if variant is None else variant])
    return draw_shape(color, shape, rng, 256)


def tinted(image: Image.Image) -> Image.Image:
    """A slight colour shift: red +12, blue -8."""
    pixels = np.asarray(image).astype(np.int16) + np.array([12, 0, -8], dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def cropped(image: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def _save(image: Image.Image, path: Path, mtime: int, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    os.utime(path, (mtime, mtime))
    return path


def _copy(source: Path, path: Path, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    os.utime(path, (mtime, mtime))
    return path


def write_library(root: Path) -> dict[str, Path]:
    """20 files: 12 bases (one per class), 5 edits, 2 exact copies, 1 similar image. Returns them by name."""
    f: dict[str, Path] = {}
    for i, (color, shape) in enumerate(CLASSES):
        f[f"{color}-{shape}"] = _save(base_image(color, shape), root / f"{color}-{shape}.png", T0 + i)
    red = base_image("red", "circle")
    f["red-small"] = _save(
        red.resize((154, 154), Image.Resampling.LANCZOS), root / EDITS / "red-circle-small.png", T0 + 1000
    )
    f["red-crop"] = _save(cropped(red), root / EDITS / "red-circle-crop.png", T0 + 1000)
    f["red-lowq"] = _save(red, root / EDITS / "red-circle-lowq.jpg", T0 + 1000, quality=20)
    f["red-tint"] = _save(tinted(red), root / EDITS / "red-circle-tint.png", T0 + 1000)
    f["blue-lowq"] = _save(
        base_image("blue", "triangle"), root / EDITS / "blue-triangle-lowq.jpg", T0 + 1000, quality=20
    )
    f["blue-copy"] = _copy(f["blue-triangle"], root / "copies" / "blue-triangle.png", T0 - 1000)  # older: the keeper
    f["green-copy"] = _copy(f["green-square"], root / "copies" / "green-square.png", T0 + 2000)
    other = base_image("yellow", "circle", SIMILAR_VARIANT)
    f["yellow-other"] = _save(other, root / "others" / "yellow-circle-other.png", T0 + 1000)
    return f


# keeper -> members, by name, for each tier
EXACT = {"blue-copy": {"blue-triangle"}, "green-square": {"green-copy"}}
NEAR = {
    "red-circle": {"red-small", "red-crop", "red-lowq", "red-tint"},
    "blue-copy": {"blue-triangle", "blue-lowq"},
    "green-square": {"green-copy"},
}
SIMILAR = {**NEAR, "yellow-circle": {"yellow-other"}}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
