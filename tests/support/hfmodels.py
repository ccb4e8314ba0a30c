"""Randomly initialised transformers CLIPModel directories in NeMo Curator's layout, and odd test images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = "openai/clip-vit-large-patch14"

TINY: dict[str, Any] = {
    "projection_dim": 32,
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 32,
    },
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}
# ViT-L/14's widths, heads and patch (clip-vit-large-patch14's config), at 2 layers per tower instead of 24 / 12.
VIT_L_SHALLOW: dict[str, Any] = {
    "projection_dim": 768,
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 2,
        "num_attention_heads": 16,
        "patch_size": 14,
    },
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2, "num_attention_heads": 12},
}
VIT_L_FULL: dict[str, Any] = {
    "projection_dim": 768,
    "vision_config": {**VIT_L_SHALLOW["vision_config"], "num_hidden_layers": 24},
    "text_config": {**VIT_L_SHALLOW["text_config"], "num_hidden_layers": 12},
}


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt equal to OpenAI's BPE (built from open_clip's copy of it), and CLIPTokenizer's files."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenAI's spelling
    vocab = {names.get(k, k): v for k, v in simple.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(folder)


def make_clip_dir(model_dir: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """MODEL_DIR/openai/clip-vit-large-patch14/ holding a random CLIPModel saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = model_dir / REPO
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=shape["text_config"], vision_config=shape["vision_config"], projection_dim=shape["projection_dim"]
    )
    CLIPModel(config).eval().save_pretrained(folder)  # type: ignore[no-untyped-call]
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, edges, texture and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = (float(v) for v in rng.uniform(0.5, 6, 2))
        phase = float(rng.uniform(0, 6.3))
        img[..., c] = 127 + 90 * np.sin(xx / width * fx * 6.28 + phase) * np.cos(yy / height * fy * 6.28)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def odd_images(folder: Path) -> dict[str, Path]:
    """Photos and odd files: large JPEG, greyscale, EXIF-rotated, non-square PNG, small JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    out["large.jpg"] = folder / "large.jpg"
    photo(4000, 3000, 1).save(out["large.jpg"], quality=92)
    out["photo.jpg"] = folder / "photo.jpg"
    photo(640, 480, 2).save(out["photo.jpg"], quality=90)
    out["grey.jpg"] = folder / "grey.jpg"
    photo(800, 600, 3).convert("L").save(out["grey.jpg"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out["rotated.jpg"] = folder / "rotated.jpg"
    photo(1200, 900, 4).save(out["rotated.jpg"], quality=90, exif=exif)
    out["wide.png"] = folder / "wide.png"
    photo(900, 301, 5).save(out["wide.png"])
    out["tall.jpg"] = folder / "tall.jpg"
    photo(333, 1001, 6).save(out["tall.jpg"], quality=90)
    return out
