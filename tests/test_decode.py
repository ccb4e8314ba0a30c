"""Tests of the decode stage: formats, conversions, geometry, bad inputs and the worker pool.

Every input is generated in tmp_path with Pillow/numpy.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageOps, features

from indexer.decode import image as decode
from indexer.decode import pool as decode_pool
from indexer.decode.geometry import preprocess
from indexer.decode.image import SUPPORTED_EXTENSIONS, decode_file, draft_scale, hash_file, load_image
from indexer.decode.pool import DecodePool, default_workers
from indexer.errors import DecodeError, IndexerError
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

SPEC = PreprocessSpec()
LIMITS = DecodeLimits()
RED = (255, 0, 0)


def _save(path: Path, image: Image.Image, fmt: str | None = None, **params: object) -> Path:
    image.save(path, format=fmt, **params)
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random pattern (low-frequency noise upscaled), like a photo's content."""
    return _noise(max(2, width // 100), max(2, height // 100), seed).resize((width, height), Image.Resampling.BICUBIC)


def _ok(result: Decoded | Failure) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


def _failed(result: Decoded | Failure) -> Failure:
    assert isinstance(result, Failure), result
    return result


def _normalized(pixels: npt.NDArray[np.uint8], spec: PreprocessSpec) -> npt.NDArray[np.float64]:
    mean = np.asarray(spec.mean)[:, None, None]
    std = np.asarray(spec.std)[:, None, None]
    return np.asarray((pixels / 255.0 - mean) / std, dtype=np.float64)


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pixel_set(pixels: npt.NDArray[np.uint8]) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in p) for p in pixels.reshape(3, -1).T}


# ---------------------------------------------------------------------------------------------------
# Formats and metadata

