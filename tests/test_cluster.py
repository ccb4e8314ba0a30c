"""Clustering: k-means over the stored vectors through the real CLI (cluster ids in the payload, `search --cluster`,
--auto, the HTML overview), and the bounded-memory path (sample, then MiniBatchKMeans over blocks) on planted blobs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ConfigError
from indexer.ingest.pipeline import run_index
from indexer.library.cluster import candidate_ks, cluster_store, resolve_k
from indexer.model.lazy import LazyModel
from indexer.records import SearchFilter, StoredPoint, point_id
from indexer.settings import ClusterSettings
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import class_of, write_dataset
from tests.support.clirun import MODEL, run, run_json


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """36 shapes (3 per class; with seed 1 the learned model separates all 12 classes) in an embedded store,
    indexed in-process (the CLI lane of `index` is tests/test_cli.py)."""
    root = tmp_path_factory.mktemp("cluster")
    write_dataset(root / "shapes", 36, seed=1)
    settings = shapes_settings(root / "store")
    with EdgeStore(root / "store") as store:
        assert run_index([root / "shapes"], settings, store, LazyModel(settings.model)).indexed == 36
    return root / "shapes", root / "store"


def cluster_of_each_file(store_dir: Path) -> dict[str, int | None]:
    with EdgeStore(store_dir) as store:
        return {p.path: p.payload.get("cluster") for p in store.scroll()}


def test_k_means_writes_cluster_ids_and_search_filters_by_them(indexed: tuple[Path, Path]) -> None:
    _, store = indexed
    report = run_json("cluster", "--k", "12", "--store", str(store))
    assert report["k"] == 12 and not report["auto"] and report["points"] == 36
    assert [c["size"] for c in report["clusters"]] == [3] * 12 and [c["id"] for c in report["clusters"]] == list(
        range(12)
    )
    ids = cluster_of_each_file(store)
    by_class: dict[tuple[str, str], set[int | None]] = {}
    for path, cluster in ids.items():
        by_class.setdefault(class_of(Path(path)), set()).add(cluster)
    assert all(len(c) == 1 for c in by_class.values()) and len({c for s in by_class.values() for c in s}) == 12
    red = by_class[("red", "circle")].pop()
    assert red is not None
    hits = run_json(
        "search", "a red circle", "--cluster", str((red + 1) % 12), "--limit", "10", "--store", str(store), *MODEL
    )
    assert len(hits) == 3 and all(ids[h["path"]] == (red + 1) % 12 for h in hits)  # not the 10 best red circles


def test_auto_chooses_k_by_silhouette_and_writes_an_overview(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = indexed
    page = tmp_path / "clusters.html"
    report = run_json("cluster", "--auto", "--html", str(page), "--store", str(store))
    assert report["auto"] and report["k"] == 12 and report["silhouette"] > 0.8
    for cluster in report["clusters"]:
        assert len({class_of(Path(p)) for p in cluster["representatives"]}) == 1
    html = page.read_text()
    assert html.count("<section>") == 12 and html.count("data:image/jpeg;base64,") == 36
    assert "search with --cluster 11" in html
    text = run("cluster", "--k", "12", "--store", str(store)).stdout
    assert text.startswith("12 clusters of 36 images (k = 12)") and "cluster 11: 3 images, e.g. " in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "give a positive number"),
        (["--k", "37"], "37 clusters for 36 images"),
        (["--k", "3", "--auto"], "not allowed with argument"),
        (["--html", "/no/such/dir/c.html"], "/no/such/dir does not exist"),
    ],
)
def test_bad_arguments_exit_2(indexed: tuple[Path, Path], args: list[str], message: str) -> None:
    _, store = indexed
    proc = run("cluster", *args, "--store", str(store), check=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_k_resolution() -> None:
    assert resolve_k(5, False, ClusterSettings(k=9)) == 5
    assert resolve_k(None, False, ClusterSettings(k=9)) == 9
    assert resolve_k(None, False, ClusterSettings()) is None  # k = 0: automatic
    assert resolve_k(None, True, ClusterSettings(k=9)) is None
    with pytest.raises(ConfigError):
        resolve_k(3, True, ClusterSettings())
    assert candidate_ks(3, 50) == [2]
    assert candidate_ks(2, 50) == []
    ks = candidate_ks(10_000, 200)
    assert ks[:19] == list(range(2, 21)) and ks[-1] == 200 and len(ks) < 30


def test_big_store_path_samples_then_refines_over_blocks_and_reclusters(tmp_path: Path) -> None:
    """300 points in 5 planted blobs, a 60-point sample and 32-row blocks: centres from the sample, refined by
    MiniBatchKMeans over every block; every point labelled with its blob; a second run replaces every label."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 16))
    blob = np.repeat(np.arange(5), 60)
    vectors = centres[blob] + 0.05 * rng.normal(size=(300, 16))
    with EdgeStore(tmp_path / "store") as store:
        store.ensure_collection("synthetic", 16)
        points = [
            StoredPoint(point_id(f"/x/{i}.png"), {"path": f"/x/{i}.png"}, v.astype(np.float32))
            for i, v in enumerate(vectors)
        ]
        store.upsert(points)
        settings = ClusterSettings(sample=60, seed=1)
        report = cluster_store(store, settings, k=None, block=32)
        assert report.k == 5 and sorted(c.size for c in report.clusters) == [60] * 5
        labels = {p.path: p.payload["cluster"] for p in store.scroll()}
        for b in range(5):
            assert len({labels[f"/x/{i}.png"] for i in np.flatnonzero(blob == b)}) == 1
        cluster_store(store, settings, k=2, block=32)
        assert {p.payload["cluster"] for p in store.scroll()} == {0, 1}
        assert store.count(SearchFilter(cluster=0)) + store.count(SearchFilter(cluster=1)) == 300
