"""One contract for `VectorStore`, run against every backend.

Lanes: "edge" (EdgeStore in a temp directory), "child" (the same store in a process of its own, `ChildStore`, as
`indexer index` opens it), "memory" (QdrantServerStore over qdrant-client's ":memory:"
double) and "live" (a real server at $QDRANT_URL, optional $QDRANT_API_KEY; skipped when unset).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from indexer.errors import ModelMismatchError, StoreBusyError, StoreError
from indexer.records import Failure, SearchFilter, StoredPoint, point_id
from indexer.store import protocol as store_mod
from indexer.store.child import ChildStore
from indexer.store.edge_store import MIN_FREE_MB, EdgeStore
from indexer.store.factory import open_store
from indexer.store.protocol import VectorStore
from indexer.store.server import QdrantServerStore

DIM = 16
MODEL = "test-model"
LANES = ["edge", "child", "memory", "live"]

Vec = npt.NDArray[np.float32]
Reopen = Callable[[VectorStore], VectorStore]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def ancestors(path: str) -> list[str]:
    """The payload's "dirs": every ancestor directory except the root ("/a", "/a/b" for "/a/b/c.jpg")."""
    return [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "/"]


def make_point(path: str, vector: Vec, **extra: Any) -> StoredPoint:
    payload: dict[str, Any] = {
        "path": path,
        "dirs": ancestors(path),
        "size": 1000,
        "mtime": 1_000.0,
        "mtime_ns": 1_000_000_000_000,
        "sha256": f"sha-{path}",
        "width": 100,
        "height": 100,
        "format": "JPEG",
        "model": MODEL,
        "indexed_at": 2_000.0,
    }
    payload.update(extra)
    return StoredPoint(id=point_id(path), payload=payload, vector=vector)


def paths_of(points: Any) -> set[str]:
    return {p.path for p in points}


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one store per lane, and a way to open it again
# ---------------------------------------------------------------------------------------------------------


