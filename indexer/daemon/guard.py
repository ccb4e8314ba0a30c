"""The deletion policy: never wipe on an outage.

Deletions apply only while their root is present and not empty, and more than ``mass_delete_fraction`` of a root's
entries (and more than ``mass_delete_min``) within a minute are held until a scan ``confirm_delay`` later still
finds the files gone (or ``--confirm-deletes`` at start-up).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.records import SearchFilter, StoredPoint
from indexer.store.protocol import VectorStore

MASS_WINDOW = 60.0  # deletions of one root within this many seconds count together


def root_state(root: Path) -> str:
    """ "present", "empty" (an unmounted share looks like this) or "missing"."""
    try:
        with os.scandir(root) as entries:
            return "present" if next(entries, None) is not None else "empty"
    except OSError:
        return "missing"


def root_identity(root: Path) -> tuple[int, int] | None:
    """(device, inode) of a root: a mount or unmount changes it."""
    try:
        st = root.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def root_of(path: str, roots: Sequence[Path]) -> Path | None:
    """The root a stored path belongs to (the deepest one)."""
    candidates = [r for r in roots if path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep)]
    return max(candidates, key=lambda r: len(str(r)), default=None)


@dataclass
class Held:
    """Deletions not applied, per root, and why."""

    points: dict[Path, list[StoredPoint]] = field(default_factory=dict)
    reasons: dict[Path, str] = field(default_factory=dict)

    def total(self) -> int:
        return sum(len(p) for p in self.points.values())


class DeletionGuard:
    """Decides which deletions apply: never under a missing or empty root; a mass deletion is held."""

    def __init__(self, roots: Sequence[Path], fraction: float, minimum: int, store: VectorStore) -> None:
        self.roots, self.fraction, self.minimum, self.store = list(roots), fraction, minimum, store
        self.held = Held()
        self._recent: dict[Path, deque[tuple[float, int]]] = {}

    def split(
        self,
        gone: dict[str, StoredPoint],
        now: float,
        confirmed: frozenset[Path] = frozenset(),
        allow_empty: bool = False,
    ) -> tuple[list[StoredPoint], Held]:
        """(points to remove now, points held per root). ``confirmed`` roots may lose any share of their entries
        (a confirming scan, ``--confirm-deletes``); none is ever removed while its root is missing, nor while it is
        empty unless ``allow_empty`` (``--confirm-deletes`` only)."""
        apply: list[StoredPoint] = []
        held = Held()
        for root, points in self._by_root(gone).items():
            reason = self._hold_reason(root, len(points), now, root in confirmed, allow_empty)
            if reason is None:
                apply.extend(points)
                self._recent.setdefault(root, deque()).append((now, len(points)))
            else:
                held.points[root], held.reasons[root] = points, reason
        return apply, held

    def _by_root(self, gone: dict[str, StoredPoint]) -> dict[Path, list[StoredPoint]]:
        grouped: dict[Path, list[StoredPoint]] = {}
        for path, point in gone.items():
            root = root_of(path, self.roots)
            if root is not None:  # a point outside every root is none of the daemon's business
                grouped.setdefault(root, []).append(point)
        return grouped

    def _hold_reason(self, root: Path, count: int, now: float, confirmed: bool, allow_empty: bool) -> str | None:
        state = root_state(root)
        if state == "missing" or (state == "empty" and not allow_empty):
            return f"the root is {state} (unmounted?)"
        if confirmed:
            return None
        recent = self._recent_count(root, now)
        before = self.store.count(SearchFilter(path_prefix=str(root))) + recent
        total = count + recent
        if total > self.minimum and total > self.fraction * before:
            return f"mass deletion: {total} of {before} entries ({total / max(before, 1):.0%})"
        return None

    def _recent_count(self, root: Path, now: float) -> int:
        recent = self._recent.get(root)
        while recent and now - recent[0][0] > MASS_WINDOW:
            recent.popleft()
        return sum(n for _, n in recent or ())
