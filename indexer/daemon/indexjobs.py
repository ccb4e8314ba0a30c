"""`IndexJobs`: ``indexer index PATH`` asked of the process that owns the store, queued and run there.

The owner (the watch daemon, or ``indexer serve``) runs the jobs one at a time on a thread of their own, through
the same `indexer.ingest.pipeline.run_index` as the command (so a job is incremental and resumable exactly as the
command is), over the owner's shared store and model. The command polls the job for its progress and prints its
summary. A job's paths are checked by the command and again here (they are folders or files on this machine).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from indexer.errors import IndexerError, UnknownJobError
from indexer.records import RunSummary

log = logging.getLogger(__name__)

MAX_KEPT = 32  # finished jobs kept for their commands to read
JobState = Literal["queued", "running", "done", "failed"]
RunIndex = Callable[[Sequence[Path], "IndexJob"], RunSummary]


@dataclass
class IndexJob:
    """One ``index PATH...`` request and its progress (``done`` of ``total`` files in ``phase``)."""

    id: str
    paths: list[str]
    state: JobState = "queued"
    phase: str = "queued"
    done: int = 0
    total: int = 0
    error: dict[str, Any] | None = None  # the error body (indexer.errors.body_for) of a failed job
    summary: RunSummary | None = None
    queued_at: float = field(default_factory=time.time)

    # the Progress protocol of the pipeline: the job shows what the command's progress bar would
    def start(self, total: int, what: str) -> None:
        self.phase, self.total, self.done = what, total, 0

    def advance(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        pass


class IndexJobs:
    """The queue of index jobs and the thread that runs them (started on the first submit)."""

    def __init__(self, run: RunIndex) -> None:
        self._run = run
        self._jobs: OrderedDict[str, IndexJob] = OrderedDict()
        self._queue: list[IndexJob] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, paths: Sequence[str]) -> IndexJob:
        """Queue a job; the paths are run as given (absolute paths: the command makes them so)."""
        job = IndexJob(uuid.uuid4().hex, [str(p) for p in paths])
        with self._lock:
            self._forget_finished()
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="indexer-index-jobs", daemon=True)
                self._thread.start()
        self._wake.set()
        log.info("queued index job %s: %s", job.id, ", ".join(job.paths))
        return job

    def get(self, job_id: str) -> IndexJob:
        with self._lock:
            job = self._jobs.get(job_id.lower())
        if job is None:
            raise UnknownJobError(job_id)
        return job

    def _forget_finished(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "failed")]
        while len(self._jobs) >= MAX_KEPT and finished:
            del self._jobs[finished.pop(0).id]

    def _next(self) -> IndexJob | None:
        with self._lock:
            return self._queue.pop(0) if self._queue else None

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wake.wait()
                self._wake.clear()
                continue
            self._execute(job)

    def _execute(self, job: IndexJob) -> None:
        from indexer.errors import body_for, error_body

        job.state, job.phase = "running", "planning"
        started = time.monotonic()
        try:
            job.summary = self._run([Path(p) for p in job.paths], job)
            job.state = "done"
        except IndexerError as exc:
            job.error, job.state = body_for(exc), "failed"
        except Exception as exc:
            log.exception("index job %s failed", job.id)
            job.error, job.state = error_body("InternalError", f"the index job failed: {exc}"), "failed"
        summary = job.summary
        log.info(
            "index job %s %s in %.1f s%s",
            job.id,
            job.state,
            time.monotonic() - started,
            f": {summary.indexed} indexed, {summary.unchanged} unchanged, {summary.failed} failed" if summary else "",
        )
