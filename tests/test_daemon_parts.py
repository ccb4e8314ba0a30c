"""The watch daemon's pieces, in-process: the scheduler, the deletion guard, the locked store's retry, the client
codec, and the owner's control routes on the one app over real HTTP (their checks, their error body, the remote
store). The whole daemon, as a process, is tested in test_daemon.py, test_owner.py and test_watch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.api.routes import create_app
from indexer.daemon.client import OwnerClient, ask_daemon, inline_images, query_from_json, query_to_json
from indexer.daemon.guard import DeletionGuard
from indexer.daemon.indexjobs import IndexJob
from indexer.daemon.remote import RemoteStore
from indexer.daemon.schedule import Scan, ScanKind, Scheduler
from indexer.errors import (
    ConfigError,
    IndexerError,
    ModelMismatchError,
    StoreError,
    UnknownImageError,
    body_for,
    error_from_body,
)
from indexer.ingest.pipeline import run_index
from indexer.model.lazy import LazyModel
from indexer.records import SearchFilter, StoredPoint, dirs_of, point_id
from indexer.search import Query
from indexer.settings import Settings
from indexer.store.edge_store import EdgeStore
from indexer.store.locked import LockedStore
from indexer.store.protocol import VectorStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.live_server import Owner, serve
from tests.support.rawhttp import raw_request

# --- the scheduler ------------------------------------------------------------------------------------------------


def test_periodic_rescan_is_jittered_within_ten_percent_and_off_at_zero() -> None:
    schedule = Scheduler(rescan_interval=100.0)
    for _ in range(20):
        schedule.rescan(1000.0)
        when = schedule.when(Scan(ScanKind.PERIODIC))
        assert when is not None and 1090.0 <= when <= 1110.0
    off = Scheduler(rescan_interval=0.0)
    off.rescan(1000.0)
    assert off.when(Scan(ScanKind.PERIODIC)) is None


def test_overflow_rescans_are_at_least_the_gap_apart() -> None:
    schedule = Scheduler(rescan_interval=0.0, overflow_gap=5.0)
    schedule.overflowed(100.0)
    assert schedule.due(100.0) == [Scan(ScanKind.OVERFLOW)]
    schedule.take(Scan(ScanKind.OVERFLOW), 100.0)
    schedule.overflowed(101.0)
    assert schedule.due(101.0) == [] and schedule.when(Scan(ScanKind.OVERFLOW)) == 105.0
    schedule.overflowed(102.0)  # already scheduled: one scan, not two
    assert schedule.due(105.0) == [Scan(ScanKind.OVERFLOW)]


def test_a_confirmation_keeps_its_first_time_and_a_root_back_is_due_at_once(tmp_path: Path) -> None:
    schedule = Scheduler(rescan_interval=0.0)
    schedule.confirm(tmp_path, 50.0)
    schedule.confirm(tmp_path, 80.0)
    schedule.root_back(tmp_path / "b", 10.0)
    assert schedule.due(49.0) == [Scan(ScanKind.ROOT_BACK, tmp_path / "b")]
    assert schedule.due(60.0) == [Scan(ScanKind.ROOT_BACK, tmp_path / "b"), Scan(ScanKind.CONFIRM, tmp_path)]


def test_roots_are_checked_once_per_interval() -> None:
    schedule = Scheduler(rescan_interval=0.0, every=1.0)
    assert schedule.roots_check_due(500.0)
    assert not schedule.roots_check_due(500.5)
    assert schedule.roots_check_due(501.0)


# --- the deletion guard, over a real store ---------------------------------------------------------------------------


def _point(path: Path) -> StoredPoint:
    payload = {"path": str(path), "dirs": dirs_of(path), "size": 1, "mtime_ns": 1}
    return StoredPoint(point_id(path), payload, np.full(4, 0.5, dtype=np.float32))


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[Path, EdgeStore, dict[str, StoredPoint]]]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "keep.png").write_bytes(b"x")
    points = [_point(root / f"f{i}.png") for i in range(10)]
    with EdgeStore(tmp_path / "store") as store:
        store.ensure_collection("m", 4)
        store.upsert(points)
        yield root, store, {p.path: p for p in points}


def test_few_deletions_apply_and_a_mass_deletion_is_held(
    guarded: tuple[Path, EdgeStore, dict[str, StoredPoint]],
) -> None:
    root, store, points = guarded
    guard = DeletionGuard([root], fraction=0.5, minimum=2, store=store)
    few = dict(list(points.items())[:2])
    apply, held = guard.split(few, now=0.0)
    assert len(apply) == 2 and held.total() == 0
    apply, held = guard.split(points, now=1.0)
    assert apply == [] and held.total() == 10 and "mass deletion" in held.reasons[root]


def test_a_confirmed_root_loses_any_share(guarded: tuple[Path, EdgeStore, dict[str, StoredPoint]]) -> None:
    root, store, points = guarded
    guard = DeletionGuard([root], fraction=0.5, minimum=2, store=store)
    apply, held = guard.split(points, now=0.0, confirmed=frozenset({root}))
    assert len(apply) == 10 and held.total() == 0


def test_nothing_is_deleted_under_a_missing_or_empty_root(
    guarded: tuple[Path, EdgeStore, dict[str, StoredPoint]],
) -> None:
    root, store, points = guarded
    guard = DeletionGuard([root], fraction=1.0, minimum=100, store=store)
    (root / "keep.png").unlink()  # empty, like an unmounted share
    apply, held = guard.split(points, now=0.0, confirmed=frozenset({root}))
    assert apply == [] and "empty" in held.reasons[root]
    apply, _ = guard.split(points, now=0.0, confirmed=frozenset({root}), allow_empty=True)
    assert len(apply) == 10
    root.rmdir()
    apply, held = guard.split(points, now=0.0, confirmed=frozenset({root}), allow_empty=True)
    assert apply == [] and "missing" in held.reasons[root]


# --- the locked store: one reopen and retry after a store failure ----------------------------------------------------


class FailingOnce(EdgeStore):
    """A real Edge store whose next count() fails, as Edge's payload storage does after a foreign open."""

    armed = True

    def count(self, filter: SearchFilter | None = None) -> int:
        if FailingOnce.armed:
            FailingOnce.armed = False
            raise StoreError("payload storage is not flushable")
        return super().count(filter)


