"""The pairs of stored vectors at or above a cosine threshold: the one decision rule, and the pass that does not
compare every pair.

Every pass (the exact numpy pass in `dedup`, the half-precision pass on a torch device in `pairs_torch`, the cell
pass here) lists *candidates* with a fast product and a margin below the threshold that covers its rounding error,
then `Verifier` decides each candidate the same way: its cosine recomputed in float64 from the stored float32 rows
is >= the threshold. The decision does not depend on the pass, the block size or the BLAS, so two passes that find
the same candidates report the same pairs, and no pass can report a pair below the threshold.

The cell pass (`cell_pairs`): spherical k-means on a sample splits the sphere into ``cells`` cells; every row lives
in its nearest cell (its home) and is compared (exact float32 products) with the rows living in its home and in the
other cells whose centre scores within ``reach`` of its home's, at most ``probes`` cells. A pair x, y is found when
y's home is among x's cells or x's home among y's. Why a reach: x's score to y's home is at least y's score to it
less |(x - y)·c|, and y's home scores at least as well for y as x's home does, so x reaches y's home whenever
|(x - y)·c_y| + |(x - y)·c_x| <= reach; for a near-duplicate (|x - y| <= 0.32 at cosine 0.95) those projections
are small unless x - y points along a centre. A pair split across cells that are far for both rows is missed. The
recall is measured against the exact pass (bench/bench_dedup.py); the cost is ≈ n·cells + n·probes·n/cells dot
products (usually far fewer probes than the cap) instead of n²/2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from indexer.library.export import VectorFile

log = logging.getLogger(__name__)

Index = npt.NDArray[np.int64]
Pairs = tuple[Index, Index]
Matrix = npt.NDArray[np.float32]
RowProgress = Callable[[int, int], None]

FP32_UNIT = 2.0**-24
# The reach covers every pair of the exact pass on CLIP-like data at 100k (the largest gap needed there: 0.037);
# ≈ 3-4 cells per row. The cap bounds the work of a row whose centres crowd within the reach.
DEFAULT_PROBES = 16
DEFAULT_REACH = 0.06
KMEANS_ITERATIONS = 8
SAMPLE_PER_CELL = 24
TILE = 4096


def product_margin(dim: int, unit_roundoff: float, output_roundoff: float = FP32_UNIT) -> float:
    """A bound on |computed - true| for the dot product of two unit rows rounded to a format of ``unit_roundoff``,
    accumulated in float32 and rounded to a format of ``output_roundoff``.

    Inputs: each factor is off by at most u relatively, so the sum of products by (2u + u²)·Σ|xᵢyᵢ| <= 2u + u² (for unit
    rows Σ|xᵢyᵢ| <= 1). Float32 accumulation of ``dim`` terms in any order: γ_dim = dim·u32/(1 - dim·u32) times the same
    sum. The result rounded: one more output unit. 1e-6 covers rows normalised in float32 (norms 1 ± a few ulps).
    """
    inputs = 2 * unit_roundoff + unit_roundoff**2
    accumulate = dim * FP32_UNIT / (1 - dim * FP32_UNIT) * (1 + unit_roundoff) ** 2
    return inputs + accumulate + output_roundoff * (1 + inputs) + 1e-6


class Verifier:
    """Decides candidate pairs by their float64 cosine from the stored float32 rows (the file memory-mapped)."""

    def __init__(self, matrix: VectorFile, threshold: float) -> None:
        self.threshold = threshold
        self.rows = open_rows(matrix)
        self.checked = 0

    def keep(self, left: Index, right: Index) -> Pairs:
        """The candidates (left[k], right[k]) whose cosine is >= the threshold."""
        if len(left) == 0:
            return left, right
        self.checked += len(left)
        scores = cosine64(self.rows[left], self.rows[right])
        ok = scores >= self.threshold
        return left[ok], right[ok]


def cosine64(a: Matrix, b: Matrix) -> npt.NDArray[np.float64]:
    """Row-wise dot products in float64 (the same arithmetic whichever pass asks)."""
    out: npt.NDArray[np.float64] = (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)
    return out


def open_rows(matrix: VectorFile) -> npt.NDArray[np.float32]:
    """The dump memory-mapped read-only (pages come from the page cache as rows are touched)."""
    if len(matrix) == 0:
        return np.zeros((0, matrix.dim), np.float32)
    return np.memmap(matrix.path, np.float32, "r", shape=(len(matrix), matrix.dim))


def unique_pairs(parts: list[Pairs], n: int) -> Pairs:
    """The union of pair lists, each pair once, as (i < j), sorted."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty
    left = np.concatenate([p[0] for p in parts])
    right = np.concatenate([p[1] for p in parts])
    keys = np.unique(np.minimum(left, right) * n + np.maximum(left, right))
    return keys // n, keys % n


# --- the cell pass ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cells:
    """Each row's nearest cell (``home``) and the cells it is compared with (the home first; -1 pads)."""

    home: npt.NDArray[np.int32]
    near: npt.NDArray[np.int32]  # (n, probes)
    count: int


