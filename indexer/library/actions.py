"""File actions on duplicate groups: move or delete the direct members, never the keeper.

`plan_actions` turns a `DedupReport` into an `ActionPlan` (what moves where, what is left alone and why; a
destination that exists, or a target outside the allowed folders or reached through a symbolic link, refuses the
whole plan); `apply_plan` re-checks each file right before acting and never replaces an existing file:

- the folders of the member and of its keeper are held open (`indexer.library.folders`) and their real paths must
  be the ones recorded when the files were indexed (payload ``real_dir``): a folder swapped for a symbolic link
  since then is never acted through;
- both files must still be regular files with the size, mtime and **content (sha256)** they were indexed with, so
  the keeper really holds what the member is deleted for;
- a move target is created below the target folder one name at a time without following links.

The store follows each file: a deleted file's point is removed; a moved file's point is re-keyed to its new path
with its vector kept when the target lies under an indexed folder (`Places.indexed`: watch.paths, serve.roots),
and removed otherwise, so duplicates moved out of the library leave the index and a later scan does not report
them again.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from indexer.errors import ConfigError, StoreError
from indexer.library.dedup import DedupReport, Group, Item, Member
from indexer.library.folders import (
    Folder,
    Refused,
    is_under,
    lstat_in,
    move_in,
    opened,
    real_target,
    recorded_folder,
    sha256_in,
    target_folder,
    unlink_in,
)
from indexer.records import FileEntry, StoredPoint
from indexer.settings import Settings

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)


# --- where moves go ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Places:
    """Where a move may go, and where a moved file stays indexed (real paths).

    ``allowed``: folders a move target must lie under (None: anywhere the caller may write, as for `indexer dedup`
    run by the user). ``indexed``: the folders the index covers; a file moved under one keeps its point (re-keyed,
    vector kept: the next `indexer index` of that folder would find it anyway), a file moved anywhere else leaves
    the index.
    """

    allowed: tuple[Path, ...] | None = None
    indexed: tuple[Path, ...] = ()

    @classmethod
    def for_cli(cls, settings: Settings) -> Places:
        """`indexer dedup`: any target the user names; indexed folders from watch.paths and serve.roots."""
        return cls(None, indexed_folders(settings))

    @classmethod
    def for_service(cls, settings: Settings) -> Places:
        """The web page: targets under serve.roots or dedup.duplicates_dir only (none when neither is set)."""
        allowed = [*settings.serve.roots, *([settings.dedup.duplicates_dir] if settings.dedup.duplicates_dir else [])]
        return cls(_real_paths(allowed), indexed_folders(settings))


def indexed_folders(settings: Settings) -> tuple[Path, ...]:
    """The folders the index covers, as configured: watch.paths and serve.roots (real paths)."""
    return _real_paths([*settings.watch.paths, *settings.serve.roots])


def _real_paths(paths: Sequence[str]) -> tuple[Path, ...]:
    return tuple(real_target(Path(os.path.abspath(Path(p).expanduser()))) for p in paths if p)


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
    """What an action run will do (the dry-run summary) and, once applied, what it did. ``target_root``: the
    folder moves go to; ``stays_indexed``: whether the moved files keep their points (the target lies under an
    indexed folder) or leave the index."""

    actions: list[Action] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    done: list[Action] = field(default_factory=list)
    failed: list[Skipped] = field(default_factory=list)
    target_root: Path | None = None
    places: Places = field(default_factory=Places)
    stays_indexed: bool = False

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
            **({"moved_stay_indexed": self.stays_indexed} if self.target_root is not None else {}),
        }


def common_root(report: DedupReport) -> Path:
    """The deepest directory holding every file of the report's groups."""
    parents = {str(Path(it.path).parent) for g in report.groups for it in (g.keeper, *(m.item for m in g.members))}
    return Path(os.path.commonpath(sorted(parents))) if parents else Path("/")


def plan_actions(
    report: DedupReport,
    *,
    move_to: Path | None = None,
    delete: bool = False,
    root: Path | None = None,
    places: Places | None = None,
    store: VectorStore | None = None,
) -> ActionPlan:
    """Decide what to move (under ``move_to``, keeping paths relative to ``root``) or delete, file by file.

    ``places``: where moves may go and which folders are indexed (default: anywhere, none). With ``store``, the
    folders of members and keepers are checked against their recorded real paths already here (the dry run shows
    it); `apply_plan` checks them again in any case.

    Raises ConfigError, before anything is done, when a destination exists already, when the target folder lies
    outside the allowed ones, or when a folder below it is a symbolic link.
    """
    if (move_to is None) == (not delete):
        raise ConfigError("--move-to/--delete", "give exactly one of --move-to DIR and --delete")
    places = places or Places()
    target_root = None if move_to is None else Path(os.path.abspath(Path(move_to).expanduser()))
    plan = ActionPlan(target_root=target_root, places=places)
    if target_root is not None:
        _check_target_root(target_root, places)
        plan.stays_indexed = is_under(real_target(target_root), places.indexed)
    base = root or common_root(report)
    recorded = _recorded(store, report.groups) if store is not None else None
    for group in report.groups:
        _plan_group(group, plan, base, recorded)
    _refuse_linked_targets(plan)
    _refuse_existing_targets(plan)
    return plan


