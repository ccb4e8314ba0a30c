"""The CLIP model behind a narrow interface: load once, ``encode_pixels`` and ``encode_texts``.

The default is OpenAI's ViT-L/14 through open_clip, built exactly as OpenAI's model (QuickGELU, bicubic resize of
the shortest side + centre crop, OpenAI's mean/std), so the vectors are the reference ones: 768-dim, L2-normalised.
Any open_clip architecture runs through the same code, by name or from an open_clip model-config JSON file, and a
transformers ``CLIPModel`` directory (NeMo Curator's ``model_dir``) is read as it is (see :mod:`indexer.model.hfclip`).

Where the weights come from and the model's identity: :mod:`indexer.model.weights`. The network is built on the ``meta``
device (no random initialisation) and each tower is loaded, memory-mapped, when first used: a text query never
reads the image tower.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from indexer.atomicio import read_json_cache, write_json_cache
from indexer.errors import ConfigError, ModelError
from indexer.model.weights import (
    CPU_BATCH,
    GPU_BATCH,
    HF_WEIGHT_FILES,
    ModelSource,
    find_pretrained_weights,
    import_open_clip,
    preprocess_spec,
    resolve_source,
    tensor_reader,
)
from indexer.settings import ModelSettings

__all__ = [
    "HF_WEIGHT_FILES",
    "ClipModel",
    "ModelSource",
    "find_pretrained_weights",
    "load_model",
    "resolve_source",
]

log = logging.getLogger(__name__)

TOWERS = ("visual", "text")


class ClipModel:
    """A CLIP model on one device, each tower loaded when first used. Not thread-safe: one caller at a time."""

    def __init__(self, net: Any, source: ModelSource, device: torch.device, dtype: torch.dtype | None, batch: int):
        self.net = net
        self.source = source
        self.model_id = source.model_id
        self.device = device
        self.requested_dtype = dtype  # None: measure on this CPU (see calibrate_cpu_dtype)
        self.dtype = dtype or torch.float32
        self.batch_size = batch
        self.preprocess = preprocess_spec(source)  # what LazyModel told the decoders before the network existed
        if self.preprocess.image_size != _image_size(net):
            raise ModelError(
                f"{source.model_id}: the network takes {_image_size(net)} px, its config says "
                f"{self.preprocess.image_size}"
            )
        self.dim = int(source.config["embed_dim"])
        self._tokenizer = _tokenizer(source)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(shape)
        self._std = torch.tensor(self.preprocess.std, device=device).view(shape)
        self._loaded: set[str] = set()
        self._reader: Any = None
        self.compile = False  # torch.compile the image tower once loaded (model.compile)
        self._copy_stream: torch.cuda.Stream | None = None  # host→device copies on CUDA (see _to_device)
        self.cpu_notice = False  # on the CPU for want of a GPU: say so (once per process) when it matters

    def load(self, *towers: str) -> None:
        """Load the weights of ``towers`` ("visual", "text"; all when none given) if not loaded yet."""
        for tower in towers or TOWERS:
            if tower not in self._loaded:
                self._load_tower(tower)
                self._loaded.add(tower)

    def _load_tower(self, tower: str) -> None:
        started = time.perf_counter()
        load_tower(self.net, self.source, tower, self._reader_for())
        dtype = self.requested_dtype
        if dtype is None and tower == "visual":
            _move_tower(self.net, tower, self.device, torch.float32)
            dtype = calibrate_cpu_dtype(self.net, self.model_id)
        elif dtype is None:
            dtype = remembered_cpu_dtype(self.model_id) or torch.float32
        _move_tower(self.net, tower, self.device, dtype)
        if tower == "text" and getattr(self.net, "attn_mask", None) is not None:
            self.net.attn_mask = self.net.attn_mask.to(self.device)
        if tower == "visual":
            self.dtype = dtype
            if self.compile:  # the first batch of each size compiles (seconds to a minute); later ones run faster
                self.net.visual = torch.compile(self.net.visual, dynamic=False)
        seconds = time.perf_counter() - started
        log.info("%s tower of %s loaded in %.2f s (%s)", tower, self.model_id, seconds, dtype_name(dtype))

    def _reader_for(self) -> Any:
        if self._reader is None and self.source.weights is not None:
            self._reader = tensor_reader(self.source)
        return self._reader

    @torch.inference_mode()
    def encode_pixels(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """uint8 images (N, 3, S, S) from the decode stage → L2-normalised float32 vectors (N, dim).

        A CUDA out-of-memory error halves the batch size (kept for later calls) and retries the same images.
        """
        self.load("visual")
        if self.cpu_notice and len(pixels) >= CPU_NOTICE_BATCH and CPU_NOTICE.first():
            return self._encode_timed(pixels)
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

    def _encode_timed(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        started = time.perf_counter()
        vectors = self.encode_pixels(pixels)
        log.warning(
            "no CUDA GPU found: %s runs on the CPU (%s), about %.0f ms per image here",
            self.model_id,
            dtype_name(self.dtype),
            1000 * (time.perf_counter() - started) / len(pixels),
        )
        return vectors

    def _halve_batch(self, size: int) -> None:
        if size <= 1:
            raise ModelError("CUDA out of memory even at batch size 1") from None
        torch.cuda.empty_cache()
        self.batch_size = max(1, size // 2)
        log.warning("CUDA out of memory: batch size halved to %d", self.batch_size)

    def _forward_images(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        x = self._to_device(torch.from_numpy(np.ascontiguousarray(pixels)))
        x = ((x.float() / 255.0 - self._mean) / self._std).to(self.dtype)
        features = self.net.encode_image(x)
        return _normalise(features)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The batch on the model's device. On CUDA the copy runs on a stream of its own (non-blocking from the
        pinned batch buffer) and the compute stream waits for it with an event, so the copy's DMA does not queue
        behind other work on the compute stream. The host buffer stays safe to reuse once this call's forward has
        returned: `_normalise` copies the vectors back, which waits for the compute stream, which waited for the
        copy (the contract `embed.BatchBuffer` relies on)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(self._copy_stream):
            x = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(self._copy_stream)
        compute.wait_event(copied)
        x.record_stream(compute)  # made on the copy stream, used on this one: not reused before this one is done
        return x

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Texts → L2-normalised float32 vectors (N, dim), running the text tower only up to end-of-text."""
        self.load("text")
        tokens = self._tokenizer(list(texts)).to(self.device)
        return _normalise(encode_text_until_eot(self.net, tokens))

    def close(self) -> None:
        """Release the weights (and GPU memory)."""
        self.net = None
        self._reader = None
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