class Lane:
    """Opens stores of one backend onto the same data; closes them all at the end."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.handles: list[VectorStore] = []
        self.url = os.environ.get("QDRANT_URL", "")
        self.collection = f"test_{uuid.uuid4().hex[:12]}" if name == "live" else "images"
        self.directory = tmp_path / "store"

    def open(self) -> VectorStore:
        store: VectorStore
        if self.name == "edge":
            store = EdgeStore(self.directory)
        elif self.name == "child":
            store = ChildStore(self.directory, min_free_mb=MIN_FREE_MB)
        elif self.name == "memory":
            store = QdrantServerStore.connect(":memory:", None, self.collection)
        else:
            store = QdrantServerStore.connect(self.url, os.environ.get("QDRANT_API_KEY"), self.collection)
        self.handles.append(store)
        return store

    def reopen(self, old: VectorStore) -> VectorStore:
        """A fresh handle on the same data. ":memory:" data lives in its client, so there the new handle
        shares the client instead of closing it (closing would destroy the data)."""
        if self.name == "memory":
            assert isinstance(old, QdrantServerStore)
            store: VectorStore = QdrantServerStore(old.client, self.collection, url=":memory:")
            self.handles.append(store)
            return store
        old.close()
        return self.open()

    def cleanup(self) -> None:
        for handle in reversed(self.handles):
            handle.close()
        if self.name == "live":
            with QdrantServerStore.connect(self.url, os.environ.get("QDRANT_API_KEY"), "x") as admin:
                for name in (self.collection, f"{self.collection}__failures"):
                    admin.client.delete_collection(name)


@pytest.fixture(params=LANES)
def lane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lane]:
    if request.param == "live" and not os.environ.get("QDRANT_URL"):
        pytest.skip("no QDRANT_URL: live Qdrant server lane skipped")
    lane = Lane(request.param, tmp_path)
    yield lane
    lane.cleanup()


@pytest.fixture
def store(lane: Lane) -> VectorStore:
    """An empty store, no collection yet."""
    return lane.open()


@pytest.fixture
def reopen(lane: Lane) -> Reopen:
    return lane.reopen


@pytest.fixture
def ready(store: VectorStore) -> VectorStore:
    """A store with the collection created."""
    store.ensure_collection(MODEL, DIM)
    return store


@pytest.fixture
def tree(ready: VectorStore) -> VectorStore:
    """A store holding a small tree with varied metadata."""
    vecs = unit_vectors(8, seed=1)
    points = [
        make_point("/a/b/c1.jpg", vecs[0], width=800, height=600, mtime=100.0, cluster=1),
        make_point("/a/b/c2.png", vecs[1], format="PNG", width=1920, height=1080, mtime=200.0, cluster=1),
        make_point("/a/b/deep/d.jpg", vecs[2], width=50, height=50, mtime=300.0, cluster=2),
        make_point("/a/bc/x.jpg", vecs[3], width=4000, height=3000, mtime=400.0),
        make_point("/a/top.webp", vecs[4], format="WEBP", width=640, height=480, mtime=500.0, cluster=2),
        make_point("/z/other.gif", vecs[5], format="gif", width=10, height=2000, mtime=600.0, cluster=3),
    ]
    ready.upsert(points)
    return ready


# ---------------------------------------------------------------------------------------------------------
# Collection and model
# ---------------------------------------------------------------------------------------------------------


def test_model_info_is_none_before_ensure(store: VectorStore) -> None:
    assert store.model_info() is None
    assert store.count() == 0
    assert list(store.scroll()) == []
    assert store.query(unit_vectors(1)[0]) == []
    assert store.retrieve([point_id("/nope")]) == []


def test_ensure_collection_creates_and_is_idempotent(store: VectorStore) -> None:
    store.ensure_collection(MODEL, DIM)
    assert store.model_info() == (MODEL, DIM)
    store.upsert([make_point("/a/x.jpg", unit_vectors(1)[0])])
    store.ensure_collection(MODEL, DIM)
    assert store.model_info() == (MODEL, DIM)
    assert store.count() == 1


def test_other_model_is_refused_naming_both(ready: VectorStore) -> None:
    with pytest.raises(ModelMismatchError) as info:
        ready.ensure_collection("other-model", DIM)
    assert info.value.store_model == MODEL and info.value.model == "other-model"
    assert MODEL in str(info.value) and "other-model" in str(info.value)
    assert ready.location in str(info.value)


def test_other_dim_is_refused(ready: VectorStore) -> None:
    with pytest.raises(ModelMismatchError, match=f"{DIM}-d") as info:
        ready.ensure_collection(MODEL, DIM * 2)
    assert str(DIM * 2) in str(info.value)


def test_location_is_readable(store: VectorStore, lane: Lane) -> None:
    if lane.name in ("edge", "child"):
        assert store.location == str(lane.directory.absolute())
    else:
        assert store.location.endswith(f"collection {lane.collection}")


# ---------------------------------------------------------------------------------------------------------
# Writes
# ---------------------------------------------------------------------------------------------------------


def test_upsert_is_idempotent_by_id(ready: VectorStore) -> None:
    v = unit_vectors(2)
    ready.upsert([make_point("/a/x.jpg", v[0], width=1)])
    ready.upsert([make_point("/a/x.jpg", v[1], width=2)])
    assert ready.count() == 1
    (got,) = ready.retrieve([point_id("/a/x.jpg")], with_vectors=True)
    assert got.payload["width"] == 2
    assert got.vector is not None
    np.testing.assert_allclose(got.vector, v[1], atol=1e-5)


def test_upsert_in_batches_of_any_size(ready: VectorStore) -> None:
    n = store_mod.WRITE_BATCH * 2 + 17
    vecs = unit_vectors(n)
    ready.upsert([make_point(f"/many/{i}.jpg", vecs[i]) for i in range(n)])
    assert ready.count() == n


def test_upsert_requires_vectors(ready: VectorStore) -> None:
    with pytest.raises(ValueError, match="no vector"):
        ready.upsert([StoredPoint(id=point_id("/a"), payload={"path": "/a"})])


def test_delete(tree: VectorStore) -> None:
    tree.delete([point_id("/a/b/c1.jpg"), point_id("/never/was.jpg")])
    assert tree.count() == 5
    assert tree.retrieve([point_id("/a/b/c1.jpg")]) == []
    assert "/a/b/c1.jpg" not in paths_of(tree.query(unit_vectors(1, seed=1)[0], limit=10))


def test_set_payload_merges_keys(tree: VectorStore) -> None:
    ids = [point_id("/a/b/c1.jpg"), point_id("/a/top.webp"), point_id("/missing.jpg")]
    tree.set_payload(ids, {"cluster": 7, "note": "x"})
    got = {p.path: p.payload for p in tree.retrieve(ids)}
    assert set(got) == {"/a/b/c1.jpg", "/a/top.webp"}
    for payload in got.values():
        assert payload["cluster"] == 7 and payload["note"] == "x"
        assert payload["sha256"].startswith("sha-")  # the other keys stay
    assert tree.count(SearchFilter(cluster=7)) == 2


def test_retrieve_with_vectors(ready: VectorStore) -> None:
    v = unit_vectors(3)
    ready.upsert([make_point(f"/r/{i}.jpg", v[i]) for i in range(3)])
    ids = [point_id("/r/2.jpg"), point_id("/gone.jpg"), point_id("/r/0.jpg")]
    got = ready.retrieve(ids, with_vectors=True)
    assert [p.path for p in got] == ["/r/2.jpg", "/r/0.jpg"]  # order asked, missing skipped
    for p, want in zip(got, (v[2], v[0]), strict=True):
        assert p.id == point_id(p.path)
        assert isinstance(p.vector, np.ndarray) and p.vector.dtype == np.float32 and p.vector.shape == (DIM,)
        np.testing.assert_allclose(p.vector, want, atol=1e-5)
    assert all(p.vector is None for p in ready.retrieve(ids))


# ---------------------------------------------------------------------------------------------------------
# Query
# ---------------------------------------------------------------------------------------------------------


def _loaded(store: VectorStore, n: int = 40, seed: int = 3) -> tuple[list[str], npt.NDArray[np.float32]]:
    vecs = unit_vectors(n, seed=seed)
    paths = [f"/q/{i}.jpg" for i in range(n)]
    store.upsert([make_point(p, vecs[i]) for i, p in enumerate(paths)])
    return paths, vecs


def test_query_ranks_by_cosine(ready: VectorStore) -> None:
    paths, vecs = _loaded(ready)
    q = unit_vectors(1, seed=99)[0]
    scores = vecs @ q
    order = np.argsort(-scores)
    hits = ready.query(q, limit=10)
    assert [h.path for h in hits] == [paths[i] for i in order[:10]]
    np.testing.assert_allclose([h.score for h in hits], scores[order[:10]], atol=1e-5)
    assert [h.id for h in hits] == [point_id(paths[i]) for i in order[:10]]


def test_query_scales_do_not_matter(ready: VectorStore) -> None:
    paths, vecs = _loaded(ready)
    hits = ready.query((vecs[5] * 3.0).astype(np.float32), limit=1)
    assert hits[0].path == paths[5]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_query_threshold(ready: VectorStore) -> None:
    _, vecs = _loaded(ready)
    q = unit_vectors(1, seed=98)[0]
    scores = vecs @ q
    threshold = float(np.sort(scores)[-5]) - 1e-4  # exactly the top 5 pass
    hits = ready.query(q, limit=20, threshold=threshold)
    assert len(hits) == 5
    assert all(h.score >= threshold for h in hits)


def test_query_limit_and_offset(ready: VectorStore) -> None:
    paths, vecs = _loaded(ready)
    q = unit_vectors(1, seed=97)[0]
    order = [paths[i] for i in np.argsort(-(vecs @ q))]
    assert [h.path for h in ready.query(q, limit=3)] == order[:3]
    assert [h.path for h in ready.query(q, limit=4, offset=3)] == order[3:7]
    assert ready.query(q, limit=5, offset=len(paths)) == []


def test_query_with_filter(tree: VectorStore) -> None:
    q = unit_vectors(8, seed=1)[3]  # nearest is /a/bc/x.jpg, which the filter excludes
    hits = tree.query(q, limit=10, filter=SearchFilter(path_prefix="/a/b"))
    assert paths_of(hits) == {"/a/b/c1.jpg", "/a/b/c2.png", "/a/b/deep/d.jpg"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# ---------------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------------


def _matching(store: VectorStore, flt: SearchFilter) -> set[str]:
    found = paths_of(store.scroll(filter=flt))
    assert store.count(flt) == len(found)
    return found


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("/a/b", {"/a/b/c1.jpg", "/a/b/c2.png", "/a/b/deep/d.jpg"}),
        ("/a/b/", {"/a/b/c1.jpg", "/a/b/c2.png", "/a/b/deep/d.jpg"}),
        ("/a/b/deep", {"/a/b/deep/d.jpg"}),
        ("/a/bc", {"/a/bc/x.jpg"}),
        ("/a", {"/a/b/c1.jpg", "/a/b/c2.png", "/a/b/deep/d.jpg", "/a/bc/x.jpg", "/a/top.webp"}),
        ("/a/top.webp", {"/a/top.webp"}),
        ("/a/b/c", set()),
        ("/nowhere", set()),
    ],
)
def test_filter_path_prefix(tree: VectorStore, prefix: str, expected: set[str]) -> None:
    assert _matching(tree, SearchFilter(path_prefix=prefix)) == expected


def test_filter_root_prefix_matches_everything(tree: VectorStore) -> None:
    assert len(_matching(tree, SearchFilter(path_prefix="/"))) == 6


def test_filter_formats_case_insensitive(tree: VectorStore) -> None:
    assert _matching(tree, SearchFilter(formats=("png",))) == {"/a/b/c2.png"}
    assert _matching(tree, SearchFilter(formats=("GIF", "webp"))) == {"/z/other.gif", "/a/top.webp"}
    assert len(_matching(tree, SearchFilter(formats=("jpg",)))) == 3  # JPG is JPEG
    assert _matching(tree, SearchFilter(formats=("tiff",))) == set()


def test_filter_min_width_and_height(tree: VectorStore) -> None:
    assert _matching(tree, SearchFilter(min_width=1920)) == {"/a/b/c2.png", "/a/bc/x.jpg"}
    assert _matching(tree, SearchFilter(min_height=1080)) == {"/a/b/c2.png", "/a/bc/x.jpg", "/z/other.gif"}
    both = SearchFilter(min_width=1000, min_height=2000)
    assert _matching(tree, both) == {"/a/bc/x.jpg"}


def test_filter_mtime_range(tree: VectorStore) -> None:
    assert _matching(tree, SearchFilter(mtime_from=200.0, mtime_to=400.0)) == {
        "/a/b/c2.png",
        "/a/b/deep/d.jpg",
        "/a/bc/x.jpg",
    }
    assert _matching(tree, SearchFilter(mtime_from=550.0)) == {"/z/other.gif"}
    assert _matching(tree, SearchFilter(mtime_to=100.0)) == {"/a/b/c1.jpg"}


def test_filter_cluster(tree: VectorStore) -> None:
    assert _matching(tree, SearchFilter(cluster=2)) == {"/a/b/deep/d.jpg", "/a/top.webp"}
    assert _matching(tree, SearchFilter(cluster=9)) == set()


def test_filter_fields_combine(tree: VectorStore) -> None:
    flt = SearchFilter(path_prefix="/a", formats=("jpeg",), min_width=60, mtime_to=450.0, cluster=1)
    assert _matching(tree, flt) == {"/a/b/c1.jpg"}
    assert len(_matching(tree, SearchFilter())) == 6


# ---------------------------------------------------------------------------------------------------------
# Scroll, count, hashes
# ---------------------------------------------------------------------------------------------------------


def test_scroll_pages_through_everything(ready: VectorStore) -> None:
    paths, vecs = _loaded(ready, n=53)
    it = ready.scroll(batch_size=7, with_vectors=True)
    assert iter(it) is it  # lazy
    got = list(it)
    assert sorted(p.path for p in got) == sorted(paths)
    by_path = {p.path: p for p in got}
    for i in (0, 52):
        vector = by_path[paths[i]].vector
        assert vector is not None and vector.dtype == np.float32
        np.testing.assert_allclose(vector, vecs[i], atol=1e-5)
    assert all(p.vector is None for p in ready.scroll(batch_size=10))


def test_scroll_respects_filter(tree: VectorStore) -> None:
    got = list(tree.scroll(filter=SearchFilter(path_prefix="/a"), batch_size=2))
    assert len(got) == 5 and len({p.id for p in got}) == 5


def test_count(tree: VectorStore) -> None:
    assert tree.count() == 6
    assert tree.count(SearchFilter(path_prefix="/z")) == 1
    assert tree.count(SearchFilter()) == 6


def test_find_by_sha256(ready: VectorStore) -> None:
    v = unit_vectors(4)
    ready.upsert(
        [
            make_point("/d/1.jpg", v[0], sha256="aaa"),
            make_point("/d/2.jpg", v[1], sha256="aaa"),
            make_point("/d/3.jpg", v[2], sha256="bbb"),
            make_point("/d/4.jpg", v[3], sha256="ccc"),
        ]
    )
    assert paths_of(ready.find_by_sha256(["aaa", "ccc", "zzz"])) == {"/d/1.jpg", "/d/2.jpg", "/d/4.jpg"}
    assert ready.find_by_sha256([]) == []
    (got,) = ready.find_by_sha256(["bbb"], with_vectors=True)
    assert got.vector is not None
    np.testing.assert_allclose(got.vector, v[2], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Failure log
# ---------------------------------------------------------------------------------------------------------


def test_failures_record_list_clear_count(store: VectorStore) -> None:
    assert store.failure_count() == 0 and store.failures() == []
    store.record_failures([Failure(Path("/f/1.jpg"), "truncated"), Failure(Path("/f/2.jpg"), "not an image")])
    store.record_failures([Failure(Path("/f/3.jpg"), "too big")])
    store.record_failures([Failure(Path("/f/1.jpg"), "still truncated")])  # update: now the newest
    assert store.failure_count() == 3
    newest = store.failures()
    assert [f.path for f in newest][:2] == ["/f/1.jpg", "/f/3.jpg"]
    assert newest[0].reason == "still truncated"
    assert [f.at for f in newest] == sorted((f.at for f in newest), reverse=True)
    assert len(store.failures(limit=1)) == 1
    store.clear_failures(["/f/1.jpg", "/f/never.jpg"])
    assert store.failure_count() == 2
    assert {f.path for f in store.failures()} == {"/f/2.jpg", "/f/3.jpg"}


def test_failures_keep_only_the_latest(store: VectorStore, lane: Lane, monkeypatch: pytest.MonkeyPatch) -> None:
    if lane.name == "child":
        pytest.skip("a limit patched in this process does not reach the store's; the edge lane runs the same code")
    monkeypatch.setattr(store_mod, "MAX_FAILURES", 5)
    store.record_failures([Failure(Path(f"/old/{i}.jpg"), "bad") for i in range(4)])
    store.record_failures([Failure(Path(f"/new/{i}.jpg"), "bad") for i in range(3)])
    assert store.failure_count() == 5
    paths = {f.path for f in store.failures(limit=10)}
    assert {f"/new/{i}.jpg" for i in range(3)} <= paths


def test_failures_survive_reopen(store: VectorStore, reopen: Reopen) -> None:
    store.record_failures([Failure(Path("/f/1.jpg"), "truncated")])
    store.record_failures([Failure(Path("/f/2.jpg"), "bad header")])
    store.clear_failures(["/f/1.jpg"])
    again = reopen(store)
    assert again.failure_count() == 1
    (only,) = again.failures()
    assert (only.path, only.reason) == ("/f/2.jpg", "bad header")


# ---------------------------------------------------------------------------------------------------------
# Persistence and lifecycle
# ---------------------------------------------------------------------------------------------------------


def test_data_survives_reopen(ready: VectorStore, reopen: Reopen) -> None:
    paths, vecs = _loaded(ready, n=30)
    ready.flush()
    again = reopen(ready)
    assert again.model_info() == (MODEL, DIM)
    assert again.count() == 30
    (got,) = again.retrieve([point_id(paths[7])], with_vectors=True)
    assert got.vector is not None
    np.testing.assert_allclose(got.vector, vecs[7], atol=1e-5)
    assert again.query(vecs[11], limit=1)[0].path == paths[11]
    with pytest.raises(ModelMismatchError):
        again.ensure_collection("other", DIM)


def test_close_is_idempotent_and_a_context_manager(lane: Lane) -> None:
    with lane.open() as s:
        s.ensure_collection(MODEL, DIM)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.count()


def test_optimize_keeps_results(tree: VectorStore) -> None:
    tree.optimize()
    tree.flush()
    assert tree.count() == 6
    assert tree.query(unit_vectors(8, seed=1)[4], limit=1)[0].path == "/a/top.webp"
    assert _matching(tree, SearchFilter(path_prefix="/a/b", min_width=60)) == {"/a/b/c1.jpg", "/a/b/c2.png"}
    assert _matching(tree, SearchFilter(formats=("gif",), mtime_from=550.0)) == {"/z/other.gif"}
    tree.upsert([make_point("/a/b/new.jpg", unit_vectors(1, seed=50)[0], width=70, cluster=2)])
    assert _matching(tree, SearchFilter(path_prefix="/a/b", cluster=2)) == {"/a/b/deep/d.jpg", "/a/b/new.jpg"}


# ---------------------------------------------------------------------------------------------------------
# Edge only
# ---------------------------------------------------------------------------------------------------------


def test_edge_layout(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as s:
        assert not (tmp_path / "s").exists()  # nothing is created before ensure_collection
        s.ensure_collection(MODEL, DIM)
        s.record_failures([Failure(Path("/x.jpg"), "bad")])
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert names == {"store.json", "shard", "failures.json", "lock", "points.json"}
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["model_id"] == MODEL and meta["dim"] == DIM and meta["version"] == 1
    assert meta["format"] == "indexer-store" and meta["created_at"] > 0


def test_edge_second_open_is_busy(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path / "s")
    first.ensure_collection(MODEL, DIM)
    first.upsert([make_point("/a.jpg", unit_vectors(1)[0])])
    before = sorted(str(p) for p in (tmp_path / "s").rglob("*"))
    with pytest.raises(StoreBusyError) as info:
        EdgeStore(tmp_path / "s")
    assert info.value.path == (tmp_path / "s").absolute()
    assert sorted(str(p) for p in (tmp_path / "s").rglob("*")) == before
    assert first.count() == 1  # the holder is unaffected
    first.close()
    with EdgeStore(tmp_path / "s") as again:
        assert again.count() == 1


def test_edge_busy_across_processes(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as holder:
        holder.ensure_collection(MODEL, DIM)
        script = textwrap.dedent(
            f"""
            from pathlib import Path
            from indexer.errors import StoreBusyError
            from indexer.store.edge_store import EdgeStore
            try:
                EdgeStore(Path({str(tmp_path / "s")!r}))
            except StoreBusyError as exc:
                print("BUSY", exc)
            """
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("BUSY"), out.stdout + out.stderr
    assert "in use by another process" in out.stdout


@pytest.mark.slow
def test_edge_optimize_builds_hnsw_and_stays_accurate(tmp_path: Path) -> None:
    n, queries = 2000, 20
    vecs = unit_vectors(n, seed=5)
    with EdgeStore(tmp_path / "s", indexing_threshold_kb=10) as s:
        s.ensure_collection(MODEL, DIM)
        s.upsert([make_point(f"/o/{i}.jpg", vecs[i]) for i in range(n)])
        qs = unit_vectors(queries, seed=6)
        exact = [[h.path for h in s.query(q, limit=10)] for q in qs]
        s.optimize()
        assert s.indexed_vectors_count() > 0
        recalls = []
        for q, before in zip(qs, exact, strict=True):
            truth = [f"/o/{i}.jpg" for i in np.argsort(-(vecs @ q))[:10]]
            assert before == truth  # unindexed: exact
            hits = s.query(q, limit=10)
            recalls.append(len({h.path for h in hits} & set(truth)) / 10)
            assert hits[0].score == pytest.approx(float(np.max(vecs @ q)), abs=1e-4)
        assert float(np.mean(recalls)) >= 0.9


def test_edge_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an indexer store") as info:
        EdgeStore(tmp_path / "photos")
    assert not isinstance(info.value, StoreBusyError)
    assert "notes.txt" in str(info.value)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["notes.txt"]


def test_edge_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        EdgeStore(tmp_path / "file")


def test_edge_refuses_a_damaged_store_file(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        EdgeStore(tmp_path / "s")


def test_edge_accepts_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    with EdgeStore(tmp_path / "s") as s:
        s.ensure_collection(MODEL, DIM)
        assert s.model_info() == (MODEL, DIM)


def test_edge_failed_creation_leaves_nothing(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as s:
        with pytest.raises(StoreError, match="dimension"):
            s.ensure_collection(MODEL, 0)
        assert s.model_info() is None
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["lock"]  # the lock file alone stays
    with EdgeStore(tmp_path / "s") as s:
        s.ensure_collection(MODEL, DIM)
        assert s.model_info() == (MODEL, DIM)


def test_edge_racing_creators(tmp_path: Path) -> None:
    first, second = EdgeStore(tmp_path / "s"), EdgeStore(tmp_path / "s")  # both saw an empty directory
    first.ensure_collection(MODEL, DIM)
    with pytest.raises(StoreBusyError):
        second.ensure_collection("other", DIM)  # the first creator holds the lock; its store.json stays
    with pytest.raises(StoreBusyError):
        second.ensure_collection(MODEL, DIM)
    second.close()
    assert first.model_info() == (MODEL, DIM)
    first.close()


def test_edge_recreates_a_missing_shard(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as s:  # a crash between store.json and the shard leaves this state
        s.ensure_collection(MODEL, DIM)
    shutil.rmtree(tmp_path / "s" / "shard")
    with EdgeStore(tmp_path / "s") as s:
        assert s.model_info() == (MODEL, DIM)
        s.upsert([make_point("/a.jpg", unit_vectors(1)[0])])
        assert s.count() == 1


def test_edge_damaged_failure_log_does_not_hold_the_lock(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as s:
        s.ensure_collection(MODEL, DIM)
    (tmp_path / "s" / "failures.json").write_text("[")
    with pytest.raises(StoreError, match=r"failures\.json"):
        EdgeStore(tmp_path / "s")
    (tmp_path / "s" / "failures.json").unlink()
    with EdgeStore(tmp_path / "s") as s:
        assert s.failure_count() == 0


def test_edge_writes_need_a_collection(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as s, pytest.raises(StoreError, match="ensure_collection"):
        s.upsert([make_point("/a.jpg", unit_vectors(1)[0])])


# ---------------------------------------------------------------------------------------------------------
# Server only, and the factory
# ---------------------------------------------------------------------------------------------------------


def test_server_adopts_an_unrecorded_collection() -> None:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    client = QdrantClient(":memory:")
    params = qm.VectorParams(size=DIM, distance=qm.Distance.COSINE)
    client.create_collection("made_elsewhere", vectors_config=params)
    s = QdrantServerStore(client, "made_elsewhere")
    assert s.model_info() is None
    with pytest.raises(ModelMismatchError):
        s.ensure_collection(MODEL, DIM + 1)
    s.ensure_collection(MODEL, DIM)
    assert s.model_info() == (MODEL, DIM)
    s.close()
    client.get_collections()  # a store does not close a client it was given
    client.close()


def test_server_unreachable_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"http://127\.0\.0\.1:9"):
        QdrantServerStore.connect("http://127.0.0.1:9", None, "images", timeout=2)


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    with open_store(store_dir=tmp_path / "s", qdrant_url=None, api_key=None, collection="images") as s:
        assert isinstance(s, EdgeStore)
    with open_store(store_dir=tmp_path / "s", qdrant_url=":memory:", api_key=None, collection="c") as s:
        assert isinstance(s, QdrantServerStore) and s.location == ":memory: collection c"


@pytest.mark.filterwarnings("ignore:Local mode performs exact")
def test_search_hnsw_ef_reaches_each_backends_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.settings import load_settings
    from indexer.store import edge_query
    from indexer.store.factory import open_store_from_settings

    seen: list[int] = []
    real = edge_query.search_params

    def spy(exact: bool, ef: int = 0, filtered: bool = False) -> Any:
        seen.append(ef)
        return real(exact, ef, filtered)

    monkeypatch.setattr(edge_query, "search_params", spy)
    vector = np.ones(4, np.float32)
    settings = load_settings(None, {"store": {"dir": tmp_path / "s"}, "search": {"hnsw_ef": 2048}})
    with open_store_from_settings(settings) as store:
        store.ensure_collection("m", 4)
        store.upsert([StoredPoint(point_id("/a.jpg"), {"path": "/a.jpg"}, vector)])
        assert [h.payload["path"] for h in store.query(vector, limit=1)] == ["/a.jpg"]
    assert seen == [2048]
    assert real(False).hnsw_ef == edge_query.SEARCH_EF and real(False, 2048).hnsw_ef == 2048

    server = load_settings(None, {"store": {"qdrant_url": ":memory:"}, "search": {"hnsw_ef": 300}})
    with open_store_from_settings(server) as store:
        assert isinstance(store, QdrantServerStore)
        store.ensure_collection("m", 4)
        store.upsert([StoredPoint(point_id("/a.jpg"), {"path": "/a.jpg"}, vector)])
        asked: list[Any] = []
        query_points = store.client.query_points

        def spy_points(*args: Any, **kwargs: Any) -> Any:
            asked.append(kwargs.get("search_params"))
            return query_points(*args, **kwargs)

        monkeypatch.setattr(store.client, "query_points", spy_points)
        assert len(store.query(vector, limit=1)) == 1
    assert [p.hnsw_ef for p in asked] == [300]


def test_a_refused_second_open_does_not_damage_the_holder(tmp_path: Path) -> None:
    """Edge's WAL lock refuses a second opener, but the attempt used to break the holder's next flush."""
    holder = EdgeStore(tmp_path / "held")
    holder.ensure_collection("m", 4)
    holder.upsert([StoredPoint(point_id("/a.jpg"), {"path": "/a.jpg"}, np.ones(4, np.float32))])
    with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}"):
        EdgeStore(tmp_path / "held")
    holder.upsert([StoredPoint(point_id("/b.jpg"), {"path": "/b.jpg"}, np.ones(4, np.float32))])
    holder.flush()
    holder.close()
    reopened = EdgeStore(tmp_path / "held")
    assert reopened.count() == 2
    reopened.close()
