"""`indexer serve`: the HTTP search service and its web page."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

from indexer.cli.common import EXIT_OK, common_options, model_options
from indexer.errors import StoreOwnedError
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
    check_bind(settings.serve.host, resolve_api_key(settings.serve))  # before anything slow: refused at once
    _check_not_owned(settings)
    return _run(settings)


def _absolute(folder: str) -> str:
    return str(Path(folder).expanduser().absolute())


def _check_not_owned(settings: Settings) -> None:
    """A store another process owns already (`indexer watch`, another `indexer serve`) is served by it: say where."""
    if settings.store.qdrant_url:
        return
    from indexer.daemon.client import advertised, find_daemon

    url = find_daemon(settings.store.dir)
    found = advertised(settings.store.dir) if url is not None else None
    if found is None:
        return
    if found["page"]:
        where = f"its page and API are at {url}/"
    else:
        where = "restart it with `indexer watch ... --serve` for the page and the API, on the same one port"
    raise StoreOwnedError(
        f"the store at {settings.store.dir} is owned by `indexer {found['kind']}` (pid {found['pid']}), which "
        f"answers at {url}: {where}"
    )


class _Terminated(Exception):
    """SIGTERM arrived; raised from the signal handler uvicorn re-raises after its graceful shutdown."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


class _ServeOwner:
    """`indexer serve` as the owner of its store: index jobs, its health and its place in `indexer status`."""

    def __init__(self, settings: Settings, store: Any, model: Any, url: str) -> None:
        from indexer.daemon.indexjobs import IndexJobs
        from indexer.ingest.pipeline import run_index

        self.url, self.store = url, store
        self.jobs = IndexJobs(lambda paths, job: run_index(paths, settings, store, model, job))

    def health(self) -> tuple[int, dict[str, Any]]:
        images = self.store.count() if self.store.model_info() is not None else 0  # open before the app starts
        return 200, {"status": "ok", "images": images, "pid": os.getpid()}

    def describe(self) -> dict[str, Any]:
        return {"server": {"pid": os.getpid(), "url": self.url}}

    def metrics_text(self) -> bytes:
        return b""


def _run(settings: Settings) -> int:
    from indexer.daemon.client import ADVERT_FILE, advertise, remove_advert
    from indexer.daemon.http import owner_listener, owner_socket
    from indexer.daemon.sharedmodel import SharedModel
    from indexer.store.factory import open_store_from_settings
    from indexer.store.locked import LockedStore

    sock = owner_socket(settings, page=True)  # before anything slow: a taken port fails in a moment
    model = SharedModel(settings.model)
    advert = None if settings.store.qdrant_url else settings.store.dir / ADVERT_FILE
    with LockedStore(lambda: open_store_from_settings(settings)) as store:
        owner = _ServeOwner(settings, store, model, "")
        listener = owner_listener(settings, store, model, owner, page=True, sock=sock)
        owner.url = listener.url
        service = listener.app.state.service
        service.executor.submit(service.warm_up).result()  # on the engine thread, which runs every query
        if advert is not None:
            advertise(advert, listener.url, [], kind="serve", page=True)
        try:
            _serve_until_stopped(listener)
        finally:
            if advert is not None:
                remove_advert(advert)
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
