"""WebDataset / img2dataset tar shards as inputs, in the single-process path: reading, bad members, the embed
output, and incremental indexing (an unchanged shard is not read again), with the real learned model and store."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from indexer.ingest.pipeline import run_embed, run_index
from indexer.model.lazy import LazyModel
from indexer.records import Decoded, DecodeLimits, Failure, PreprocessSpec, point_id
from indexer.search import Query, search
from indexer.settings import Settings
from indexer.sources import shards as shards_mod
from indexer.sources.shards import Sample, address, count_samples, decode_shard, find_shards, iter_samples
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.support.clirun import INDEXER, MODEL, run, run_json
from tests.support.shardfiles import flat_png, shape_png, special, truncate, write_members, write_shard, write_shards


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return shapes_settings(tmp_path / "store")


def test_samples_keep_caption_and_json_and_skip_the_sibling_parquet(tmp_path: Path) -> None:
    write_shard(tmp_path / "s" / "00000.tar", 3)
    found = find_shards([tmp_path / "s"])
    assert [f.path.name for f in found] == ["00000.tar"]  # 00000.parquet is not an input
    samples = list(iter_samples(found[0].path, DecodeLimits()))
    assert all(isinstance(s, Sample) for s in samples)
    first = samples[0]
    assert isinstance(first, Sample)
    assert first.key == "000000000" and first.caption == "a red circle"
    assert json.loads(first.json or "")["key"] == "000000000"
    assert count_samples(found[0].path) == 3


def test_a_part_of_a_shard_reads_only_its_samples(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    keys = write_shard(shard, 10)
    part = [s.key for s in iter_samples(shard, DecodeLimits(), start=3, stop=6) if isinstance(s, Sample)]
    assert part == keys[3:6]


def test_bad_members_fail_with_a_reason_and_never_the_shard(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    truncated_png = shape_png(1)[:200]
    write_shard(shard, 5, bad={1: b"this is not an image", 3: truncated_png})
    entry = find_shards([shard])[0]
    items = list(decode_shard(entry, PreprocessSpec(image_size=64), DecodeLimits()))
    failures = {str(i.path): i.reason for i in items if isinstance(i, Failure)}
    assert set(failures) == {address(shard, "000000001"), address(shard, "000000003")}
    assert "not an image" in failures[address(shard, "000000001")]
    assert "truncated" in failures[address(shard, "000000003")]
    assert sum(not isinstance(i, Failure) for i in items) == 3


def test_threads_decode_the_same_samples_in_the_same_order(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, 40, bad={5: b"this is not an image", 17: shape_png(2)[:200]})
    entry = find_shards([shard])[0]
    spec = PreprocessSpec(image_size=64)

    def summary(items: list[Decoded | Failure]) -> list[tuple[str, object]]:
        return [
            (str(i.path), i.reason) if isinstance(i, Failure) else (str(i.meta.path), (i.meta, i.pixels.tobytes()))
            for i in items
        ]

    one = summary(list(decode_shard(entry, spec, DecodeLimits())))
    assert summary(list(decode_shard(entry, spec, DecodeLimits(), threads=3))) == one
    assert len(one) == 40 and sum(isinstance(v, str) for _, v in one) == 2
    early = decode_shard(entry, spec, DecodeLimits(), threads=3)
    assert summary([next(early), next(early)]) == one[:2]
    early.close()  # the queued samples are cancelled, the threads gone
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-decode")]
    again = find_shards([shard])[0]
    assert summary(list(decode_shard(again, spec, DecodeLimits(), start=10, stop=20, threads=2))) == one[10:20]


def test_a_shard_cut_short_keeps_the_samples_before_the_cut(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, 10)
    truncate(shard, 0.55)
    items = list(iter_samples(shard, DecodeLimits()))
    good = [i for i in items if isinstance(i, Sample)]
    bad = [i for i in items if isinstance(i, Failure)]
    assert 3 <= len(good) < 10
    assert len(bad) == 1 and ("shard" in bad[0].reason or "truncated" in bad[0].reason)


def test_a_file_that_is_no_tar_is_one_failure(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"not a tar at all" * 100)
    items = list(iter_samples(shard, DecodeLimits()))
    assert len(items) == 1 and isinstance(items[0], Failure) and items[0].path == shard
    assert "unreadable shard" in items[0].reason


def test_embed_writes_caption_and_json_beside_each_vector(tmp_path: Path, settings: Settings, model: LazyModel) -> None:
    write_shards(tmp_path / "shards", 2, 6)
    out = tmp_path / "out.parquet"
    summary = run_embed([tmp_path / "shards"], out, settings, model)
    assert summary.indexed == 12 and summary.failed == 0
    table = pq.read_table(out)
    assert table.column_names == ["path", "sha256", "width", "height", "embedding", "caption", "json", "key", "shard"]
    rows = table.to_pylist()
    first = str(tmp_path / "shards" / "00000.tar") + "#000000000"
    assert rows[0]["path"] == first and rows[0]["caption"] == "a red circle"
    assert json.loads(rows[0]["json"])["url"].endswith("000000000.png")


def test_index_stores_caption_and_metadata_and_finds_them_by_text(
    tmp_path: Path, settings: Settings, model: LazyModel
) -> None:
    [shard] = write_shards(tmp_path / "shards", 1, 12)
    with EdgeStore(settings.store.dir) as store:
        summary = run_index([tmp_path / "shards"], settings, store, model)
        assert summary.indexed == 12
        point = store.retrieve([point_id(address(shard, "000000004"))])[0]
        assert point.payload["caption"] == "a green square"
        assert point.payload["metadata"]["key"] == "000000004"
        assert point.payload["shard"] == str(shard) and point.payload["shard_mtime_ns"] == os.stat(shard).st_mtime_ns
        hits = search(store, model, Query(texts=("a blue triangle",), limit=1))
        assert hits[0].payload["caption"] == "a blue triangle"


def test_an_unchanged_shard_is_not_read_again(
    tmp_path: Path, settings: Settings, model: LazyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "shards"
    write_shards(folder, 2, 4)
    with EdgeStore(settings.store.dir) as store:
        run_index([folder], settings, store, model)
        opened: list[Path] = []
        real = shards_mod.iter_samples

        def spy(shard: Path, *args: object, **kwargs: object) -> object:
            opened.append(shard)
            return real(shard, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(shards_mod, "iter_samples", spy)
        again = run_index([folder], settings, store, model)
        assert (again.indexed, again.unchanged, again.removed) == (0, 8, 0)
        assert opened == []


def test_index_reads_the_stored_points_once_for_files_and_shards_alike(
    tmp_path: Path, settings: Settings, model: LazyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scroll of the store per directory root serves both diffs (a million stored points are read once per
    run, not twice); a root that is one shard file still finds that shard's points."""
    folder = tmp_path / "shards"
    first, second = write_shards(folder, 2, 4)
    with EdgeStore(settings.store.dir) as store:
        run_index([folder], settings, store, model)
        scrolls: list[object] = []
        real = EdgeStore.scroll

        def counted(self: EdgeStore, *args: Any, **kwargs: Any) -> Any:
            scrolls.append(kwargs.get("filter"))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(EdgeStore, "scroll", counted)
        again = run_index([folder], settings, store, model)
        assert (again.indexed, again.unchanged, again.removed) == (0, 8, 0)
        assert len(scrolls) == 1
        second.unlink()  # a vanished shard is still seen through the plan's points
        gone = run_index([folder], settings, store, model)
        assert (gone.removed, gone.unchanged) == (4, 4)
        scrolls.clear()
        only = run_index([first], settings, store, model)  # the shard file itself as the root
        assert (only.indexed, only.unchanged) == (0, 4)
        assert len(scrolls) == 2  # the file's own diff, and its folder's for the shard's points


