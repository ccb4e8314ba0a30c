"""The HTTP routes of the Duplicates and Clusters views (see indexer/library/jobs.py for the rules they follow).

    POST /duplicates/scans                     start a scan: tier (exact / near / similar), threshold, folder
    GET  /duplicates/scans/{scan_id}           its progress and, once done, a page of groups (largest first)
    POST /duplicates/scans/{scan_id}/actions   move or delete the members of at most 50 groups (dry run first)
    POST /clusters/runs                        start `indexer cluster` (k, or auto)
    GET  /clusters/runs/{run_id}               its progress
    GET  /clusters                             the stored clusters, each with its most central images

The routes sit behind the service's own middleware (API key, loopback host rule, body limit) and use its error
body; the work runs on its engine thread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from indexer.api.httpcheck import is_loopback
from indexer.api.models import ErrorOut, FilterIn, to_filter
from indexer.api.service import Service
from indexer.library.dedup import Group, Item, Member
from indexer.library.jobs import (
    MAX_GROUPS_PER_ACTION,
    Job,
    JobKind,
    Review,
    Selection,
    stored_clusters,
)

JOB_PATTERN = r"^[0-9a-fA-F]{32}$"
IMAGE_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MAX_PAGE = 100
JobId = Annotated[str, PathParam(pattern=JOB_PATTERN, description="a job's id")]
ImageRef = Annotated[str, Field(pattern=IMAGE_PATTERN)]


class ScanIn(BaseModel):
    """What to look for."""

    model_config = ConfigDict(extra="forbid")

    tier: Literal["exact", "near", "similar"] = "near"
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, description="default: the tier's setting")
    folder: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^[^\x00]*$")


class JobOut(BaseModel):
    """A job's progress: ``done`` of ``total`` steps of ``phase``; state running, done or failed."""

    id: str
    kind: Literal["duplicates", "cluster"]
    state: Literal["running", "done", "failed"]
    phase: str
    done: int
    total: int
    error: str | None
    elapsed_s: float
    params: dict[str, Any]
    groups: int | None = None
    duplicates: int | None = None
    duplicate_bytes: int | None = None
    scanned: int | None = None
    threshold: float | None = None
    k: int | None = None
    points: int | None = None


class ImageOut(BaseModel):
    """A stored image of a group."""

    id: str
    path: str
    width: int
    height: int
    size: int
    mtime: float
    thumbnail: str
    done: dict[str, Any] | None = Field(default=None, description="what an earlier action of this scan did to it")


class MemberOut(ImageOut):
    """A duplicate: cosine to the keeper, exact copy or not, and ``direct`` (False: joined only through another
    member, never acted on)."""

    score: float
    exact: bool
    direct: bool


class GroupOut(BaseModel):
    index: int
    keeper: ImageOut
    members: list[MemberOut]


class ScanOut(JobOut):
    """A scan's progress and one page of its groups."""

    offset: int = 0
    page: list[GroupOut] = Field(default_factory=list)


class SelectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: int = Field(ge=0, le=10_000_000, description="the group's index in the scan")
    keeper: ImageRef | None = Field(default=None, description="another image of the group to keep")
    exclude: list[ImageRef] = Field(default_factory=list, max_length=10_000, description="members to leave alone")


