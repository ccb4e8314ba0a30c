"""The decode pool's memory budget (indexer.decode.budget), through real worker processes and real images.

Budgets of a few MiB make 2-8 MP images "big". The workers' test journal (``JOURNAL_ENV``) records each decode's
cost, share and the times it held it (taken after the share is taken, before it is given back, on the system-wide
monotonic clock), so what was held at once is checked from outside the budget's own accounting; nothing here
depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.decode import budget as decode_budget
from indexer.decode import worker as decode_worker
from indexer.decode.image import decode_file
from indexer.decode.limits import decode_limits
from indexer.decode.pool import DecodePool
from indexer.errors import ConfigError
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec
from indexer.settings import load_settings

SPEC = PreprocessSpec(image_size=64)
MIB = 1 << 20
HANG = 240  # seconds: a leaked share would make the next big decode wait forever; this fails it instead


@dataclass(frozen=True)
class Hold:
    pid: int
    cost: int
    held: int
    start: int
    end: int


def _png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """An RGB PNG that encodes fast (smooth), different per seed."""
    x = np.arange(width, dtype=np.uint32)[None, :]
    y = np.arange(height, dtype=np.uint32)[:, None]
    plane = ((x * (seed + 1) + y * 3 + seed * 17) % 256).astype(np.uint8)
    Image.fromarray(np.dstack([plane, plane[::-1], plane[:, ::-1]])).save(path, compress_level=1)
    return path


def _journal(path: Path) -> list[Hold]:
    return [Hold(*map(int, line.split())) for line in path.read_text().splitlines()]


def _most_held_at_once(holds: list[Hold]) -> int:
    """The largest sum of shares whose recorded intervals overlap (checked at every interval's start)."""
    held = [h for h in holds if h.held]
    return max((sum(o.held for o in held if o.start <= h.start < o.end) for h in held), default=0)


def _limits(capacity: int) -> DecodeLimits:
    return DecodeLimits(memory_budget=capacity)


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "journal.txt"
    monkeypatch.setenv(decode_budget.JOURNAL_ENV, str(path))
    return path


def test_big_decodes_held_at_once_never_exceed_the_budget(tmp_path: Path, journal: Path) -> None:
    capacity = 20 * MIB  # two 2 MP images fit (8 MB each and their files), a 4 MP one only with a small one
    sizes = [(1600, 1250)] * 6 + [(2000, 2000)] * 3 + [(3200, 2500)] + [(64, 48)] * 6
    shuffled = [sizes[int(k)] for k in np.random.default_rng(1).permutation(len(sizes))]
    paths = [_png(tmp_path / f"{i:02d}.png", w, h, seed=i) for i, (w, h) in enumerate(shuffled)]
    with DecodePool(SPEC, _limits(capacity), workers=3, lookahead=12) as pool:
        results = list(pool.imap(paths))
        stats = pool.budget_stats()
    for path, result in zip(paths, results, strict=True):
        assert isinstance(result, Decoded), result
        expected = decode_file(path, SPEC, DecodeLimits())
        assert isinstance(expected, Decoded)
        assert result.meta.path == path and np.array_equal(result.pixels, expected.pixels)
    holds = _journal(journal)
    assert len(holds) == len(paths)  # every decode passed through the budget's gate once
    big = [h for h in holds if h.cost >= 4 * MIB]
    assert len(big) == 10 and all(h.held == min(h.cost, capacity) for h in big)
    assert all(h.held == 0 for h in holds if h.cost < MIB)
    assert len({h.pid for h in holds}) > 1  # the workers shared the work (and the budget)
    assert _most_held_at_once(holds) <= capacity
    assert stats is not None and (stats.takes, stats.free, stats.capacity) == (10, capacity, capacity)


def test_an_image_bigger_than_the_budget_decodes_alone(tmp_path: Path, journal: Path) -> None:
    capacity = 4 * MIB  # every 2 MP image costs twice that
    paths = [_png(tmp_path / f"{i}.png", 1600, 1250, seed=i) for i in range(5)]
    with DecodePool(SPEC, _limits(capacity), workers=2, lookahead=4) as pool:
        results = list(pool.imap(paths))
    assert [r.meta.path for r in results if isinstance(r, Decoded)] == paths
    holds = sorted(_journal(journal), key=lambda h: h.start)
    assert [h.held for h in holds] == [capacity] * len(paths)  # all of it, no more
    assert all(a.end <= b.start for a, b in itertools.pairwise(holds))  # one at a time


def test_small_images_never_touch_the_budget(tmp_path: Path, journal: Path) -> None:
    paths = [_png(tmp_path / f"{i}.png", 200, 150, seed=i) for i in range(12)]
    with DecodePool(SPEC, _limits(16 * MIB), workers=2, lookahead=6) as pool:
        assert all(isinstance(r, Decoded) for r in pool.imap(paths))
        stats = pool.budget_stats()
    assert stats is not None and stats.takes == 0 and stats.free == 16 * MIB
    holds = _journal(journal)
    assert len(holds) == len(paths) and all(h.held == 0 and 0 < h.cost < MIB for h in holds)


@pytest.mark.timeout(HANG)
@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_worker_that_dies_holding_its_share_does_not_leak_it(
    tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    capacity = 4 * MIB  # every image below takes all of it: a share lost for good would stop every later one
    paths = [_png(tmp_path / f"{i}.png", 1600, 1250, seed=i) for i in range(4)]
    crash = _png(tmp_path / "crash.png", 1600, 1250, seed=9)
    paths.insert(1, crash)
    monkeypatch.setenv(decode_worker.CRASH_ENV, crash.name)
    with DecodePool(SPEC, _limits(capacity), workers=2, lookahead=4, transport=transport) as pool:
        results = list(pool.imap(paths))
        again = list(pool.imap([paths[0], crash, paths[2]]))  # and the rebuilt pool keeps working
        stats = pool.budget_stats()
    for path, result in zip([*paths, paths[0], crash, paths[2]], results + again, strict=True):
        if path == crash:
            assert isinstance(result, Failure) and result.reason.startswith("decoder crashed")
        else:
            assert isinstance(result, Decoded) and result.meta.path == path
    holds = _journal(journal)
    # 6 decodes or more (after a crash the files in flight are decoded again, one at a time); never the crashes
    assert len(holds) >= 6 and all(h.held == capacity for h in holds)
    assert stats is not None and stats.free == capacity


def test_in_process_decoding_has_no_budget(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", 1600, 1250)
    with DecodePool(SPEC, _limits(MIB), workers=0, lookahead=1) as pool:
        assert isinstance(next(pool.imap([path])), Decoded)
        assert pool.budget_stats() is None


def test_a_jpeg_costs_what_its_draft_decodes(tmp_path: Path, journal: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.open(_png(tmp_path / "photo.png", 3200, 2400)).save(path, quality=90)
    file_bytes = path.stat().st_size
    for full in (False, True):
        limits = replace(_limits(64 * MIB), full_resolution=full)
        with DecodePool(SPEC, limits, workers=1, lookahead=1) as pool:
            assert isinstance(next(pool.imap([path])), Decoded)
    drafted, full_size = (h.cost - file_bytes for h in _journal(journal))
    assert drafted == 400 * 300 * 4  # DCT scale 8: 64 px still fit in the short side
    assert full_size == 3200 * 2400 * 4


def _noise_png(path: Path, width: int, height: int) -> Path:
    """A PNG that does not compress: its size on disk is about its pixels' (3 bytes each)."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)
    return path


@pytest.mark.parametrize(("width", "read_before"), [(200, True), (600, False)])
def test_a_big_file_is_read_only_once_its_share_is_held(tmp_path: Path, width: int, read_before: bool) -> None:
    """A worker waiting for its share must not hold the file's bytes (a 300 MB scan) meanwhile: over 256 KiB, the
    header comes from the file's first bytes and the file is read once the share is held. The reserve below swaps
    the file for another image as it is entered: what decodes shows which was read."""
    path = _noise_png(tmp_path / "scan.png", width, width)
    swap = _noise_png(tmp_path / "swap.png", width + 10, width)
    costs: list[int] = []

    @contextlib.contextmanager
    def reserve(cost: int) -> Iterator[None]:
        costs.append(cost)
        os.replace(swap, path)
        yield

    assert (path.stat().st_size > 256 << 10) is not read_before
    original_size = path.stat().st_size
    result = decode_file(path, SPEC, DecodeLimits(), reserve)
    assert isinstance(result, Decoded), result
    assert result.meta.width == (width if read_before else width + 10)
    assert costs == [width * width * 4 + original_size]  # the header and size it had when the cost was taken


@pytest.mark.parametrize(
    ("mode", "fmt", "alpha", "per_pixel"),
    [("RGB", "PNG", False, 4), ("L", "PNG", False, 5), ("P", "PNG", True, 16), ("RGBA", "PNG", True, 16),
     ("I;16", "PNG", False, 36), ("CMYK", "JPEG", False, 8), ("RGB", "WEBP", False, 16)],
)  # fmt: skip
def test_decode_cost_per_mode(mode: str, fmt: str, alpha: bool, per_pixel: int) -> None:
    assert decode_budget.decode_cost(1000, 500, mode, fmt, alpha, 123) == 1000 * 500 * per_pixel + 123


def test_memory_mb_setting_sizes_the_budget() -> None:
    assert decode_limits(load_settings(overrides={"decode": {"memory_mb": 300}})).memory_budget == 300 * MIB
    auto = decode_limits(load_settings(overrides={"decode": {"memory_mb": 0}})).memory_budget
    assert auto == decode_budget.auto_memory_budget() > 0
    with pytest.raises(ConfigError, match=r"decode\.memory_mb"):
        load_settings(overrides={"decode": {"memory_mb": -1}})
