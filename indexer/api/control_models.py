"""The request and response models of the control routes (`indexer.api.control`): what the CLI sends the process
that owns the store. Every field is typed and bounded: a wrong type or an out-of-range number is a 422 naming the
field, never a 500; no field names a path the owner would read."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from indexer.api.models import MAX_OFFSET
from indexer.records import SEARCH_LIMIT_MAX, SearchFilter
from indexer.search import Query

UUID = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1000)]
Many = 10_000  # ids, hashes or points per store call (the client batches by 1000, points by 256)
NO_PATHS = "the owner reads no file a client names: send the image's bytes instead (the CLI does)"


class FilterWire(BaseModel):
    """A `SearchFilter`, field by field."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: str | None = Field(default=None, min_length=1, max_length=4096)
    formats: list[Annotated[str, StringConstraints(max_length=16)]] = Field(default_factory=list, max_length=16)
    min_width: int | None = Field(default=None, ge=0, le=1_000_000)
    min_height: int | None = Field(default=None, ge=0, le=1_000_000)
    mtime_from: float | None = Field(default=None, ge=-1e12, le=1e12)
    mtime_to: float | None = Field(default=None, ge=-1e12, le=1e12)
    cluster: int | None = Field(default=None, ge=0, le=1_000_000)

    def to_filter(self) -> SearchFilter:
        return SearchFilter(**{**self.model_dump(), "formats": tuple(self.formats)})


class Tagged(BaseModel):
    """The query codec's tags (`indexer.daemon.client`): ``{"$b64": ...}`` bytes, ``{"$filter": {...}}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class B64(Tagged):
    data: str = Field(alias="$b64")

    def decoded(self) -> bytes:
        try:
            return base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None


class FilterTag(Tagged):
    filter: FilterWire = Field(alias="$filter")


class QueryWire(BaseModel):
    """A `search.Query` as the codec sends it. Image paths are refused: the client reads its files itself."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(default_factory=list, max_length=64)
    images: list[Any] = Field(default_factory=list)
    negative_texts: list[Text] = Field(default_factory=list, max_length=64)
    limit: int = Field(default=10, ge=1, le=SEARCH_LIMIT_MAX)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    filter: FilterTag | None = None
    ids: list[UUID] = Field(default_factory=list, max_length=64)
    uploads: list[B64] = Field(default_factory=list, max_length=16)
    negative_images: list[Any] = Field(default_factory=list)
    negative_ids: list[UUID] = Field(default_factory=list, max_length=64)
    negative_uploads: list[B64] = Field(default_factory=list, max_length=16)
    sort: Literal["relevance", "newest", "oldest"] = "relevance"
    upload_pixels: list[Any] = Field(default_factory=list, max_length=0)
    negative_upload_pixels: list[Any] = Field(default_factory=list, max_length=0)

    @field_validator("images", "negative_images")
    @classmethod
    def _no_paths(cls, value: list[Any]) -> list[Any]:
        if value:
            raise ValueError(NO_PATHS)
        return value

    def to_query(self) -> Query:
        return Query(
            texts=tuple(self.texts),
            negative_texts=tuple(self.negative_texts),
            limit=self.limit,
            offset=self.offset,
            threshold=self.threshold,
            filter=self.filter.filter.to_filter() if self.filter is not None else None,
            ids=tuple(i.lower() for i in self.ids),
            uploads=tuple(u.decoded() for u in self.uploads),
            negative_ids=tuple(i.lower() for i in self.negative_ids),
            negative_uploads=tuple(u.decoded() for u in self.negative_uploads),
            sort=self.sort,
        )


class SearchRequest(BaseModel):
    """``indexer search`` through the owner (``store`` and ``model``: what the client had configured, informative)."""

    model_config = ConfigDict(extra="forbid")

    query: QueryWire
    store: str | None = Field(default=None, max_length=4096)
    model: str | None = Field(default=None, max_length=4096)


class IndexRequest(BaseModel):
    """``indexer index PATH...`` through the owner: absolute paths on this machine."""

    model_config = ConfigDict(extra="forbid")

    paths: list[Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]] = Field(
        min_length=1, max_length=1000
    )


class IdsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] = Field(max_length=Many)
    with_vectors: bool = False


class HashesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256s: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(max_length=Many)
    with_vectors: bool = False


class PayloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] = Field(max_length=Many)
    payload: dict[str, Any]


class ScrollIn(BaseModel):
    """The next page of a scroll: a new one (no cursor: filter and with_vectors apply) or one going on."""

    model_config = ConfigDict(extra="forbid")

    cursor: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None
    filter: FilterWire | None = None
    with_vectors: bool = False
    batch_size: int = Field(default=1000, ge=1, le=Many)


class CountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: FilterWire | None = None


class StoreInfoOut(BaseModel):
    location: str
    model: str | None
    dim: int | None


class IndexJobOut(BaseModel):
    """An index job's progress: ``done`` of ``total`` files of ``phase``; its summary once done."""

    id: str
    state: Literal["queued", "running", "done", "failed"]
    phase: str
    done: int
    total: int
    paths: list[str]
    error: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
