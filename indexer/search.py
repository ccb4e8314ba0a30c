"""Read side: turn texts, images and indexed images into one query vector and ask the store.

A query has positive and negative examples of four kinds: texts, image files, uploaded image bytes and the ids of
indexed images (whose stored vectors are used as they are: no file is read, no model runs). Like rclip's ``+``/``-``
queries and Qdrant's recommend API (``average_vector``), the query vector is the mean of the positive vectors minus
the mean of the negative ones, L2-normalised; metadata filters, limit, offset and a score threshold go to the store.

Scores are cosine similarities of L2-normalised CLIP vectors. For image-to-image scores NeMo Curator's guide applies:
≥ 0.99 exact duplicate, ≥ 0.95 near-duplicate (crop, resize, re-encode), ≥ 0.90 similar. Text-to-image scores are
much lower in absolute terms (≈ 0.2-0.35 for a good match with ViT-L/14): rank matters, not the value.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from indexer.decode.geometry import Pixels, preprocess
from indexer.decode.image import decode_file, load_image
from indexer.errors import ConfigError, DecodeError, ModelMismatchError, StoreError, UnknownImageError
from indexer.model.lazy import LazyModel  # torch-free: a search answered by the store's owner loads no torch here
from indexer.records import SEARCH_LIMIT, SEARCH_THRESHOLD, DecodeLimits, Failure, Hit, PreprocessSpec, SearchFilter
from indexer.store.protocol import VectorStore

if TYPE_CHECKING:
    from indexer.model.clip import ClipModel

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
Sort = Literal["relevance", "newest", "oldest"]
SORTS: tuple[Sort, ...] = ("relevance", "newest", "oldest")
SORT_WINDOW = 1000  # sorting by date orders the best SORT_WINDOW matches (those at or above the threshold)


@dataclass(frozen=True, slots=True)
class Query:
    """A query: positive and negative examples, filters and paging.

    Positive parts (texts, image files, uploaded image bytes, indexed image ids) are averaged; the mean of the
    negative parts is subtracted. The first seven fields keep their historical order (the CLI and tests use them).
    """

    texts: tuple[str, ...] = ()
    images: tuple[Path, ...] = ()
    negative_texts: tuple[str, ...] = ()
    limit: int = SEARCH_LIMIT
    offset: int = 0
    threshold: float | None = SEARCH_THRESHOLD
    filter: SearchFilter | None = None
    ids: tuple[str, ...] = ()
    uploads: tuple[bytes, ...] = ()
    negative_images: tuple[Path, ...] = ()
    negative_ids: tuple[str, ...] = ()
    negative_uploads: tuple[bytes, ...] = ()
    sort: Sort = "relevance"
    # Uploads already decoded and preprocessed (`upload_pixels`): the service decodes off its engine thread.
    upload_pixels: tuple[Pixels, ...] = ()
    negative_upload_pixels: tuple[Pixels, ...] = ()

    def __post_init__(self) -> None:
        """Paging is checked here, once, for every caller (the HTTP API's models check the same bounds)."""
        if self.limit < 1:
            raise ConfigError("search.limit", f"must be at least 1 (got {self.limit})")
        if self.offset < 0:
            raise ConfigError("search.offset", f"must be at least 0 (got {self.offset})")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError("search.threshold", f"must be a cosine score from -1 to 1 (got {self.threshold})")

    def has_positive(self) -> bool:
        """True when there is something to look for."""
        return bool(self.texts or self.images or self.uploads or self.upload_pixels or self.ids)


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent turning the query into a vector and asking the store."""

    encode: float
    store: float


def check_store_model(store: VectorStore, model_id: str) -> None:
    """Refuse to query a store built by another model (its vectors live in another space)."""
    info = store.model_info()
    if info is None:
        raise StoreError(f"the store {store.location} is empty: run `indexer index PATH` first")
    if info[0] != model_id:
        raise ModelMismatchError(info[0], model_id, store.location)


def query_vector(
    query: Query,
    clip: ClipModel | LazyModel,
    limits: DecodeLimits | None = None,
    store: VectorStore | None = None,
) -> Vector:
    """One unit vector for the query: mean of the positive parts minus the mean of the negative ones.

    ``clip`` may be a LazyModel: the network is then built only when a part needs it. Indexed ids need ``store``.
    """
    if not query.has_positive():
        raise ConfigError("query", "give a text, an image or the id of an indexed image to look for")
    get = _model_getter(clip)
    lim = limits or DecodeLimits()
    positive = _parts(query.texts, query.images, query.uploads, query.upload_pixels, query.ids, get, lim, store)
    vector = positive.mean(axis=0)
    negative = _parts(
        query.negative_texts,
        query.negative_images,
        query.negative_uploads,
        query.negative_upload_pixels,
        query.negative_ids,
        get,
        lim,
        store,
    )
    if len(negative):
        vector = vector - negative.mean(axis=0)
    return _unit(vector)


def _model_getter(clip: ClipModel | LazyModel) -> Callable[[], ClipModel]:
    return clip.get if isinstance(clip, LazyModel) else lambda: clip


def _parts(
    texts: Sequence[str],
    images: Sequence[Path],
    uploads: Sequence[bytes],
    pixels: Sequence[Pixels],
    ids: Sequence[str],
    get: Callable[[], ClipModel],
    limits: DecodeLimits,
    store: VectorStore | None,
) -> Vector:
    """The vectors of one side of a query, stacked (N, dim); (0, 0) when the side is empty."""
    rows: list[Vector] = [get().encode_texts(list(texts))] if texts else []
    rows += [encode_image_file(path, get(), limits) for path in images]
    rows += [encode_image_bytes(data, get(), limits) for data in uploads]
    rows += [get().encode_pixels(p[None]) for p in pixels]
    if ids:
        rows.append(stored_vectors(ids, store))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def encode_image_file(path: Path, clip: ClipModel, limits: DecodeLimits) -> Vector:
    """The vector of one image file; a file that can't be decoded is a usage error naming it."""
    result = decode_file(path, clip.preprocess, limits)
    if isinstance(result, Failure):
        raise ConfigError("--image", f"{path}: {result.reason}")
    return clip.encode_pixels(result.pixels[None])


def encode_image_bytes(data: bytes, clip: ClipModel, limits: DecodeLimits, name: str = "upload") -> Vector:
    """The vector of an uploaded image; bytes that are no usable image raise DecodeError with the reason."""
    return clip.encode_pixels(upload_pixels(data, clip.preprocess, limits, name)[None])


def upload_pixels(data: bytes, spec: PreprocessSpec, limits: DecodeLimits, name: str = "upload") -> Pixels:
    """The model input of an uploaded image (decoded and preprocessed; no model needed, any thread);
    bytes that are no usable image raise DecodeError with the reason."""
    if not data:
        raise DecodeError(Path(name), "empty upload (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise DecodeError(Path(name), f"too large: {len(data)} bytes exceeds {limits.max_file_bytes}")
    loaded = load_image(data, limits, draft_to=spec.image_size, source=Path(name))
    try:
        return preprocess(loaded.image, spec)
    except (OSError, ValueError, MemoryError) as exc:
        raise DecodeError(Path(name), f"cannot preprocess the image: {exc}") from exc


def stored_vectors(ids: Sequence[str], store: VectorStore | None) -> Vector:
    """The stored vectors of indexed images, in the order given; UnknownImageError for ids the store lacks."""
    if store is None:
        raise ConfigError("query", "searching by indexed image ids needs a store")
    wanted = list(dict.fromkeys(_canonical_id(i) for i in ids))
    malformed = [i for i in wanted if not i]
    if malformed:
        raise UnknownImageError([i for i in ids if not _canonical_id(i)])
    found = {p.id: p.vector for p in store.retrieve(wanted, with_vectors=True) if p.vector is not None}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise UnknownImageError(missing)
    return np.stack([found[i] for i in wanted]).astype(np.float32)


def _canonical_id(text: str) -> str:
    """A point id as the stores write it (lower-case hyphenated UUID); '' when text is no UUID."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        return ""


def _unit(vector: Vector) -> Vector:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise ConfigError("query", "the positive and negative parts cancel out")
    return (vector / norm).astype(np.float32)


def search(store: VectorStore, model: LazyModel, query: Query, limits: DecodeLimits | None = None) -> list[Hit]:
    """Run a query against the store, best match first."""
    return timed_search(store, model, query, limits)[0]


def timed_search(
    store: VectorStore, model: LazyModel, query: Query, limits: DecodeLimits | None = None
) -> tuple[list[Hit], Timings]:
    """`search`, also returning how long encoding and the store query took."""
    check_store_model(store, model.model_id)
    start = time.perf_counter()
    vector = query_vector(query, model, limits, store)
    encoded = time.perf_counter()
    hits = _ranked(store, vector, query)
    done = time.perf_counter()
    log.debug("query: encode %.1f ms, store %.1f ms", (encoded - start) * 1e3, (done - encoded) * 1e3)
    return hits, Timings(encode=encoded - start, store=done - encoded)


def _ranked(store: VectorStore, vector: Vector, query: Query) -> list[Hit]:
    """One page of hits: best first, or (sort newest/oldest) the best SORT_WINDOW matches ordered by mtime."""
    if query.sort == "relevance":
        return store.query(
            vector, limit=query.limit, offset=query.offset, threshold=query.threshold, filter=query.filter
        )
    if query.offset >= SORT_WINDOW:
        return []
    hits = store.query(vector, limit=SORT_WINDOW, threshold=query.threshold, filter=query.filter)
    newest = query.sort == "newest"
    hits.sort(key=lambda h: (_mtime(h), h.score if newest else -h.score), reverse=newest)
    return hits[query.offset : query.offset + query.limit]


def _mtime(hit: Hit) -> float:
    value = hit.payload.get("mtime")
    return float(value) if isinstance(value, int | float) else 0.0


def parse_time(text: str, setting: str) -> float:
    """A point in time as unix seconds: a number (unix seconds) or an ISO 8601 date/time (local time if naive)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError, OSError):
            seconds = math.nan
    if not math.isfinite(seconds):
        raise ConfigError(setting, f"{text!r} is neither unix seconds nor an ISO date such as 2024-06-30")
    return seconds