def load_model(settings: ModelSettings) -> ClipModel:
    """Resolve weights, build the network and load both towers on the device in the chosen dtype."""
    clip = build_clip(resolve_source(settings), settings)
    clip.load()
    return clip


def build_clip(source: ModelSource, settings: ModelSettings) -> ClipModel:
    """The network built on the meta device, no tower loaded yet (ClipModel loads each when first used)."""
    device = resolve_device(settings.device)
    chosen = choose_dtype(device, settings.dtype)
    net = build_network(source)
    batch = settings.batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    log.info("model %s on %s (%s), batch %d", source.model_id, device, _dtype_shown(chosen, source), batch)
    clip = ClipModel(net, source, device, chosen, batch)
    clip.compile = settings.compile
    clip.cpu_notice = settings.device == "auto" and device.type == "cpu"
    return clip


def dtype_name(dtype: torch.dtype) -> str:
    """ "bf16", "fp32", "fp16" (the names the settings use)."""
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))


def _dtype_shown(chosen: torch.dtype | None, source: ModelSource) -> str:
    if chosen is not None:
        return dtype_name(chosen)
    remembered = remembered_cpu_dtype(source.model_id)
    if remembered is not None:
        return f"{dtype_name(remembered)}, measured on this CPU before"
    return "fp32 or bf16: measured when the image tower loads"


