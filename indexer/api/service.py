"""The service: everything the routes do, on one engine thread; which files may be sent; its metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from indexer.api.thumbs import ThumbnailCache
from indexer.errors import DecodeError, NotServableError, ServiceBusyError, UnknownImageError
from indexer.formats import SUPPORTED_EXTENSIONS
from indexer.model.lazy import LazyModel
from indexer.records import DecodeLimits, Hit, PreprocessSpec
from indexer.search import Query as SearchQuery
from indexer.search import Timings, check_store_model, timed_search, upload_pixels
from indexer.settings import Settings, cache_dir
from indexer.sources.tarshard import SHARD_SUFFIX
from indexer.store.protocol import VectorStore

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------
# Which files may be sent
# ---------------------------------------------------------------------------------------------------------


class FileGuard:
    """Decides whether an indexed file may be sent: its real path must lie inside a served root.

    With no roots configured, each file is confined to the real path its folder had when it was indexed
    (payload "real_dir"), so a file, its folder or any folder above it replaced later by a symlink leading
    elsewhere is refused; a point indexed before real_dir was recorded is served only when no symlink lies on
    its path. Paths come from the store, never from the request.
    """

    def __init__(self, roots: list[str]) -> None:
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]

    def resolve(self, image_id: str, recorded: str, real_dir: object = None) -> Path:
        """The real path to send for a recorded path (and the real folder recorded with it), or
        NotServableError saying why not."""
        real = self._confined(image_id, recorded, real_dir)
        if real.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise NotServableError(image_id, "not an image file")
        if not real.is_file():
            raise NotServableError(image_id, "the file is no longer on disk")
        return real

    def resolve_shard(self, image_id: str, shard: str, real_dir: object = None) -> Path:
        """The real path of the tar shard an image was read from, under the same rules as a file's."""
        real = self._confined(image_id, shard, real_dir)
        if not real.name.lower().endswith(SHARD_SUFFIX):
            raise NotServableError(image_id, "not a tar shard")
        if not real.is_file():  # a FIFO or a device under that name is refused here, never opened
            raise NotServableError(image_id, "the shard is no longer on disk")
        return real

    def _confined(self, image_id: str, recorded: str, real_dir: object) -> Path:
        path = Path(recorded)
        if not recorded or not path.is_absolute() or ".." in path.parts or "\x00" in recorded:
            raise NotServableError(image_id, "the recorded path is not a clean absolute path")
        real = Path(os.path.realpath(path))
        if self.roots:
            allowed = self.roots
        elif isinstance(real_dir, str) and Path(real_dir).is_absolute():
            allowed = [Path(real_dir)]
        else:  # recorded before real_dir was: no symlink may lie on the way
            allowed = [path.parent] if real.parent == path.parent else []
        if not any(real.is_relative_to(root) for root in allowed):
            raise NotServableError(image_id, "the file lies outside the served folders (serve.roots)")
        return real


# ---------------------------------------------------------------------------------------------------------
# The service: everything the routes do, on the engine thread
# ---------------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of this app's own (no global state: apps can coexist in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "indexer_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "indexer_http_request_duration_seconds", "HTTP request latency", ["route"], registry=self.registry
        )
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.search_stage = Histogram(
            "indexer_search_stage_seconds", "Search time by stage", ["stage"], buckets=buckets, registry=self.registry
        )
        self.thumbnails = Counter(
            "indexer_thumbnails", "Thumbnail requests by cache result", ["result"], registry=self.registry
        )
        self.images = Gauge("indexer_images", "Images in the index", registry=self.registry)
        self.decodes = Gauge("indexer_upload_decodes", "Requests decoding uploads now", registry=self.registry)
        self.decodes_peak = Gauge(
            "indexer_upload_decodes_peak", "Most requests decoding uploads at once so far", registry=self.registry
        )
        self.decodes_refused = Counter(
            "indexer_upload_decodes_refused",
            "Upload requests refused (503): every decode slot taken",
            registry=self.registry,
        )

    def observe_search(self, timings: Timings) -> None:
        self.search_stage.labels("encode").observe(timings.encode)
        self.search_stage.labels("store").observe(timings.store)


@dataclass
class DecodeGate:
    """At most ``limit`` requests decode uploads at once, in a pool of their own (not the event loop, not the
    engine thread: a 13000x13000 PNG takes seconds); one more is refused with ServiceBusyError (503 +
    Retry-After). Used from the event loop only, so plain counters suffice."""

    limit: int
    active: int = 0
    peak: int = 0
    refused: int = 0
    pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="indexer-decode")