def test_a_changed_shard_is_reread_and_a_vanished_one_leaves(
    tmp_path: Path, settings: Settings, model: LazyModel
) -> None:
    folder = tmp_path / "shards"
    first, second = write_shards(folder, 2, 4)
    with EdgeStore(settings.store.dir) as store:
        run_index([folder], settings, store, model)
        write_shard(first, 2)  # rewritten with fewer samples
        os.utime(first, ns=(1, 1))
        second.unlink()
        summary = run_index([folder], settings, store, model)
        assert (summary.indexed, summary.removed) == (2, 2 + 4)
        assert sorted(p.path for p in store.scroll()) == [address(first, "000000000"), address(first, "000000001")]


def test_an_interrupted_shard_is_read_again(tmp_path: Path, settings: Settings, model: LazyModel) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, 4)
    with EdgeStore(settings.store.dir) as store:
        run_index([shard], settings, store, model)
        some = [p.id for p in store.scroll()][:2]
        store.set_payload(some, {"shard_mtime_ns": shards_mod.SHARD_PENDING})  # as a run stopped mid-shard leaves it
        summary = run_index([shard], settings, store, model)
        assert summary.indexed == 4 and store.count() == 4


def test_cli_embed_and_index_accept_shards(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_shards(folder, 1, 3)
    (folder / "photo-dir").mkdir()
    (folder / "photo-dir" / "x.png").write_bytes(shape_png(5))
    out = tmp_path / "e.parquet"
    summary = run_json("embed", str(folder), "--output", str(out), *MODEL)
    assert summary["indexed"] == 4
    store = tmp_path / "store"
    first = run_json("index", str(folder), "--store", str(store), *MODEL)
    second = run_json("index", str(folder), "--store", str(store), *MODEL)
    assert first["indexed"] == 4 and (second["indexed"], second["unchanged"], second["removed"]) == (0, 4, 0)


# --- hostile and odd shards (issue 22: 6, 7, 8, 12) -----------------------------------------------------------------


def failures_of(summary: dict[str, Any]) -> dict[str, str]:
    return {f["path"]: f["reason"] for f in summary["failures"]}


@pytest.mark.faults
def test_a_member_name_that_is_not_utf8_fails_alone_and_later_shards_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_members(folder / "00000.tar", [("a.png", shape_png(0)), ("caf\udce9.png", shape_png(1)),
                                         ("b.png", shape_png(2))])  # fmt: skip
    write_shard(folder / "00001.tar", 2, first=10)
    bad = address(folder / "00000.tar", "caf\\xe9")
    proc = run("index", str(folder), "--store", str(tmp_path / "store"), *MODEL, "--json", check=1)
    summary = json.loads(proc.stdout)
    assert (summary["indexed"], summary["failed"]) == (4, 1)
    assert failures_of(summary) == {bad: "member name is not valid UTF-8"}
    assert f"skipping {bad}: member name is not valid UTF-8" in proc.stderr
    out = tmp_path / "e.parquet"
    embed = run("embed", str(folder), "--output", str(out), *MODEL, "--json", check=1)
    assert "Traceback" not in embed.stderr and json.loads(embed.stdout)["failed"] == 1
    assert pq.read_table(out).num_rows == 4


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_a_fifo_named_tar_is_skipped_never_waited_on(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_shard(folder / "00000.tar", 2)
    os.mkfifo(folder / "00001.tar")
    args = [INDEXER, "index", str(folder), "--store", str(tmp_path / "store"), *MODEL, "--json"]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("indexer index hangs on a FIFO named *.tar")
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and summary["indexed"] == 2
    assert failures_of(summary) == {str(folder / "00001.tar"): "not a regular file (a FIFO)"}


@pytest.mark.faults
def test_links_devices_and_fifo_members_are_reported_as_skipped(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    write_members(shard, [
        ("a.png", shape_png(0)), ("b.png", special(tarfile.SYMTYPE, "/etc/passwd")),
        ("c.png", special(tarfile.LNKTYPE, "a.png")), ("d.png", special(tarfile.CHRTYPE)),
        ("e.png", special(tarfile.FIFOTYPE)), ("f.png", shape_png(1)),
    ])  # fmt: skip
    summary = run_json("index", str(shard), "--store", str(tmp_path / "store"), *MODEL, check=1)
    assert summary["indexed"] == 2
    assert failures_of(summary) == {
        address(shard, "b.png"): "not a regular member (a symbolic link)",
        address(shard, "c.png"): "not a regular member (a hard link)",
        address(shard, "d.png"): "not a regular member (a character device)",
        address(shard, "e.png"): "not a regular member (a FIFO)",
    }


@pytest.mark.faults
def test_a_duplicate_key_is_reported_and_the_counts_are_what_is_stored(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    write_members(shard, [("a.png", shape_png(0)), ("b.png", shape_png(1)), ("a.png", shape_png(2))])
    store = tmp_path / "store"
    summary = run_json("index", str(shard), "--store", str(store), *MODEL, check=1)
    assert (summary["indexed"], summary["failed"]) == (2, 1)
    reason = failures_of(summary)[address(shard, "a.png")]
    assert reason.startswith("duplicate key a:")
    assert run_json("status", "--store", str(store))["images"] == 2
    # a part of the shard numbers the entries as the whole does: each is reported once
    parts = [list(iter_samples(shard, DecodeLimits(), n, n + 1)) for n in range(count_samples(shard))]
    assert [len(p) for p in parts] == [1, 1, 1]


def test_a_compressed_shard_is_reported_as_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_shard(folder / "00000.tar", 2)
    with gzip.open(folder / "00001.tar.gz", "wb") as fh:
        fh.write((folder / "00000.tar").read_bytes())
    summary = run_json("embed", str(folder), "--output", str(tmp_path / "e.parquet"), *MODEL, check=1)
    assert summary["indexed"] == 2
    reason = failures_of(summary)[str(folder / "00001.tar.gz")]
    assert reason.startswith("compressed shard: only uncompressed .tar shards are read")


# Peaks are read from VmHWM: ru_maxrss survives fork and exec, so a child of the test process starts at its peak.
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024"

DECODE_RSS = f"""
import sys
from pathlib import Path
from indexer.records import DecodeLimits, Decoded, PreprocessSpec
from indexer.sources.shards import decode_shard, find_shards
shard, threads, limit = find_shards([Path(sys.argv[1])])[0], int(sys.argv[2]), int(sys.argv[3])
before = {PEAK}
items = list(decode_shard(shard, PreprocessSpec(image_size=64), DecodeLimits(max_pixels=limit), threads=threads))
assert all(isinstance(i, Decoded) for i in items), [getattr(i, 'reason', '') for i in items]
print({PEAK} - before)
"""


def decode_growth_mb(shard: Path, threads: int, limit: int) -> int:
    """How much decoding ``shard`` on ``threads`` threads grows a fresh process's peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", DECODE_RSS, str(shard), str(threads), str(limit)],
                          capture_output=True, text=True, timeout=300, env=env, check=True)  # fmt: skip
    return int(proc.stdout.strip())


@pytest.mark.faults
def test_decoding_threads_never_hold_two_limit_sized_images(tmp_path: Path) -> None:
    # 4 members of 6,000 x 6,000 px (103 MB decoded, 130 KB in the shard) under a 40 MP limit: each may decode,
    # two at once may not
    side, limit = 6000, 40_000_000
    shard = tmp_path / "00000.tar"
    write_members(shard, [(f"{n}.png", flat_png(side, side)) for n in range(4)])
    image_mb = side * side * 3 // 2**20
    one, two = decode_growth_mb(shard, 1, limit), decode_growth_mb(shard, 2, limit)
    print(f"peak RSS growth: {one} MB with 1 thread, {two} MB with 2; one image {image_mb} MB")
    assert one < 3 * image_mb  # one image at a time: its decode, its resize
    assert two < one + image_mb // 2  # two threads: still one limit-sized image at a time


MEMBERS_RSS = f"""
import sys
from pathlib import Path
from indexer.records import DecodeLimits
from indexer.sources.shards import count_samples, iter_samples
shard = Path(sys.argv[1])
before = {PEAK}
entries = count_samples(shard)
items = sum(1 for _ in iter_samples(shard, DecodeLimits()))
print(entries, items, {PEAK} - before)
"""


@pytest.mark.faults
def test_a_shard_of_many_empty_members_holds_no_memory_per_member(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        for n in range(100_000):
            tf.addfile(tarfile.TarInfo(f"{n:07d}.txt"))
    write_members(tmp_path / "one.tar", [("a.png", shape_png(0))])
    with tarfile.open(shard, "a") as tf, tarfile.open(tmp_path / "one.tar") as one:
        member = one.getmember("a.png")
        tf.addfile(member, one.extractfile(member))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", MEMBERS_RSS, str(shard)], capture_output=True, text=True,
                          timeout=120, env=env, check=True)  # fmt: skip
    entries, items, grew_mb = map(int, proc.stdout.split())
    assert (entries, items) == (1, 1)
    assert grew_mb < 12, f"reading 100,000 members grew the process by {grew_mb} MB"


@pytest.mark.timeout(300)
def test_serve_sends_shard_images_and_thumbnails_from_the_shard(tmp_path: Path, model: LazyModel) -> None:
    import httpx

    from indexer.api.routes import create_app
    from tests.support.live_server import serve

    folder = tmp_path / "shards"
    [shard] = write_shards(folder, 1, 3)
    settings = shapes_settings(tmp_path / "store", serve={"roots": [str(folder)], "thumbnail_dir": str(tmp_path / "t")})
    with EdgeStore(settings.store.dir) as store:
        run_index([folder], settings, store, model)
        image_id = point_id(address(shard, "000000001"))
        with serve(create_app(settings, store, model)) as url, httpx.Client(base_url=url, timeout=60) as http:
            image = http.get(f"/images/{image_id}")
            assert image.status_code == 200, image.text
            assert image.headers["content-type"] == "image/png" and image.content == shape_png(1)
            thumb = http.get(f"/images/{image_id}/thumbnail")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
            assert thumb.content[:2] == b"\xff\xd8"
            shard.unlink()
            os.mkfifo(shard)  # the shard swapped for a FIFO: refused, never opened
            gone = http.get(f"/images/{image_id}", timeout=20)
            assert gone.status_code == 404 and "no longer on disk" in gone.text
