"""Request and response models of the HTTP service, and the conversions between them and the search module."""

from __future__ import annotations

import base64
import binascii
import os
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from indexer.errors import ConfigError, PayloadTooLargeError
from indexer.records import Hit, SearchFilter
from indexer.search import Query as SearchQuery
from indexer.search import Sort, Timings
from indexer.settings import Settings

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MAX_LIMIT = 1000
MAX_OFFSET = 100_000

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
ImageId = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
FormatName = Annotated[str, StringConstraints(pattern=r"^\.?[A-Za-z0-9]{1,10}$")]
Base64Image = Annotated[str, StringConstraints(min_length=1)]
IdParam = Annotated[str, PathParam(pattern=UUID_PATTERN, description="an indexed image's id")]


class Examples(BaseModel):
    """One side of a query: texts, ids of indexed images, and uploaded images (base64 or data: URLs)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(default_factory=list, max_length=16)
    ids: list[ImageId] = Field(default_factory=list, max_length=64)
    images: list[Base64Image] = Field(default_factory=list, max_length=8, description="base64 or data: URL")


class FilterIn(BaseModel):
    """Metadata conditions; all given ones must hold."""

    model_config = ConfigDict(extra="forbid")

    folder: str | None = Field(
        default=None, min_length=1, max_length=4096, description="folder or file path prefix (relative: to the root)"
    )
    formats: list[FormatName] = Field(default_factory=list, max_length=16, description="JPEG, PNG, ...")
    min_width: int | None = Field(default=None, ge=0, le=1_000_000)
    min_height: int | None = Field(default=None, ge=0, le=1_000_000)
    mtime_from: datetime | None = Field(default=None, description="ISO 8601 or unix seconds")
    mtime_to: datetime | None = Field(default=None, description="ISO 8601 or unix seconds")
    cluster: int | None = Field(default=None, ge=0, le=1_000_000, description="a cluster id (`indexer cluster`)")

    @field_validator("folder")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL")
        return value


class SearchIn(BaseModel):
    """A combined query: positive and negative examples, filters, paging."""

    model_config = ConfigDict(extra="forbid")

    positive: Examples = Field(default_factory=Examples)
    negative: Examples = Field(default_factory=Examples)
    filter: FilterIn = Field(default_factory=FilterIn)
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="default: search.limit")
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="minimum cosine score")
    sort: Sort = Field(default="relevance", description="relevance, or newest / oldest (by mtime) first")


class TextSearchParams(FilterIn):
    """Query parameters of GET /search."""

    q: Text = Field(description="what to look for")
    formats: list[FormatName] = Field(default_factory=list, max_length=16, alias="format", description="JPEG, ...")
    not_: list[Text] = Field(default_factory=list, max_length=16, alias="not", description="what to avoid")
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    sort: Sort = "relevance"


class Paging(BaseModel):
    """Query parameters of POST /search/image."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)


class HitOut(BaseModel):
    """One result."""

    id: str
    path: str
    score: float
    width: int | None
    height: int | None
    mtime: float | None
    format: str | None
    thumbnail: str = Field(description="URL of the thumbnail")
    image: str = Field(description="URL of the file")


class SearchOut(BaseModel):
    """Results, best first, and where the time went."""

    hits: list[HitOut]
    encode_ms: float
    store_ms: float


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"]
    images: int
    version: str


class ErrorOut(BaseModel):
    """Every error: a message, the error's kind and, for invalid requests, FastAPI's list of field errors."""

    detail: str
    error: str
    errors: list[dict[str, Any]] | None = None


def max_body_bytes(settings: Settings) -> int:
    """The largest request body the service reads (serve.max_upload_mb)."""
    return int(settings.serve.max_upload_mb * 1024 * 1024)


# ---------------------------------------------------------------------------------------------------------
# Turning requests into queries, hits into responses
# ---------------------------------------------------------------------------------------------------------


def decode_base64_image(text: str, limit: int) -> bytes:
    """Image bytes from base64 or a data: URL; ConfigError when it is not base64, 413 when too large."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    if len(payload) * 3 // 4 > limit:
        raise PayloadTooLargeError(f"an uploaded image is larger than {limit} bytes (serve.max_upload_mb)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("images", "an uploaded image is not valid base64 (nor a data: URL)") from None


def _timestamp(value: datetime | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        return value.timestamp()
    except (OverflowError, OSError, ValueError):
        raise ConfigError(f"filter.{field}", f"{value} is out of range") from None


def _folder(folder: str | None, roots: list[str]) -> str | None:
    """An absolute folder as given; a relative one under the single served root."""
    if folder is None:
        return None
    if os.path.isabs(folder):
        return os.path.normpath(folder)
    if len(roots) != 1:
        raise ConfigError("filter.folder", "give an absolute folder (relative folders need exactly one serve.roots)")
    return os.path.normpath(os.path.join(os.path.expanduser(roots[0]), folder))


def to_filter(flt: FilterIn, roots: list[str]) -> SearchFilter | None:
    """The store's SearchFilter for a request's filter (None when it has no condition)."""
    start, end = _timestamp(flt.mtime_from, "mtime_from"), _timestamp(flt.mtime_to, "mtime_to")
    if start is not None and end is not None and start > end:
        raise ConfigError("filter.mtime_from", "is after filter.mtime_to")
    result = SearchFilter(
        path_prefix=_folder(flt.folder, roots),
        formats=tuple(flt.formats),
        min_width=flt.min_width,
        min_height=flt.min_height,
        mtime_from=start,
        mtime_to=end,
        cluster=flt.cluster,
    )
    return None if result.is_empty() else result


def to_query(body: SearchIn, settings: Settings) -> SearchQuery:
    """The search module's Query for a POST /search body."""
    size_limit = max_body_bytes(settings)
    limit, threshold = settings.search.resolve(body.limit, body.threshold)
    pos, neg = body.positive, body.negative
    return SearchQuery(
        texts=tuple(pos.texts),
        ids=tuple(i.lower() for i in pos.ids),
        uploads=tuple(decode_base64_image(x, size_limit) for x in pos.images),
        negative_texts=tuple(neg.texts),
        negative_ids=tuple(i.lower() for i in neg.ids),
        negative_uploads=tuple(decode_base64_image(x, size_limit) for x in neg.images),
        limit=limit,
        offset=body.offset,
        threshold=threshold,
        filter=to_filter(body.filter, settings.serve.roots),
        sort=body.sort,
    )


def _payload_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def hit_out(hit: Hit, root_path: str) -> HitOut:
    """A store hit as the API shows it, with the URLs of its thumbnail and file."""
    mtime = hit.payload.get("mtime")
    fmt = hit.payload.get("format")
    return HitOut(
        id=hit.id,
        path=hit.path,
        score=hit.score,
        width=_payload_int(hit.payload, "width"),
        height=_payload_int(hit.payload, "height"),
        mtime=float(mtime) if isinstance(mtime, int | float) else None,
        format=fmt if isinstance(fmt, str) else None,
        thumbnail=f"{root_path}/images/{hit.id}/thumbnail",
        image=f"{root_path}/images/{hit.id}",
    )


def search_out(request: Request, found: tuple[list[Hit], Timings]) -> SearchOut:
    hits, timings = found
    root = str(request.scope.get("root_path", ""))
    return SearchOut(
        hits=[hit_out(h, root) for h in hits],
        encode_ms=round(timings.encode * 1e3, 3),
        store_ms=round(timings.store * 1e3, 3),
    )
