"""NeMo Curator's model directory (transformers CLIPModel) read as it is: parity with transformers itself.

The reference is what NeMo Curator's stage computes: ``CLIPImageProcessor`` (the PIL one, as transformers 4 ships it
and as ``CLIPImageProcessorPil`` in transformers 5) + ``CLIPModel.get_image_features``, fp32, L2-normalised; and
``CLIPTokenizer`` + ``get_text_features``. Random weights make every image look alike, so deviations are measured
relative to the smallest distance between the reference vectors of two different images (or texts).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from indexer.decode.image import decode_file
from indexer.errors import ModelError
from indexer.model.clip import ClipModel, load_model, resolve_source
from indexer.records import Decoded, DecodeLimits
from indexer.settings import ModelSettings
from tests.support.hfmodels import REPO, TINY, VIT_L_FULL, VIT_L_SHALLOW, make_clip_dir, odd_images

pytest.importorskip("transformers")

TEXTS = [
    "a photo of a dog on the beach at sunset",
    "A RED car, parked   outside!",
    "café crème — naïve façade",
    "x",
    "a diagram of the solar system with all eight planets labelled in small white letters on a black background",
]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return odd_images(tmp_path_factory.mktemp("odd-images"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("nemo-tiny")
    make_clip_dir(model_dir, TINY, seed=1)
    return model_dir


@pytest.fixture(scope="session")
def vit_l_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("nemo-vit-l")
    make_clip_dir(model_dir, VIT_L_SHALLOW, seed=2)
    return model_dir


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


@torch.inference_mode()
def reference_images(folder: Path, paths: list[Path], fast: bool = False) -> np.ndarray:
    """NeMo Curator's stage: the image as displayed (EXIF applied), RGB, CLIPImageProcessor, get_image_features."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()  # type: ignore[no-untyped-call]
    processor = (CLIPImageProcessor if fast else CLIPImageProcessorPil).from_pretrained(folder)
    out = []
    for path in paths:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        pixels = processor(images=rgb, return_tensors="pt")["pixel_values"]
        out.append(_unit(model.get_image_features(pixel_values=pixels).pooler_output)[0])
    return np.stack(out)


def ours(clip: ClipModel, paths: list[Path], full_resolution: bool) -> np.ndarray:
    decoded = [decode_file(p, clip.preprocess, DecodeLimits(full_resolution=full_resolution)) for p in paths]
    assert all(isinstance(d, Decoded) for d in decoded), decoded
    return clip.encode_pixels(np.stack([d.pixels for d in decoded if isinstance(d, Decoded)]))


