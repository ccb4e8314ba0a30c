"""The owner's one HTTP app: built over the shared store and model, served on one port.

`indexer watch` serves it in a thread (`start_owner_app`); `indexer serve` in its main thread (`owner_listener`,
then ``run()``). With the page (``--serve``, and always for `indexer serve`) it binds serve.host:serve.port and
the serve.* checks apply (no other address than loopback without an API key); without, it binds
watch.control_host:watch.control_port.
"""

from __future__ import annotations

import socket
from typing import Any

from indexer.api.listen import Listener, bind
from indexer.model.lazy import LazyModel
from indexer.settings import Settings
from indexer.store.protocol import VectorStore


def owner_socket(settings: Settings, *, page: bool) -> socket.socket:
    """The owner's socket, bound now (before anything slow: a refused address or a taken port fails at once)."""
    from indexer.api.guards import check_bind, resolve_api_key

    if page:
        host, port, setting = settings.serve.host, settings.serve.port, "serve.port"
    else:
        host, port, setting = settings.watch.control_host, settings.watch.control_port, "watch.control_port"
    check_bind(host, resolve_api_key(settings.serve))
    return bind(host, port, setting)


def owner_listener(
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    owner: Any,
    *,
    page: bool,
    sock: socket.socket | None = None,
) -> Listener:
    """The app (`indexer.api.routes.create_app` with ``owner``) on ``sock`` (default: `owner_socket`)."""
    from indexer.api.guards import resolve_api_key
    from indexer.api.routes import create_app
    from indexer.api.server import limits_from

    sock = sock if sock is not None else owner_socket(settings, page=page)
    app = create_app(settings, store, model, api_key=resolve_api_key(settings.serve), owner=owner, page=page)
    return Listener(app, sock, settings.log_level, limits_from(settings.serve))


def start_owner_app(settings: Settings, store: VectorStore, model: LazyModel, owner: Any, *, page: bool) -> Listener:
    """`owner_listener`, serving in a thread of its own."""
    listener = owner_listener(settings, store, model, owner, page=page)
    listener.start()
    return listener
