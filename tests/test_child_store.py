"""The embedded store in a process of its own (`indexer.store.child.ChildStore`, what `indexer index` writes
through): the same answers as the store in-process, errors with their types, and no orphan holding the store when
either process dies."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from bench.vectors import clip_like
from indexer.errors import ModelMismatchError, StoreBusyError, StoreError
from indexer.records import Failure, SearchFilter, StoredPoint, dirs_of, point_id
from indexer.store.child import ChildStore
from indexer.store.edge_store import EdgeStore


def points(n: int, seed: int = 3) -> list[StoredPoint]:
    vectors, _ = clip_like(n, seed=seed)
    return [
        StoredPoint(
            point_id(p := f"/lib/{i % 3}/{i:04d}.jpg"), {"path": p, "dirs": dirs_of(p), "sha256": f"{i:064x}"}, v
        )
        for i, v in enumerate(vectors)
    ]


def vec(point: StoredPoint) -> np.ndarray:
    assert point.vector is not None
    return point.vector


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended


def wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_child_store_answers_as_the_store_in_process(tmp_path: Path) -> None:
    given = points(600)
    with ChildStore(tmp_path / "s", min_free_mb=0) as store:
        assert store.model_info() is None
        store.ensure_collection("m", 768)
        store.ensure_payload_indexes()
        store.upsert(given)
        assert store.model_info() == ("m", 768) and store.count() == 600
        assert store.count(SearchFilter(path_prefix="/lib/1")) == 200
        got = store.retrieve([given[5].id, point_id("/missing"), given[2].id], with_vectors=True)
        assert [p.id for p in got] == [given[5].id, given[2].id]
        assert got[0].vector is not None and np.array_equal(got[0].vector, vec(given[5]))  # bit for bit
        scrolled = list(store.scroll(with_vectors=True, batch_size=64))  # ten pages
        assert sorted(p.id for p in scrolled) == sorted(p.id for p in given)
        partial = store.scroll(batch_size=10)
        assert len([next(partial) for _ in range(15)]) == 15  # two pages read, then given up
        assert isinstance(partial, types.GeneratorType)
        partial.close()
        hits = store.query(vec(given[7]), limit=3, filter=SearchFilter(path_prefix="/lib/1"))
        assert hits[0].id == given[7].id and len(hits) == 3
        assert [p.id for p in store.find_by_sha256([f"{9:064x}"])] == [given[9].id]
        store.set_payload([given[0].id], {"album": "x"})
        store.delete([given[1].id])
        store.record_failures([Failure(Path("/lib/bad.jpg"), "truncated", size=3, mtime_ns=4)])
        assert store.failure_count() == 1 and store.failures()[0].reason == "truncated"
        store.clear_failures(["/lib/bad.jpg"])
        assert store.failure_count() == 0
        assert store.indexed_vectors_count() == 0
        store.flush()
        pid = store._process.pid
    assert wait_gone(pid)
    with EdgeStore(tmp_path / "s") as again:  # what the child wrote, read in-process
        assert again.count() == 599
        assert again.retrieve([given[0].id])[0].payload["album"] == "x"
        assert np.array_equal(vec(again.retrieve([given[4].id], with_vectors=True)[0]), vec(given[4]))


def test_errors_keep_their_type(tmp_path: Path) -> None:
    with ChildStore(tmp_path / "s", min_free_mb=0) as store:
        store.ensure_collection("m", 4)
        with pytest.raises(ModelMismatchError, match="other"):
            store.ensure_collection("other", 4)
        with pytest.raises(ValueError, match="has no vector"):
            store.upsert([StoredPoint(point_id("/a"), {"path": "/a"})])
        with pytest.raises(ValueError, match="batch_size"):
            next(store.scroll(batch_size=0))
        store.upsert([StoredPoint(point_id("/a"), {"path": "/a"}, np.ones(4, np.float32))])  # still answering
        assert store.count() == 1
        with pytest.raises(StoreBusyError, match="held by pid"):
            ChildStore(tmp_path / "s", min_free_mb=0)
    with EdgeStore(tmp_path / "s"), pytest.raises(StoreBusyError):
        ChildStore(tmp_path / "s", min_free_mb=0)
    with pytest.raises(StoreError, match="closed"):
        store.count()


def test_a_child_that_dies_is_reported_not_waited_for(tmp_path: Path) -> None:
    store = ChildStore(tmp_path / "s", min_free_mb=0)
    store.ensure_collection("m", 4)
    os.kill(store._process.pid, signal.SIGKILL)
    with pytest.raises(StoreError, match=r"ended unexpectedly \(signal 9\)"):
        store.count()
    store.close()


PARENT = textwrap.dedent("""
    import signal, sys, time
    import numpy as np
    from indexer.records import StoredPoint, point_id
    from indexer.store.child import ChildStore

    def some(start):
        ones = np.ones(4, np.float32)
        return [StoredPoint(point_id(f"/{i}"), {"path": f"/{i}"}, ones) for i in range(start, start + 50)]

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `indexer watch` stops on SIGTERM
    store = ChildStore(sys.argv[1], min_free_mb=0)
    store.ensure_collection("m", 4)
    store.upsert(some(0))
    try:  # entered before the pid goes out: the test signals as soon as it reads it
        print(store._process.pid, flush=True)
        time.sleep(60)
    except KeyboardInterrupt:  # as `indexer index` does: what is queued is still written, then the store closed
        store.upsert(some(50))
        store.close()
