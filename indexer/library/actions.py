"""File actions on duplicate groups: move or delete the direct members, never the keeper.

`plan_actions` turns a `DedupReport` into an `ActionPlan` (what moves where, what is left alone and why; a
destination that exists refuses the whole plan); `apply_plan` re-checks each file right before acting, never
replaces an existing file, and makes the store follow: a moved file's point is re-keyed to its new path with its
vector kept, a deleted file's point is removed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from indexer.atomicio import NO_LINK_ERRNOS, fsync_path, publish_new, temp_name
from indexer.errors import ConfigError, StoreError
from indexer.records import FileEntry, StoredPoint

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore
from indexer.library.dedup import DedupReport, Group, Item, Member

log = logging.getLogger(__name__)


# --- actions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """Move (to ``target``) or delete one duplicate; its keeper stays."""

    kind: Literal["move", "delete"]
    item: Item
    keeper: Item
    score: float
    target: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"action": self.kind, "path": self.item.path, "keeper": self.keeper.path, "score": round(self.score, 6)}
        return out | ({"to": str(self.target)} if self.target is not None else {})


@dataclass(frozen=True, slots=True)
class Skipped:
    """A duplicate that is left alone, and why. ``problem``: it was meant to be acted on but could not be (missing,
    changed since indexed, its keeper gone...), as opposed to left alone by design (linked only through another
    member, a symbolic link, a hard link of its keeper)."""

    path: str
    reason: str
    problem: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "problem": self.problem}


@dataclass(slots=True)
class ActionPlan:
    """What an action run will do (the dry-run summary) and, once applied, what it did."""

    actions: list[Action] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    done: list[Action] = field(default_factory=list)
    failed: list[Skipped] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(max(a.item.size, 0) for a in self.actions)

    @property
    def problems(self) -> int:
        """Duplicates that were meant to be acted on but could not be (the run exits 1)."""
        return len(self.failed) + sum(s.problem for s in self.skipped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "planned": [a.as_dict() for a in self.actions],
            "skipped": [s.as_dict() for s in self.skipped],
            "done": [a.as_dict() for a in self.done],
            "failed": [f.as_dict() for f in self.failed],
        }


def common_root(report: DedupReport) -> Path:
    """The deepest directory holding every file of the report's groups."""
    parents = {str(Path(it.path).parent) for g in report.groups for it in (g.keeper, *(m.item for m in g.members))}
    return Path(os.path.commonpath(sorted(parents))) if parents else Path("/")


def plan_actions(
    report: DedupReport, *, move_to: Path | None = None, delete: bool = False, root: Path | None = None
) -> ActionPlan:
    """Decide what to move (under ``move_to``, keeping paths relative to ``root``) or delete, file by file.

    Raises ConfigError, before anything is done, when a destination exists already.
    """
    if (move_to is None) == (not delete):
        raise ConfigError("--move-to/--delete", "give exactly one of --move-to DIR and --delete")
    target_root = None if move_to is None else Path(move_to).expanduser().absolute()
    if target_root is not None and target_root.exists() and not target_root.is_dir():
        raise ConfigError("--move-to", f"{target_root} is not a directory")
    base = root or common_root(report)
    plan = ActionPlan()
    for group in report.groups:
        _plan_group(group, plan, target_root, base)
    _refuse_existing_targets(plan)
    return plan


def _plan_group(group: Group, plan: ActionPlan, target_root: Path | None, base: Path) -> None:
    keeper_problem = _keeper_problem(group.keeper)
    for member in group.members:
        by_design = _left_alone(member, group.keeper)
        problem = None if by_design else keeper_problem or _file_problem(member.item)
        if by_design or problem:
            plan.skipped.append(Skipped(member.item.path, by_design or problem or "", problem=not by_design))
            continue
        target = None if target_root is None else _target(member.item.path, target_root, base)
        kind: Literal["move", "delete"] = "delete" if target is None else "move"
        plan.actions.append(Action(kind, member.item, group.keeper, member.score, target))


def _target(path: str, target_root: Path, base: Path) -> Path:
    try:
        relative = Path(path).relative_to(base)
    except ValueError:
        relative = Path(path).relative_to(Path(path).anchor)
    return target_root / relative


def _refuse_existing_targets(plan: ActionPlan) -> None:
    taken = [str(a.target) for a in plan.actions if a.target is not None and os.path.lexists(a.target)]
    if taken:
        shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise ConfigError("--move-to", f"destination exists already: {shown}; nothing was moved")


