"""Hugging Face *transformers* CLIP checkpoints (``CLIPModel``, as NeMo Curator's stage keeps them) read as open_clip.

A transformers CLIP directory holds ``config.json`` (``model_type: clip``), ``model.safetensors`` (or
``pytorch_model.bin``), ``preprocessor_config.json`` and tokenizer files. Its architecture is OpenAI's CLIP, the same
network open_clip builds as ``CLIP(..., quick_gelu=True)``: this module derives the open_clip config from
``config.json`` and maps the state dict key by key, in memory (q/k/v projections concatenated into ``in_proj``,
projections transposed); nothing is written to disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# open_clip architecture + tag → the transformers repo holding the same OpenAI weights.
TRANSFORMERS_REPOS = {
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-L-14-336", "openai"): "openai/clip-vit-large-patch14-336",
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
}
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def is_transformers_dir(folder: Path) -> bool:
    """A folder with a transformers CLIP ``config.json`` (vision and text configs) and a weights file."""
    cfg = folder / "config.json"
    if not cfg.is_file() or not any((folder / f).is_file() for f in TRANSFORMERS_WEIGHT_FILES):
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "vision_config" in raw and "text_config" in raw


def weights_file(folder: Path) -> Path:
    for name in TRANSFORMERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError("model.dir", f"{folder} has no {' or '.join(TRANSFORMERS_WEIGHT_FILES)}")


def open_clip_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.json`` + ``preprocessor_config.json`` → (open_clip model config, open_clip preprocess config)."""
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
        vision, text = raw["vision_config"], raw["text_config"]
        act = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
        if not act <= {"quick_gelu", "gelu"} or len(act) != 1:
            raise ConfigError("model.dir", f"{cfg_file}: unsupported hidden_act {sorted(act)}")
        for part in (vision, text):
            if float(part.get("layer_norm_eps", 1e-5)) != 1e-5:
                raise ConfigError("model.dir", f"{cfg_file}: layer_norm_eps {part['layer_norm_eps']} (open_clip: 1e-5)")
        config: dict[str, Any] = {
            "embed_dim": int(raw.get("projection_dim", 512)),
            "quick_gelu": act == {"quick_gelu"},
            "vision_cfg": {
                "image_size": int(vision.get("image_size", 224)),
                "layers": int(vision["num_hidden_layers"]),
                "width": int(vision["hidden_size"]),
                "head_width": int(vision["hidden_size"]) // int(vision["num_attention_heads"]),
                "mlp_ratio": int(vision["intermediate_size"]) / int(vision["hidden_size"]),
                "patch_size": int(vision["patch_size"]),
            },
            "text_cfg": {
                "context_length": int(text.get("max_position_embeddings", 77)),
                "vocab_size": int(text.get("vocab_size", 49408)),
                "width": int(text["hidden_size"]),
                "heads": int(text["num_attention_heads"]),
                "layers": int(text["num_hidden_layers"]),
                "mlp_ratio": int(text["intermediate_size"]) / int(text["hidden_size"]),
            },
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("model.dir", f"{cfg_file} is not a transformers CLIP config: {exc!r}") from None
    return config, _preprocess(folder / "preprocessor_config.json", config["vision_cfg"]["image_size"])


def _preprocess(path: Path, image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor's settings as open_clip preprocess settings (with transformers' centre-crop rounding)."""
    if not path.is_file():
        return {"crop_rounding": "floor"}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("model.dir", f"cannot read {path}: {exc}") from None
    crop = raw.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    size = raw.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    if int(crop) != image_size or int(size) != image_size:
        raise ConfigError("model.dir", f"{path}: resize {size} / crop {crop} differ from the model's {image_size}")
    out: dict[str, Any] = {"crop_rounding": "floor"}
    if "image_mean" in raw:
        out["mean"] = tuple(float(v) for v in raw["image_mean"])
    if "image_std" in raw:
        out["std"] = tuple(float(v) for v in raw["image_std"])
    resample = raw.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ConfigError("model.dir", f"{path}: unsupported resample {resample}")
    out["interpolation"] = _RESAMPLE[resample]
    return out


def _layer_target(rest: str, prefix: str) -> str | None:
    """``encoder.layers.3.mlp.fc1.weight`` → ``{prefix}transformer.resblocks.3.mlp.c_fc.weight``."""
    parts = rest.split(".")
    if len(parts) < 5 or parts[:2] != ["encoder", "layers"]:
        return None
    index, inner, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
    if inner in _LAYER_PARTS:
        return f"{prefix}transformer.resblocks.{index}.{_LAYER_PARTS[inner]}.{leaf}"
    return None


_SIMPLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def key_plan(hf_keys: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """open_clip key → the transformers keys it is made of (three for a q/k/v ``in_proj``), and the keys that fit
    nowhere. Pure key arithmetic: no tensor is read."""
    plan: dict[str, tuple[str, ...]] = {}
    unexpected: list[str] = []
    for key in hf_keys:
        if key in _IGNORED:
            continue
        if key in _SIMPLE:
            plan[_SIMPLE[key]] = (key,)
            continue
        if key in _TRANSPOSED:
            plan[_TRANSPOSED[key]] = (key,)
            continue
        tower, _, rest = key.partition(".")
        prefix = {"vision_model": "visual.", "text_model": ""}.get(tower)
        target = _layer_target(rest, prefix) if prefix is not None else None
        if target is not None:
            plan[target] = (key,)
            continue
        qkv = _qkv_target(rest, prefix) if prefix is not None else None
        if qkv is None:
            unexpected.append(key)
            continue
        name, leaf = qkv
        base = key.rsplit(".", 2)[0]
        plan[name] = tuple(f"{base}.{p}_proj.{leaf}" for p in ("q", "k", "v"))
    return plan, unexpected


def _qkv_target(rest: str, prefix: str) -> tuple[str, str] | None:
    parts = rest.split(".")
    if len(parts) != 6 or parts[:2] != ["encoder", "layers"] or parts[3] != "self_attn":
        return None
    if parts[4] not in ("q_proj", "k_proj", "v_proj") or parts[5] not in ("weight", "bias"):
        return None
    return f"{prefix}transformer.resblocks.{parts[2]}.attn.in_proj_{parts[5]}", parts[5]


def check_plan(
    plan: dict[str, tuple[str, ...]], unexpected: list[str], hf_keys: set[str], model_keys: set[str], source: Path
) -> None:
    """Every open_clip key comes from existing transformers keys, and nothing is left over; else a ModelError
    naming the missing and unexpected keys (a few of each)."""
    missing = sorted(
        k if k not in plan else f"{k} (from {', '.join(sorted(set(plan[k]) - hf_keys))})"
        for k in model_keys
        if k not in plan or not set(plan[k]) <= hf_keys
    )
    extra = sorted(unexpected + [k for k in plan if k not in model_keys])
    if missing or extra:
        raise ModelError(
            f"{source} does not fit the model built from its config.json: "
            f"missing keys {_few(missing)}; unexpected keys {_few(extra)}"
        )


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:8])
    return f"{shown} (and {len(keys) - 8} more)" if len(keys) > 8 else shown


def convert(
    plan: dict[str, tuple[str, ...]], wanted: Iterable[str], read: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The open_clip tensors for ``wanted`` keys, reading each transformers tensor with ``read`` (memory-mapped)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        sources = plan[key]
        if len(sources) == 3:
            out[key] = torch.cat([read(k) for k in sources], dim=0)
        elif key in ("visual.proj", "text_projection"):
            out[key] = read(sources[0]).t()
        else:
            out[key] = read(sources[0])
    return out