def test_a_failed_store_call_reopens_the_store_and_retries_once(tmp_path: Path) -> None:
    with EdgeStore(tmp_path / "s") as first:
        first.ensure_collection("m", 4)
        first.upsert([_point(tmp_path / "a.png")])
    opened: list[VectorStore] = []

    def open_store() -> VectorStore:
        opened.append(FailingOnce(tmp_path / "s"))
        return opened[-1]

    FailingOnce.armed = True
    with LockedStore(open_store) as store:
        assert store.count() == 1
        assert store.reopened == 1 and len(opened) == 2


def test_a_model_mismatch_is_not_retried(tmp_path: Path) -> None:
    opened: list[VectorStore] = []

    def open_store() -> VectorStore:
        opened.append(EdgeStore(tmp_path / "s"))
        return opened[-1]

    with LockedStore(open_store) as store:
        store.ensure_collection("m", 4)
        with pytest.raises(ModelMismatchError):
            store.ensure_collection("other", 4)
        assert store.reopened == 0 and len(opened) == 1


# --- the codec: queries and errors travel whole ----------------------------------------------------------------------


def test_a_query_survives_the_json_round_trip(tmp_path: Path) -> None:
    query = Query(
        texts=("a red circle",),
        limit=7,
        threshold=0.25,
        filter=SearchFilter(path_prefix="/photos", formats=("PNG",), min_width=10),
        uploads=(b"\x89PNG\x00\xff",),
        negative_ids=(point_id("/a"),),
    )
    wire = json.loads(json.dumps(query_to_json(query, "model-x", "/store")))
    assert wire["model"] == "model-x" and query_from_json(wire) == query


def test_image_files_travel_as_bytes_and_a_path_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG-bytes")
    sent = inline_images(Query(texts=("a",), images=(image,), negative_images=(image,)))
    assert sent.images == () and sent.uploads == (b"\x89PNG-bytes",) and sent.negative_uploads == (b"\x89PNG-bytes",)
    with pytest.raises(ValueError, match="reads no file a client names"):
        query_from_json(query_to_json(Query(images=(image,)), None, "/store"))


def test_a_query_with_fields_this_version_does_not_know_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not know the query fields colour"):  # fmt: skip
        query_from_json({"query": {"texts": ["x"], "colour": "red"}})
    with pytest.raises(ConfigError, match="no query"):
        query_from_json({"query": ["x"]})


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("query.limit", "must be positive"),
        ModelMismatchError("a", "b", "at /s"),
        UnknownImageError(["id-1", "id-2"]),
        StoreError("the store failed"),
    ],
)
def test_an_error_body_rebuilds_the_same_exception(error: IndexerError) -> None:
    rebuilt = error_from_body(json.loads(json.dumps(body_for(error))), "fallback")
    assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
    assert all(getattr(rebuilt, name) == getattr(error, name) for name in error.FIELDS)


