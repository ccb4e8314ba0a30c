"""The pair passes of dedup: the half-precision torch pass (run here on the CPU device, the code path a GPU runs)
reports exactly the numpy pass's pairs and groups; the cell pass finds the planted near-duplicates of CLIP-like
data and never reports a pair below the threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench.vectors import clip_like
from indexer.library.dedup import PairPlan, UnionFind, neighbour_pairs, pair_lists
from indexer.library.export import VectorFile
from indexer.library.pairs import Pairs, cell_pairs, cosine64, product_margin, unique_pairs
from indexer.library.pairs_torch import HALF_UNIT, torch_pairs

THRESHOLD = 0.95
Matrix = npt.NDArray[np.float32]


def write(tmp_path: Path, vectors: Matrix) -> VectorFile:
    path = tmp_path / "v.f32"
    path.write_bytes(np.ascontiguousarray(vectors, np.float32).tobytes())
    return VectorFile(path, vectors.shape[1])


def at_cosine(base: Matrix, cos: float, rng: np.random.Generator) -> Matrix:
    other = rng.standard_normal(len(base)).astype(np.float32)
    other -= (other @ base) * base
    other /= np.linalg.norm(other)
    v = (cos * base.astype(np.float64) + np.sqrt(1 - cos**2) * other).astype(np.float32)
    out: Matrix = v / np.linalg.norm(v)
    return out


def with_edge_pairs(vectors: Matrix, seed: int = 3) -> Matrix:
    """Pairs planted right at the threshold (±1e-5 ... ±1e-3): the ones half precision alone would get wrong."""
    rng = np.random.default_rng(seed)
    out = vectors.copy()
    for k, delta in enumerate([1e-5, -1e-5, 1e-4, -1e-4, 4e-4, -4e-4, 1e-3, -1e-3, 0.0]):
        base, member = 10 * k + 1, 10 * k + 7
        out[member] = at_cosine(out[base], THRESHOLD + delta, rng)
    return out


def as_set(pairs: Pairs) -> set[tuple[int, int]]:
    return set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))


def groups(pairs: Pairs, n: int) -> list[list[int]]:
    uf = UnionFind(n)
    uf.union_pairs(*pairs)
    return sorted(uf.components())


def brute(vectors: Matrix) -> set[tuple[int, int]]:
    v = vectors.astype(np.float64)
    i, j = np.nonzero(np.triu(v @ v.T, 1) >= THRESHOLD)
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_half_precision_margin_covers_float16_rounding() -> None:
    margin = product_margin(768, HALF_UNIT, HALF_UNIT)
    assert 1.4e-3 < margin < 1.7e-3  # 3 units of 2^-11, plus float32 accumulation over 768 terms


@pytest.mark.parametrize("block", [256, 1000])
def test_torch_pass_on_the_cpu_device_equals_the_numpy_pass(tmp_path: Path, block: int) -> None:
    vectors, planted = clip_like(2_500, seed=5)
    vectors = with_edge_pairs(vectors)
    matrix = write(tmp_path, vectors)
    numpy_pairs = unique_pairs(list(neighbour_pairs(matrix, THRESHOLD, 512)), len(vectors))
    torch_found = torch_pairs(matrix, THRESHOLD, "cpu", block=block)
    assert as_set(torch_found) == as_set(numpy_pairs) == brute(vectors)
    assert groups(torch_found, len(vectors)) == groups(numpy_pairs, len(vectors))
    edge = as_set(numpy_pairs)
    assert {(1, 7), (21, 27), (41, 47), (61, 67), (81, 87)} <= edge  # at +1e-5 ... +1e-3 and exactly 0.95
    assert not {(11, 17), (31, 37), (51, 57), (71, 77)} & edge  # at -1e-5 ... -1e-3
    assert len(planted.groups) >= 20


def test_cell_pass_finds_every_planted_pair_and_no_false_one(tmp_path: Path) -> None:
    vectors, planted = clip_like(6_000, seed=7)
    matrix = write(tmp_path, vectors)
    found = as_set(cell_pairs(matrix, THRESHOLD))
    exact = brute(vectors)
    assert found <= exact  # every reported pair is verified
    wanted = {(min(g[0], m), max(g[0], m)) for g in planted.groups for m in g[1:]}
    wanted = {(a, b) for a, b in wanted if cosine64(vectors[[a]], vectors[[b]])[0] >= THRESHOLD}
    assert len(wanted) >= 100 and wanted <= found
    assert len(found) >= 0.99 * len(exact)


def test_cell_pass_with_one_cell_is_exact(tmp_path: Path) -> None:
    vectors = with_edge_pairs(clip_like(1_500, seed=2)[0])
    found = as_set(cell_pairs(write(tmp_path, vectors), THRESHOLD, cells=1))
    assert found == brute(vectors)


def test_plan_picks_cells_beyond_the_cut_over_and_exact_below(tmp_path: Path) -> None:
    vectors = with_edge_pairs(clip_like(1_500, seed=2)[0])
    matrix = write(tmp_path, vectors)
    exact = brute(vectors)
    below = PairPlan(device="cpu", exact_up_to=1_500)
    assert as_set(unique_pairs(list(pair_lists(matrix, THRESHOLD, below)), 1_500)) == exact
    beyond = PairPlan(device="cpu", exact_up_to=1_000)
    assert as_set(unique_pairs(list(pair_lists(matrix, THRESHOLD, beyond)), 1_500)) <= exact


def test_dedup_imports_no_torch_without_a_gpu(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from pathlib import Path;"
        "from indexer.library.dedup import PairPlan, pair_lists; from indexer.library.export import VectorFile;"
        f"p = Path({str(tmp_path / 'v.f32')!r}); p.write_bytes(np.eye(4, 8, dtype=np.float32).tobytes());"
        "list(pair_lists(VectorFile(p, 8), 0.9, PairPlan()));"
        "print('torch' in sys.modules)"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_spherical_kmeans_finds_separated_clusters_and_fills_empty_cells() -> None:
    from indexer.library.pairs import spherical_kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = np.repeat(centres, 50, axis=0) + 0.02 * rng.standard_normal((200, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    found = spherical_kmeans(rows, 4, seed=1)
    labels = (rows @ found.T).argmax(axis=1)
    assert all(len(set(labels[c * 50 : (c + 1) * 50].tolist())) == 1 for c in range(4))
    assert len(set(labels.tolist())) == 4
    few = spherical_kmeans(np.repeat(rows[:2], 5, axis=0), 4, seed=0)  # 2 distinct rows, 4 cells
    assert np.isfinite(few).all() and np.allclose(np.linalg.norm(few, axis=1), 1, atol=1e-5)


def test_cluster_passes_over_the_file_block_by_block_equal_the_whole_matrix(tmp_path: Path) -> None:
    from indexer.library.cluster import assign, fit_centres, refine_centres

    vectors, _ = clip_like(3_000, seed=8)
    matrix = write(tmp_path, vectors)
    centres = fit_centres(vectors[:500], 12, seed=0)
    refined = refine_centres(matrix, centres, seed=0, block=256)
    assert refined.shape == (12, vectors.shape[1]) and np.isfinite(refined).all()
    labels, distances = assign(matrix, refined, block=97)
    d = ((vectors[:, None, :] - refined[None, :, :]) ** 2).sum(axis=2)
    assert (labels == d.argmin(axis=1)).mean() > 0.999  # float32 ties aside
    assert np.allclose(distances, d.min(axis=1), atol=1e-4)


def test_dedup_command_gives_the_same_groups_by_every_pass(tmp_path: Path) -> None:
    import json

    from indexer.records import StoredPoint, point_id
    from indexer.store.edge_store import EdgeStore
    from tests.support.clirun import run

    vectors, planted = clip_like(1_200, seed=9)
    with EdgeStore(tmp_path / "store") as store:
        store.ensure_collection("m", vectors.shape[1])
        store.upsert(
            [
                StoredPoint(point_id(f"/p/{i}.jpg"), {"path": f"/p/{i}.jpg", "sha256": f"{i:064x}"}, v)
                for i, v in enumerate(vectors)
            ]
        )

    def groups_of(*flags: str, env: dict[str, str] | None = None) -> list[list[str]]:
        doc = json.loads(run("dedup", "--store", str(tmp_path / "store"), "--json", *flags, env=env).stdout)
        return sorted(sorted([g["keeper"]["path"], *(m["path"] for m in g["members"])]) for g in doc["groups"])

    exact = groups_of("--exact", "--device", "cpu")
    assert len(exact) >= len(planted.groups)
    assert groups_of("--device", "cpu", env={"INDEXER_DEDUP__EXACT_UP_TO": "100"}) == exact  # the cell pass
    assert groups_of(env={"INDEXER_DEDUP__METHOD": "cells"}) == exact
