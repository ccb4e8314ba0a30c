"""Duplicates in the store: three tiers, groups with a suggested keeper, and the explicit actions on them.

    exact    same sha256: payload only, no vectors and no model
    near     cosine >= dedup.near_threshold (crops, resizes, re-encodes); exact copies are near-duplicates too
    similar  cosine >= dedup.similar_threshold (only when asked)

Near and similar: the vectors are copied out of the store into a temporary file (`export.dump_vectors`), and a
pass lists the pairs at or above the threshold; union-find joins them into groups. Memory: the ids, the union-find
array and a few blocks; the temporary file (n x dim float32) is read through the page cache. The passes (`PairPlan`):

    exact    one pass of blocked matrix products (``block x block`` scores at a time, never ``n x n``): every pair.
             On a GPU (chosen when CUDA is present, or ``device``) the products run there in half precision
             (`pairs_torch`) with the same answer.
    cells    for big libraries on the CPU: each vector compared with the vectors of its nearest k-means cells
             (`pairs.cell_pairs`): n²/2 products become ≈ 2·n·√(4n); pairs split across far cells can be missed
             (measured recall >= 0.999 on CLIP-like data: bench/README.md), no reported pair is below the threshold.
    auto     exact on a GPU, and on the CPU up to ``exact_up_to`` vectors; cells beyond.

Every pass decides a pair by the same rule (`pairs.Verifier`: the float64 cosine of the stored rows), so the exact
passes on the CPU and on a GPU report the same pairs and the same groups.

Keeper: the highest resolution, then the oldest (mtime), then the first path. Every other member carries its cosine
to the keeper. Groups are single-linkage, so a member joined only through another member can score below the
threshold: it is reported with ``direct=False`` and the actions never touch it.

The file actions on groups (move, delete) are `indexer.library.actions`'.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from indexer.errors import ConfigError, StoreError
from indexer.library.export import VectorDump, VectorFile, dump_vectors
from indexer.library.pairs import DEFAULT_PROBES, DEFAULT_REACH, FP32_UNIT, Pairs, Verifier, cell_pairs, product_margin
from indexer.records import SearchFilter, StoredPoint
from indexer.settings import DEDUP_MIN_THRESHOLD, DedupSettings

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)

Tier = Literal["exact", "near", "similar"]
TIERS: tuple[Tier, ...] = ("exact", "near", "similar")
DEFAULT_BLOCK = 4096
EXACT_UP_TO = 200_000  # the CPU's exact pass takes minutes up to here (bench/README.md); cells beyond
RowProgress = Callable[[int, int], None]
Method = Literal["auto", "exact", "cells"]


@dataclass(frozen=True, slots=True)
class PairPlan:
    """Which pass lists the pairs (see the module docstring): ``method``, the ``device`` ("auto": a GPU when CUDA
    is present, else the CPU; "cpu"; "cuda", "cuda:1"), the CPU's cut-over to cells, and the cells' reach and
    cap (`pairs.cell_pairs`)."""

    method: Method = "auto"
    device: str = "auto"
    exact_up_to: int = EXACT_UP_TO
    probes: int = DEFAULT_PROBES
    reach: float = DEFAULT_REACH

    @classmethod
    def from_settings(cls, settings: DedupSettings, *, exact: bool = False, device: str | None = None) -> PairPlan:
        """The plan of the settings (dedup.method, dedup.device, ...); ``--exact`` and ``--device`` override."""
        return cls(
            "exact" if exact else settings.method,
            device or settings.device,
            settings.exact_up_to,
            settings.probes,
            settings.reach,
        )


# --- records ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """A stored image as dedup sees it (from its payload)."""

    id: str
    path: str
    sha256: str
    width: int
    height: int
    mtime: float
    size: int  # -1 when the payload has none
    mtime_ns: int  # -1 when the payload has none

    @classmethod
    def from_point(cls, point: StoredPoint) -> Item:
        p = point.payload
        return cls(
            id=point.id,
            path=point.path,
            sha256=str(p.get("sha256") or ""),
            width=int(p.get("width") or 0),
            height=int(p.get("height") or 0),
            mtime=float(p.get("mtime") or 0.0),
            size=_int_or(p.get("size"), -1),
            mtime_ns=_int_or(p.get("mtime_ns"), -1),
        )

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "size": self.size,
            "mtime": self.mtime,
        }


def _int_or(value: Any, default: int) -> int:
    return default if value is None else int(value)


@dataclass(frozen=True, slots=True)
class Member:
    """A duplicate of a group's keeper: its cosine to the keeper, whether it is a byte-identical copy, and
    whether it is within the threshold of the keeper itself (``direct``) rather than only through another member."""

    item: Item
    score: float
    exact: bool
    direct: bool

    def as_dict(self) -> dict[str, Any]:
        return {**self.item.as_dict(), "score": round(self.score, 6), "exact": self.exact, "direct": self.direct}


@dataclass(frozen=True, slots=True)
class Group:
    """A keeper and its duplicates, best score first."""

    keeper: Item
    members: tuple[Member, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"keeper": self.keeper.as_dict(), "members": [m.as_dict() for m in self.members]}


@dataclass(frozen=True, slots=True)
class DedupReport:
    """The groups of one tier over ``scanned`` stored images."""

    tier: Tier
    threshold: float | None  # None for the exact tier
    scanned: int
    groups: tuple[Group, ...]

    @property
    def duplicates(self) -> int:
        return sum(len(g.members) for g in self.groups)

    @property
    def duplicate_bytes(self) -> int:
        return sum(max(m.item.size, 0) for g in self.groups for m in g.members)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "threshold": self.threshold,
            "scanned": self.scanned,
            "duplicates": self.duplicates,
            "duplicate_bytes": self.duplicate_bytes,
            "groups": [g.as_dict() for g in self.groups],
        }


def tier_threshold(tier: str, settings: DedupSettings, explicit: float | None = None) -> float | None:
    """The cosine threshold of a tier (None for exact); ``explicit`` (``--threshold``) overrides it."""
    if tier not in TIERS:
        raise ConfigError("--tier", f"{tier!r} is not one of {', '.join(TIERS)}")
    if tier == "exact":
        if explicit is not None:
            raise ConfigError("--threshold", "the exact tier compares sha256, not scores: drop --threshold")
        return None
    if explicit is not None and not -1.0 <= explicit <= 1.0:
        raise ConfigError("--threshold", f"{explicit} is not a cosine score in [-1, 1]")
    if explicit is not None and explicit < DEDUP_MIN_THRESHOLD:
        raise ConfigError(
            "--threshold", f"{explicit} is below {DEDUP_MIN_THRESHOLD}: nearly every image would join one group"
        )
    if explicit is not None:
        return explicit
    return settings.near_threshold if tier == "near" else settings.similar_threshold


# --- finding groups --------------------------------------------------------------------------------------------


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def union_pairs(self, left: npt.NDArray[np.int64], right: npt.NDArray[np.int64]) -> None:
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            self.union(a, b)

    def components(self) -> list[list[int]]:
        """Every set of two or more elements, each sorted, in order of its smallest element."""
        sets: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            root = self.find(x)
            if self.size[root] > 1:
                sets.setdefault(root, []).append(x)
        return list(sets.values())


def neighbour_pairs(
    matrix: VectorFile, threshold: float, block: int = DEFAULT_BLOCK, on_rows: RowProgress | None = None
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Every pair (i < j) of rows whose dot product is >= threshold, as index arrays, one block pair at a time.

    Only the upper triangle of blocks is computed (n²/2 dot products), ``block x block`` scores at a time.
    ``on_rows(done, n)`` is called after each block of rows.
    """
    if block < 1:
        raise ValueError(f"block must be positive, not {block}")
    n = len(matrix)
    verifier = Verifier(matrix, threshold)
    floor = threshold - product_margin(matrix.dim, FP32_UNIT)  # float32 products: candidates, decided in float64
    for r0, rows in matrix.blocks(block):
        for c0 in range(r0, n, block):
            cols = rows if c0 == r0 else matrix.rows(c0, c0 + block)
            pairs = _pairs_in_block(rows, cols, r0, c0, floor)
            if pairs is not None:
                yield verifier.keep(*pairs)
        if on_rows is not None:
            on_rows(min(r0 + block, n), n)


