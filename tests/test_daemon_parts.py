"""The watch daemon's pieces, in-process: the scheduler, the deletion guard, the locked store's retry, the client
codec, and the control server over real HTTP (its checks and its error body). The whole daemon, as a process, is
tested in test_daemon.py and test_watch.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.daemon.client import ask_daemon, query_from_json, query_to_json
from indexer.daemon.control import ControlServer
from indexer.daemon.guard import DeletionGuard
from indexer.daemon.schedule import Scan, ScanKind, Scheduler
from indexer.daemon.shared import LockedStore
from indexer.errors import (
    ConfigError,
    IndexerError,
    ModelMismatchError,
    StoreError,
    UnknownImageError,
    body_for,
    error_from_body,
)
from indexer.records import Hit, SearchFilter, StoredPoint, dirs_of, point_id
from indexer.search import Query
from indexer.store.edge_store import EdgeStore
from indexer.store.protocol import VectorStore
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
        images=(tmp_path / "x.png",),
        limit=7,
        threshold=0.25,
        filter=SearchFilter(path_prefix="/photos", formats=("PNG",), min_width=10),
        uploads=(b"\x89PNG\x00\xff",),
        negative_ids=(point_id("/a"),),
    )
    wire = json.loads(json.dumps(query_to_json(query, "model-x", "/store")))
    assert wire["model"] == "model-x" and query_from_json(wire) == query


def test_a_query_with_fields_this_version_does_not_know_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not know the query fields colour"):
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


# --- the control server over real HTTP ----------------------------------------------------------------------------


class Target:
    """What the control server asks, answered from memory (the server, its checks and its codec are real)."""

    def __init__(self) -> None:
        self.searched: list[dict[str, Any]] = []

    def health(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok"}

    def render_metrics(self) -> tuple[bytes, str]:
        return b"indexer_up 1\n", "text/plain; version=0.0.4"

    def status(self, failures: int) -> dict[str, Any]:
        return {"store": "/secret/store", "failures": failures}

    def search(self, request: dict[str, Any]) -> list[Hit]:
        self.searched.append(request)
        if request.get("model") != "m":
            raise ConfigError("query", "search with the daemon's model")
        if request.get("boom"):
            raise RuntimeError("unexpected")
        return [Hit(id="1", score=0.5, payload={"path": "/secret/a.png"})]

    def body_limit(self) -> int:
        return 1024


@pytest.fixture
def control() -> Iterator[tuple[ControlServer, Target]]:
    target = Target()
    server = ControlServer(target, "127.0.0.1", 0)
    server.start()
    try:
        yield server, target
    finally:
        server.stop()


def _request(
    server: ControlServer, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
) -> tuple[int, Any, float]:
    host, port = server.httpd.server_address[:2]
    return raw_request(str(host), int(port), method, path, body, headers, timeout=10)


JSON = ("Content-Type", "application/json")
QUERY = json.dumps({"model": "m", "query": {"texts": ["x"]}}).encode()


def test_control_answers_status_and_search_to_a_local_client(control: tuple[ControlServer, Target]) -> None:
    server, _ = control
    assert _request(server, "GET", "/status?failures=3")[:2] == (200, {"store": "/secret/store", "failures": 3})
    status, body, _ = _request(server, "POST", "/search", QUERY, [JSON])
    assert status == 200 and body["hits"][0]["payload"]["path"] == "/secret/a.png"


def test_control_refuses_a_foreign_host_header(control: tuple[ControlServer, Target]) -> None:
    server, target = control
    for method, path, body in (("GET", "/status", b""), ("POST", "/search", QUERY)):
        status, answer, _ = _request(server, method, path, body, [("Host", "evil.example"), JSON])
        assert status == 403 and answer["error"] == "HostNotAllowedError" and "not allowed" in answer["detail"]
    assert target.searched == []
    assert _request(server, "GET", "/healthz", headers=[("Host", "evil.example")])[0] == 200  # no paths in it


def test_control_refuses_a_body_not_declared_as_json(control: tuple[ControlServer, Target]) -> None:
    server, target = control
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer, _ = _request(server, "POST", "/search", QUERY, [("Content-Type", content_type)])
        assert status == 415 and answer["error"] == "UnsupportedMediaError"
    assert target.searched == []


@pytest.mark.parametrize("length", ["abc", "-1", "1e11", " "])
def test_control_refuses_a_content_length_that_is_not_a_number(
    control: tuple[ControlServer, Target], length: str
) -> None:
    server, _ = control
    status, answer, seconds = _request(server, "POST", "/search", QUERY, [JSON, ("Content-Length", length)])
    assert status == 400 and answer["error"] == "ConfigError" and answer["setting"] == "Content-Length"
    assert seconds < 3.0  # answered at once, not after a read timeout


def test_control_refuses_a_body_above_the_limit_before_reading_it(control: tuple[ControlServer, Target]) -> None:
    server, _ = control
    status, answer, _ = _request(server, "POST", "/search", QUERY, [JSON, ("Content-Length", "100000000000")])
    assert status == 413 and answer["error"] == "PayloadTooLargeError" and "max_upload_mb" in answer["detail"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"x"', b"{not json"])
def test_control_refuses_a_body_that_is_not_a_json_object(control: tuple[ControlServer, Target], body: bytes) -> None:
    server, target = control
    status, answer, _ = _request(server, "POST", "/search", body, [JSON])
    assert status == 400 and answer["error"] == "ConfigError" and answer["setting"] == "query"
    assert target.searched == []


def test_control_errors_have_the_service_body(control: tuple[ControlServer, Target]) -> None:
    server, _ = control
    status, answer, _ = _request(server, "GET", "/nowhere")
    assert status == 404 and answer == {"detail": "not found", "error": "NotFound"}
    status, answer, _ = _request(server, "GET", "/status?failures=many")
    assert status == 400 and answer["error"] == "ConfigError" and answer["setting"] == "failures"
    boom = json.dumps({"model": "m", "boom": True}).encode()
    status, answer, _ = _request(server, "POST", "/search", boom, [JSON])
    assert status == 500 and answer == {"detail": "internal error (logged)", "error": "InternalError"}


def test_the_client_rebuilds_the_control_servers_errors(control: tuple[ControlServer, Target]) -> None:
    server, _ = control
    with pytest.raises(ConfigError) as err:
        ask_daemon(server.url, "POST", "/search", {"model": "other", "query": {}})
    assert err.value.setting == "query" and "daemon's model" in str(err.value)
    assert ask_daemon(server.url, "GET", "/status?failures=1")["failures"] == 1
