"""The plan stage: what a write has to do, from comparing the disk (a scan, or a batch of watcher changes) with the
store. It reads files' metadata and the store, and writes nothing; `indexer.ingest.pipeline.Indexer` carries plans out.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.decode.image import SUPPORTED_EXTENSIONS, hash_file
from indexer.errors import ConfigError
from indexer.records import Failure, FileEntry, RunSummary, SearchFilter, StoredPoint, name_problem, point_id
from indexer.settings import Settings
from indexer.sources.events import ChangeKind, FileChange
from indexer.sources.scan import normalise_root, scan
from indexer.sources.shards import is_shard_point
from indexer.store.protocol import FailureRecord, VectorStore

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a write has to do. ``to_embed``: files to decode and embed; ``gone``: stored points whose files left the
    disk; ``stored_paths``: paths the store held when planned (a failing one loses its stale vector);
    ``shard_points``: the stored points of tar shards under the directory roots, by shard file, met by the same
    scroll of the store (so that the shards' diff does not scroll every point again)."""

    to_embed: list[FileEntry] = field(default_factory=list)
    gone: dict[str, StoredPoint] = field(default_factory=dict)
    stored_paths: set[str] = field(default_factory=set)
    shard_points: dict[str, list[StoredPoint]] = field(default_factory=dict)