def _pairs_in_block(
    rows: npt.NDArray[np.float32], cols: npt.NDArray[np.float32], r0: int, c0: int, floor: float
) -> Pairs | None:
    scores = rows @ cols.T
    if r0 == c0:
        np.fill_diagonal(scores, -np.inf)  # a row and itself
    # Row maxima first: most rows have no neighbour, and a max is much cheaper than a full nonzero().
    hot = np.flatnonzero(scores.max(axis=1) >= floor)
    if hot.size == 0:
        return None
    i, j = np.nonzero(scores[hot] >= floor)
    left, right = (r0 + hot[i]).astype(np.int64), (c0 + j).astype(np.int64)
    keep = left < right
    return left[keep], right[keep]


def pair_lists(
    matrix: VectorFile, threshold: float, plan: PairPlan, block: int = DEFAULT_BLOCK, on_rows: RowProgress | None = None
) -> Iterator[Pairs]:
    """The pairs at or above threshold by the pass the plan picks for this matrix (see the module docstring)."""
    device = plan.device
    if device == "auto":
        from indexer.library.pairs_torch import cuda_present

        device = "cuda" if cuda_present() else "cpu"
    n = len(matrix)
    if plan.method == "cells" or (plan.method == "auto" and device == "cpu" and n > plan.exact_up_to):
        log.info("cell pass over %d vectors (reach %.3f, at most %d cells a row)", n, plan.reach, plan.probes)
        yield cell_pairs(matrix, threshold, probes=plan.probes, reach=plan.reach, on_rows=on_rows)
    elif device != "cpu":
        from indexer.library.pairs_torch import torch_pairs

        log.info("exact pass over %d vectors on %s", n, device)
        yield torch_pairs(matrix, threshold, device, on_rows=on_rows)
    else:
        log.info("exact pass over %d vectors on the CPU", n)
        yield from neighbour_pairs(matrix, threshold, block, on_rows)


