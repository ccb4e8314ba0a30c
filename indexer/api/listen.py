"""Running the one HTTP app of the process that owns the store: uvicorn on a socket bound here first.

The server's options and limits (header and body deadlines, the connection cap) are `indexer.api.server`'s, for
the app of `indexer serve` and of `indexer watch` alike. The socket is bound before anything slow starts, so a
taken port fails at once with a clear message and port 0 gets its real number for the advert
(`indexer.daemon.client.advertise`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from indexer.errors import ConfigError

if TYPE_CHECKING:
    from indexer.api.server import ServeLimits

log = logging.getLogger(__name__)

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a client on this machine reaches a wildcard bind on loopback
START_WAIT = 30.0


def bind(host: str, port: int, setting: str) -> socket.socket:
    """A listening-ready TCP socket on host:port (0: any free port); ConfigError naming ``setting`` if taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """The URL a client on this machine reaches the socket at (a wildcard bind through loopback)."""
    host, port = sock.getsockname()[:2]
    host = WILDCARDS.get(str(host), str(host))
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class Listener:
    """uvicorn serving ``app`` on a bound socket: `run` in this thread (``indexer serve``) or `start` in one of its
    own (the watch daemon); `stop` ends it gracefully."""

    def __init__(self, app: Any, sock: socket.socket, log_level: str, limits: ServeLimits | None = None) -> None:
        from indexer.api.server import build_server

        self.app, self.sock = app, sock
        self.url = url_of(sock)
        self.server = build_server(app, limits=limits, log_level=log_level, access_log=log_level.upper() == "DEBUG")
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until stopped (uvicorn's own signal handling applies in the main thread)."""
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        """Serve in a thread of its own; returns once the server answers."""
        self._thread = threading.Thread(target=self.run, name="indexer-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_WAIT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("serve", f"the HTTP server at {self.url} did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.sock.close()
