"""Embed stage: group decoded images into batches and turn each batch into vectors.

Failures from the decode stage pass straight through (never held back behind a batch, never shifting a vector onto
another file): every vector leaves here next to the metadata of the image it was computed from. The model runs
on a thread of its own, one batch behind the gathering of the next (see `embed_batches`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from indexer.records import Decoded, Failure, ImageMeta

log = logging.getLogger(__name__)

Encoder = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class EmbeddedBatch:
    """Vectors (N, dim), row i computed from the image described by metas[i]."""

    metas: list[ImageMeta]
    vectors: npt.NDArray[np.float32]
    seconds: float


def embed_batches(
    items: Iterable[Decoded | Failure], encode: Encoder, batch_size: int
) -> Iterator[EmbeddedBatch | Failure]:
    """Yield an EmbeddedBatch for every ``batch_size`` decoded images (and the rest), failures as they come.

    The model runs on its own thread, one batch at a time, while this one gathers and stacks the next batch (two
    reused buffers take turns): decoding, batch assembly and the model overlap; a batch is yielded once computed.
    """
    pending: list[Decoded] = []
    buffers = (BatchBuffer(), BatchBuffer())
    turn = 0
    in_flight: _InFlight | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="model") as model_thread:
        for item in items:
            if isinstance(item, Failure):
                yield item
                continue
            pending.append(item)
            if len(pending) >= batch_size:
                pixels = buffers[turn].stack([d.pixels for d in pending])
                if in_flight is not None:
                    yield in_flight.result()
                in_flight = _InFlight(model_thread, encode, pixels, [d.meta for d in pending])
                pending, turn = [], 1 - turn
        if pending:
            pixels = buffers[turn].stack([d.pixels for d in pending])
            if in_flight is not None:
                yield in_flight.result()
            in_flight = _InFlight(model_thread, encode, pixels, [d.meta for d in pending])
        if in_flight is not None:
            yield in_flight.result()


class _InFlight:
    """One batch handed to the model thread."""

    def __init__(
        self, thread: ThreadPoolExecutor, encode: Encoder, pixels: npt.NDArray[np.uint8], metas: list[ImageMeta]
    ) -> None:
        self.metas = metas
        self._future = thread.submit(_timed, encode, pixels)

    def result(self) -> EmbeddedBatch:
        vectors, seconds = self._future.result()
        n = len(self.metas)
        if vectors.shape[0] != n:
            raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {n} images")
        log.info("embedded %d images in %.2f s (%.1f images/s)", n, seconds, n / max(seconds, 1e-9))
        return EmbeddedBatch(self.metas, vectors, seconds)


def _timed(encode: Encoder, pixels: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], float]:
    start = time.perf_counter()
    vectors = encode(pixels)
    return vectors, time.perf_counter() - start


class BatchBuffer:
    """One reused array the pixels of a batch are copied into: a fresh 38 MB array per batch of 256 costs the main
    process ~0.014 ms per image in page faults alone (measured, bench/README.md). Where CUDA is present it is pinned
    host memory, so the model's ``.to(device, non_blocking=True)`` is a DMA copy. The encoder only reads it during
    the call (the model's forward returns host vectors, so any device copy from it has completed)."""

    def __init__(self) -> None:
        self._array: npt.NDArray[np.uint8] | None = None
        self._pinned = False

    def stack(self, pixels: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        """``np.stack(pixels)``, into the reused array when the shapes allow (and once pinned memory can be had:
        the first batches may be stacked while torch is still being imported on the model's loading thread)."""
        shape = (len(pixels), *pixels[0].shape)
        if (
            self._array is None
            or self._array.shape[1:] != shape[1:]
            or self._array.shape[0] < shape[0]
            or (not self._pinned and _cuda_ready())
        ):
            self._array, self._pinned = _host_array(shape)
        out = self._array[: shape[0]]
        np.stack(pixels, out=out)
        return out


def _cuda_ready() -> bool:
    """torch imported (completely: not still being imported by another thread) and seeing a CUDA device."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return False
    return bool(torch.cuda.is_available())


def _host_array(shape: tuple[int, ...]) -> tuple[npt.NDArray[np.uint8], bool]:
    """An uninitialised uint8 array, and whether it is page-locked (it is once torch is loaded and sees CUDA)."""
    if _cuda_ready():
        torch = sys.modules["torch"]
        pinned: npt.NDArray[np.uint8] = torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
        return pinned, True
    return np.empty(shape, np.uint8), False
