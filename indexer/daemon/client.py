"""The client side of the control endpoint, and the advert file it is found by.

``indexer search`` and ``indexer status`` ask a running daemon instead of opening the embedded store it holds
(a second opener disturbs the holder). The daemon advertises its address in ``STORE/daemon.json``
({"url", "pid", "roots"}); a request is JSON, tagged where JSON has no type (paths, bytes, the filter); an error
answer carries the service's error body, from which the same exception is rebuilt (`indexer.errors`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from indexer.atomicio import atomic_write_json
from indexer.errors import ConfigError, IndexerError, StoreError, error_from_body
from indexer.model.lazy import LazyModel
from indexer.records import Hit, SearchFilter
from indexer.settings import Settings

ADVERT_FILE = "daemon.json"


# --- the advert ------------------------------------------------------------------------------------------------------


def advertise(path: Path, url: str, roots: Sequence[Path]) -> None:
    """Write this process's advert (replacing any)."""
    atomic_write_json(path, {"url": url, "pid": os.getpid(), "roots": [str(r) for r in roots]})


def remove_advert(path: Path) -> None:
    """Remove the advert if it is this process's (a newer daemon's is left alone)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def advertised(store_dir: Path) -> dict[str, Any] | None:
    """The {"url", "pid"} a daemon advertises in the store directory, or None (no file, or its process is gone:
    a stale file left by kill -9)."""
    try:
        data = json.loads((store_dir / ADVERT_FILE).read_text())
        pid, url = int(data["pid"]), str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return {"url": url, "pid": pid}


def find_daemon(store_dir: Path, timeout: float = 3.0) -> str | None:
    """The control URL of the live daemon holding ``store_dir``, or None (none advertised, its process is gone,
    or it does not answer: the pid was reused)."""
    found = advertised(store_dir)
    if found is None:
        return None
    try:
        with urllib.request.urlopen(found["url"] + "/healthz", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError:
        pass  # it answers, even if unhealthy: it holds the store
    except (urllib.error.URLError, OSError):
        return None
    url: str = found["url"]
    return url


def ask_daemon(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON request to a daemon's control endpoint; its errors come back as IndexerErrors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _daemon_error(exc) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StoreError(f"the watch daemon at {url} holds the store but did not answer: {exc}") from None


def _daemon_error(exc: urllib.error.HTTPError) -> IndexerError:
    try:
        body = json.loads(exc.read())
    except ValueError:
        body = None
    return error_from_body(body, f"the watch daemon answered HTTP {exc.code}")


def search_via_daemon(url: str, settings: Settings, query: Any) -> list[Hit]:
    """``indexer search`` against a store held by a running daemon."""
    model_id = LazyModel(settings.model).model_id
    answer = ask_daemon(url, "POST", "/search", query_to_json(query, model_id, str(settings.store.dir)))
    return [Hit(id=h["id"], score=float(h["score"]), payload=h["payload"]) for h in answer["hits"]]


def status_via_daemon(url: str, failures: int) -> dict[str, Any]:
    """``indexer status`` against a store held by a running daemon."""
    answer: dict[str, Any] = ask_daemon(url, "GET", f"/status?failures={failures}")
    return answer


# --- the query codec ------------------------------------------------------------------------------------------------


def query_to_json(query: Any, model_id: str, store: str) -> dict[str, Any]:
    """A search.Query as the JSON the daemon takes: every field, tagged where JSON has no type for it
    (paths, made absolute; bytes; the filter), so fields added to Query travel without changes here."""
    fields = {f.name: _encode(getattr(query, f.name)) for f in dataclasses.fields(query)}
    return {"store": store, "model": model_id, "query": fields}


def query_from_json(data: dict[str, Any]) -> Any:
    """The search.Query a JSON request describes (fields this version does not know are refused)."""
    from indexer.search import Query

    fields = data.get("query")
    if not isinstance(fields, dict):
        raise ConfigError("query", "the request has no query")
    known = {f.name for f in dataclasses.fields(Query)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError("query", f"this daemon does not know the query fields {', '.join(unknown)}: restart it")
    return Query(**{name: _decode(value) for name, value in fields.items()})


def _encode(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Path):
        return {"$path": str(value.expanduser().absolute())}
    if isinstance(value, bytes):
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, SearchFilter):
        return {"$filter": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == "$path":
            return Path(inner)
        if tag == "$b64":
            return base64.b64decode(inner)
        if tag == "$filter":
            return SearchFilter(**{k: _decode(v) for k, v in inner.items()})
    return value
