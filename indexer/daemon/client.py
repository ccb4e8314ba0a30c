"""The CLI's side of the control routes (`indexer.api.control`), and the advert file the owner is found by.

Every command asks the process that owns the embedded store (`indexer watch`, `indexer serve`) instead of opening
it (the store opens in one process only, and a second opener disturbs the holder). The owner advertises its address
in ``STORE/daemon.json`` ({"url", "pid", "roots", "kind", "page"}); a request is JSON, tagged where JSON has no type
(bytes, the filter), but points travel both ways as pages (`indexer.daemon.pointpage`: the vectors in one float32
block); an error answer carries the service's error body, from which the same exception is rebuilt
(`indexer.errors`). Image files named in a search are read here and sent as bytes: the owner reads no path a
client names. No torch, no web framework here: `indexer status` and friends stay light.
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
from indexer.daemon.pointpage import MEDIA_TYPE, Page, PageError, decode_page, encode_page
from indexer.errors import ConfigError, IndexerError, StoreError, error_from_body
from indexer.records import Hit, SearchFilter, StoredPoint
from indexer.settings import Settings

ADVERT_FILE = "daemon.json"
JSON = "application/json"


# --- the advert ------------------------------------------------------------------------------------------------------


def advertise(path: Path, url: str, roots: Sequence[Path], *, kind: str = "watch", page: bool = False) -> None:
    """Write this process's advert (replacing any): kind "watch" or "serve"; page: whether it serves the page."""
    data = {"url": url, "pid": os.getpid(), "roots": [str(r) for r in roots], "kind": kind, "page": page}
    atomic_write_json(path, data)


def remove_advert(path: Path) -> None:
    """Remove the advert if it is this process's (a newer daemon's is left alone)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def advertised(store_dir: Path) -> dict[str, Any] | None:
    """The {"url", "pid", "kind", "page"} an owner advertises in the store directory, or None (no file, or its
    process is gone: a stale file left by kill -9)."""
    try:
        data = json.loads((store_dir / ADVERT_FILE).read_text())
        pid, url = int(data["pid"]), str(data["url"])
        kind, page = str(data.get("kind", "watch")), bool(data.get("page", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return {"url": url, "pid": pid, "kind": kind, "page": page}


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


class OwnerGoneError(StoreError):
    """The owner did not answer (it stopped, or was killed, during the request)."""


def ask_daemon(url: str, method: str, path: str, body: Any = None, key: str = "", timeout: float = 600) -> Any:
    """One JSON request to the owner's app; its errors come back as IndexerErrors (OwnerGoneError: no answer)."""
    data = json.dumps(body).encode() if body is not None else None
    _, answer = _exchange(url, method, path, data, JSON, key, timeout)
    try:
        return json.loads(answer)
    except ValueError as exc:
        raise OwnerGoneError(f"the process owning the store at {url} did not answer: {exc}") from None


def _exchange(
    url: str, method: str, path: str, data: bytes | None, media: str, key: str, timeout: float
) -> tuple[str, bytes]:
    """One request with a body of type ``media``: the answer's media type and body."""
    headers = {"Content-Type": media, **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        raise _daemon_error(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise OwnerGoneError(f"the process owning the store at {url} did not answer: {exc}") from None


def _daemon_error(exc: urllib.error.HTTPError) -> IndexerError:
    try:
        body = json.loads(exc.read())
    except ValueError:
        body = None
    return error_from_body(body, f"the process owning the store answered HTTP {exc.code}")


class OwnerClient:
    """The owner of a store, as the CLI asks it: its URL and the API key from the settings (if any)."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url, self.settings = url, settings
        self.key = _api_key(settings)

    def ask(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        return ask_daemon(self.url, method, "/control" + path, body, self.key, timeout)

    def points(self, path: str, body: dict[str, Any], timeout: float = 600) -> Page:
        """The page of points the owner answers a JSON request with (`indexer.daemon.pointpage`)."""
        data = json.dumps(body).encode()
        media, answer = _exchange(self.url, "POST", "/control" + path, data, JSON, self.key, timeout)
        if media != MEDIA_TYPE:
            raise StoreError(
                f"the process owning the store at {self.url} answered {media}, not a page of points: "
                "it runs an older version of the indexer (restart it)"
            )
        try:
            return decode_page(answer)
        except PageError as exc:
            raise StoreError(f"the process owning the store at {self.url} answered a malformed page: {exc}") from None

    def send_points(self, path: str, points: Sequence[StoredPoint], timeout: float = 600) -> None:
        """Send the owner a page of points (an upsert)."""
        _exchange(self.url, "POST", "/control" + path, encode_page(points), MEDIA_TYPE, self.key, timeout)

    def search(self, query: Any) -> list[Hit]:
        """``indexer search`` through the owner (its model: the client loads none)."""
        answer = self.ask("POST", "/search", query_to_json(inline_images(query), None, str(self.settings.store.dir)))
        return [Hit(id=h["id"], score=float(h["score"]), payload=h["payload"]) for h in answer["hits"]]

    def status(self, failures: int) -> dict[str, Any]:
        """``indexer status`` through the owner."""
        answer: dict[str, Any] = self.ask("GET", f"/status?failures={failures}")
        return answer


def _api_key(settings: Settings) -> str:
    """The key the owner's app wants, from the same settings (none: ''); a key file this user cannot read is
    no key (the owner then says what it needs)."""
    serve = settings.serve
    if serve.api_key_file:
        try:
            return Path(serve.api_key_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError:
            return ""
    return serve.api_key.strip()


def owner_of(settings: Settings) -> OwnerClient | None:
    """The running owner of the embedded store the settings name, or None (no owner, or a Qdrant server)."""
    if settings.store.qdrant_url:
        return None
    url = find_daemon(settings.store.dir)
    return OwnerClient(url, settings) if url is not None else None


def inline_images(query: Any) -> Any:
    """The query with the image files it names read here and sent as bytes (uploads), in the same order of
    weight: the owner reads no path a client names. A file that cannot be read is a ConfigError naming it."""
    if not query.images and not query.negative_images:
        return query
    return dataclasses.replace(
        query,
        images=(),
        negative_images=(),
        uploads=(*query.uploads, *(_read(p) for p in query.images)),
        negative_uploads=(*query.negative_uploads, *(_read(p) for p in query.negative_images)),
    )


def _read(path: Path) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError("--image", f"cannot read {path}: {exc.strerror or exc}") from None


# --- the query codec ------------------------------------------------------------------------------------------------


def query_to_json(query: Any, model_id: str | None, store: str) -> dict[str, Any]:
    """A search.Query as the JSON the owner takes: every field, tagged where JSON has no type for it
    (paths, made absolute; bytes; the filter), so fields added to Query travel without changes here."""
    fields = {f.name: _encode(getattr(query, f.name)) for f in dataclasses.fields(query)}
    return {"store": store, "model": model_id, "query": fields}


def query_from_json(data: dict[str, Any]) -> Any:
    """The search.Query a JSON request describes (the owner's side: fields this version does not know are refused,
    every field is checked by `indexer.api.control_models.QueryWire`, image paths are refused)."""
    from indexer.search import Query

    fields = data.get("query")
    if not isinstance(fields, dict):
        raise ConfigError("query", "the request has no query")
    known = {f.name for f in dataclasses.fields(Query)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError("query", f"this owner does not know the query fields {', '.join(unknown)}: restart it")
    from indexer.api.control_models import QueryWire

    return QueryWire.model_validate(fields).to_query()


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
