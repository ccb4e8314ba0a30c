"""The model's host→device copy of a batch (`ClipModel._to_device`): a side stream on CUDA, unchanged on the CPU.

The contract `embed.BatchBuffer` relies on: once `encode_pixels` returned, the batch's host buffer may be
overwritten without changing the vectors it returned. CUDA runs are marked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.ingest.embed import BatchBuffer
from indexer.model.clip import ClipModel, load_model
from indexer.settings import ModelSettings
from tests.conftest import SHAPES_MODEL

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")


def _images(clip: ClipModel, n: int, seed: int) -> list[np.ndarray]:
    size = clip.preprocess.image_size
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8))


def _reuse_keeps_results(clip: ClipModel) -> None:
    """Encode from a reused BatchBuffer, overwrite it at once, encode again: each call's vectors are its own."""
    first, second = _images(clip, 6, 1), _images(clip, 6, 2)
    want_first, want_second = clip.encode_pixels(np.stack(first)), clip.encode_pixels(np.stack(second))
    buffer = BatchBuffer()
    got_first = clip.encode_pixels(buffer.stack(first))
    got_second = clip.encode_pixels(buffer.stack(second))  # the same memory, overwritten
    assert np.abs(got_first - want_first).max() < 1e-3
    assert np.abs(got_second - want_second).max() < 1e-3
    assert np.abs(got_first - got_second).max() > 1e-2  # different images, different vectors


def test_cpu_copy_path_is_unchanged() -> None:
    clip = load_model(ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="fp32"))
    host = torch.from_numpy(np.stack(_images(clip, 2, 0)))
    assert torch.equal(clip._to_device(host), host)
    _reuse_keeps_results(clip)
    assert clip._copy_stream is None  # no CUDA stream on the CPU


@needs_cuda
def test_cuda_copy_runs_on_a_side_stream_and_keeps_the_buffer_contract() -> None:
    clip = load_model(ModelSettings(name=str(SHAPES_MODEL), device="cuda", dtype="fp32"))
    cpu = load_model(ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="fp32"))
    images = np.stack(_images(clip, 6, 3))
    on_gpu, on_cpu = clip.encode_pixels(images), cpu.encode_pixels(images)
    assert np.min(np.sum(on_gpu * on_cpu, axis=1)) > 0.999  # cosine per image (TF32 convolutions on CUDA)
    assert clip._copy_stream is not None and clip._copy_stream != torch.cuda.current_stream()
    _reuse_keeps_results(clip)
