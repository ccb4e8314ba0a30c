"""Lloyd's k-means on a torch device (`kmeans_torch`), run on torch's CPU device: as good as the CPU path's
MiniBatchKMeans refinement on CLIP-like vectors, deterministic, empty clusters re-seeded, the resident and the
block-by-block rows giving the same centres; and the choice of pass (`cluster.device`, `indexer cluster --device`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench.vectors import ClipLike
from indexer.errors import ConfigError
from indexer.library import cluster
from indexer.library.cluster import _sample, assign, cluster_store, fit_centres, refine_centres, torch_device
from indexer.library.export import VectorFile
from indexer.library.kmeans_torch import lloyd
from indexer.records import StoredPoint, point_id
from indexer.settings import ClusterSettings, load_settings
from indexer.store.edge_store import EdgeStore
from tests.support.clirun import run

pytest.importorskip("torch")

Matrix = npt.NDArray[np.float32]
K = 8


@pytest.fixture(scope="module")
def clip_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Matrix, VectorFile]:
    """3,000 CLIP-like unit vectors in a raw vector file, as `dump_vectors` leaves them."""
    rows, _ = ClipLike(3000).matrix()
    path = tmp_path_factory.mktemp("kmeans") / "vectors.f32"
    path.write_bytes(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return rows, VectorFile(path, rows.shape[1])


def cosine_inertia(rows: Matrix, matrix: VectorFile, centres: Matrix) -> float:
    """The sum over rows of 1 - cosine to the centre `assign` gives them."""
    labels, _ = assign(matrix, centres, 512)
    mine = centres[labels]
    return float((1.0 - (rows * mine).sum(axis=1) / np.linalg.norm(mine, axis=1)).sum())


def start(matrix: VectorFile, seed: int = 0) -> Matrix:
    """The CPU path's centres from a 1,000-row sample (the start both refinements share)."""
    return fit_centres(_sample(matrix, ClusterSettings(sample=1000, seed=seed)), K, seed)


def test_lloyd_is_as_good_as_the_minibatch_pass_and_deterministic(clip_like: tuple[Matrix, VectorFile]) -> None:
    rows, matrix = clip_like
    init = start(matrix)
    cpu = cosine_inertia(rows, matrix, refine_centres(matrix, init, 0, 512))
    first = lloyd(matrix, init, "cpu", block=512)
    ours = cosine_inertia(rows, matrix, first.centres)
    assert ours <= 1.02 * cpu, (ours, cpu)
    assert ours <= cosine_inertia(rows, matrix, init)  # the iterations did not undo the start
    assert first.centres.dtype == np.float32 and first.centres.shape == init.shape
    assert 1 <= first.iterations <= 20
    again = lloyd(matrix, init, "cpu", block=512)
    assert np.array_equal(again.centres, first.centres)
    assert np.array_equal(assign(matrix, again.centres, 512)[0], assign(matrix, first.centres, 512)[0])


def test_stops_when_few_rows_change_and_respects_max_iter(clip_like: tuple[Matrix, VectorFile]) -> None:
    _, matrix = clip_like
    init = start(matrix)
    done = lloyd(matrix, init, "cpu", block=512, max_iter=50)
    assert done.changed < 1e-3 * len(matrix) and done.iterations < 50
    one = lloyd(matrix, init, "cpu", block=512, max_iter=1)
    assert one.iterations == 1 and not np.array_equal(one.centres, init)


def test_block_by_block_rows_give_the_resident_rows_centres(clip_like: tuple[Matrix, VectorFile]) -> None:
    _, matrix = clip_like
    init = start(matrix, seed=2)
    for half in (False, True):
        read = lloyd(matrix, init, "cpu", block=700, resident=False, half=half)
        kept = lloyd(matrix, init, "cpu", block=700, resident=True, half=half)
        assert np.array_equal(read.centres, kept.centres) and read.iterations == kept.iterations
    # Half-precision products end near the float32 ones.
    full = lloyd(matrix, init, "cpu", block=700)
    half_run = lloyd(matrix, init, "cpu", block=700, half=True)
    assert np.abs(full.centres - half_run.centres).max() < 0.02


