"""The service: everything the routes do, on one engine thread; which files may be sent; its metrics."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from indexer.errors import DecodeError, NotServableError, UnknownImageError
from indexer.formats import SUPPORTED_EXTENSIONS
from indexer.model import LazyModel
from indexer.records import DecodeLimits, Hit
from indexer.search import Query as SearchQuery
from indexer.search import Timings, check_store_model, timed_search
from indexer.settings import Settings
from indexer.store import VectorStore
from indexer.thumbs import ThumbnailCache

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------
# Which files may be sent
# ---------------------------------------------------------------------------------------------------------


class FileGuard:
    """Decides whether an indexed file may be sent: its real path must lie inside a served root.

    With no roots configured, each file is confined to the real path of its own recorded folder, so a file
    replaced by a symlink leading elsewhere is refused. Paths come from the store, never from the request.
    """

    def __init__(self, roots: list[str]) -> None:
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]

    def resolve(self, image_id: str, recorded: str) -> Path:
        """The real path to send for a recorded path, or NotServableError saying why not."""
        path = Path(recorded)
        if not recorded or not path.is_absolute() or ".." in path.parts or "\x00" in recorded:
            raise NotServableError(image_id, "the recorded path is not a clean absolute path")
        real = Path(os.path.realpath(path))
        allowed = self.roots or [Path(os.path.realpath(path.parent))]
        if not any(real.is_relative_to(root) for root in allowed):
            raise NotServableError(image_id, "the file lies outside the served folders (serve.roots)")
        if real.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise NotServableError(image_id, "not an image file")
        if not real.is_file():
            raise NotServableError(image_id, "the file is no longer on disk")
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

    def observe_search(self, timings: Timings) -> None:
        self.search_stage.labels("encode").observe(timings.encode)
        self.search_stage.labels("store").observe(timings.store)


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

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread and wait for it without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

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
        """The real path and payload of an indexed image that may be served."""
        found = self.store.retrieve([image_id])
        if not found:
            raise UnknownImageError([image_id])
        return self.guard.resolve(image_id, found[0].path), found[0].payload

    def thumbnail(self, image_id: str) -> Path:
        """The cached thumbnail file of an indexed image, made now if missing."""
        source, payload = self.locate(image_id)
        try:
            path, hit = self.thumbs.get(source, str(payload.get("sha256", "")))
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
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "indexer" / "thumbnails"
