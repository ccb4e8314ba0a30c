"""embed_batches with the model on its own thread: vectors stay with their images, failures pass, errors surface."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from indexer.ingest.embed import EmbeddedBatch, embed_batches
from indexer.records import Decoded, Failure, ImageMeta


def _items(n: int) -> list[Decoded | Failure]:
    out: list[Decoded | Failure] = []
    for i in range(n):
        path = Path(f"/x/{i}.jpg")
        if i % 4 == 3:
            out.append(Failure(path, "bad"))
        else:
            out.append(Decoded(ImageMeta(path, 1, 1, "s", 1, 1, "JPEG"), np.full((3, 4, 4), i, np.uint8)))
    return out


def test_vectors_stay_aligned_and_the_model_runs_on_its_own_thread() -> None:
    threads: set[str] = set()
    seen: list[np.ndarray] = []

    def encode(pixels: np.ndarray) -> np.ndarray:  # the vector says which image it came from
        threads.add(threading.current_thread().name)
        seen.append(pixels.copy())
        return pixels[:, 0, 0, :1].astype(np.float32)

    out = list(embed_batches(_items(23), encode, 5))
    batches = [b for b in out if isinstance(b, EmbeddedBatch)]
    assert [len(b.metas) for b in batches] == [5, 5, 5, 3]
    for batch in batches:
        for meta, vector in zip(batch.metas, batch.vectors, strict=True):
            assert int(vector[0]) == int(meta.path.stem)
    assert sorted(int(f.path.stem) for f in out if isinstance(f, Failure)) == [3, 7, 11, 15, 19]
    assert threads and threading.current_thread().name not in threads
    assert [int(s[0, 0, 0, 0]) for s in seen] == [0, 6, 13, 20]  # each batch got its own pixels (no overwrite)


def test_an_encoder_error_reaches_the_caller() -> None:
    def encode(pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        list(embed_batches(_items(12), encode, 4))


def test_a_wrong_number_of_vectors_is_refused() -> None:
    with pytest.raises(RuntimeError, match="returned 1 vectors for 4 images"):
        list(embed_batches(_items(8), lambda p: np.zeros((1, 2), np.float32), 4))