def default_cells(n: int) -> int:
    """√(2n) balances placing the rows (n·cells) against comparing them (≈ 2 cells each: 2n·n/cells)."""
    return max(1, min(n // 8, round(math.sqrt(2 * n))))


def cell_pairs(
    matrix: VectorFile,
    threshold: float,
    *,
    probes: int = DEFAULT_PROBES,
    reach: float = DEFAULT_REACH,
    cells: int | None = None,
    seed: int = 0,
    on_rows: RowProgress | None = None,
) -> Pairs:
    """The pairs at cosine >= threshold found by comparing each row with the rows of its cells (its home and those
    within ``reach``, at most ``probes``); every reported pair is verified (`Verifier`), some may be missed (the
    module docstring says which)."""
    n = len(matrix)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty
    rows = open_rows(matrix)
    count = min(cells or default_cells(n), n)
    centres = spherical_kmeans(_sample(rows, count * SAMPLE_PER_CELL, seed), count, seed)
    placed = place(rows, centres, min(probes, count), reach)
    verifier = Verifier(matrix, threshold)
    margin = product_margin(matrix.dim, FP32_UNIT)
    found: list[Pairs] = []
    done = 0
    for members, visitors in _cell_lists(placed):
        found.append(_pairs_of_cell(rows, members, visitors, threshold - margin, verifier))
        done += len(members)
        if on_rows is not None:
            on_rows(done, n)
    left, right = unique_pairs(found, n)
    visits = int((placed.near >= 0).sum())
    log.info("cell pass: %d cells, %.2f per row, %d candidates checked, %d pairs", count, visits / n, verifier.checked,
             len(left))  # fmt: skip
    return left, right


def _sample(rows: Matrix, size: int, seed: int) -> Matrix:
    n = len(rows)
    if n <= size:
        return np.array(rows, np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return np.array(rows[pick], np.float32)


def spherical_kmeans(sample: Matrix, k: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> Matrix:
    """k unit centres by Lloyd's iterations on the sphere (each centre the normalised mean of its rows); an empty
    cell takes the row its centre explains worst."""
    rng = np.random.default_rng(seed)
    centres = sample[rng.choice(len(sample), k, replace=False)].copy()
    for _ in range(iterations):
        labels, scores = _nearest(sample, centres)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        filled = np.flatnonzero(counts)
        sums = np.zeros_like(centres)
        sums[filled] = np.add.reduceat(sample[order], np.concatenate([[0], np.cumsum(counts[filled])[:-1]]))
        empty = np.flatnonzero(counts == 0)
        sums[empty] = sample[np.argsort(scores)[: len(empty)]]
        centres = _unit(sums)
    return centres


def _unit(rows: Matrix) -> Matrix:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    out: Matrix = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def _nearest(rows: Matrix, centres: Matrix) -> tuple[npt.NDArray[np.int64], Matrix]:
    labels = np.empty(len(rows), np.int64)
    scores = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), TILE):
        s = rows[start : start + TILE] @ centres.T
        labels[start : start + TILE] = s.argmax(axis=1)
        scores[start : start + TILE] = s.max(axis=1)
    return labels, scores


def place(rows: Matrix, centres: Matrix, probes: int, reach: float) -> Cells:
    """Each row's nearest centres, nearest first: those within ``reach`` of the best, at most ``probes`` (-1 pads)."""
    n = len(rows)
    near = np.empty((n, probes), np.int32)
    for start in range(0, n, TILE):
        s = np.asarray(rows[start : start + TILE]) @ centres.T
        top = np.argpartition(-s, probes - 1, axis=1)[:, :probes] if probes < s.shape[1] else np.argsort(-s, axis=1)
        best = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-best, axis=1)
        top, best = np.take_along_axis(top, order, axis=1), np.take_along_axis(best, order, axis=1)
        near[start : start + TILE] = np.where(best >= best[:, :1] - reach, top, -1)
    return Cells(near[:, 0].copy(), near, len(centres))


def _cell_lists(placed: Cells) -> Iterator[tuple[Index, Index]]:
    """(rows whose home is the cell, rows that probe it from another home), cell by cell."""
    homes = _group_by(placed.home.astype(np.int64), placed.count)
    others = placed.near[:, 1:].ravel().astype(np.int64)
    visitor_rows = np.repeat(np.arange(len(placed.near), dtype=np.int64), placed.near.shape[1] - 1)
    reached = others >= 0
    visitors = _group_by(others[reached], placed.count, visitor_rows[reached])
    for cell in range(placed.count):
        if len(homes[cell]):
            yield homes[cell], visitors[cell]


def _group_by(keys: Index, count: int, values: Index | None = None) -> list[Index]:
    """values (default: the positions) grouped by key 0..count-1, each group sorted."""
    values = np.arange(len(keys), dtype=np.int64) if values is None else values
    order = np.lexsort((values, keys))
    bounds = np.searchsorted(keys[order], np.arange(count + 1))
    return [values[order[bounds[c] : bounds[c + 1]]] for c in range(count)]


def _pairs_of_cell(rows: Matrix, members: Index, visitors: Index, floor: float, verifier: Verifier) -> Pairs:
    """Verified pairs among the cell's rows, and between visitors and the cell's rows."""
    home = np.asarray(rows[members])
    parts = [_tile_pairs(home, home, members, members, floor, upper=True)]
    if len(visitors):
        parts.append(_tile_pairs(np.asarray(rows[visitors]), home, visitors, members, floor, upper=False))
    left = np.concatenate([p[0] for p in parts])
    right = np.concatenate([p[1] for p in parts])
    return verifier.keep(left, right)


def _tile_pairs(a: Matrix, b: Matrix, ids_a: Index, ids_b: Index, floor: float, upper: bool) -> Pairs:
    """Candidate pairs (ids) of a × b scoring >= floor, tile by tile; with ``upper`` (a is b) each pair once."""
    lefts, rights = [], []
    for i0 in range(0, len(a), TILE):
        for j0 in range(i0 if upper else 0, len(b), TILE):
            s = a[i0 : i0 + TILE] @ b[j0 : j0 + TILE].T
            i, j = np.nonzero(s >= floor)
            i, j = ids_a[i0 + i], ids_b[j0 + j]
            keep = i < j if upper else i != j
            lefts.append(i[keep])
            rights.append(j[keep])
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lefts), np.concatenate(rights)
