"""The daemon's schedule of scans: when each kind of rescan is due, and when the roots are checked next.

Times are ``time.monotonic()`` seconds, passed in by the caller (so that tests drive the clock).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

ROOT_CHECK_EVERY = 1.0
OVERFLOW_RESCAN_GAP = 5.0


class ScanKind(Enum):
    """Why a scan runs; the value is its label in the ``indexer_watch_rescans`` metric and the log."""

    PERIODIC = "periodic"  # watch.rescan_interval
    OVERFLOW = "overflow"  # the watcher or the coalescer lost events
    CONFIRM = "confirm"  # held deletions of one root, confirm_delay after they were held
    ROOT_BACK = "root-back"  # a root came back, was remounted, or was filled again


@dataclass(frozen=True)
class Scan:
    """A scheduled scan: of every watched root, or of ``root`` alone (CONFIRM and ROOT_BACK)."""

    kind: ScanKind
    root: Path | None = None


class Scheduler:
    """Which scans are due when. A scan of a kind (and root) is scheduled once: asking again keeps the earlier time,
    except for a root coming back, which is due at once."""

    def __init__(
        self, rescan_interval: float, overflow_gap: float = OVERFLOW_RESCAN_GAP, every: float = ROOT_CHECK_EVERY
    ) -> None:
        self.rescan_interval, self.overflow_gap, self.every = rescan_interval, overflow_gap, every
        self._due: dict[Scan, float] = {}
        self._last_overflow = float("-inf")
        self._next_root_check = 0.0

    def rescan(self, now: float) -> None:
        """The next periodic rescan, ``rescan_interval`` ±10% from now (jittered: daemons on one share spread out);
        none when the interval is 0."""
        if self.rescan_interval > 0:
            self._due[Scan(ScanKind.PERIODIC)] = now + self.rescan_interval * random.uniform(0.9, 1.1)

    def overflowed(self, now: float) -> None:
        """Events were lost: a full rescan, at most one per ``overflow_gap`` seconds."""
        self._due.setdefault(Scan(ScanKind.OVERFLOW), max(now, self._last_overflow + self.overflow_gap))

    def confirm(self, root: Path, at: float) -> None:
        """A scan of ``root`` at ``at`` to confirm its held deletions (an earlier one already scheduled stays)."""
        self._due.setdefault(Scan(ScanKind.CONFIRM, root), at)

    def root_back(self, root: Path, now: float) -> None:
        """A scan of ``root`` now: it came back, was replaced, or was filled again."""
        self._due[Scan(ScanKind.ROOT_BACK, root)] = now

    def roots_check_due(self, now: float) -> bool:
        """True once every ``every`` seconds: time to look at the roots (the first call is due)."""
        if now < self._next_root_check:
            return False
        self._next_root_check = now + self.every
        return True

    def due(self, now: float) -> list[Scan]:
        """The scans due at ``now``, earliest first (still scheduled: `take` each before running it)."""
        return [scan for scan, when in sorted(self._due.items(), key=lambda item: item[1]) if when <= now]

    def take(self, scan: Scan, now: float) -> None:
        """Unschedule ``scan``: it runs now."""
        del self._due[scan]
        if scan.kind is ScanKind.OVERFLOW:
            self._last_overflow = now

    def when(self, scan: Scan) -> float | None:
        """When ``scan`` is due, or None when it is not scheduled."""
        return self._due.get(scan)
