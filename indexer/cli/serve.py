"""`indexer serve`: the HTTP search service and its web page."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from pathlib import Path
from typing import Any

from indexer.cli.common import EXIT_OK, common_options, model_options
from indexer.errors import ConfigError
from indexer.settings import Settings

log = logging.getLogger(__name__)

FLAGS = {  # flag → setting, applied by main()
    "host": "serve.host",
    "port": "serve.port",
    "api_key_file": "serve.api_key_file",
    "roots": "serve.roots",
}


def register(sub: Any) -> None:
    """Add `serve` to the parser."""
    p = sub.add_parser("serve", help="serve the search API and web page over the store (HTTP)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key-file", metavar="FILE", help="file holding the bearer token clients must send")
    p.add_argument(
        "--root", dest="roots", action="append", type=_absolute, metavar="DIR", help="folder whose files may be sent"
    )
    common_options(p)
    model_options(p)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Check the address and key, open the store, load the model, then serve until Ctrl-C / SIGTERM."""
    from indexer.api.guards import check_bind, resolve_api_key

    if not args.verbose:  # a long-running command: serve's log level comes from the settings
        logging.getLogger("indexer").setLevel(settings.log_level)
    key = resolve_api_key(settings.serve)
    check_bind(settings.serve.host, key)  # before anything slow: a refused address fails in a moment
    _check_port_free(settings.serve.host, settings.serve.port)
    return _run(settings, key)


def _absolute(folder: str) -> str:
    return str(Path(folder).expanduser().absolute())


def _check_port_free(host: str, port: int) -> None:
    """A taken address fails now, not after the model has loaded (uvicorn only finds out when it binds)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as exc:
        raise ConfigError("serve.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class _Terminated(Exception):
    """SIGTERM arrived; raised from the signal handler uvicorn re-raises after its graceful shutdown."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _run(settings: Settings, key: str) -> int:
    from indexer.api.routes import create_app
    from indexer.api.server import build_server, limits_from
    from indexer.ingest.pipeline import store_from_settings
    from indexer.model.lazy import LazyModel

    model = LazyModel(settings.model)
    with store_from_settings(settings) as store:
        app = create_app(settings, store, model, api_key=key)
        service = app.state.service
        service.executor.submit(service.warm_up).result()  # on the engine thread, which runs every query
        server = build_server(
            app,
            settings.serve.host,
            settings.serve.port,
            limits=limits_from(settings.serve),
            log_level=settings.log_level,
            access_log=settings.log_level == "DEBUG",
        )
        _serve_until_stopped(server)
    model.close()
    return EXIT_OK


def _serve_until_stopped(server: Any) -> None:
    """Run uvicorn; Ctrl-C and SIGTERM stop it gracefully and return here, so the store is closed cleanly.

    (uvicorn shuts down on the signal, then raises it again with the previous handler in place: ours.)
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.run()
    except (KeyboardInterrupt, _Terminated):
        log.info("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