def test_a_body_of_no_known_kind_is_a_store_error_keeping_its_message() -> None:
    assert str(error_from_body({"detail": "odd", "error": "Teapot"}, "fallback")) == "odd"
    assert str(error_from_body(["not", "a", "body"], "fallback")) == "fallback"


# --- the control routes of the one app, over real HTTP ---------------------------------------------------------


class Breakable(EdgeStore):
    """A real Edge store whose failure_count can be made to raise an unexpected error."""

    boom = False

    def failure_count(self) -> int:
        if Breakable.boom:
            raise RuntimeError("unexpected")
        return super().failure_count()


@dataclass
class Live:
    url: str
    port: int
    store: LockedStore
    photos: Path
    settings: Settings


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("control")
    photos = base / "photos"
    write_dataset(photos, 6, seed=3, size=64)
    settings = shapes_settings(base / "store", serve={"max_upload_mb": 1.0})
    model = LazyModel(settings.model)
    store = LockedStore(lambda: Breakable(settings.store.dir))
    run_index([photos], settings, store, model)
    with serve(create_app(settings, store, model, api_key="", owner=Owner(settings, store, model), page=False)) as url:
        yield Live(url, int(url.rsplit(":", 1)[1]), store, photos, settings)
    store.close()


def _request(
    live: Live, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
) -> tuple[int, Any, float]:
    return raw_request("127.0.0.1", live.port, method, path, body, headers, timeout=10)


JSON = ("Content-Type", "application/json")
QUERY = json.dumps({"query": {"texts": ["a red circle"]}}).encode()


def test_control_answers_status_and_search_to_a_local_client(live: Live) -> None:
    status, body, _ = _request(live, "GET", "/control/status?failures=3")
    assert status == 200 and body["store"] == str(live.settings.store.dir) and body["images"] == 6
    assert body["daemon"] == {"pid": 1, "url": "here"}
    status, body, _ = _request(live, "POST", "/control/search", QUERY, [JSON])
    assert status == 200 and body["hits"][0]["payload"]["path"].startswith(str(live.photos))


def test_control_refuses_a_foreign_host_header(live: Live) -> None:
    for method, path, body in (("GET", "/control/status", b""), ("POST", "/control/search", QUERY)):
        status, answer, _ = _request(live, method, path, body, [("Host", "evil.example"), JSON])
        assert status == 403 and answer["error"] == "HostNotAllowedError" and "not allowed" in answer["detail"]
    # Stricter than the old control server: the daemon's /healthz names its roots, so it follows the Host rule too.
    assert _request(live, "GET", "/healthz", headers=[("Host", "evil.example")])[0] == 403
    assert _request(live, "GET", "/healthz")[0] == 200


def test_control_refuses_a_body_not_declared_as_json(live: Live) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer, _ = _request(live, "POST", "/control/search", QUERY, [("Content-Type", content_type)])
        assert status == 415 and answer["error"] == "UnsupportedMediaError"


@pytest.mark.parametrize("length", ["abc", "-1", "1e11", " "])
def test_control_refuses_a_content_length_that_is_not_a_number(live: Live, length: str) -> None:
    # No body after the malformed header: the server answers and closes at once, and a body it never read could
    # make the close a reset before the answer is read.
    status, answer, seconds = _request(live, "POST", "/control/search", b"", [JSON, ("Content-Length", length)])
    assert status == 400
    if answer is not None:  # uvicorn answers some malformed headers itself, in text (as for `indexer serve`)
        assert answer["error"] == "ConfigError" and answer["setting"] == "Content-Length"
    assert seconds < 3.0  # answered at once, not after a read timeout


def test_control_refuses_a_body_above_the_limit_before_reading_it(live: Live) -> None:
    status, answer, _ = _request(live, "POST", "/control/search", QUERY, [JSON, ("Content-Length", "100000000000")])
    assert status == 413 and answer["error"] == "PayloadTooLargeError" and "max_upload_mb" in answer["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"x"',
        b"{not json",
        b'{"query": {"texts": 5}}',
        b'{"query": {"limit": "many"}}',
        b'{"query": {"texts": ["x"], "threshold": [1]}}',
        b'{"query": {"texts": ["x"], "filter": {"$filter": {"min_width": "wide"}}}}',
        b'{"query": {"texts": ["x"], "uploads": [{"$b64": 7}]}}',
        b'{"query": {"texts": ["x"]}, "colour": "red"}',
    ],
)
def test_control_answers_a_body_of_the_wrong_shape_or_types_with_422(live: Live, body: bytes) -> None:
    status, answer, _ = _request(live, "POST", "/control/search", body, [JSON])
    assert status == 422 and answer["error"] == "ValidationError", answer