class _Once:
    """A notice shown once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shown = False

    def first(self) -> bool:
        with self._lock:
            first, self.shown = not self.shown, True
            return first


CPU_NOTICE = _Once()
CPU_NOTICE_BATCH = 8  # shown for a batch of at least this many images: an ingest, not one query image


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU (NeMo Curator's stage needs a GPU; we run without, and say so once
    images are embedded: see `ClipModel.encode_pixels`)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    key = _dtype_key(model_id)
    remembered = remembered_cpu_dtype(model_id, cache)
    if remembered is not None:
        return remembered
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
    write_json_cache(cache, {**read_json_cache(cache), key: name})
    return DTYPES[name]


def _dtype_key(model_id: str) -> str:
    return f"{model_id} | torch {torch.__version__} | {cpu_name()} | {torch.get_num_threads()} threads"


def remembered_cpu_dtype(model_id: str, cache: Path | None = None) -> torch.dtype | None:
    """The dtype calibrate_cpu_dtype chose for this model, torch and CPU, if it ran before."""
    name = read_json_cache(cache or dtype_cache_file()).get(_dtype_key(model_id))
    return DTYPES.get(name) if isinstance(name, str) else None


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


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_network(source: ModelSource) -> Any:
    """The open_clip network for ``source.config``, its parameters on the meta device (nothing allocated, no random
    initialisation). A source without weights gets a random initialisation here, on the CPU."""
    open_clip = import_open_clip(source.config)
    config = dict(source.config)
    custom = bool(config.pop("custom_text", False)) or "hf_model_name" in config.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    try:
        if source.weights is None:
            torch.manual_seed(0)
            return cls(**config).eval()
        with torch.device("meta"):
            net = cls(**config)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot build model {source.model_id}: {exc}") from None
    return net.eval()


def _move_tower(net: Any, tower: str, device: torch.device, dtype: torch.dtype) -> None:
    """Cast one tower's modules and the network's own parameters belonging to it (text: all but ``visual``)."""
    if tower == "visual":
        net.visual.to(device=device, dtype=dtype)
        return
    for name, child in net.named_children():
        if name != "visual":
            child.to(device=device, dtype=dtype)
    for name, param in list(net.named_parameters(recurse=False)):
        cast = dtype if name not in ("logit_scale", "logit_bias") else torch.float32
        setattr(net, name, torch.nn.Parameter(param.detach().to(device=device, dtype=cast), requires_grad=False))


def _tower_of(key: str) -> str:
    return "visual" if key.startswith("visual.") else "text"


def load_tower(net: Any, source: ModelSource, tower: str, reader: Any) -> None:
    """Assign ``tower``'s tensors from the weights file to ``net`` (memory-mapped, no copy where the layout allows);
    a file that does not fit the architecture is a ModelError naming the missing and unexpected keys."""
    if reader is None:
        return  # random weights, initialised at build time
    keys, read, plan = reader
    model_keys = set(net.state_dict(keep_vars=True).keys())
    if plan is not None:
        from indexer.model.hfclip import check_plan

        check_plan(plan[0], plan[1], set(plan[2]), model_keys, Path(str(source.weights)))
    else:
        missing = sorted(model_keys - keys - {"logit_bias"})
        unexpected = sorted(keys - model_keys)
        if missing or unexpected:
            from indexer.model.hfclip import _few

            raise ModelError(
                f"{source.weights} does not fit model {source.model_id}: "
                f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}"
            )
    wanted = {k for k in model_keys & keys if _tower_of(k) == tower}
    tensors = read(wanted)
    try:
        _reshape_scalars(net, tensors)
        net.load_state_dict(tensors, strict=False, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot load {source.weights} into model {source.model_id}: {exc}") from None
    if tower == "text":
        if getattr(net, "logit_bias", None) is not None and net.logit_bias.is_meta:
            net.logit_bias = torch.nn.Parameter(torch.zeros(net.logit_bias.shape))
        if getattr(net, "attn_mask", None) is not None:
            n = int(net.attn_mask.shape[0])
            net.attn_mask = torch.full((n, n), float("-inf")).triu_(1)
    left = [n for n, t in net.state_dict(keep_vars=True).items() if _tower_of(n) == tower and t.is_meta]
    if left:
        raise ModelError(f"{source.weights}: no values for {', '.join(left[:8])}")


def _reshape_scalars(net: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in ("logit_scale", "logit_bias"):
        have, want = tensors.get(name), getattr(net, name, None)
        if have is not None and want is not None and have.shape != want.shape:
            tensors[name] = have.reshape(want.shape)


def _tokenizer(source: ModelSource) -> Any:
    open_clip = import_open_clip(source.config)
    context = int(source.config["text_cfg"].get("context_length", 77))
    if source.builtin_name is not None:
        return open_clip.get_tokenizer(source.builtin_name, context_length=context)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)
