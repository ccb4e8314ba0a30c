"""Model: weight lookup, dtype choice, the EOT-truncated text tower, OOM halving — on real open_clip code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.errors import ConfigError, WeightsNotFoundError
from indexer.model.clip import (
    ClipModel,
    calibrate_cpu_dtype,
    choose_dtype,
    encode_text_until_eot,
    find_pretrained_weights,
    load_model,
    resolve_source,
)
from indexer.settings import ModelSettings
from tests.conftest import SHAPES_MODEL
from tests.fixtures.shapes import write_dataset

VIT_L_REPO = "timm/vit_large_patch14_clip_224.openai"


@pytest.fixture(scope="module")
def shapes_clip() -> ClipModel:
    return load_model(ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="fp32"))


TEXTS = ["a red circle", "a photo of a dog on the beach at sunset, with people in the background", "x"]


def test_text_truncation_identical_on_vit_l14_architecture() -> None:
    """The causal text tower pooled at EOT gives the same vector when cut after the EOT token (real ViT-L/14 code)."""
    import open_clip

    torch.manual_seed(0)
    net = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).eval()
    tokens = open_clip.get_tokenizer("ViT-L-14")(TEXTS)
    with torch.inference_mode():
        full = net.encode_text(tokens)
        cut = encode_text_until_eot(net, tokens)
    assert cut.shape == full.shape == (3, 768)
    assert torch.max(torch.abs(full - cut)).item() < 1e-4
    cos = torch.nn.functional.cosine_similarity(full, cut)
    assert torch.all(cos > 0.99999)


def test_text_truncation_identical_on_learned_model(shapes_clip: ClipModel) -> None:
    tokens = shapes_clip._tokenizer(TEXTS)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(shapes_clip.net.encode_text(tokens), dim=-1).numpy()
    assert np.abs(shapes_clip.encode_texts(TEXTS) - full).max() < 1e-5


def test_vectors_are_unit_length(shapes_clip: ClipModel, tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)
    pixels = np.resize(pixels, (3, 3, shapes_clip.preprocess.image_size, shapes_clip.preprocess.image_size))
    vectors = shapes_clip.encode_pixels(pixels)
    assert vectors.dtype == np.float32 and vectors.shape == (3, shapes_clip.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bf16_keeps_cosine_0999_against_fp32(shapes_clip: ClipModel, tmp_path: Path) -> None:
    """The CPU dtype rule: bf16 is only acceptable because its vectors stay within cosine 0.999 of fp32."""
    from indexer.decode.image import decode_file
    from indexer.records import Decoded, DecodeLimits

    files = write_dataset(tmp_path, 12, seed=3)
    decoded = [decode_file(f, shapes_clip.preprocess, DecodeLimits()) for f in files]
    pixels = np.stack([d.pixels for d in decoded if isinstance(d, Decoded)])
    bf16 = load_model(ModelSettings(name=str(SHAPES_MODEL), device="cpu", dtype="bf16"))
    assert bf16.dtype == torch.bfloat16
    a, b = shapes_clip.encode_pixels(pixels), bf16.encode_pixels(pixels)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    t32, t16 = shapes_clip.encode_texts(TEXTS), bf16.encode_texts(TEXTS)
    assert np.min(np.sum(t32 * t16, axis=1)) >= 0.999


def test_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert choose_dtype(cpu, "fp32") == torch.float32 and choose_dtype(cpu, "fp16") == torch.float16
    monkeypatch.setattr("indexer.model.clip.cpu_has_native_bf16", lambda: True)
    assert choose_dtype(cpu, "auto") is None  # measured: see the calibration tests
    monkeypatch.setattr("indexer.model.clip.cpu_has_native_bf16", lambda: False)
    assert choose_dtype(cpu, "auto") == torch.float32  # never fp16 on a CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype(torch.device("cuda"), "auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype(torch.device("cuda"), "auto") == torch.bfloat16


def test_cpu_dtype_calibration_picks_the_faster_dtype_and_remembers_it(
    shapes_clip: ClipModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer.model import clip as model_module

    real = model_module.forward_seconds
    calls: list[torch.dtype] = []

    def bf16_twice_as_fast(net: object, images: torch.Tensor) -> tuple[float, torch.Tensor]:
        _seconds, out = real(net, images)
        calls.append(images.dtype)
        return (0.1 if images.dtype == torch.bfloat16 else 0.2), out

    monkeypatch.setattr(model_module, "forward_seconds", bf16_twice_as_fast)
    cache = tmp_path / "dtype.json"
    assert calibrate_cpu_dtype(shapes_clip.net, "m1", cache) == torch.bfloat16
    assert calls == [torch.float32, torch.bfloat16] and "m1 | torch" in cache.read_text()
    assert calibrate_cpu_dtype(shapes_clip.net, "m1", cache) == torch.bfloat16  # remembered: no new timing
    assert len(calls) == 2
    monkeypatch.setattr(
        model_module, "forward_seconds", lambda n, i: (0.2 if i.dtype == torch.bfloat16 else 0.1, real(n, i)[1])
    )
    assert calibrate_cpu_dtype(shapes_clip.net, "m2", cache) == torch.float32
    assert next(shapes_clip.net.parameters()).dtype == torch.float32  # the model itself is left as it was


def test_cpu_dtype_calibration_refuses_bf16_that_changes_the_vectors(
    shapes_clip: ClipModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer.model import clip as model_module

    real = model_module.forward_seconds

    def fast_but_wrong(net: object, images: torch.Tensor) -> tuple[float, torch.Tensor]:
        _seconds, out = real(net, images)
        if images.dtype == torch.bfloat16:
            return 0.01, torch.flip(out, dims=[0])  # vectors of the wrong images
        return 1.0, out

    monkeypatch.setattr(model_module, "forward_seconds", fast_but_wrong)
    assert calibrate_cpu_dtype(shapes_clip.net, "m3", tmp_path / "d.json") == torch.float32


def test_cuda_oom_halves_the_batch_and_keeps_order(shapes_clip: ClipModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shapes_clip._forward_images
    seen: list[int] = []

    def fake_oom(pixels: np.ndarray) -> np.ndarray:
        seen.append(len(pixels))
        if len(pixels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels)

    size = shapes_clip.preprocess.image_size
    pixels = np.random.default_rng(1).integers(0, 255, (8, 3, size, size), dtype=np.uint8)
    expected = shapes_clip.encode_pixels(pixels)
    monkeypatch.setattr(shapes_clip, "_forward_images", fake_oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    shapes_clip.batch_size = 8
    got = shapes_clip.encode_pixels(pixels)
    assert shapes_clip.batch_size == 2 and seen[0] == 8
    assert np.allclose(got, expected, atol=1e-5)


def test_offline_without_weights_names_files_and_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    settings = ModelSettings(name="ViT-L-14", dir=str(tmp_path / "models"))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_source(settings)
    text = str(err.value)
    assert "open_clip_model.safetensors" in text and str(tmp_path / "models") in text
    assert VIT_L_REPO in text and "--model-dir" in text


def test_weights_found_in_model_dir(tmp_path: Path) -> None:
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"not really")
    source = resolve_source(ModelSettings(name="ViT-L-14", dir=str(tmp_path)))
    digest = hashlib.sha256(b"not really").hexdigest()[:16]
    assert source.weights == weights and source.model_id == f"ViT-L-14@sha256:{digest}"
    assert source.config["quick_gelu"] is True and source.config["embed_dim"] == 768
    assert tuple(source.preprocess["mean"]) == (0.48145466, 0.4578275, 0.40821073)


def test_weights_found_in_hf_cache_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real huggingface_hub cache lookup (offline) finds a snapshot laid out as the hub writes it."""
    hub = tmp_path / "hub"
    repo = hub / ("models--" + VIT_L_REPO.replace("/", "--"))
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    from open_clip import get_pretrained_cfg

    found = find_pretrained_weights("ViT-L-14", get_pretrained_cfg("ViT-L-14", "openai"), ModelSettings(dir=str(hub)))
    assert found.name == "open_clip_model.safetensors" and "abc123" in str(found)


def test_unknown_model_and_missing_weights_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_source(ModelSettings(name="ViT-Q-99"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(ModelSettings(name="ViT-B-32", weights=str(tmp_path / "none.safetensors")))
    with pytest.raises(ConfigError, match="not a known pretrained tag"):
        resolve_source(ModelSettings(name="ViT-B-32", pretrained="nonsense"))


def test_config_json_model_id_depends_on_weights(tmp_path: Path) -> None:
    source = resolve_source(ModelSettings(name=str(SHAPES_MODEL)))
    assert source.model_id.startswith("shapes-clip@sha256:") and source.weights is not None
    assert source.builtin_name is None
