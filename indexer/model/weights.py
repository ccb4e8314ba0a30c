"""Where the weights are, what they are, and the model's identity.

Weights are looked up, in order: ``--weights FILE``; the model directory (``model.dir``, NeMo Curator's
``model_dir``), in open_clip's format or in transformers' (``openai/clip-vit-large-patch14/`` as NeMo Curator keeps
it); the Hugging Face cache (open_clip's repo, then the transformers repo of the same OpenAI weights); and, when the
machine is online and ``model.allow_download`` is set, a download into that cache.

The identity stored with every vector is ``NAME@sha256:<16 hex>`` of the weights file, whichever way it came: the same
bytes by another route are the same model. The hash is computed once per file and remembered by (path, size, mtime)
in ``$XDG_CACHE_HOME/indexer/weights-sha256.json``; a Hugging Face cache blob is named by its sha256 already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.atomicio import read_json_cache, write_json_cache
from indexer.errors import ConfigError, WeightsNotFoundError
from indexer.model import hfclip as hfclip
from indexer.records import PreprocessSpec
from indexer.settings import ModelSettings, cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CPU_BATCH = 32  # images per forward pass when model.batch_size is 0
GPU_BATCH = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What to build: an open_clip config, the weights file (None: random init) and its format."""

    model_id: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    weights: Path | None
    builtin_name: str | None
    format: str = "open_clip"  # "open_clip" | "transformers"
    extra: dict[str, Any] = field(default_factory=dict)


def preprocess_spec(source: ModelSource) -> PreprocessSpec:
    """open_clip's eval transform for ``source``, as data: the image size of its vision config, the mean, std,
    interpolation, resize mode and crop rounding of its preprocessing config (open_clip's defaults where unset)."""
    default = PreprocessSpec()
    pp = source.preprocess
    size: Any = source.config.get("vision_cfg", {}).get("image_size", default.image_size)
    return PreprocessSpec(
        image_size=int(size[0] if isinstance(size, tuple | list) else size),
        mean=tuple(pp.get("mean", default.mean)),
        std=tuple(pp.get("std", default.std)),
        interpolation=str(pp.get("interpolation", default.interpolation)),
        resize_mode=str(pp.get("resize_mode", default.resize_mode)),
        crop_rounding=str(pp.get("crop_rounding", default.crop_rounding)),
    )


def resolve_source(settings: ModelSettings) -> ModelSource:
    """Turn ``model.name`` / ``model.pretrained`` / ``model.weights`` / ``model.dir`` into a ModelSource."""
    name = settings.name
    if name.endswith(".json"):
        return _source_from_config_file(Path(name), settings)
    tag = settings.pretrained
    random = tag.lower() in ("", "none", "random")
    config, pretrained_cfg = builtin_config(name, "" if random else tag)
    if settings.weights:
        weights = _existing_file(settings.weights, "model.weights")
        return ModelSource(model_id(name, weights), config, pretrained_cfg, weights, name)
    if random:
        log.warning("model %s with RANDOM weights: vectors carry no meaning (benchmarks only)", name)
        return ModelSource(f"{name}/random", config, {}, None, name)
    found = find_weights(name, tag, pretrained_cfg, settings)
    if found.format == "transformers":
        return _transformers_source(found.folder, name, config)
    return ModelSource(model_id(name, found.path), config, pretrained_cfg, found.path, name)