def _check_target_root(target_root: Path, places: Places) -> None:
    if os.path.exists(target_root) and not os.path.isdir(target_root):
        raise ConfigError("--move-to", f"{target_root} is not a directory")
    if places.allowed is not None and not is_under(real_target(target_root), places.allowed):
        raise ConfigError("move_to", f"{target_root} lies outside the folders moves may go to")


def _plan_group(group: Group, plan: ActionPlan, base: Path, recorded: dict[str, dict[str, Any]] | None) -> None:
    keeper_problem = _keeper_problem(group.keeper) or _recorded_problem(group.keeper, recorded, keeper=True)
    for member in group.members:
        by_design = _left_alone(member, group.keeper, plan.target_root)
        problem = None
        if not by_design:
            problem = keeper_problem or _file_problem(member.item) or _recorded_problem(member.item, recorded)
        if by_design or problem:
            plan.skipped.append(Skipped(member.item.path, by_design or problem or "", problem=not by_design))
            continue
        target = None if plan.target_root is None else _target(member.item.path, plan.target_root, base)
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


def _refuse_linked_targets(plan: ActionPlan) -> None:
    """No folder from the target folder down to a target may be a symbolic link (a move never follows one)."""
    root = plan.target_root
    checked: set[Path] = set()
    for action in plan.actions:
        if action.target is None or root is None:
            continue
        for folder in (action.target.parent, *action.target.parent.parents):
            if not folder.is_relative_to(root) or folder == root or folder in checked:
                break
            checked.add(folder)
            if os.path.islink(folder):
                raise ConfigError(
                    "--move-to",
                    f"{folder} is a symbolic link: moves never follow links below {root}; nothing was moved",
                )


