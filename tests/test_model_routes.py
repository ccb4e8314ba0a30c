"""Every weights route builds OpenAI's architecture (QuickGELU) and gives the same model identity for the same bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.model.clip import build_network, load_model, resolve_source
from indexer.model.weights import hash_cache_file, weights_sha256
from indexer.settings import ModelSettings
from tests.conftest import SHAPES_MODEL
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import run, run_json

VIT_L_REPO = "timm/vit_large_patch14_clip_224.openai"


def _activations(net: torch.nn.Module) -> set[str]:
    return {type(getattr(block.mlp, "gelu")).__name__ for block in net.modules() if hasattr(block, "mlp")}  # noqa: B009


def _hub(tmp_path: Path, repo: str, filename: str, data: bytes) -> Path:
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("rev1")
    return tmp_path / "hub"


def test_default_model_is_quick_gelu_by_every_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights FILE, the model dir and the HF cache all build ViT-L/14 with QuickGELU (OpenAI's activation)."""
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"placeholder: the network is built on the meta device, never loaded here")
    hub = _hub(tmp_path, VIT_L_REPO, "open_clip_model.safetensors", weights.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    routes = {
        "--weights": ModelSettings(weights=str(weights)),
        "--model-dir": ModelSettings(dir=str(tmp_path)),
        "HF cache": ModelSettings(),
    }
    ids = set()
    for route, settings in routes.items():
        source = resolve_source(settings)
        assert source.config["quick_gelu"] is True, route
        assert _activations(build_network(source)) == {"QuickGELU"}, route
        ids.add(source.model_id)
    assert len(ids) == 1  # same bytes, same model
    # a tag without QuickGELU keeps GELU: the activation follows the pretrained config, not a blanket rule
    other = resolve_source(ModelSettings(name="ViT-B-32", pretrained="laion2b_s34b_b79k", weights=str(weights)))
    assert _activations(build_network(other)) == {"GELU"}


def test_weights_file_vectors_equal_open_clips_quick_gelu_model(tmp_path: Path) -> None:
    """ViT-B-32 (tag openai) from --weights equals open_clip's own QuickGELU model with the same weights, and not
    the GELU one: the check fails if the activation is wrong."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    gelu = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    gelu.load_state_dict(ref.state_dict())
    clip = load_model(ModelSettings(name="ViT-B-32", weights=str(path), device="cpu", dtype="fp32"))
    pixels = np.random.default_rng(0).integers(0, 255, (2, 3, 224, 224), dtype=np.uint8)
    got = clip.encode_pixels(pixels)
    x = (torch.from_numpy(pixels).float() / 255 - clip._mean) / clip._std
    with torch.inference_mode():
        want = torch.nn.functional.normalize(ref.encode_image(x), dim=-1).numpy()
        wrong = torch.nn.functional.normalize(gelu.encode_image(x), dim=-1).numpy()
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - wrong).max() > 10 * np.abs(got - want).max()
    texts = ["a dog", "a red car at night"]
    with torch.inference_mode():
        want_t = torch.nn.functional.normalize(ref.encode_text(clip._tokenizer(texts)), dim=-1).numpy()
    assert np.abs(clip.encode_texts(texts) - want_t).max() < 1e-5


def test_weights_hash_is_computed_once_and_remembered(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    cache = tmp_path / "hashes.json"
    real = weights_sha256(path, cache)
    assert real == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # the remembered value is used while (path, size, mtime) are unchanged: prove it by planting another one
    import json

    entries = json.loads(cache.read_text())
    entries[str(path.resolve())]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert weights_sha256(path, cache) == "0" * 64
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert weights_sha256(path, cache) == real  # changed mtime: hashed again
    assert hash_cache_file().name == "weights-sha256.json"


def test_index_with_one_route_search_with_another_through_the_cli(tmp_path: Path) -> None:
    """Same bytes by another route (a copy passed as --weights) search the same store; other bytes are refused."""
    folder, store = tmp_path / "shapes", tmp_path / "store"
    write_dataset(folder, 12, seed=5)
    model = ["--model", str(SHAPES_MODEL), "--device", "cpu"]
    assert run_json("index", str(folder), "--store", str(store), *model)["indexed"] == 12
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    shutil.copy(SHAPES_MODEL.parent / "weights.safetensors", copy)
    hits = run_json("search", "a red circle", "--store", str(store), *model, "--weights", str(copy))
    assert hits and Path(hits[0]["path"]).name.startswith("red-circle")
    changed = bytearray(copy.read_bytes())
    changed[-1] ^= 1
    copy.write_bytes(bytes(changed))
    proc = run("search", "a red circle", "--store", str(store), *model, "--weights", str(copy), check=None)
    assert proc.returncode != 0 and "model" in proc.stderr.lower()