def choose_keeper(items: Sequence[Item]) -> Item:
    """The highest resolution, then the oldest, then the first path."""
    return min(items, key=lambda it: (-it.pixels, it.mtime, it.path))


def find_duplicates(
    store: VectorStore,
    tier: Tier,
    *,
    threshold: float | None = None,
    filter: SearchFilter | None = None,
    block: int = DEFAULT_BLOCK,
    workdir: Path | None = None,
    on_rows: RowProgress | None = None,
    plan: PairPlan | None = None,
) -> DedupReport:
    """The duplicate groups of one tier among the stored images (matching the filter).

    ``threshold`` is required for near/similar (see `tier_threshold`). ``workdir`` holds the temporary vector
    file (default: the system temp directory). ``on_rows(done, total)`` is called as the neighbour pass goes
    (after each block of rows; near and similar tiers only). ``plan`` picks the pass (default: `PairPlan()`).
    """
    if store.model_info() is None:
        raise StoreError(f"the store {store.location} is empty: run `indexer index PATH` first")
    if tier == "exact":
        scanned, components = _sha_components(store, filter)
        groups = [_exact_group(points) for points in _retrieve_all(store, components)]
        return _report(tier, None, scanned, groups)
    if threshold is None:
        raise ValueError("near and similar tiers need a threshold")
    with tempfile.TemporaryDirectory(prefix="indexer-dedup-", dir=workdir) as tmp:
        dump = dump_vectors(store, Path(tmp), filter=filter)
        index_groups = _vector_components(dump, threshold, block, on_rows, plan or PairPlan())
        groups = _scored_groups(store, dump, index_groups, threshold)
    return _report(tier, threshold, len(dump.ids), groups)


def _report(tier: Tier, threshold: float | None, scanned: int, groups: list[Group]) -> DedupReport:
    report = DedupReport(
        tier, threshold, scanned, tuple(sorted(groups, key=lambda g: (-len(g.members), g.keeper.path)))
    )
    log.info("%s tier: %d groups, %d duplicates among %d images", tier, len(groups), report.duplicates, scanned)
    return report