FORMATS = [
    ("JPEG", ".jpg"),
    ("PNG", ".png"),
    ("WEBP", ".webp"),
    ("GIF", ".gif"),
    ("BMP", ".bmp"),
    ("TIFF", ".tif"),
    pytest.param("AVIF", ".avif", marks=pytest.mark.skipif(not features.check("avif"), reason="no AVIF")),
    ("HEIF", ".heic"),
]


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_each_format_decodes_with_its_metadata(tmp_path: Path, fmt: str, ext: str) -> None:
    if fmt == "HEIF":
        heif = pytest.importorskip("pillow_heif")
        heif.register_heif_opener()
    path = _save(tmp_path / f"img{ext}", _smooth(50, 30), fmt)
    decoded = _ok(decode_file(path, SPEC, LIMITS))
    meta, st = decoded.meta, path.stat()
    assert (meta.path, meta.format, meta.width, meta.height) == (path, fmt, 50, 30)
    assert (meta.size, meta.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert meta.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == hash_file(path, chunk=7)
    assert decoded.pixels.shape == (3, 224, 224)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags["C_CONTIGUOUS"]


def test_supported_extensions() -> None:
    assert {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= SUPPORTED_EXTENSIONS
    assert {".heic", ".heif", ".avif"} <= SUPPORTED_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in SUPPORTED_EXTENSIONS)


def test_png_named_jpg_decodes_as_png(tmp_path: Path) -> None:
    path = _save(tmp_path / "really_a_png.jpg", _noise(20, 10), "PNG")
    assert _ok(decode_file(path, SPEC, LIMITS)).meta.format == "PNG"


def test_hash_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1000 + 17))
    assert hash_file(path, chunk=1000) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_decode_does_not_import_torch() -> None:
    code = "import sys, indexer.decode.image; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_default_workers() -> None:
    assert 1 <= default_workers() <= (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------
# EXIF orientation and draft


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _marked(width: int, height: int, block: int) -> Image.Image:
    """Grey image with a red block in its (stored) top-left corner."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(RED, (0, 0, block, block))
    return image


def _corner(image: Image.Image, corner: str) -> tuple[int, ...]:
    width, height = image.size
    x = 2 if "left" in corner else width - 3
    y = 2 if "top" in corner else height - 3
    return tuple(image.getpixel((x, y)))  # type: ignore[arg-type]


def _is_red(rgb: tuple[int, ...]) -> bool:
    return rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60


@pytest.mark.parametrize(
    ("orientation", "size", "corner"),
    [
        (1, (60, 40), "top-left"),
        (6, (40, 60), "top-right"),
        (8, (40, 60), "bottom-left"),
        (3, (60, 40), "bottom-right"),
    ],
)
def test_exif_orientation(tmp_path: Path, orientation: int, size: tuple[int, int], corner: str) -> None:
    path = _save(tmp_path / "o.jpg", _marked(60, 40, 12), "JPEG", quality=95, exif=_exif(orientation))
    meta = _ok(decode_file(path, SPEC, LIMITS)).meta
    assert (meta.width, meta.height) == size
    loaded = load_image(path.read_bytes(), LIMITS)
    assert loaded.image.size == size
    assert _is_red(_corner(loaded.image, corner))
    others = {"top-left", "top-right", "bottom-left", "bottom-right"} - {corner}
    assert not any(_is_red(_corner(loaded.image, c)) for c in others)
    with Image.open(path) as im:
        reference = ImageOps.exif_transpose(im).convert("RGB")
    assert np.array_equal(np.asarray(loaded.image), np.asarray(reference))


def test_draft_scale_rule() -> None:
    # The largest DCT scale that keeps the shortest side >= image_size.
    assert draft_scale(4000, 3000, 224) == 8  # 3000 // 8 = 375 >= 224
    assert draft_scale(3000, 4000, 224) == 8
    assert draft_scale(1792, 4000, 224) == 8
    assert draft_scale(1791, 4000, 224) == 4  # 1791 // 8 = 223 < 224, // 4 = 447
    assert draft_scale(448, 5000, 224) == 2
    assert draft_scale(447, 5000, 224) == 1
    assert draft_scale(100, 100, 224) == 1


def test_draft_reduces_decode_and_keeps_quality(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.jpg", _smooth(4000, 3000, seed=3), "JPEG", quality=90)
    data = path.read_bytes()
    drafted = load_image(data, LIMITS, draft_to=SPEC.image_size)
    full = load_image(data, LIMITS)
    assert full.image.size == (4000, 3000)
    assert drafted.image.size == (500, 375)  # DCT scale 1/8: shortest side 375 >= 224
    assert (drafted.width, drafted.height) == (full.width, full.height) == (4000, 3000)
    cos = _cosine(_normalized(preprocess(drafted.image, SPEC), SPEC), _normalized(preprocess(full.image, SPEC), SPEC))
    assert cos >= 0.999
    decoded = _ok(decode_file(path, SPEC, LIMITS))
    assert np.array_equal(decoded.pixels, preprocess(drafted.image, SPEC))
    assert (decoded.meta.width, decoded.meta.height) == (4000, 3000)


def test_draft_with_rotation_reports_original_displayed_size(tmp_path: Path) -> None:
    path = _save(tmp_path / "rot.jpg", _marked(2000, 1000, 200), "JPEG", quality=90, exif=_exif(6))
    drafted = load_image(path.read_bytes(), LIMITS, draft_to=224)
    assert drafted.image.size == (250, 500)  # stored 2000x1000 at 1/4, then rotated
    assert (drafted.width, drafted.height) == (1000, 2000)
    assert _is_red(_corner(drafted.image, "top-right"))
    meta = _ok(decode_file(path, SPEC, LIMITS)).meta
    assert (meta.width, meta.height) == (1000, 2000)


# ---------------------------------------------------------------------------------------------------
# Mode conversions


def _only_pixel(path: Path) -> tuple[int, ...]:
    pixels = _ok(decode_file(path, SPEC, LIMITS)).pixels
    (pixel,) = _pixel_set(pixels)
    return pixel


def _transparent_palette(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rgba.png", lambda: Image.new("RGBA", (30, 20), (0, 0, 0, 0))),
        ("la.png", lambda: Image.new("LA", (30, 20), (0, 0))),
        ("p.png", lambda: _transparent_palette((30, 20))),
        ("p.gif", lambda: _transparent_palette((30, 20))),
        ("rgba.webp", lambda: Image.new("RGBA", (30, 20), (0, 0, 0, 0))),
    ],
)
def test_fully_transparent_is_white(tmp_path: Path, name: str, make: object) -> None:
    image = make()  # type: ignore[operator]
    params = {"transparency": 0} if name.endswith(".gif") else {"lossless": True} if name.endswith(".webp") else {}
    path = _save(tmp_path / name, image, **params)
    assert _only_pixel(path) == (255, 255, 255)


def test_half_transparent_black_is_grey(tmp_path: Path) -> None:
    path = _save(tmp_path / "half.png", Image.new("RGBA", (30, 20), (0, 0, 0, 128)))
    (value,) = set(_only_pixel(path))
    assert abs(value - 127) <= 1


def test_rgb_with_transparent_key_colour(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 20), (10, 20, 30))
    path = _save(tmp_path / "trns.png", image, transparency=(10, 20, 30))
    assert _only_pixel(path) == (255, 255, 255)


def test_palette_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert _only_pixel(_save(tmp_path / "p.png", image)) == (200, 100, 50)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (64, 48), (0, 255, 255, 0)), quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    pixels = _ok(decode_file(path, SPEC, LIMITS)).pixels.reshape(3, -1).astype(int)
    assert np.abs(pixels - np.array(RED)[:, None]).max() <= 8


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        ("i16.png", np.full((20, 30), 128 * 257, np.uint16), 128),
        ("i16b.tif", np.full((20, 30), 64 * 257, ">u2"), 64),
        ("i32.tif", np.full((20, 30), 200 * 257, np.int32), 200),
        ("f01.tif", np.full((20, 30), 0.5, np.float32), 128),
    ],
)
def test_high_depth_greyscale_is_scaled(tmp_path: Path, name: str, array: np.ndarray, expected: int) -> None:
    path = _save(tmp_path / name, Image.fromarray(array))
    with Image.open(path) as im:
        assert im.mode in {"I;16", "I;16B", "I", "F"}
    assert _only_pixel(path) == (expected, expected, expected)


def test_float_greyscale_out_of_range_is_stretched(tmp_path: Path) -> None:
    array = np.tile(np.linspace(-1000.0, 1000.0, 300, dtype=np.float32), (300, 1))
    path = _save(tmp_path / "f.tif", Image.fromarray(array))
    pixels = _ok(decode_file(path, SPEC, LIMITS)).pixels
    assert pixels.min() <= 5 and pixels.max() >= 250


def test_bilevel_and_grey(tmp_path: Path) -> None:
    bilevel = Image.new("1", (30, 20), 1)
    assert _only_pixel(_save(tmp_path / "one.png", bilevel)) == (255, 255, 255)
    assert _only_pixel(_save(tmp_path / "l.png", Image.new("L", (30, 20), 77))) == (77, 77, 77)


@pytest.mark.parametrize(("name", "params"), [("anim.gif", {}), ("anim.webp", {"lossless": True})])
def test_animation_first_frame(tmp_path: Path, name: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, (0, 0, 255), (0, 255, 0))]
    path = _save(tmp_path / name, frames[0], None, save_all=True, append_images=frames[1:], duration=50, **params)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    assert _only_pixel(path) == RED


# ---------------------------------------------------------------------------------------------------
# Geometry: faithful to open_clip's eval transform


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_geometry_matches_open_clip(resize_mode: str, interpolation: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    for size in (224, 33):
        spec = PreprocessSpec(image_size=size, interpolation=interpolation, resize_mode=resize_mode)
        transform = open_clip.image_transform(
            size,
            is_train=False,
            mean=spec.mean,
            std=spec.std,
            interpolation=interpolation,
            resize_mode=resize_mode,
        )
        for i, (w, h) in enumerate([(640, 480), (333, 517), (224, 224), (100, 61), (225, 224), (1000, 101)]):
            image = _noise(w, h, seed=i)
            pixels = preprocess(image, spec)
            assert pixels.shape == (3, size, size) and pixels.flags["C_CONTIGUOUS"]
            expected = transform(image).numpy()
            assert np.abs(_normalized(pixels, spec) - expected).max() < 1e-5, (w, h, size)


def test_decode_file_matches_open_clip_end_to_end(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    path = _save(tmp_path / "e2e.png", _noise(300, 200, seed=9))
    transform = open_clip.image_transform(224, is_train=False, mean=SPEC.mean, std=SPEC.std)
    with Image.open(path) as im:
        expected = transform(im.convert("RGB")).numpy()
    pixels = _ok(decode_file(path, SPEC, LIMITS)).pixels
    assert np.abs(_normalized(pixels, SPEC) - expected).max() < 1e-5


def test_extreme_aspect_ratio_stays_close_and_cheap() -> None:
    image = _noise(8000, 20, seed=4)  # shortest-side resize would be 89600 x 224 pixels
    pixels = preprocess(image, PreprocessSpec(image_size=64))
    exact = image.resize((int(64 * 8000 / 20), 64), Image.Resampling.BICUBIC)
    left = round((exact.width - 64) / 2.0)
    reference = np.asarray(exact.crop((left, 0, left + 64, 64))).transpose(2, 0, 1)
    assert np.abs(pixels.astype(int) - reference).max() <= 1


def test_invalid_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        decode_file(Path("x.png"), PreprocessSpec(resize_mode="longest"), LIMITS)
    with pytest.raises(ValueError, match="interpolation"):
        DecodePool(PreprocessSpec(interpolation="nearest"), LIMITS, workers=0, lookahead=1)


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(200, 150).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(200, 150).save(buf, "PNG")
    return buf.getvalue()


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty.jpg", b"", "empty file (0 bytes)"),
    ("cut.jpg", _jpeg_bytes()[:3000], "truncated image data"),
    ("cut.png", _png_bytes()[:30000], "truncated image data"),
    ("text.jpg", b"hello, I am not a picture\n" * 10, "not an image (cannot identify image file)"),
    (
        "bomb.png",
        _png_header_only(20000, 20000),
        "image too large: 20000x20000 = 400000000 pixels exceeds max_pixels 178956970 (decompression bomb?)",
    ),
]


@pytest.mark.parametrize(("name", "data", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_reason(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    pixels_limit = Image.MAX_IMAGE_PIXELS
    path = tmp_path / name
    path.write_bytes(data)
    failure = _failed(decode_file(path, SPEC, LIMITS))
    assert (failure.path, failure.reason) == (path, reason)
    assert pixels_limit == Image.MAX_IMAGE_PIXELS


def test_real_image_over_max_pixels(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.png", _noise(100, 100))
    failure = _failed(decode_file(path, SPEC, DecodeLimits(max_pixels=5000)))
    assert failure.reason == "image too large: 100x100 = 10000 pixels exceeds max_pixels 5000 (decompression bomb?)"


def test_pillow_guard_runs_at_our_limit_while_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without our header check, Pillow's own guard (TIFF tile check during load) must use limits.max_pixels.
    monkeypatch.setattr(decode, "_check_pixels", lambda *args: None)
    path = _save(tmp_path / "t.tif", Image.new("L", (100, 100)), compression="tiff_deflate")
    pixels_limit = Image.MAX_IMAGE_PIXELS
    failure = _failed(decode_file(path, SPEC, DecodeLimits(max_pixels=5000)))
    assert failure.reason == "image too large: 10000 pixels (decompression bomb?)"
    assert pixels_limit == Image.MAX_IMAGE_PIXELS


def test_gif_frame_outside_the_screen_counts(tmp_path: Path) -> None:
    # A 20x20 logical screen whose first frame is placed at (3000, 3000): Pillow grows the image.
    path = _save(tmp_path / "frame.gif", Image.new("P", (20, 20), 0))
    data = bytearray(path.read_bytes())
    pos = data.index(b"\x2c" + struct.pack("<HHHH", 0, 0, 20, 20))  # image descriptor: left, top, w, h
    data[pos + 1 : pos + 5] = struct.pack("<HH", 3000, 3000)
    path.write_bytes(bytes(data))
    failure = _failed(decode_file(path, SPEC, DecodeLimits(max_pixels=1_000_000)))
    assert failure.reason == (
        "image too large: 3020x3020 = 9120400 pixels exceeds max_pixels 1000000 (decompression bomb?)"
    )


def test_file_over_max_file_bytes(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.png", _noise(40, 40))
    size = path.stat().st_size
    failure = _failed(decode_file(path, SPEC, DecodeLimits(max_file_bytes=100)))
    assert failure.reason == f"file too large: {size} bytes exceeds max_file_bytes 100"


def test_directory_missing_and_fifo(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    assert _failed(decode_file(tmp_path / "dir.jpg", SPEC, LIMITS)).reason == "is a directory"
    gone = _failed(decode_file(tmp_path / "gone.jpg", SPEC, LIMITS))
    assert (gone.path, gone.reason) == (tmp_path / "gone.jpg", "file vanished before it could be read")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jpg")
        assert _failed(decode_file(tmp_path / "pipe.jpg", SPEC, LIMITS)).reason == "not a regular file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "secret.png", _noise(10, 10))
    path.chmod(0)
    try:
        assert _failed(decode_file(path, SPEC, LIMITS)).reason == "permission denied"
    finally:
        path.chmod(0o644)


def test_permission_error_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "secret.png", _noise(10, 10))

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode, "open", deny, raising=False)
    failure = _failed(decode_file(path, SPEC, LIMITS))
    assert (failure.path, failure.reason) == (path, "permission denied")


def test_file_changed_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "a.png", _noise(10, 10))
    other = _save(tmp_path / "b.png", _noise(40, 40))
    real_open = open
    monkeypatch.setattr(decode, "open", lambda p, mode: real_open(other, mode), raising=False)
    assert _failed(decode_file(path, SPEC, LIMITS)).reason == "file changed while being read"


def test_heif_without_decoder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_heif_state", [False])
    monkeypatch.setattr(decode, "_FORMATS", tuple(f for f in decode._FORMATS if f != "HEIF"))
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    assert "pillow-heif" in _failed(decode_file(path, SPEC, LIMITS)).reason


def test_load_image_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="not an image") as info:
        load_image(b"nope", LIMITS, source=Path("q.jpg"))
    assert info.value.path == Path("q.jpg")


# ---------------------------------------------------------------------------------------------------
# The pool


def _mixed_corpus(tmp_path: Path, n_good: int = 6) -> list[Path]:
    paths: list[Path] = []
    for i in range(n_good):
        paths.append(_save(tmp_path / f"good{i}.png", _noise(30 + i, 20, seed=i)))
        bad = tmp_path / f"bad{i}.jpg"
        bad.write_bytes(b"" if i % 2 else b"not an image")
        paths.append(bad)
    paths.append(tmp_path / "missing.jpg")
    return paths


def _check_aligned(paths: list[Path], results: list[Decoded | Failure]) -> None:
    assert len(results) == len(paths)
    for path, result in zip(paths, results, strict=True):
        if path.name.startswith("good"):
            decoded = _ok(result)
            assert decoded.meta.path == path
            assert decoded.meta.sha256 == hash_file(path)
            assert decoded.meta.width == 30 + int(path.stem[4:])
        else:
            assert _failed(result).path == path


@pytest.mark.parametrize("workers", [0, 2])
def test_pool_keeps_order_and_alignment(tmp_path: Path, workers: int) -> None:
    paths = _mixed_corpus(tmp_path)
    with DecodePool(SPEC, LIMITS, workers=workers, lookahead=4) as pool:
        _check_aligned(paths, list(pool.imap(paths)))
        _check_aligned(paths[:3], list(pool.imap(iter(paths[:3]))))  # reusable
        abandoned = pool.imap(paths)
        _check_aligned(paths[:1], [next(abandoned)])
        abandoned.close()  # cancels what it had submitted
        _check_aligned(paths[:2], list(pool.imap(paths[:2])))


@pytest.mark.parametrize(("workers", "lookahead"), [(0, 3), (2, 3), (2, 1)])
def test_pool_bounded_lookahead(tmp_path: Path, workers: int, lookahead: int) -> None:
    paths = [_save(tmp_path / f"{i}.png", _noise(8, 8, seed=i)) for i in range(10)]
    consumed = 0

    def source() -> Iterator[Path]:
        nonlocal consumed
        for path in paths:
            consumed += 1
            yield path

    most_ahead = 0
    with DecodePool(SPEC, LIMITS, workers=workers, lookahead=lookahead) as pool:
        for yielded, result in enumerate(pool.imap(source()), start=1):
            assert _ok(result).meta.path == paths[yielded - 1]
            assert consumed - (yielded - 1) <= lookahead  # taken and not yet handed over
            most_ahead = max(most_ahead, consumed - yielded)
    assert yielded == len(paths)
    assert most_ahead == (lookahead - 1 if workers else 0)


def test_pool_with_endless_input(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", _noise(8, 8))
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=3) as pool:
        results = list(itertools.islice(pool.imap(itertools.repeat(path)), 5))
    assert [_ok(r).meta.path for r in results] == [path] * 5


def test_pool_survives_a_crashing_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _mixed_corpus(tmp_path, n_good=4)
    crash = _save(tmp_path / "crash.png", _noise(10, 10))
    paths.insert(3, crash)
    monkeypatch.setenv(decode_pool.CRASH_ENV, crash.name)
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=4) as pool:
        results = list(pool.imap(paths))
        failure = _failed(results.pop(3))
        assert failure.path == crash and failure.reason.startswith("decoder crashed")
        _check_aligned([p for p in paths if p != crash], results)
        again = list(pool.imap([crash, paths[0]]))  # a rebuilt pool keeps working
    assert _failed(again[0]).reason.startswith("decoder crashed")
    assert _ok(again[1]).meta.path == paths[0]
    assert isinstance(decode_file(crash, SPEC, LIMITS), Decoded)  # in-process never reads the hook


def test_pool_gives_up_when_every_worker_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for i in range(12):
        (tmp_path / str(i)).mkdir()
        paths.append(_save(tmp_path / str(i) / "crash.png", _noise(8, 8)))
    monkeypatch.setenv(decode_pool.CRASH_ENV, "crash.png")
    seen: list[Decoded | Failure] = []
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=2) as pool, pytest.raises(IndexerError, match="keep dying"):
        seen.extend(pool.imap(paths))
    assert len(seen) == decode_pool._MAX_CRASHES_IN_A_ROW - 1
    assert all(_failed(r).reason.startswith("decoder crashed") for r in seen)


def test_pool_interrupt_shuts_down_promptly(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{i}.png", _noise(200, 200, seed=i)) for i in range(4)] * 50
    pool = DecodePool(SPEC, LIMITS, workers=2, lookahead=8)
    seen = 0
    with pytest.raises(KeyboardInterrupt), pool:
        for seen, _ in enumerate(pool.imap(paths), start=1):
            if seen == 3:
                start = time.monotonic()
                raise KeyboardInterrupt
    assert seen == 3
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="closed"):
        pool.imap(paths)


def test_pool_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        DecodePool(SPEC, LIMITS, workers=-1, lookahead=2)
    with pytest.raises(ValueError, match="lookahead"):
        DecodePool(SPEC, LIMITS, workers=1, lookahead=0)
