"""The HTTP search service (`indexer serve`): FastAPI over the same store and model as the CLI.

    GET  /                        the web page (indexer/web: index.html, app.js, style.css; no CDN, no build step)
    GET  /search?q=TEXT           text search, with `not`, filters, limit, offset, threshold as query parameters
    POST /search                  JSON: positive and negative examples (texts, indexed image ids, base64 images),
                                  metadata filters, limit, offset, threshold
    POST /search/image            multipart: an uploaded image (`file`) or an indexed image's id (`id`)
    GET  /images/{id}             the indexed file itself, only from inside the served roots
    GET  /images/{id}/thumbnail   a JPEG thumbnail, cached on disk by content hash and size
    GET  /healthz                 liveness and the number of indexed images (never needs the key)
    GET  /metrics                 Prometheus metrics (per-app registry)
    GET  /openapi.json            the OpenAPI schema

Security: without an API key the service answers only requests whose Host is a loopback name (a DNS-rebinding
guard; `indexer serve` refuses to bind another address without a key). With a key, every route but the page, its
static files and /healthz needs ``Authorization: Bearer KEY``. Request bodies are capped (`serve.max_upload_mb`).
Files are served only for ids the store holds, and only when their real path (symlinks resolved) lies inside a
served root.

Errors: every IndexerError maps to one HTTP status in `STATUS_FOR` (bad input is always a 4xx with a message);
request validation errors are 422 with FastAPI's field list.

Concurrency: the model is not thread-safe and decoding uses process-global Pillow state, so all model, decode and
store work runs on one engine thread; the event loop only parses requests and streams files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer import __version__
from indexer.decode import SUPPORTED_EXTENSIONS
from indexer.errors import (
    ConfigError,
    DecodeError,
    IndexerError,
    ModelError,
    ModelMismatchError,
    StoreBusyError,
    StoreError,
)
from indexer.model import LazyModel
from indexer.records import DecodeLimits, Hit, SearchFilter
from indexer.search import Query as SearchQuery
from indexer.search import Sort, Timings, UnknownImageError, check_store_model, timed_search
from indexer.settings import ServeSettings, Settings
from indexer.store import VectorStore
from indexer.thumbs import ThumbnailCache

log = logging.getLogger(__name__)

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MAX_LIMIT = 1000
MAX_OFFSET = 100_000
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
PUBLIC_PATHS = frozenset({"/", "/static/app.js", "/static/style.css", "/healthz"})
WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
_STATUSES = frozenset(s.value for s in HTTPStatus)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# The page loads nothing from elsewhere: scripts, styles, images and fetches stay on this origin.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class NotServableError(IndexerError):
    """An indexed file that the service will not send: outside the served roots, gone, or not an image file."""

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(f"image {image_id} cannot be served: {reason}")
        self.image_id = image_id
        self.reason = reason


class PayloadTooLargeError(IndexerError):
    """A request body or an uploaded image above serve.max_upload_mb."""


# Most specific first: the first matching class gives the status.
STATUS_FOR: tuple[tuple[type[IndexerError], int], ...] = (
    (UnknownImageError, 404),
    (NotServableError, 404),
    (PayloadTooLargeError, 413),
    (DecodeError, 422),
    (ModelMismatchError, 409),
    (StoreBusyError, 503),
    (ConfigError, 400),
    (StoreError, 503),
    (ModelError, 503),
)


def status_for(exc: IndexerError) -> int:
    """The HTTP status of an IndexerError (400 for one not listed)."""
    return next((status for cls, status in STATUS_FOR if isinstance(exc, cls)), 400)


# ---------------------------------------------------------------------------------------------------------
# Keys and addresses
# ---------------------------------------------------------------------------------------------------------


def resolve_api_key(serve: ServeSettings) -> str:
    """The API key: the contents of serve.api_key_file when set, else serve.api_key ('' means none)."""
    if not serve.api_key_file:
        return serve.api_key.strip()
    path = Path(serve.api_key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("serve.api_key_file", f"cannot read {path}: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError("serve.api_key_file", f"{path} is empty")
    return key


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost."""
    name = host.strip().lower().strip("[]")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str) -> None:
    """Refuse to listen on a non-loopback address without an API key."""
    if not api_key and not is_loopback(host):
        raise ConfigError(
            "serve.host",
            f"binding {host} exposes the index to the network: set an API key "
            "(serve.api_key, serve.api_key_file or --api-key-file), or bind 127.0.0.1",
        )


