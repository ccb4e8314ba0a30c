"""One owner of the embedded store: `indexer watch --serve` holds it and serves the page, the API and the CLI on one
port; every command asks it and prints what it prints without one. Real processes, real HTTP, a real Chromium."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from indexer.store.edge_store import EdgeStore
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import INDEXER, MODEL
from tests.support.daemon import Daemon, files, run_cli, wait_for, write_png

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@dataclass
class Library:
    """A folder of shapes with two exact copies, indexed by `indexer index` before any daemon runs."""

    root: Path
    store: Path
    base: Path

    def cli(self, *args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--store", str(self.store), check=check)


def _library(base: Path) -> Library:
    root = base / "root"
    write_dataset(root / "shapes", 12, seed=31, size=64)
    (root / "copies").mkdir()
    for name in ("red-circle-0001.png", "blue-square-0008.png"):
        shutil.copy2(root / "shapes" / name, root / "copies" / name)
    library = Library(root, base / "store", base)
    library.cli("index", str(root), *MODEL)
    return library


# Commands whose output must not change when the owner answers them (run in this order, twice: alone, then with
# a daemon holding the store). Cluster writes the same labels both times (its seed is fixed); fp32 on both sides
# (the CPU dtype is otherwise measured per process, and bf16 moves the 4th decimal of a score).
COMMANDS: dict[str, list[str]] = {
    "cluster": ["cluster", "--k", "3"],
    "status": ["status"],
    "search text": ["search", "a red circle", "-k", "5", *MODEL],
    "search json": ["search", "a blue square", "--folder", "{root}/shapes", "--json", *MODEL],
    "dedup": ["dedup", "--tier", "exact"],
    "dedup near json": ["dedup", "--tier", "near", "--json"],
    "export": ["export", "-o", "{out}"],
    "import": ["import", "{out}"],  # the same points again: idempotent
}


def _run_all(library: Library, out: Path) -> dict[str, str]:
    got = {}
    for name, args in COMMANDS.items():
        filled = [a.format(root=library.root, out=out) for a in args]
        text = library.cli(*filled).stdout
        got[name] = "\n".join(line for line in text.splitlines() if not line.startswith("daemon:"))
        got[name] = got[name].replace(str(out), "OUT")
        if name == "search json":  # the owner's engine thread runs torch on serve.threads: the last float32 bit
            got[name] = json.dumps([{**h, "score": f"{h['score']:.4f}"} for h in json.loads(got[name])], sort_keys=True)
    return got


def _same_export(owned: Path, alone: Path) -> None:
    """The same file, byte for byte (the vectors came through the owner bit for bit, in the same order)."""
    got, expected = pq.read_table(owned), pq.read_table(alone)
    assert got.schema.equals(expected.schema, check_metadata=True) and got.num_rows == expected.num_rows == 14
    assert got.sort_by("id").equals(expected.sort_by("id"))
    assert owned.read_bytes() == alone.read_bytes()


def test_every_command_prints_the_same_through_the_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INDEXER_MODEL__DTYPE", "fp32")
    library = _library(tmp_path)
    alone = _run_all(library, tmp_path / "alone.parquet")
    daemon = Daemon([library.root], library.store, tmp_path / "daemon.log", "--serve", "--port", "0")
    try:
        owned = _run_all(library, tmp_path / "owned.parquet")
        assert owned == alone
        _same_export(tmp_path / "owned.parquet", tmp_path / "alone.parquet")
        status = library.cli("status").stdout
        assert f"daemon:   pid {daemon.proc.pid} at {daemon.url}, watching" in status
        # Nothing was opened twice: the daemon never had to reopen its store, and no command said "in use".
        assert "opening it again" not in daemon.text() and daemon.health()["status"] == "ok"
        _act_through_the_owner(library, daemon, tmp_path / "dups")
    finally:
        assert daemon.stop() == 0


def _act_through_the_owner(library: Library, daemon: Daemon, dups: Path) -> None:
    """dedup --move-to: the files move as this user and, DIR being outside the indexed folders, the moved copies
    leave the index through the owner (issue 19); the daemon agrees, and a second dedup finds nothing."""
    proc = library.cli("dedup", "--tier", "exact", "--move-to", str(dups))
    assert "moved 2 files, 0 failed, 0 left alone" in proc.stdout, proc.stdout + proc.stderr
    moved = {str(p) for p in dups.rglob("*.png")}
    assert len(moved) == 2 and len(files(library.root)) == 12  # one of each pair stays (the keeper)
    points = daemon.wait_paths(files(library.root))
    assert not {p for p in points if p.startswith(str(dups))}
    assert "0 groups" in library.cli("dedup", "--tier", "exact").stdout


def test_index_through_the_owner_is_queued_incremental_and_shows_its_summary(tmp_path: Path) -> None:
    library = _library(tmp_path)
    other = tmp_path / "other"
    write_dataset(other, 5, seed=32, size=64)
    daemon = Daemon([library.root], library.store, tmp_path / "daemon.log")
    try:
        first = library.cli("index", str(other), *MODEL)
        assert first.stdout.strip() == "indexed 5, unchanged 0, moved 0, removed 0, failed 0"
        again = json.loads(library.cli("index", str(other), *MODEL, "--json").stdout)
        assert (again["indexed"], again["unchanged"]) == (0, 5)
        assert daemon.text().count("queued index job") == 2
        assert daemon.count() == len(files(library.root)) + 5
    finally:
        assert daemon.stop() == 0


def test_kill_9_of_the_owner_mid_index_loses_nothing(tmp_path: Path) -> None:
    root, store, burst = tmp_path / "root", tmp_path / "store", tmp_path / "burst"
    write_dataset(root, 2, seed=33, size=64)
    write_dataset(burst, 150, seed=34, size=64)
    daemon = Daemon([root], store, tmp_path / "daemon.log", "--batch-size", "8")
    command = [INDEXER, "index", str(burst), "--store", str(store), *MODEL, "--batch-size", "8", "--workers", "1"]
    index = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the owner's job to be part-way", lambda: daemon.count() >= 2 + 24, 120, 0.05)
        daemon.kill()  # kill -9, mid-request
        out, err = index.communicate(timeout=300)
    finally:
        daemon.kill()
        if index.poll() is None:
            index.kill()
    assert index.returncode == 0, out + err
    assert "indexing goes on here" in err
    summary = out.strip()
    assert summary.startswith("indexed ") and ", failed 0" in summary
    indexed, unchanged = (int(part.split()[-1]) for part in summary.split(",")[:2])
    assert unchanged >= 24 and indexed + unchanged == 150  # what the owner stored was kept, the rest done here
    status = json.loads(run_cli("status", "--store", str(store), "--json").stdout)
    assert "daemon" not in status and status["images"] == 152


IMPORTS_TORCH = (
    "import sys; from indexer.cli.main import main; code = main(sys.argv[1:]); print('TORCH', 'torch' in sys.modules)"
)


def test_commands_answered_by_the_owner_import_no_torch(tmp_path: Path) -> None:
    library = _library(tmp_path)
    daemon = Daemon([library.root], library.store, tmp_path / "daemon.log")
    try:
        store = ["--store", str(library.store)]
        for args in (
            ["status"],
            ["search", "a red circle", "-k", "2"],  # no --model: the owner's model
            ["dedup", "--tier", "exact"],
            ["export", "-o", str(tmp_path / "e.parquet")],
        ):
            proc = subprocess.run(
                [sys.executable, "-c", IMPORTS_TORCH, *args, *store], capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.splitlines()[-1] == "TORCH False", (args, proc.stdout, proc.stderr)
        assert (
            "red-circle"
            in subprocess.run(
                [INDEXER, "search", "a red circle", "-k", "1", *store], capture_output=True, text=True, timeout=120
            ).stdout
        )
    finally:
        assert daemon.stop() == 0


def test_serve_on_a_store_the_daemon_owns_points_there(tmp_path: Path) -> None:
    library = _library(tmp_path)
    daemon = Daemon([library.root], library.store, tmp_path / "daemon.log", "--serve", "--port", "0")
    try:
        proc = library.cli("serve", "--port", "0", *MODEL, check=2)
        assert f"owned by `indexer watch` (pid {daemon.proc.pid})" in proc.stderr
        assert f"its page and API are at {daemon.url}/" in proc.stderr and "in use" not in proc.stderr
    finally:
        assert daemon.stop() == 0


def test_watch_waits_for_a_brief_holder_of_the_store_instead_of_exiting(tmp_path: Path) -> None:
    root, store = tmp_path / "root", tmp_path / "store"
    write_dataset(root, 3, seed=35, size=64)
    run_cli("index", str(root), "--store", str(store), *MODEL)
    log = tmp_path / "daemon.log"
    holder = EdgeStore(store)  # another process's brief open, as `indexer status` of an older version made

    def release() -> None:  # once the daemon has met the holder (or after 90 s), a couple of retries later
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "waiting for it" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        time.sleep(2.5)
        holder.close()

    threading.Thread(target=release, daemon=True).start()
    daemon = Daemon([root], store, log)
    try:
        assert daemon.text().count("waiting for it, retrying") >= 2
        assert daemon.count() == 3 and daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


# --- the page, served by the daemon ---------------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_a_file_dropped_into_the_folder_appears_in_a_page_search(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    root = tmp_path / "root"
    write_dataset(root, 12, seed=36, size=64)
    env = {"INDEXER_SERVE__ROOTS": json.dumps([str(root)])}
    daemon = Daemon([root], tmp_path / "store", tmp_path / "daemon.log", "--serve", "--port", "0", env=env)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(60_000)  # a search beside the daemon's ingest on two busy cores
            page.goto(daemon.url + "/")
            dropped = write_png(root / "new" / "dropped.png", seed=700, color="yellow", shape="triangle")
            wait_for(
                "the dropped file in a page search",
                lambda: str(dropped) in _page_search(page, "a yellow triangle"),
                60,
                0.5,
            )
            thumb = page.eval_on_selector(
                f"#grid li.hit[data-path='{dropped}'] img", "img => img.complete && img.naturalWidth > 0"
            )
            assert thumb is not False
            browser.close()
    finally:
        assert daemon.stop() == 0


def _page_search(page: Any, text: str) -> list[str]:
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_function("() => !document.querySelector('#status').textContent.startsWith('Searching')")
    paths: list[str] = page.eval_on_selector_all("#grid li.hit", "els => els.map(e => e.dataset.path)")
    return paths


def test_commands_ask_a_running_indexer_serve_too(tmp_path: Path) -> None:
    library = _library(tmp_path)
    other = tmp_path / "other"
    write_dataset(other, 3, seed=37, size=64)
    command = [INDEXER, "serve", "--port", "0", "--store", str(library.store), *MODEL]
    with open(tmp_path / "serve.log", "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=out)
    try:
        advert = library.store / "daemon.json"

        def advertised() -> dict[str, Any] | None:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            return json.loads(advert.read_text()) if advert.exists() else None

        found = wait_for("indexer serve to advertise itself", advertised, 90)
        assert found["kind"] == "serve" and found["page"] is True and found["pid"] == server.pid
        status = library.cli("status").stdout
        assert "images:   14" in status and f"server:   pid {server.pid} at {found['url']}" in status
        assert library.cli("index", str(other), *MODEL).stdout.startswith("indexed 3, unchanged 0")
        assert "red-circle" in library.cli("search", "a red circle", "-k", "1").stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0 and not advert.exists()
