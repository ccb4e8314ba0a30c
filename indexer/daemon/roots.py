"""`Roots`: the watched folders coming and going (unmounted, emptied, moved away, back again), and what the daemon
does about each: stop or start watching, keep the entries of a missing root, schedule the rescan of one that is
back. Checked by the worker once a second (`indexer.daemon.schedule.Scheduler.roots_check_due`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.daemon.guard import root_identity, root_state
from indexer.daemon.schedule import Scheduler
from indexer.records import SearchFilter
from indexer.sources.events import Coalescer

if TYPE_CHECKING:
    from indexer.daemon.worker import Resources

log = logging.getLogger(__name__)


@dataclass
class RootInfo:
    """What the daemon last saw of one root: its state, its (device, inode), whether and how it is watched."""

    state: str = "missing"
    identity: tuple[int, int] | None = None
    watched: bool = False
    mode: str = ""


class Roots:
    """The watched roots and their states; `check` follows them (from the worker thread)."""

    def __init__(self, roots: Sequence[Path], schedule: Scheduler, coalescer: Coalescer) -> None:
        self.roots = list(roots)
        self.info = {root: RootInfo() for root in self.roots}
        self.schedule = schedule
        self.coalescer = coalescer

    def watched(self) -> list[Path]:
        """The roots being watched now (present, watcher started)."""
        return [r for r in self.roots if self.info[r].watched]

    def states(self) -> dict[str, str]:
        """For /healthz: each root's watch mode (inotify, polling) or its state (missing, empty)."""
        return {str(r): (self.info[r].mode or self.info[r].state) for r in self.roots}

    def check(self, res: Resources, initial: bool = False) -> None:
        """Compare each root with what was seen last; start or stop watching, schedule rescans."""
        for root in self.roots:
            info = self.info[root]
            state, identity = root_state(root), root_identity(root)
            if state == "missing":
                if info.watched or initial:
                    self._lost(res, root, info)
            elif not info.watched or identity != info.identity:
                self._back(res, root, info, identity, initial)
            elif state == "empty" and info.state == "present":
                log.warning("%s is empty now (an unmounted share?): no entry under it is deleted", root)
            elif state == "present" and info.state == "empty" and root in res.guard.held.points:
                self.schedule.root_back(root, time.monotonic())  # filled again: settle what was held
            info.state = state

    def _lost(self, res: Resources, root: Path, info: RootInfo) -> None:
        res.watcher.stop(root)
        info.watched, info.identity, info.mode = False, None, ""
        dropped = self.coalescer.forget_under(root)
        count = res.store.count(SearchFilter(path_prefix=str(root)))
        log.warning(
            "%s is missing (unmounted or moved?): its %d entries are kept%s; watching resumes when it is back",
            root,
            count,
            f", {dropped} pending events dropped" if dropped else "",
        )

    def _back(
        self, res: Resources, root: Path, info: RootInfo, identity: tuple[int, int] | None, initial: bool
    ) -> None:
        was_known = info.identity is not None
        info.mode = res.watcher.start(root)
        info.watched, info.identity = True, identity
        if not initial:
            log.info("%s is %s: rescanning it", root, "back" if not was_known else "remounted or replaced")
            self.schedule.root_back(root, time.monotonic())