@dataclass
class Service:
    """The routes' work: search, file lookup, thumbnails. Its methods run on the engine thread."""

    settings: Settings
    store: VectorStore
    model: LazyModel
    guard: FileGuard
    thumbs: ThumbnailCache
    limits: DecodeLimits
    metrics: Metrics
    executor: ThreadPoolExecutor
    gate: DecodeGate = field(default_factory=lambda: DecodeGate(2))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread and wait for it without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def decode_uploads(self, query: SearchQuery) -> SearchQuery:
        """The query with its uploaded images decoded and preprocessed in the decode pool (ServiceBusyError
        when every slot is taken); the engine thread then only runs the model."""
        if not query.uploads and not query.negative_uploads:
            return query
        gate = self.gate
        if gate.active >= gate.limit:
            gate.refused += 1
            self.metrics.decodes_refused.inc()
            raise ServiceBusyError(f"{gate.limit} uploads are being decoded (serve.max_decodes)")
        gate.active += 1
        gate.peak = max(gate.peak, gate.active)
        self.metrics.decodes.set(gate.active)
        self.metrics.decodes_peak.set(gate.peak)
        try:
            spec = await self.run(self.preprocess_spec)
            loop = asyncio.get_running_loop()
            pos, neg = await loop.run_in_executor(
                gate.pool, self._decode_all, query.uploads, query.negative_uploads, spec
            )
        finally:
            gate.active -= 1
            self.metrics.decodes.set(gate.active)
        return dataclasses.replace(
            query, uploads=(), negative_uploads=(), upload_pixels=pos, negative_upload_pixels=neg
        )

    def preprocess_spec(self) -> PreprocessSpec:
        """The model's input geometry (from its config: the network need not be built)."""
        return self.model.preprocess

    def _decode_all(
        self, pos: tuple[bytes, ...], neg: tuple[bytes, ...], spec: PreprocessSpec
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (
            tuple(upload_pixels(d, spec, self.limits) for d in pos),
            tuple(upload_pixels(d, spec, self.limits) for d in neg),
        )

    def search(self, query: SearchQuery) -> tuple[list[Hit], Timings]:
        """Run a query; an empty store (no collection yet) has no hits rather than an error."""
        if self.store.model_info() is None:
            if query.ids or query.negative_ids:
                raise UnknownImageError([*query.ids, *query.negative_ids])
            return [], Timings(0.0, 0.0)
        hits, timings = timed_search(self.store, self.model, query, self.limits)
        self.metrics.observe_search(timings)
        return hits, timings

    def locate(self, image_id: str) -> tuple[Path, dict[str, Any]]:
        """The real path and payload of an indexed image that may be served (for an image read from a tar shard:
        the shard's path; `image` reads the member)."""
        found = self.store.retrieve([image_id])
        if not found:
            raise UnknownImageError([image_id])
        payload = found[0].payload
        if from_shard(payload):
            return self.guard.resolve_shard(image_id, payload["shard"], payload.get("real_dir")), payload
        return self.guard.resolve(image_id, found[0].path, payload.get("real_dir")), payload

    def image(self, image_id: str) -> tuple[Path | bytes, dict[str, Any]]:
        """What to send for an image: its file's path, or the bytes of its member read from the shard (within
        ``decode.max_file_mb``)."""
        source, payload = self.locate(image_id)
        if not from_shard(payload):
            return source, payload
        try:
            return self._member(source, payload), payload
        except DecodeError as exc:
            raise NotServableError(image_id, exc.reason) from None

    def _member(self, shard: Path, payload: dict[str, Any]) -> bytes:
        from indexer.sources.shards import read_member

        return read_member(shard, str(payload["key"]), self.thumbs.limits)

    def thumbnail(self, image_id: str) -> Path:
        """The cached thumbnail file of an indexed image, made now if missing."""
        source, payload = self.locate(image_id)
        read = functools.partial(self._member, source, payload) if from_shard(payload) else None
        try:
            path, hit = self.thumbs.get(source, str(payload.get("sha256", "")), read)
        except DecodeError as exc:
            raise NotServableError(image_id, exc.reason) from None
        self.metrics.thumbnails.labels("hit" if hit else "miss").inc()
        return path

    def count(self) -> int:
        """Images in the index (0 before the first one)."""
        return self.store.count() if self.store.model_info() is not None else 0

    def warm_up(self) -> None:
        """Build the model and run one text through it, so the first query is as fast as the others.

        Call it on the engine thread: ``service.executor.submit(service.warm_up).result()``.
        """
        info = self.store.model_info()
        if info is not None:
            check_store_model(self.store, self.model.model_id)
        self.model.get().encode_texts(["a photo"])


def from_shard(payload: dict[str, Any]) -> bool:
    """Whether a point's image is a member of a tar shard (its payload names the shard and the sample's key)."""
    return isinstance(payload.get("shard"), str) and isinstance(payload.get("key"), str)


def engine_thread_init(threads: int) -> None:
    """Runs once in the engine thread: its torch thread count (serve.threads; 0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def default_thumbnail_dir(settings: Settings) -> Path:
    """serve.thumbnail_dir, else a "thumbnails" folder beside the embedded store, else the user cache dir."""
    if settings.serve.thumbnail_dir:
        return Path(settings.serve.thumbnail_dir).expanduser()
    if not settings.store.qdrant_url:
        return settings.store.dir.parent / "thumbnails"
    return cache_dir() / "thumbnails"
