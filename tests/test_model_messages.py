"""What the model says: the CPU notice names the model loaded, once per process and only for an ingest; the dtype
chosen is named."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.model import clip as clip_module
from indexer.model.lazy import LazyModel
from tests.conftest import SHAPES_MODEL, shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import run


def test_cpu_notice_names_the_model_once_and_only_for_a_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clip_module, "CPU_NOTICE", clip_module._Once())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = LazyModel(shapes_settings(tmp_path, model={"device": "auto"}).model)
    one = np.zeros((1, 3, 64, 64), np.uint8)
    with caplog.at_level(logging.WARNING, logger="indexer.model.clip"):
        model.encode_pixels(one)  # one query image: not worth a notice
        assert "no CUDA GPU" not in caplog.text
        model.encode_pixels(np.zeros((8, 3, 64, 64), np.uint8))
        model.encode_pixels(np.zeros((8, 3, 64, 64), np.uint8))
    notices = [r.getMessage() for r in caplog.records if "no CUDA GPU" in r.getMessage()]
    assert len(notices) == 1
    assert re.fullmatch(
        r"no CUDA GPU found: shapes-clip@sha256:\w{16} runs on the CPU \((fp32|bf16)\), about \d+ ms per image here",
        notices[0],
    )
    assert "ViT-L/14" not in caplog.text


def test_the_dtype_chosen_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="indexer.model.clip"):
        LazyModel(shapes_settings(tmp_path, model={"dtype": "auto"}).model).get().load("visual")
    assert "measured," not in caplog.text
    assert re.search(r"visual tower of shapes-clip@sha256:\w{16} loaded in [\d.]+ s \((fp32|bf16)\)", caplog.text)
    assert re.search(r"model shapes-clip@sha256:\w{16} on cpu \((fp32|bf16)", caplog.text)  # or "fp32 or bf16: …"


def test_cli_notice_for_index_not_for_search(tmp_path: Path) -> None:
    """Through the console script with model.device = auto on this GPU-less machine."""
    folder, store = tmp_path / "shapes", tmp_path / "store"
    write_dataset(folder, 10, seed=2)
    index = run("index", str(folder), "--store", str(store), "--model", str(SHAPES_MODEL), "--workers", "1")
    assert index.stderr.count("no CUDA GPU found: shapes-clip@sha256:") == 1
    search = run("search", "a red circle", "--store", str(store), "--model", str(SHAPES_MODEL))
    assert "no CUDA GPU" not in search.stderr and "ViT-L/14" not in search.stderr
