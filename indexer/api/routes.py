"""The routes of the service and its error handlers; `create_app` wires them with the middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer import __version__
from indexer.api.control import Owner, add_control_routes
from indexer.api.guards import AccessMiddleware, BodyLimitMiddleware, MetricsMiddleware, resolve_api_key
from indexer.api.models import (
    UUID_PATTERN,
    ErrorOut,
    Health,
    IdParam,
    Paging,
    SearchIn,
    SearchOut,
    TextSearchParams,
    max_body_bytes,
    search_out,
    to_filter,
    to_query,
)
from indexer.api.review import add_review_routes
from indexer.api.service import (
    DecodeGate,
    FileGuard,
    Metrics,
    Service,
    default_thumbnail_dir,
    engine_thread_init,
)
from indexer.api.thumbs import ThumbnailCache
from indexer.decode.limits import decode_limits
from indexer.errors import (
    INTERNAL_ERROR,
    ConfigError,
    IndexerError,
    ServiceBusyError,
    body_for,
    error_body,
    http_status_for,
)
from indexer.formats import MEDIA_TYPES
from indexer.model.lazy import LazyModel
from indexer.search import Query as SearchQuery
from indexer.settings import Settings
from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)

WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
_STATUSES = frozenset(s.value for s in HTTPStatus)
# The page loads nothing from elsewhere: scripts, styles, images and fetches stay on this origin.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _web_file(name: str) -> bytes:
    return (resources.files("indexer") / "web" / name).read_bytes()


def create_app(
    settings: Settings,
    store: VectorStore,
    model: LazyModel,
    *,
    api_key: str | None = None,
    thumbnail_dir: Path | None = None,
    owner: Owner | None = None,
    page: bool = True,
) -> FastAPI:
    """The FastAPI app over an open store and a (lazy) model; the caller owns and closes both.

    api_key: None reads it from the settings (serve.api_key_file, serve.api_key); '' means no key.
    owner: the process owning the store (`indexer watch`, `indexer serve`) adds the control routes and its health
    and metrics. page: False leaves out the page, the search API, the files and the review routes (`indexer watch`
    without --serve: /healthz, /metrics and the control routes only).
    """
    key = resolve_api_key(settings.serve) if api_key is None else api_key
    limits = decode_limits(settings, max_file_bytes=max_body_bytes(settings))
    service = Service(
        settings=settings,
        store=store,
        model=model,
        guard=FileGuard(settings.serve.roots),
        thumbs=ThumbnailCache(
            thumbnail_dir or default_thumbnail_dir(settings),
            settings.serve.thumbnail_size,
            decode_limits(settings),
        ),
        limits=limits,
        metrics=Metrics(),
        executor=ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="indexer-engine",
            initializer=engine_thread_init,
            initargs=(settings.serve.threads,),
        ),
        gate=DecodeGate(settings.serve.max_decodes),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.gate.pool.shutdown(wait=True)
        service.executor.shutdown(wait=True)

    app = FastAPI(
        title="indexer",
        version=__version__,
        description="Search indexed images by text, by image, or both; positive and negative examples; filters.",
        docs_url=None,  # the Swagger/ReDoc pages load from a CDN: the schema is at /openapi.json
        redoc_url=None,
        lifespan=lifespan,
        responses={400: {"model": ErrorOut}},
    )
    app.state.service = service
    _add_error_handlers(app)
    if page:
        _add_page_routes(app)
        _add_search_routes(app, service)
        _add_file_routes(app, service)
    _add_ops_routes(app, service, owner)
    if page:
        add_review_routes(app, service, key)
    if owner is not None:
        add_control_routes(app, service, owner)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes(settings))
    app.add_middleware(AccessMiddleware, api_key=key)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: sees every answer
    return app


def validation_message(errors: list[Any]) -> str:
    """One line naming each invalid field: 'invalid request: query.limit: Input should be ...; ...'."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + ("; ..." if len(errors) > 5 else "")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTPStatus(exc.status_code).phrase.replace(" ", "") if exc.status_code in _STATUSES else "HTTPError"
        return JSONResponse(error_body(kind, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder([{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()])
        body = error_body("ValidationError", validation_message(errors), errors=errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(IndexerError)
    async def indexer_error(request: Request, exc: IndexerError) -> JSONResponse:
        status = http_status_for(exc)
        log.log(logging.WARNING if status >= 500 else logging.DEBUG, "%s %s: %s", request.method, request.url.path, exc)
        headers = {"retry-after": str(exc.retry_after)} if isinstance(exc, ServiceBusyError) else None
        return JSONResponse(body_for(exc), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(INTERNAL_ERROR, status_code=500)


def _add_page_routes(app: FastAPI) -> None:
    page, assets = _web_file("index.html"), {name: _web_file(name) for name in WEB_FILES}
    csp = {"content-security-policy": PAGE_CSP, "cache-control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=csp)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in assets:
            return JSONResponse(error_body("NotFound", "not found"), status_code=404)
        return Response(assets[name], media_type=WEB_FILES[name], headers=csp)


def _add_search_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 409, 413, 422, 503)}

    @app.get("/search", response_model=SearchOut, responses=errors, summary="Search by text")
    async def search_text(request: Request, params: Annotated[TextSearchParams, Query()]) -> SearchOut:
        limit, threshold = settings.search.resolve(params.limit, params.threshold)
        query = SearchQuery(
            texts=(params.q,),
            negative_texts=tuple(params.not_),
            limit=limit,
            offset=params.offset,
            threshold=threshold,
            filter=to_filter(params, settings.serve.roots),
            sort=params.sort,
        )
        return search_out(request, await service.run(service.search, query))

    @app.post("/search", response_model=SearchOut, responses=errors, summary="Search by examples and filters")
    async def search_examples(request: Request, body: SearchIn) -> SearchOut:
        query = await service.decode_uploads(to_query(body, settings))
        return search_out(request, await service.run(service.search, query))

    @app.post("/search/image", response_model=SearchOut, responses=errors, summary="Images like this one")
    async def search_image(
        request: Request,
        paging: Annotated[Paging, Query()],
        file: Annotated[UploadFile | None, File(description="an image")] = None,
        id: Annotated[str | None, Form(pattern=UUID_PATTERN, description="an indexed image's id")] = None,
    ) -> SearchOut:
        if (file is None) == (id is None):
            raise ConfigError("query", "give either an uploaded image (file) or the id of an indexed image (id)")
        data = await file.read() if file is not None else b""
        limit, threshold = settings.search.resolve(paging.limit, paging.threshold)
        query = SearchQuery(
            uploads=(data,) if file is not None else (),
            ids=(id.lower(),) if id is not None else (),
            limit=limit,
            offset=paging.offset,
            threshold=threshold,
        )
        query = await service.decode_uploads(query)
        return search_out(request, await service.run(service.search, query))


def _add_file_routes(app: FastAPI, service: Service) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 422, 503)}

    @app.get("/images/{image_id}", responses=errors, response_class=FileResponse, summary="The image file")
    async def image(image_id: IdParam) -> Response:
        found, payload = await service.run(service.image, image_id.lower())
        media = MEDIA_TYPES.get(str(payload.get("format", "")).upper(), "application/octet-stream")
        headers = {"cache-control": "private, max-age=3600", "content-security-policy": "default-src 'none'"}
        if isinstance(found, bytes):  # a member of a tar shard
            return Response(found, media_type=media, headers={**headers, "content-disposition": "inline"})
        return FileResponse(found, media_type=media, headers=headers, content_disposition_type="inline")

    @app.get("/images/{image_id}/thumbnail", responses=errors, response_class=FileResponse, summary="A thumbnail")
    async def thumbnail(image_id: IdParam) -> FileResponse:
        path = await service.run(service.thumbnail, image_id.lower())
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})


def _add_ops_routes(app: FastAPI, service: Service, owner: Owner | None) -> None:
    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorOut}}, summary="Liveness")
    async def healthz() -> Any:
        if owner is None:
            return Health(status="ok", images=await service.run(service.count), version=__version__)
        status, fields = owner.health()  # answered while the store opens: the owner's own state, no store call
        return JSONResponse({"version": __version__, **fields}, status_code=status)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        service.metrics.images.set(await service.run(service.count))
        text = generate_latest(service.metrics.registry) + (owner.metrics_text() if owner is not None else b"")
        return Response(text, media_type=CONTENT_TYPE_LATEST)