def test_a_huge_limit_is_a_422_and_no_store_reopen(live: Live) -> None:
    reopened = live.store.reopened
    for limit in (2**64, 10**9, 0, -1):
        body = json.dumps({"query": {"texts": ["x"], "limit": limit}}).encode()
        status, answer, _ = _request(live, "POST", "/control/search", body, [JSON])
        assert status == 422 and "query.limit" in answer["detail"], answer
    assert live.store.reopened == reopened


def test_a_client_cannot_make_the_owner_read_a_path(live: Live, tmp_path: Path) -> None:
    fifo = tmp_path / "never.png"
    os.mkfifo(fifo)  # reading it would hang the engine thread
    for field in ("images", "negative_images"):
        body = json.dumps({"query": {"texts": ["x"], field: [{"$path": str(fifo)}]}}).encode()
        status, answer, seconds = _request(live, "POST", "/control/search", body, [JSON])
        assert status == 422 and "reads no file a client names" in answer["detail"] and seconds < 3.0


def test_control_errors_have_the_service_body(live: Live) -> None:
    status, answer, _ = _request(live, "GET", "/nowhere")
    assert status == 404 and answer == {"detail": "Not Found", "error": "NotFound"}
    status, answer, _ = _request(live, "GET", "/control/status?failures=many")
    assert status == 422 and answer["error"] == "ValidationError" and "failures" in answer["detail"]
    status, answer, _ = _request(live, "GET", f"/control/index/{'0' * 32}")
    assert status == 404 and answer["error"] == "UnknownJobError" and answer["job_id"] == "0" * 32
    Breakable.boom = True
    try:
        status, answer, _ = _request(live, "GET", "/control/status")
    finally:
        Breakable.boom = False
    assert status == 500 and answer == {"detail": "internal error (logged)", "error": "InternalError"}


def test_the_client_rebuilds_the_owners_errors(live: Live) -> None:
    owner = OwnerClient(live.url, live.settings)
    with pytest.raises(UnknownImageError) as err:
        owner.search(Query(ids=(point_id("/nowhere.png"),)))
    assert err.value.ids == [point_id("/nowhere.png")]
    assert owner.status(1)["images"] == 6
    with pytest.raises(IndexerError):
        ask_daemon(live.url, "GET", "/control/index/" + "f" * 32)


def test_the_remote_store_pages_scrolls_and_round_trips_vectors(live: Live) -> None:
    remote = RemoteStore(OwnerClient(live.url, live.settings))
    local = list(live.store.scroll(with_vectors=True))
    paged = list(remote.scroll(with_vectors=True, batch_size=4))  # two pages through one cursor
    assert sorted(p.id for p in paged) == sorted(p.id for p in local) and len(paged) == 6
    by_id = {p.id: p for p in local}
    assert all(np.array_equal(np.asarray(p.vector), np.asarray(by_id[p.id].vector)) for p in paged)
    flt = SearchFilter(path_prefix=str(live.photos / "red"))
    assert remote.count(flt) == live.store.count(flt) and remote.count() == 6
    first = local[0]
    remote.set_payload([first.id], {"cluster": 3})
    assert live.store.retrieve([first.id])[0].payload["cluster"] == 3
    assert remote.retrieve([first.id], with_vectors=True)[0].payload["cluster"] == 3


def test_an_index_job_runs_on_the_owner_and_reports_progress(live: Live, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    write_dataset(extra, 3, seed=9, size=64)
    owner = OwnerClient(live.url, live.settings)
    job = owner.ask("POST", "/index", {"paths": [str(extra)]})
    deadline = time.monotonic() + 60
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        job = owner.ask("GET", f"/index/{job['id']}")
    assert job["state"] == "done" and job["summary"]["indexed"] == 3 and job["total"] == 3
    assert isinstance(owner.ask("GET", f"/index/{job['id']}"), dict)
    live.store.delete([p.id for p in live.store.scroll(filter=SearchFilter(path_prefix=str(extra)))])
    assert IndexJob("x", []).state == "queued"


def test_the_cli_side_of_the_owner_imports_no_torch() -> None:
    code = (
        "import sys, indexer.daemon.client, indexer.daemon.remote, indexer.cli.owned, indexer.search; "
        "print('torch' in sys.modules, 'fastapi' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
