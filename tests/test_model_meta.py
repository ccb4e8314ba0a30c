"""Loading with weights never initialises at random, and an image-only run never materialises the text tower; the
vectors equal the classic path (random init, then ``load_state_dict``) bit for bit or to 1e-6, by every route."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from indexer.model.clip import ClipModel, load_model
from indexer.model.lazy import LazyModel
from indexer.settings import ModelSettings
from tests.conftest import SHAPES_MODEL
from tests.support.hfmodels import TINY, make_clip_dir

INITS = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_", "constant_")


def _count_real_inits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Calls of torch.nn.init functions on tensors that are not on the meta device (a real random init)."""
    calls: list[str] = []
    for name in INITS:
        real = getattr(torch.nn.init, name)

        def counting(tensor: torch.Tensor, *args: Any, _real: Callable[..., Any] = real, _name: str = name,
                     **kwargs: Any) -> Any:  # fmt: skip
            if not tensor.is_meta:
                calls.append(_name)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counting)
    return calls


def _routes(tmp_path: Path) -> dict[str, ModelSettings]:
    """The three routes: an open_clip config JSON beside its weights, --weights FILE, a transformers directory."""
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes((SHAPES_MODEL.parent / "weights.safetensors").read_bytes())
    make_clip_dir(tmp_path / "hf", TINY)
    return {
        "config": ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="fp32"),
        "weights": ModelSettings(name=str(SHAPES_MODEL), weights=str(copy), device="cpu", dtype="fp32"),
        "transformers": ModelSettings(dir=str(tmp_path / "hf"), device="cpu", dtype="fp32"),
    }


def test_no_random_init_and_no_text_tower_for_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    routes = _routes(tmp_path)
    calls = _count_real_inits(monkeypatch)
    for route, settings in routes.items():
        model = LazyModel(settings)
        model.start("visual")  # what index and embed do
        clip = model.get()
        size = clip.preprocess.image_size
        clip.encode_pixels(np.zeros((2, 3, size, size), np.uint8))
        text = {n: p for n, p in clip.net.named_parameters() if not n.startswith("visual.")}
        assert text and all(p.is_meta for p in text.values()), route  # never materialised, never read
        assert not any(p.is_meta for n, p in clip.net.visual.named_parameters()), route
        assert calls == [], (route, sorted(set(calls)))
        clip.encode_texts(["a red circle"])  # a later query loads the text tower, still without random init
        assert not any(p.is_meta for p in clip.net.parameters()) and calls == [], route


def _classic(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """Today's reference: open_clip's CLIP initialised at random on the CPU, then the state dict loaded."""
    import open_clip

    torch.manual_seed(1)
    net = open_clip.CLIP(**config).eval()
    net.load_state_dict(state)
    return net


def _compare(clip: ClipModel, ref: Any, tol: float) -> None:
    size = clip.preprocess.image_size
    pixels = np.random.default_rng(0).integers(0, 255, (2, 3, size, size), dtype=np.uint8)
    x = (torch.from_numpy(pixels).float() / 255 - clip._mean) / clip._std
    texts = ["a red circle", "two blue squares on a green field"]
    with torch.inference_mode():
        want = torch.nn.functional.normalize(ref.encode_image(x), dim=-1).numpy()
        want_t = torch.nn.functional.normalize(ref.encode_text(clip._tokenizer(texts)), dim=-1).numpy()
    assert np.abs(clip.encode_pixels(pixels) - want).max() <= tol
    assert np.abs(clip.encode_texts(texts) - want_t).max() <= tol


def test_test_model_vectors_equal_the_classic_path() -> None:
    clip = load_model(ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="fp32"))
    ref = _classic(dict(clip.source.config), load_file(str(SHAPES_MODEL.parent / "weights.safetensors")))
    _compare(clip, ref, 1e-6)


@pytest.mark.slow
def test_full_size_vit_l14_from_a_saved_state_dict_equals_the_classic_path(tmp_path: Path) -> None:
    """A randomly initialised ViT-L/14 (QuickGELU, as OpenAI's) saved and loaded through --weights: 1.7 GB, ~1 min."""
    import open_clip

    torch.manual_seed(0)
    net = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "vit-l-14.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    clip = load_model(ModelSettings(name="ViT-L-14", weights=str(path), device="cpu", dtype="fp32", batch_size=2))
    _compare(clip, net, 1e-6)
