"""`indexer index PATH` through the process that owns the store: the owner queues the work, this command shows its
progress and prints its summary, as the command run here would. Should the owner stop during the job (kill -9
included), what it stored is kept and the command goes on here (None: index here)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from indexer.cli.common import progress_bar
from indexer.daemon.client import OwnerClient, OwnerGoneError, find_daemon
from indexer.errors import StoreBusyError, error_from_body
from indexer.records import Failure, RunSummary

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL = 0.2  # seconds between looks at the job
OWNER_EXIT_WAIT = 30.0  # seconds a store its owner is closing may stay busy (the daemon's stop grace is 8 s)


def index_through(owner: OwnerClient, roots: Sequence[Path], args: argparse.Namespace) -> RunSummary | None:
    """Run ``index ROOTS`` as a job of the owner and wait for it; None when the owner went away meanwhile."""
    paths = [str(Path(r).expanduser().absolute()) for r in roots]
    try:
        job = owner.ask("POST", "/index", {"paths": paths})
        with progress_bar(args) as progress:
            job = _wait(owner, job, progress)
    except OwnerGoneError as exc:
        if find_daemon(owner.settings.store.dir) is not None:
            raise
        log.warning("%s: it is gone, so indexing goes on here (what it stored is kept)", exc)
        return None
    if job["state"] == "failed":
        raise error_from_body(job["error"], "the owner's index job failed")
    return _summary(job["summary"])


def open_after_owner(open_store: Callable[[], T]) -> T:
    """Open the store after its owner went away during a job: a stopping owner closes its app first and its store
    last, so the store may be busy for a few seconds more (tried again until OWNER_EXIT_WAIT)."""
    deadline = time.monotonic() + OWNER_EXIT_WAIT
    while True:
        try:
            return open_store()
        except StoreBusyError:
            if time.monotonic() > deadline:
                raise
            log.info("the store is still held by its owner, which is stopping: waiting")
            time.sleep(POLL)


def _wait(owner: OwnerClient, job: dict[str, Any], progress: Any) -> dict[str, Any]:
    shown, phase = 0, ""
    while job["state"] in ("queued", "running"):
        time.sleep(POLL)
        job = owner.ask("GET", f"/index/{job['id']}", timeout=60)
        if progress is not None and job["state"] == "running" and job["total"]:
            if job["phase"] != phase:
                phase, shown = job["phase"], 0
                progress.close()
                progress.start(job["total"], phase)
            progress.advance(job["done"] - shown)
            shown = job["done"]
    return job


def _summary(raw: dict[str, Any]) -> RunSummary:
    failures = [Failure(Path(f["path"]), f["reason"]) for f in raw["failures"]]
    counts = {k: int(raw[k]) for k in ("indexed", "unchanged", "moved", "removed", "failed")}
    return RunSummary(**counts, failures=failures, interrupted=bool(raw["interrupted"]))