def _host_name(header: str) -> str:
    """The host name of a Host header, without the port ('[::1]:8000' → '::1')."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


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
# Request and response models
# ---------------------------------------------------------------------------------------------------------

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
ImageId = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
FormatName = Annotated[str, StringConstraints(pattern=r"^\.?[A-Za-z0-9]{1,10}$")]
Base64Image = Annotated[str, StringConstraints(min_length=1)]
IdParam = Annotated[str, PathParam(pattern=UUID_PATTERN, description="an indexed image's id")]


class Examples(BaseModel):
    """One side of a query: texts, ids of indexed images, and uploaded images (base64 or data: URLs)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(default_factory=list, max_length=16)
    ids: list[ImageId] = Field(default_factory=list, max_length=64)
    images: list[Base64Image] = Field(default_factory=list, max_length=8, description="base64 or data: URL")


class FilterIn(BaseModel):
    """Metadata conditions; all given ones must hold."""

    model_config = ConfigDict(extra="forbid")

    folder: str | None = Field(
        default=None, min_length=1, max_length=4096, description="folder or file path prefix (relative: to the root)"
    )
    formats: list[FormatName] = Field(default_factory=list, max_length=16, description="JPEG, PNG, ...")
    min_width: int | None = Field(default=None, ge=0, le=1_000_000)
    min_height: int | None = Field(default=None, ge=0, le=1_000_000)
    mtime_from: datetime | None = Field(default=None, description="ISO 8601 or unix seconds")
    mtime_to: datetime | None = Field(default=None, description="ISO 8601 or unix seconds")
    cluster: int | None = Field(default=None, ge=0, le=1_000_000, description="a cluster id (`indexer cluster`)")

    @field_validator("folder")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL")
        return value


class SearchIn(BaseModel):
    """A combined query: positive and negative examples, filters, paging."""

    model_config = ConfigDict(extra="forbid")

    positive: Examples = Field(default_factory=Examples)
    negative: Examples = Field(default_factory=Examples)
    filter: FilterIn = Field(default_factory=FilterIn)
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="default: search.limit")
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="minimum cosine score")
    sort: Sort = Field(default="relevance", description="relevance, or newest / oldest (by mtime) first")


class TextSearchParams(FilterIn):
    """Query parameters of GET /search."""

    q: Text = Field(description="what to look for")
    formats: list[FormatName] = Field(default_factory=list, max_length=16, alias="format", description="JPEG, ...")
    not_: list[Text] = Field(default_factory=list, max_length=16, alias="not", description="what to avoid")
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    sort: Sort = "relevance"