def relative_deviation(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(largest |got - ref| / smallest distance between two different references, that smallest distance)."""
    dev = np.linalg.norm(got - ref, axis=1)
    pair = [np.linalg.norm(ref[i] - ref[j]) for i in range(len(ref)) for j in range(i + 1, len(ref))]
    return float(dev.max() / min(pair)), float(min(pair))


def _load(model_dir: Path, **extra: Any) -> ClipModel:
    return load_model(ModelSettings(dir=str(model_dir), device="cpu", dtype="fp32", **extra))


def test_model_dir_is_found_as_nemo_keeps_it(tiny_dir: Path) -> None:
    source = resolve_source(ModelSettings(dir=str(tiny_dir)))
    assert source.format == "transformers" and source.weights == tiny_dir / REPO / "model.safetensors"
    assert source.config["quick_gelu"] is True and source.config["embed_dim"] == 32
    assert source.preprocess["crop_rounding"] == "floor" and source.preprocess["interpolation"] == "bicubic"
    assert not list(tiny_dir.rglob("*open_clip*"))  # read as it is: no converted copy written


def _check_image_parity(model_dir: Path, images: dict[str, Path], draft_bound: float) -> dict[str, float]:
    paths = list(images.values())
    ref = reference_images(model_dir / REPO, paths)
    clip = _load(model_dir)
    full, sep = relative_deviation(ours(clip, paths, full_resolution=True), ref)
    draft, _ = relative_deviation(ours(clip, paths, full_resolution=False), ref)
    tv, _ = relative_deviation(reference_images(model_dir / REPO, paths, fast=True), ref)
    print(
        f"\nimage parity: full-resolution {full:.2e}, draft {draft:.2e}, transformers' torchvision processor "
        f"{tv:.2e} (relative to the nearest other image, distance {sep:.3f})"
    )
    assert full < 1e-3
    assert draft < draft_bound
    return {"full": full, "draft": draft, "sep": sep}


def test_image_vectors_equal_transformers_tiny(tiny_dir: Path, images: dict[str, Path]) -> None:
    _check_image_parity(tiny_dir, images, draft_bound=0.5)


def test_image_vectors_equal_transformers_vit_l_shaped(vit_l_dir: Path, images: dict[str, Path]) -> None:
    """ViT-L/14's widths, heads, patch 14 and projection (2 layers per tower): the full mapping at full size."""
    _check_image_parity(vit_l_dir, images, draft_bound=0.5)


@torch.inference_mode()
def _check_text_parity(model_dir: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    folder = model_dir / REPO
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).eval()  # type: ignore[no-untyped-call]
    batch = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = _unit(model.get_text_features(**batch).pooler_output)
    clip = _load(model_dir)
    tokens = clip._tokenizer(TEXTS)
    for row, hf in zip(tokens.tolist(), batch["input_ids"].tolist(), strict=True):
        end = row.index(49407) + 1
        assert row[:end] == hf[:end], (row[:end], hf[:end])  # identical ids up to end-of-text
    rel, sep = relative_deviation(clip.encode_texts(TEXTS), ref)
    print(f"\ntext parity: {rel:.2e} relative to the nearest other text (distance {sep:.3f})")
    assert rel < 1e-3


def test_text_vectors_and_token_ids_equal_transformers_tiny(tiny_dir: Path) -> None:
    _check_text_parity(tiny_dir)


def test_text_vectors_equal_transformers_vit_l_shaped(vit_l_dir: Path) -> None:
    _check_text_parity(vit_l_dir)


@pytest.mark.slow
def test_full_size_vit_l14_equals_transformers(tmp_path: Path, images: dict[str, Path]) -> None:
    """The real ViT-L/14 shape (24 + 12 layers, 1.7 GB fp32): slow, run with -m slow."""
    make_clip_dir(tmp_path, VIT_L_FULL, seed=3)
    source = resolve_source(ModelSettings(dir=str(tmp_path)))
    assert source.model_id.startswith("ViT-L-14@sha256:")  # recognised as ViT-L/14
    _check_image_parity(tmp_path, dict(list(images.items())[:3]), draft_bound=0.5)
    _check_text_parity(tmp_path)


def _hub_cache(hub: Path, folder: Path) -> None:
    """``folder`` laid out as huggingface_hub's cache of openai/clip-vit-large-patch14 (blobs named by sha256)."""
    import hashlib

    repo = hub / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / "32bd64288804d66eefd0ccbe215aa642df71cc41"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        os.symlink(os.path.relpath(repo / "blobs" / digest, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)


def test_hf_cache_holding_the_transformers_repo_is_the_same_model(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    _hub_cache(hub, tiny_dir / REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    cached = resolve_source(ModelSettings())
    direct = resolve_source(ModelSettings(dir=str(tiny_dir)))
    assert cached.format == "transformers" and "snapshots" in str(cached.weights)
    assert cached.model_id == direct.model_id  # same bytes, same model, whichever route
    a = load_model(ModelSettings(device="cpu", dtype="fp32")).encode_texts(TEXTS)
    b = _load(tiny_dir).encode_texts(TEXTS)
    assert np.abs(a - b).max() < 1e-6


def test_checkpoint_that_does_not_fit_names_the_keys(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / REPO
    shutil.copytree(tiny_dir / REPO, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    tensors["vision_model.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError) as err:
        _load(tmp_path)
    text = str(err.value)
    assert "missing keys visual.transformer.resblocks.1.attn.in_proj_weight" in text
    assert "vision_model.encoder.layers.1.self_attn.k_proj.weight" in text
    assert "unexpected keys vision_model.extra_head.weight" in text
    assert str(folder / "model.safetensors") in text
