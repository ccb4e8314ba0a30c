"""Start-up: what a command knows before torch is imported, the model loading on its own thread, the imports left
out, and the quick exit of the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from indexer.errors import ConfigError
from indexer.model.lazy import CPU_BATCH, GPU_BATCH, LazyModel, cuda_expected
from indexer.model.weights import builtin_config, config_cache_file
from indexer.settings import ModelSettings
from tests.conftest import SHAPES_MODEL

ROOT = Path(__file__).parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_a_remembered_config_needs_neither_torch_nor_open_clip() -> None:
    import open_clip

    config, pretrained = builtin_config("ViT-B-32", "openai")  # asks open_clip, remembers what it said
    assert config["quick_gelu"] is True and pretrained["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    done = _python(
        """
        import json, sys
        from indexer.model.lazy import LazyModel
        from indexer.model.weights import builtin_config
        config, pretrained = builtin_config("ViT-B-32", "openai")
        print(json.dumps({"config": config, "pretrained": pretrained,
                          "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}))
        """
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert not seen["torch"] and not seen["open_clip"]
    assert seen["config"] == config and seen["pretrained"] == pretrained


def test_the_remembered_config_is_what_is_used_and_only_for_its_open_clip() -> None:
    builtin_config("ViT-B-32", "")
    cache = config_cache_file()
    entries = json.loads(cache.read_text())
    (key,) = entries
    name, tag, size, mtime = key.split("|")
    assert (name, tag) == ("ViT-B-32", "")
    planted = {"config": {**entries[key]["config"], "embed_dim": 123}, "pretrained": {}}
    cache.write_text(json.dumps({key: planted}))
    assert builtin_config("ViT-B-32", "")[0]["embed_dim"] == 123  # read from the cache, not from open_clip
    cache.write_text(json.dumps({f"{name}|{tag}|{size}|{int(mtime) + 1}": planted}))  # another open_clip install
    assert builtin_config("ViT-B-32", "")[0]["embed_dim"] == 512


def test_unknown_names_and_tags_are_errors_and_not_remembered() -> None:
    with pytest.raises(ConfigError, match="unknown model 'ViT-Nope'"):
        builtin_config("ViT-Nope", "")
    with pytest.raises(ConfigError, match="'nope' is not a known pretrained tag for ViT-B-32"):
        builtin_config("ViT-B-32", "nope")
    assert not config_cache_file().exists()


@pytest.mark.parametrize("name", ["ViT-B-32", str(SHAPES_MODEL)])
def test_lazy_preprocess_is_the_loaded_models(name: str) -> None:
    model = LazyModel(ModelSettings(name=name, pretrained="none", device="cpu"))
    assert model.preprocess == model.get().preprocess


def test_start_loads_on_a_thread_and_get_waits_for_it() -> None:
    model = LazyModel(ModelSettings(name=str(SHAPES_MODEL), device="cpu"))
    model.start("visual")
    model.start("visual")  # already loading: nothing more
    loaders = [t for t in threading.enumerate() if t.name == "model-load"]
    clip = model.get()
    assert len(loaders) <= 1 and all(not t.is_alive() for t in loaders)
    assert "visual" in clip._loaded and model.get() is clip
    assert model.batch_size == clip.batch_size
    model.close()


def test_an_error_while_loading_in_the_background_is_raised_by_get(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    model = LazyModel(ModelSettings(name="ViT-B-32", weights=str(bad), device="cpu"))
    model.start("visual")
    with pytest.raises(ConfigError, match=r"bad\.safetensors: not a checkpoint"):
        model.get()


def test_batch_size_before_the_network_needs_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not cuda_expected("cpu") and cuda_expected("cuda:1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert not cuda_expected("auto")
    assert LazyModel(ModelSettings(name=str(SHAPES_MODEL), device="auto")).batch_size == CPU_BATCH
    assert LazyModel(ModelSettings(name=str(SHAPES_MODEL), device="cuda")).batch_size == GPU_BATCH
    assert LazyModel(ModelSettings(name=str(SHAPES_MODEL), device="cuda", batch_size=7)).batch_size == 7


def test_open_clip_is_imported_without_transformers_and_timm_unless_the_model_needs_them() -> None:
    done = _python(
        """
        import sys
        from indexer.model.lazy import LazyModel
        from indexer.model.weights import import_open_clip
        from indexer.settings import ModelSettings
        from indexer.model.weights import ModelSource
        model = LazyModel(ModelSettings(name="ViT-B-32", pretrained="none", device="cpu"))
        model.get().encode_pixels(__import__("numpy").zeros((1, 3, 224, 224), "uint8"))
        print("transformers" in sys.modules, "timm" in sys.modules)
        import timm  # importable again
        timm_cfg = {"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224"}, "text_cfg": {}}
        open_clip = import_open_clip(timm_cfg)
        print(open_clip.timm_model.timm is not None, open_clip.hf_model.transformers is None)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True", "True"]


def test_the_console_script_exits_quickly_with_its_output_whole(tmp_path: Path) -> None:
    marker = tmp_path / "atexit-ran"
    done = _python(
        f"""
        import atexit, pathlib
        from indexer.cli.main import quick_exit
        atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("yes"))
        print("x" * 300_000, end="")
        quick_exit(3)
        """
    )
    assert done.returncode == 3 and len(done.stdout) == 300_000 and marker.read_text() == "yes"


def test_quick_exit_waits_for_a_running_thread(tmp_path: Path) -> None:
    marker = tmp_path / "thread-finished"
    done = _python(
        f"""
        import pathlib, threading, time
        from indexer.cli.main import quick_exit
        def work():
            time.sleep(0.5)
            pathlib.Path({str(marker)!r}).write_text("done")
        threading.Thread(target=work).start()
        quick_exit(0)
        """
    )
    assert done.returncode == 0 and marker.read_text() == "done"


def test_embed_decodes_while_the_network_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_embed starts the decode workers before the model is built, and the vectors are those of a plain run."""
    import numpy as np
    from PIL import Image

    import indexer.model.clip
    from indexer.decode.pool import DecodePool
    from indexer.ingest.pipeline import run_embed
    from tests.conftest import shapes_settings

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (64 + 8 * i, 48), ((20 * i) % 256, 40, 200)).save(folder / f"{i:02d}.png")
    events: list[str] = []
    real_build, real_imap = indexer.model.clip.build_clip, DecodePool.imap

    def slow_build(*args: object, **kwargs: object) -> object:
        events.append("build started")
        time.sleep(1.0)  # a network that takes a while to import and load
        built = real_build(*args, **kwargs)  # type: ignore[arg-type]
        events.append("build done")
        return built

    def imap(self: DecodePool, paths: object) -> object:
        for i, result in enumerate(real_imap(self, paths)):  # type: ignore[arg-type]
            if i == 0:
                events.append("first file decoded")
            yield result

    settings = shapes_settings(tmp_path / "unused")
    monkeypatch.setattr(indexer.model.clip, "build_clip", slow_build)
    monkeypatch.setattr(DecodePool, "imap", imap)
    out = tmp_path / "out.npy"
    assert run_embed([folder], out, settings, LazyModel(settings.model)).indexed == 12
    assert events == ["build started", "first file decoded", "build done"], events  # overlapped
    monkeypatch.setattr(DecodePool, "imap", real_imap)
    plain = tmp_path / "plain.npy"
    model = LazyModel(settings.model)
    model.get()  # built first, the old order
    run_embed([folder], plain, settings, model)
    assert np.allclose(np.load(out), np.load(plain), atol=1e-6)
    assert out.with_name("out.paths.txt").read_text() == plain.with_name("plain.paths.txt").read_text()


def test_no_import_cycle_among_the_model_modules() -> None:
    """indexer.model's modules import each other one way only (model.py ↔ lazymodel.py was a cycle): every import of
    an ``indexer.model`` module, at any level of a function, counted."""
    import ast

    folder = Path(__file__).parent.parent / "indexer" / "model"
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[path.stem] = {n.split(".")[2] for n in names if n.startswith("indexer.model.")} - {path.stem}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m, {m})], graph
