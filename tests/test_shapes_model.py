"""The shipped tiny shapes CLIP model loads like an open_clip model and retrieves by meaning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.check_shapes_clip import (
    CONFIG_NAME,
    MODEL_DIR,
    WEIGHTS_NAME,
    LoadedModel,
    encode_images,
    encode_texts,
    load_shapes_clip,
)
from tests.fixtures.shapes import CLASSES, caption, class_of, write_dataset

MAX_BYTES = 10 * 1024 * 1024
PER_CLASS = 2


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """The shipped model, loaded strictly from its folder."""
    return load_shapes_clip(MODEL_DIR)


@pytest.fixture()
def image_paths(tmp_path: Path) -> list[Path]:
    """Two fresh images of every class."""
    return write_dataset(tmp_path, PER_CLASS * len(CLASSES), seed=777)


def _top1_classes(loaded: LoadedModel, paths: list[Path], texts: list[str]) -> list[tuple[str, str]]:
    """Return, for each text, the class of the image it ranks first."""
    scores = encode_texts(loaded, texts) @ encode_images(loaded, paths).T
    return [class_of(paths[int(i)]) for i in torch.argmax(scores, dim=1)]


def test_shipped_files_are_small() -> None:
    total = (MODEL_DIR / CONFIG_NAME).stat().st_size + (MODEL_DIR / WEIGHTS_NAME).stat().st_size
    assert total <= MAX_BYTES


def test_red_circle_ranks_first(loaded: LoadedModel, image_paths: list[Path]) -> None:
    assert _top1_classes(loaded, image_paths, ["a red circle"]) == [("red", "circle")]


def test_every_caption_ranks_its_class_first(loaded: LoadedModel, image_paths: list[Path]) -> None:
    texts = [caption(*cls) for cls in CLASSES]
    assert _top1_classes(loaded, image_paths, texts) == CLASSES


def test_nearest_image_is_same_class(loaded: LoadedModel, image_paths: list[Path]) -> None:
    images = encode_images(loaded, image_paths)
    sims = (images @ images.T).fill_diagonal_(float("-inf"))
    nearest = torch.argmax(sims, dim=1).tolist()
    hits = [class_of(image_paths[i]) == class_of(image_paths[j]) for i, j in enumerate(nearest)]
    assert sum(hits) / len(hits) >= 0.9
