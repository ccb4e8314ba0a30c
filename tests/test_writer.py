"""The background writer: writes in order behind a bounded queue; an error stops the run cleanly, nothing lost."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import pytest

from indexer.decode import shm as shm
from indexer.errors import StoreError
from indexer.ingest.pipeline import run_embed, run_index
from indexer.ingest.writer import BackgroundWriter
from indexer.model.lazy import LazyModel
from indexer.records import StoredPoint
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset


def _append_with_thread(done: list[tuple[int, str]], i: int) -> None:
    done.append((i, threading.current_thread().name))


def test_writes_run_in_order_on_another_thread() -> None:
    done: list[tuple[int, str]] = []
    with BackgroundWriter(depth=1) as writer:
        for i in range(20):
            writer.submit(functools.partial(_append_with_thread, done, i))
    assert [i for i, _ in done] == list(range(20))
    assert {name for _, name in done} == {"writer"}


def test_a_failed_write_stops_the_writer_and_is_raised_to_the_caller() -> None:
    done: list[int] = []

    def fail() -> None:
        raise StoreError("disk full")

    writer = BackgroundWriter(depth=2)
    writer.submit(lambda: done.append(1))
    writer.submit(fail)
    with pytest.raises(StoreError, match="disk full"):
        for i in range(100):  # fails at the latest once the thread got to `fail`
            writer.submit(functools.partial(done.append, i + 10))
            time.sleep(0.01)
    with pytest.raises(StoreError, match="disk full"):
        writer.close()
    assert done[0] == 1 and len(done) <= 3  # nothing after the failed write ran but what was queued before it


def _slow_append(done: list[int], i: int) -> None:
    time.sleep(0.02)
    done.append(i)


def test_leaving_by_an_exception_still_writes_what_is_queued() -> None:
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt), BackgroundWriter(depth=4) as writer:
        for i in range(4):
            writer.submit(functools.partial(_slow_append, done, i))
        raise KeyboardInterrupt
    assert done == [0, 1, 2, 3]


def test_a_store_error_stops_the_index_run_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    write_dataset(photos, 24, seed=3)
    settings = shapes_settings(tmp_path / "store", decode={"workers": 2})  # batch size 8 → 3 batches
    store = EdgeStore(tmp_path / "store")
    real = store.upsert
    calls = {"n": 0}

    def upsert_fails_on_second_batch(points: list[StoredPoint]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreError("the store refused the batch")
        real(points)

    monkeypatch.setattr(store, "upsert", upsert_fails_on_second_batch)
    with pytest.raises(StoreError, match="refused"):
        run_index([photos], settings, store, LazyModel(settings.model))
    assert store.count() == 8 and calls["n"] == 2  # the first batch is kept; nothing was written after the error
    assert not [t for t in threading.enumerate() if t.name == "writer"]
    assert not list(shm.SHM_DIR.glob(shm.segment_prefix() + "*"))
    monkeypatch.setattr(store, "upsert", real)
    again = run_index([photos], settings, store, LazyModel(settings.model))  # the next run completes it
    assert (again.indexed, again.unchanged) == (16, 8) and store.count() == 24
    store.close()


def test_an_output_error_stops_the_embed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.library import export as export

    photos = tmp_path / "photos"
    write_dataset(photos, 16, seed=4)
    settings = shapes_settings(tmp_path / "store", decode={"workers": 2})
    real_open = export.open_embedding_writer

    def failing_writer(*args: object, **kwargs: object) -> object:
        inner = real_open(*args, **kwargs)  # type: ignore[arg-type]

        def write(*a: object, **k: object) -> None:
            raise OSError(28, "No space left on device")

        inner.write = write  # type: ignore[method-assign]
        return inner

    monkeypatch.setattr(export, "open_embedding_writer", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        run_embed([photos], tmp_path / "out.parquet", settings, LazyModel(settings.model))
    assert not list(tmp_path.glob("out.*"))  # no output file, no partial one
    assert not [t for t in threading.enumerate() if t.name == "writer"]
