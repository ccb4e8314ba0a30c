"""Reviewing duplicates and clusters from the web page (`indexer serve`): the work behind indexer/api/review.py.

A duplicate scan or a clustering run is a `Job`: started by a POST, run on the service's engine thread (the one
thread that touches the model and the store), polled by GET for its progress. A finished scan keeps its report in
memory (the last `MAX_JOBS` jobs are kept) and hands its groups out a page at a time.

Actions go through `indexer.library.dedup` exactly as `indexer dedup` does: the same plan (keepers stay, links and
members
joined only through another duplicate are left alone, a destination that exists refuses the whole request, files
changed since indexing are left alone and reported), the same apply (each file re-checked first, nothing replaced,
the store follows). On top of that, for an HTTP client:

- a request names at most `MAX_GROUPS_PER_ACTION` groups, by their index in the scan, each with an optional new
  keeper (scores recomputed against it from the stored vectors) and members to leave out;
- ``dry_run`` returns the plan without touching anything; a delete needs ``confirm``, and with an API key
  configured every non-dry-run action does; without a key, a service reachable beyond loopback (serve.host, or
  the client's address) refuses every non-dry-run action;
- a move goes under serve.roots or dedup.duplicates_dir only (real paths; none when neither is set), and the
  moved files leave the index unless the target lies under an indexed folder (watch.paths, serve.roots);
- idempotent: a member already moved or deleted by this scan is reported under ``already`` instead of being acted
  on again, and a retried request with the same ``request_id`` gets the first answer back.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from indexer.errors import ConfigError, IndexerError, UnknownJobError
from indexer.library.actions import Places, apply_plan, common_root, plan_actions
from indexer.library.cluster import ClusterReport, cluster_store, resolve_k
from indexer.library.dedup import DedupReport, Group, PairPlan, Tier, find_duplicates, rekeep, tier_threshold
from indexer.library.folders import is_under, real_target
from indexer.records import SearchFilter
from indexer.settings import Settings

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)

MAX_JOBS = 8  # finished jobs kept in memory (the oldest finished one goes first)
MAX_GROUPS_PER_ACTION = 50
MAX_REQUESTS_REMEMBERED = 256  # request ids (per scan) whose answers are kept for retries

JobKind = Literal["duplicates", "cluster"]
JobState = Literal["running", "done", "failed"]


@dataclass
class Job:
    """A scan or clustering run and its progress (``done`` of ``total`` steps in ``phase``)."""

    id: str
    kind: JobKind
    params: dict[str, Any]
    state: JobState = "running"
    phase: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    report: DedupReport | None = None
    clusters: ClusterReport | None = None
    root: Path = Path("/")  # move targets keep their paths relative to this folder
    acted: dict[str, dict[str, Any]] = field(default_factory=dict)  # member id -> what was done to it
    answers: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)  # request id -> answer

    def progress(self, phase: str, done: int, total: int) -> None:
        self.phase, self.done, self.total = phase, done, total

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "elapsed_s": round((self.finished or time.time()) - self.started, 3),
        }
        if self.report is not None:
            out |= {
                "groups": len(self.report.groups),
                "duplicates": self.report.duplicates,
                "duplicate_bytes": self.report.duplicate_bytes,
                "scanned": self.report.scanned,
                "threshold": self.report.threshold,
            }
        if self.clusters is not None:
            out |= {"k": self.clusters.k, "points": self.clusters.points}
        return out


@dataclass(frozen=True, slots=True)
class Selection:
    """One group of a scan to act on: its index, optionally another keeper (an image id of the group), and the
    ids of members to leave out (unticked)."""

    group: int
    keeper: str | None = None
    exclude: tuple[str, ...] = ()


class Review:
    """The jobs of one service. ``submit`` runs work on the engine thread; ``store`` is touched only there."""

    def __init__(self, settings: Settings, store: VectorStore, submit: Callable[[Callable[[], None]], Any]) -> None:
        self.settings = settings
        self.store = store
        self.submit = submit
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()

    @classmethod
    def on_executor(cls, settings: Settings, store: VectorStore, executor: Executor) -> Review:
        return cls(settings, store, executor.submit)

    # --- jobs ---

    def job(self, job_id: str, kind: JobKind) -> Job:
        with self.lock:
            job = self.jobs.get(job_id.lower())
        if job is None or job.kind != kind:
            raise UnknownJobError(job_id)
        return job

    def _start(self, kind: JobKind, params: dict[str, Any], work: Callable[[Job], None]) -> Job:
        job = Job(uuid.uuid4().hex, kind, params)
        with self.lock:
            finished = [j for j in self.jobs.values() if j.state != "running"]
            while len(self.jobs) >= MAX_JOBS and finished:
                del self.jobs[finished.pop(0).id]
            if len(self.jobs) >= MAX_JOBS:
                raise ConfigError("jobs", f"{MAX_JOBS} jobs are running already: wait for one to finish")
            self.jobs[job.id] = job
        self.submit(lambda: self._run(job, work))
        return job

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        try:
            work(job)
            job.state = "done"
        except IndexerError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a job's failure is reported by its poll; the service goes on
            log.exception("%s job %s failed", job.kind, job.id)
            job.state, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            job.phase, job.finished = job.state, time.time()

    # --- duplicates ---

    def start_scan(self, tier: Tier, threshold: float | None, flt: SearchFilter | None) -> Job:
        """Start finding the groups of a tier (threshold: None for the tier's setting) among the stored images
        matching the filter; ConfigError at once for a bad tier or threshold."""
        cosine = tier_threshold(tier, self.settings.dedup, threshold)
        folder = flt.path_prefix if flt is not None else None
        params = {"tier": tier, "threshold": cosine, "folder": folder}

        def scan(job: Job) -> None:
            job.progress("reading the store", 0, 0)
            report = find_duplicates(
                self.store,
                tier,
                threshold=cosine,
                filter=flt,
                block=self.settings.dedup.block_size,
                plan=PairPlan.from_settings(self.settings.dedup),
                on_rows=lambda done, total: job.progress("comparing", done, total),
            )
            job.root = Path(folder) if folder else common_root(report)
            job.report = report

        return self._start("duplicates", params, scan)

    def groups(self, job: Job, offset: int, limit: int) -> list[tuple[int, Group]]:
        """A page of a finished scan's groups (largest first), with their indices."""
        if job.report is None:
            return []
        return list(enumerate(job.report.groups))[offset : offset + limit]

    def act(
        self,
        job: Job,
        selections: Sequence[Selection],
        *,
        move_to: str | None,
        delete: bool,
        dry_run: bool,
        confirm: bool,
        key_configured: bool,
        request_id: str | None = None,
        exposed: bool = False,
    ) -> dict[str, Any]:
        """Plan (and unless dry_run, apply) moving or deleting the members of the selected groups. ``exposed``:
        the service is reachable beyond loopback (then, without a key, nothing is done)."""
        if request_id is not None and request_id in job.answers:
            return {**job.answers[request_id], "repeated": True}
        report = job.report
        if report is None:
            raise ConfigError("scan", f"scan {job.id} has not finished ({job.state})")
        if not selections:
            raise ConfigError("groups", "select at least one group")
        if len(selections) > MAX_GROUPS_PER_ACTION:
            raise ConfigError("groups", f"{len(selections)} groups: act on at most {MAX_GROUPS_PER_ACTION} at a time")
        if not dry_run and not confirm and (delete or key_configured):
            what = "deleted" if delete else "moved"
            why = "a delete" if delete else "with an API key configured, every action"
            raise ConfigError("confirm", f"nothing was {what}: {why} needs confirm=true (look at the dry run first)")
        if not dry_run and exposed and not key_configured:
            raise ConfigError(
                "serve.api_key",
                "nothing was moved or deleted: the service is reachable beyond loopback, and acting on files then "
                "needs an API key (serve.api_key or serve.api_key_file)",
            )
        target = None if delete else self._move_root(move_to)
        chosen, already = self._chosen_groups(job, report, selections)
        subset = DedupReport(report.tier, report.threshold, report.scanned, tuple(chosen))
        places = Places.for_service(self.settings)
        plan = plan_actions(subset, move_to=target, delete=delete, root=job.root, places=places, store=self.store)
        if not dry_run:
            apply_plan(plan, self.store)
            for action in plan.done:
                job.acted[action.item.id] = action.as_dict()
        answer = {
            "dry_run": dry_run,
            "action": "delete" if delete else "move",
            **plan.as_dict(),
            "already": already,
            "bytes": plan.bytes,
            "repeated": False,
        }
        if request_id is not None and not dry_run:
            job.answers[request_id] = answer
            while len(job.answers) > MAX_REQUESTS_REMEMBERED:
                job.answers.popitem(last=False)
        return answer

    def _chosen_groups(
        self, job: Job, report: DedupReport, selections: Sequence[Selection]
    ) -> tuple[list[Group], list[dict[str, Any]]]:
        """The selected groups (new keepers applied, unticked members and those already acted on left out), and
        what had been done already to the members left out for that reason."""
        chosen: list[Group] = []
        already: list[dict[str, Any]] = []
        seen: set[int] = set()
        for sel in selections:
            if not 0 <= sel.group < len(report.groups):
                raise ConfigError("groups", f"group {sel.group} does not exist (the scan has {len(report.groups)})")
            if sel.group in seen:
                raise ConfigError("groups", f"group {sel.group} is selected twice")
            seen.add(sel.group)
            group = report.groups[sel.group]
            already += [job.acted[i] for i in (group.keeper.id, *(m.item.id for m in group.members)) if i in job.acted]
            if sel.keeper is not None and sel.keeper.lower() != group.keeper.id:
                group = rekeep(self.store, group, sel.keeper.lower(), report.threshold)
            skip = {i.lower() for i in sel.exclude}
            members = [m for m in group.members if m.item.id not in skip and m.item.id not in job.acted]
            chosen.append(Group(group.keeper, tuple(members)))
        return chosen, already

    def _move_root(self, move_to: str | None) -> Path:
        """The folder to move into (default: dedup.duplicates_dir): absolute, and its real path under
        serve.roots or dedup.duplicates_dir; with neither set, no move is allowed."""
        move_to = move_to or str(
            Path(self.settings.dedup.duplicates_dir).expanduser() if self.settings.dedup.duplicates_dir else ""
        )
        if not move_to:
            raise ConfigError("move_to", "give the folder to move to (or set dedup.duplicates_dir)")
        if not os.path.isabs(move_to) or "\x00" in move_to:
            raise ConfigError("move_to", f"{move_to!r} is not an absolute folder path")
        path = Path(os.path.normpath(move_to))
        allowed = Places.for_service(self.settings).allowed
        if not allowed:
            raise ConfigError(
                "move_to",
                "moves from the service go under the served folders (serve.roots) or the duplicates folder "
                "(dedup.duplicates_dir), and neither is set",
            )
        if not is_under(real_target(path), allowed):
            raise ConfigError(
                "move_to",
                f"{path} lies outside the served folders (serve.roots) and the duplicates folder "
                "(dedup.duplicates_dir)",
            )
        return path

    # --- clusters ---

    def start_clustering(self, k: int | None, auto: bool) -> Job:
        """Start `indexer cluster` (k clusters, or the cluster.k setting, or chosen when auto)."""
        chosen = resolve_k(k, auto, self.settings.cluster)

        def run(job: Job) -> None:
            job.progress("clustering", 0, self.store.count() if self.store.model_info() is not None else 0)
            job.clusters = cluster_store(self.store, self.settings.cluster, k=chosen)
            job.progress("clustered", job.clusters.points, job.clusters.points)

        return self._start("cluster", {"k": chosen, "auto": chosen is None}, run)


@dataclass(frozen=True, slots=True)
class ClusterRow:
    """One stored cluster: its id, size, and the ids and paths of its most central images."""

    id: int
    size: int
    central: tuple[tuple[str, str], ...]


def stored_clusters(store: VectorStore, per_cluster: int) -> tuple[list[ClusterRow], int]:
    """The clusters written by the last clustering run (largest first) and how many images have no cluster.

    Two passes over the stored vectors: the mean of each cluster, then its ``per_cluster`` images nearest that
    mean. Memory: k means and k small heaps, whatever the store's size.
    """
    if store.model_info() is None:
        return [], 0
    sums: dict[int, np.ndarray[Any, np.dtype[np.float64]]] = {}
    sizes: dict[int, int] = {}
    unclustered = 0
    for point in store.scroll(with_vectors=True):
        label = point.payload.get("cluster")
        if not isinstance(label, int) or point.vector is None:
            unclustered += 1
            continue
        sums[label] = sums.get(label, 0.0) + np.asarray(point.vector, np.float64)
        sizes[label] = sizes.get(label, 0) + 1
    means = {c: s / max(float(np.linalg.norm(s)), 1e-12) for c, s in sums.items()}
    best: dict[int, list[tuple[float, str, str]]] = {c: [] for c in sums}
    for point in store.scroll(filter=None, with_vectors=True):
        label = point.payload.get("cluster")
        if not isinstance(label, int) or point.vector is None or label not in means:
            continue
        entry = (float(np.dot(means[label], point.vector)), point.id, point.path)
        heap = best[label]
        if len(heap) < per_cluster:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)
    rows = [
        ClusterRow(c, sizes[c], tuple((i, p) for _, i, p in sorted(best[c], reverse=True)))
        for c in sorted(sums, key=lambda c: (-sizes[c], c))
    ]
    return rows, unclustered