def builtin_config(name: str, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's model config for ``name`` (QuickGELU set as the pretrained ``tag`` says) and the tag's
    pretrained config (``{}`` for no tag).

    Remembered per open_clip install in ``$XDG_CACHE_HOME/indexer/open_clip-configs.json``: importing open_clip
    costs seconds (torch, torchvision, timm, transformers when installed), and a command that knows the model's
    geometry without it can start decoding images while the network is still being imported.
    """
    cache, key = config_cache_file(), _config_key(name, tag)
    remembered = read_json_cache(cache).get(key) if key else None
    if isinstance(remembered, dict) and {"config", "pretrained"} <= remembered.keys():
        return remembered["config"], remembered["pretrained"]
    open_clip = import_open_clip(packaged_config(name))
    config = open_clip.get_model_config(name)
    if config is None:
        raise ConfigError("model.name", f"unknown model {name!r}: not an open_clip architecture nor a .json file")
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if tag and not pretrained_cfg:
        raise ConfigError("model.pretrained", f"{tag!r} is not a known pretrained tag for {name}")
    # OpenAI's models use QuickGELU: the pretrained tag says so, whichever way the weights arrive.
    quick = bool(pretrained_cfg.get("quick_gelu", config.get("quick_gelu", False)))
    config = {**config, "quick_gelu": quick}
    try:  # what is remembered is what is returned: JSON's lists where open_clip has tuples, either way
        found = json.loads(json.dumps({"config": config, "pretrained": pretrained_cfg}))
    except (TypeError, ValueError):  # a value JSON cannot hold: use it as it is, remember nothing
        return config, pretrained_cfg
    if key:
        write_json_cache(cache, {**read_json_cache(cache), key: found})
    return found["config"], found["pretrained"]


def import_open_clip(config: dict[str, Any] | None) -> Any:
    """``import open_clip`` without the optional libraries the network of ``config`` does not use (None: unknown).

    open_clip imports transformers (1–1.8 s on the 2-core test machine, where it is installed) for its Hugging Face
    text towers and timm (0.5 s) for its timm image towers, whatever the model; OpenAI's CLIP and every other
    plain ViT/ResNet CLIP use neither. While open_clip is imported for such a model, those two are made
    unimportable (open_clip's own ``try: import ... except ImportError`` then leaves them out), and importable
    again right after. Should a later model in the same process need one, open_clip is imported afresh.
    """
    text, vision = (config or {}).get("text_cfg", {}), (config or {}).get("vision_cfg", {})
    needs = {
        "transformers": config is None or "hf_model_name" in text or "hf_tokenizer_name" in text,
        "timm": config is None or "timm_model_name" in vision,
    }
    loaded = sys.modules.get("open_clip")
    if loaded is not None:
        if not any(need and getattr(loaded, "_indexer_left_out", {}).get(name) for name, need in needs.items()):
            return loaded
        for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
            del sys.modules[name]
    left_out = {name: True for name, need in needs.items() if not need and name not in sys.modules}
    for name in left_out:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError meanwhile
    try:
        import open_clip
    finally:
        for name in left_out:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    open_clip._indexer_left_out = left_out
    return open_clip


def packaged_config(name: str) -> dict[str, Any] | None:
    """open_clip's own JSON for ``name``, read without importing open_clip (None where there is none)."""
    folder = _open_clip_folder()
    try:
        found = json.loads((folder / "model_configs" / f"{name}.json").read_text()) if folder else None
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _open_clip_folder() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def config_cache_file() -> Path:
    return cache_dir() / "open_clip-configs.json"


def _config_key(name: str, tag: str) -> str | None:
    """Which open_clip install the remembered configs came from: its pretrained table's path, size and mtime
    (found without importing open_clip), with the model and tag. None where open_clip is not installed."""
    folder = _open_clip_folder()
    try:
        st = (folder / "pretrained.py").stat() if folder else None
    except OSError:
        return None
    if st is None:
        return None
    return f"{name}|{tag}|{st.st_size}|{st.st_mtime_ns}"


@dataclass(frozen=True, slots=True)
class Found:
    path: Path
    format: str
    folder: Path


def find_weights(name: str, tag: str, pretrained_cfg: dict[str, Any], settings: ModelSettings) -> Found:
    """Model dir (both formats), then the Hugging Face cache (both repos), then a download when allowed."""
    repo = str(pretrained_cfg.get("hf_hub", "")).strip("/")
    hf_repo = hfclip.TRANSFORMERS_REPOS.get((name, tag))
    model_dir = Path(settings.dir).expanduser() if settings.dir else None
    places: list[str] = []
    if model_dir is not None:
        found = _in_model_dir(model_dir, repo, hf_repo)
        if found is not None:
            return found
        places.append(str(model_dir))
    cache = str(model_dir) if model_dir is not None else hf_cache_dir()
    expected = list(HF_WEIGHT_FILES) + ([f"{hf_repo}/{hfclip.TRANSFORMERS_WEIGHT_FILES[0]}"] if hf_repo else [])
    places.append(f"Hugging Face cache ({cache}), repo {repo or '-'}" + (f" or {hf_repo}" if hf_repo else ""))
    path = _hf_lookup(repo, HF_WEIGHT_FILES, cache, local_only=True) if repo else None
    if path is not None:
        return Found(path, "open_clip", path.parent)
    if hf_repo is not None:
        folder = _hf_transformers_snapshot(hf_repo, cache)
        if folder is not None:
            return Found(hfclip.weights_file(folder), "transformers", folder)
    if repo and settings.allow_download and not _offline():
        unreachable = _hub_unreachable()
        if unreachable:
            raise WeightsNotFoundError(name, expected, places, cause=unreachable)
        try:
            path = _hf_lookup(repo, HF_WEIGHT_FILES, cache, local_only=False)
        except Exception as exc:  # network errors come in many types
            raise WeightsNotFoundError(name, expected, places, cause=str(exc).splitlines()[0]) from None
        if path is not None:
            return Found(path, "open_clip", path.parent)
    raise WeightsNotFoundError(name, expected, places)


def find_pretrained_weights(name: str, pretrained_cfg: dict[str, Any], settings: ModelSettings) -> Path:
    """The weights file for an open_clip name + pretrained config (either format)."""
    return find_weights(name, settings.pretrained, pretrained_cfg, settings).path


def _in_model_dir(model_dir: Path, repo: str, hf_repo: str | None) -> Found | None:
    for folder in (model_dir, model_dir / repo.split("/")[-1]) if repo else (model_dir,):
        for filename in HF_WEIGHT_FILES:
            if (folder / filename).is_file():
                return Found(folder / filename, "open_clip", folder)
    folders = [model_dir]
    if hf_repo is not None:
        folders += [model_dir / hf_repo, model_dir / hf_repo.split("/")[-1]]
    for folder in folders:
        if hfclip.is_transformers_dir(folder):
            return Found(hfclip.weights_file(folder), "transformers", folder)
    return None


def _transformers_source(folder: Path, name: str, builtin: dict[str, Any]) -> ModelSource:
    config, preprocess = hfclip.open_clip_config(folder)
    weights = hfclip.weights_file(folder)
    same_arch = _arch(config) == _arch({**builtin, "quick_gelu": builtin.get("quick_gelu", False)})
    label = name if same_arch else _folder_label(folder)
    return ModelSource(model_id(label, weights), config, preprocess, weights, None, "transformers")


def _folder_label(folder: Path) -> str:
    """The repo's name for a hub snapshot (``models--openai--x/snapshots/REV`` → ``x``), else the folder's name."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name


def _arch(config: dict[str, Any]) -> tuple[Any, ...]:
    v, t = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return (
        config.get("embed_dim"),
        config.get("quick_gelu"),
        v.get("width"),
        v.get("layers"),
        v.get("patch_size"),
        v.get("image_size"),
        t.get("width"),
        t.get("layers"),
    )


def _source_from_config_file(path: Path, settings: ModelSettings) -> ModelSource:
    cfg_file = _existing_file(str(path), "model.name")
    if hfclip.is_transformers_dir(cfg_file.parent) and not settings.weights:
        return _transformers_source(cfg_file.parent, cfg_file.parent.name, {})
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
    return ModelSource(model_id(label, weights), config, preprocess, weights, None)


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


# --- identity --------------------------------------------------------------------------------------------------


def model_id(label: str, weights: Path) -> str:
    return f"{label}@sha256:{weights_sha256(weights)[:16]}"


def hash_cache_file() -> Path:
    return cache_dir() / "weights-sha256.json"


def weights_sha256(path: Path, cache: Path | None = None) -> str:
    """The file's sha256: its Hugging Face blob name, the remembered one for (path, size, mtime), or computed."""
    real = path.resolve()
    if _SHA256.fullmatch(real.name) and real.parent.name == "blobs":
        return real.name  # huggingface_hub names LFS blobs by their sha256
    st = real.stat()
    cache = cache or hash_cache_file()
    key = str(real)
    remembered = read_json_cache(cache).get(key)
    if (
        isinstance(remembered, dict)
        and remembered.get("size") == st.st_size
        and (remembered.get("mtime_ns") == st.st_mtime_ns)
    ):
        return str(remembered["sha256"])
    digest = hashlib.sha256()
    with real.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
    write_json_cache(cache, {**read_json_cache(cache), key: entry})
    return value


# --- reading tensors -------------------------------------------------------------------------------------------


class TensorFile:
    """A weights file opened lazily: its keys without reading tensors, each tensor memory-mapped on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st: Any = None
        self._sd: dict[str, torch.Tensor] | None = None
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._st = safe_open(str(path), framework="pt", device="cpu")
                return
            import torch

            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch.load / safetensors raise many types, tersely ("101" for a text file)
            raise ConfigError(
                "model.weights", f"{path}: not a checkpoint it can load ({type(exc).__name__}: {exc})"
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise ConfigError("model.weights", f"{path} does not hold a state dict")
        self._sd = {k.removeprefix("module."): v for k, v in loaded.items()}

    def keys(self) -> set[str]:
        if self._st is not None:
            return set(self._st.keys())
        assert self._sd is not None
        return set(self._sd)

    def get(self, key: str) -> torch.Tensor:
        if self._st is not None:
            tensor: torch.Tensor = self._st.get_tensor(key)
            return tensor
        assert self._sd is not None
        return self._sd[key]


def tensor_reader(source: ModelSource) -> tuple[set[str], Callable[[set[str]], dict[str, torch.Tensor]], Any]:
    """(open_clip keys the file provides, a function reading the open_clip tensors for some keys, the key plan)."""
    assert source.weights is not None
    tf = TensorFile(source.weights)
    if source.format != "transformers":
        keys = tf.keys()
        return keys, lambda wanted: {k: tf.get(k) for k in wanted}, None
    plan, unexpected = hfclip.key_plan(tf.keys())
    return set(plan), lambda wanted: hfclip.convert(plan, wanted, tf.get), (plan, unexpected, tf.keys())


def hf_cache_dir() -> str:
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return os.environ.get("HF_HUB_CACHE") or str(Path(home) / "hub")


def _hf_lookup(repo: str, files: tuple[str, ...], cache_dir: str | None, local_only: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: Exception | None = None
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_only))
        except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
            last = exc
    if local_only or last is None:
        return None
    raise last


def _hf_transformers_snapshot(repo: str, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder of a transformers CLIP repo (config.json + weights), offline."""
    weights = _hf_lookup(repo, hfclip.TRANSFORMERS_WEIGHT_FILES, cache_dir, local_only=True)
    if weights is None or _hf_lookup(repo, ("config.json",), cache_dir, local_only=True) is None:
        return None
    for name in ("preprocessor_config.json",):
        _hf_lookup(repo, (name,), cache_dir, local_only=True)
    return weights.parent


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
