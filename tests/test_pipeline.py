"""The index pipeline on real files, the real learned model and both store backends.

Incremental re-index, move detection without re-embedding, deletion, model mismatch refusal, interruption and
resume, and the bad-input corpus (skipped with reasons, never shifting a vector onto another file).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ConfigError, ModelMismatchError
from indexer.ingest.pipeline import run_index
from indexer.model.clip import ClipModel
from indexer.model.lazy import LazyModel
from indexer.records import SearchFilter, point_id
from indexer.search import Query, search
from indexer.settings import ModelSettings, Settings
from indexer.store.edge_store import EdgeStore
from indexer.store.protocol import VectorStore
from indexer.store.server import QdrantServerStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.badfiles import write_bad_corpus, write_misnamed_png


@pytest.fixture(params=["edge", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    s: VectorStore
    if request.param == "edge":
        s = EdgeStore(tmp_path / "store")
    else:
        s = QdrantServerStore.connect(":memory:", None, "images")
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return shapes_settings(tmp_path / "store", decode={"workers": 2})


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_dataset(folder, 24, seed=11)
    return folder


def stored_paths(store: VectorStore) -> set[str]:
    return {p.path for p in store.scroll()}


def test_first_run_indexes_everything(store: VectorStore, settings: Settings, model: LazyModel, photos: Path) -> None:
    summary = run_index([photos], settings, store, model)
    assert (summary.indexed, summary.unchanged, summary.failed) == (24, 0, 0)
    assert stored_paths(store) == {str(p) for p in photos.iterdir()}
    point = store.retrieve([point_id(next(iter(sorted(photos.iterdir()))))])[0]
    for key in ("path", "size", "mtime", "sha256", "width", "height", "format", "model", "indexed_at"):
        assert key in point.payload
    assert point.payload["model"] == model.model_id and point.payload["format"] == "PNG"


def test_rerun_is_a_noop_that_never_loads_the_model(store: VectorStore, settings: Settings, photos: Path) -> None:
    run_index([photos], settings, store, LazyModel(settings.model))
    fresh = LazyModel(settings.model)
    summary = run_index([photos], settings, store, fresh)
    assert (summary.indexed, summary.unchanged, summary.moved, summary.removed) == (0, 24, 0, 0)
    assert fresh._model is None  # nothing to embed: ViT-L/14 would not even be built


def test_changed_file_is_reembedded(store: VectorStore, settings: Settings, model: LazyModel, photos: Path) -> None:
    run_index([photos], settings, store, model)
    target = sorted(photos.glob("red-circle-*"))[0]
    before = store.retrieve([point_id(target)], with_vectors=True)[0]
    shutil.copy(sorted(photos.glob("blue-square-*"))[0], target)
    os.utime(target, ns=(before.payload["mtime_ns"] + 5_000_000_000,) * 2)
    summary = run_index([photos], settings, store, model)
    assert (summary.indexed, summary.unchanged) == (1, 23)
    after = store.retrieve([point_id(target)], with_vectors=True)[0]
    assert after.payload["sha256"] != before.payload["sha256"]
    assert before.vector is not None and after.vector is not None
    assert float(before.vector @ after.vector) < 0.99


def test_moved_file_keeps_its_vector_without_reembedding(
    store: VectorStore, settings: Settings, model: LazyModel, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_index([photos], settings, store, model)
    old = sorted(photos.glob("green-triangle-*"))[0]
    before = store.retrieve([point_id(old)], with_vectors=True)[0]
    (photos / "sub").mkdir()
    new = photos / "sub" / "renamed.png"
    old.rename(new)

    def no_encoding(self: ClipModel, pixels: np.ndarray) -> np.ndarray:
        raise AssertionError("a move must not re-embed")

    monkeypatch.setattr(ClipModel, "encode_pixels", no_encoding)
    summary = run_index([photos], settings, store, model)
    assert (summary.moved, summary.indexed, summary.removed, summary.unchanged) == (1, 0, 0, 23)
    assert store.retrieve([point_id(old)]) == []
    after = store.retrieve([point_id(new)], with_vectors=True)[0]
    assert after.payload["path"] == str(new) and after.payload["sha256"] == before.payload["sha256"]
    assert before.vector is not None and after.vector is not None
    assert np.allclose(before.vector, after.vector, atol=1e-6)
    assert store.count(SearchFilter(path_prefix=str(photos / "sub"))) == 1


def test_deleted_files_leave_the_store(store: VectorStore, settings: Settings, model: LazyModel, photos: Path) -> None:
    run_index([photos], settings, store, model)
    gone = sorted(photos.glob("yellow-*"))
    for f in gone:
        f.unlink()
    summary = run_index([photos], settings, store, model)
    assert summary.removed == len(gone) and store.count() == 24 - len(gone)
    assert not stored_paths(store) & {str(f) for f in gone}


def test_indexing_a_subfolder_leaves_the_rest_alone(
    store: VectorStore, settings: Settings, model: LazyModel, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "ab"
    write_dataset(a, 4, seed=1)
    write_dataset(b, 4, seed=2)
    run_index([a, b], settings, store, model)
    for f in a.iterdir():
        f.unlink()
    summary = run_index([b], settings, store, model)  # "/x/a" gone files are not under "/x/ab"
    assert summary.removed == 0 and store.count() == 8


def test_missing_root_is_a_usage_error_not_a_wipe(
    store: VectorStore, settings: Settings, model: LazyModel, photos: Path
) -> None:
    run_index([photos], settings, store, model)
    with pytest.raises(ConfigError, match="does not exist"):
        run_index([photos.parent / "unmounted"], settings, store, model)
    assert store.count() == 24


def test_another_model_is_refused(store: VectorStore, settings: Settings, model: LazyModel, photos: Path) -> None:
    run_index([photos], settings, store, model)
    other = LazyModel(ModelSettings(name="ViT-B-32", pretrained="none", device="cpu"))
    with pytest.raises(ModelMismatchError) as err:
        run_index([photos], settings, store, other)
    assert model.model_id in str(err.value) and "ViT-B-32/random" in str(err.value)
    assert other._model is None and store.count() == 24


def test_interrupt_keeps_finished_batches_and_resume_finishes(
    store: VectorStore, settings: Settings, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LazyModel(settings.model)  # batch size 8 → 3 batches
    real = ClipModel.encode_pixels
    calls = {"n": 0}

    def ctrl_c_on_third_batch(self: ClipModel, pixels: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(ClipModel, "encode_pixels", ctrl_c_on_third_batch)
    first = run_index([photos], settings, store, model)
    assert first.interrupted and first.indexed == 16 and store.count() == 16
    monkeypatch.setattr(ClipModel, "encode_pixels", real)
    second = run_index([photos], settings, store, model)
    assert not second.interrupted
    assert (second.indexed, second.unchanged) == (8, 16) and store.count() == 24


def test_bad_files_are_skipped_with_reasons_and_vectors_stay_aligned(
    store: VectorStore, settings: Settings, model: LazyModel, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    good = write_dataset(folder, 12, seed=5)
    expected = write_bad_corpus(folder)
    misnamed = write_misnamed_png(folder / "actually-a-png.jpg")
    summary = run_index([folder], settings, store, model)
    reasons = {f.path.name: f.reason for f in summary.failures}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name].lower(), (name, reasons[name])
    assert summary.indexed == len(good) + 1 and summary.failed == len(expected)
    assert store.retrieve([point_id(misnamed)])[0].payload["format"] == "PNG"
    assert {f.path for f in store.failures(100)} == {str(folder / n) for n in expected}
    # Every stored vector is the one of its own file, computed alone.
    clip = model.get()
    from indexer.decode.image import decode_file
    from indexer.records import Decoded, DecodeLimits

    for f in good:
        alone = decode_file(f, clip.preprocess, DecodeLimits())
        assert isinstance(alone, Decoded)
        vec = store.retrieve([point_id(f)], with_vectors=True)[0].vector
        assert vec is not None and float(clip.encode_pixels(alone.pixels[None])[0] @ vec) > 0.9999


def test_fixed_file_leaves_the_failure_list(
    store: VectorStore, settings: Settings, model: LazyModel, tmp_path: Path
) -> None:
    folder = tmp_path / "f"
    write_dataset(folder, 2, seed=1)
    broken = folder / "broken.png"
    broken.write_bytes(b"")
    run_index([folder], settings, store, model)
    assert store.failure_count() == 1
    shutil.copy(next(folder.glob("red-*")), broken)
    summary = run_index([folder], settings, store, model)
    assert summary.indexed == 1 and store.failure_count() == 0


def test_text_and_image_search_rank_the_right_class(
    store: VectorStore, settings: Settings, model: LazyModel, photos: Path
) -> None:
    run_index([photos], settings, store, model)
    hits = search(store, model, Query(texts=("a red circle",), limit=2))
    assert [Path(h.path).name.startswith("red-circle") for h in hits] == [True, True]
    assert hits[0].score >= hits[1].score
    probe = sorted(photos.glob("blue-square-*"))[0]
    hits = search(store, model, Query(images=(probe,), limit=2))
    assert hits[0].path == str(probe) and hits[0].score > 0.99
    assert Path(hits[1].path).name.startswith("blue-square")


def test_the_daemons_scan_does_not_read_an_unchanged_failed_file_again(
    store: VectorStore, settings: Settings, model: LazyModel, photos: Path
) -> None:
    from indexer.ingest.pipeline import Indexer

    broken = photos / "broken.png"
    broken.write_bytes(b"not a png at all")
    with Indexer(settings, store, model) as indexer:
        first = indexer.sync([photos]).summary
        assert (first.indexed, first.failed, first.known_failures) == (24, 1, 0)
        again = indexer.sync([photos]).summary
        assert (again.unchanged, again.failed, again.known_failures) == (24, 0, 1)
        stat = broken.stat()  # changed (a new mtime): read again
        os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        touched = indexer.sync([photos]).summary
        assert (touched.failed, touched.known_failures) == (1, 0)
