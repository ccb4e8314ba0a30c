"""The ingest loop with a sink of the test's own (a new output is one class), and `index`'s store upkeep: the HNSW
build waits until exact search would get slow, the payload indexes (fast filters) do not wait."""

from __future__ import annotations

from pathlib import Path

import pytest

import indexer.ingest.pipeline as pipeline
from indexer.ingest.decoders import decode_pool
from indexer.ingest.embed import EmbeddedBatch
from indexer.ingest.loop import NoProgress, run_loop
from indexer.ingest.sources import FileSource
from indexer.model.lazy import LazyModel
from indexer.records import Failure, FileEntry, RunSummary, SearchFilter
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset


class ListSink:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.failed: list[str] = []

    def write(self, batch: EmbeddedBatch) -> None:
        assert batch.vectors.shape[0] == len(batch.metas)
        self.paths.extend(str(m.path) for m in batch.metas)

    def fail(self, failure: Failure) -> Failure:
        self.failed.append(str(failure.path))
        return failure


def test_a_sink_of_ones_own_gets_every_batch_in_order_and_every_failure(tmp_path: Path, model: LazyModel) -> None:
    files = write_dataset(tmp_path / "img", 11, seed=9, size=48)
    broken = tmp_path / "img" / "zz-broken.png"
    broken.write_bytes(b"not an image")
    entries = [FileEntry(p, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted([*files, broken])]
    settings = shapes_settings(tmp_path / "s")
    sink, summary = ListSink(), RunSummary()
    with decode_pool(settings, model.preprocess, len(entries), 4) as pool:
        run_loop(FileSource(entries, pool), model, sink, summary, NoProgress())
    assert sink.paths == sorted(str(p) for p in files) and sink.failed == [str(broken)]
    assert (summary.indexed, summary.failed) == (11, 1)


def edge_index(tmp_path: Path, model: LazyModel, count: int) -> EdgeStore:
    """`run_index` of ``count`` shapes into an embedded store whose segments get an HNSW index from 1 KB on."""
    folder = tmp_path / "photos"
    write_dataset(folder / "a", count // 2, seed=1, size=48)
    write_dataset(folder / "b", count - count // 2, seed=2, size=48)
    settings = shapes_settings(tmp_path / "unused")
    settings = settings.model_copy(update={"store": settings.store.model_copy(update={"optimize_after": 1})})
    store = EdgeStore(tmp_path / "store", indexing_threshold_kb=1)
    summary = pipeline.run_index([folder], settings, store, model)
    assert summary.indexed == count
    return store


def test_index_defers_the_hnsw_build_while_exact_search_is_fast(tmp_path: Path, model: LazyModel) -> None:
    with edge_index(tmp_path, model, 24) as store:
        assert store.indexed_vectors_count() == 0  # 24 vectors: searched exactly, nothing built
        shard = store._live_shard()
        assert shard is not None and {"dirs", "sha256", "path"} <= set(shard.info().payload_schema)  # indexed
        under_a = store.scroll(filter=SearchFilter(path_prefix=str(tmp_path / "photos" / "a")))
        assert len(list(under_a)) == 12


def test_index_builds_the_hnsw_index_once_it_pays(
    tmp_path: Path, model: LazyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "EXACT_SEARCH_POINTS", 10)
    with edge_index(tmp_path, model, 24) as store:
        assert store.indexed_vectors_count() > 0
