"""The nvJPEG side's read-ahead (`indexer.decode.mixed`, `NvJpegDecoder.read_ahead`): chunk N+1's files are read
while chunk N decodes, with the same results as reading and decoding one chunk after the other.

On the CPU the "GPU" is `NvJpegDecoder(device="cpu")` (torchvision's libjpeg). Where a test needs the GPU side to
take two chunks at once, the CPU pool (in-process) is held on its first file until the GPU side decoded its first
chunk, so the JPEGs wait and the work-stealing rule wants the GPU side: no timing decides what is asserted.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.decode.image import decode_file
from indexer.decode.mixed import MixedDecoder
from indexer.decode.nvjpeg import FileRead, NvJpegDecoder, Reads
from indexer.decode.pool import DecodePool
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

pytest.importorskip("torchvision.io")
LIMITS = DecodeLimits()
SPEC = PreprocessSpec(image_size=64)
WAIT_S = 20.0  # only how long a broken build hangs before failing; nothing waits this long when it works


def _folder(folder: Path, jpegs: int = 24) -> list[Path]:
    """JPEGs of a few sizes with two PNGs, a corrupt JPEG, a CMYK JPEG and a missing file mixed in (a JPEG first)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(jpegs):
        path = folder / f"{i:03d}.jpg"
        small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
        small.resize((96 + 8 * (i % 3), 80), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
        paths.append(path)
    for i in (4, 13):
        png = folder / f"{i:03d}-b.png"
        Image.new("RGB", (90, 70), (10 * i, 200, 30)).save(png)
        paths.insert(i, png)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:300])
    cmyk = folder / "cmyk.jpg"
    Image.new("CMYK", (100, 75), (20, 120, 200, 10)).save(cmyk, "JPEG", quality=90)
    paths[6:6] = [corrupt, cmyk, folder / "missing.jpg"]
    return paths


def _where(results: list[Decoded | Failure]) -> list[Path]:
    return [r.path if isinstance(r, Failure) else r.meta.path for r in results]


def _same_as_the_cpu_path(paths: list[Path], results: list[Decoded | Failure]) -> None:
    """Each result has the CPU path's metadata, or its failure reason."""
    for path, got in zip(paths, results, strict=True):
        want = decode_file(path, SPEC, LIMITS)
        if isinstance(want, Failure):
            assert isinstance(got, Failure) and got.path == path and got.reason == want.reason
        else:
            assert isinstance(got, Decoded) and got.meta == want.meta


class Traced(NvJpegDecoder):
    """The real decoder, logging its steps in order: ("read", chunk) as a file's read starts, ("decode-start", i) and
    ("decode-end", i) around the i-th decode step. With ``overlap``, the first decode step waits until a file of the
    second chunk submitted began its read (and notes whether one did); ``hold`` keeps those reads waiting for
    ``release``; ``fail_first`` makes the first decode step fail as nvJPEG does on a device error."""

    def __init__(self, overlap: bool = True, fail_first: bool = False, hold: bool = False) -> None:
        super().__init__(SPEC, LIMITS, device="cpu", readers=2)
        self.overlap, self.fail_first, self.hold = overlap, fail_first, hold
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []
        self.submitted: list[list[Path]] = []  # each read_ahead's chunk
        self.reads: list[Reads] = []
        self.decoded: list[list[Path]] = []  # each decode step's chunk
        self.ahead_at_decode: list[int] = []  # chunks submitted when each decode step started
        self.active = 0  # file reads running now
        self.ahead_read = threading.Event()
        self.first_decoded = threading.Event()
        self.release = threading.Event()
        self.overlapped = False

    def read_ahead(self, paths: list[Path]) -> Reads:
        with self.lock:
            self.submitted.append(list(paths))
        reads = super().read_ahead(paths)
        self.reads.append(reads)
        return reads

    def _read(self, path: Path) -> FileRead:
        with self.lock:
            chunk = next(i for i, c in enumerate(self.submitted) if path in c)
            self.log.append(("read", chunk))
            self.active += 1
        try:
            if chunk >= 1:
                self.ahead_read.set()
                if self.hold:
                    assert self.release.wait(WAIT_S)
            return super()._read(path)
        finally:
            with self.lock:
                self.active -= 1

    def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        with self.lock:
            index = len(self.decoded)
            self.decoded.append(list(paths))
            self.ahead_at_decode.append(len(self.submitted))
            self.log.append(("decode-start", index))
        try:
            if index == 0 and self.overlap:
                self.overlapped = self.ahead_read.wait(WAIT_S)  # chunk 1's reads start while chunk 0 decodes
            if index == 0 and self.fail_first:
                raise RuntimeError("CUDA error: an illegal memory access (simulated)")
            return super().decode_reads(paths, read)
        finally:
            with self.lock:
                self.log.append(("decode-end", index))
            if index == 0:
                self.first_decoded.set()


def _mixed(gpu: Traced, monkeypatch: pytest.MonkeyPatch) -> MixedDecoder:
    """``gpu`` with an in-process CPU pool held on its first file until ``gpu`` decoded its first chunk."""

    def held(path: Path, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded | Failure:
        gpu.first_decoded.wait(WAIT_S)  # on regardless after that: the test's own assertions say what failed
        return decode_file(path, spec, limits)

    monkeypatch.setattr("indexer.decode.pool.decode_file", held)
    return MixedDecoder(gpu, DecodePool(SPEC, LIMITS, workers=0, lookahead=1), lookahead=16, gpu_chunk=4)


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("nvjpeg", "decode-pool-feed")]