def _sha_components(store: VectorStore, flt: SearchFilter | None) -> tuple[int, list[list[str]]]:
    """(points scanned, ids grouped by sha256 for every hash held by two points or more); payload only."""
    first: dict[str, str] = {}
    dupes: dict[str, list[str]] = {}
    scanned = 0
    for point in store.scroll(filter=flt):
        scanned += 1
        sha = str(point.payload.get("sha256") or "")
        if not sha:
            continue
        if sha in first:
            dupes.setdefault(sha, [first[sha]]).append(point.id)
        else:
            first[sha] = point.id
    return scanned, list(dupes.values())


def _retrieve_all(store: VectorStore, components: list[list[str]]) -> Iterator[list[StoredPoint]]:
    """The stored points of each component (those still in the store), two or more per component."""
    found = {p.id: p for p in store.retrieve([i for comp in components for i in comp])}
    for comp in components:
        points = [found[i] for i in comp if i in found]
        if len(points) > 1:
            yield points


def _exact_group(points: list[StoredPoint], keeper_id: str | None = None) -> Group:
    items = [Item.from_point(p) for p in points]
    keeper = next((it for it in items if it.id == keeper_id), None) or choose_keeper(items)
    members = [Member(it, 1.0, True, True) for it in sorted(items, key=lambda it: it.path) if it is not keeper]
    return Group(keeper, tuple(members))


def _vector_components(
    dump: VectorDump, threshold: float, block: int, on_rows: RowProgress | None, plan: PairPlan
) -> list[list[int]]:
    """Row indices grouped by union-find over the pairs at or above threshold (and over equal sha256s)."""
    uf = UnionFind(len(dump.ids))
    first: dict[str, int] = {}
    for index, sha in enumerate(dump.sha256s):
        if sha:
            uf.union(first.setdefault(sha, index), index)
    pairs = 0
    for left, right in pair_lists(dump.matrix, threshold, plan, block, on_rows):
        uf.union_pairs(left, right)
        pairs += len(left)
    log.info("%d pairs at cosine >= %.3f among %d vectors", pairs, threshold, len(dump.ids))
    return uf.components()


def _scored_groups(store: VectorStore, dump: VectorDump, components: list[list[int]], threshold: float) -> list[Group]:
    found = {p.id: Item.from_point(p) for p in store.retrieve([dump.ids[i] for c in components for i in c])}
    groups = []
    for comp in components:
        rows = [i for i in comp if dump.ids[i] in found]
        if len(rows) > 1:
            groups.append(_scored_group([found[dump.ids[i]] for i in rows], dump.matrix.take(rows), threshold))
    return groups


def _scored_group(
    items: list[Item], vectors: npt.NDArray[np.float32], threshold: float, keeper: Item | None = None
) -> Group:
    keeper_at = items.index(keeper or choose_keeper(items))
    keeper = items[keeper_at]
    scores = (vectors @ vectors[keeper_at]).tolist()
    members = []
    for item, score in zip(items, scores, strict=True):
        if item is not keeper:
            exact = bool(item.sha256) and item.sha256 == keeper.sha256
            members.append(Member(item, float(score), exact, exact or score >= threshold))
    members.sort(key=lambda m: (-m.score, m.item.path))
    return Group(keeper, tuple(members))


def rekeep(store: VectorStore, group: Group, keeper_id: str, threshold: float | None) -> Group:
    """The group with another of its images as keeper: scores (and ``direct``) recomputed against it from the
    stored vectors (exact tier, ``threshold`` None: every member is an exact copy). Images the store no longer
    holds drop out; an id outside the group is a ConfigError."""
    ids = [group.keeper.id, *(m.item.id for m in group.members)]
    if keeper_id not in ids:
        raise ConfigError("keeper", f"{keeper_id} is not an image of this group")
    points = [p for p in store.retrieve(ids, with_vectors=threshold is not None) if p.id in ids]
    if keeper_id not in {p.id for p in points}:
        raise ConfigError("keeper", f"{keeper_id} is no longer in the store")
    if threshold is None:
        return _exact_group(points, keeper_id)
    items = [Item.from_point(p) for p in points]
    vectors = np.stack([np.asarray(p.vector, np.float32) for p in points])
    return _scored_group(items, vectors, threshold, next(it for it in items if it.id == keeper_id))
