"""``decode.gpu = "auto"``: nvJPEG takes work only where the run measures that it helps (`indexer.decode.gpu_policy`).

The rule is checked twice: as arithmetic on a fake clock, and end to end through `MixedDecoder` with a CPU stand-in
for nvJPEG (`NvJpegDecoder(device="cpu")`, torchvision's libjpeg) on real files, where "the model" is a consumer
that takes a set time per image and a slow CPU pool is a `DecodePool` that waits after each result. Contention for
the GPU is a lock the stand-in and the consumer share.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.decode.gpu_policy import GpuPolicy
from indexer.decode.mixed import MixedDecoder
from indexer.decode.nvjpeg import FileRead, NvJpegDecoder
from indexer.decode.pool import DecodePool
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

pytest.importorskip("torchvision.io")
LIMITS = DecodeLimits()
SPEC = PreprocessSpec(image_size=64)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _feed(policy: GpuPolicy, clock: Clock, n: int, model_s: float, wait_s: float) -> None:
    for _ in range(n):
        clock.now += model_s + wait_s
        policy.consumed(wait_s)


def test_rule_keeps_nvjpeg_off_where_the_model_never_waits(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    policy = GpuPolicy("auto", window=10, skip=20, clock=clock)
    assert not policy.allowed
    _feed(policy, clock, 29, model_s=0.01, wait_s=0.0)
    assert policy.state == "measure"  # 20 skipped (the look-ahead decoded while the model loaded), 9 measured
    with caplog.at_level(logging.INFO, logger="indexer.decode.gpu_policy"):
        _feed(policy, clock, 1, model_s=0.01, wait_s=0.0)
    assert policy.state == "off" and not policy.allowed
    assert "nvJPEG off: the model waited on decoding 0% of 0.1 s" in caplog.text


def test_rule_measures_from_the_first_wait_and_keeps_nvjpeg_when_faster(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    policy = GpuPolicy("auto", window=10, skip=1000, clock=clock)
    _feed(policy, clock, 3, model_s=0.01, wait_s=0.0)
    _feed(policy, clock, 10, model_s=0.01, wait_s=0.01)  # decode-bound: measured without waiting for the skip
    assert policy.state == "trial" and policy.allowed
    _feed(policy, clock, 5, model_s=0.01, wait_s=0.0)  # before nvJPEG's first chunk: not counted
    policy.gpu_chunk_done()
    with caplog.at_level(logging.INFO, logger="indexer.decode.gpu_policy"):
        _feed(policy, clock, 10, model_s=0.01, wait_s=0.0)
    assert policy.state == "on" and policy.allowed
    assert "nvJPEG on: 100 images/s against 53 with the CPU alone" in caplog.text
    _feed(policy, clock, 10, model_s=0.1, wait_s=0.5)  # settled: a later slow patch changes nothing
    assert policy.state == "on"


def test_rule_does_not_count_waits_while_the_decoders_start() -> None:
    clock = Clock()
    policy = GpuPolicy("auto", window=10, skip=100, warmup=20, clock=clock)
    _feed(policy, clock, 20, model_s=0.01, wait_s=0.05)  # the workers starting: the model waits, not counted
    _feed(policy, clock, 10, model_s=0.01, wait_s=0.0)
    assert policy.state == "measure"  # no wait since: the window has not started
    _feed(policy, clock, 70, model_s=0.01, wait_s=0.0)
    _feed(policy, clock, 10, model_s=0.01, wait_s=0.0)
    assert policy.state == "off" and "waited on decoding 0%" in policy.decision


@pytest.mark.parametrize(("trial_s", "state"), [(0.0185, "off"), (0.0175, "on")])  # CPU alone: 10 in 0.19 s
def test_rule_drops_nvjpeg_unless_five_percent_faster(trial_s: float, state: str) -> None:
    clock = Clock()
    policy = GpuPolicy("auto", window=10, skip=0, clock=clock)
    _feed(policy, clock, 10, model_s=0.01, wait_s=0.01)
    policy.gpu_chunk_done()
    _feed(policy, clock, 10, model_s=trial_s, wait_s=0.0)
    assert policy.state == state


def test_rule_on_and_unavailable() -> None:
    assert GpuPolicy("on", window=10, skip=0).allowed
    policy = GpuPolicy("auto", window=10, skip=0)
    policy.unavailable("no CUDA device here")
    assert policy.state == "off" and policy.decision == "nvJPEG off: no CUDA device here"
    with pytest.raises(ValueError, match="'auto' or 'on'"):
        GpuPolicy("off", window=10, skip=0)


# --- end to end through MixedDecoder, a CPU stand-in for nvJPEG -------------------------------------------------


class SlowPool(DecodePool):
    """A CPU pool slower than the model: waits ``delay`` s after each file (the stand-in for too few cores)."""

    def __init__(self, delay: float) -> None:
        super().__init__(SPEC, LIMITS, workers=0, lookahead=4)
        self.delay = delay

    def imap(self, paths: Iterable[Path | None]) -> Generator[Decoded | Failure, None, None]:
        inner = super().imap(paths)
        try:
            for result in inner:
                time.sleep(self.delay)
                yield result
        finally:
            inner.close()


class BusyGpu(NvJpegDecoder):
    """The stand-in holding ``gpu`` (shared with the consumer) ``delay`` s per file: nvJPEG competing with the model."""

    def __init__(self, gpu: threading.Lock, delay: float) -> None:
        super().__init__(SPEC, LIMITS, device="cpu")
        self.lock, self.delay = gpu, delay

    def decode_reads(self, paths: list[Path], read: list[FileRead]) -> tuple[list[Decoded | Failure], torch.Tensor]:
        with self.lock:
            time.sleep(self.delay * len(paths))
            return super().decode_reads(paths, read)


def _jpegs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).resize((100, 80)).save(path, quality=90)
        paths.append(path)
    return paths


def _consume(mixed: MixedDecoder, paths: list[Path], model_s: float, gpu: threading.Lock | None = None) -> int:
    count = 0
    for result in mixed.imap(paths):
        assert isinstance(result, Decoded) and result.meta.path == paths[count]
        with gpu or threading.Lock():
            time.sleep(model_s)
        count += 1
    return count


def test_auto_leaves_nvjpeg_idle_where_the_model_is_the_bottleneck(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _jpegs(tmp_path, 60)
    pool = DecodePool(SPEC, LIMITS, workers=0, lookahead=4)
    with (
        caplog.at_level(logging.INFO, logger="indexer.decode.gpu_policy"),
        MixedDecoder(NvJpegDecoder(SPEC, LIMITS, device="cpu"), pool, lookahead=16, gpu_chunk=4, mode="auto") as mixed,
    ):
        assert _consume(mixed, paths, model_s=0.02) == 60
    assert mixed.gpu_files == 0 and mixed.cpu_files == 60
    assert mixed.decision.startswith("nvJPEG off: the model waited on decoding")
    assert "decode.gpu = auto: nvJPEG off" in caplog.text


def test_auto_takes_nvjpeg_where_decoding_is_the_bottleneck_and_it_helps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _jpegs(tmp_path, 120)
    with (
        caplog.at_level(logging.INFO, logger="indexer.decode.gpu_policy"),
        MixedDecoder(NvJpegDecoder(SPEC, LIMITS, device="cpu"), SlowPool(0.05), 16, 4, mode="auto") as mixed,
    ):
        assert _consume(mixed, paths, model_s=0.0) == 120
    assert mixed.decision.startswith("nvJPEG on: "), mixed.decision
    assert mixed.gpu_files >= 40  # a third or more, though measuring took the first 16+ on the CPU alone
    assert "trying nvJPEG" in caplog.text and "decode.gpu = auto: nvJPEG on" in caplog.text


def test_auto_drops_nvjpeg_that_slows_the_model_down(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path, 120)
    gpu = threading.Lock()
    with MixedDecoder(BusyGpu(gpu, 0.1), SlowPool(0.01), lookahead=16, gpu_chunk=4, mode="auto") as mixed:
        assert _consume(mixed, paths, model_s=0.005, gpu=gpu) == 120
    assert mixed.decision.startswith("nvJPEG off: "), mixed.decision
    assert "against" in mixed.decision  # decided by the trial, not before it
    assert 0 < mixed.gpu_files <= 16  # the trial's chunks only


def test_decoder_for_leaves_torch_and_cuda_to_the_nvjpeg_thread(tmp_path: Path) -> None:
    """With the model on CUDA and ``auto``, making the decoder imports neither torch nor torchvision; a short run
    that never measured a reason for nvJPEG never starts it (no torch, no CUDA context), and the CPU decodes all."""
    paths = _jpegs(tmp_path / "photos", 12)
    script = f"""
