"""The shared-memory transport of the decode pool: same pixels as the pickling one, order kept, failures and
crashes reported per file, slots reused once released, nothing left in /dev/shm after a run or a crash."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.decode import pool as decode_pool
from indexer.decode import shm as shm
from indexer.decode.pool import DecodePool
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs POSIX shared memory (/dev/shm)")

SPEC = PreprocessSpec(image_size=32)
LIMITS = DecodeLimits()
LOOKAHEAD = 32  # with 2 workers: chunks of 8 files per task


def _image(path: Path, seed: int, size: tuple[int, int] = (50, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _corpus(tmp_path: Path, n: int = 40) -> list[Path]:
    """Good PNG/JPEG files with every 5th file broken (empty, garbage or missing)."""
    paths = []
    for i in range(n):
        if i % 5 == 4:
            bad = tmp_path / f"bad{i}.jpg"
            if i % 3:
                bad.write_bytes(b"" if i % 2 else b"garbage")
            paths.append(bad)
        else:
            paths.append(_image(tmp_path / f"good{i}.{'png' if i % 2 else 'jpg'}", seed=i, size=(50 + i, 40)))
    return paths


def _leftovers(pid: int | None = None) -> list[str]:
    return sorted(p.name for p in shm.SHM_DIR.glob(shm.segment_prefix(pid) + "*"))


def _summary(results: list[Decoded | Failure]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for r in results:
        if isinstance(r, Decoded):
            out.append((str(r.meta.path), (r.meta, r.pixels.tobytes())))
        else:
            out.append((str(r.path), r.reason))
    return out


def test_shm_pixels_identical_to_pickling_and_in_order(tmp_path: Path) -> None:
    paths = _corpus(tmp_path)
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD, transport="pickle") as old:
        expected = _summary(list(old.imap(paths)))
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD) as pool:
        assert pool.transport == "shm" and pool.chunk > 1
        results = list(pool.imap(paths))
        got = _summary(results)
    assert [p for p, _ in got] == [str(p) for p in paths]
    assert got == expected
    assert sum(isinstance(r, Failure) for r in results) == len(paths) // 5
    decoded = [r for r in results if isinstance(r, Decoded)]
    assert decoded[0].pixels.shape == (3, 32, 32) and not decoded[0].pixels.flags.writeable
    assert _leftovers() == []  # closed: unlinked, while the views above stay readable
    assert int(decoded[-1].pixels.sum()) > 0


def test_a_small_dev_shm_means_pickling_not_crashing_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert shm.free_bytes() > 0
    paths = _corpus(tmp_path, 10)
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD, transport="pickle") as old:
        expected = _summary(list(old.imap(paths)))
    need = 2 * LOOKAHEAD * 3 * 32 * 32
    monkeypatch.setattr(shm, "free_bytes", lambda: need - 1)  # a container's tmpfs, nearly full
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD) as pool:
        assert pool.transport == "pickle"
        assert _summary(list(pool.imap(paths))) == expected
    assert "/dev/shm has 0 MB free" in caplog.text and "--shm-size" in caplog.text
    monkeypatch.setattr(shm, "free_bytes", lambda: need)
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD) as pool:
        assert pool.transport == "shm"


def test_shm_slots_are_reused_once_released(tmp_path: Path) -> None:
    paths = [_image(tmp_path / f"{i}.png", seed=i) for i in range(8)] * 20
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=8) as pool:
        assert pool.chunk == 2
        for result in pool.imap(paths):  # nothing held: slots come back
            assert isinstance(result, Decoded)
        ring = pool._ring
        assert ring is not None and len(ring) <= 8 // pool.chunk + 1
        held = list(pool.imap(paths[:40]))  # all held: the ring grows, pixels stay intact
        assert len(ring) >= 40 // pool.chunk
        again = list(pool.imap(paths[:40]))
        assert [a.pixels.tobytes() for a in held] == [b.pixels.tobytes() for b in again]  # type: ignore[union-attr]
        del held, again
        gc.collect()
        before = len(ring)
        list(pool.imap(paths[:40]))
        assert len(ring) == before  # released slots were reused, none created
        assert len(_leftovers()) == before
    assert _leftovers() == []


def test_shm_crashing_worker_costs_only_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _corpus(tmp_path, n=30)
    crash = _image(tmp_path / "crash.png", seed=99)
    paths.insert(11, crash)
    monkeypatch.setenv(decode_pool.CRASH_ENV, crash.name)
    with DecodePool(SPEC, LIMITS, workers=0, lookahead=1) as inline:
        expected = _summary(list(inline.imap(p for p in paths if p != crash)))
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=LOOKAHEAD) as pool:
        assert pool.chunk > 1
        results = list(pool.imap(paths))
        failure = results.pop(11)
        assert isinstance(failure, Failure) and failure.path == crash
        assert failure.reason.startswith("decoder crashed")
        assert _summary(results) == expected
        again = list(pool.imap([paths[0], crash, paths[1]]))  # the rebuilt pool keeps working
        assert [type(r) for r in again] == [Decoded, Failure, Decoded]
    assert _leftovers() == []


def test_shm_abandoned_run_releases_slots(tmp_path: Path) -> None:
    paths = [_image(tmp_path / f"{i}.png", seed=i, size=(300, 300)) for i in range(4)] * 30
    with DecodePool(SPEC, LIMITS, workers=2, lookahead=32) as pool:
        run = pool.imap(paths)
        first = next(run)
        run.close()  # cancels the rest; running chunks' slots are dropped, not reused
        assert isinstance(first, Decoded)
        again = list(pool.imap(paths[:8]))
        assert all(isinstance(r, Decoded) for r in again)
    assert _leftovers() == []


_KILLED_MAIN = """
import os, sys, time
from pathlib import Path
from indexer.decode.pool import DecodePool
from indexer.records import DecodeLimits, PreprocessSpec

if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]]
    pool = DecodePool(PreprocessSpec(image_size=32), DecodeLimits(), workers=2, lookahead=16)
    held = list(pool.imap(paths))
    print("ready", flush=True)
    time.sleep(60)
"""


def test_no_segment_left_when_the_main_process_is_killed(tmp_path: Path) -> None:
    paths = [str(_image(tmp_path / f"{i}.png", seed=i)) for i in range(16)]
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(_KILLED_MAIN))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), *paths], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert _leftovers(proc.pid), "the victim should hold segments"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10  # the resource tracker notices its parent died, then unlinks
        while _leftovers(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _leftovers(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