def test_an_empty_cluster_takes_the_farthest_row(tmp_path: Path) -> None:
    """Two tight blobs and a far outlier; the third start centre is where no row is nearest it: after the first
    iteration it is empty and takes the row farthest from its centre, the outlier."""
    rng = np.random.default_rng(0)
    a, b, out = np.eye(4, dtype=np.float32)[:3]
    rows = np.concatenate([a + 0.01 * rng.normal(size=(50, 4)), b + 0.01 * rng.normal(size=(50, 4)), out[None]])
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    path = tmp_path / "vectors.f32"
    path.write_bytes(rows.tobytes())
    matrix = VectorFile(path, 4)
    init = np.stack([a, b, -np.ones(4, np.float32)]).astype(np.float32)  # nearest to nothing
    result = lloyd(matrix, init, "cpu", block=16)
    assert result.reseeded >= 1
    labels, _ = assign(matrix, result.centres, 16)
    assert np.bincount(labels, minlength=3).tolist() == [50, 50, 1]
    assert np.allclose(result.centres[2], rows[100])
    assert np.array_equal(lloyd(matrix, init, "cpu", block=16).centres, result.centres)


def test_the_device_setting_chooses_the_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("indexer.library.pairs_torch.cuda_present", lambda: False)
    assert torch_device("auto") is None
    monkeypatch.setattr("indexer.library.pairs_torch.cuda_present", lambda: True)
    assert torch_device("auto") == "cuda"
    assert torch_device("cpu") is None
    assert torch_device("cuda:1") == "cuda:1"


def test_cluster_store_runs_lloyd_where_the_device_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """300 points in 5 planted blobs, a 60-point sample: the torch pass (on torch's CPU device here) labels every
    point with its blob; device cpu keeps the MiniBatchKMeans pass. Each run logs its pass."""
    rng = np.random.default_rng(3)
    blob = np.repeat(np.arange(5), 60)
    vectors = rng.normal(size=(5, 16))[blob] + 0.05 * rng.normal(size=(300, 16))
    caplog.set_level(logging.INFO, logger="indexer.library")
    with EdgeStore(tmp_path / "store") as store:
        store.ensure_collection("synthetic", 16)
        store.upsert(
            [
                StoredPoint(point_id(f"/x/{i}.png"), {"path": f"/x/{i}.png"}, v.astype(np.float32))
                for i, v in enumerate(vectors)
            ]
        )
        monkeypatch.setattr(cluster, "torch_device", lambda device: "cpu" if device == "cuda" else None)
        report = cluster_store(store, ClusterSettings(sample=60, seed=1, device="cuda"), k=5, block=32)
        assert sorted(c.size for c in report.clusters) == [60] * 5
        labels = {p.path: p.payload["cluster"] for p in store.scroll()}
        assert all(len({labels[f"/x/{i}.png"] for i in np.flatnonzero(blob == b)}) == 1 for b in range(5))
        assert "Lloyd's iterations over 300 vectors on cpu" in caplog.text
        caplog.clear()
        cluster_store(store, ClusterSettings(sample=60, seed=1, device="cpu"), k=5, block=32)
        assert "MiniBatchKMeans pass over 300 vectors on the CPU" in caplog.text and "Lloyd" not in caplog.text


def test_a_bad_device_is_a_config_error_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INDEXER_CLUSTER__DEVICE", raising=False)
    with pytest.raises(ConfigError, match=r"cluster\.device.*auto, cpu, cuda or cuda:N"):
        load_settings(overrides={"cluster": {"device": "gpu"}})
    assert load_settings(overrides={"cluster": {"device": "cuda:1"}}).cluster.device == "cuda:1"
    assert load_settings().cluster.device == "auto"
    err = run("cluster", "--device", "gpu", "--k", "2", "--store", str(tmp_path / "store"), check=2).stderr
    assert "cluster.device" in err and "'gpu'" in err and "Traceback" not in err
