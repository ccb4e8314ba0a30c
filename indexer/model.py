"""The CLIP model behind a narrow interface: load once, ``encode_pixels`` and ``encode_texts``.

The default is OpenAI's ViT-L/14 through open_clip, built exactly as OpenAI's model (QuickGELU, bicubic resize of
the shortest side + centre crop, OpenAI's mean/std), so the vectors are the reference ones: 768-dim, L2-normalised.
Any open_clip architecture runs through the same code, by name or from an open_clip model-config JSON file.

Weights are looked up, in order: ``--weights FILE``; the model directory (``model.dir``, the seed's ``model_dir``);
the Hugging Face cache (``HF_HOME``, or ``model.dir`` used as the cache directory); and, when the machine is online and
``model.allow_download`` is set, downloaded into that cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from indexer.errors import ConfigError, ModelError, WeightsNotFoundError
from indexer.records import PreprocessSpec
from indexer.settings import ModelSettings

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CPU_BATCH = 32
GPU_BATCH = 256


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What to build: an open_clip config and the weights file to load into it (None: random init)."""

    model_id: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    weights: Path | None
    builtin_name: str | None


class ClipModel:
    """A loaded CLIP model on one device. Not thread-safe: one caller at a time."""

    def __init__(self, net: Any, source: ModelSource, device: torch.device, dtype: torch.dtype, batch: int):
        self.net = net
        self.model_id = source.model_id
        self.device = device
        self.dtype = dtype
        self.batch_size = batch
        self.preprocess = _preprocess_spec(source.preprocess, net)
        self.dim = int(source.config["embed_dim"])
        self._tokenizer = _tokenizer(source)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(shape)
        self._std = torch.tensor(self.preprocess.std, device=device).view(shape)

    @torch.inference_mode()
    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """uint8 images (N, 3, S, S) from the decode stage → L2-normalised float32 vectors (N, dim).

        A CUDA out-of-memory error halves the batch size (kept for later calls) and retries the same images.
        """
        out: list[npt.NDArray[np.float32]] = []
        start = 0
        while start < len(pixels):
            size = self.batch_size
            try:
                out.append(self._forward_images(pixels[start : start + size]))
            except torch.cuda.OutOfMemoryError:
                self._halve_batch(size)
                continue
            start += size
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _halve_batch(self, size: int) -> None:
        if size <= 1:
            raise ModelError("CUDA out of memory even at batch size 1") from None
        torch.cuda.empty_cache()
        self.batch_size = max(1, size // 2)
        log.warning("CUDA out of memory: batch size halved to %d", self.batch_size)

    def _forward_images(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        x = ((x.float() / 255.0 - self._mean) / self._std).to(self.dtype)
        features = self.net.encode_image(x)
        return _normalise(features)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Texts → L2-normalised float32 vectors (N, dim), running the text tower only up to end-of-text."""
        tokens = self._tokenizer(list(texts)).to(self.device)
        return _normalise(encode_text_until_eot(self.net, tokens))

    def close(self) -> None:
        """Release the weights (and GPU memory)."""
        self.net = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _normalise(features: torch.Tensor) -> npt.NDArray[np.float32]:
    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def encode_text_until_eot(net: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text``, run only up to the longest end-of-text token of the batch.

    The text transformer is causal and pooled at the end-of-text token (the highest token id, hence ``argmax``), so
    positions after it cannot change the pooled vector: cutting them gives the identical result, 2-3x faster for a
    short query. Models without that structure (custom text towers, non-causal masks) take the full path.
    """
    if getattr(net, "text_pool_type", None) != "argmax" or getattr(net, "attn_mask", None) is None:
        full: torch.Tensor = net.encode_text(tokens)
        return full
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    cast = net.transformer.get_cast_dtype()
    x = net.token_embedding(tokens).to(cast) + net.positional_embedding[:n].to(cast)
    x = net.transformer(x, attn_mask=net.attn_mask[:n, :n])
    x = net.ln_final(x)
    pooled: torch.Tensor = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if isinstance(net.text_projection, torch.nn.Linear):
        projected: torch.Tensor = net.text_projection(pooled)
        return projected
    return pooled @ net.text_projection if net.text_projection is not None else pooled


# --- loading ---------------------------------------------------------------------------------------------------


class LazyModel:
    """The model's identity now (weights found, id and dimension known), the network only when first needed.

    A re-run that finds nothing new never pays for building ViT-L/14.
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.source = resolve_source(settings)
        self._model: ClipModel | None = None

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def dim(self) -> int:
        return int(self.source.config["embed_dim"])

    @property
    def batch_size(self) -> int:
        if self._model is not None:
            return self._model.batch_size
        device = self.settings.device
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return self.settings.batch_size or (GPU_BATCH if cuda else CPU_BATCH)

    def get(self) -> ClipModel:
        if self._model is None:
            self._model = _load(self.source, self.settings)
        return self._model

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None


def load_model(settings: ModelSettings) -> ClipModel:
    """Resolve weights, build the network, move it to the device in the chosen dtype."""
    return _load(resolve_source(settings), settings)


def _load(source: ModelSource, settings: ModelSettings) -> ClipModel:
    device = resolve_device(settings.device)
    chosen = choose_dtype(device, settings.dtype)
    net = _build(source, device, chosen or torch.float32)
    dtype = chosen or calibrate_cpu_dtype(net, source.model_id)
    if dtype != torch.float32 and chosen is None:
        net = net.to(dtype)
    batch = settings.batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    if settings.compile:  # the first batch of each size compiles (seconds to a minute); later ones run faster
        net.visual = torch.compile(net.visual, dynamic=False)
    log.info("model %s on %s (%s), batch %d", source.model_id, device, str(dtype).removeprefix("torch."), batch)
    return ClipModel(net, source, device, dtype, batch)


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU (with a notice: the seed requires a GPU; we also run without)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA GPU found: running on the CPU (ViT-L/14 takes about 0.7 s per image on 2 cores)")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{requested} requested but no CUDA GPU is available")
    return torch.device(requested)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_dtype(device: torch.device, requested: str) -> torch.dtype | None:
    """GPU: bf16 where supported, else fp16. CPU: fp32, or None — "measure it" — where the CPU has native bf16.

    fp16 on a CPU is emulated and slow, so ``auto`` never picks it there. Whether bf16 beats fp32 on a CPU depends
    on the CPU *and* the torch build (on one 2-core AVX512-BF16 Xeon bf16 ran 2x faster with one build and 1.5x
    slower with another), so it is measured once per model, torch and CPU: see :func:`calibrate_cpu_dtype`.
    """
    if requested in DTYPES:
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if cpu_has_native_bf16() else torch.float32


def calibrate_cpu_dtype(net: Any, model_id: str, cache: Path | None = None) -> torch.dtype:
    """The faster of fp32 and bf16 for ``net`` on this CPU, among those whose image vectors keep cosine ≥ 0.999
    to fp32. Measured once (a warm-up and a timed forward of two images each) and remembered in ``cache``."""
    cache = cache or dtype_cache_file()
    key = f"{model_id} | torch {torch.__version__} | {cpu_name()} | {torch.get_num_threads()} threads"
    remembered = _read_json(cache).get(key)
    if remembered in DTYPES:
        return DTYPES[remembered]
    size = _image_size(net)
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 4 - 2
    fp32_s, fp32_v = forward_seconds(net, probe)
    low = copy.deepcopy(net).to(torch.bfloat16)
    bf16_s, bf16_v = forward_seconds(low, probe.to(torch.bfloat16))
    del low
    cosine = float(F.cosine_similarity(fp32_v.float(), bf16_v.float()).min())
    name = "bf16" if cosine >= 0.999 and bf16_s < 0.9 * fp32_s else "fp32"
    log.info(
        "CPU dtype for %s: fp32 %.0f ms, bf16 %.0f ms per image (cosine %.5f) → %s (remembered in %s)",
        model_id,
        fp32_s * 500,
        bf16_s * 500,
        cosine,
        name,
        cache,
    )
    _write_json(cache, {**_read_json(cache), key: name})
    return DTYPES[name]


@torch.inference_mode()
def forward_seconds(net: Any, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds for one forward pass of the image tower after a warm-up pass, and its output."""
    net.encode_image(images)
    start = time.perf_counter()
    out: torch.Tensor = net.encode_image(images)
    return time.perf_counter() - start, out


def _image_size(net: Any) -> int:
    size = net.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def dtype_cache_file() -> Path:
    """``$XDG_CACHE_HOME/indexer/cpu-dtype.json`` (``~/.cache/indexer/cpu-dtype.json`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "indexer" / "cpu-dtype.json"


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.machine()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Best effort (a read-only home just means measuring again next time), atomic."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_source(settings: ModelSettings) -> ModelSource:
    """Turn ``model.name`` / ``model.weights`` / ``model.dir`` into a config and a weights file."""
    name = settings.name
    if name.endswith(".json"):
        return _source_from_config_file(Path(name), settings)
    import open_clip

    config = open_clip.get_model_config(name)
    if config is None:
        raise ConfigError("model.name", f"unknown model {name!r}: not an open_clip architecture nor a .json file")
    if settings.weights:
        weights = _existing_file(settings.weights, "model.weights")
        return ModelSource(_custom_id(name, weights), config, {}, weights, name)
    tag = settings.pretrained
    if tag.lower() in ("", "none", "random"):
        log.warning("model %s with RANDOM weights: vectors carry no meaning (benchmarks only)", name)
        return ModelSource(f"{name}/random", config, {}, None, name)
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained_cfg:
        raise ConfigError("model.pretrained", f"{tag!r} is not a known pretrained tag for {name}")
    weights = find_pretrained_weights(name, pretrained_cfg, settings)
    config = {**config, "quick_gelu": bool(pretrained_cfg.get("quick_gelu", config.get("quick_gelu", False)))}
    return ModelSource(f"{name}/{tag}", config, pretrained_cfg, weights, name)


def _source_from_config_file(path: Path, settings: ModelSettings) -> ModelSource:
    cfg_file = _existing_file(str(path), "model.name")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("model.name", f"cannot read model config {cfg_file}: {exc}") from None
    config = raw.get("model_cfg", raw)  # accepts open_clip_config.json (HF) and plain model configs
    preprocess = raw.get("preprocess_cfg", {})
    config = {k: v for k, v in config.items() if k != "preprocess_cfg"}
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise ConfigError(
            "model.name", f"{cfg_file} is not an open_clip model config (embed_dim, vision_cfg, text_cfg)"
        )
    weights = _config_weights(cfg_file, settings)
    label = cfg_file.parent.name if cfg_file.stem in ("config", "open_clip_config") else cfg_file.stem
    return ModelSource(_custom_id(label, weights), config, preprocess, weights, None)


def _config_weights(cfg_file: Path, settings: ModelSettings) -> Path:
    if settings.weights:
        return _existing_file(settings.weights, "model.weights")
    for candidate in ("weights.safetensors", *HF_WEIGHT_FILES):
        if (cfg_file.parent / candidate).is_file():
            return cfg_file.parent / candidate
    raise ConfigError("model.weights", f"no weights given for {cfg_file} (pass --weights FILE)")


def _existing_file(value: str, setting: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(setting, f"file {path} does not exist")
    return path


def _custom_id(name: str, weights: Path) -> str:
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return f"{name}@sha256:{digest.hexdigest()[:16]}"


def find_pretrained_weights(name: str, pretrained_cfg: dict[str, Any], settings: ModelSettings) -> Path:
    """Model dir, then the Hugging Face cache, then a download when allowed; else WeightsNotFoundError."""
    repo = str(pretrained_cfg.get("hf_hub", "")).strip("/")
    model_dir = Path(settings.dir).expanduser() if settings.dir else None
    places: list[str] = []
    if model_dir is not None:
        for folder in (model_dir, model_dir / repo.split("/")[-1]):
            for filename in HF_WEIGHT_FILES:
                if (folder / filename).is_file():
                    return folder / filename
        places.append(str(model_dir))
    cache = str(model_dir) if model_dir is not None else None
    places.append(f"Hugging Face cache ({cache or _hf_cache_dir()}), repo {repo}")
    found = _hf_lookup(repo, cache, local_only=True)
    if found is None and settings.allow_download and not _offline():
        unreachable = _hub_unreachable()
        if unreachable:
            raise WeightsNotFoundError(name, list(HF_WEIGHT_FILES), places, cause=unreachable)
        try:
            found = _hf_lookup(repo, cache, local_only=False)
        except Exception as exc:  # network errors come in many types
            raise WeightsNotFoundError(name, list(HF_WEIGHT_FILES), places, cause=str(exc).splitlines()[0]) from None
    if found is None:
        raise WeightsNotFoundError(name, list(HF_WEIGHT_FILES), places)
    return found


def _hf_lookup(repo: str, cache_dir: str | None, local_only: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: Exception | None = None
    for filename in HF_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_only))
        except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
            last = exc
    if local_only or last is None:
        return None
    raise last


def _hf_cache_dir() -> str:
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return os.environ.get("HF_HUB_CACHE") or str(Path(home) / "hub")


def _hub_unreachable(timeout: float = 5.0) -> str:
    """A quick TCP probe of the hub, so an offline machine fails in seconds instead of a minute of retries."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"
    return ""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _build(source: ModelSource, device: torch.device, dtype: torch.dtype) -> Any:
    import open_clip

    weights = str(source.weights) if source.weights is not None else None
    try:
        if source.builtin_name is not None:
            quick_gelu = bool(source.config.get("quick_gelu", False))
            net = open_clip.create_model(source.builtin_name, pretrained=weights, force_quick_gelu=quick_gelu)
        else:
            net = open_clip.model.CLIP(**source.config)
            if weights is not None:
                open_clip.load_checkpoint(net, weights, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ModelError(f"cannot build model {source.model_id} from {source.weights}: {exc}") from None
    return net.to(device=device, dtype=dtype).eval()


def _preprocess_spec(pp: dict[str, Any], net: Any) -> PreprocessSpec:
    default = PreprocessSpec()
    return PreprocessSpec(
        image_size=_image_size(net),
        mean=tuple(pp.get("mean", default.mean)),  # type: ignore[arg-type]
        std=tuple(pp.get("std", default.std)),  # type: ignore[arg-type]
        interpolation=str(pp.get("interpolation", default.interpolation)),
        resize_mode=str(pp.get("resize_mode", default.resize_mode)),
    )


def _tokenizer(source: ModelSource) -> Any:
    import open_clip

    context = int(source.config["text_cfg"].get("context_length", 77))
    if source.builtin_name is not None:
        return open_clip.get_tokenizer(source.builtin_name, context_length=context)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)
