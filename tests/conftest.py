"""Shared fixtures: the learned shapes test model, generated image folders, settings for temp stores."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from indexer.model.lazy import LazyModel
from indexer.settings import Settings, load_settings

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES_MODEL = FIXTURES / "shapes-clip" / "config.json"

# This process keeps the system temp folder (multiprocessing caches its pymp-* folder, and the forkserver's socket
# in it, for the whole session); only the processes a test starts get the session's (see _isolated_env).
tempfile.gettempdir()


def shapes_settings(store: Path, **extra: Any) -> Settings:
    """Settings that use the learned test model on the CPU and an embedded store at ``store``."""
    overrides: dict[str, Any] = {
        "store": {"dir": store},
        "model": {"name": str(SHAPES_MODEL), "device": "cpu", "batch_size": 8},
        "decode": {"workers": 2},
    }
    for section, values in extra.items():
        overrides.setdefault(section, {}).update(values)
    return load_settings(None, overrides)


@pytest.fixture(scope="module")
def model() -> LazyModel:
    """The learned test model, built once per test module on first use (LazyModel imports no torch until then)."""
    return LazyModel(shapes_settings(Path("/unused")).model)


@pytest.fixture(scope="session")
def shapes_model_args() -> list[str]:
    """CLI flags selecting the learned test model on the CPU."""
    return ["--model", str(SHAPES_MODEL), "--device", "cpu"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the developer's config, store or HF cache."""
    monkeypatch.delenv("INDEXER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Temp files of the commands a test runs (forkserver folders pymp-*, read-only copies) go with the session's
    # temp folder, even when the test kills them: nothing is left in /tmp.
    commands_tmp = tmp_path_factory.getbasetemp() / "commands-tmp"
    commands_tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(commands_tmp))
    # Ray puts its sockets under its temp dir, and an AF_UNIX path may not exceed 107 bytes: Ray keeps its own.
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")
