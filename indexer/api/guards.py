"""ASGI middleware of the app (`indexer serve` and the watch daemon): metrics and security headers, Host and key
checks, body size; the API key and bind checks. The checks themselves are `indexer.api.httpcheck`'s."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from indexer.api.httpcheck import check_access, check_media, declared_length, is_loopback, too_large
from indexer.api.service import Metrics
from indexer.daemon.pointpage import MEDIA_TYPE as POINTS
from indexer.errors import (
    AccessError,
    ConfigError,
    IndexerError,
    PayloadTooLargeError,
    UnauthorizedError,
    body_for,
    http_status_for,
)
from indexer.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SETTING = "serve.max_upload_mb"
PUBLIC_PATHS = frozenset({"/", "/static/app.js", "/static/style.css", "/healthz"})
# The body each POST route takes: JSON for these and every other control route (/control/...), a page of points for
# an upsert. Any other declared type is a 415 (a cross-origin page can post text/plain or a form without asking first).
JSON = "application/json"
BODY_TYPES = {"/search": JSON, "/control/store/upsert": POINTS}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def body_type(path: str) -> str | None:
    """The media type a POST to ``path`` must declare (None: the route checks its own body, as a form's)."""
    return BODY_TYPES.get(path, JSON if path.startswith("/control/") else None)


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


def check_bind(host: str, api_key: str) -> None:
    """Refuse to listen on a non-loopback address without an API key."""
    if not api_key and not is_loopback(host):
        raise ConfigError(
            "serve.host",
            f"binding {host} exposes the index to the network: set an API key "
            "(serve.api_key, serve.api_key_file or --api-key-file), or bind 127.0.0.1",
        )


# ---------------------------------------------------------------------------------------------------------
# ASGI middleware: metrics, host and key checks, body size
# ---------------------------------------------------------------------------------------------------------


async def _send_error(send: Send, exc: IndexerError, headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body_for(exc)).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": http_status_for(exc), "headers": base + headers})
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
    route except the page, its static files and /healthz. The key is compared in constant time. A POST to a
    route of `BODY_TYPES` or a control route must declare the body that route takes (415 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        try:
            check_access(host, headers.get(b"authorization", b""), self.key, scope["path"] in PUBLIC_PATHS)
            wanted = body_type(scope["path"]) if scope["method"] == "POST" else None
            if wanted is not None:
                check_media(headers.get(b"content-type", b"").decode("latin-1"), wanted)
        except UnauthorizedError as exc:
            await _send_error(send, exc, [(b"www-authenticate", b'Bearer realm="indexer"')])
            return
        except AccessError as exc:
            await _send_error(send, exc, [])
            return
        await self.app(scope, receive, send)


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
        declared = dict(scope.get("headers", [])).get(b"content-length")
        try:
            size = declared_length(None if declared is None else declared.decode("latin-1"), self.limit, SETTING)
        except PayloadTooLargeError:
            if declared is not None and int(declared) <= self.limit + self.DRAIN_MAX:
                await self._drain(receive, 0)
            await self._refuse(send)
            return
        except ConfigError as exc:
            await _send_error(send, exc, [(b"connection", b"close")])
            return
        if size is not None:
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
        await _send_error(send, too_large(self.limit, SETTING), [(b"connection", b"close")])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then defers to the server's (for disconnects)."""
    sent = [False]

    async def replayed() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
