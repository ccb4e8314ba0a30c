"""The fault suite (issue 10): a hostile user and a failing machine, through the real CLI, real HTTP and the real store.

kill -9 at random moments (a fixed seed, bounded trials) of `indexer index` and `indexer watch`, then a clean re-run:
every file on disk is stored exactly once, and no process the killed one started survives it. Hostile names
(not UTF-8, a newline, a leading dash, 255 bytes) and special files (FIFO, socket, a link to /dev/zero, a folder named
like an image). Invalid settings and paging flags: one line, exit 2, the setting named. Figures: docs/reliability.md.

Run alone with ``pytest -m faults``; ``INDEXER_FAULT_TRIALS`` changes the number of kill trials (default 6 each).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.library.export import paths_line
from indexer.records import NOT_UTF8, POINT_NAMESPACE, Failure, display_path, name_problem, point_id
from indexer.sources.scan import scan
from indexer.store.factory import open_store_from_settings
from tests.conftest import shapes_settings
from tests.fixtures.shapes import draw_shape, write_dataset
from tests.support.clirun import INDEXER, MODEL, run
from tests.support.daemon import Daemon, wait_for

pytestmark = pytest.mark.faults

TRIALS = int(os.environ.get("INDEXER_FAULT_TRIALS", "6"))
SEED = 10  # the number: the kill moments are the same on every run
MARK = "INDEXER_FAULT_MARK"  # every process a trial starts inherits it: how survivors are found
BAD = os.fsdecode(b"bad\xff\xfe.png")  # a name that is not valid UTF-8 (surrogate-escaped, as Python sees it)
ENV = {"INDEXER_STORE__OPTIMIZE_AFTER": "1000000", "INDEXER_WATCH__STABLE_SECONDS": "0.3"}


# --- helpers ---------------------------------------------------------------------------------------------------------


def survivors(mark: str) -> list[int]:
    """Processes (not zombies) whose environment carries ``mark``: everything a trial started, however started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and f"{MARK}={mark}".encode() in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def assert_none_survive(mark: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (left := survivors(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # never leave them behind for the next test, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} child processes outlived the killed parent by {within} s: {left}"


def spawn(args: list[str], log: Path, mark: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **ENV, **(env or {}), MARK: mark}
    with open(log, "ab") as out:
        return subprocess.Popen([INDEXER, *args], stdout=out, stderr=out, env=env, start_new_session=True)


def wait_text(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> bool:
    """True once ``text`` is in the log; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {text!r} in {log}")


def kill_trial(proc: subprocess.Popen[bytes], mark: str) -> int:
    """kill -9 the process; no process it started may outlive it. Returns how many it had running at the kill."""
    children = len([pid for pid in survivors(mark) if pid != proc.pid])
    proc.kill()
    proc.wait(timeout=30)
    assert_none_survive(mark)
    return children


def store_vs_disk(store: Path, root: Path) -> dict[str, int]:
    """Files on disk against points stored: how many are lost (on disk, not stored) and duplicated."""
    on_disk = {str(p) for p in root.rglob("*.png")}
    with open_store_from_settings(shapes_settings(store)) as opened:
        paths = [p.path for p in opened.scroll()]
    return {
        "files": len(on_disk),
        "lost": len(on_disk - set(paths)),
        "extra": len(set(paths) - on_disk),
        "duplicated": len(paths) - len(set(paths)),
    }


def index_cli(root: Path, store: Path, *extra: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    return run("index", str(root), "--store", str(store), *MODEL, *extra, check=check, env=ENV)


# --- kill -9 at random moments ---------------------------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_kill_9_during_index_loses_nothing_duplicates_nothing_and_leaves_no_child(tmp_path: Path) -> None:
    rng, root, store = random.Random(SEED), tmp_path / "root", tmp_path / "store"
    children = []
    for trial in range(TRIALS):
        write_dataset(root / f"t{trial}", 40, seed=trial, size=96)  # new work for every trial
        mark, log = uuid.uuid4().hex, tmp_path / f"index{trial}.log"
        args = ["index", str(root), "--store", str(store), *MODEL, "--workers", "2", "--batch-size", "4", "-v"]
        proc = spawn(args, log, mark)
        # Even trials are killed while the run starts (scan, model load), odd ones while batches are being stored.
        if trial % 2 == 0 or wait_text(log, "embedded", proc):
            time.sleep(rng.uniform(0.0, 1.5))
        children.append(kill_trial(proc, mark))
    index_cli(root, store)  # the clean re-run; the figures go to docs/reliability.md (pytest -s prints them)
    figures = store_vs_disk(store, root)
    print(f"kill -9 during index: {TRIALS} trials, children at each kill {children}, {figures}")
    assert figures == {"files": 40 * TRIALS, "lost": 0, "extra": 0, "duplicated": 0}


@pytest.mark.timeout(1200)
def test_kill_9_during_watch_loses_nothing_duplicates_nothing_and_leaves_no_child(tmp_path: Path) -> None:
    rng, root, store = random.Random(SEED + 1), tmp_path / "root", tmp_path / "store"
    write_dataset(root / "base", 8, seed=99, size=96)
    children = []
    for trial in range(TRIALS):
        mark, log = uuid.uuid4().hex, tmp_path / f"watch{trial}.log"
        args = ["watch", str(root), "--store", str(store), *MODEL, "--workers", "2", "--batch-size", "4", "-v"]
        proc = spawn(args, log, mark, {"INDEXER_WATCH__MAX_WAIT": "2"})  # batches of events big enough for workers
        assert wait_text(log, "ready in", proc), log.read_text(errors="replace")[-3000:]  # the model is loaded
        burst = root / f"burst{trial}"
        burst.mkdir()
        rng_images = np.random.default_rng(trial)
        for i in range(30):  # a burst of new files while the daemon runs, the kill somewhere inside it
            draw_shape("red", "circle", rng_images, 96).save(burst / f"{i:03}.png", "PNG")
            if i == 10:
                time.sleep(rng.uniform(0.0, 2.0))
        time.sleep(rng.uniform(0.0, 3.0))
        children.append(kill_trial(proc, mark))
    index_cli(root, store)  # the clean re-run; the figures go to docs/reliability.md (pytest -s prints them)
    figures = store_vs_disk(store, root)
    print(f"kill -9 during watch: {TRIALS} trials, children at each kill {children}, {figures}")
    assert figures == {"files": 8 + 30 * TRIALS, "lost": 0, "extra": 0, "duplicated": 0}


# --- hostile names and special files ---------------------------------------------------------------------------------

GOOD_NAMES = ["new\nline.png", "-leading-dash.png", "x" * 251 + ".png", "été 日本.png", "folder.png/inside.png"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, subprocess.CompletedProcess[str]]]:
    """A root of good files with hostile names beside a non-UTF-8 name and special files, indexed by the real CLI."""
    base = tmp_path_factory.mktemp("hostile")
    root, store = base / "root", base / "store"
    sources = write_dataset(base / "src", len(GOOD_NAMES) + 1, seed=3, size=64)
    for name, source in zip(GOOD_NAMES, sources, strict=False):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(source.read_bytes())
    (root / BAD).write_bytes(sources[-1].read_bytes())
    os.mkfifo(root / "fifo.jpg")
    (root / "zero.png").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.png"))
        proc = index_cli(root, store, check=1)  # 1: some files failed, the rest is stored
    yield root, store, proc


def test_hostile_names_are_indexed_and_the_bad_ones_skipped_with_a_reason(
    hostile: tuple[Path, Path, subprocess.CompletedProcess[str]],
) -> None:
    root, store, proc = hostile
    skipped = {
        "bad\\xff\\xfe.png": "file name is not valid UTF-8",
        "fifo.jpg": "not a regular file (a FIFO)",
        "sock.png": "not a regular file (a socket)",
        "zero.png": "not a regular file (a character device)",
    }
    for name, reason in skipped.items():
        assert f"skipping {root}/{name}: {reason}" in proc.stderr
    with open_store_from_settings(shapes_settings(store)) as opened:
        stored = {p.path for p in opened.scroll()}
        failures = {f.path: f.reason for f in opened.failures(limit=100)}
    assert stored == {str(root / name) for name in GOOD_NAMES}
    assert {Path(p).name for p in failures} == set(skipped)
    assert index_cli(root, store, "--json", check=1).stdout.count('"path"') == len(skipped)  # a re-run: same, no crash


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_embed_writes_every_good_file_beside_hostile_names(
    hostile: tuple[Path, Path, subprocess.CompletedProcess[str]], tmp_path: Path, suffix: str
) -> None:
    root, _, _ = hostile
    out = tmp_path / f"out{suffix}"
    proc = run("embed", str(root), "-o", str(out), *MODEL, check=None, env=ENV)
    assert proc.returncode == 1 and "file name is not valid UTF-8" in proc.stderr
    if suffix == ".parquet":
        paths = pq.read_table(out).column("path").to_pylist()
    else:
        lines = out.with_name("out.paths.txt").read_text().splitlines()
        assert np.load(out).shape[0] == len(lines)
        paths = [line.replace("\\n", "\n").replace("\\\\", "\\") for line in lines]  # (no name here holds a \\)
    assert sorted(paths) == sorted(str(root / name) for name in GOOD_NAMES)


def test_export_and_import_carry_the_hostile_names(
    hostile: tuple[Path, Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root, store, _ = hostile
    out = tmp_path / "export.parquet"
    run("export", "--output", str(out), "--store", str(store))
    run("import", str(out), "--store", str(tmp_path / "copy"))
    with open_store_from_settings(shapes_settings(tmp_path / "copy")) as opened:
        assert {p.path for p in opened.scroll()} == {str(root / name) for name in GOOD_NAMES}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


@pytest.mark.timeout(300)
def test_serve_answers_for_hostile_names_and_404_for_the_skipped_one(
    hostile: tuple[Path, Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root, store, _ = hostile
    port, mark = _free_port(), uuid.uuid4().hex
    proc = spawn(["serve", "--store", str(store), "--port", str(port), *MODEL], tmp_path / "serve.log", mark)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status(base + "/healthz") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        for name in GOOD_NAMES:
            assert _status(f"{base}/images/{point_id(root / name)}") == 200, name
        assert _status(f"{base}/images/{point_id(root / BAD)}") == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.timeout(300)
def test_watch_skips_a_non_utf8_name_and_keeps_indexing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = write_dataset(root, 2, seed=5, size=64)
    (root / BAD).write_bytes(good[0].read_bytes())  # there at start-up: the reconciliation meets it
    daemon = Daemon([root], tmp_path / "store", tmp_path / "watch.log", "-v")
    try:
        later = write_dataset(tmp_path / "later", 1, seed=6, size=64)[0]
        os.rename(later, root / os.fsdecode(b"late\xe9.png"))  # and an event for another one
        os.rename(good[1], root / "moved.png")  # a good change beside it is still applied
        daemon.wait_paths({str(good[0]), str(root / "moved.png")}, timeout=60)
        wait_for("the skip line", lambda: "late\\xe9.png: file name is not valid UTF-8" in daemon.text())
        assert "bad\\xff\\xfe.png: file name is not valid UTF-8" in daemon.text()
        assert daemon.health()["status"] == "ok"
    finally:
        daemon.kill()


# --- invalid settings and flags: one line, exit 2, the setting named ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["search", "red"], {"INDEXER_DECODE__MAX_FILE_MB": "inf"}, "decode.max_file_mb"),
        (["search", "red"], {"INDEXER_DECODE__MAX_FILE_MB": "nan"}, "decode.max_file_mb"),
        (["search", "red"], {"INDEXER_WATCH__PATHS": "notjson"}, "INDEXER_WATCH__PATHS"),
        (["search", "red"], {"INDEXER_SERVE__ROOTS": "[1,"}, "INDEXER_SERVE__ROOTS"),
        (["search", "red", "--limit", "0"], {}, "search.limit"),
        (["search", "red", "--limit", "-5"], {}, "search.limit"),
        (["search", "red", "--offset", "-5"], {}, "search.offset"),
        (["search", "red", "--threshold", "5"], {}, "search.threshold"),
        (["search", "red", "--threshold", "nan"], {}, "search.threshold"),
    ],
)
def test_invalid_setting_or_flag_is_one_line_exit_2_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    proc = run(*args, "--store", str(tmp_path / "store"), *MODEL, check=2, env=env)
    assert proc.stderr.startswith(f"indexer: error: invalid setting {named}: ") and proc.stderr.count("\n") == 1


def test_weights_that_are_not_a_checkpoint_are_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("hello\n")
    write_dataset(tmp_path / "img", 1, seed=1, size=64)
    args = ["embed", str(tmp_path / "img"), "-o", str(tmp_path / "o.npy"), *MODEL, "--weights"]
    proc = run(*args, str(tmp_path / "weights.txt"), check=2)
    assert "weights.txt: not a checkpoint it can load" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        # A model that does not exist: had it been loaded first, that would be the error.
        proc = run("serve", "--store", str(tmp_path / "s"), "--port", port, "--model", "/nonexistent.json", check=2)
    assert proc.stderr.startswith("indexer: error: invalid setting serve.port: cannot listen on 127.0.0.1:")
    assert "Address already in use" in proc.stderr


# --- the low-level rules behind the above (fast, in-process) ---------------------------------------------------------


@pytest.mark.parametrize("name", ["/a/b.png", "/x/été 日本.jpg", "/n/new\nline.png"])
def test_point_ids_of_utf8_names_are_unchanged(name: str) -> None:
    assert point_id(name) == str(uuid.uuid5(POINT_NAMESPACE, name)) == point_id(Path(name))


def test_a_name_that_is_not_utf8_has_an_id_and_an_escaped_form() -> None:
    name = "/p/" + BAD
    assert uuid.UUID(point_id(name)).version == 5 and point_id(name) != point_id("/p/bad.png")
    assert display_path(name) == "/p/bad\\xff\\xfe.png" and name_problem(name) and not name_problem("/p/x.png")


def test_scan_reports_special_files_and_bad_names_and_walks_on(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / BAD).write_bytes(b"x")
    (tmp_path / os.fsdecode(b"dir\xff")).mkdir()
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.png" / "in.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    failures: list[Failure] = []
    found = {e.path.name for e in scan([tmp_path], frozenset({".png", ".jpg"}), on_error=failures.append)}
    assert found == {"ok.png", "in.png"}
    assert {f.path.name: f.reason for f in failures} == {
        "bad\\xff\\xfe.png": NOT_UTF8,
        "dir\\xff": NOT_UTF8,
        "fifo.jpg": "not a regular file (a FIFO)",
        "zero.png": "not a regular file (a character device)",
    }


def test_npy_paths_lines_are_one_per_row_for_any_name() -> None:
    names = ["a\nb", "c\\nd", "e\rf", "plain"]
    text = "".join(paths_line(n) for n in names)
    assert text.count("\n") == len(names) and len(set(text.splitlines())) == len(names)
