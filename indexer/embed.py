"""Embed stage: group decoded images into batches and turn each batch into vectors.

Failures from the decode stage pass straight through (never held back behind a batch, never shifting a vector onto
another file): every vector leaves here next to the metadata of the image it was computed from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
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
    """Yield an EmbeddedBatch for every ``batch_size`` decoded images (and the rest), failures as they come."""
    pending: list[Decoded] = []
    buffer = BatchBuffer()
    for item in items:
        if isinstance(item, Failure):
            yield item
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            yield _embed(pending, encode, buffer)
            pending = []
    if pending:
        yield _embed(pending, encode, buffer)


class BatchBuffer:
    """One reused array the pixels of a batch are copied into: a fresh 38 MB array per batch of 256 costs the main
    process ~0.014 ms per image in page faults alone (measured, bench/README.md). The encoder only reads it
    during the call (the model's forward returns host vectors, so any device copy from it has completed)."""

    def __init__(self) -> None:
        self._array: npt.NDArray[np.uint8] | None = None

    def stack(self, pixels: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        """``np.stack(pixels)``, into the reused array when the shapes allow."""
        shape = (len(pixels), *pixels[0].shape)
        if self._array is None or self._array.shape[1:] != shape[1:] or self._array.shape[0] < shape[0]:
            self._array = np.empty(shape, np.uint8)
        out = self._array[: shape[0]]
        np.stack(pixels, out=out)
        return out


def _embed(batch: list[Decoded], encode: Encoder, buffer: BatchBuffer) -> EmbeddedBatch:
    start = time.perf_counter()
    vectors = encode(buffer.stack([d.pixels for d in batch]))
    if vectors.shape[0] != len(batch):
        raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(batch)} images")
    seconds = time.perf_counter() - start
    log.info("embedded %d images in %.2f s (%.1f images/s)", len(batch), seconds, len(batch) / max(seconds, 1e-9))
    return EmbeddedBatch([d.meta for d in batch], vectors, seconds)