def _recorded(store: VectorStore, groups: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """The stored payload of every file of the groups, by point id (the index's record, read now)."""
    ids = [it.id for g in groups for it in (g.keeper, *(m.item for m in g.members))]
    return {p.id: p.payload for p in store.retrieve(ids)} if ids else {}


def _recorded_problem(item: Item, recorded: dict[str, dict[str, Any]] | None, keeper: bool = False) -> str | None:
    """Why the file's folder is not the one it was indexed in (checked by real path), or None."""
    if recorded is None:
        return None
    who = f"its keeper {item.path}: " if keeper else ""
    payload = recorded.get(item.id)
    if payload is None:
        return f"{who}no longer in the index (run `indexer index` first)"
    parent = Path(item.path).parent
    expected = _recorded_dir(payload) or str(parent)
    real = os.path.realpath(parent)
    if real != expected:
        return (
            f"{who}its folder {parent} now leads to {real}, not to {expected} where it was indexed "
            "(a folder on the way was replaced by a symbolic link or moved): left alone"
        )
    return None


def _recorded_dir(payload: dict[str, Any]) -> str | None:
    real_dir = payload.get("real_dir")
    return real_dir if isinstance(real_dir, str) and os.path.isabs(real_dir) else None


def _keeper_problem(keeper: Item) -> str | None:
    """Why the keeper cannot vouch for its duplicates (gone, or not what was indexed), or None."""
    try:
        st = os.stat(keeper.path)
    except OSError as exc:
        return f"its keeper {keeper.path} is missing ({exc.strerror or exc})"
    if (st.st_size, st.st_mtime_ns) != (keeper.size, keeper.mtime_ns):
        return f"its keeper {keeper.path} changed since it was indexed (run `indexer index` first)"
    return None


def _left_alone(member: Member, keeper: Item, target_root: Path | None) -> str | None:
    """Why this duplicate is not for the actions at all, or None."""
    if not member.direct:
        return f"joined only through another duplicate (cosine {member.score:.4f} to the keeper): left alone"
    if os.path.islink(member.item.path):
        return "is a symbolic link: left alone"
    if target_root is not None and Path(member.item.path).is_relative_to(target_root):
        return f"is in {target_root} already (moved there before): left alone"
    if os.path.islink(keeper.path):
        same = _same_file(member.item, keeper)
        what = "a symbolic link to this file" if same else "a symbolic link"
        return f"its keeper {keeper.path} is {what}: left alone (keep a real file)"
    return "is the same file as its keeper (a hard link): left alone" if _same_file(member.item, keeper) else None


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


def _same_file(item: Item, keeper: Item) -> bool:
    try:
        return os.path.samefile(item.path, keeper.path)
    except OSError:
        return False


# --- carrying a plan out ---------------------------------------------------------------------------------------

OnAction = Callable[[Action, str | None], None]  # called after each action with its error (None: done)


def apply_plan(plan: ActionPlan, store: VectorStore, on_each: OnAction | None = None) -> ActionPlan:
    """Carry the plan out, file by file, re-checking each file first; the store follows every change.

    ``on_each(action, error)`` is called after each file (error None when it was done). A file that cannot be
    moved or deleted is recorded in ``plan.failed`` and the rest goes on.
    """
    recorded = {p.id: p.payload for p in store.retrieve([i for a in plan.actions for i in (a.item.id, a.keeper.id)])}
    hashes: dict[str, tuple[tuple[int, ...], str]] = {}
    for action in plan.actions:
        error = _apply_one(action, plan, recorded, hashes)
        if error is None:
            _follow(action, plan, store)
            plan.done.append(action)
        else:
            plan.failed.append(Skipped(action.item.path, error))
            log.warning("skipping %s: %s", action.item.path, error)
        if on_each is not None:
            on_each(action, error)
    store.flush()
    return plan


def _apply_one(
    action: Action, plan: ActionPlan, recorded: dict[str, dict[str, Any]], hashes: dict[str, Any]
) -> str | None:
    """Check and move or delete one file; the reason when it was not done."""
    keeper, item = action.keeper, action.item
    try:
        if keeper.id not in recorded or item.id not in recorded:
            missing = keeper if keeper.id not in recorded else item
            raise Refused(f"{missing.path} is no longer in the index (run `indexer index` first)")
        with (
            recorded_folder(keeper.path, _recorded_dir(recorded[keeper.id]), f"its keeper {keeper.path}: ") as kdir,
            recorded_folder(item.path, _recorded_dir(recorded[item.id])) as mdir,
        ):
            _verify(action, kdir, mdir, hashes)
            _act(action, plan, mdir)
    except Refused as exc:
        return str(exc)
    except FileExistsError:
        return f"destination {action.target} appeared meanwhile: left in place"
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return None


def _verify(action: Action, kdir: Folder, mdir: Folder, hashes: dict[str, Any]) -> None:
    """Both files as indexed, right now: regular files, same size and mtime, same sha256; not one file."""
    keeper, item = action.keeper, action.item
    kst = _stat_as_indexed(kdir, keeper, f"its keeper {keeper.path}")
    mst = _stat_as_indexed(mdir, item, "it")
    if os.path.samestat(kst, mst):
        raise Refused("is the same file as its keeper (a hard link): left alone")
    fingerprint = (kst.st_dev, kst.st_ino, kst.st_size, kst.st_mtime_ns, kst.st_ctime_ns)
    cached = hashes.get(keeper.id)
    if cached is None or cached[0] != fingerprint:
        cached = hashes[keeper.id] = (fingerprint, sha256_in(kdir, Path(keeper.path).name))
    if not keeper.sha256 or cached[1] != keeper.sha256:
        raise Refused(f"its keeper {keeper.path} no longer holds what was indexed (sha256 differs): left alone")
    if not item.sha256 or sha256_in(mdir, Path(item.path).name) != item.sha256:
        raise Refused("its content is not what was indexed (sha256 differs; run `indexer index` first): left alone")


def _stat_as_indexed(folder: Folder, item: Item, who: str) -> os.stat_result:
    try:
        st = lstat_in(folder, Path(item.path).name)
    except FileNotFoundError:
        raise Refused(f"{who} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{who} is not a regular file (a symbolic link, or replaced)")
    if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
        raise Refused(f"{who} changed since it was indexed (run `indexer index` first)")
    return st


def _act(action: Action, plan: ActionPlan, mdir: Folder) -> None:
    name = Path(action.item.path).name
    if action.target is None:
        unlink_in(mdir, name)
        return
    assert plan.target_root is not None
    below = action.target.parent.relative_to(plan.target_root)
    with target_folder(plan.target_root, below, plan.places.allowed) as tdir:
        move_in(mdir, name, tdir, action.target.name)


def _follow(action: Action, plan: ActionPlan, store: VectorStore) -> None:
    """The store follows the file: a moved point keeps its vector under the new path when it stays in an indexed
    folder, and leaves the index otherwise, as a deleted one does."""
    from indexer.store.payload import move_point

    done = f"deleted {action.item.path}" if action.target is None else f"moved {action.item.path} -> {action.target}"
    try:
        if action.target is None or not plan.stays_indexed:
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
    """Move a file without ever replacing one (FileExistsError if ``target`` exists), creating the target's
    folder as needed; by path, for callers that hold no open folders (`indexer.library.folders.move_in`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with opened(source.parent) as src, opened(target.parent) as dst:
        move_in(src, source.name, dst, target.name)
