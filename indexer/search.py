"""Read side: turn a text or an image into a query vector and ask the store.

Scores are cosine similarities of L2-normalised CLIP vectors. For image-to-image scores the seed's guide applies:
≥ 0.99 exact duplicate, ≥ 0.95 near-duplicate (crop, resize, re-encode), ≥ 0.90 similar. Text-to-image scores are
much lower in absolute terms (≈ 0.2-0.35 for a good match with ViT-L/14): rank matters, not the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.decode import decode_file
from indexer.errors import ConfigError, ModelMismatchError, StoreError
from indexer.model import ClipModel, LazyModel
from indexer.records import DecodeLimits, Failure, Hit, SearchFilter
from indexer.store import VectorStore


@dataclass(frozen=True, slots=True)
class Query:
    """A query: texts and/or image files. Positive parts are averaged, negative parts subtracted."""

    texts: tuple[str, ...] = ()
    images: tuple[Path, ...] = ()
    negative_texts: tuple[str, ...] = ()
    limit: int = 10
    offset: int = 0
    threshold: float | None = None
    filter: SearchFilter | None = None


def check_store_model(store: VectorStore, model_id: str) -> None:
    """Refuse to query a store built by another model (its vectors live in another space)."""
    info = store.model_info()
    if info is None:
        raise StoreError(f"the store {store.location} is empty: run `indexer index PATH` first")
    if info[0] != model_id:
        raise ModelMismatchError(info[0], model_id, store.location)


def query_vector(query: Query, clip: ClipModel, limits: DecodeLimits | None = None) -> npt.NDArray[np.float32]:
    """One unit vector for the query: mean of the positive parts minus the mean of the negative ones."""
    positives = [clip.encode_texts(list(query.texts))] if query.texts else []
    positives += [encode_image_file(path, clip, limits or DecodeLimits()) for path in query.images]
    if not positives:
        raise ConfigError("query", "give a text or --image FILE")
    vector = np.concatenate(positives).mean(axis=0)
    if query.negative_texts:
        vector = vector - clip.encode_texts(list(query.negative_texts)).mean(axis=0)
    return _unit(vector)


def encode_image_file(path: Path, clip: ClipModel, limits: DecodeLimits) -> npt.NDArray[np.float32]:
    """The vector of one image file; a file that can't be decoded is a usage error naming it."""
    result = decode_file(path, clip.preprocess, limits)
    if isinstance(result, Failure):
        raise ConfigError("--image", f"{path}: {result.reason}")
    return clip.encode_pixels(result.pixels[None])


def _unit(vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise ConfigError("query", "the positive and negative parts cancel out")
    return (vector / norm).astype(np.float32)


def search(store: VectorStore, model: LazyModel, query: Query) -> list[Hit]:
    """Run a query against the store, best match first."""
    check_store_model(store, model.model_id)
    vector = query_vector(query, model.get())
    return store.query(vector, limit=query.limit, offset=query.offset, threshold=query.threshold, filter=query.filter)
