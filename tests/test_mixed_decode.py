"""JPEGs shared between the nvJPEG decoder and the CPU decode pool (`indexer.decode.mixed`).

On the CPU the "GPU" side is `NvJpegDecoder(device="cpu")` (torchvision's libjpeg, the same code path as on CUDA
but the device) and the CPU side the real `DecodePool` with worker processes, on real files. CUDA runs are marked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexer.decode import mixed as mixed_decode
from indexer.decode import shm as shm
from indexer.decode.image import decode_file
from indexer.decode.mixed import MixedDecoder, decoder_for, gpu_decode_device
from indexer.decode.nvjpeg import FileRead, NvJpegDecoder
from indexer.decode.pool import DecodePool
from indexer.errors import ConfigError
from indexer.ingest.pipeline import decode_pool, run_embed
from indexer.model.lazy import LazyModel
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset

pytest.importorskip("torchvision.io")
LIMITS = DecodeLimits()
SPEC = PreprocessSpec(image_size=64)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG); none here")


class RecordingNvJpeg(NvJpegDecoder):
    """The real decoder, remembering which files it was given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[Path] = []

    def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        self.seen.extend(paths)
        return super().decode_reads(paths, read)


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    small.save(path, "JPEG", quality=92)
    return path


def _corpus(folder: Path, jpegs: int = 40) -> list[Path]:
    """JPEGs with PNGs, a corrupt JPEG, a missing file and a PNG named .jpg mixed in."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_photo(folder / f"{i:03d}.jpg", (100 + i, 80), i) for i in range(jpegs)]
    for i in (3, 11, 25):
        png = folder / f"{i:03d}-b.png"
        Image.new("RGB", (90, 70), (10 * i, 200, 30)).save(png)
        paths.insert(i, png)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:300])
    misnamed = folder / "really-a-png.jpg"
    Image.new("RGB", (70, 90), (200, 10, 30)).save(misnamed, "PNG")
    paths[7:7] = [corrupt, folder / "missing.jpg", misnamed]
    return paths


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel() - 127.5, b.astype(np.float64).ravel() - 127.5
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _mixed(workers: int = 2, lookahead: int = 16, gpu_chunk: int = 4) -> tuple[MixedDecoder, RecordingNvJpeg]:
    gpu = RecordingNvJpeg(SPEC, LIMITS, device="cpu")
    pool = DecodePool(SPEC, LIMITS, workers=workers, lookahead=max(2, lookahead // 2))
    return MixedDecoder(gpu, pool, lookahead=lookahead, gpu_chunk=gpu_chunk), gpu


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("nvjpeg", "decode-pool-feed")]


def test_every_file_once_in_order_and_agreeing_with_the_cpu_path(tmp_path: Path) -> None:
    paths = _corpus(tmp_path)
    mixed, gpu = _mixed()
    with mixed:
        results = list(mixed.imap(paths))
    assert [r.path if isinstance(r, Failure) else r.meta.path for r in results] == paths
    assert mixed.gpu_files + mixed.cpu_files == len(paths)
    assert mixed.gpu_files > 0 and mixed.cpu_files > 3  # both sides did JPEGs (3 of the files are PNGs)
    assert not {p for p in gpu.seen if p.suffix == ".png"}  # non-JPEGs only ever go to the CPU pool
    assert len(gpu.seen) == len(set(gpu.seen)) == mixed.gpu_files
    for path, got in zip(paths, results, strict=True):
        want = decode_file(path, SPEC, LIMITS)
        if isinstance(want, Failure):
            assert isinstance(got, Failure) and got.path == path and got.reason == want.reason
            continue
        assert isinstance(got, Decoded) and got.meta == want.meta
        assert got.pixels.shape == want.pixels.shape and got.pixels.dtype == np.uint8
        diff = np.abs(got.pixels.astype(np.int16) - want.pixels.astype(np.int16))
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8  # the tolerance of tests/test_gpu_decode.py
        assert _cosine(got.pixels, want.pixels) > 0.999
    corrupt = next(r for r in results if isinstance(r, Failure) and r.path.name == "corrupt.jpg")
    assert "corrupt.jpg" in str(corrupt)


def test_lookahead_is_bounded(tmp_path: Path) -> None:
    paths = _corpus(tmp_path, jpegs=60)
    pulled = 0

    def counting() -> Iterator[Path]:
        nonlocal pulled
        for path in paths:
            pulled += 1
            yield path

    mixed, _ = _mixed(lookahead=12)
    with mixed:
        for n, _result in enumerate(mixed.imap(counting()), start=1):
            assert pulled <= n - 1 + 12
    assert pulled == len(paths)


def test_closing_early_stops_both_sides_and_the_decoder_is_reusable(tmp_path: Path) -> None:
    paths = _corpus(tmp_path, jpegs=80)
    mixed, _ = _mixed(lookahead=16)
    with mixed:
        results = mixed.imap(paths)
        first = [next(results) for _ in range(5)]
        results.close()
        assert not _decode_threads()
        assert mixed.gpu_files + mixed.cpu_files < len(paths)  # the rest was never decoded
        assert [r.meta.path for r in first if isinstance(r, Decoded)] == paths[:5]
        again = list(mixed.imap(paths[:20]))
        assert [r.path if isinstance(r, Failure) else r.meta.path for r in again] == paths[:20]
    if shm.available():
        assert not list(shm.SHM_DIR.glob(shm.segment_prefix() + "*"))


def test_a_failing_gpu_side_hands_the_run_to_the_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(NvJpegDecoder):
        calls = 0

        def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
            Broken.calls += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    paths = _corpus(tmp_path, jpegs=30)
    mixed = MixedDecoder(Broken(SPEC, LIMITS, device="cpu"), DecodePool(SPEC, LIMITS, 2, 4), lookahead=16, gpu_chunk=2)
    with mixed:
        results = list(mixed.imap(paths))
    assert Broken.calls == 1 and mixed.gpu_files == 0 and mixed.cpu_files > 0
    assert "nvJPEG decoding failed" in caplog.text and "simulated" in caplog.text
    want = [decode_file(p, SPEC, LIMITS) for p in paths]
    assert [r.path if isinstance(r, Failure) else r.meta.path for r in results] == paths
    assert [type(r) for r in results] == [type(w) for w in want]
    assert not _decode_threads()


def test_an_error_in_a_decode_thread_reaches_the_consumer(tmp_path: Path) -> None:
    class Buggy(NvJpegDecoder):
        def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
            raise ValueError("a bug")

    paths = _corpus(tmp_path, jpegs=10)
    mixed = MixedDecoder(Buggy(SPEC, LIMITS, device="cpu"), DecodePool(SPEC, LIMITS, 0, 2), lookahead=8, gpu_chunk=2)
    with mixed, pytest.raises(ValueError, match="a bug"):
        list(mixed.imap(paths))
    assert not _decode_threads()


def test_in_process_pool_and_empty_input(tmp_path: Path) -> None:
    paths = _corpus(tmp_path, jpegs=6)
    gpu = NvJpegDecoder(SPEC, LIMITS, device="cpu")
    with MixedDecoder(gpu, DecodePool(SPEC, LIMITS, workers=0, lookahead=1), lookahead=3, gpu_chunk=1) as mixed:
        assert list(mixed.imap([])) == []
        results = list(mixed.imap(paths))
    assert [r.path if isinstance(r, Failure) else r.meta.path for r in results] == paths


def test_setting_decides_where_nvjpeg_runs(tmp_path: Path) -> None:
    off = shapes_settings(tmp_path, decode={"gpu": "off"}, model={"device": "auto"})
    assert gpu_decode_device(off) is None
    on_cpu = shapes_settings(tmp_path, decode={"gpu": "on"})  # the test model runs on the CPU
    with pytest.raises(ConfigError, match=r"decode\.gpu.*model\.device"):
        gpu_decode_device(on_cpu)
    assert gpu_decode_device(shapes_settings(tmp_path)) is None  # auto, model on the CPU
    if not torch.cuda.is_available():
        auto = shapes_settings(tmp_path, model={"device": "auto"})
        assert gpu_decode_device(auto) is None
        with pytest.raises(ConfigError, match="CUDA"):
            gpu_decode_device(shapes_settings(tmp_path, decode={"gpu": "on"}, model={"device": "auto"}))
        pool = decode_pool(auto, SPEC, 100, 8)  # the pipeline's factory: CPU decoding only here
        assert isinstance(pool, DecodePool)
        pool.close()
    with pytest.raises(ConfigError, match=r"decode\.gpu.*'auto', 'on' or 'off'"):
        shapes_settings(tmp_path, decode={"gpu": "sometimes"})


def test_embed_through_the_pipeline_with_mixed_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_embed` with the factory handing out a MixedDecoder ("GPU" on the CPU): the same vectors as without."""
    folder = tmp_path / "shapes"
    for i, png in enumerate(write_dataset(folder, 16, seed=3)):
        if i % 3:
            Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
            png.unlink()
    model = LazyModel(shapes_settings(tmp_path).model)
    plain = run_embed([folder], tmp_path / "plain.parquet", shapes_settings(tmp_path, decode={"gpu": "off"}), model)
    made: list[object] = []

    def build(*args: object) -> object:
        decoder = decoder_for(*args)  # type: ignore[arg-type]
        made.append(decoder)
        return decoder

    monkeypatch.setattr(mixed_decode, "gpu_mode", lambda settings: "on")  # nvJPEG asked for, and
    monkeypatch.setattr(mixed_decode, "gpu_decode_device", lambda settings: "cpu")  # the "GPU" is the CPU
    monkeypatch.setattr("indexer.ingest.decoders.decoder_for", build)
    small = shapes_settings(tmp_path, decode={"workers": 1, "lookahead": 4})  # the pool full: the "GPU" gets work
    mixed = run_embed([folder], tmp_path / "mixed.parquet", small, model)
    assert isinstance(made[0], MixedDecoder) and made[0].gpu_files > 0
    assert plain.indexed == mixed.indexed == 16 and not mixed.failed
    a, b = (pq.read_table(tmp_path / f"{n}.parquet").to_pydict() for n in ("plain", "mixed"))
    assert a["path"] == b["path"]
    for u, v in zip(a["embedding"], b["embedding"], strict=True):
        assert float(np.dot(u, v)) > 0.99


