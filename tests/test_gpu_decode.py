"""The GPU decode path's geometry and decoder, checked on the CPU against the PIL path; CUDA runs are marked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.decode import image as image_module
from indexer.decode import nvjpeg as gpu_decode
from indexer.decode.image import decode_file
from indexer.decode.nvjpeg import NvJpegDecoder, available, resize_crop, resize_crop_many, target_geometry
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

torchvision_io = pytest.importorskip("torchvision.io")
LIMITS = DecodeLimits()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG); none here")


def _photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 12).convert("RGB")
    Image.blend(small, noise, 0.1).save(path, "JPEG", quality=92)
    return path


def _torch_path(path: Path, spec: PreprocessSpec) -> np.ndarray:
    data = torchvision_io.read_file(str(path))
    image = torchvision_io.decode_jpeg(data, mode=torchvision_io.ImageReadMode.RGB)
    return resize_crop(image, spec).numpy()


def _pil_path(path: Path, spec: PreprocessSpec) -> np.ndarray:
    result = decode_file(path, spec, LIMITS)
    assert isinstance(result, Decoded), result
    return result.pixels


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel() - 127.5, b.astype(np.float64).ravel() - 127.5
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize(
    ("size", "spec"),
    [
        ((400, 300), PreprocessSpec()),
        ((300, 420), PreprocessSpec()),
        ((410, 300), PreprocessSpec(interpolation="bilinear")),
        ((333, 250), PreprocessSpec(resize_mode="squash")),
        ((224, 224), PreprocessSpec()),
        ((120, 90), PreprocessSpec(image_size=64)),
    ],
)
def test_geometry_matches_the_pil_path_without_draft(
    tmp_path: Path, size: tuple[int, int], spec: PreprocessSpec
) -> None:
    path = _photo(tmp_path / "a.jpg", size)  # shortest side < 2 x image_size: PIL decodes at full scale too
    ours, pil = _torch_path(path, spec), _pil_path(path, spec)
    assert ours.shape == pil.shape == (3, spec.image_size, spec.image_size)
    diff = np.abs(ours.astype(np.int16) - pil.astype(np.int16))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8  # libjpeg vs libjpeg-turbo IDCT, filter rounding
    assert _cosine(ours, pil) > 0.999


@pytest.mark.parametrize("size", [(640, 480), (1600, 1200), (1200, 1600)])
def test_geometry_close_to_the_drafted_pil_path(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _photo(tmp_path / "a.jpg", size, seed=1)  # PIL decodes these at 1/2 to 1/4 DCT scale first
    spec = PreprocessSpec()
    ours, pil = _torch_path(path, spec), _pil_path(path, spec)
    assert _cosine(ours, pil) > 0.99
    assert np.abs(ours.astype(np.int16) - pil.astype(np.int16)).mean() < 4


@pytest.mark.parametrize("group_pixels", [1 << 25, 2 * 120 * 90])
def test_resize_of_many_equals_one_at_a_time(monkeypatch: pytest.MonkeyPatch, group_pixels: int) -> None:
    """Same-size images share a resize call (in groups of at most _GROUP_PIXELS): the same pixels, in order."""
    monkeypatch.setattr(gpu_decode, "_GROUP_PIXELS", group_pixels)
    rng = np.random.default_rng(4)
    shapes = [(90, 120), (90, 120), (120, 90), (90, 120), (64, 64), (90, 120), (120, 90)]
    images = [torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    spec = PreprocessSpec(image_size=64)
    many = resize_crop_many(images, spec)
    assert len(many) == len(images)
    for image, got in zip(images, many, strict=True):
        want = resize_crop(image, spec)
        assert got.shape == want.shape == (3, 64, 64)
        assert (got.int() - want.int()).abs().max() <= 1  # batched vs single kernels: rounding at most
    assert resize_crop_many([], spec) == []


def test_target_geometry_uses_torchvision_rounding() -> None:
    spec = PreprocessSpec()
    assert target_geometry(640, 480, spec) == (298, 224, 37, 0)
    assert target_geometry(480, 640, spec) == (224, 298, 0, 37)
    assert target_geometry(4000, 3000, spec) == (298, 224, 37, 0)
    assert target_geometry(1000, 10, spec)[0] == 22400


def test_decoder_on_cpu_keeps_order_metadata_and_failures(tmp_path: Path) -> None:
    spec = PreprocessSpec(image_size=64)
    jpeg = _photo(tmp_path / "a.jpg", (100, 80))
    png = tmp_path / "b.png"
    Image.new("RGB", (90, 70), (10, 200, 30)).save(png)
    corrupt = tmp_path / "c.jpg"
    corrupt.write_bytes(jpeg.read_bytes()[:200])
    missing = tmp_path / "gone.jpg"
    paths = [jpeg, png, corrupt, missing, jpeg]
    results, pixels = NvJpegDecoder(spec, LIMITS, device="cpu").decode(paths)
    expected = [decode_file(p, spec, LIMITS) for p in paths]
    assert [type(r) for r in results] == [type(e) for e in expected] == [Decoded, Decoded, Failure, Failure, Decoded]
    for got, want in zip(results, expected, strict=True):
        if isinstance(want, Decoded):
            assert isinstance(got, Decoded) and got.meta == want.meta
        else:
            assert isinstance(got, Failure) and got.reason == want.reason and got.path == want.path
    assert pixels.shape == (3, 3, 64, 64)
    assert np.array_equal(pixels[1].numpy(), _pil_path(png, spec))  # the PNG went through the CPU path
    assert _cosine(pixels[0].numpy(), _pil_path(jpeg, spec)) > 0.999


@pytest.mark.parametrize("readers", [1, 4])
def test_reader_threads_read_a_chunk_at_once_and_keep_its_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readers: int
) -> None:
    """A chunk's files are read (and hashed, and their headers checked) on `readers` threads at once: with each read
    taking 0.2 s, 8 files take about 0.2 s x 8 / readers; results keep the input order either way."""
    spec = PreprocessSpec(image_size=64)
    paths = [_photo(tmp_path / f"{i}.jpg", (100 + i, 80), seed=i) for i in range(8)]
    real = image_module._read

    def slow(path: Path, limits: DecodeLimits) -> object:
        time.sleep(0.2)
        return real(path, limits)

    monkeypatch.setattr("indexer.decode.nvjpeg._read", slow)
    decoder = NvJpegDecoder(spec, LIMITS, device="cpu", readers=readers)
    start = time.perf_counter()
    results, pixels = decoder.decode(paths)
    seconds = time.perf_counter() - start
    decoder.close()
    assert [r.meta.path for r in results if isinstance(r, Decoded)] == paths and pixels.shape[0] == 8
    assert seconds >= 1.6 if readers == 1 else seconds < 1.2
    assert not [t for t in threading.enumerate() if t.name.startswith("nvjpeg-read")]


def test_decoder_refuses_a_bomb_before_decoding(tmp_path: Path) -> None:
    path = _photo(tmp_path / "big.jpg", (400, 300))
    results, pixels = NvJpegDecoder(PreprocessSpec(), DecodeLimits(max_pixels=1000), device="cpu").decode([path])
    assert isinstance(results[0], Failure) and "image too large" in results[0].reason
    assert pixels.shape[0] == 0


@needs_cuda
def test_nvjpeg_agrees_with_the_cpu_decoder(tmp_path: Path) -> None:
    assert available()
    spec = PreprocessSpec()
    paths = [_photo(tmp_path / f"{i}.jpg", (640 + 8 * i, 480), seed=i) for i in range(6)]
    on_gpu, gpu_pixels = NvJpegDecoder(spec, LIMITS, device="cuda").decode(paths)
    on_cpu, cpu_pixels = NvJpegDecoder(spec, LIMITS, device="cpu").decode(paths)
    assert [r.meta for r in on_gpu] == [r.meta for r in on_cpu]  # type: ignore[union-attr]
    assert gpu_pixels.device.type == "cuda"
    for g, c in zip(gpu_pixels.cpu().numpy(), cpu_pixels.numpy(), strict=True):
        assert _cosine(g, c) > 0.999


def test_available_is_false_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert not available()
