"""The Duplicates and Clusters routes over real HTTP (uvicorn in a thread, httpx), on the dedup tests' library of
planted exact and near duplicates indexed with the learned shapes model: scans with progress and pages, dry runs,
moves and deletes checked on disk and in the store, keeper changes, retries, the safety cases, the API-key rule,
clustering runs and cluster searches, and search sorted by date."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from indexer.api.routes import create_app
from indexer.ingest.pipeline import run_index
from indexer.model.lazy import LazyModel
from indexer.records import point_id
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.support.library import EXACT, NEAR, snapshot, write_library
from tests.support.live_server import serve

Library = tuple[httpx.Client, dict[str, Path], EdgeStore]


@contextmanager
def library(
    tmp_path: Path, model: LazyModel, api_key: str = "", link: bool = False, **sections: dict[str, Any]
) -> Iterator[Library]:
    """The dedup library under tmp_path/lib (plus, with ``link``, a hard link of the red circle), indexed, served
    (``serve.roots`` tmp_path unless ``sections`` say otherwise)."""
    files = write_library(tmp_path / "lib")
    if link:
        files["red-link"] = tmp_path / "lib" / "z-links" / "red-circle-link.png"
        files["red-link"].parent.mkdir()
        os.link(files["red-circle"], files["red-link"])
    serve_options = {"roots": [str(tmp_path)], "thumbnail_dir": str(tmp_path / "t"), **sections.pop("serve", {})}
    settings = shapes_settings(tmp_path / "store", serve=serve_options, **sections)
    store = EdgeStore(tmp_path / "store")
    try:
        assert run_index([tmp_path / "lib"], settings, store, model).indexed == len(files)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        app = create_app(settings, store, model, api_key=api_key)
        with serve(app) as url, httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            yield http, files, store
    finally:
        store.close()


def scan(http: httpx.Client, **body: Any) -> dict[str, Any]:
    """Start a scan, poll it until done; the finished scan with its first page of groups."""
    started = http.post("/duplicates/scans", json=body)
    assert started.status_code == 202, started.text
    job = started.json()
    deadline = time.monotonic() + 60
    while job["state"] == "running" or "page" not in job:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = http.get(f"/duplicates/scans/{job['id']}").json()
    assert job["state"] == "done", job
    return dict(job)


def by_name(groups: list[dict[str, Any]], files: dict[str, Path]) -> dict[str, set[str]]:
    name = {str(p): n for n, p in files.items()}
    return {name[g["keeper"]["path"]]: {name[m["path"]] for m in g["members"]} for g in groups}


def group_of(job: dict[str, Any], keeper: Path) -> dict[str, Any]:
    return next(g for g in job["page"] if g["keeper"]["path"] == str(keeper))


def act(http: httpx.Client, job: dict[str, Any], **body: Any) -> httpx.Response:
    return http.post(f"/duplicates/scans/{job['id']}/actions", json=body)


def stored_paths(store: EdgeStore) -> set[str]:
    return {p.path for p in store.scroll()}


def test_scans_report_progress_and_page_their_groups(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, files, _):
        near = scan(http, tier="near")
        assert (near["groups"], near["scanned"], near["done"], near["total"]) == (3, 20, 20, 20)
        assert by_name(near["page"], files) == NEAR
        sizes = [len(g["members"]) for g in near["page"]]
        assert sizes == sorted(sizes, reverse=True)
        red = group_of(near, files["red-circle"])
        assert all(0.95 <= m["score"] <= 1.0 and m["direct"] for m in red["members"])
        assert {"width", "height", "size", "mtime", "thumbnail"} <= set(red["keeper"])
        paged = http.get(f"/duplicates/scans/{near['id']}", params={"offset": 1, "limit": 1}).json()
        assert [g["index"] for g in paged["page"]] == [1] and paged["page"][0] == near["page"][1]
        exact = scan(http, tier="exact")
        assert by_name(exact["page"], files) == EXACT
        folder = scan(http, tier="near", folder=str(files["red-small"].parent))
        edits = str(files["red-small"].parent)
        assert folder["groups"] == 1 and folder["params"]["folder"] == edits  # the four red edits, no base
        assert by_name(folder["page"], files) == {"red-lowq": {"red-crop", "red-small", "red-tint"}}
        assert http.get(f"/duplicates/scans/{'0' * 32}").status_code == 404


def test_dry_run_then_move_with_a_changed_keeper_and_an_unticked_member(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, files, store):
        job = scan(http, tier="near")
        red = group_of(job, files["red-circle"])
        small = next(m for m in red["members"] if m["path"] == str(files["red-small"]))
        tint = next(m for m in red["members"] if m["path"] == str(files["red-tint"]))
        selection = {"group": red["index"], "keeper": small["id"], "exclude": [tint["id"]]}
        before = snapshot(tmp_path / "lib")
        dry = act(http, job, action="move", move_to=str(tmp_path / "dupes"), groups=[selection])
        assert dry.status_code == 200, dry.text
        planned = {p["path"] for p in dry.json()["planned"]}
        assert planned == {str(files[n]) for n in ("red-circle", "red-crop", "red-lowq")}
        assert all(p["keeper"] == str(files["red-small"]) for p in dry.json()["planned"])
        assert snapshot(tmp_path / "lib") == before and not (tmp_path / "dupes").exists()

        body = {"action": "move", "move_to": str(tmp_path / "dupes"), "groups": [selection], "dry_run": False}
        moved = act(http, job, **body, request_id="move-1")
        assert moved.status_code == 200, moved.text
        assert {d["path"] for d in moved.json()["done"]} == planned
        lib, dupes = tmp_path / "lib", tmp_path / "dupes"
        for name in ("red-circle", "red-crop", "red-lowq"):
            target = dupes / files[name].relative_to(lib)
            assert not files[name].exists() and before[str(files[name])] == target.read_bytes()
        assert files["red-small"].exists() and files["red-tint"].exists()
        paths = stored_paths(store)
        assert str(dupes / "red-circle.png") in paths and str(files["red-circle"]) not in paths
        assert str(files["red-small"]) in paths

        again = act(http, job, **body, request_id="move-1")
        assert again.json()["repeated"] is True and again.json()["done"] == moved.json()["done"]
        retried = act(http, job, **body)
        assert retried.status_code == 200, retried.text
        assert retried.json()["planned"] == [] and {a["path"] for a in retried.json()["already"]} == planned
        shown = http.get(f"/duplicates/scans/{job['id']}").json()
        done = [m for m in group_of(shown, files["red-circle"])["members"] if m["done"]]
        assert {m["path"] for m in done} == planned - {str(files["red-circle"])}


def test_a_delete_needs_confirmation(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, files, store):
        job = scan(http, tier="exact")
        green = group_of(job, files["green-square"])
        refused = act(http, job, action="delete", groups=[{"group": green["index"]}], dry_run=False)
        assert refused.status_code == 400 and "confirm" in refused.json()["detail"]
        assert refused.json()["error"] == "ConfigError"
        assert files["green-copy"].exists() and str(files["green-copy"]) in stored_paths(store)
        done = act(http, job, action="delete", groups=[{"group": green["index"]}], dry_run=False, confirm=True)
        assert [d["path"] for d in done.json()["done"]] == [str(files["green-copy"])]
        assert not files["green-copy"].exists() and files["green-square"].exists()
        assert str(files["green-copy"]) not in stored_paths(store)
        assert point_id(files["green-copy"]) not in {p.id for p in store.scroll()}


def test_changed_files_hard_links_and_existing_destinations_are_left_alone(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model, link=True) as (http, files, store):
        job = scan(http, tier="near")
        red = group_of(job, files["red-circle"])
        assert str(files["red-link"]) in {m["path"] for m in red["members"]}
        with files["red-crop"].open("ab") as fh:  # changed after the scan
            fh.write(b"\0")
        taken = tmp_path / "dupes" / 'edits <b>&"x"</b>' / "red-circle-small.png"
        taken.parent.mkdir(parents=True)
        taken.write_bytes(b"someone else's file")
        body = {"action": "move", "move_to": str(tmp_path / "dupes"), "groups": [{"group": red["index"]}]}
        exists = act(http, job, **body, dry_run=False, confirm=True)
        assert exists.status_code == 400 and "destination exists" in exists.json()["detail"]
        assert files["red-small"].exists() and taken.read_bytes() == b"someone else's file"
        taken.unlink()
        moved = act(http, job, **body, dry_run=False).json()
        skipped = {s["path"]: s for s in moved["skipped"]}
        assert "hard link" in skipped[str(files["red-link"])]["reason"]
        assert not skipped[str(files["red-link"])]["problem"]
        assert "changed since it was indexed" in skipped[str(files["red-crop"])]["reason"]
        assert files["red-link"].exists() and files["red-crop"].exists()
        assert {d["path"] for d in moved["done"]} == {str(files[n]) for n in ("red-small", "red-lowq", "red-tint")}
        assert str(files["red-crop"]) in stored_paths(store)


def test_with_an_api_key_every_action_needs_confirmation(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model, api_key="s3cret") as (http, files, _):
        assert httpx.post(str(http.base_url).rstrip("/") + "/duplicates/scans", json={}).status_code == 401
        job = scan(http, tier="exact")
        blue = group_of(job, files["blue-copy"])
        body = {
            "action": "move",
            "move_to": str(tmp_path / "d"),
            "groups": [{"group": blue["index"]}],
            "dry_run": False,
        }
        refused = act(http, job, **body)
        assert refused.status_code == 400 and "API key" in refused.json()["detail"]
        assert files["blue-triangle"].exists()
        assert act(http, job, **body, confirm=True).json()["done"][0]["path"] == str(files["blue-triangle"])
        assert not files["blue-triangle"].exists()


def test_bad_requests_are_4xx_naming_the_field(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, _, _store):
        assert http.post("/duplicates/scans", json={"tier": "exact", "threshold": 0.9}).status_code == 400
        low = http.post("/duplicates/scans", json={"tier": "near", "threshold": -1})
        assert low.status_code == 400 and "below 0.5" in low.json()["detail"]
        job = scan(http, tier="exact")
        cases = [
            ({"action": "move", "move_to": "relative/dir", "groups": [{"group": 0}]}, "move_to"),
            ({"action": "move", "move_to": "/elsewhere", "groups": [{"group": 0}]}, "served folders"),
            ({"action": "delete", "groups": [{"group": 99}]}, "group 99"),
            ({"action": "delete", "groups": [{"group": 0}, {"group": 0}]}, "twice"),
            (
                {"action": "delete", "groups": [{"group": 0, "keeper": "0" * 8 + "-0000-0000-0000-" + "0" * 12}]},
                "keeper",
            ),
        ]
        for body, word in cases:
            answer = act(http, job, **body)
            assert answer.status_code == 400 and word in answer.json()["detail"], (body, answer.text)
        many = {"action": "delete", "groups": [{"group": i} for i in range(51)]}
        assert act(http, job, **many).status_code == 422


def test_clustering_runs_and_cluster_searches(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, _files, store):
        assert http.get("/clusters").json() == {"clusters": [], "unclustered": 20}
        started = http.post("/clusters/runs", json={"k": 4})
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        for _ in range(600):
            job = http.get(f"/clusters/runs/{run_id}").json()
            if job["state"] != "running":
                break
            time.sleep(0.05)
        assert (job["state"], job["k"], job["points"]) == ("done", 4, 20), job
        clusters = http.get("/clusters", params={"central": 3}).json()
        assert clusters["unclustered"] == 0 and len(clusters["clusters"]) == 4
        sizes = [c["size"] for c in clusters["clusters"]]
        assert sum(sizes) == 20 and sizes == sorted(sizes, reverse=True)
        first = clusters["clusters"][0]
        assert 1 <= len(first["central"]) <= 3
        members = {p.id for p in store.scroll() if p.payload.get("cluster") == first["id"]}
        assert {c["id"] for c in first["central"]} <= members
        body = {"positive": {"ids": [first["central"][0]["id"]]}, "filter": {"cluster": first["id"]}, "limit": 100}
        hits = http.post("/search", json=body).json()["hits"]
        assert {h["id"] for h in hits} == members


def test_search_sorts_by_date_keeping_the_threshold(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model) as (http, _, _store):
        base = {"positive": {"texts": ["a red circle"]}, "limit": 20}
        relevance = http.post("/search", json=base).json()["hits"]
        scores = [h["score"] for h in relevance]
        assert scores == sorted(scores, reverse=True)
        cut = (scores[5] + scores[6]) / 2
        firsts = []
        for sort, descending in (("newest", True), ("oldest", False)):
            hits = http.post("/search", json={**base, "sort": sort, "threshold": cut}).json()["hits"]
            mtimes = [h["mtime"] for h in hits]
            assert mtimes == sorted(mtimes, reverse=descending) and len(set(mtimes)) > 1
            assert {h["id"] for h in hits} == {h["id"] for h in relevance if h["score"] >= cut}
            firsts.append(mtimes[0])
        assert firsts[0] > firsts[1]
        page = http.post("/search", json={**base, "sort": "oldest", "limit": 3, "offset": 2}).json()["hits"]
        whole = http.post("/search", json={**base, "sort": "oldest"}).json()["hits"]
        assert [h["id"] for h in page] == [h["id"] for h in whole[2:5]]
        text = http.get("/search", params={"q": "a red circle", "sort": "newest", "limit": 5}).json()["hits"]
        assert [h["mtime"] for h in text] == sorted((h["mtime"] for h in text), reverse=True)
        assert http.post("/search", json={**base, "sort": "sideways"}).status_code == 422


# --- issue 22: where moves may go, and who may make them -----------------------------------------------------------


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_link_below_the_move_target_is_never_followed(tmp_path: Path, model: LazyModel) -> None:
    with tempfile.TemporaryDirectory() as outside, library(tmp_path, model) as (http, files, store):
        (tmp_path / "dups").mkdir()
        (tmp_path / "dups" / "copies").symlink_to(outside)  # served root R, R/dups/copies -> /outside
        job = scan(http, tier="exact")
        green = group_of(job, files["green-square"])
        body = {"action": "move", "move_to": str(tmp_path / "dups"), "groups": [{"group": green["index"]}]}
        for answer in (act(http, job, **body), act(http, job, **body, dry_run=False, confirm=True)):
            assert answer.status_code == 400, answer.text
            assert "symbolic link" in answer.json()["detail"]
        assert os.listdir(outside) == [] and files["green-copy"].exists()
        assert str(files["green-copy"]) in stored_paths(store)


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_without_roots_moves_go_only_to_the_duplicates_folder_and_leave_the_index(
    tmp_path: Path, model: LazyModel
) -> None:
    dups = tmp_path / "dups"
    with (
        tempfile.TemporaryDirectory() as elsewhere,
        library(tmp_path, model, serve={"roots": []}, dedup={"duplicates_dir": str(dups)}) as (http, files, store),
    ):
        job = scan(http, tier="exact")
        groups = [{"group": g["index"]} for g in job["page"]]
        for target in (str(Path(elsewhere) / "cron.d"), "/etc/cron.d", str(tmp_path / "lib" / "x")):
            planned = act(http, job, action="move", move_to=target, groups=groups)
            assert planned.status_code == 400 and "outside" in planned.json()["detail"], planned.text
        done = act(http, job, action="move", groups=groups, dry_run=False, confirm=True)
        assert done.status_code == 200, done.text
        assert done.json()["moved_stay_indexed"] is False
        moved = {files["blue-triangle"], files["green-copy"]}
        assert {d["path"] for d in done.json()["done"]} == {str(p) for p in moved}
        assert all(not p.exists() for p in moved) and len(snapshot(dups)) == 2 and os.listdir(elsewhere) == []
        assert not {str(p) for p in moved} & stored_paths(store) and not any(
            p.startswith(str(dups)) for p in stored_paths(store)
        )
        assert scan(http, tier="exact")["groups"] == 0  # the moved copies left the index


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_with_no_roots_and_no_duplicates_folder_nothing_moves(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model, serve={"roots": []}) as (http, files, _):
        job = scan(http, tier="exact")
        body = {"action": "move", "move_to": str(tmp_path / "dups"), "groups": [{"group": 0}]}
        for answer in (act(http, job, **body), act(http, job, **body, dry_run=False, confirm=True)):
            assert answer.status_code == 400 and "neither is set" in answer.json()["detail"], answer.text
        assert files["blue-triangle"].exists() and files["green-copy"].exists()


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_beyond_loopback_without_a_key_nothing_is_moved_or_deleted(tmp_path: Path, model: LazyModel) -> None:
    with library(tmp_path, model, serve={"host": "0.0.0.0"}) as (http, files, store):
        job = scan(http, tier="exact")
        green = group_of(job, files["green-square"])
        move = {"action": "move", "move_to": str(tmp_path / "dups"), "groups": [{"group": green["index"]}]}
        assert act(http, job, **move).status_code == 200  # a dry run changes nothing
        for body in (move, {"action": "delete", "groups": [{"group": green["index"]}]}):
            answer = act(http, job, **body, dry_run=False, confirm=True)
            assert answer.status_code == 400 and "serve.api_key" in answer.json()["detail"], answer.text
        assert files["green-copy"].exists() and str(files["green-copy"]) in stored_paths(store)


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_the_page_never_acts_through_a_swapped_folder_nor_on_a_keeper_with_other_bytes(
    tmp_path: Path, model: LazyModel
) -> None:
    with tempfile.TemporaryDirectory() as victim, library(tmp_path, model) as (http, files, store):
        job = scan(http, tier="exact")
        copies = files["green-copy"].parent
        shutil.copytree(copies, victim, dirs_exist_ok=True, copy_function=shutil.copy2)
        copies.rename(copies.with_name("copies.real"))
        copies.symlink_to(victim)  # after the scan: lib/copies -> victim
        green = group_of(job, files["green-square"])
        answer = act(http, job, action="delete", groups=[{"group": green["index"]}], dry_run=False, confirm=True)
        assert answer.status_code == 200 and answer.json()["done"] == [], answer.text
        assert "now leads to" in answer.json()["skipped"][0]["reason"]
        assert sorted(os.listdir(victim)) == ["blue-triangle.png", "green-square.png"]
        keeper = copies.with_name("copies.real") / files["blue-copy"].name
        st = keeper.stat()
        keeper.write_bytes(bytes(255 - b for b in keeper.read_bytes()))  # same size, other bytes
        os.utime(keeper, ns=(st.st_atime_ns, st.st_mtime_ns))
        copies.unlink()
        copies.with_name("copies.real").rename(copies)  # the folder is back; its keeper is not what was indexed
        blue = group_of(job, files["blue-copy"])
        answer = act(http, job, action="delete", groups=[{"group": blue["index"]}], dry_run=False, confirm=True)
        assert answer.json()["done"] == [] and "sha256 differs" in answer.json()["failed"][0]["reason"]
        assert files["blue-triangle"].exists() and str(files["blue-triangle"]) in stored_paths(store)
