"""Deduplication: the neighbour pass and union-find on planted vectors, then the real CLI on generated
near-duplicates (resized, cropped to 90%, JPEG re-encoded at low quality, colour-shifted) and exact copies, indexed
with the learned shapes model; keeper choice; and the actions (`--move-to`, `--delete --yes`) on temp folders.

The learned test model knows 12 shape/colour classes and little else: two *different* images of one class score
0.78-0.99 with it, images of different classes below 0.6. So the library below holds one base image per class
(seeds chosen so every edit scores >= 0.986 with its base), which makes the tiers meaningful: edits and copies are
near-duplicates, one more image of the yellow-circle class (0.930 to its base) is only "similar", and nothing else
groups. `test_library_scores_are_what_the_tiers_assume` checks those premises first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from indexer.errors import ConfigError
from indexer.ingest.pipeline import run_index
from indexer.library.actions import apply_plan, move_file, plan_actions
from indexer.library.dedup import Item, UnionFind, choose_keeper, find_duplicates, neighbour_pairs, tier_threshold
from indexer.library.export import VectorFile
from indexer.model.lazy import LazyModel
from indexer.records import StoredPoint, dirs_of, point_id
from indexer.settings import DedupSettings
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.support.clirun import MODEL, run
from tests.support.library import (
    EXACT,
    NEAR,
    SIMILAR,
    T0,
    snapshot,
    write_library,
)


def groups_by_name(doc: dict[str, Any], files: dict[str, Path]) -> dict[str, set[str]]:
    name = {str(p): n for n, p in files.items()}
    return {name[g["keeper"]["path"]]: {name[m["path"]] for m in g["members"]} for g in doc["groups"]}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    """The library indexed once through the CLI: (files by name, store directory). Tests must not change it."""
    root = tmp_path_factory.mktemp("dedup")
    files = write_library(root / "lib")
    summary = json.loads(run("index", str(root / "lib"), "--store", str(root / "store"), *MODEL, "--json").stdout)
    assert (summary["indexed"], summary["failed"]) == (20, 0)
    return files, root / "store"


def fresh_library(tmp_path: Path, model: LazyModel) -> tuple[dict[str, Path], Path]:
    """A library of its own, indexed in-process (the model is loaded once per module); the store is closed."""
    files = write_library(tmp_path / "lib")
    settings = shapes_settings(tmp_path / "store")
    with EdgeStore(tmp_path / "store") as store:
        assert run_index([tmp_path / "lib"], settings, store, model).indexed == 20
    return files, tmp_path / "store"


def stored_vectors(store_dir: Path) -> dict[str, npt.NDArray[np.float32]]:
    with EdgeStore(store_dir) as store:
        return {p.path: p.vector for p in store.scroll(with_vectors=True) if p.vector is not None}


# --- the neighbour pass, union-find, keeper, thresholds (no model) --------------------------------------------------


def planted(n: int, groups: list[list[int]], dim: int = 32, seed: int = 0) -> npt.NDArray[np.float32]:
    """Random unit vectors; each planted group's members are small perturbations of its first member."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    for group in groups:
        for i in group[1:]:
            v[i] = v[group[0]] + 0.05 * rng.normal(size=dim)
    unit: npt.NDArray[np.float32] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return unit


def vector_file(tmp_path: Path, vectors: npt.NDArray[np.float32]) -> VectorFile:
    path = tmp_path / "v.f32"
    path.write_bytes(np.ascontiguousarray(vectors, np.float32).tobytes())
    return VectorFile(path, vectors.shape[1])