def _keeper_problem(keeper: Item) -> str | None:
    """Why the keeper cannot vouch for its duplicates (gone, or not what was indexed), or None."""
    try:
        st = os.stat(keeper.path)
    except OSError as exc:
        return f"its keeper {keeper.path} is missing ({exc.strerror or exc})"
    if (st.st_size, st.st_mtime_ns) != (keeper.size, keeper.mtime_ns):
        return f"its keeper {keeper.path} changed since it was indexed (run `indexer index` first)"
    return None


def _left_alone(member: Member, keeper: Item) -> str | None:
    """Why this duplicate is not for the actions at all, or None."""
    if not member.direct:
        return f"joined only through another duplicate (cosine {member.score:.4f} to the keeper): left alone"
    if os.path.islink(member.item.path):
        return "is a symbolic link: left alone"
    return _same_file_problem(member.item, keeper)


def _file_problem(item: Item) -> str | None:
    try:
        st = os.lstat(item.path)
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
        return "changed since it was indexed (run `indexer index` first)"
    return None


def _same_file_problem(item: Item, keeper: Item) -> str | None:
    try:
        same = os.path.samefile(item.path, keeper.path)
    except OSError:
        same = False
    return "is the same file as its keeper (a hard link): left alone" if same else None


Progress = Callable[[Action, str | None], None]


def apply_plan(plan: ActionPlan, store: VectorStore, on_each: Progress | None = None) -> ActionPlan:
    """Carry the plan out, file by file, re-checking each file first; the store follows every change.

    ``on_each(action, error)`` is called after each file (error None when it was done). A file that cannot be
    moved or deleted is recorded in ``plan.failed`` and the rest goes on.
    """
    from indexer.store.payload import move_point

    for action in plan.actions:
        error = _recheck(action) or _apply_one(action, store, move_point)
        if error is None:
            plan.done.append(action)
        else:
            plan.failed.append(Skipped(action.item.path, error))
            log.warning("skipping %s: %s", action.item.path, error)
        if on_each is not None:
            on_each(action, error)
    store.flush()
    return plan


def _recheck(action: Action) -> str | None:
    return (
        _keeper_problem(action.keeper) or _file_problem(action.item) or _same_file_problem(action.item, action.keeper)
    )


def _apply_one(action: Action, store: VectorStore, move_point: Callable[..., None]) -> str | None:
    """Move or delete one file, then make the store follow; an OSError reason when the file could not be."""
    source = Path(action.item.path)
    try:
        if action.kind == "delete":
            os.unlink(source)
        else:
            assert action.target is not None
            move_file(source, action.target)
    except FileExistsError:
        return f"destination {action.target} appeared meanwhile: left in place"
    except OSError as exc:
        return f"{exc.strerror or exc}"
    _follow(action, store, move_point)
    return None


def _follow(action: Action, store: VectorStore, move_point: Callable[..., None]) -> None:
    """The store follows the file: a moved point keeps its vector under the new path, a deleted one leaves."""
    done = f"deleted {action.item.path}" if action.target is None else f"moved {action.item.path} -> {action.target}"
    try:
        if action.target is None:
            store.delete([action.item.id])
        else:
            st = os.stat(action.target)
            old = StoredPoint(action.item.id, {"path": action.item.path})
            move_point(store, old, FileEntry(action.target, st.st_size, st.st_mtime_ns))
    except (StoreError, RuntimeError, OSError) as exc:
        raise StoreError(
            f"{done}, but the store could not follow ({exc}): run `indexer index` on the folder to catch up"
        ) from exc


def move_file(source: Path, target: Path) -> None:
    """Move a file without ever replacing one: FileExistsError if ``target`` exists.

    On one filesystem: a hard link at the target, then the source name is removed. Across filesystems: a copy
    (data, mode, times) under a temporary name beside the target, fsynced, published without replacing, and only
    then the source removed. A crash at any point leaves the file under one name or both, never none.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        _copy_and_publish(source, target)
    os.unlink(source)


def _copy_and_publish(source: Path, target: Path) -> None:
    partial = temp_name(target)
    try:
        shutil.copy2(source, partial)
        if os.path.getsize(partial) != os.path.getsize(source):
            raise OSError(errno.EIO, f"copy of {source} is incomplete")
        fsync_path(partial)
        publish_new(partial, target)
    finally:
        partial.unlink(missing_ok=True)