class Paging(BaseModel):
    """Query parameters of POST /search/image."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)


class HitOut(BaseModel):
    """One result."""

    id: str
    path: str
    score: float
    width: int | None
    height: int | None
    mtime: float | None
    format: str | None
    thumbnail: str = Field(description="URL of the thumbnail")
    image: str = Field(description="URL of the file")


class SearchOut(BaseModel):
    """Results, best first, and where the time went."""

    hits: list[HitOut]
    encode_ms: float
    store_ms: float


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"]
    images: int
    version: str


class ErrorOut(BaseModel):
    """Every error: a message, the error's kind and, for invalid requests, FastAPI's list of field errors."""

    detail: str
    error: str
    errors: list[dict[str, Any]] | None = None


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


def _engine_thread_init(threads: int) -> None:
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


def max_body_bytes(settings: Settings) -> int:
    return int(settings.serve.max_upload_mb * 1024 * 1024)


# ---------------------------------------------------------------------------------------------------------
# Turning requests into queries, hits into responses
# ---------------------------------------------------------------------------------------------------------


def decode_base64_image(text: str, limit: int) -> bytes:
    """Image bytes from base64 or a data: URL; ConfigError when it is not base64, 413 when too large."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    if len(payload) * 3 // 4 > limit:
        raise PayloadTooLargeError(f"an uploaded image is larger than {limit} bytes (serve.max_upload_mb)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("images", "an uploaded image is not valid base64 (nor a data: URL)") from None


def _timestamp(value: datetime | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        return value.timestamp()
    except (OverflowError, OSError, ValueError):
        raise ConfigError(f"filter.{field}", f"{value} is out of range") from None


def _folder(folder: str | None, roots: list[str]) -> str | None:
    """An absolute folder as given; a relative one under the single served root."""
    if folder is None:
        return None
    if os.path.isabs(folder):
        return os.path.normpath(folder)
    if len(roots) != 1:
        raise ConfigError("filter.folder", "give an absolute folder (relative folders need exactly one serve.roots)")
    return os.path.normpath(os.path.join(os.path.expanduser(roots[0]), folder))


def to_filter(flt: FilterIn, roots: list[str]) -> SearchFilter | None:
    """The store's SearchFilter for a request's filter (None when it has no condition)."""
    start, end = _timestamp(flt.mtime_from, "mtime_from"), _timestamp(flt.mtime_to, "mtime_to")
    if start is not None and end is not None and start > end:
        raise ConfigError("filter.mtime_from", "is after filter.mtime_to")
    result = SearchFilter(
        path_prefix=_folder(flt.folder, roots),
        formats=tuple(flt.formats),
        min_width=flt.min_width,
        min_height=flt.min_height,
        mtime_from=start,
        mtime_to=end,
        cluster=flt.cluster,
    )
    return None if result.is_empty() else result


def to_query(body: SearchIn, settings: Settings) -> SearchQuery:
    """The search module's Query for a POST /search body."""
    limit = max_body_bytes(settings)
    pos, neg = body.positive, body.negative
    return SearchQuery(
        texts=tuple(pos.texts),
        ids=tuple(i.lower() for i in pos.ids),
        uploads=tuple(decode_base64_image(x, limit) for x in pos.images),
        negative_texts=tuple(neg.texts),
        negative_ids=tuple(i.lower() for i in neg.ids),
        negative_uploads=tuple(decode_base64_image(x, limit) for x in neg.images),
        limit=body.limit or settings.search.limit,
        offset=body.offset,
        threshold=body.threshold if body.threshold is not None else settings.search.threshold,
        filter=to_filter(body.filter, settings.serve.roots),
        sort=body.sort,
    )


def _payload_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def hit_out(hit: Hit, root_path: str) -> HitOut:
    """A store hit as the API shows it, with the URLs of its thumbnail and file."""
    mtime = hit.payload.get("mtime")
    fmt = hit.payload.get("format")
    return HitOut(
        id=hit.id,
        path=hit.path,
        score=hit.score,
        width=_payload_int(hit.payload, "width"),
        height=_payload_int(hit.payload, "height"),
        mtime=float(mtime) if isinstance(mtime, int | float) else None,
        format=fmt if isinstance(fmt, str) else None,
        thumbnail=f"{root_path}/images/{hit.id}/thumbnail",
        image=f"{root_path}/images/{hit.id}",
    )


def search_out(request: Request, found: tuple[list[Hit], Timings]) -> SearchOut:
    hits, timings = found
    root = str(request.scope.get("root_path", ""))
    return SearchOut(
        hits=[hit_out(h, root) for h in hits],
        encode_ms=round(timings.encode * 1e3, 3),
        store_ms=round(timings.store * 1e3, 3),
    )


# ---------------------------------------------------------------------------------------------------------
# ASGI middleware: metrics, host and key checks, body size
# ---------------------------------------------------------------------------------------------------------


async def _send_json(send: Send, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + headers})
    await send({"type": "http.response.body", "body": data})


class MetricsMiddleware:
    """Counts requests and times them per route template (unmatched paths share one label); adds security headers."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class AccessMiddleware:
    """Without a key: only loopback Host headers (DNS-rebinding guard). With a key: a bearer token on every
    route except the page, its static files and /healthz. The key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if not self.key:
            host = headers.get(b"host", b"").decode("latin-1")
            if host and not is_loopback(_host_name(host)):
                body = {"detail": f"host {host!r} not allowed: without an API key only localhost is served"}
                await _send_json(send, 403, {**body, "error": "HostNotAllowed"}, [])
                return
        elif scope["path"] not in PUBLIC_PATHS and not self._authorised(headers.get(b"authorization", b"")):
            body = {"detail": "missing or wrong API key: send 'Authorization: Bearer KEY'", "error": "Unauthorized"}
            await _send_json(send, 401, body, [(b"www-authenticate", b'Bearer realm="indexer"')])
            return
        await self.app(scope, receive, send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class BodyLimitMiddleware:
    """Refuses request bodies above `limit` bytes with 413.

    A declared Content-Length is checked at once; a body without one (chunked) is read here, up to the limit,
    and replayed to the app (FastAPI turns errors raised while it reads a body into a 400). Before answering
    413 the rest of the body is read and dropped, up to DRAIN_MAX, so that the client gets the answer instead
    of a connection reset.
    """

    DRAIN_MAX = 64 * 1024 * 1024

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.limit:
                if int(declared) <= self.limit + self.DRAIN_MAX:
                    await self._drain(receive, 0)
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self._refuse(send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None (after draining what is left) when it exceeds the limit."""
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = bool(message.get("more_body", False))
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                return None
        return b"".join(chunks)

    async def _drain(self, receive: Receive, seen: int) -> None:
        while seen <= self.limit + self.DRAIN_MAX:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _refuse(self, send: Send) -> None:
        mb = self.limit / (1024 * 1024)
        body = {"detail": f"request body larger than {mb:g} MiB (serve.max_upload_mb)", "error": "PayloadTooLarge"}
        await _send_json(send, 413, body, [(b"connection", b"close")])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then defers to the server's (for disconnects)."""
    sent = [False]

    async def replayed() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------


def _web_file(name: str) -> bytes:
    return (resources.files("indexer") / "web" / name).read_bytes()


def create_app(
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    *,
    api_key: str | None = None,
    thumbnail_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app over an open store and a (lazy) model; the caller owns and closes both.

    api_key: None reads it from the settings (serve.api_key_file, serve.api_key); '' means no key.
    """
    key = resolve_api_key(settings.serve) if api_key is None else api_key
    limits = DecodeLimits(max_pixels=settings.decode.max_pixels, max_file_bytes=max_body_bytes(settings))
    service = Service(
        settings=settings,
        store=store,
        model=model,
        guard=FileGuard(settings.serve.roots),
        thumbs=ThumbnailCache(
            thumbnail_dir or default_thumbnail_dir(settings),
            settings.serve.thumbnail_size,
            DecodeLimits(settings.decode.max_pixels, int(settings.decode.max_file_mb * 1024 * 1024)),
        ),
        limits=limits,
        metrics=Metrics(),
        executor=ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="indexer-engine",
            initializer=_engine_thread_init,
            initargs=(settings.serve.threads,),
        ),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.executor.shutdown(wait=True)

    app = FastAPI(
        title="indexer",
        version=__version__,
        description="Search indexed images by text, by image, or both; positive and negative examples; filters.",
        docs_url=None,  # the Swagger/ReDoc pages load from a CDN: the schema is at /openapi.json
        redoc_url=None,
        lifespan=lifespan,
        responses={400: {"model": ErrorOut}},
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_page_routes(app)
    _add_search_routes(app, service)
    _add_file_routes(app, service)
    _add_ops_routes(app, service)
    from indexer.review_api import add_review_routes  # imports this module

    add_review_routes(app, service, key)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes(settings))
    app.add_middleware(AccessMiddleware, api_key=key)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: sees every answer
    return app


def validation_message(errors: list[Any]) -> str:
    """One line naming each invalid field: 'invalid request: query.limit: Input should be ...; ...'."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + ("; ..." if len(errors) > 5 else "")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTPStatus(exc.status_code).phrase.replace(" ", "") if exc.status_code in _STATUSES else "HTTPError"
        return JSONResponse({"detail": str(exc.detail), "error": kind}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder([{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()])
        body = {"detail": validation_message(errors), "error": "ValidationError", "errors": errors}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(IndexerError)
    async def indexer_error(request: Request, exc: IndexerError) -> JSONResponse:
        status = status_for(exc)
        log.log(logging.WARNING if status >= 500 else logging.DEBUG, "%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (logged)", "error": "InternalError"}, status_code=500)


def _add_page_routes(app: FastAPI) -> None:
    page, assets = _web_file("index.html"), {name: _web_file(name) for name in WEB_FILES}
    csp = {"content-security-policy": PAGE_CSP, "cache-control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=csp)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in assets:
            return JSONResponse({"detail": "not found", "error": "NotFound"}, status_code=404)
        return Response(assets[name], media_type=WEB_FILES[name], headers=csp)


def _add_search_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 409, 413, 422, 503)}

    @app.get("/search", response_model=SearchOut, responses=errors, summary="Search by text")
    async def search_text(request: Request, params: Annotated[TextSearchParams, Query()]) -> SearchOut:
        query = SearchQuery(
            texts=(params.q,),
            negative_texts=tuple(params.not_),
            limit=params.limit or settings.search.limit,
            offset=params.offset,
            threshold=params.threshold if params.threshold is not None else settings.search.threshold,
            filter=to_filter(params, settings.serve.roots),
            sort=params.sort,
        )
        return search_out(request, await service.run(service.search, query))

    @app.post("/search", response_model=SearchOut, responses=errors, summary="Search by examples and filters")
    async def search_examples(request: Request, body: SearchIn) -> SearchOut:
        return search_out(request, await service.run(service.search, to_query(body, settings)))

    @app.post("/search/image", response_model=SearchOut, responses=errors, summary="Images like this one")
    async def search_image(
        request: Request,
        paging: Annotated[Paging, Query()],
        file: Annotated[UploadFile | None, File(description="an image")] = None,
        id: Annotated[str | None, Form(pattern=UUID_PATTERN, description="an indexed image's id")] = None,
    ) -> SearchOut:
        if (file is None) == (id is None):
            raise ConfigError("query", "give either an uploaded image (file) or the id of an indexed image (id)")
        data = await file.read() if file is not None else b""
        query = SearchQuery(
            uploads=(data,) if file is not None else (),
            ids=(id.lower(),) if id is not None else (),
            limit=paging.limit or settings.search.limit,
            offset=paging.offset,
            threshold=paging.threshold if paging.threshold is not None else settings.search.threshold,
        )
        return search_out(request, await service.run(service.search, query))


def _add_file_routes(app: FastAPI, service: Service) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 422, 503)}

    @app.get("/images/{image_id}", responses=errors, response_class=FileResponse, summary="The image file")
    async def image(image_id: IdParam) -> FileResponse:
        path, payload = await service.run(service.locate, image_id.lower())
        media = MEDIA_TYPES.get(str(payload.get("format", "")).upper(), "application/octet-stream")
        headers = {"cache-control": "private, max-age=3600", "content-security-policy": "default-src 'none'"}
        return FileResponse(path, media_type=media, headers=headers, content_disposition_type="inline")

    @app.get("/images/{image_id}/thumbnail", responses=errors, response_class=FileResponse, summary="A thumbnail")
    async def thumbnail(image_id: IdParam) -> FileResponse:
        path = await service.run(service.thumbnail, image_id.lower())
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})


def _add_ops_routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorOut}}, summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok", images=await service.run(service.count), version=__version__)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        service.metrics.images.set(await service.run(service.count))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