@needs_cuda
def test_nvjpeg_mixed_on_cuda_agrees_with_the_cpu_path(tmp_path: Path) -> None:
    paths = _corpus(tmp_path)
    gpu = RecordingNvJpeg(SPEC, LIMITS, device="cuda")
    with MixedDecoder(gpu, DecodePool(SPEC, LIMITS, workers=2, lookahead=8), lookahead=16, gpu_chunk=4) as mixed:
        results = list(mixed.imap(paths))
    assert mixed.gpu_files > 0
    for path, got in zip(paths, results, strict=True):
        want = decode_file(path, SPEC, LIMITS)
        assert type(got) is type(want)
        if isinstance(got, Decoded) and isinstance(want, Decoded):
            assert got.meta == want.meta and _cosine(got.pixels, want.pixels) > 0.999


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_pool_source_may_pause_with_none(tmp_path: Path, transport: str) -> None:
    """`DecodePool.imap` reads a None from its input as "nothing for now": it collects what is in flight, asks again,
    and does not split what it got into one-file tasks (that spreading is for the input's real end)."""
    paths = _corpus(tmp_path, jpegs=12)

    def paused() -> Iterator[Path | None]:
        for i, path in enumerate(paths):
            yield path
            if i % 6 == 5:
                yield None

    with DecodePool(SPEC, LIMITS, workers=2, lookahead=32, transport=transport) as pool:
        sizes: list[int] = []
        submit = pool._submit_chunk

        def spy(chunk: list[Path]) -> object:
            sizes.append(len(chunk))
            return submit(chunk)

        pool._submit_chunk = spy  # type: ignore[method-assign,assignment]
        results = list(pool.imap(paused()))
    assert [r.path if isinstance(r, Failure) else r.meta.path for r in results] == paths
    want = [decode_file(p, SPEC, LIMITS) for p in paths]
    assert [type(r) for r in results] == [type(w) for w in want]
    if pool.transport == "shm":  # each paused fill is one task (chunks of up to 8), not spread as a tail would be
        assert len(paths) == 18 and pool.chunk == 8 and sizes == [6, 6, 6]