class ActionIn(BaseModel):
    """Move (``move_to``) or delete the members of the selected groups; keepers stay."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["move", "delete"]
    move_to: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="absolute folder under serve.roots or dedup.duplicates_dir (default: dedup.duplicates_dir)",
    )
    groups: list[SelectionIn] = Field(min_length=1, max_length=MAX_GROUPS_PER_ACTION)
    dry_run: bool = True
    confirm: bool = Field(default=False, description="needed to delete, and for every action with an API key")
    request_id: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")


class PlannedOut(BaseModel):
    action: Literal["move", "delete"]
    path: str
    keeper: str
    score: float
    to: str | None = None


class SkippedOut(BaseModel):
    path: str
    reason: str
    problem: bool


class ActionOut(BaseModel):
    """The dry run (``planned``, ``skipped``) and, unless dry_run, what was ``done`` and what ``failed``;
    ``already``: members this scan had acted on before (left as they are)."""

    dry_run: bool
    action: Literal["move", "delete"]
    planned: list[PlannedOut]
    skipped: list[SkippedOut]
    done: list[PlannedOut]
    failed: list[SkippedOut]
    already: list[PlannedOut]
    bytes: int
    repeated: bool = Field(description="true when this answers a request_id seen before (nothing was redone)")
    moved_stay_indexed: bool | None = Field(
        default=None,
        description="moves only: true when the target lies under an indexed folder (watch.paths, serve.roots) and "
        "the moved files keep their points; false: they leave the index",
    )


class ClusterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(default=None, ge=1, le=10_000, description="default: cluster.k, else chosen")
    auto: bool = False


class CentralOut(BaseModel):
    id: str
    path: str
    thumbnail: str


class ClusterOut(BaseModel):
    id: int
    size: int
    central: list[CentralOut] = Field(description="the images nearest the cluster's mean, nearest first")


class ClustersOut(BaseModel):
    clusters: list[ClusterOut]
    unclustered: int = Field(description="images indexed since the last clustering run")


def add_review_routes(app: FastAPI, service: Service, api_key: str) -> Review:
    """Add the Duplicates and Clusters routes to the service's app; their jobs run on its engine thread."""
    review = Review.on_executor(service.settings, service.store, service.executor)
    app.state.review = review
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 409, 422, 503)}

    def job(job_id: str, kind: JobKind) -> Job:
        return review.job(job_id, kind)  # UnknownJobError: 404, by the error tree

    @app.post("/duplicates/scans", status_code=202, response_model=JobOut, responses=errors, summary="Find duplicates")
    async def start_scan(body: ScanIn) -> JobOut:
        flt = to_filter(FilterIn(folder=body.folder), service.settings.serve.roots)
        return JobOut(**review.start_scan(body.tier, body.threshold, flt).as_dict())

    @app.get("/duplicates/scans/{scan_id}", response_model=ScanOut, responses=errors, summary="A scan and its groups")
    async def scan(
        request: Request,
        scan_id: JobId,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    ) -> ScanOut:
        found = job(scan_id, "duplicates")
        root = str(request.scope.get("root_path", ""))
        page = [_group_out(i, g, found, root) for i, g in review.groups(found, offset, limit)]
        return ScanOut(**found.as_dict(), offset=offset, page=page)

    @app.post(
        "/duplicates/scans/{scan_id}/actions", response_model=ActionOut, responses=errors, summary="Move or delete"
    )
    async def act(request: Request, scan_id: JobId, body: ActionIn) -> ActionOut:
        found = job(scan_id, "duplicates")
        exposed = not is_loopback(service.settings.serve.host) or not _from_loopback(request)
        selections = [Selection(s.group, s.keeper, tuple(s.exclude)) for s in body.groups]
        answer = await service.run(
            lambda: review.act(
                found,
                selections,
                move_to=body.move_to if body.action == "move" else None,
                delete=body.action == "delete",
                dry_run=body.dry_run,
                confirm=body.confirm,
                key_configured=bool(api_key),
                request_id=body.request_id,
                exposed=exposed,
            )
        )
        return ActionOut(**answer)

    @app.post("/clusters/runs", status_code=202, response_model=JobOut, responses=errors, summary="Cluster the index")
    async def start_clustering(body: ClusterIn) -> JobOut:
        return JobOut(**review.start_clustering(body.k, body.auto).as_dict())

    @app.get("/clusters/runs/{run_id}", response_model=JobOut, responses=errors, summary="A clustering run")
    async def clustering(run_id: JobId) -> JobOut:
        return JobOut(**job(run_id, "cluster").as_dict())

    @app.get("/clusters", response_model=ClustersOut, responses=errors, summary="The clusters and their centres")
    async def clusters(request: Request, central: Annotated[int, Query(ge=1, le=24)] = 6) -> ClustersOut:
        rows, unclustered = await service.run(stored_clusters, service.store, central)
        root = str(request.scope.get("root_path", ""))
        out = [
            ClusterOut(
                id=r.id,
                size=r.size,
                central=[CentralOut(id=i, path=p, thumbnail=_thumb(root, i)) for i, p in r.central],
            )
            for r in rows
        ]
        return ClustersOut(clusters=out, unclustered=unclustered)

    return review


def _from_loopback(request: Request) -> bool:
    """Whether the request came from a loopback address (the peer, not the Host header a client chooses)."""
    return request.client is not None and is_loopback(request.client.host)


def _thumb(root: str, image_id: str) -> str:
    return f"{root}/images/{image_id}/thumbnail"


def _image(item: Item, job: Job, root: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "path": item.path,
        "width": item.width,
        "height": item.height,
        "size": item.size,
        "mtime": item.mtime,
        "thumbnail": _thumb(root, item.id),
        "done": job.acted.get(item.id),
    }


def _member(member: Member, job: Job, root: str) -> MemberOut:
    return MemberOut(
        **_image(member.item, job, root), score=round(member.score, 6), exact=member.exact, direct=member.direct
    )


def _group_out(index: int, group: Group, job: Job, root: str) -> GroupOut:
    return GroupOut(
        index=index,
        keeper=ImageOut(**_image(group.keeper, job, root)),
        members=[_member(m, job, root) for m in group.members],
    )