def test_read_ahead_then_decode_step_equals_decode(tmp_path: Path) -> None:
    """Chunk by chunk, the next one read ahead while the current one decodes: the same metas, failures and pixels
    as `decode(chunk)` (read, then decode) gives."""
    paths = _folder(tmp_path)
    chunks = [paths[i : i + 5] for i in range(0, len(paths), 5)]
    decoder, before = NvJpegDecoder(SPEC, LIMITS, device="cpu"), NvJpegDecoder(SPEC, LIMITS, device="cpu")
    results: list[Decoded | Failure] = []
    reads: Reads | None = decoder.read_ahead(chunks[0])
    for n, chunk in enumerate(chunks):
        assert reads is not None and reads.paths == chunk
        ahead = decoder.read_ahead(chunks[n + 1]) if n + 1 < len(chunks) else None
        got, pixels = decoder.decode_reads(chunk, reads.result())
        want, want_pixels = before.decode(chunk)
        assert torch.equal(pixels, want_pixels)
        assert [type(r) for r in got] == [type(w) for w in want]
        results += got
        reads = ahead
    decoder.close()
    before.close()
    assert _where(results) == paths
    _same_as_the_cpu_path(paths, results)
    assert sum(isinstance(r, Failure) for r in results) == 2  # the corrupt JPEG and the missing file
    inline = NvJpegDecoder(SPEC, LIMITS, device="cpu", readers=1)  # reads on the calling thread
    with pytest.raises(ValueError, match="2 reads for 1 paths"):
        inline.decode_reads(paths[:1], inline.read(paths[:2]))


def test_mixed_results_are_those_of_each_side(tmp_path: Path) -> None:
    """Through `MixedDecoder`, each file's result is exactly what its side makes of it: the CPU path's for the pool's
    files, `decode(chunk)`'s for each chunk the GPU side decoded (same metas, same pixels)."""
    paths = _folder(tmp_path, jpegs=40)
    gpu = Traced(overlap=False)
    with MixedDecoder(gpu, DecodePool(SPEC, LIMITS, workers=2, lookahead=8), lookahead=16, gpu_chunk=4) as mixed:
        results = list(mixed.imap(paths))
    assert _where(results) == paths
    _same_as_the_cpu_path(paths, results)
    expected: dict[Path, np.ndarray] = {}
    before = NvJpegDecoder(SPEC, LIMITS, device="cpu")
    for chunk in gpu.decoded:
        want, pixels = before.decode(chunk)
        for row, w in enumerate(r for r in want if isinstance(r, Decoded)):
            expected[w.meta.path] = pixels[row].numpy()
    before.close()
    assert gpu.decoded and sum(len(c) for c in gpu.decoded) == mixed.gpu_files
    for path, got in zip(paths, results, strict=True):
        if isinstance(got, Decoded):
            want_pixels = expected.get(path)
            if want_pixels is None:
                cpu = decode_file(path, SPEC, LIMITS)
                assert isinstance(cpu, Decoded)
                want_pixels = cpu.pixels
            assert np.array_equal(got.pixels, want_pixels), path


def test_the_next_chunk_is_read_while_the_current_one_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _folder(tmp_path)
    gpu = Traced()
    with _mixed(gpu, monkeypatch) as mixed:
        results = list(mixed.imap(paths))
    assert _where(results) == paths
    _same_as_the_cpu_path(paths, results)
    assert gpu.overlapped, "chunk 1's reads did not start while chunk 0 was decoding"
    log = gpu.log
    assert log.index(("read", 1)) < log.index(("decode-end", 0))
    assert max(i for i, entry in enumerate(log) if entry == ("read", 0)) < log.index(("decode-start", 0))
    assert all(ahead <= i + 2 for i, ahead in enumerate(gpu.ahead_at_decode))  # one chunk ahead at most
    assert gpu.decoded == gpu.submitted and mixed.gpu_files == sum(len(c) for c in gpu.decoded)
    assert len({p for c in gpu.decoded for p in c}) == mixed.gpu_files  # no file decoded twice


def test_a_failed_chunk_and_the_one_read_ahead_are_decoded_by_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _folder(tmp_path)
    gpu = Traced(fail_first=True)
    with _mixed(gpu, monkeypatch) as mixed:
        results = list(mixed.imap(paths))
    assert "nvJPEG decoding failed" in caplog.text and "simulated" in caplog.text
    assert len(gpu.decoded) == 1 and len(gpu.submitted) == 2  # chunk 0 failed with chunk 1 read ahead
    assert _where(results) == paths  # every file once, in order: those of both chunks too
    assert {p for c in gpu.submitted for p in c} <= set(paths)
    _same_as_the_cpu_path(paths, results)
    assert mixed.gpu_files == 0 and all(r.done() for r in gpu.reads)
    assert not _decode_threads()


def test_stopping_with_a_chunk_read_ahead_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _folder(tmp_path, jpegs=40)
    gpu = Traced(hold=True)
    mixed = _mixed(gpu, monkeypatch)
    with mixed:
        results = mixed.imap(paths)
        first = next(results)
        assert len(gpu.submitted) >= 2 and not gpu.reads[1].done()  # chunk 1 read ahead, its reads held
        gpu.release.set()
        results.close()
        assert not _decode_threads()
        assert gpu.active == 0 and all(r.done() for r in gpu.reads)  # no read left running after the run
        assert isinstance(first, Decoded) and first.meta.path == paths[0]
        assert mixed.gpu_files + mixed.cpu_files < len(paths)
        again = list(mixed.imap(paths[:10]))  # the decoder is reusable
        assert _where(again) == paths[:10]
    assert not [t for t in threading.enumerate() if t.name.startswith("nvjpeg-read")]
