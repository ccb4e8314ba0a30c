"""Running the FastAPI app under uvicorn with the limits an open socket needs (`indexer serve`, the watch daemon).

uvicorn times out idle keep-alive connections only: a client that connects and sends half its headers, or half its
body, holds a socket (a file descriptor) for ever, and enough of them starve the process of descriptors, so /healthz
and /search stop answering. Here every connection has a deadline for what the client owes:

    connect (or the first byte after a response)  --header_timeout-->  full headers
    full headers                                   --body_timeout-->    full body
    response sent, nothing more                    --keep_alive-->      (uvicorn closes it)

and the number of open connections is capped below the descriptor limit, at the listening socket: at the cap, the
connection idle the longest (no request in progress: a slow or idle client) is closed before another is accepted,
so a new /healthz always gets in; when every connection is busy with a request, a newcomer gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from indexer.settings import ServeSettings

log = logging.getLogger(__name__)

FD_HEADROOM = 64  # descriptors kept for the app itself (image files, thumbnails, the store) beyond its connections
REFUSE_ROOM = 16  # connections accepted beyond the cap (out of the headroom) only to answer 503 when all are busy
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """Deadlines (seconds) and the connection cap of a served app."""

    header_timeout: float = 10.0  # from connecting (or the first byte of a next request) to the end of the headers
    body_timeout: float = 60.0  # from the end of the headers to the end of the body
    keep_alive: int = 5  # idle time allowed between requests on one connection
    max_connections: int = 1000  # lowered to fit the open-files limit (RLIMIT_NOFILE) less FD_HEADROOM


def limits_from(serve: ServeSettings) -> ServeLimits:
    """The limits of the ``[serve]`` settings."""
    return ServeLimits(serve.header_timeout, serve.body_timeout, max_connections=serve.max_connections)


def connection_cap(wanted: int) -> int:
    """``wanted``, or fewer when the open-files limit would run out first (what is open now counts too)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 0
    return max(8, min(wanted, soft - in_use - FD_HEADROOM))


class _Guard:
    """The connections of one server: how many are open (accepted, not yet closed) and the protocols serving them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.protocols: set[_GuardedH11] = set()

    def admit(self) -> bool:
        """Whether the listening socket may accept one more now. At the cap the connection idle the longest is
        closed (its descriptor is free on the next turn of the loop); when all are busy, a few more are accepted,
        only to be refused with 503."""
        if self.open < self.cap:
            return True
        idle = [p for p in self.protocols if p.idle() and not p.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda p: p.waiting_since)
            log.info("%d connections open (the cap): closing the one idle longest, from %s", self.cap, oldest.client)
            oldest.transport.close()
            return False
        return self.open < self.cap + REFUSE_ROOM


class _CappedSocket(socket.socket):
    """The listening socket: accepts only what the guard admits. (asyncio accepts a whole burst before any
    protocol sees its connection, so a cap applied later would come after the descriptors ran out.)"""

    guard: _Guard

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.guard.admit():
            raise BlockingIOError(errno.EAGAIN, "at the connection cap")
        accepted = super().accept()
        self.guard.open += 1
        return accepted


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on what the client owes (class settings: limits, guard)."""

    limits: ClassVar[ServeLimits] = ServeLimits()
    guard: ClassVar[_Guard] = _Guard(1000)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""
        self.waiting_since = time.monotonic()
        super().connection_made(transport)
        self.guard.protocols.add(self)
        if self.guard.open > self.guard.cap:  # accepted while every connection was busy: refuse it
            log.warning("%d connections open (the cap), all busy: refusing one from %s", self.guard.cap, self.client)
            with contextlib.suppress(OSError):
                transport.write(_REFUSED)
            transport.close()
            return
        self._arm("headers", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self in self.guard.protocols:
            self.guard.protocols.discard(self)
            self.guard.open -= 1
        super().connection_lost(exc)

    def idle(self) -> bool:
        """No request in progress: waiting for headers, or an idle keep-alive connection."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _follow(self) -> None:
        """Arm the deadline of what the client owes now; none while the app holds the whole request."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.limits.body_timeout)
        elif state is h11.IDLE and self.conn.trailing_data[0]:  # part of the next request's headers
            if self._phase != "headers":
                self.waiting_since = time.monotonic()
                self._arm("headers", self.limits.header_timeout)
        else:  # DONE (the app has it), or IDLE with nothing sent yet (uvicorn's keep-alive timer runs)
            self.waiting_since = time.monotonic()
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expire, phase, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expire(self, phase: str, seconds: float) -> None:
        self._deadline, self._phase = None, ""
        if not self.transport.is_closing():
            log.info("closing a connection from %s: its %s did not arrive within %g s", self.client, phase, seconds)
            self.transport.close()


class _GuardedServer(uvicorn.Server):
    """uvicorn's server listening on _CappedSockets of its guard (its own bound socket, or sockets bound earlier)."""

    def __init__(self, config: uvicorn.Config, guard: _Guard) -> None:
        super().__init__(config)
        self.guard = guard

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        plain = sockets if sockets is not None else [self.config.bind_socket()]
        await super().serve(sockets=[self._capped(sock) for sock in plain])

    def _capped(self, plain: socket.socket) -> socket.socket:
        capped = _CappedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        capped.guard = self.guard
        return capped


def build_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: ServeLimits | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> uvicorn.Server:
    """A uvicorn server for ``app`` on host:port with ``limits`` (call ``.run()``, or ``.serve()`` in a loop; it
    installs signal handlers only on the main thread). Given sockets bound earlier (``run(sockets=[...])``), it
    serves those instead of host:port, with the same limits."""
    limits = limits or ServeLimits()
    guard = _Guard(connection_cap(limits.max_connections))
    protocol = type("GuardedH11Protocol", (_GuardedH11,), {"limits": limits, "guard": guard})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=limits.keep_alive,
        log_level=log_level.lower(),
        access_log=access_log,
        server_header=False,
        lifespan="on",
        log_config=None,  # uvicorn logs through the process's own handlers (the daemon's JSON lines included)
    )
    return _GuardedServer(config, guard)


def serve_app(app: Any, host: str, port: int, *, limits: ServeLimits | None = None, log_level: str = "info") -> None:
    """Serve ``app`` on host:port with ``limits`` until the server is stopped (Ctrl-C, SIGTERM, ``should_exit``)."""
    build_server(app, host, port, limits=limits, log_level=log_level).run()
