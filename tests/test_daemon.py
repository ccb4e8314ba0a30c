"""`indexer watch` end to end: real daemons in subprocesses, real filesystem events, the real store and the learned
test model. Each case of the issue: create, copy, slow write, atomic rename, moves, delete, a 1,000-file burst, a
vanished or emptied root, mass deletions, restart reconciliation, SIGTERM and kill -9 mid-burst, search and status
while it runs, polling, the inotify limit, queue overflow."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.shapes import write_dataset
from tests.support.clirun import INDEXER, MODEL
from tests.support.daemon import BASE_ENV, Daemon, files, run_cli, sha256, wait_for, write_png

__all__ = ["Daemon", "wait_for"]  # test_faults.py uses them from here

# --- one daemon, many everyday changes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, Path]]:
    """A daemon watching a root of 12 shapes, with JSON logs: (daemon, root, a folder outside the root)."""
    base = tmp_path_factory.mktemp("live")
    root, outside = base / "root", base / "outside"
    write_dataset(root / "base", 12, seed=1, size=64)
    outside.mkdir()
    daemon = Daemon([root], base / "store", base / "daemon.log", "--json-logs")
    yield daemon, root, outside
    daemon.kill()


def test_start_up_reconciliation_indexes_what_is_there(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    daemon.wait_paths(files(root))


def test_new_file_becomes_searchable_within_seconds(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    started = time.monotonic()
    path = write_png(root / "new" / "fresh.png", seed=100)
    daemon.wait_paths(files(root), timeout=10)
    assert time.monotonic() - started < 5
    assert daemon.metric("indexer_watch_complete_to_searchable_seconds_count") >= 1
    assert str(path) in daemon.points()


def test_copied_in_file_is_indexed(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, outside = live
    source = write_png(outside / "to-copy.png", seed=101)
    shutil.copy(source, root / "new" / "copied.png")
    daemon.wait_paths(files(root))


def test_slow_chunked_write_is_taken_once_and_complete(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, outside = live
    data = write_png(outside / "slow-source.png", seed=102).read_bytes()
    indexed = daemon.metric("indexer_watch_files_indexed_total")
    path = root / "new" / "slow.png"
    with open(path, "wb") as fh:
        for start in range(0, len(data), 1000):
            fh.write(data[start : start + 1000])
            fh.flush()
            time.sleep(0.4)  # longer than stable_seconds (0.3): only the close may complete it
    points = daemon.wait_paths(files(root))
    time.sleep(0.8)  # a second, wrong take would show within max_wait
    assert daemon.metric("indexer_watch_files_indexed_total") == indexed + 1
    assert points[str(path)]["sha256"] == hashlib.sha256(data).hexdigest()
    assert daemon.get("/status")["failed"] == 0


def test_atomic_rename_is_one_new_file(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    indexed = daemon.metric("indexer_watch_files_indexed_total")
    temp = write_png(root / "new" / ".atomic.png.tmp123", seed=103)
    os.rename(temp, root / "new" / "atomic.png")
    daemon.wait_paths(files(root))
    time.sleep(0.8)
    assert daemon.metric("indexer_watch_files_indexed_total") == indexed + 1


def test_move_within_keeps_the_vector(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    source = root / "base" / "green-circle-0004.png"
    before = daemon.points()[str(source)]
    indexed = daemon.metric("indexer_watch_files_indexed_total")
    (root / "moved").mkdir(exist_ok=True)
    os.rename(source, root / "moved" / "renamed.png")
    after = daemon.wait_paths(files(root))[str(root / "moved" / "renamed.png")]
    assert after["indexed_at"] == before["indexed_at"] and after["sha256"] == before["sha256"]
    assert daemon.metric("indexer_watch_files_indexed_total") == indexed
    assert daemon.metric("indexer_watch_files_moved_total") >= 1


def test_move_out_is_a_deletion_and_move_in_a_new_file(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, outside = live
    shutil.move(root / "base" / "blue-circle-0007.png", outside / "blue-circle-0007.png")
    daemon.wait_paths(files(root))
    shutil.move(write_png(outside / "incoming.png", seed=104), root / "new" / "incoming.png")
    daemon.wait_paths(files(root))


def test_deleted_file_leaves_the_store(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    (root / "base" / "red-square-0002.png").unlink()
    daemon.wait_paths(files(root))


def test_bad_file_is_skipped_with_its_reason(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    (root / "new" / "broken.png").write_bytes(b"not a png at all")

    def failed() -> dict[str, Any] | None:
        status: dict[str, Any] = daemon.get("/status")
        return status if status["failed"] else None

    status = wait_for("the failure to be recorded", failed)
    assert status["failures"][0]["path"].endswith("broken.png") and "not an image" in status["failures"][0]["reason"]
    (root / "new" / "broken.png").unlink()
    assert daemon.health()["status"] == "ok"


def test_search_and_status_work_through_the_cli_while_it_runs(live: tuple[Daemon, Path, Path]) -> None:
    daemon, root, _ = live
    daemon.wait_paths(files(root))
    args = ["--store", str(daemon.store), *MODEL, "--json"]
    hits = json.loads(run_cli("search", "a yellow triangle", "-k", "1", *args).stdout)
    assert [Path(h["path"]).name for h in hits] == ["yellow-triangle-0012.png"]
    status = run_cli("status", "--store", str(daemon.store)).stdout
    assert f"images:   {len(files(root))}" in status and f"daemon:   pid {daemon.proc.pid}" in status
    # A second writer is not refused any more: the daemon owns the store and runs the index itself, once.
    proc = run_cli("index", str(root), "--store", str(daemon.store), *MODEL)
    assert proc.stdout.startswith("indexed 0, unchanged ") and "in use" not in proc.stderr
    write_png(root / "new" / "after-intruder.png", seed=105)
    daemon.wait_paths(files(root))


def test_healthz_metrics_and_json_logs(live: tuple[Daemon, Path, Path]) -> None:
    daemon, _, _ = live
    health = daemon.health()
    assert health["status"] == "ok" and list(health["roots"].values()) == ["inotify"]
    metrics = daemon.get("/metrics")
    for name in (
        "indexer_watch_files_seen_total",
        "indexer_watch_files_indexed_total",
        "indexer_watch_files_failed_total",
        "indexer_watch_queue_depth",
        "indexer_watch_batch_size_bucket",
        "indexer_watch_embed_seconds_bucket",
        "indexer_watch_complete_to_searchable_seconds_bucket",
    ):
        assert name in metrics
    lines = [json.loads(line) for line in daemon.text().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("batch: ") and line["level"] == "INFO" for line in lines)
    assert not [line for line in daemon.text().splitlines() if line.strip() and not line.startswith("{")]


# --- bursts, stopping and restarting ------------------------------------------------------------------------------


def test_burst_of_1000_files_uses_full_batches(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dataset(root, 2, seed=2, size=64)
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", "--batch-size", "32")
    try:
        started = time.monotonic()
        write_dataset(root / "burst", 1000, seed=3, size=64)
        daemon.wait_paths(files(root), timeout=120)
        elapsed = time.monotonic() - started
        batches = daemon.metric("indexer_watch_batch_size_count")
        assert daemon.metric("indexer_watch_batch_size_sum") >= 1000
        assert batches <= 1000 / 8, f"{batches} batches for 1000 files: not batching"
        assert daemon.get("/status")["failed"] == 0
        print(f"1000-file burst searchable in {elapsed:.1f} s, {batches:.0f} batches")
    finally:
        assert daemon.stop() == 0


def test_an_index_job_and_the_watcher_never_embed_a_file_twice(tmp_path: Path) -> None:
    """`indexer index ROOT` asked of the daemon while a burst's events are pending: the job runs in the worker's
    ingest turn, so each file is embedded once, by one or the other (run side by side, both planned the same new
    files and embedded them twice)."""
    root = tmp_path / "root"
    write_dataset(root, 2, seed=2, size=64)
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", "--batch-size", "8")
    try:
        write_dataset(root / "burst", 160, seed=4, size=64)
        job = json.loads(run_cli("index", str(root), "--store", str(tmp_path / "store"), "--json").stdout)
        daemon.wait_paths(files(root), timeout=120)
        watched = daemon.metric("indexer_watch_files_indexed_total")  # the start-up's 2 and the events' share
        assert watched + job["indexed"] == 162, f"watcher {watched:.0f} + job {job['indexed']}"
        assert job["indexed"] + job["unchanged"] == 162
    finally:
        assert daemon.stop() == 0


def test_sigterm_during_an_index_job_stops_the_job_before_the_store_closes(tmp_path: Path) -> None:
    """SIGTERM while an `indexer index` job runs in the daemon: the job stops after its batch in flight (marked
    interrupted), and only then is the store closed: no call of the job meets a closed store (which the daemon's
    store reopened, in a process on its way out)."""
    root, other, store = tmp_path / "root", tmp_path / "other", tmp_path / "store"
    write_dataset(root, 2, seed=2, size=64)
    write_dataset(other, 600, seed=5, size=64)  # not watched: only the job embeds it
    daemon = Daemon([root], store, tmp_path / "daemon.log", "--batch-size", "4")
    command = subprocess.Popen(
        [INDEXER, "index", str(other), "--store", str(store), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for("the job's first batches", lambda: daemon.count() >= 14, timeout=60)
        assert daemon.stop(signal.SIGTERM, timeout=20) == 0
    finally:
        daemon.kill()
        _, err = command.communicate(timeout=120)
    text = daemon.text()
    assert "stopped cleanly" in text and "the store failed" not in text and "Traceback" not in text, text
    assert re.search(r"index job \w+ done", text) and not re.search(r"index job \w+ failed", text), text
    assert command.returncode in (0, 130), err  # its summary (interrupted), or it went on by itself
    status = json.loads(run_cli("status", "--store", str(store), "--json").stdout)
    assert 14 <= status["images"] <= 602 and "warning" not in status


def test_restart_reconciles_what_changed_while_down(tmp_path: Path) -> None:
    root, store = tmp_path / "root", tmp_path / "store"
    write_dataset(root, 12, seed=4, size=64)
    daemon = Daemon([root], store, tmp_path / "a.log")
    before = daemon.wait_paths(files(root))
    assert daemon.stop() == 0 and not (store / "daemon.json").exists()
    # While it is down: 3 added, 1 changed, 2 deleted, 1 renamed.
    for i in range(3):
        write_png(root / f"added-{i}.png", seed=200 + i)
    changed = write_png(root / "red-circle-0001.png", seed=210, color="blue", shape="square")
    (root / "green-circle-0004.png").unlink()
    (root / "blue-circle-0007.png").unlink()
    os.rename(root / "yellow-circle-0010.png", root / "renamed.png")
    daemon = Daemon([root], store, tmp_path / "b.log")
    try:
        after = daemon.wait_paths(files(root))
        assert after[str(changed)]["sha256"] == sha256(changed) != before[str(changed)]["sha256"]
        assert (
            after[str(root / "renamed.png")]["indexed_at"] == before[str(root / "yellow-circle-0010.png")]["indexed_at"]
        )
        assert "4 indexed, 8 unchanged, 1 moved, 2 removed, 0 held" in daemon.text()
    finally:
        assert daemon.stop() == 0


def _mid_burst(daemon: Daemon, folder: Path, seed: int) -> None:
    """Drop 150 files and return once the daemon is part-way through embedding them (batches of 8)."""
    done = daemon.metric("indexer_watch_files_indexed_total")
    write_dataset(folder, 150, seed=seed, size=64)
    indexed = "indexer_watch_files_indexed_total"
    wait_for("the burst to be part-way", lambda: daemon.metric(indexed) >= done + 24, 60, 0.02)
    assert daemon.count() < len(files(folder.parent))


def test_sigterm_and_kill_9_mid_burst_lose_nothing(tmp_path: Path) -> None:
    root, store = tmp_path / "root", tmp_path / "store"
    write_dataset(root, 2, seed=5, size=64)
    daemon = Daemon([root], store, tmp_path / "a.log", "--batch-size", "8")
    _mid_burst(daemon, root / "first", seed=6)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0  # finishes or hands back the batch in flight
    assert time.monotonic() - started < 10
    assert not (store / "daemon.json").exists() and "stopped cleanly" in daemon.text()

    daemon = Daemon([root], store, tmp_path / "b.log", "--batch-size", "8")
    daemon.wait_paths(files(root), timeout=60)  # the SIGTERM lost nothing: the start-up reconciles the rest
    _mid_burst(daemon, root / "second", seed=7)
    daemon.kill()  # kill -9
    assert (store / "daemon.json").exists()  # stale: its process is gone, so the CLI opens the store itself
    status = json.loads(run_cli("status", "--store", str(store), "--json").stdout)
    assert "daemon" not in status and 152 <= status["images"] < len(files(root))

    daemon = Daemon([root], store, tmp_path / "c.log")
    try:
        daemon.wait_paths(files(root), timeout=60)  # every file indexed exactly once (ids are per path)
        assert daemon.count() == len(files(root)) == 302
    finally:
        assert daemon.stop() == 0


# --- never wipe ----------------------------------------------------------------------------------------------------


def test_vanished_or_emptied_root_deletes_nothing(tmp_path: Path) -> None:
    root, away, outside = tmp_path / "root", tmp_path / "root.away", tmp_path / "outside"
    write_dataset(root, 12, seed=7, size=64)
    outside.mkdir()
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log")
    try:
        expected = daemon.wait_paths(files(root)).keys()
        os.rename(root, away)  # unmounted, or renamed away
        wait_for("the root to be seen missing", lambda: daemon.health()["roots"][str(root)] == "missing")
        assert daemon.count() == 12
        write_png(away / "added-while-away.png", seed=300)
        os.rename(away, root)
        daemon.wait_paths(set(expected) | {str(root / "added-while-away.png")})
        for path in root.glob("*.png"):  # emptied: every file moved out at once
            shutil.move(path, outside / path.name)
        wait_for("the deletions to be held", lambda: daemon.health()["held_deletions"] == 13)
        wait_for("the warning", lambda: "no entry under it is deleted" in daemon.text())
        assert daemon.count() == 13
        for path in outside.glob("*.png"):
            shutil.move(path, root / path.name)
        wait_for("the held deletions to settle", lambda: daemon.health()["held_deletions"] == 0)
        daemon.wait_paths(files(root))
    finally:
        assert daemon.stop() == 0


def test_mass_deletion_is_held_until_a_later_scan_confirms_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dataset(root, 24, seed=8, size=64)
    env = {"INDEXER_WATCH__MASS_DELETE_MIN": "4", "INDEXER_WATCH__CONFIRM_DELAY": "3"}
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", env=env)
    try:
        daemon.wait_paths(files(root))
        for path in sorted(root.glob("*.png"))[:16]:
            path.unlink()
        wait_for("the deletions to be held", lambda: daemon.health()["held_deletions"] == 16)
        assert daemon.count() == 24 and "holding 16 deletions" in daemon.text()
        daemon.wait_paths(files(root), timeout=20)  # the confirming scan, 3 s later, applies them
        assert daemon.health()["held_deletions"] == 0
    finally:
        assert daemon.stop() == 0


def test_confirm_deletes_flag_applies_a_mass_deletion_at_start(tmp_path: Path) -> None:
    root, store = tmp_path / "root", tmp_path / "store"
    write_dataset(root, 24, seed=9, size=64)
    run_cli("index", str(root), "--store", str(store), *MODEL)
    for path in sorted(root.glob("*.png"))[:20]:
        path.unlink()
    daemon = Daemon([root], store, tmp_path / "a.log")
    assert daemon.count() == 24 and daemon.health()["held_deletions"] == 20
    assert daemon.stop() == 0
    daemon = Daemon([root], store, tmp_path / "b.log", "--confirm-deletes")
    try:
        assert daemon.count() == 4
    finally:
        assert daemon.stop() == 0


# --- other ways of watching ----------------------------------------------------------------------------------------


def test_poll_mode_follows_creates_moves_and_deletes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dataset(root, 4, seed=10, size=64)
    env = {"INDEXER_WATCH__POLL_INTERVAL": "0.2", "INDEXER_WATCH__RESCAN_INTERVAL": "1"}
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", "--poll", env=env)
    try:
        assert daemon.health()["roots"][str(root)] == "polling"
        write_png(root / "sub" / "polled.png", seed=400)
        daemon.wait_paths(files(root))
        os.rename(root / "sub" / "polled.png", root / "moved.png")
        (root / "red-circle-0001.png").unlink()
        daemon.wait_paths(files(root))
        wait_for("a periodic rescan", lambda: daemon.metric('indexer_watch_rescans_total{reason="periodic"}') >= 1)
    finally:
        assert daemon.stop() == 0


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces (unshare -Ur)")
def test_inotify_limit_falls_back_to_polling_with_a_hint(tmp_path: Path) -> None:
    root, store, log = tmp_path / "root", tmp_path / "store", tmp_path / "daemon.log"
    for sub in ("a/b", "c", "d"):
        write_png(root / sub / f"{sub.replace('/', '-')}.png", seed=len(sub))
    command = [INDEXER, "watch", str(root), "--store", str(store), *MODEL, "--workers", "1"]
    script = "echo 3 > /proc/sys/user/max_inotify_watches && exec " + shlex.join(command)
    daemon = Daemon.__new__(Daemon)
    daemon.store, daemon.log = store, log
    env = {**os.environ, **BASE_ENV, "INDEXER_WATCH__POLL_INTERVAL": "0.2"}
    daemon.proc = daemon._spawn(["unshare", "-Ur", "sh", "-c", script], env)
    try:
        daemon.url = wait_for("the daemon to advertise itself", daemon._advert, timeout=60)
        wait_for("the start-up reconciliation", lambda: daemon.health().get("phase") == "watching", timeout=60)
        assert daemon.health()["roots"][str(root)] == "polling"
        assert "inotify limit reached" in daemon.text() and "fs.inotify.max_user_watches" in daemon.text()
        write_png(root / "a" / "b" / "deep.png", seed=500)
        daemon.wait_paths(files(root))
    finally:
        assert daemon.stop() == 0


def test_queue_overflow_falls_back_to_a_rescan(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_dataset(root, 2, seed=11, size=64)
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", env={"INDEXER_WATCH__QUEUE_SIZE": "5"})
    try:
        write_dataset(root / "flood", 60, seed=12, size=64)
        daemon.wait_paths(files(root), timeout=60)
        assert daemon.metric('indexer_watch_rescans_total{reason="overflow"}') >= 1
        assert "dropping events, a rescan follows" in daemon.text()
    finally:
        assert daemon.stop() == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = run_cli("watch", "--store", str(tmp_path / "s"), *MODEL, check=2)
    assert "give PATH" in proc.stderr
    (tmp_path / "a" / "b").mkdir(parents=True)
    proc = run_cli(
        "watch", str(tmp_path / "a"), str(tmp_path / "a" / "b"), "--store", str(tmp_path / "s"), *MODEL, check=2
    )
    assert "inside another watched folder" in proc.stderr