import json, sys
from pathlib import Path
from indexer.decode.mixed import MixedDecoder, decoder_for
from indexer.records import DecodeLimits, PreprocessSpec
from indexer.settings import load_settings
settings = load_settings(None, {{"model": {{"device": "cuda"}}, "store": {{"dir": {str(tmp_path / "s")!r}}}}})
decoder = decoder_for(settings, PreprocessSpec(image_size=64), DecodeLimits(), 1, 8)
made = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
with decoder:
    results = list(decoder.imap(sorted(Path({str(tmp_path / "photos")!r}).glob("*.jpg"))))
ran = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
print(json.dumps({{"mixed": isinstance(decoder, MixedDecoder), "made": made, "ran": ran, "n": len(results),
                  "cpu": decoder.cpu_files, "gpu": decoder.gpu_files, "decision": decoder.decision}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["mixed"] and got["made"] == [] and got["ran"] == []
    assert (got["n"], got["cpu"], got["gpu"]) == (len(paths), len(paths), 0) and got["decision"] == ""


def test_nvjpeg_unavailable_when_wanted_leaves_the_run_to_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _jpegs(tmp_path, 60)
    opened: list[float] = []

    def opener() -> str:
        opened.append(time.perf_counter())
        return "no CUDA device with torchvision's nvJPEG here"

    with (
        caplog.at_level(logging.INFO, logger="indexer.decode.gpu_policy"),
        MixedDecoder(opener, SlowPool(0.02), lookahead=16, gpu_chunk=4, mode="auto") as mixed,
    ):
        assert _consume(mixed, paths, model_s=0.0) == 60
    assert len(opened) == 1 and (mixed.gpu_files, mixed.cpu_files) == (0, 60)
    assert mixed.decision == "nvJPEG off: no CUDA device with torchvision's nvJPEG here"
    assert "trying nvJPEG" in caplog.text  # it was wanted (decoding was the bottleneck) before it was looked for
