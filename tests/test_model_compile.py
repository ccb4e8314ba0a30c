"""`model.compile`: off by default; on, the image tower is wrapped by torch.compile (its speed is a GPU matter,
measured by bench/gpu_check.sh, not here)."""

from __future__ import annotations

from pathlib import Path

import torch

from indexer.model.lazy import LazyModel
from tests.conftest import shapes_settings


def test_compile_is_off_by_default_and_wraps_the_image_tower_when_on(tmp_path: Path) -> None:
    plain = LazyModel(shapes_settings(tmp_path / "s").model).get()
    plain.load("visual")
    assert not isinstance(plain.net.visual, torch._dynamo.eval_frame.OptimizedModule)
    settings = shapes_settings(tmp_path / "s", model={"compile": True})
    compiled = LazyModel(settings.model).get()
    compiled.load("visual")  # towers load on first use; the image tower is compiled once its weights are in
    assert isinstance(compiled.net.visual, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.net.visual._orig_mod is not None
