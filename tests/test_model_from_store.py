"""A command given no model uses the one the store records (`indexer.model.fromstore`), through the real CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from indexer.model.fromstore import model_given, models_cache_file, settings_for_model
from indexer.model.weights import hash_cache_file, resolve_source
from indexer.settings import ModelSettings, load_settings
from tests.conftest import SHAPES_MODEL
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import run, run_json


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store indexed with the test model (given with --model, from its own folder)."""
    folder, store = tmp_path / "shapes", tmp_path / "store"
    write_dataset(folder, 8, seed=5)
    assert (
        run_json("index", str(folder), "--store", str(store), "--model", str(SHAPES_MODEL), "--device", "cpu")[
            "indexed"
        ]
        == 8
    )
    return store


def _search(store: Path, *extra: str, check: int | None = 0) -> object:
    return run_json("search", "a red circle", "--store", str(store), "--device", "cpu", *extra, check=check)


def test_search_and_index_without_model_use_the_stores(store: Path, tmp_path: Path) -> None:
    hits = _search(store)
    assert isinstance(hits, list) and hits and Path(hits[0]["path"]).name.startswith("red-circle")
    more = tmp_path / "more"
    write_dataset(more, 3, seed=9)
    assert run_json("index", str(more), "--store", str(store), "--device", "cpu")["indexed"] == 3
    status = run_json("status", "--store", str(store))
    assert status["images"] == 11 and status["model"].startswith("shapes-clip@sha256:")


def test_found_by_its_weights_hash_when_the_model_was_not_remembered(store: Path) -> None:
    models_cache_file().unlink()
    hits = _search(store)
    assert isinstance(hits, list) and hits


def test_not_found_names_the_recorded_model_and_what_to_pass(store: Path) -> None:
    models_cache_file().unlink()
    hash_cache_file().unlink()
    proc = run("search", "a red circle", "--store", str(store), "--device", "cpu", check=2)
    assert "holds vectors of shapes-clip@sha256:" in proc.stderr and "--model / --weights" in proc.stderr


def test_a_given_model_that_does_not_match_is_refused(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-clip"
    shutil.copytree(SHAPES_MODEL.parent, other)
    changed = bytearray((other / "weights.safetensors").read_bytes())
    changed[-1] ^= 1
    (other / "weights.safetensors").write_bytes(bytes(changed))
    proc = run("search", "a red circle", "--store", str(store), "--device", "cpu", "--model",
               str(other / "config.json"), check=None)  # fmt: skip
    assert proc.returncode == 2 and "shapes-clip@sha256:" in proc.stderr and "other-clip@sha256:" in proc.stderr


def test_a_model_chosen_by_environment_or_config_counts_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not model_given(load_settings(None, {"model": {"device": "cpu", "dir": str(tmp_path)}}).model)
    monkeypatch.setenv("INDEXER_MODEL__NAME", str(SHAPES_MODEL))
    assert model_given(load_settings(None, {}).model)


def test_settings_for_model_keeps_how_to_run_it() -> None:
    recorded = resolve_source(ModelSettings(name=str(SHAPES_MODEL))).model_id
    found = settings_for_model(recorded, ModelSettings(device="cpu", batch_size=3, dtype="fp32"))
    assert found is not None and (found.device, found.batch_size, found.dtype) == ("cpu", 3, "fp32")
    assert resolve_source(found).model_id == recorded
    assert settings_for_model("shapes-clip@sha256:0000000000000000", ModelSettings()) is None
    assert os.path.isabs(found.weights or found.name)
