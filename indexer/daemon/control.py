"""The control server: a small HTTP server in a thread, for Prometheus and for the CLI while the daemon holds the
embedded store.

    GET  /healthz   liveness, phase, roots, queue (any client)
    GET  /metrics   Prometheus exposition (any client)
    GET  /status    what ``indexer status`` prints (clients on this machine, loopback Host only)
    POST /search    a search by ``indexer search`` (the same, and a JSON body within serve.max_upload_mb)

/status and /search show file paths: they answer only clients on this machine, and make the service's checks
(`indexer.api.httpcheck`: a loopback Host header against DNS rebinding, a body declared as JSON against cross-origin
posts, a valid Content-Length within the limit). Every error has the service's body (`indexer.errors.body_for`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qs, urlsplit

from indexer.api.httpcheck import check_host, check_json, declared_length
from indexer.errors import INTERNAL_ERROR, ConfigError, IndexerError, body_for, error_body, http_status_for
from indexer.records import Hit

log = logging.getLogger(__name__)

BODY_SETTING = "serve.max_upload_mb"
DROP_MAX = 1024 * 1024  # bytes of a refused body read and dropped before answering
DROP_SECONDS = 0.2
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a client on this machine reaches a wildcard bind on loopback


class Answer(Exception):
    """A complete answer other than 200 JSON, raised from a route (404, the metrics text)."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


class ControlTarget(Protocol):
    """What the control server asks the daemon."""

    def health(self) -> tuple[int, dict[str, Any]]: ...

    def render_metrics(self) -> tuple[bytes, str]: ...

    def status(self, failures: int) -> dict[str, Any]: ...

    def search(self, request: dict[str, Any]) -> list[Hit]: ...

    def body_limit(self) -> int: ...


class ControlServer:
    """A small HTTP server in a thread: /healthz, /metrics, and (for local clients only) /status and /search."""

    def __init__(self, target: ControlTarget, host: str, port: int) -> None:
        handler = type("Handler", (_ControlHandler,), {"target": target})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError("watch.control_port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        host_text = WILDCARDS.get(host_text, host_text)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        self.url = f"http://{shown}:{bound_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="indexer-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _int_arg(query: str, name: str, default: int) -> int:
    try:
        return int(parse_qs(query).get(name, [str(default)])[0])
    except ValueError:
        raise ConfigError(name, "must be an integer") from None


NOT_FOUND = Answer(404, json.dumps(error_body("NotFound", "not found")).encode(), "application/json")


class _ControlHandler(BaseHTTPRequestHandler):
    target: ControlTarget
    server_version = "indexer-watch"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control: " + format, *args)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self, url: SplitResult) -> Any:
        if url.path == "/healthz":
            status, body = self.target.health()
            if status != 200:
                raise Answer(status, json.dumps(body).encode(), "application/json")
            return body
        if url.path == "/metrics":
            raise Answer(200, *self.target.render_metrics())
        if url.path == "/status":
            self._private()
            return self.target.status(_int_arg(url.query, "failures", 10))
        raise NOT_FOUND

    def _post(self, url: SplitResult) -> Any:
        if url.path != "/search":
            raise NOT_FOUND
        self._private()
        return {"hits": [asdict(h) for h in self.target.search(self._json_body())]}

    def _private(self) -> None:
        """Search and status show file paths: only to clients on this machine, through a loopback Host."""
        client = self.client_address[0]
        if not (client in ("127.0.0.1", "::1") or client.startswith("127.")):
            raise NOT_FOUND
        check_host(self.headers.get("Host", ""))

    def _json_body(self) -> dict[str, Any]:
        try:
            check_json(self.headers.get("Content-Type", ""))
            length = declared_length(self.headers.get("Content-Length"), self.target.body_limit(), BODY_SETTING)
        except IndexerError:
            self._drop_body()
            raise
        raw = self.rfile.read(length) if length else b""
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            raise ConfigError("query", "the body is not JSON") from None
        if not isinstance(request, dict):
            raise ConfigError("query", "the body is not a JSON object")
        return request

    def _drop_body(self) -> None:
        """A refused body: read what the client sent already (briefly, up to DROP_MAX), so that it gets the answer
        rather than a reset, and close the connection after the answer (where the next request starts is unknown)."""
        self.close_connection = True
        self.connection.settimeout(DROP_SECONDS)
        dropped = 0
        try:
            while dropped < DROP_MAX and (chunk := self.rfile.read1(65536)):
                dropped += len(chunk)
        except OSError:  # the timeout: nothing more is coming yet
            pass

    def _answer(self, route: Any) -> None:
        try:
            body = route(urlsplit(self.path))
        except Answer as answer:
            self._send(answer.status, answer.body, answer.content_type)
            return
        except IndexerError as exc:
            self._json(http_status_for(exc), body_for(exc))
            return
        except Exception:
            log.exception("control request %s failed", self.path)
            self._json(500, INTERNAL_ERROR)
            return
        self._json(200, body)

    def _json(self, status: int, body: Any) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
