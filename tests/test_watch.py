"""The watch stage on real filesystem events (inotify and polling) in temp dirs: filters, completeness, coalescing,
moves, the inotify-limit fallback (a real ENOSPC, in a user namespace with a lowered limit) and overflow."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.decode.image import SUPPORTED_EXTENSIONS
from indexer.sources.events import (
    ChangeKind,
    Coalescer,
    EventKind,
    FileChange,
    FsEvent,
    ImageFiles,
    NotPartial,
    VisibleUnder,
    default_filter,
)
from indexer.sources.watch import Watcher
from tests.fixtures.shapes import draw_shape

STABLE = 0.3


def png_bytes(seed: int = 0) -> bytes:
    """A small real PNG image, as bytes."""
    import io

    buf = io.BytesIO()
    draw_shape("red", "circle", np.random.default_rng(seed), 48).save(buf, "PNG")
    return buf.getvalue()


class Harness:
    """A Watcher feeding a Coalescer on one root, and a way to wait for what it hands out."""

    def __init__(self, root: Path, *, poll: bool = False, stable: float = STABLE, unclosed: float = 60.0) -> None:
        self.root = root
        self.coalescer = Coalescer(stable_seconds=stable, unclosed_timeout=unclosed, capacity=1000)
        self.overflows = 0
        self.watcher = Watcher(
            self.coalescer.feed,
            lambda r: default_filter(r, SUPPORTED_EXTENSIONS),
            poll=poll,
            poll_interval=0.1,
            on_overflow=self._overflow,
        )
        self.mode = self.watcher.start(root)

    def _overflow(self) -> None:
        self.overflows += 1

    def changes(self, wait: float = 0.0) -> list[FileChange]:
        """Everything complete now (after ``wait`` seconds of refreshing)."""
        deadline = time.monotonic() + wait
        while True:
            self.coalescer.refresh(time.monotonic())
            if time.monotonic() >= deadline:
                return self.coalescer.take(10_000)
            time.sleep(0.02)

    def until(self, predicate: Callable[[list[FileChange]], bool], timeout: float = 5.0) -> list[FileChange]:
        """Collect changes until ``predicate`` holds for all collected so far (then a short settle)."""
        got: list[FileChange] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += self.changes()
            if predicate(got):
                return got + self.changes(0.15)
            time.sleep(0.02)
        raise AssertionError(f"timed out; got {got}")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    root = tmp_path / "root"
    root.mkdir()
    h = Harness(root)
    yield h
    h.watcher.close()


def kinds(changes: list[FileChange]) -> list[tuple[ChangeKind, str, str | None]]:
    return [(c.kind, c.path.name, c.src.name if c.src else None) for c in changes]


# --- filters -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("photo.jpg", True),
        ("photo.JPEG", True),
        ("photo.jpg.part", False),
        ("photo.jpg.tmp", False),
        ("photo.jpg.crdownload", False),
        ("photo.jpg~", False),
        ("~photo.jpg", False),
        (".photo.jpg", False),
        ("notes.txt", False),
    ],
)
def test_default_filter_keeps_only_complete_visible_images(tmp_path: Path, name: str, kept: bool) -> None:
    assert default_filter(tmp_path, SUPPORTED_EXTENSIONS)(tmp_path / "album" / name) is kept


def test_filters_are_small_callables(tmp_path: Path) -> None:
    assert NotPartial()(Path("a.png")) and not NotPartial()(Path("a.png.part"))
    assert ImageFiles(frozenset({".png"}))(Path("A.PNG"))
    assert not VisibleUnder(tmp_path)(tmp_path / ".cache" / "a.png")
    assert VisibleUnder(tmp_path, include_hidden=True)(tmp_path / ".cache" / "a.png")
    assert VisibleUnder(tmp_path / ".photos")(tmp_path / ".photos" / "a.png")  # a dot folder above the root is fine


# --- completeness on real inotify events ---------------------------------------------------------------------------


def test_created_file_is_taken_on_close_not_after_stability(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    h = Harness(root, stable=30.0)  # stability alone would take 30 s: the close event must be what completes it
    try:
        (root / "a.png").write_bytes(png_bytes())
        got = h.until(lambda c: len(c) >= 1, timeout=3.0)
        assert kinds(got) == [(ChangeKind.UPSERT, "a.png", None)]
    finally:
        h.watcher.close()


def test_slow_chunked_write_is_taken_once_complete(harness: Harness) -> None:
    data = png_bytes(1)
    path = harness.root / "slow.png"
    with open(path, "wb") as fh:
        for start in range(0, len(data), len(data) // 4 + 1):
            fh.write(data[start : start + len(data) // 4 + 1])
            fh.flush()
            assert harness.changes(wait=STABLE * 2) == []  # paused longer than stable_seconds: still not taken
    got = harness.until(lambda c: len(c) >= 1)
    assert kinds(got) == [(ChangeKind.UPSERT, "slow.png", None)]
    assert path.read_bytes() == data


def test_file_written_but_never_closed_is_taken_after_the_unclosed_timeout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    h = Harness(root, unclosed=1.0)
    try:
        with open(root / "held-open.png", "wb") as fh:
            fh.write(png_bytes())
            fh.flush()
            assert h.changes(wait=0.6) == []  # stable for longer than stable_seconds, but written and not closed
            got = h.until(lambda c: len(c) >= 1, timeout=3.0)
            assert kinds(got) == [(ChangeKind.UPSERT, "held-open.png", None)]
    finally:
        h.watcher.close()


def test_write_to_temp_then_rename_is_one_new_file(harness: Harness) -> None:
    for temp in (".photo.png.XyZ12", "photo.png.tmp", "photo.png.part"):
        (harness.root / temp).write_bytes(png_bytes(2))
        os.rename(harness.root / temp, harness.root / "photo.png")
        got = harness.until(lambda c: len(c) >= 1)
        assert kinds(got) == [(ChangeKind.UPSERT, "photo.png", None)], temp


def test_move_within_is_a_move(harness: Harness) -> None:
    (harness.root / "album").mkdir()
    (harness.root / "a.png").write_bytes(png_bytes())
    harness.until(lambda c: len(c) >= 1)
    os.rename(harness.root / "a.png", harness.root / "album" / "b.png")
    got = harness.until(lambda c: len(c) >= 1)
    assert kinds(got) == [(ChangeKind.MOVE, "b.png", "a.png")]


def test_move_out_is_a_deletion_and_move_in_a_complete_new_file(tmp_path: Path, harness: Harness) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (harness.root / "a.png").write_bytes(png_bytes())
    harness.until(lambda c: len(c) >= 1)
    shutil.move(harness.root / "a.png", outside / "a.png")
    assert kinds(harness.until(lambda c: len(c) >= 1)) == [(ChangeKind.DELETE, "a.png", None)]
    (outside / "b.png").write_bytes(png_bytes(3))
    started = time.monotonic()
    shutil.move(outside / "b.png", harness.root / "b.png")
    assert kinds(harness.until(lambda c: len(c) >= 1)) == [(ChangeKind.UPSERT, "b.png", None)]
    assert time.monotonic() - started < 2.0


def test_folder_moved_in_and_out(tmp_path: Path, harness: Harness) -> None:
    album = tmp_path / "album"
    album.mkdir()
    for i in range(3):
        (album / f"{i}.png").write_bytes(png_bytes(i))
    shutil.move(album, harness.root / "album")
    got = harness.until(lambda c: len(c) >= 3)
    assert sorted(kinds(got)) == [(ChangeKind.UPSERT, f"{i}.png", None) for i in range(3)]
    shutil.move(harness.root / "album", tmp_path / "gone")
    got = harness.until(lambda c: any(x.kind is ChangeKind.DELETE_TREE for x in c))
    assert kinds(got) == [(ChangeKind.DELETE_TREE, "album", None)]


def test_deleted_file_and_ignored_names(harness: Harness) -> None:
    (harness.root / "a.png").write_bytes(png_bytes())
    harness.until(lambda c: len(c) >= 1)
    (harness.root / "a.png").unlink()
    (harness.root / ".hidden.png").write_bytes(png_bytes())
    (harness.root / "notes.txt").write_text("x")
    got = harness.until(lambda c: len(c) >= 1)
    assert kinds(got) == [(ChangeKind.DELETE, "a.png", None)]
    assert harness.coalescer.pending() == 0


def test_events_coalesce_per_path(harness: Harness) -> None:
    path = harness.root / "a.png"
    for seed in range(5):  # five complete writes before the batch is taken (the daemon waits max_wait)
        path.write_bytes(png_bytes(seed))
    time.sleep(0.3)
    got = harness.until(lambda c: len(c) >= 1)
    assert kinds(got) == [(ChangeKind.UPSERT, "a.png", None)]
    assert harness.coalescer.seen == 1


def test_polling_takes_a_file_once_stable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    h = Harness(root, poll=True)
    try:
        assert h.mode == "polling"
        (root / "a.png").write_bytes(png_bytes())
        got = h.until(lambda c: len(c) >= 1, timeout=5.0)
        assert kinds(got) == [(ChangeKind.UPSERT, "a.png", None)]
        os.rename(root / "a.png", root / "b.png")
        assert kinds(h.until(lambda c: len(c) >= 1)) == [(ChangeKind.MOVE, "b.png", "a.png")]
    finally:
        h.watcher.close()


# --- the watcher's limits ------------------------------------------------------------------------------------------

LIMITED = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING)
    from indexer.sources.watch import Watcher
    w = Watcher(lambda e: None, lambda r: (lambda p: True))
    print(w.start(Path(sys.argv[1])))
    w.close()
    """
)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces (unshare -Ur)")
@pytest.mark.parametrize("limit", [0, 2])
def test_inotify_watch_limit_falls_back_to_polling(tmp_path: Path, limit: int) -> None:
    root = tmp_path / "root"
    for sub in ("a/b/c", "d", "e"):
        (root / sub).mkdir(parents=True)
    # A real ENOSPC: a user namespace whose inotify watch limit is lowered (limit 0: the root itself cannot be
    # watched; limit 2: watchdog silently skips sub-folders, which the watch count must reveal).
    script = f"echo {limit} > /proc/sys/user/max_inotify_watches && exec {sys.executable} -c '{LIMITED}' {root}"
    proc = subprocess.run(["unshare", "-Ur", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "polling"
    assert "inotify limit reached" in proc.stderr and "fs.inotify.max_user_watches" in proc.stderr


def test_kernel_queue_overflow_triggers_the_callback(harness: Harness) -> None:
    # Watchdog only logs an overflow; the watcher listens to that log (a real overflow needs a flood of events).
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert harness.overflows == 1


def test_coalescer_is_bounded_and_reports_overflow(tmp_path: Path) -> None:
    coalescer = Coalescer(stable_seconds=0.1, unclosed_timeout=1.0, capacity=3)
    for i in range(10):
        coalescer.feed(FsEvent(EventKind.CLOSED, tmp_path / f"{i}.png"))
    assert coalescer.pending() == 3
    assert coalescer.take_overflow() and not coalescer.take_overflow()
