"""The fault suite, store side (issue 10, defects 2, 4 and 11): a full disk, a read-only store, a damaged shard.

Each case runs the real ``indexer`` command on a real store on a real filesystem: a small tmpfs (a full disk) or a
read-only bind mount, which need root; without root they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.shapes import write_dataset
from tests.support.clirun import INDEXER, MODEL, run, run_json

pytestmark = pytest.mark.faults

MB = 1024 * 1024


def _mount(target: Path, *args: str) -> None:
    """mount ARGS TARGET, or skip the test saying why it cannot."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs or a read-only bind mount")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip()})")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 MB tmpfs (Edge's WAL maps 32 MB segments, sparse on tmpfs); unmounted at teardown."""
    disk = tmp_path / "disk"
    _mount(disk, "-t", "tmpfs", "-o", "size=160m", "tmpfs")
    try:
        yield disk
    finally:
        _umount(disk)


def _fill(disk: Path, leave_mb: float) -> Path:
    """Allocate a filler file leaving about leave_mb free on disk."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(free - int(leave_mb * MB), 0))
    finally:
        os.close(fd)
    return filler


def _no_crash(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode >= 0 and proc.returncode != 135, f"killed by a signal: {proc.returncode}"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_full_disk_is_one_clear_error_and_the_store_survives(tmp_path: Path, small_disk: Path) -> None:
    photos, store = tmp_path / "photos", small_disk / "store"
    write_dataset(photos / "a", 16, seed=1, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    assert run_json("status", "--store", str(store))["images"] == 16

    filler = _fill(small_disk, leave_mb=24)  # below the default margin (store.min_free_mb = 64)
    write_dataset(photos / "b", 8, seed=2, size=64)
    # index needs the margin; status needs no margin but, on tmpfs, the pages its open fills (the 32 MB chunk)
    for args, why in ((("index", str(photos), *MODEL, "--workers", "1"), "store.min_free_mb"), (("status",), "fills")):
        proc = run(*args, "--store", str(store), check=2)
        _no_crash(proc)
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("indexer: error: ") and "No space left on device" in lines[-1], proc.stderr
        assert why in lines[-1], lines[-1]

    filler.unlink()  # space again: nothing stored was lost, and the store takes writes
    assert run_json("status", "--store", str(store))["images"] == 16
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    assert run_json("status", "--store", str(store))["images"] == 24


def test_the_free_space_margin_is_a_setting(tmp_path: Path, small_disk: Path) -> None:
    photos, store = tmp_path / "photos", small_disk / "store"
    write_dataset(photos, 4, seed=3, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    _fill(small_disk, leave_mb=80)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")  # 80 MB free: above the default 64
    margin = {"INDEXER_STORE__MIN_FREE_MB": "100"}
    proc = run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1", env=margin, check=2)
    assert "No space left on device" in proc.stderr and "at least 100 MB" in proc.stderr
    assert run_json("status", "--store", str(store))["images"] == 4  # a read needs no margin


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 MB ext4 filesystem in a file (loop mount): a disk, where reading a hole of a mapped file allocates
    nothing (unlike tmpfs); unmounted at teardown."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        pytest.skip("no mkfs.ext4")
    image, disk = tmp_path / "ext4.img", tmp_path / "ext4"
    with image.open("wb") as out:
        out.truncate(200 * MB)
    proc = subprocess.run([mkfs, "-q", "-F", "-t", "ext4", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make an ext4 filesystem here ({proc.stderr.strip()})")
    _mount(disk, "-o", "loop", str(image))
    try:
        yield disk
    finally:
        _umount(disk)


def test_a_full_disk_still_lets_the_library_be_read(tmp_path: Path, ext4_disk: Path) -> None:
    """With not a byte free on the store's disk, the commands that only read answer (they need no margin, and on a
    disk filesystem Edge's open allocates nothing); index is refused with the margin; nothing is lost."""
    photos, store = tmp_path / "photos", ext4_disk / "store"
    write_dataset(photos, 12, seed=4, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    filler = _fill(ext4_disk, leave_mb=0)
    assert os.statvfs(ext4_disk).f_bavail * os.statvfs(ext4_disk).f_frsize < MB

    assert run_json("status", "--store", str(store))["images"] == 12
    hits = run_json("search", "a red circle", "--store", str(store), *MODEL, "--limit", "3")
    assert len(hits) == 3 and all(h["path"].startswith(str(photos)) for h in hits)
    out = tmp_path / "library.parquet"
    assert run_json("export", "--output", str(out), "--store", str(store))["exported"] == 12
    proc = run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1", check=2)
    _no_crash(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert "cannot open: No space left on device" in line and "store.min_free_mb" in line, line

    filler.unlink()
    assert run_json("status", "--store", str(store))["images"] == 12


@pytest.fixture
def disk_100mb(tmp_path: Path) -> Iterator[Path]:
    """A 100 MB tmpfs, the size of the issue's reproduction; unmounted at teardown."""
    disk = tmp_path / "disk100"
    _mount(disk, "-t", "tmpfs", "-o", "size=100m", "tmpfs")
    try:
        yield disk
    finally:
        _umount(disk)


@pytest.mark.timeout(300)
def test_opening_a_store_is_refused_when_edge_cannot_fill_its_files(tmp_path: Path, disk_100mb: Path) -> None:
    """Edge fills its sparse mapped files on open (a fresh shard's 32 MB vector chunk): with more free space than
    the margin but less than that, the open is refused with the figures, never a SIGBUS."""
    photos, store = tmp_path / "photos", disk_100mb / "store"
    write_dataset(photos, 16, seed=5, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    margin = {"INDEXER_STORE__MIN_FREE_MB": "8"}
    filler = _fill(disk_100mb, leave_mb=24)  # above the 8 MB margin, below what the open fills
    for args in (("status",), ("index", str(photos), *MODEL, "--workers", "1")):
        proc = run(*args, "--store", str(store), env=margin, check=None)
        _no_crash(proc)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("indexer: error: ") and "cannot open: No space left on device" in line, line
        free, needed = (float(m) for m in re.findall(r"\(([\d.]+) MB free, ([\d.]+) MB needed", line)[0])
        assert 20 < free < 28 and needed > 32, line  # the fresh shard's vector chunk, not the 8 MB margin
        assert "open fills about" in line, line
        assert ("store.min_free_mb" in line) == (args[0] == "index"), line  # a read keeps no margin
    filler.unlink()
    assert run_json("status", "--store", str(store))["images"] == 16  # nothing was lost


def _until(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_the_watch_daemon_waits_out_a_full_disk(tmp_path: Path, small_disk: Path) -> None:
    photos, store, log = tmp_path / "photos", small_disk / "store", tmp_path / "watch.log"
    write_dataset(photos / "a", 4, seed=8, size=64)
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [INDEXER, "watch", str(photos), "--store", str(store), *MODEL, "--workers", "1", "--poll"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def images() -> int:
            proc = run("status", "--store", str(store), "--json", check=None)
            return int(json.loads(proc.stdout)["images"]) if proc.returncode == 0 else -1

        _until("the first 4 images", lambda: images() == 4)
        filler = _fill(small_disk, leave_mb=24)
        write_dataset(photos / "b", 2, seed=9, size=64)
        _until("the refused write", lambda: "No space left on device" in log.read_text())
        time.sleep(2)
        assert daemon.poll() is None, log.read_text()  # still running
        assert images() == 4
        filler.unlink()
        _until("the files missed while the disk was full", lambda: images() == 6)
        assert daemon.poll() is None and "Traceback" not in log.read_text(), log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


@pytest.fixture
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    """A store of 6 images, seen through a read-only bind mount."""
    photos, store = tmp_path / "photos", tmp_path / "store"
    write_dataset(photos, 6, seed=4, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    view = tmp_path / "ro"
    _mount(view, "--bind", str(store))
    try:
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only ({proc.stderr.strip()})")
        yield view
    finally:
        _umount(view)


@pytest.mark.parametrize(
    "command",
    [
        ("status", "--json"),
        ("search", "a red circle", *MODEL, "--json"),
        ("export", "--output", "{tmp}/out.parquet"),
        ("dedup", "--json"),
    ],
    ids=["status", "search", "export", "dedup"],
)
def test_read_only_commands_work_on_a_read_only_store(
    tmp_path: Path, read_only_store: Path, command: tuple[str, ...]
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    proc = run(*args, "--store", str(read_only_store))
    _no_crash(proc)
    assert f"the store at {read_only_store} is read-only: reading a temporary copy" in proc.stderr
    if command[0] == "status":
        assert json.loads(proc.stdout)["images"] == 6 and json.loads(proc.stdout)["store"] == str(read_only_store)
    if command[0] == "search":
        assert len(json.loads(proc.stdout)) == 6
    if command[0] == "export":
        assert (tmp_path / "out.parquet").exists()
    temp = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))  # the commands' temp folder (tests/conftest.py)
    assert not list(temp.glob("indexer-readonly-*"))  # the copy is gone


def test_a_write_to_a_read_only_store_is_one_clear_line(tmp_path: Path, read_only_store: Path) -> None:
    proc = run("index", str(tmp_path / "photos"), *MODEL, "--workers", "1", "--store", str(read_only_store), check=2)
    _no_crash(proc)
    assert proc.stderr.strip().splitlines() == [
        f"indexer: error: the store at {read_only_store} is not writable (Read-only file system): commands that "
        "only read it work from a temporary copy, this one writes; make it writable, or copy it "
        f"(cp -a --sparse=always {read_only_store} COPY) and pass --store COPY"
    ]


def test_a_copy_of_a_read_only_store_made_as_the_error_says_works(tmp_path: Path, read_only_store: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", "--sparse=always", str(read_only_store), str(copy)], check=True)
    assert run_json("status", "--store", str(copy))["images"] == 6


def _truncate_id_tracker(store: Path, keep: float) -> None:
    (mappings,) = store.glob("shard/segments/*/mutable_id_tracker.mappings")
    size = mappings.stat().st_size
    os.truncate(mappings, int(size * keep))


def test_a_damaged_segment_is_reported_loudly_until_repaired(tmp_path: Path) -> None:
    photos, store = tmp_path / "photos", tmp_path / "store"
    write_dataset(photos, 40, seed=6, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    assert json.loads((store / "points.json").read_text())["points"] == 40

    _truncate_id_tracker(store, keep=0.3)
    status = run("status", "--store", str(store), "--json")
    info = json.loads(status.stdout)
    assert info["images"] < 40
    for text in (info["warning"], status.stderr):
        assert f"holds {info['images']} images but held 40 at its last flush" in text
        assert "re-index" in text and "restore from an export" in text
    text_status = run("status", "--store", str(store))
    assert "WARNING:" in text_status.stdout
    search = run("search", "a red circle", "--store", str(store), *MODEL)
    assert "held 40 at its last flush" in search.stderr
    # the warning stays until repaired (closing the damaged store does not lower the record)
    assert json.loads((store / "points.json").read_text())["points"] == 40

    repair = run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    assert "held 40 at its last flush" in repair.stderr  # index warns too, then re-adds the lost images
    after = run("status", "--store", str(store), "--json")
    assert json.loads(after.stdout)["images"] == 40 and "warning" not in json.loads(after.stdout)
    assert "WARNING" not in after.stderr


def test_deleting_images_lowers_the_record_so_no_false_alarm(tmp_path: Path) -> None:
    photos, store = tmp_path / "photos", tmp_path / "store"
    files = write_dataset(photos, 10, seed=7, size=64)
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    for path in files[:4]:
        path.unlink()
    run("index", str(photos), "--store", str(store), *MODEL, "--workers", "1")
    status = run("status", "--store", str(store), "--json")
    assert json.loads(status.stdout)["images"] == 6 and "WARNING" not in status.stderr
    assert json.loads((store / "points.json").read_text())["points"] == 6


def test_the_filesystem_type_comes_from_the_mount_table(tmp_path: Path) -> None:
    """What decides whether opening a store takes space: tmpfs (pages allocated on read) or a disk."""
    from indexer.store.directory import _unescape, filesystem_type, open_need_bytes

    assert filesystem_type(Path("/proc/self")) == "proc"
    if Path("/dev/shm").is_dir():
        assert filesystem_type(Path("/dev/shm/not-there/store")) == "tmpfs"  # the nearest existing parent's
    assert _unescape(r"/mnt/my\040photos") == "/mnt/my photos"
    assert open_need_bytes(tmp_path / "no-shard") == 0