def check_roots(paths: Sequence[str | Path]) -> list[Path]:
    """Normalised roots; a root that does not exist is a usage error (never a mass deletion)."""
    roots = [normalise_root(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise ConfigError("PATH", f"{root} does not exist")
    return roots


def scan_entries(roots: Sequence[Path], settings: Settings, on_error: Callable[[Failure], None]) -> Iterator[FileEntry]:
    """The image files under ``roots``, as the settings say to walk them."""
    return scan(
        list(roots),
        SUPPORTED_EXTENSIONS,
        follow_symlinks=settings.index.follow_symlinks,
        include_hidden=settings.index.include_hidden,
        on_error=on_error,
    )


def unchanged(entry: FileEntry, point: StoredPoint) -> bool:
    """The stored point still describes the file (same size and modification time)."""
    return bool(point.payload.get("size") == entry.size and point.payload.get("mtime_ns") == entry.mtime_ns)


def plan_roots(
    roots: Sequence[Path],
    settings: Settings,
    store: VectorStore,
    summary: RunSummary,
    known_failures: Mapping[str, FailureRecord] | None = None,
) -> Plan:
    """Diff the disk against the store: which files to embed, which stored points are gone. A file not stored
    that is in ``known_failures`` with its size and mtime unchanged is not read again (it would fail again)."""
    known = known_failures or {}
    stored: dict[str, StoredPoint] = {}
    shard_points: dict[str, list[StoredPoint]] = {}
    for root in roots:
        for point in store.scroll(filter=SearchFilter(path_prefix=str(root))):
            if is_shard_point(point):  # shards have their own diff (`indexer.ingest.shard_index`)
                shard_points.setdefault(str(point.payload["shard"]), []).append(point)
            else:
                stored[point.path] = point
    plan = Plan(stored_paths=set(stored), shard_points=shard_points)
    for entry in scan_entries(roots, settings, summary.add_failure):
        old = stored.pop(str(entry.path), None)
        if old is not None and unchanged(entry, old):
            summary.unchanged += 1
        elif (
            old is None
            and (failed := known.get(str(entry.path)))
            and failed.unchanged_since(entry.size, entry.mtime_ns)
        ):
            summary.known_failures += 1
        else:
            plan.to_embed.append(entry)
    plan.gone = stored
    log.info("%d to embed, %d unchanged, %d known failures, %d gone from disk",
             len(plan.to_embed), summary.unchanged, summary.known_failures, len(plan.gone))  # fmt: skip
    return plan


def defer_fresh(plan: Plan, seconds: float) -> list[FileEntry]:
    """Take out of the plan the files modified less than ``seconds`` ago (maybe still being written)."""
    if seconds <= 0:
        return []
    newest_ns = time.time_ns() - int(seconds * 1e9)
    deferred = [e for e in plan.to_embed if e.mtime_ns > newest_ns]
    if deferred:
        plan.to_embed = [e for e in plan.to_embed if e.mtime_ns <= newest_ns]
    return deferred


def find_moves(plan: Plan) -> list[tuple[StoredPoint, FileEntry]]:
    """New files with the content (sha256) of a vanished point: (the point, the file that takes over its vector).
    The moved points leave ``plan.gone`` and their files leave ``plan.to_embed``."""
    by_sha = _gone_by_sha(plan.gone)
    if not by_sha:
        return []
    sizes = {int(p.payload.get("size", -1)) for p in plan.gone.values()}
    moves: list[tuple[StoredPoint, FileEntry]] = []
    remaining: list[FileEntry] = []
    for entry in plan.to_embed:
        old = _moved_from(entry, plan, sizes, by_sha)
        if old is None:
            remaining.append(entry)
        else:
            moves.append((old, entry))
            del plan.gone[old.path]
    plan.to_embed = remaining
    return moves


def _gone_by_sha(gone: dict[str, StoredPoint]) -> dict[str, list[StoredPoint]]:
    by_sha: dict[str, list[StoredPoint]] = {}
    for point in gone.values():
        sha = point.payload.get("sha256")
        if sha:
            by_sha.setdefault(str(sha), []).append(point)
    return by_sha


def _moved_from(
    entry: FileEntry, plan: Plan, sizes: set[int], by_sha: dict[str, list[StoredPoint]]
) -> StoredPoint | None:
    if str(entry.path) in plan.stored_paths or entry.size not in sizes or name_problem(entry.path):
        return None  # (a name that cannot be stored goes on to decode, which reports it)
    try:
        sha = hash_file(entry.path)
    except OSError:
        return None  # the decode stage will report it
    candidates = by_sha.get(sha)
    return candidates.pop() if candidates else None


# --- a batch of watcher changes ------------------------------------------------------------------------------------


@dataclass
class Wanted:
    """A batch of complete changes, sorted: files to upsert, renames, paths gone, folders deleted."""

    upserts: list[FileEntry] = field(default_factory=list)
    moves: list[tuple[Path, FileEntry]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    trees: list[Path] = field(default_factory=list)


def sort_changes(changes: Sequence[FileChange]) -> Wanted:
    """What a batch of changes asks for, each file looked at as it is now."""
    wanted = Wanted()
    for change in changes:
        if change.kind is ChangeKind.DELETE_TREE:
            wanted.trees.append(change.path)
            continue
        entry = _stat_entry(change.path) if change.kind is not ChangeKind.DELETE else None
        if entry is None:
            wanted.gone.add(str(change.path))
            if change.src is not None:  # moved here, then deleted: the old point goes too
                wanted.gone.add(str(change.src))
        elif change.kind is ChangeKind.MOVE and change.src is not None:
            wanted.moves.append((change.src, entry))
        else:
            wanted.upserts.append(entry)
    return wanted


def _stat_entry(path: Path) -> FileEntry | None:
    """The file as it is now; None when it is gone (or not a regular file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileEntry(path, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def plan_changes(wanted: Wanted, store: VectorStore, summary: RunSummary) -> Plan:
    """A Plan for a batch of changes (renames already applied): files to embed (unchanged ones dropped) and points
    whose files are gone."""
    stored = {p.path: p for p in store.retrieve([point_id(e.path) for e in wanted.upserts])}
    plan = Plan(stored_paths=set(stored))
    for entry in wanted.upserts:
        old = stored.get(str(entry.path))
        if old is not None and unchanged(entry, old):
            summary.unchanged += 1
        else:
            plan.to_embed.append(entry)
    points = store.retrieve([point_id(p) for p in sorted(wanted.gone)])
    for tree in wanted.trees:
        points.extend(store.scroll(filter=SearchFilter(path_prefix=str(tree))))
    # Only what is really gone from disk: an event can be stale (a folder renamed away and back, a re-created file).
    plan.gone = {p.path: p for p in points if not os.path.lexists(p.path)}
    plan.stored_paths |= set(plan.gone)
    return plan
