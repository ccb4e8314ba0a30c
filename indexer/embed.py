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
    for item in items:
        if isinstance(item, Failure):
            yield item
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            yield _embed(pending, encode)
            pending = []
    if pending:
        yield _embed(pending, encode)


def _embed(batch: list[Decoded], encode: Encoder) -> EmbeddedBatch:
    start = time.perf_counter()
    vectors = encode(np.stack([d.pixels for d in batch]))
    if vectors.shape[0] != len(batch):
        raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(batch)} images")
    seconds = time.perf_counter() - start
    log.info("embedded %d images in %.2f s (%.1f images/s)", len(batch), seconds, len(batch) / max(seconds, 1e-9))
    return EmbeddedBatch([d.meta for d in batch], vectors, seconds)