@pytest.mark.parametrize("block", [1, 7, 16, 64, 4096])
def test_neighbour_pairs_equal_brute_force_whatever_the_block(tmp_path: Path, block: int) -> None:
    vectors = planted(203, [[0, 5, 200], [17, 18], [63, 64, 65, 130], [199, 202]])
    brute = vectors @ vectors.T
    expected = {(i, j) for i, j in zip(*np.nonzero(brute >= 0.95), strict=True) if i < j}
    found: set[tuple[int, int]] = set()
    for left, right in neighbour_pairs(vector_file(tmp_path, vectors), 0.95, block):
        assert (left < right).all()
        found.update(zip(left.tolist(), right.tolist(), strict=True))
    assert found == expected and len(expected) >= 3 + 1 + 6 + 1


def test_union_find_joins_chains_and_drops_singletons() -> None:
    uf = UnionFind(8)
    uf.union_pairs(np.array([0, 2, 5]), np.array([1, 3, 6]))
    uf.union(1, 3)
    assert sorted(uf.components()) == [[0, 1, 2, 3], [5, 6]]


def item(path: str, w: int, h: int, mtime: float) -> Item:
    return Item(point_id(path), path, "sha", w, h, mtime, 1, 1)


def test_keeper_is_highest_resolution_then_oldest_then_first_path() -> None:
    big_new, small_old = item("/b.jpg", 200, 200, 50.0), item("/a.jpg", 100, 100, 1.0)
    assert choose_keeper([small_old, big_new]) == big_new
    old = item("/z.jpg", 200, 200, 10.0)
    assert choose_keeper([big_new, old, small_old]) == old
    twin = item("/y.jpg", 200, 200, 10.0)
    assert choose_keeper([old, twin]) == twin


def test_tier_thresholds_come_from_settings_unless_given() -> None:
    settings = DedupSettings(near_threshold=0.97, similar_threshold=0.85)
    assert tier_threshold("near", settings) == 0.97
    assert tier_threshold("similar", settings) == 0.85
    assert tier_threshold("similar", settings, 0.5) == 0.5
    assert tier_threshold("exact", settings) is None
    with pytest.raises(ConfigError, match="drop --threshold"):
        tier_threshold("exact", settings, 0.9)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        tier_threshold("near", settings, 1.5)


# --- moving files ------------------------------------------------------------------------------------------------


def test_move_file_never_replaces_an_existing_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.bin", tmp_path / "out" / "a.bin"
    src.write_bytes(b"mine")
    dst.parent.mkdir()
    dst.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        move_file(src, dst)
    assert src.read_bytes() == b"mine" and dst.read_bytes() == b"theirs"


def test_move_file_across_filesystems_copies_then_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "a.bin", tmp_path / "deep" / "er" / "a.bin"
    src.write_bytes(b"x" * 100_000)
    os.utime(src, ns=(T0 * 10**9, T0 * 10**9 + 123))
    real_link = os.link
    calls: list[str] = []

    def cross_device(a: Any, b: Any, **kw: Any) -> None:
        calls.append(str(b))
        if len(calls) == 1:  # the first, direct link: as if dst were on another filesystem
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(a, b, **kw)

    monkeypatch.setattr(os, "link", cross_device)
    move_file(src, dst)
    assert not src.exists() and dst.read_bytes() == b"x" * 100_000
    assert dst.stat().st_mtime_ns == T0 * 10**9 + 123  # times travel with the copy
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.bin"]  # no partial file left behind


# --- the tiers through the CLI, on the learned model --------------------------------------------------------------


def test_library_scores_are_what_the_tiers_assume(library: tuple[dict[str, Path], Path]) -> None:
    files, store = library
    vectors = stored_vectors(store)
    v = {name: vectors[str(path)] for name, path in files.items()}
    for keeper, members in SIMILAR.items():
        for member in members:
            score = float(v[keeper] @ v[member])
            assert score >= (0.985 if member != "yellow-other" else 0.915), (keeper, member, score)
    assert 0.915 <= float(v["yellow-circle"] @ v["yellow-other"]) <= 0.945  # similar, not near
    grouped = {n for k, ms in SIMILAR.items() for n in {k, *ms}}
    for i, a in enumerate(sorted(grouped)):
        for b in sorted(files)[i:]:
            if b not in grouped and a != b:
                assert float(v[a] @ v[b]) < 0.8, (a, b)