""")


def test_the_child_ends_with_its_parent_and_keeps_what_it_stored(tmp_path: Path) -> None:
    """kill -9 of `indexer index` leaves no process holding the store, and the points written are there."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    parent.kill()
    parent.wait(timeout=30)
    assert wait_gone(child), "the store's process outlived its parent"
    with EdgeStore(tmp_path / "s") as store:
        assert store.count() == 50


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_reaches_the_run_not_the_store(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group, and systemd stops a service by signalling
    every process in it: the store's process goes on answering while the run writes what it had queued, and ends
    with the close."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    if sig == signal.SIGTERM:
        os.kill(child, sig)  # it is in a group of its own: a terminal's signal never reaches it, systemd's does
    os.killpg(parent.pid, sig)
    assert parent.wait(timeout=60) == 0
    assert wait_gone(child)
    with EdgeStore(tmp_path / "s") as store:
        assert store.count() == 100


# -- `indexer index` through it, as on a GPU machine (store.separate_process = "on"; "auto" picks it with CUDA) -----


def test_the_choice_of_store_process(tmp_path: Path) -> None:
    from indexer.settings import load_settings
    from indexer.store.factory import separate_process_wanted

    def chosen(mode: str, device: str) -> bool:
        return separate_process_wanted(
            load_settings(None, {"store": {"separate_process": mode}, "model": {"device": device}})
        )

    assert chosen("auto", "cuda") and chosen("auto", "cuda:1") and not chosen("auto", "cpu")
    assert chosen("on", "cpu") and not chosen("off", "cuda")


def test_index_through_the_store_process_end_to_end(tmp_path: Path) -> None:
    """The real console script: a run stopped by Ctrl-C (sent to its whole process group, as a terminal does) keeps
    its finished batches, the next run resumes, and the result searches as an in-process run's does."""
    from tests.fixtures.shapes import write_dataset
    from tests.support.clirun import INDEXER, MODEL, run, run_json

    env = {"INDEXER_STORE__SEPARATE_PROCESS": "on", "PYTHONFAULTHANDLER": "1"}  # SIGABRT: every thread's stack
    folder, store = tmp_path / "shapes", tmp_path / "store"
    write_dataset(folder, 240, seed=8, size=96)
    args = ["index", str(folder), "--store", str(store), *MODEL, "--batch-size", "4", "--workers", "1", "-v"]
    proc = subprocess.Popen(
        [INDEXER, *args], stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, start_new_session=True
    )
    assert proc.stderr is not None
    seen, lines = 0, []
    for line in proc.stderr:
        lines.append(line)
        seen += "embedded 4 images" in line
        if seen == 3:
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rest = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:  # show where it waits
        os.kill(proc.pid, signal.SIGABRT)
        raise AssertionError(f"no exit 60 s after Ctrl-C; its threads:\n{proc.communicate(timeout=30)[1]}") from None
    assert proc.returncode == 130, rest
    assert any(f"store at {store} opens in a process of its own" in line for line in lines)
    done = run_json("status", "--store", str(store))["images"]  # the store's process has ended: it opens here
    assert 8 <= done < 240
    again = run("index", str(folder), "--store", str(store), *MODEL, "--json", env=env)
    summary = json.loads(again.stdout)
    assert (summary["unchanged"], summary["indexed"], summary["failed"]) == (done, 240 - done, 0)
    reference = tmp_path / "reference"
    run_json("index", str(folder), "--store", str(reference), *MODEL)  # in this process (off on a CPU)
    query = ["search", "red circle", *MODEL, "--limit", "5", "--json"]
    ours = run_json(*query[:-1], "--store", str(store))
    theirs = run_json(*query[:-1], "--store", str(reference))
    assert np.allclose([h["score"] for h in ours], [h["score"] for h in theirs], atol=1e-4)  # other batches
    assert {h["path"] for h in ours} == {h["path"] for h in theirs}  # (ties may come in another order)


def store_processes_of(pid: int) -> list[int]:
    """The store processes (`python -m indexer.store.child`) whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"indexer.store.child" in command:
            found.append(int(stat.parent.name))
    return found


def test_the_watch_daemon_through_the_store_process(tmp_path: Path) -> None:
    """`indexer watch` with the store in a process of its own (as on a GPU machine): it indexes, answers the CLI,
    and neither kill -9 nor SIGTERM leaves the store held; a restart reconciles what changed meanwhile."""
    from tests.fixtures.shapes import write_dataset
    from tests.support.daemon import Daemon, files, run_cli

    env = {"INDEXER_STORE__SEPARATE_PROCESS": "on"}
    root, store = tmp_path / "root", tmp_path / "store"
    write_dataset(root / "a", 12, seed=1, size=64)
    daemon = Daemon([root], store, tmp_path / "a.log", "--json-logs", env=env)
    try:
        daemon.wait_paths(files(root), timeout=60)
        (child,) = store_processes_of(daemon.proc.pid)
        logged = [json.loads(line) for line in daemon.text().splitlines()]  # the child's lines too: JSON
        assert any("opens in a process of its own" in entry["message"] for entry in logged)
        hits = json.loads(run_cli("search", "a red circle", "--store", str(store), "--json").stdout)
        assert hits and all(h["path"] in files(root) for h in hits)
    finally:
        daemon.kill()  # kill -9
    assert wait_gone(child), "the store's process outlived the daemon"
    status = json.loads(run_cli("status", "--store", str(store), "--json").stdout)
    assert status["images"] == 12
    write_dataset(root / "b", 6, seed=2, size=64)  # while it is down
    daemon = Daemon([root], store, tmp_path / "b.log", env=env)
    try:
        daemon.wait_paths(files(root), timeout=60)
        (child,) = store_processes_of(daemon.proc.pid)
    finally:
        assert daemon.stop() == 0
    assert wait_gone(child)
    assert json.loads(run_cli("status", "--store", str(store), "--json").stdout)["images"] == 18


def test_what_the_child_logs_is_logged_here(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged store's warning, made in the child when it opens, reaches this process's handlers under the
    store's logger (so the daemon's JSON log lines and the CLI's stderr show it as they would in-process)."""
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection("m", 4)
        store.upsert([StoredPoint(point_id(f"/{i}"), {"path": f"/{i}"}, np.ones(4, np.float32)) for i in range(5)])
    (tmp_path / "s" / "points.json").write_text(json.dumps({"version": 1, "points": 9}))
    with caplog.at_level(logging.INFO, logger="indexer"), ChildStore(tmp_path / "s", min_free_mb=0) as child:
        assert child.damage is not None and "held 9 at its last flush" in child.damage
    warned = [r for r in caplog.records if r.name == "indexer.store.edge_store" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "holds 5 images but held 9" in warned[0].getMessage()


def test_the_daemon_starts_a_store_process_that_died_again(tmp_path: Path) -> None:
    """Behind the daemon's `LockedStore`, a store process killed under it is replaced at the next call, which then
    answers (nothing stored is lost)."""
    from indexer.store.locked import LockedStore

    with LockedStore(lambda: ChildStore(tmp_path / "s", min_free_mb=0)) as store:
        store.ensure_collection("m", 4)
        store.upsert([StoredPoint(point_id("/a"), {"path": "/a"}, np.ones(4, np.float32))])
        store.flush()
        first = store.inner._process.pid  # type: ignore[attr-defined]
        os.kill(first, signal.SIGKILL)
        assert store.count() == 1 and store.reopened == 1
        assert store.inner._process.pid != first  # type: ignore[attr-defined]
    assert wait_gone(first)
