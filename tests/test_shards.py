"""WebDataset / img2dataset tar shards as inputs, in the single-process path: reading, bad members, the embed
output, and incremental indexing (an unchanged shard is not read again), with the real learned model and store."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

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
from tests.support.clirun import MODEL, run_json
from tests.support.shardfiles import shape_png, truncate, write_shard, write_shards


@pytest.fixture(scope="module")
def model() -> LazyModel:
    return LazyModel(shapes_settings(Path("/unused")).model)


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
    assert table.column_names == ["path", "sha256", "width", "height", "embedding", "caption", "json"]
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