def test_exact_tier_groups_same_bytes_and_keeps_the_oldest_copy(library: tuple[dict[str, Path], Path]) -> None:
    files, store = library
    doc = json.loads(run("dedup", "--tier", "exact", "--store", str(store), "--json").stdout)
    assert groups_by_name(doc, files) == EXACT
    assert doc["scanned"] == 20 and doc["duplicates"] == 2 and doc["threshold"] is None
    assert all(m["exact"] and m["score"] == 1.0 for g in doc["groups"] for m in g["members"])


def test_near_tier_groups_edits_and_copies_and_changes_nothing(library: tuple[dict[str, Path], Path]) -> None:
    files, store = library
    before = snapshot(files["red-circle"].parent)
    doc = json.loads(run("dedup", "--store", str(store), "--json").stdout)
    assert doc["tier"] == "near" and doc["threshold"] == 0.95
    assert groups_by_name(doc, files) == NEAR
    blue = next(g for g in doc["groups"] if g["keeper"]["path"] == str(files["blue-copy"]))
    exact = {Path(m["path"]).name: m["exact"] for m in blue["members"]}
    assert exact == {"blue-triangle.png": True, "blue-triangle-lowq.jpg": False}
    for group in doc["groups"]:
        scores = [m["score"] for m in group["members"]]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.95
        assert all(m["direct"] for m in group["members"])
    assert snapshot(files["red-circle"].parent) == before
    text = run("dedup", "--store", str(store)).stdout
    assert "3 groups, 7 duplicates among 20 images" in text and f"keep    {files['red-circle']}" in text


def test_similar_tier_only_when_asked_and_threshold_overrides(library: tuple[dict[str, Path], Path]) -> None:
    files, store = library
    similar = json.loads(run("dedup", "--tier", "similar", "--store", str(store), "--json").stdout)
    assert similar["threshold"] == 0.90 and groups_by_name(similar, files) == SIMILAR
    stricter = json.loads(
        run("dedup", "--tier", "similar", "--threshold", "0.94", "--store", str(store), "--json").stdout
    )
    assert groups_by_name(stricter, files) == NEAR
    edits = json.loads(run("dedup", "--folder", str(files["red-crop"].parent), "--store", str(store), "--json").stdout)
    assert edits["scanned"] == 5  # the 4 red-circle edits and the blue triangle's; full size, then the first path:
    assert groups_by_name(edits, files) == {"red-lowq": {"red-small", "red-crop", "red-tint"}}


