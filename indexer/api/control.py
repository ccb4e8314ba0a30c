"""The control routes: what the CLI asks the process that owns the embedded store instead of opening it.

    GET  /control/status                  what ``indexer status`` prints, plus the owner (daemon or server)
    POST /control/search                  ``indexer search`` (the query codec of `indexer.daemon.client`)
    POST /control/index                   ``indexer index PATH...``: queued, run by the owner (202)
    GET  /control/index/{job_id}          its progress and, once done, its summary
    GET  /control/store                   the store's location, model and dim
    POST /control/store/{operation}       count, retrieve, scroll, find_by_sha256, upsert, delete, set_payload,
                                          flush: the store primitives ``dedup``, ``cluster``, ``export`` and
                                          ``import`` run over (`indexer.daemon.remote.RemoteStore`)

Requests are JSON, but for points: retrieve, scroll and find_by_sha256 answer, and upsert takes, a page of points
(`indexer.daemon.pointpage`: ids and payloads in a JSON header, the vectors in one float32 block). They show and
change the library, so on top of the app's own checks (Host, key, body type and size: `indexer.api.guards`) they
answer only clients on this machine, through a loopback Host header, whatever the bind address or key; a refused
client gets the same 404 as an unknown path. Work runs on the app's engine thread, as every route's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.api.control_models import (
    CountIn,
    HashesIn,
    IdsIn,
    IndexJobOut,
    IndexRequest,
    Many,
    PayloadIn,
    ScrollIn,
    SearchRequest,
    StoreInfoOut,
)
from indexer.api.httpcheck import check_host
from indexer.api.service import Service
from indexer.daemon.indexjobs import IndexJob, IndexJobs
from indexer.daemon.pointpage import MEDIA_TYPE, PageError, decode_page, encode_page
from indexer.errors import UnknownJobError
from indexer.records import StoredPoint
from indexer.store.status import store_status

PREFIX = "/control"
CURSOR_IDLE = 300.0  # seconds an unread scroll cursor is kept
MAX_CURSORS = 64


class Owner(Protocol):
    """What the app asks the process that owns the store, beyond the store itself."""

    jobs: IndexJobs

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, fields added to /healthz)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The fields `indexer status` shows about the owner: {"daemon": {...}} or {"server": {...}}."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus text of the owner's own metrics (appended to /metrics)."""
        ...


def local_only(request: Request) -> None:
    """A client on this machine, through a loopback Host header: anything else is told nothing is here."""
    client = request.client.host if request.client else ""
    if not (client == "::1" or client.startswith("127.") or client.startswith("::ffff:127.")):
        raise StarletteHTTPException(404, "Not Found")
    check_host(request.headers.get("host", ""))


class Cursors:
    """Open scrolls of the store, by id; one idle for CURSOR_IDLE seconds is dropped."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Iterator[StoredPoint], float]] = {}
        self._lock = threading.Lock()

    def open(self, points: Iterator[StoredPoint]) -> str:
        cursor = uuid.uuid4().hex
        with self._lock:
            now = time.monotonic()
            for old in [c for c, (_, at) in self._open.items() if now - at > CURSOR_IDLE]:
                del self._open[old]
            if len(self._open) >= MAX_CURSORS:
                del self._open[min(self._open, key=lambda c: self._open[c][1])]
            self._open[cursor] = (points, now)
        return cursor

    def page(self, cursor: str, size: int) -> tuple[list[StoredPoint], str | None]:
        with self._lock:
            found = self._open.pop(cursor, None)
        if found is None:
            raise UnknownJobError(cursor)
        points = [p for _, p in zip(range(size), found[0], strict=False)]
        if len(points) < size:
            return points, None
        with self._lock:
            self._open[cursor] = (found[0], time.monotonic())
        return points, cursor


def add_control_routes(app: FastAPI, service: Service, owner: Owner) -> None:
    """Add the control routes (local clients only) to the owner's app."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(local_only)], include_in_schema=False)
    _add_reading(router, service, owner)
    _add_store(router, service)
    app.include_router(router)


def _job_out(job: IndexJob) -> IndexJobOut:
    summary = job.summary.as_dict() if job.summary is not None else None
    return IndexJobOut(
        id=job.id, state=job.state, phase=job.phase, done=job.done, total=job.total, paths=job.paths,
        error=job.error, summary=summary,
    )  # fmt: skip


def _add_reading(router: APIRouter, service: Service, owner: Owner) -> None:
    @router.get("/status")
    async def status(failures: Annotated[int, Query(ge=0, le=10_000)] = 10) -> dict[str, Any]:
        found = await service.run(store_status, service.store, failures)
        return {**found, **owner.describe()}

    @router.post("/search")
    async def search(request: Request, body: SearchRequest) -> dict[str, Any]:
        query = await service.decode_uploads(body.query.to_query())
        hits, _ = await service.run(service.search, query)
        return {"hits": [{"id": h.id, "score": h.score, "payload": h.payload} for h in hits]}

    @router.post("/index", status_code=202)
    async def index(body: IndexRequest) -> IndexJobOut:
        return _job_out(owner.jobs.submit(body.paths))

    @router.get("/index/{job_id}")
    async def index_job(job_id: Annotated[str, PathParam(pattern=r"^[0-9a-fA-F]{32}$")]) -> IndexJobOut:
        return _job_out(owner.jobs.get(job_id))


def _add_store(router: APIRouter, service: Service) -> None:
    store, cursors = service.store, Cursors()

    @router.get("/store")
    async def info() -> StoreInfoOut:
        model = await service.run(store.model_info)
        return StoreInfoOut(location=store.location, model=model[0] if model else None, dim=model[1] if model else None)

    @router.post("/store/count")
    async def count(body: CountIn) -> int:
        flt = body.filter.to_filter() if body.filter else None
        return await service.run(lambda: store.count(flt) if store.model_info() else 0)

    @router.post("/store/retrieve")
    async def retrieve(body: IdsIn) -> Response:
        return _page_out(await service.run(store.retrieve, body.ids, body.with_vectors))

    @router.post("/store/find_by_sha256")
    async def by_sha256(body: HashesIn) -> Response:
        return _page_out(await service.run(store.find_by_sha256, body.sha256s, body.with_vectors))

    @router.post("/store/scroll")
    async def scroll(body: ScrollIn) -> Response:
        def page() -> tuple[list[StoredPoint], str | None]:
            cursor = body.cursor
            if cursor is None:
                flt = body.filter.to_filter() if body.filter else None
                cursor = cursors.open(store.scroll(filter=flt, with_vectors=body.with_vectors))
            return cursors.page(cursor, body.batch_size)

        return _page_out(*(await service.run(page)))

    @router.post("/store/upsert")
    async def upsert(request: Request) -> None:
        model = await service.run(store.model_info)
        points = _points_to_upsert(await request.body(), model[1] if model else None)
        await service.run(store.upsert, points)

    @router.post("/store/delete")
    async def delete(body: IdsIn) -> None:
        await service.run(store.delete, body.ids)

    @router.post("/store/set_payload")
    async def set_payload(body: PayloadIn) -> None:
        await service.run(store.set_payload, body.ids, body.payload)

    @router.post("/store/flush")
    async def flush() -> None:
        await service.run(store.flush)


def _page_out(points: list[StoredPoint], cursor: str | None = None) -> Response:
    return Response(encode_page(points, cursor), media_type=MEDIA_TYPE)


def _points_to_upsert(body: bytes, dim: int | None) -> list[StoredPoint]:
    """The points of an upsert's body: a page (`indexer.daemon.pointpage`) whose every point has a vector of the
    store's length; anything else is a 422 naming the part that is wrong."""
    try:
        points = decode_page(body, Many).points
        for i, point in enumerate(points):
            if point.vector is None:
                raise PageError(f"points[{i}].vector", "false, but an upsert needs every point's vector")
            if dim is not None and len(point.vector) != dim:
                raise PageError("dim", f"{len(point.vector)}, but the store's vectors have {dim}")
    except PageError as exc:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", exc.where), "msg": exc.reason}]) from None
    return points