def test_html_contact_sheet_and_csv(library: tuple[dict[str, Path], Path], tmp_path: Path) -> None:
    files, store = library
    page, table = tmp_path / "dupes.html", tmp_path / "dupes.csv"
    run("dedup", "--store", str(store), "--html", str(page), "--csv", str(table))
    html = page.read_text()
    assert html.count("<section>") == 3 and html.count("data:image/jpeg;base64,") == 3 + 7
    assert "edits &lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;" in html and "<b>" not in html
    assert html.index(f"{files['red-circle']}") < html.index("red-circle-small.png")  # the keeper comes first
    rows = table.read_text().splitlines()
    assert rows[0].startswith("group,role,path,score") and len(rows) == 1 + 3 + 7
    assert sum(",keeper," in r for r in rows) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tier", "exact", "--threshold", "0.9"], "drop --threshold"),
        (["--threshold", "1.5"], "not a cosine score"),
        (["--move-to"], "give DIR, or set dedup.duplicates_dir"),
        (["--threshold", "-1"], "below 0.5"),
        (["--tier", "similar", "--threshold", "0.2"], "below 0.5"),
        (["--yes"], "confirms --delete"),
        (["--move-to", "/tmp/x", "--delete"], "not allowed with argument"),
        (["--tier", "fuzzy"], "invalid choice"),
        (["--csv", "/no/such/dir/x.csv"], "/no/such/dir does not exist"),
        (["--folder", "/no/such/dir"], "/no/such/dir is not a directory"),
    ],
)
def test_bad_arguments_exit_2(library: tuple[dict[str, Path], Path], args: list[str], message: str) -> None:
    _, store = library
    proc = run("dedup", *args, "--store", str(store), check=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_empty_store_says_so(tmp_path: Path) -> None:
    proc = run("dedup", "--store", str(tmp_path / "none"), check=2)
    assert "is empty" in proc.stderr


# --- actions -----------------------------------------------------------------------------------------------------


def indexed(*folders: Path) -> dict[str, str]:
    """The environment that makes ``folders`` indexed folders (watch.paths) for `indexer dedup`."""
    return {"INDEXER_WATCH__PATHS": json.dumps([str(f) for f in folders])}


def test_move_to_keeps_keepers_moves_duplicates_and_the_store_follows(tmp_path: Path, model: LazyModel) -> None:
    """The target lies under an indexed folder (watch.paths): the moved files keep their points and vectors."""
    files, store = fresh_library(tmp_path, model)
    root, quarantine = tmp_path / "lib", tmp_path / "quarantine"
    before = stored_vectors(store)
    proc = run(
        "dedup", "--store", str(store), "--folder", str(root), "--move-to", str(quarantine), env=indexed(tmp_path)
    )
    out = proc.stdout
    assert out.index("dry run: move 7 files") < out.index("moved ")
    moved = {n for ms in NEAR.values() for n in ms}
    for name, path in files.items():
        target = quarantine / path.relative_to(root)
        assert path.exists() == (name not in moved) and target.exists() == (name in moved), name
    after = stored_vectors(store)
    assert len(after) == 20
    for name in moved:
        moved_to = str(quarantine / files[name].relative_to(root))
        assert str(files[name]) not in after and np.array_equal(after[moved_to], before[str(files[name])])
    again = json.loads(run("dedup", "--store", str(store), "--folder", str(root), "--json").stdout)
    assert again["groups"] == [] and again["scanned"] == 13


def test_move_to_without_dir_uses_the_duplicates_folder(tmp_path: Path, model: LazyModel) -> None:
    files, store = fresh_library(tmp_path, model)
    dups = tmp_path / "dups"
    env = {"INDEXER_DEDUP__DUPLICATES_DIR": str(dups)}
    proc = run("dedup", "--store", str(store), "--tier", "exact", "--move-to", env=env)
    assert "move 2 files (" in proc.stdout and f"to {dups}" in proc.stdout
    assert sorted(p.name for p in dups.rglob("*.png")) == ["blue-triangle.png", "green-square.png"]
    assert not files["blue-triangle"].exists() and not files["green-copy"].exists()


def test_nothing_moves_when_a_destination_exists(tmp_path: Path, model: LazyModel) -> None:
    files, store = fresh_library(tmp_path, model)
    root, quarantine = tmp_path / "lib", tmp_path / "quarantine"
    taken = quarantine / files["red-tint"].relative_to(root)
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's")
    before, vectors = snapshot(root), stored_vectors(store)
    proc = run("dedup", "--store", str(store), "--move-to", str(quarantine), check=2)
    assert "destination exists already" in proc.stderr and str(taken) in proc.stderr
    assert snapshot(root) == before and stored_vectors(store).keys() == vectors.keys()
    assert taken.read_bytes() == b"someone else's"


def test_delete_needs_yes_then_removes_files_and_points(tmp_path: Path, model: LazyModel) -> None:
    files, store = fresh_library(tmp_path, model)
    root = tmp_path / "lib"
    before = snapshot(root)
    refused = run("dedup", "--store", str(store), "--tier", "exact", "--delete", check=2)
    assert "dry run: delete 2 files" in refused.stdout and "add --yes" in refused.stderr
    assert snapshot(root) == before
    done = run("dedup", "--store", str(store), "--tier", "exact", "--delete", "--yes")
    assert f"deleted {files['blue-triangle']}" in done.stdout and f"deleted {files['green-copy']}" in done.stdout
    assert not files["blue-triangle"].exists() and not files["green-copy"].exists()
    assert files["blue-copy"].exists() and files["green-square"].exists()
    stored = stored_vectors(store)
    assert len(stored) == 18 and str(files["blue-triangle"]) not in stored and str(files["blue-copy"]) in stored


def test_changed_files_are_left_alone_and_exit_1(tmp_path: Path, model: LazyModel) -> None:
    files, store = fresh_library(tmp_path, model)
    files["green-copy"].write_bytes(files["green-copy"].read_bytes() + b"\0")  # changed after indexing
    files["red-circle"].unlink()  # a keeper gone: its duplicates are the only copies left
    proc = run("dedup", "--store", str(store), "--delete", "--yes", check=1)
    assert f"leave {files['green-copy']}: changed since it was indexed" in proc.stdout
    assert f"leave {files['red-small']}: its keeper {files['red-circle']} is missing" in proc.stdout
    assert files["green-copy"].exists() and all(files[n].exists() for n in NEAR["red-circle"])
    assert not files["blue-triangle"].exists() and not files["blue-lowq"].exists()


# --- actions on synthetic vectors: chains and hard links ----------------------------------------------------------


def synthetic_store(tmp_path: Path, vectors: dict[str, list[float]]) -> tuple[EdgeStore, dict[str, Path]]:
    """An Edge store whose points are real files (a.png, ...) with the given 3-d vectors."""
    store = EdgeStore(tmp_path / "store")
    store.ensure_collection("synthetic", 3)
    paths: dict[str, Path] = {}
    points = []
    for name, vec in vectors.items():
        path = paths[name] = tmp_path / "lib" / f"{name}.png"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(name.encode())
        st = path.stat()
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        payload = {"path": str(path), "dirs": dirs_of(path), "sha256": sha, "width": 10, "height": 10,
                   "size": st.st_size, "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns}  # fmt: skip
        v = np.asarray(vec, np.float32)
        points.append(StoredPoint(point_id(path), payload, v / np.linalg.norm(v)))
    store.upsert(points)
    return store, paths


def test_members_joined_only_through_another_are_never_touched(tmp_path: Path) -> None:
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.29), np.sin(0.29), 0.0])  # a·b = 0.958
    c = np.array([np.cos(0.58), np.sin(0.58), 0.0])  # b·c = 0.958, a·c = 0.836
    store, paths = synthetic_store(tmp_path, {"a": a.tolist(), "b": b.tolist(), "c": c.tolist()})
    with store:
        report = find_duplicates(store, "near", threshold=0.95)
        (group,) = report.groups
        direct = {Path(m.item.path).stem: m.direct for m in group.members}
        assert direct == {"b": True, "c": False}
        plan = apply_plan(plan_actions(report, move_to=tmp_path / "q"), store)
        assert [Path(x.item.path).stem for x in plan.done] == ["b"]
        assert "joined only through another duplicate" in plan.skipped[0].reason and not plan.skipped[0].problem
    assert paths["a"].exists() and paths["c"].exists() and not paths["b"].exists()


def test_a_hard_link_to_the_keeper_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.png").write_bytes(b"same inode")
    os.link(tmp_path / "lib" / "a.png", tmp_path / "lib" / "b.png")
    store, _ = synthetic_store(tmp_path, {"a": [1, 0, 0], "b": [1, 0, 0]})
    with store:
        plan = plan_actions(find_duplicates(store, "near", threshold=0.95), delete=True)
    assert plan.actions == [] and "same file as its keeper" in plan.skipped[0].reason
